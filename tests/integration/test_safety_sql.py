"""Signing-secret functions, endpoint enable/disable and the delivery settings, in SQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import psycopg
import pytest


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'https://e.example/', 'w.a')"
        )
        yield c


def active(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT secret FROM rule_webhook_secrets WHERE expires_at IS NULL OR expires_at > now() ORDER BY secret_id"
    ).fetchall()
    return [r[0] for r in rows]


def test_create_generates_a_strong_secret(conn: psycopg.Connection) -> None:
    s1 = conn.execute("SELECT rule_webhook_secret_create(1)").fetchone()[0]  # type: ignore[index]
    s2 = conn.execute("SELECT rule_webhook_secret_create(1)").fetchone()[0]  # type: ignore[index]
    assert s1 != s2
    assert len(base64.b64decode(s1[6:])) == 32
    given = "whsec_" + base64.b64encode(b"k" * 24).decode()
    assert conn.execute("SELECT rule_webhook_secret_create(1, %s)", (given,)).fetchone() == (given,)
    with pytest.raises(psycopg.errors.CheckViolation, match="whsec_"):
        conn.execute("SELECT rule_webhook_secret_create(1, 'whsec_short')")
    with pytest.raises(psycopg.errors.NoDataFound) as info:
        conn.execute("SELECT rule_webhook_secret_create(99)")
    assert info.value.diag.message_hint is not None


def test_rotate_keeps_the_old_secret_for_the_overlap_then_revoke(conn: psycopg.Connection) -> None:
    old = conn.execute("SELECT rule_webhook_secret_create(1)").fetchone()[0]  # type: ignore[index]
    new = conn.execute("SELECT rule_webhook_secret_rotate(1, interval '2 hours')").fetchone()[0]  # type: ignore[index]
    assert active(conn) == [old, new]
    left = conn.execute(
        "SELECT expires_at - now() FROM rule_webhook_secrets WHERE secret = %s", (old,)
    ).fetchone()[0]  # type: ignore[index]
    assert 7100 < left.total_seconds() <= 7200
    assert conn.execute(
        "SELECT expires_at FROM rule_webhook_secrets WHERE secret = %s", (new,)
    ).fetchone() == (None,)
    # zero overlap: the old secret stops at once
    newer = conn.execute("SELECT rule_webhook_secret_rotate(1, interval '0')").fetchone()[0]  # type: ignore[index]
    assert active(conn) == [newer]
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT rule_webhook_secret_rotate(1, interval '-1 hour')")
    assert conn.execute("SELECT rule_webhook_secret_revoke(1)").fetchone() == (1,)
    assert active(conn) == []
    assert conn.execute("SELECT rule_webhook_secret_revoke(1)").fetchone() == (0,)


def test_no_view_shows_a_secret(conn: psycopg.Connection) -> None:
    conn.execute("SELECT rule_webhook_secret_create(1)")
    cols = conn.execute(
        """
        SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'v' AND a.attnum > 0
           AND a.attname IN ('secret', 'headers', 'nats_password', 'auth_token', 'auth_nkey_seed', 'message_raw')
        """
    ).fetchall()
    assert cols == []


def test_disable_and_enable_release_held_deliveries(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO rule_nats_retries (message_id, stream_name, consumer_name, subject, message_raw, attempts, "
        "first_attempt_at, next_attempt_at, webhook_id) "
        "VALUES ('m', 's', 'c', 'w.a', '\\x7b7d', 1, now(), now() + interval '1 hour', 1)"
    )
    conn.execute(
        "INSERT INTO rule_nats_endpoint_state (webhook_id, circuit, consecutive_failures) VALUES (1, 'open', 9)"
    )
    conn.execute("LISTEN rule_nats_endpoint_health")
    assert conn.execute("SELECT rule_nats_endpoint_disable(1, 'HTTP 410 Gone')").fetchone() == (True,)
    assert conn.execute("SELECT rule_nats_endpoint_disable(1, 'again')").fetchone() == (False,)
    assert conn.execute(
        "SELECT enabled, disabled_reason, disabled_at IS NOT NULL FROM rule_webhooks"
    ).fetchone() == (False, "HTTP 410 Gone", True)
    assert conn.execute("SELECT status FROM nats_endpoint_health").fetchone() == ("disabled",)
    assert conn.execute("SELECT rule_nats_endpoint_enable(1)").fetchone() == (True,)
    assert conn.execute("SELECT rule_nats_endpoint_enable(1)").fetchone() == (False,)
    assert conn.execute("SELECT enabled, disabled_reason, disabled_at FROM rule_webhooks").fetchone() == (
        True,
        None,
        None,
    )
    assert conn.execute("SELECT next_attempt_at <= now() FROM rule_nats_retries").fetchone() == (True,)
    assert conn.execute("SELECT circuit, consecutive_failures FROM rule_nats_endpoint_state").fetchone() == (
        "closed",
        0,
    )
    events = [json.loads(n.payload)["event"] for n in conn.notifies(timeout=1, stop_after=3)]
    assert events == ["disabled", "circuit_closed", "enabled"]


def test_delivery_settings_and_limits_are_validated(conn: psycopg.Connection) -> None:
    assert conn.execute(
        "SELECT allow_networks, https_only, max_payload_bytes FROM rule_nats_delivery_settings"
    ).fetchall() == [([], False, 1048576)]
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO rule_nats_delivery_settings DEFAULT VALUES")
    with pytest.raises(psycopg.errors.CheckViolation, match="one row"):
        conn.execute("INSERT INTO rule_nats_delivery_settings (settings_id) VALUES (false)")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        conn.execute("UPDATE rule_nats_delivery_settings SET allow_networks = '{localhost}'")
    for bad, rule in [
        ("max_concurrency = 0", "max_concurrency"),
        ("rate_limit_per_second = 0", "rate_limit_per_second"),
        ("circuit_failure_threshold = 0", "circuit_failure_threshold"),
        ("circuit_open_seconds = 7200", "circuit_open_seconds"),
        ("disable_after_seconds = -1", "disable_after_seconds"),
    ]:
        with pytest.raises(psycopg.errors.CheckViolation, match=rule):
            conn.execute(f"UPDATE rule_webhooks SET {bad}")


def test_publishing_for_a_webhook_the_worker_disabled_is_held_not_refused(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE rule_webhooks SET publish_mode = 'outbox'")
    conn.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('W', '{w.>}')")
    conn.execute("SELECT rule_nats_endpoint_disable(1, 'HTTP 410 Gone')")
    out = conn.execute("SELECT rule_webhook_publish_nats(1, '{\"a\": 1}')").fetchone()
    assert out is not None and out[0]["mode"] == "outbox"
    conn.execute("UPDATE rule_webhooks SET enabled = true")
    conn.execute("UPDATE rule_webhooks SET enabled = false")  # a DBA's decision: refused
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
        conn.execute("SELECT rule_webhook_publish_nats(1, '{\"a\": 2}')")
    assert info.value.diag.message_hint is not None


def test_endpoint_health_counts_the_last_hour(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO rule_nats_delivery_attempts (attempted_at, stream_name, consumer_name, webhook_id, attempt, "
        "outcome) SELECT now() - make_interval(mins => i), 'S', 'c', 1, 1, "
        "CASE WHEN i % 4 = 0 THEN 'retry' ELSE 'delivered' END FROM generate_series(1, 80) i"
    )  # 59 in the last hour (1..59 minutes), 14 of them failed (4, 8, ..., 56)
    conn.execute(
        "INSERT INTO rule_nats_retries (message_id, stream_name, consumer_name, subject, message_raw, attempts, "
        "first_attempt_at, next_attempt_at, webhook_id) VALUES ('m', 's', 'c', 'w.a', '\\x7b7d', 1, now(), now(), 1)"
    )
    row = conn.execute(
        "SELECT status, attempts_1h, failures_1h, success_rate_1h, waiting FROM nats_endpoint_health"
    ).fetchone()
    assert row is not None and row[:3] == ("healthy", 59, 14)
    assert float(row[3]) == round(100 * 45 / 59, 2) and row[4] == 1
