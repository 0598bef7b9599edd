"""Operating the sidecar: hot reload, environment seed, several workers, isolation, signals, replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import nats
import psycopg
import pytest

from tests.support.publish import publish_raw, settled
from tests.support.receiver import Receiver, Request, Response, ids
from tests.support.registry import configure, outcomes, scalar, wait_ready
from tests.support.sidecar import Sidecar, applied
from tests.support.stack import NatsServer
from tests.support.waits import wait_for, wait_rows, wait_scalar, wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def test_hot_reload_add_change_disable(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    db.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects, storage_type) VALUES ('HOT', '{hot.>}', 'memory')"
    )
    sidecar = sidecar_factory()
    wait_rows(db, "SELECT FROM rule_nats_stream_state WHERE stream_name = 'HOT' AND present")
    # A consumer added while the sidecar runs starts delivering.
    db.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('HOT', 'hot-workers')")
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('h', %s, 'hot.x')",
        (receiver.url + "/v1",),
    )
    wait_ready(db, timeout=5)
    db.execute("SELECT rule_webhook_publish_nats(1, '{\"id\": 1}')")
    assert wait_until(lambda: ids(receiver, "/v1") == [1], timeout=5)
    # A changed URL applies to the next attempt.
    with applied(sidecar):
        db.execute("UPDATE rule_webhooks SET url = %s", (receiver.url + "/v2",))
    db.execute("SELECT rule_webhook_publish_nats(1, '{\"id\": 2}')")
    assert wait_until(lambda: ids(receiver, "/v2") == [2], timeout=5)
    # A disabled consumer stops (its runner is gone once applied); its messages wait in the stream.
    with applied(sidecar):
        db.execute("UPDATE rule_nats_consumers SET enabled = false")
    db.execute("SELECT rule_webhook_publish_nats(1, '{\"id\": 3}')")
    assert settled(nats_server.url, "HOT", "hot-workers") == (1, 0)  # in the stream, given to nobody
    assert 3 not in ids(receiver)
    db.execute("UPDATE rule_nats_consumers SET enabled = true")
    assert wait_until(lambda: 3 in ids(receiver), timeout=5)
    # Storage changes JetStream refuses are recorded where the DBA looks.
    db.execute("UPDATE rule_nats_streams SET storage_type = 'file' WHERE stream_name = 'HOT'")
    assert wait_until(
        lambda: (
            (
                db.execute(
                    "SELECT last_error FROM rule_nats_stream_state WHERE stream_name = 'HOT'"
                ).fetchone()
                or [None]
            )[0]
            is not None
        ),
        timeout=5,
    )
    err = db.execute("SELECT last_error, storage_type FROM rule_nats_stream_state").fetchone()
    assert err is not None and "storage" in err[0] and err[1] == "memory"


def test_environment_seed_registers_the_consumer(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    sidecar_factory(
        {
            "STREAM_NAME": "SEEDED",
            "SUBJECT": "seeded.>",
            "QUEUE_GROUP": "seed-group",
            "BATCH_SIZE": "7",
            "CONSUMER_NAME": "seed-worker-1",
            "NATS_URL": nats_server.url,
        },
        name="seed-worker-1",
    )
    wait_ready(db)
    row = db.execute(
        "SELECT stream_name, consumer_name, filter_subject, batch_size FROM rule_nats_consumers"
    ).fetchone()
    assert row == ("SEEDED", "seed-group", "seeded.>", 7)
    publish_raw(
        nats_server.url,
        "seeded.a",
        [json.dumps({"webhook_url": receiver.url + "/s", "data": {"id": 9}}).encode()],
    )
    assert wait_until(lambda: ids(receiver) == [9], timeout=10)


def test_three_workers_share_one_queue_group_exactly_once(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "SHARED", "shared", batch_size=16)
    for i in range(3):
        sidecar_factory(name=f"worker-{i}")
    wait_ready(db)

    async def waiting_pulls() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            return int((await nc.jetstream().consumer_info("SHARED", "workers")).num_waiting or 0)
        finally:
            await nc.close()

    # Every worker pulls before anything is published: the first one up could otherwise deliver all
    # 600 before the others start (it did once, under load, in the full suite).
    assert wait_until(lambda: asyncio.run(waiting_pulls()) >= 3, timeout=20)
    n = 600
    publish_raw(
        nats_server.url,
        "shared.x",
        [json.dumps({"webhook_url": receiver.url + "/s", "data": {"id": i}}).encode() for i in range(n)],
    )
    assert wait_until(lambda: len(receiver.snapshot()) >= n, timeout=30)
    # Every attempt recorded and every message acknowledged: none can be sent again.
    wait_scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts", until=lambda v: v == n)
    wait_for(lambda: settled(nats_server.url, "SHARED"), lambda s: s == (0, 0), "SHARED acknowledged")
    got = ids(receiver)
    assert sorted(got) == list(range(n))  # each message once
    by_worker = dict(
        db.execute("SELECT worker_name, count(*) FROM rule_nats_delivery_attempts GROUP BY 1").fetchall()
    )
    assert sum(by_worker.values()) == n
    assert len(by_worker) >= 2, by_worker  # the work was shared


def test_dead_endpoint_does_not_delay_a_healthy_one(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "ISO", "iso", batch_size=8)

    def responder(req: Request) -> Response:
        return Response(status=200, delay=5.0 if req.path == "/hang" else 0.0)

    receiver.responder = responder
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, timeout_seconds) "
        "VALUES ('hang', %s, 'iso.hang', 1)",
        (receiver.url + "/hang",),
    )
    sidecar_factory()
    wait_ready(db)
    hung = [json.dumps({"webhook_id": 1, "data": {"id": 1000 + i}}).encode() for i in range(40)]
    good = [json.dumps({"webhook_url": receiver.url + "/ok", "data": {"id": i}}).encode() for i in range(40)]
    publish_raw(nats_server.url, "iso.hang", hung)
    # The hanging ones hold their slots before the healthy ones are published.
    wait_for(lambda: [r for r in receiver.snapshot() if r.path == "/hang"], bool, "a request to /hang")
    publish_raw(nats_server.url, "iso.ok", good)
    assert wait_until(lambda: len(ids(receiver, "/ok")) == 40, timeout=15)
    # The 40 hanging messages are ahead in the stream. Had they held the 8 slots, every one of
    # them would have been attempted before the first healthy delivery; instead the healthy ones
    # went through after the first round of timeouts.
    paths = [r.path for r in receiver.snapshot()]
    hangs_before_last_ok = paths[: len(paths) - paths[::-1].index("/ok")].count("/hang")
    assert hangs_before_last_ok < 20, hangs_before_last_ok
    # The timeouts are recorded as retries; under load their batch may commit a moment later.
    assert wait_until(lambda: int(scalar(db, "SELECT count(*) FROM rule_nats_retries") or 0) > 0, timeout=10)


def test_sigterm_finishes_in_flight_and_sigkill_loses_nothing(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    # A short ack wait, so that what the killed worker had in hand comes back quickly.
    configure(db, "SIG", "sig", batch_size=20, ack_wait_seconds=3)
    receiver.responder = lambda req: Response(status=200, delay=0.3)
    first = sidecar_factory(name="sig-1")
    wait_ready(db)
    n = 200
    publish_raw(
        nats_server.url,
        "sig.x",
        [json.dumps({"webhook_url": receiver.url + "/s", "data": {"id": i}}).encode() for i in range(n)],
    )
    assert wait_until(lambda: len(receiver.snapshot()) >= 20, timeout=10)
    assert first.terminate(timeout=30) == 0  # finishes what is in flight, records it, exits 0
    # Its final stats row counts everything it recorded, including the last batch before exit.
    final = db.execute(
        "SELECT s.active, s.messages_acknowledged, (SELECT count(*) FROM rule_nats_delivery_attempts "
        "WHERE worker_name = 'sig-1') FROM rule_nats_consumer_stats s WHERE s.worker_name = 'sig-1'"
    ).fetchone()
    assert final is not None and final[0] is False and final[1] == final[2] > 0, final
    # Everything that reached the receiver before the stop is recorded (in-flight work was finished).
    recorded = {m for (m,) in db.execute("SELECT message_id FROM rule_nats_delivery_attempts").fetchall()}
    assert len(recorded) >= len(set(ids(receiver)))
    second = sidecar_factory(name="sig-2")
    assert wait_until(lambda: len(set(ids(receiver))) >= 100, timeout=20)
    second.kill()  # SIGKILL mid-run
    sidecar_factory(name="sig-3")
    assert wait_until(lambda: set(ids(receiver)) == set(range(n)), timeout=40)
    assert wait_until(lambda: outcomes(db).get("delivered", 0) >= n, timeout=20), outcomes(db)
    dupes = len(ids(receiver)) - n
    assert dupes <= 2 * 20, dupes  # bounded by what was in flight when killed


def test_replay_from_the_dead_letter_table(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "REPLAY", "replay")
    broken = {"on": True}
    receiver.responder = lambda req: Response(status=410 if broken["on"] else 200)
    sidecar_factory()
    wait_ready(db)
    body = (
        b'{"webhook_url": "' + receiver.url.encode() + b'/r", "data": {"id": 5, "big": 12345678901234567890}}'
    )
    publish_raw(nats_server.url, "replay.x", [body])
    assert wait_until(
        lambda: db.execute("SELECT count(*) FROM rule_nats_dead_letters").fetchone() == (1,), 10
    )
    broken["on"] = False
    assert db.execute("SELECT rule_nats_replay_dead_letters(p_reason => 'http_4xx')").fetchone() == (1,)
    assert wait_until(lambda: len(receiver.snapshot()) == 2, timeout=10)
    assert receiver.snapshot()[-1].body == b'{"id": 5, "big": 12345678901234567890}'  # the original bytes
    row = db.execute("SELECT replayed, replay_count FROM rule_nats_dead_letters").fetchone()
    assert row == (True, 1)
    assert db.execute("SELECT rule_nats_replay_dead_letters(p_reason => 'http_4xx')").fetchone() == (0,)
