"""Errors of the SQL functions read like PostgreSQL's own (issue 13, item 4).

No Python class names in the message, no Python traceback in CONTEXT, a SQLSTATE of
PostgreSQL's classes, and a HINT. Each case failed before 0007_native_errors.sql: the messages
started with "plpy.Error:" or were Python exceptions (AttributeError, TypeError).
"""

from __future__ import annotations

import psycopg
import pytest

from tests.support.publish import add_stream
from tests.support.registry import register_stream
from tests.support.stack import NatsServer


@pytest.fixture
def db(nats_db: psycopg.Connection, nats_server: NatsServer) -> psycopg.Connection:
    add_stream(nats_server.url, "ERRS", ["errs.>"])
    register_stream(nats_db, "ERRS", ["errs.>"])
    nats_db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'https://e.example/', 'errs.w')"
    )
    return nats_db


CASES = [
    # (call, SQLSTATE, words the message must hold)
    ("SELECT rule_nats_publish('errs.a', NULL)", "22004", "payload must not be NULL"),
    ("SELECT rule_nats_publish(NULL, '{}')", "22004", "subject must not be NULL"),
    (
        "SELECT rule_nats_publish('errs.a', '{}', config_name => NULL)",
        "22004",
        "config_name must not be NULL",
    ),
    ("SELECT rule_nats_publish('errs.a', '{}', '[\"a\"]')", "22023", "headers must be a JSON object"),
    ("SELECT rule_nats_publish('errs..a', '{}')", "22023", "invalid subject"),
    ("SELECT rule_nats_publish('errs.a', '{}', msg_id => E'a\\nb')", "22023", "invalid message id"),
    (
        "SELECT rule_nats_publish('errs.a', '{}', config_name => 'nope')",
        "42704",
        "no NATS configuration named",
    ),
    ("SELECT rule_nats_publish('nostream.x', '{}')", "22023", "not captured by a registered stream"),
    ("SELECT rule_nats_try_publish('errs.a', NULL)", "22004", "payload must not be NULL"),
    ("SELECT rule_nats_try_publish('$JS.API.INFO', '{}')", "22023", "reserved"),
    ("SELECT rule_webhook_publish_nats(1, NULL)", "22004", "payload must not be NULL"),
    ("SELECT rule_webhook_publish_nats(NULL, '{}')", "22004", "webhook_id must not be NULL"),
    ("SELECT rule_webhook_publish_nats(42, '{}')", "42704", "no webhook with webhook_id 42"),
    ("SELECT rule_nats_publish_on_commit('errs.a', NULL)", "22004", "payload must not be NULL"),
    ("SELECT rule_nats_publish_on_commit(NULL, '{}')", "22004", "subject must not be NULL"),
    (
        "SELECT rule_nats_publish_on_commit('errs.a', '{}', config_name => 'nope')",
        "42704",
        "no NATS configuration",
    ),
]


@pytest.mark.parametrize(("call", "sqlstate", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_calls_raise_native_errors(db: psycopg.Connection, call: str, sqlstate: str, words: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        db.execute(call)
    diag = info.value.diag
    assert info.value.sqlstate == sqlstate, str(info.value)
    assert words in (diag.message_primary or "")
    for text in (diag.message_primary or "", diag.context or ""):
        assert "plpy" not in text and "Traceback" not in text and "Error:" not in text, text
    assert diag.message_hint, "every error says what to do"


def test_a_disabled_webhook_is_object_not_in_prerequisite_state(db: psycopg.Connection) -> None:
    db.execute("UPDATE rule_webhooks SET enabled = false")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
        db.execute("SELECT rule_webhook_publish_nats(1, '{}')")
    assert "plpy" not in str(info.value) and info.value.diag.message_hint


def test_nats_down_is_a_connection_class_error(database_url: str, own_nats_server: NatsServer) -> None:
    add_stream(own_nats_server.url, "DOWN", ["down.>"])
    with psycopg.connect(database_url, autocommit=True) as db:
        register_stream(db, "DOWN", ["down.>"])
        db.execute(
            "UPDATE rule_nats_config SET nats_url = %s, connect_timeout_seconds = 1", (own_nats_server.url,)
        )
        own_nats_server.kill()
        with pytest.raises(psycopg.Error) as info:
            db.execute("SELECT rule_nats_publish('down.a', '{}')")
        assert info.value.sqlstate is not None and info.value.sqlstate.startswith("08"), str(info.value)
        assert "127.0.0.1" in str(info.value)  # the server address, to know which one
        assert "plpy" not in str(info.value) and info.value.diag.message_hint
        # The health check reports instead of raising, and so does try_publish.
        health = db.execute("SELECT rule_nats_health_check()").fetchone()
        assert health is not None and health[0]["ok"] is False
        tried = db.execute("SELECT rule_nats_try_publish('down.a', '{}')").fetchone()
        assert tried is not None and tried[0]["ok"] is False and tried[0]["reason"] == "nats_unreachable"
        assert db.execute("SELECT rule_nats_health_check(NULL)").fetchone()[0]["ok"] is False  # type: ignore[index]
