"""The transactional outbox end to end: SQL in PostgreSQL, the sidecar relay, messages in JetStream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import nats
import psycopg
import pytest

from tests.support.publish import add_stream
from tests.support.registry import allow_any_subject, register_stream, scalar
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import nothing_before, wait_until


async def _stream_messages(url: str, stream: str) -> list[tuple[bytes, dict[str, str]]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.data or b"", dict(msg.headers or {})))
        return out
    finally:
        await nc.close()


def stream_messages(url: str, stream: str) -> list[tuple[bytes, dict[str, str]]]:
    return asyncio.run(_stream_messages(url, stream))


@pytest.fixture
def db(nats_db: psycopg.Connection, nats_server: NatsServer) -> psycopg.Connection:
    add_stream(nats_server.url, "OUTBOX", ["ob.>"])
    register_stream(nats_db, "OUTBOX", ["ob.>"])
    return nats_db


def counts(db: psycopg.Connection) -> dict[str, int]:
    """Rows left in the outbox by status; published rows leave it (their record is the history row)."""
    return dict(db.execute("SELECT status, count(*) FROM rule_nats_outbox GROUP BY status").fetchall())


def relayed(db: psycopg.Connection) -> int:
    row = db.execute(
        "SELECT count(*) FROM rule_nats_publish_history WHERE triggered_by = 'outbox' AND success"
    ).fetchone()
    return int(row[0]) if row else 0


def test_rollback_publishes_nothing_commit_publishes_once(
    db: psycopg.Connection, nats_server: NatsServer, sidecar_factory: Callable[..., Sidecar]
) -> None:
    sidecar = sidecar_factory()
    with db.transaction():
        for i in range(3):
            db.execute("SELECT rule_nats_publish_on_commit('ob.rolled', %s::jsonb)", (json.dumps({"i": i}),))
        db.execute("ROLLBACK")  # psycopg's transaction() would commit; roll back explicitly
    assert counts(db) == {}
    with db.transaction():
        for i in range(5):
            db.execute(
                "SELECT rule_nats_publish_on_commit('ob.kept', %s::jsonb, '{\"X-Tenant\": \"t1\"}')",
                (json.dumps({"i": i, "q": "it's"}),),
            )
    assert wait_until(lambda: relayed(db) == 5 and counts(db) == {}), (counts(db), sidecar.output()[-3000:])
    msgs = stream_messages(nats_server.url, "OUTBOX")
    assert sorted(json.loads(m[0])["i"] for m in msgs) == [0, 1, 2, 3, 4]
    assert all(m[1]["X-Tenant"] == "t1" and m[1]["Nats-Msg-Id"].startswith("outbox-") for m in msgs)
    hist = db.execute(
        "SELECT count(*), bool_and(success), bool_and(NOT duplicate) FROM rule_nats_publish_history "
        "WHERE triggered_by = 'outbox'"
    ).fetchone()
    assert hist == (5, True, True)
    assert sidecar.terminate() == 0


def test_kill_between_publish_and_mark_does_not_duplicate(
    db: psycopg.Connection, nats_server: NatsServer, sidecar_factory: Callable[..., Sidecar]
) -> None:
    with db.transaction():
        for i in range(100):
            db.execute("SELECT rule_nats_publish_on_commit('ob.crash', %s::jsonb)", (json.dumps({"i": i}),))
    crashing = sidecar_factory({"WEBHOOK_WORKER_FAULT": "outbox_kill_after_publish"}, name="crasher")
    assert crashing.wait_exit(30) == -9  # it SIGKILLed itself after publishing, before marking
    assert counts(db) == {"pending": 100}
    assert len(stream_messages(nats_server.url, "OUTBOX")) == 100
    sidecar_factory(name="survivor")
    assert wait_until(lambda: relayed(db) == 100 and counts(db) == {}), counts(db)
    msgs = stream_messages(nats_server.url, "OUTBOX")
    assert sorted(json.loads(m[0])["i"] for m in msgs) == list(range(100))  # each event once
    dup = db.execute(
        "SELECT count(*) FILTER (WHERE duplicate) FROM rule_nats_publish_history WHERE triggered_by = 'outbox'"
    ).fetchone()
    assert dup == (100,)  # JetStream recognised every re-publish by its Nats-Msg-Id


def test_two_relays_never_double_publish(
    db: psycopg.Connection, nats_server: NatsServer, sidecar_factory: Callable[..., Sidecar]
) -> None:
    env = {"OUTBOX_BATCH_SIZE": "50"}
    sidecar_factory(env, name="relay-a")
    sidecar_factory(env, name="relay-b")
    for chunk in range(20):
        with db.transaction():
            db.execute(
                "SELECT rule_nats_publish_on_commit('ob.pair', jsonb_build_object('i', g)) "
                "FROM generate_series(%s::int, %s::int) g",
                (chunk * 100, chunk * 100 + 99),
            )
    assert wait_until(lambda: relayed(db) == 2000 and counts(db) == {}, timeout=60), counts(db)
    hist = db.execute(
        "SELECT count(*), count(DISTINCT message_id), count(*) FILTER (WHERE duplicate) "
        "FROM rule_nats_publish_history WHERE triggered_by = 'outbox'"
    ).fetchone()
    assert hist == (2000, 2000, 0)
    assert len(stream_messages(nats_server.url, "OUTBOX")) == 2000


def test_unpublishable_rows_fail_once_with_a_reason(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar]
) -> None:
    sidecar_factory()
    allow_any_subject(db)  # else refused at once: no registered stream captures it
    db.execute("SELECT rule_nats_publish_on_commit('nowhere.at.all', '{}')")
    db.execute("SELECT rule_nats_publish_on_commit('ob.fine', '{}')")
    assert wait_until(lambda: counts(db) == {"failed": 1} and relayed(db) == 1), counts(db)
    row = db.execute(
        "SELECT attempts, error_message FROM rule_nats_outbox WHERE status = 'failed'"
    ).fetchone()
    assert row is not None and row[0] == 1 and "no JetStream stream captures subject" in row[1]

    # Not retried: a row queued after it is relayed by a later poll, and the failed row still has one attempt.
    def later() -> None:
        db.execute("SELECT rule_nats_publish_on_commit('ob.later', '{}')")

    nothing_before(
        later,
        lambda: relayed(db) == 2,
        lambda: scalar(db, "SELECT attempts FROM rule_nats_outbox WHERE status = 'failed'") != 1,
        "the failed row retried",
    )


def test_table_trigger_end_to_end(
    db: psycopg.Connection, nats_server: NatsServer, sidecar_factory: Callable[..., Sidecar]
) -> None:
    sidecar_factory()
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric, note text)")
    db.execute(
        "CREATE TRIGGER orders_to_nats AFTER INSERT OR UPDATE OR DELETE ON orders "
        "FOR EACH ROW EXECUTE FUNCTION rule_nats_table_trigger('ob.orders')"
    )
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('orders-hook', 'https://h.invalid/o', 'ob.hooked')"
    )
    db.execute(
        "CREATE TRIGGER orders_to_hook AFTER INSERT ON orders "
        "FOR EACH ROW EXECUTE FUNCTION rule_nats_table_trigger(NULL, 'orders-hook')"
    )
    db.execute("INSERT INTO orders VALUES (1, 9.99, 'it''s')")
    db.execute("UPDATE orders SET total = 10.5 WHERE id = 1")
    db.execute("DELETE FROM orders WHERE id = 1")
    with pytest.raises(psycopg.Error), db.transaction():
        db.execute("INSERT INTO orders VALUES (2, 1, 'rolled back')")
        db.execute("SELECT 1/0")
    assert wait_until(lambda: relayed(db) == 4 and counts(db) == {}), counts(db)
    events = [json.loads(m[0]) for m in stream_messages(nats_server.url, "OUTBOX")]
    plain = [e for e in events if "operation" in e]
    assert [e["operation"] for e in plain] == ["INSERT", "UPDATE", "DELETE"]
    assert plain[0]["new"] == {"id": 1, "total": 9.99, "note": "it's"} and plain[0]["old"] is None
    assert plain[1]["old"]["total"] == 9.99 and plain[1]["new"]["total"] == 10.5
    assert plain[2]["new"] is None and plain[2]["table"] == "orders"
    hooked = [e for e in events if "webhook_url" in e]
    assert len(hooked) == 1
    assert hooked[0]["webhook_url"] == "https://h.invalid/o" and hooked[0]["data"]["operation"] == "INSERT"
    assert hooked[0]["event_id"].startswith("outbox-")
