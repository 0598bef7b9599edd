"""Delivery end to end: configured in SQL only, the sidecar as a subprocess, a real HTTP receiver."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
import pytest

from tests.support.publish import settled
from tests.support.receiver import Receiver, Request, Response

# Re-exported: test_bulkheads and test_routing import these from here.
from tests.support.registry import configure, outcomes, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_for, wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def attempts(db: psycopg.Connection) -> list[tuple[object, ...]]:
    return db.execute(
        "SELECT message_id, attempt, outcome, http_status, error FROM rule_nats_delivery_attempts ORDER BY attempt_id"
    ).fetchall()


def test_configured_in_sql_delivered_end_to_end(
    db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> None:
    configure(db, "E2E", "e2e")
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) VALUES ('hook', %s, 'e2e.orders', "
        '\'{"Authorization": "Bearer s3cret", "X-Static": "1"}\')',
        (receiver.url + "/hook",),
    )
    sidecar = sidecar_factory()
    assert wait_until(
        lambda: db.execute("SELECT present FROM rule_nats_consumer_state").fetchone() == (True,), timeout=20
    ), sidecar.output()[-3000:]
    data = '{"z": 1, "a": 123456789012345678901234567890, "s": "it\'s"}'
    db.execute("SELECT rule_webhook_publish_nats(1, %s::jsonb, 'evt-1')", (data,))
    # A raw message in the original worker's format, without the registry:
    raw = {"webhook_url": receiver.url + "/raw", "data": {"k": [1, 2]}, "headers": {"X-From": "msg"}}
    db.execute("SELECT rule_nats_publish('e2e.raw', %s::jsonb)", (json.dumps(raw),))
    got = receiver.wait_for(2, timeout=20)
    assert len(got) == 2, sidecar.output()[-3000:]
    hook = next(r for r in got if r.path == "/hook")
    # jsonb normalised the published text; what the worker forwards is the message's bytes, unchanged:
    assert json.loads(hook.body) == json.loads(data)
    assert b"123456789012345678901234567890" in hook.body
    assert hook.headers["Authorization"] == "Bearer s3cret" and hook.headers["X-Static"] == "1"
    assert hook.headers["Content-Type"] == "application/json"
    plain = next(r for r in got if r.path == "/raw")
    assert json.loads(plain.body) == {"k": [1, 2]} and plain.headers["X-From"] == "msg"
    assert wait_until(lambda: outcomes(db) == {"delivered": 2})
    rows = attempts(db)
    assert ("evt-1", 1, "delivered", 200, None) in rows
    # Stats and heartbeats reach PostgreSQL within a few seconds.
    assert wait_until(
        lambda: (
            db.execute(
                "SELECT messages_delivered, messages_acknowledged FROM rule_nats_consumer_stats WHERE worker_name = 'w1'"
            ).fetchone()
            == (2, 2)
        ),
        timeout=10,
    )
    assert sidecar.terminate() == 0
    row = db.execute(
        "SELECT active, messages_delivered, messages_acknowledged FROM rule_nats_consumer_stats "
        "WHERE worker_name = 'w1'"
    ).fetchone()
    assert row == (False, 2, 2)
    assert db.execute(
        "SELECT stopped_at IS NOT NULL FROM rule_nats_workers WHERE worker_name = 'w1'"
    ).fetchone() == (True,)


def test_poison_messages_dead_lettered_without_retry(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "POISON", "poison")
    receiver.responder = lambda req: Response(status=400 if req.path == "/bad" else 200)
    sidecar_factory()
    assert wait_until(
        lambda: db.execute("SELECT present FROM rule_nats_consumer_state").fetchone() == (True,), 20
    )
    import asyncio

    import nats

    async def publish_raw() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.publish("poison.a", b"{not json")
        await js.publish("poison.b", b'{"data": {"x": 1}}')
        await js.publish("poison.c", json.dumps({"webhook_url": "ftp://x/y", "data": {}}).encode())
        await js.publish("poison.d", json.dumps({"webhook_url": receiver.url + "/bad", "data": {}}).encode())
        await js.publish("poison.e", json.dumps({"webhook_url": receiver.url + "/good", "data": {}}).encode())
        await nc.close()

    asyncio.run(publish_raw())
    assert wait_until(lambda: sum(outcomes(db).values()) == 5, timeout=20), outcomes(db)
    reasons = dict(db.execute("SELECT subject, reason FROM rule_nats_dead_letters").fetchall())
    assert reasons == {
        "poison.a": "invalid_json",
        "poison.b": "missing_webhook_url",
        "poison.c": "invalid_webhook_url",
        "poison.d": "http_4xx",
    }
    raw = db.execute("SELECT message_raw FROM rule_nats_dead_letters WHERE subject = 'poison.a'").fetchone()
    assert raw == (b"{not json",)
    # Not retried: every message is acknowledged (none can come again) and /bad was called once.
    wait_for(lambda: settled(nats_server.url, "POISON"), lambda s: s == (0, 0), "POISON acknowledged")
    assert [r.path for r in receiver.snapshot()].count("/bad") == 1
    assert db.execute("SELECT count(*) FROM rule_nats_retries").fetchone() == (0,)


def test_flaky_endpoint_every_id_delivered_with_attempts_recorded(
    db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> None:
    configure(db, "FLAKY", "flaky", batch_size=20, retry_initial_seconds=0.2, retry_max_backoff_seconds=0.5)
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('f', %s, 'flaky.x')",
        (receiver.url + "/f",),
    )
    seen: set[str] = set()

    def flaky(req: Request) -> Response:
        event = json.loads(req.body)["id"]
        if event % 5 == 0 and event not in seen:
            seen.add(event)
            return Response(status=503, headers={"Retry-After": "0"})
        return Response(status=200)

    receiver.responder = flaky
    sidecar_factory()
    wait_ready(db)
    with db.transaction():
        for i in range(50):
            db.execute(
                "SELECT rule_webhook_publish_nats(1, %s::jsonb, %s)", (json.dumps({"id": i}), f"flaky-{i}")
            )
    assert wait_until(lambda: outcomes(db).get("delivered") == 50, timeout=30), outcomes(db)
    assert outcomes(db) == {"delivered": 50, "retry": 10}
    retried = db.execute(
        "SELECT message_id, array_agg(attempt ORDER BY attempt), array_agg(outcome ORDER BY attempt) "
        "FROM rule_nats_delivery_attempts GROUP BY message_id HAVING count(*) > 1"
    ).fetchall()
    assert len(retried) == 10
    assert all(r[1] == [1, 2] and r[2] == ["retry", "delivered"] for r in retried)
    assert db.execute("SELECT count(*) FROM rule_nats_retries").fetchone() == (0,)


def test_stats_are_written_every_100_messages(
    db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> None:
    configure(db, "STATS", "stats", batch_size=50)
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('s', %s, 'stats.x')",
        (receiver.url + "/s",),
    )
    # Heartbeats (and the periodic stats) only once a minute: what arrives sooner is the 100-message trigger.
    sidecar_factory({"HEARTBEAT_INTERVAL": "60"})
    wait_ready(db)
    with db.transaction():
        db.execute(
            "SELECT count(rule_webhook_publish_nats(1, jsonb_build_object('id', g))) FROM generate_series(1, 250) g"
        )
    assert wait_until(lambda: len(receiver.snapshot()) == 250, timeout=20)
    assert wait_until(
        lambda: (
            (db.execute("SELECT messages_delivered FROM rule_nats_consumer_stats").fetchone() or (0,))[0]
            >= 200
        ),
        timeout=10,
    )
