"""Back-pressure from PostgreSQL and crashes (issue 11, defect 5, and the kill test).

While outcomes cannot be committed the sidecar takes no new messages, keeps the ones it holds
alive in JetStream and sends nothing twice; a worker killed again and again loses nothing and
repeats at most what it had in flight.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sidecar import migrate
from tests.support.publish import publish_raw, settled
from tests.support.receiver import Receiver, Response, ids
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer, PostgresCluster
from tests.support.waits import wait_for, wait_until


@pytest.fixture
def own_pg() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster this test alone stops and starts (the session cluster stays up)."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-pg-own-")))
    cluster.start()
    yield cluster
    cluster.cleanup()


def delivered_seqs(url: str) -> int:
    with psycopg.connect(url) as c:
        return int(
            scalar(
                c,
                "SELECT count(DISTINCT stream_seq) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'",
            )
            or 0
        )


def test_postgres_outage_sends_nothing_twice(
    own_pg: PostgresCluster,
    nats_server: NatsServer,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    record_property: Callable[[str, object], None],
) -> None:
    with psycopg.connect(own_pg.url(), autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("app")))
    url = own_pg.url("app")
    migrate.migrate(url)
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_server.url,)
        )
        db.execute("CREATE ROLE ww_outage LOGIN IN ROLE rule_nats_worker")
        # ack_wait 2 s: the outage below lasts six of them.
        configure(db, "OUTAGE", "outage", batch_size=10, ack_wait_seconds=2)
        receiver.responder = lambda req: Response(status=200, delay=0.1)
        worker = sidecar_factory(url=own_pg.url("app", user="ww_outage"))
        wait_ready(db)
    n = 80
    publish_raw(
        nats_server.url,
        "outage.x",
        [json.dumps({"webhook_url": receiver.url + "/o", "data": {"id": i}}).encode() for i in range(n)],
    )
    assert wait_until(lambda: len(receiver.snapshot()) >= 5, timeout=15), worker.output()[-3000:]
    # Longer than the sidecar's pool timeout (30 s), after which the old "already recorded?" check
    # answered "no" and redelivered messages were sent again.
    own_pg.stop()
    time.sleep(36.0)
    during = Counter(ids(receiver))
    own_pg.start()
    restarted = time.monotonic()
    assert wait_until(lambda: len(set(ids(receiver))) == n, timeout=60), worker.output()[-3000:]
    # Delivery resumes by itself soon after PostgreSQL is back (it waited 27 s for the connection
    # pool's next attempt, whose delay had doubled through the outage).
    resumed = min(r.received_at for r in receiver.snapshot() if r.received_at > restarted) - restarted
    record_property("resumed_after_s", round(resumed, 2))
    assert resumed < 12.0, f"delivery resumed {resumed:.1f} s after PostgreSQL was back"
    assert wait_until(lambda: delivered_seqs(url) == n, timeout=30), worker.output()[-3000:]
    # Every message acknowledged: none can come again, so anything sent twice has been sent.
    wait_for(lambda: settled(nats_server.url, "OUTAGE"), lambda s: s == (0, 0), "OUTAGE acknowledged")
    sends = Counter(ids(receiver))
    record_property("ids_sent_during_outage", len(during))
    record_property("longest_gap_s", round(receiver.longest_gap(), 2))
    record_property("max_sends_per_message", max(sends.values()))
    assert max(sends.values()) == 1, (
        f"sent twice: {sorted(i for i, k in sends.items() if k > 1)}; during the outage: "
        f"{len(during)} ids, {sum(during.values())} requests, max {max(during.values())} per id"
    )
    # While nothing could be committed, at most one window of messages was taken and sent.
    assert len(during) <= 10 + 10, during
    with psycopg.connect(url) as c:
        assert scalar(c, "SELECT count(*) FROM rule_nats_delivery_attempts") == n
    assert worker.proc.poll() is None, worker.output()[-3000:]


def progressed(receiver: Receiver, target: int) -> Callable[[], bool]:
    return lambda: len(set(ids(receiver))) >= target


def test_repeated_sigkill_loses_nothing_and_repeats_at_most_a_window(
    nats_db: psycopg.Connection,
    nats_server: NatsServer,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    database_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    db = nats_db
    batch = 32
    # ack_wait 2 s: what a killed worker held comes back quickly.
    configure(db, "KILL", "kill", batch_size=batch, ack_wait_seconds=2)
    n = 4000
    bodies = [json.dumps({"webhook_url": receiver.url + "/k", "data": {"id": i}}).encode() for i in range(n)]
    worker = sidecar_factory(name="kill-0")
    wait_ready(db)
    publish_raw(nats_server.url, "kill.x", bodies)
    kills = 0
    for round_ in range(1, 6):
        # Killed in the middle of delivering: after it made some progress, or 10 s after the last kill.
        wait_until(progressed(receiver, min(n, len(set(ids(receiver))) + 500)), timeout=10.0)
        if len(set(ids(receiver))) == n:
            break
        worker.kill()
        kills += 1
        worker = sidecar_factory(name=f"kill-{round_}")
    assert wait_until(lambda: len(set(ids(receiver))) == n, timeout=40), worker.output()[-3000:]
    assert wait_until(lambda: delivered_seqs(database_url) == n, timeout=20)
    wait_for(lambda: settled(nats_server.url, "KILL"), lambda s: s == (0, 0), "KILL acknowledged")
    got = ids(receiver)
    dupes = len(got) - n
    record_property("kills", kills)
    record_property("duplicates", dupes)
    record_property("longest_gap_s", round(receiver.longest_gap(), 2))
    assert kills >= 3, "the workers finished before they could be killed: publish more"
    # A killed worker repeats at most what it held: batch_size messages between their arrival and the
    # COMMIT of their outcome, whether being delivered or delivered and waiting (backpressure.pull_size).
    assert dupes <= kills * batch, (dupes, kills)
    # Each message is recorded once: a redelivered message whose outcome was committed is only acknowledged.
    assert scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == n
