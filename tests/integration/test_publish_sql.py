"""rule_nats_publish and friends against a real nats-server, from a real PostgreSQL."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.support.publish import add_stream, read_stream
from tests.support.registry import allow_any_subject, register_stream
from tests.support.stack import NatsServer


@pytest.fixture
def db(nats_db: psycopg.Connection, nats_server: NatsServer) -> psycopg.Connection:
    add_stream(nats_server.url, "PUBTEST", ["pub.>"])
    register_stream(nats_db, "PUBTEST", ["pub.>"])
    return nats_db


def history(conn: psycopg.Connection) -> list[tuple[object, ...]]:
    return conn.execute(
        "SELECT subject, success, stream_name, sequence_number, duplicate, error_message, message_id "
        "FROM rule_nats_publish_history ORDER BY publish_id"
    ).fetchall()


def test_publish_returns_ack_and_message_is_in_stream(
    db: psycopg.Connection, nats_server: NatsServer
) -> None:
    payload = {"text": 'it\'s "quoted" — ünïcødé ✓', "n": 12345678901234567890, "nested": {"a": [1, 2]}}
    row = db.execute(
        "SELECT rule_nats_publish('pub.orders', %s::jsonb, '{\"X-Trace\": \"t1\"}'::jsonb)",
        (json.dumps(payload),),
    ).fetchone()
    assert row is not None
    ack = row[0]
    assert ack["stream"] == "PUBTEST" and ack["duplicate"] is False and ack["latency_ms"] >= 0
    data, headers = read_stream(nats_server.url, "PUBTEST", ack["seq"])
    assert json.loads(data) == payload
    assert headers.get("X-Trace") == "t1"
    assert history(db) == [("pub.orders", True, "PUBTEST", ack["seq"], False, None, None)]


def test_duplicate_msg_id_is_reported_and_not_stored_twice(
    db: psycopg.Connection, nats_server: NatsServer
) -> None:
    first = db.execute("SELECT rule_nats_publish('pub.x', '{\"a\":1}', NULL, 'evt-1')").fetchone()
    second = db.execute("SELECT rule_nats_publish('pub.x', '{\"a\":1}', NULL, 'evt-1')").fetchone()
    assert first and second
    assert first[0]["duplicate"] is False and second[0]["duplicate"] is True
    assert first[0]["seq"] == second[0]["seq"]
    _, headers = read_stream(nats_server.url, "PUBTEST", first[0]["seq"])
    assert headers.get("Nats-Msg-Id") == "evt-1"
    assert [h[4] for h in history(db)] == [False, True]


def test_unregistered_subject_is_refused_before_nats(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as info:
        db.execute("SELECT rule_nats_publish('nostream.here', '{}')")
    assert "not captured by a registered stream" in str(info.value)
    assert info.value.sqlstate == "22023"
    assert info.value.diag.message_hint and "rule_nats_streams" in info.value.diag.message_hint
    assert [(h[0], h[1]) for h in history(db)] == [("nostream.here", False)]


def test_missing_stream_is_a_clear_error_with_history_row(db: psycopg.Connection) -> None:
    allow_any_subject(db)
    with pytest.raises(psycopg.Error) as info:
        db.execute("SELECT rule_nats_publish('nostream.here', '{}')")
    assert "no JetStream stream captures subject" in str(info.value)
    assert info.value.diag.message_hint and "rule_nats_streams" in info.value.diag.message_hint
    # The failure row was written in its own transaction: it survives the error.
    assert [(h[0], h[1]) for h in history(db)] == [("nostream.here", False)]
    assert "no JetStream stream" in str(history(db)[0][5])


def test_failure_row_survives_callers_rollback(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error), db.transaction():
        db.execute("SELECT rule_nats_publish('nostream.rollback', '{}')")
    assert [(h[0], h[1]) for h in history(db)] == [("nostream.rollback", False)]


@pytest.mark.parametrize("subject", ["pub.*", "pub..x", "pub x", "", "pub.>"])
def test_invalid_subject(db: psycopg.Connection, subject: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        db.execute("SELECT rule_nats_publish(%s, '{}')", (subject,))
    assert "invalid subject" in str(info.value)
    assert info.value.sqlstate == "22023"


def test_try_publish_returns_error_instead_of_raising(db: psycopg.Connection) -> None:
    row = db.execute("SELECT rule_nats_try_publish('nostream.try', '{}')").fetchone()
    assert row and row[0]["ok"] is False and row[0]["reason"] == "unregistered_subject"
    allow_any_subject(db)
    row = db.execute("SELECT rule_nats_try_publish('nostream.try', '{}')").fetchone()
    assert row and row[0]["ok"] is False and row[0]["reason"] == "no_stream"
    ok = db.execute("SELECT rule_nats_try_publish('pub.try', '{}')").fetchone()
    assert ok and ok[0]["ok"] is True and ok[0]["seq"] >= 1


def test_payload_over_max_payload(db: psycopg.Connection) -> None:
    big = json.dumps({"blob": "x" * (1024 * 1024 + 10)})
    with pytest.raises(psycopg.Error) as info:
        db.execute("SELECT rule_nats_publish('pub.big', %s::jsonb)", (big,))
    assert "max_payload" in str(info.value)
    assert info.value.diag.message_hint and "smaller payload" in info.value.diag.message_hint


def test_unknown_config_name(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as info:
        db.execute("SELECT rule_nats_publish('pub.x', '{}', NULL, NULL, 'nope')")
    assert "no NATS configuration named 'nope'" in str(info.value)


def test_health_check(db: psycopg.Connection, nats_server: NatsServer) -> None:
    row = db.execute("SELECT rule_nats_health_check()").fetchone()
    assert row is not None
    health = row[0]
    assert health["ok"] is True, health
    assert health["jetstream"] is True and health["rtt_ms"] >= 0
    assert health["jetstream_account"]["streams"] >= 1
    db.execute("UPDATE rule_nats_config SET nats_url = 'nats://127.0.0.1:1' WHERE config_name = 'default'")
    bad = db.execute("SELECT rule_nats_health_check()").fetchone()
    assert bad and bad[0]["ok"] is False and bad[0]["reason"] == "nats_unreachable"


def test_nats_restart_reconnects_transparently(database_url: str, own_nats_server: NatsServer) -> None:
    add_stream(own_nats_server.url, "RESTART", ["rs.>"])
    with psycopg.connect(database_url, autocommit=True) as db:
        register_stream(db, "RESTART", ["rs.>"])
        db.execute(
            "UPDATE rule_nats_config SET nats_url = %s, connect_timeout_seconds = 1, "
            "request_timeout_seconds = 2 WHERE config_name = 'default'",
            (own_nats_server.url,),
        )
        assert db.execute("SELECT rule_nats_publish('rs.a', '{}')").fetchone()
        own_nats_server.kill()
        with pytest.raises(psycopg.Error) as info:
            db.execute("SELECT rule_nats_publish('rs.b', '{}')")
        assert "cannot connect to NATS" in str(info.value) or "lost the connection" in str(info.value)
        own_nats_server.start()
        row = db.execute("SELECT rule_nats_publish('rs.c', '{}')").fetchone()
        assert row and row[0]["stream"] == "RESTART"
        assert [h[1] for h in history(db)] == [True, False, True]


def test_webhook_publish_builds_envelope_without_secrets(
    db: psycopg.Connection, nats_server: NatsServer
) -> None:
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) "
        "VALUES ('orders', 'https://hooks.example.invalid/o', 'pub.orders', '{\"Authorization\": \"Bearer s3cret\"}')"
    )
    row = db.execute(
        "SELECT rule_webhook_publish_nats(1, '{\"order\": 7, \"big\": 123456789012345678901234567890}', 'evt-7')"
    ).fetchone()
    assert row is not None
    ack = row[0]
    assert ack["mode"] == "immediate" and ack["event_id"] == "evt-7"
    data, headers = read_stream(nats_server.url, "PUBTEST", ack["seq"])
    assert b"s3cret" not in data
    env = json.loads(data)
    assert env["webhook_url"] == "https://hooks.example.invalid/o"
    assert env["data"] == {"order": 7, "big": 123456789012345678901234567890}
    assert env["headers"] == {} and env["webhook_id"] == 1 and env["event_id"] == "evt-7"
    assert isinstance(env["timestamp"], int)
    assert headers["Nats-Msg-Id"] == "evt-7"


def test_webhook_publish_unknown_or_disabled(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error, match="no webhook with webhook_id 42"):
        db.execute("SELECT rule_webhook_publish_nats(42, '{}')")
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, enabled) VALUES ('off', 'http://x/', 'pub.off', false)"
    )
    with pytest.raises(psycopg.Error, match="disabled"):
        db.execute("SELECT rule_webhook_publish_nats(1, '{}')")


def test_history_masks_authorization_headers(db: psycopg.Connection) -> None:
    db.execute(
        'SELECT rule_nats_publish(\'pub.h\', \'{}\', \'{"Authorization": "Bearer s3cret", "X-Ok": "v"}\')'
    )
    row = db.execute("SELECT headers FROM rule_nats_publish_history").fetchone()
    assert row == ({"Authorization": "***", "X-Ok": "v"},)


def test_publish_needs_the_publisher_role(db: psycopg.Connection) -> None:
    db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'plain_app') "
        "THEN CREATE ROLE plain_app NOLOGIN; END IF; END $$"
    )
    db.execute("SET ROLE plain_app")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute("SELECT rule_nats_publish('pub.x', '{}')")
    db.execute("RESET ROLE")
    db.execute("SET ROLE rule_nats_publisher")
    try:
        assert db.execute("SELECT rule_nats_publish('pub.x', '{}')").fetchone()
    finally:
        db.execute("RESET ROLE")


def test_history_is_written_at_commit_and_survives_rollback(
    db: psycopg.Connection, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as observer:
        with db.transaction():
            for i in range(3):
                db.execute("SELECT rule_nats_publish('pub.tx', %s::jsonb)", (json.dumps({"i": i}),))
            # Written in one statement when the transaction commits, not row by row.
            assert observer.execute("SELECT count(*) FROM rule_nats_publish_history").fetchone() == (0,)
        rows = observer.execute(
            "SELECT payload->>'i', published_at FROM rule_nats_publish_history ORDER BY publish_id"
        ).fetchall()
        assert [r[0] for r in rows] == ["0", "1", "2"]
        assert rows[0][1] <= rows[1][1] <= rows[2][1]  # publish times, not the commit time

        # The caller rolls back after a successful publish: the message is in the stream, so
        # its history row is written with the session's next publish.
        with pytest.raises(psycopg.errors.DivisionByZero), db.transaction():
            db.execute("SELECT rule_nats_publish('pub.tx', '{\"i\": \"rolled\"}')")
            db.execute("SELECT 1/0")
        assert observer.execute("SELECT count(*) FROM rule_nats_publish_history").fetchone() == (3,)
        db.execute("SELECT rule_nats_publish('pub.tx', '{\"i\": \"next\"}')")
        got = observer.execute(
            "SELECT payload->>'i' FROM rule_nats_publish_history ORDER BY publish_id"
        ).fetchall()
        assert [g[0] for g in got] == ["0", "1", "2", "rolled", "next"]
        assert observer.execute("SELECT count(*) FROM rule_nats_private.history_flush").fetchone() == (0,)


def test_webhook_publish_failure_is_recorded_with_the_webhook(db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('lost', 'https://h.invalid/', 'nowhere.x')"
    )
    allow_any_subject(db)
    with pytest.raises(psycopg.Error) as info:
        db.execute("SELECT rule_webhook_publish_nats(1, '{\"a\": 1}', 'evt-lost')")
    assert "rule_webhook_publish_nats: no JetStream stream captures subject" in str(info.value)
    assert info.value.sqlstate == "42704" and info.value.diag.message_hint  # undefined object: no stream
    row = db.execute(
        "SELECT webhook_id, subject, success, message_id, payload->'data' FROM rule_nats_publish_history"
    ).fetchone()
    assert row == (1, "nowhere.x", False, "evt-lost", {"a": 1})
