"""Ack deadlines and identity (issue 11, defect 7): a message waiting behind a slow endpoint stays
alive in JetStream, a retry lease is let go at shutdown, a replayed dead letter is the same message."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable

import nats
import psycopg
import pytest

from tests.support.publish import publish_raw, settled
from tests.support.receiver import Receiver, Request, Response, ids
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_for, wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def test_a_message_queued_behind_a_slow_endpoint_is_not_sent_twice(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    # One request at a time, 0.6 s each, timeout 1 s (below half the ack wait: no keepalive for the
    # request itself): the sixth message waits 3 s at the gate, longer than the 2 s ack wait.
    configure(db, "GATE", "gate", batch_size=20, ack_wait_seconds=2)
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, timeout_seconds, max_concurrency) "
        "VALUES ('slow', %s, 'gate.slow', 1, 1)",
        (receiver.url + "/slow",),
    )
    receiver.responder = lambda req: Response(status=200, delay=0.6)
    worker = sidecar_factory()
    wait_ready(db)
    n = 10
    publish_raw(
        nats_server.url,
        "gate.slow",
        [json.dumps({"webhook_id": 1, "data": {"id": i}}).encode() for i in range(n)],
    )
    assert wait_until(lambda: len(set(ids(receiver))) == n, timeout=40), worker.output()[-3000:]
    # Every message (and any redelivered copy) acknowledged: a copy sent twice would have been sent.
    wait_for(lambda: settled(nats_server.url, "GATE"), lambda s: s == (0, 0), "GATE acknowledged")
    sends = Counter(ids(receiver))
    assert max(sends.values()) == 1, sends


def test_retry_leases_are_released_at_shutdown(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "LEASE", "lease", retry_initial_seconds=0.2)
    calls: list[float] = []

    def responder(req: Request) -> Response:
        calls.append(time.monotonic())
        return Response(status=503) if len(calls) == 1 else Response(status=200, delay=20.0)

    receiver.responder = responder
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, timeout_seconds) "
        "VALUES ('hang', %s, 'lease.x', 30)",
        (receiver.url + "/h",),
    )
    worker = sidecar_factory({"SHUTDOWN_TIMEOUT": "1"})
    wait_ready(db)
    publish_raw(nats_server.url, "lease.x", [json.dumps({"webhook_id": 1, "data": {"id": 1}}).encode()])
    assert wait_until(lambda: len(calls) >= 2, timeout=20), worker.output()[-3000:]  # the retry is running
    assert scalar(db, "SELECT leased_by FROM rule_nats_retries") == "w1"
    assert worker.terminate(timeout=30) == 0
    row = db.execute(
        "SELECT leased_by, leased_until IS NULL OR leased_until <= now() FROM rule_nats_retries"
    ).fetchone()
    assert row == (None, True), row  # another worker may take it at once, not in 10 minutes


def publish_with_id(url: str, subject: str, body: bytes, msg_id: str | None) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().publish(subject, body, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
        await nc.close()

    asyncio.run(go())


def test_a_replayed_dead_letter_keeps_its_identity(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "REPLAYID", "replayid")
    broken = {"on": True}
    receiver.responder = lambda req: Response(status=400 if broken["on"] else 200)
    sidecar_factory()
    wait_ready(db)

    def body(i: int) -> bytes:
        return json.dumps({"webhook_url": receiver.url + "/r", "data": {"id": i}}).encode()

    publish_with_id(nats_server.url, "replayid.a", body(5), "orig-5")  # identified by its Nats-Msg-Id
    publish_with_id(nats_server.url, "replayid.b", body(6), None)  # by stream and sequence
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 2, 10)
    broken["on"] = False
    assert db.execute("SELECT rule_nats_replay_dead_letters(p_reason => 'http_4xx')").fetchone() == (2,)
    assert wait_until(lambda: len(receiver.snapshot()) == 4, timeout=15)
    seen: dict[int, list[str]] = {}
    for r in receiver.snapshot():
        seen.setdefault(json.loads(r.body)["id"], []).append(r.headers["webhook-id"])
    assert seen[5] == ["orig-5", "orig-5"], seen  # receivers de-duplicate by webhook-id
    assert seen[6][0] == seen[6][1] == "stream-REPLAYID-2", seen
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 2
        )
    )
    rows = db.execute(
        "SELECT message_id, attempt, outcome FROM rule_nats_delivery_attempts ORDER BY message_id, attempt"
    ).fetchall()
    # One query finds the message and its replay; attempt numbers go on.
    assert rows == [
        ("orig-5", 1, "dead_letter"),
        ("orig-5", 2, "delivered"),
        ("stream-REPLAYID-2", 1, "dead_letter"),
        ("stream-REPLAYID-2", 2, "delivered"),
    ], rows
