"""Faults the worker must ride out while delivering: the NATS server restarting, an endpoint down for
a while. Each message ends delivered; duplicates stay within what was in flight; each test records
lost, duplicates and the longest gap between two deliveries (for the closing notes, not asserted
beyond a generous bound)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import psycopg

from tests.support.publish import publish_ids
from tests.support.receiver import Receiver, Response
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until

BATCH = 20


def _configure(db: psycopg.Connection, nats_url: str, stream: str, subject: str, **consumer: object) -> None:
    db.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_url,))
    # File storage: the stream outlives a restart of its server.
    configure(db, stream, subject, batch_size=BATCH, storage="file", **consumer)


def _ids(receiver: Receiver) -> Counter[int]:
    return Counter(json.loads(r.body)["id"] for r in receiver.snapshot())


def test_a_nats_restart_during_delivery_loses_nothing(
    nats_db: psycopg.Connection,
    own_nats_server: NatsServer,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    record_property: Callable[[str, object], None],
) -> None:
    db = nats_db
    _configure(db, own_nats_server.url, "RESTART", "restart", ack_wait_seconds=5)
    receiver.responder = lambda _req: Response(status=200, delay=0.005)
    worker = sidecar_factory(name="restart-1")
    wait_ready(db)
    n = 3000
    publish_ids(own_nats_server.url, "restart.x", range(n), receiver.url + "/n")
    assert wait_until(lambda: len(_ids(receiver)) >= n // 5, timeout=30), worker.output()[-3000:]
    own_nats_server.restart()
    restarted = time.monotonic()
    assert wait_until(lambda: len(_ids(receiver)) == n, timeout=60), (
        n - len(_ids(receiver)),
        worker.output()[-3000:],
    )
    got = _ids(receiver)
    duplicates = sum(got.values()) - n
    resumed = min((r.received_at for r in receiver.snapshot() if r.received_at > restarted), default=-1.0)
    record_property("lost", n - len(got))
    record_property("duplicates", duplicates)
    record_property("longest_gap_s", round(receiver.longest_gap(), 2))
    record_property("resumed_after_s", round(resumed - restarted, 2))
    # What the worker held when the server went away: sent, with its acknowledgement lost.
    assert duplicates <= 2 * BATCH, duplicates
    assert wait_until(
        lambda: scalar(db, "SELECT count(DISTINCT message_id) FROM rule_nats_delivery_attempts") == n,
        timeout=20,
    )
    # Idle now, with its pull requests open on the server. One message, so that the worker's last
    # sign of life from NATS is now; then the restart forgets those pull requests. The worker asks
    # again once it has reconnected (nats-py waits 2 s between attempts), not once it gives them up
    # for lost, 7 s after that last message (PULL_EXPIRES + 2).
    publish_ids(own_nats_server.url, "restart.x", range(n, n + 1), receiver.url + "/n")
    assert wait_until(lambda: len(_ids(receiver)) == n + 1, timeout=10)
    own_nats_server.restart()
    again = time.monotonic()
    publish_ids(own_nats_server.url, "restart.x", range(n + 1, n + 51), receiver.url + "/n")
    assert wait_until(lambda: len(_ids(receiver)) == n + 51, timeout=30)
    first = min(r.received_at for r in receiver.snapshot() if json.loads(r.body)["id"] > n)
    record_property("idle_restart_first_delivery_s", round(first - again, 2))
    assert first - again < 5.0, first - again
    assert worker.proc.poll() is None


def test_an_endpoint_down_for_a_while_loses_nothing(
    nats_db: psycopg.Connection,
    nats_server: NatsServer,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    record_property: Callable[[str, object], None],
) -> None:
    """The endpoint answers 503 for 8 s, then 200 again: every message is delivered (through the
    retry table, with backoff), none twice with 200, and nothing is dead-lettered."""
    db = nats_db
    _configure(
        db,
        nats_server.url,
        "DOWN",
        "down",
        retry_initial_seconds=0.5,
        retry_max_backoff_seconds=2,
        retry_max_attempts=50,
    )
    down_until = [0.0]
    receiver.responder = lambda _req: Response(status=503 if time.monotonic() < down_until[0] else 200)
    worker = sidecar_factory(name="down-1")
    wait_ready(db)
    n = 500
    down_until[0] = time.monotonic() + 8.0
    publish_ids(nats_server.url, "down.x", range(n), receiver.url + "/d")
    ok = lambda: Counter(  # noqa: E731
        json.loads(r.body)["id"] for r in receiver.snapshot() if r.received_at >= down_until[0]
    )
    assert wait_until(lambda: len(ok()) == n, timeout=60), (n - len(ok()), worker.output()[-3000:])
    delivered = ok()
    back = [r.received_at for r in receiver.snapshot() if r.received_at >= down_until[0]]
    record_property("lost", n - len(delivered))
    record_property("duplicates", sum(delivered.values()) - n)
    record_property("first_delivery_after_recovery_s", round(min(back) - down_until[0], 2))
    record_property("all_delivered_after_recovery_s", round(max(back) - down_until[0], 2))
    assert sum(delivered.values()) == n  # none delivered twice
    assert scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 0
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == n
        ),
        timeout=20,
    )
