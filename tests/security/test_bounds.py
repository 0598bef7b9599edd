"""Absurd settings are refused by the registry's CHECKs (issue 19, defect 5), and an upgrade with
rows already outside the new ranges clamps them instead of failing.

On main an ack wait of 1e-9 s sent every message 20 times, and retry_initial_seconds = 1e300 or
rate_limit_per_second = 1e-300 broke delivery (tests/e2e/test_bulkheads.py covers the sidecar's
side: it clamps what it reads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sidecar import migrate

REPO_SQL = Path(__file__).resolve().parents[2] / "sql"

ABSURD = [
    ("rule_nats_consumers", "ack_wait_seconds", "1e-9"),
    ("rule_nats_consumers", "ack_wait_seconds", "1e9"),
    ("rule_nats_consumers", "retry_initial_seconds", "1e-6"),
    ("rule_nats_consumers", "retry_max_backoff_seconds", "1e300"),
    ("rule_nats_consumers", "retry_max_age_seconds", "1e300"),
    ("rule_nats_consumers", "retry_max_attempts", "2000000000"),
    ("rule_nats_consumers", "max_deliver", "2000000000"),
    ("rule_webhooks", "retry_initial_seconds", "1e300"),
    ("rule_webhooks", "retry_initial_seconds", "0.001"),
    ("rule_webhooks", "retry_max_backoff_seconds", "1e300"),
    ("rule_webhooks", "retry_max_age_seconds", "1e300"),
    ("rule_webhooks", "retry_max_attempts", "2000000000"),
    ("rule_webhooks", "rate_limit_per_second", "1e-300"),
    ("rule_webhooks", "timeout_seconds", "1e-9"),
    ("rule_webhooks", "max_concurrency", "2000000000"),
    ("rule_webhooks", "circuit_failure_threshold", "2000000000"),
    ("rule_webhooks", "circuit_open_seconds", "1e-9"),
    ("rule_webhooks", "disable_after_seconds", "1e-9"),
    ("rule_webhooks", "disable_after_seconds", "1e300"),
    ("rule_nats_config", "reconnect_wait_seconds", "1e300"),
    ("rule_nats_config", "request_timeout_seconds", "1e-9"),
    ("rule_nats_streams", "duplicate_window_seconds", "1e300"),
    ("rule_nats_streams", "max_age_seconds", "1e300"),
]


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    c = psycopg.connect(database_url, autocommit=True)
    c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('B', '{b.>}')")
    c.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('B', 'c')")
    c.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'https://example.com/', 'b.w')"
    )
    yield c
    c.close()


@pytest.mark.parametrize(("table", "column", "value"), ABSURD)
def test_absurd_settings_are_refused_with_the_range(
    conn: psycopg.Connection, table: str, column: str, value: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=f"{column}: ") as info:
        conn.execute(f"UPDATE {table} SET {column} = {value}")  # test-owned names and literals
    assert " to " in str(info.value) or "at most" in str(info.value)  # the name says the range


def test_sane_settings_still_pass(conn: psycopg.Connection) -> None:
    conn.execute(
        "UPDATE rule_nats_consumers SET ack_wait_seconds = 1, retry_initial_seconds = 0.1, "
        "retry_max_backoff_seconds = 604800, retry_max_age_seconds = 2592000, retry_max_attempts = 1000"
    )
    conn.execute(
        "UPDATE rule_webhooks SET rate_limit_per_second = 0.001, timeout_seconds = 300, retry_initial_seconds = NULL, "
        "max_concurrency = NULL, disable_after_seconds = NULL, circuit_open_seconds = 0.1"
    )
    with pytest.raises(psycopg.errors.CheckViolation, match="retry_max_backoff_seconds must be >="):
        conn.execute(
            "UPDATE rule_nats_consumers SET retry_initial_seconds = 10, retry_max_backoff_seconds = 5"
        )


def test_upgrade_clamps_rows_outside_the_new_ranges(empty_database_url: str, tmp_path: Path) -> None:
    """Rows written before 0015 with absurd values: the migration clamps them to the nearest bound
    (NOTICE) and succeeds, rather than failing the upgrade or leaving them for the worker."""
    old = tmp_path / "old"
    old.mkdir()
    for f in sorted(REPO_SQL.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if f.name < "0015":
            (old / f.name).write_text(f.read_text())
    migrate.migrate(empty_database_url, old)
    with psycopg.connect(empty_database_url, autocommit=True) as c:
        c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('B', '{b.>}')")
        c.execute(
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, ack_wait_seconds, retry_initial_seconds, "
            "retry_max_backoff_seconds, retry_max_age_seconds) VALUES ('B', 'c', 1e-9, 1e300, 1e300, 1e300)"
        )
        c.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, retry_initial_seconds, rate_limit_per_second, "
            "disable_after_seconds) VALUES ('w', 'https://example.com/', 'b.w', 1e300, 1e-300, 1)"
        )
    done = migrate.migrate(empty_database_url)
    assert 15 in [m.version for m in done]
    with psycopg.connect(empty_database_url, autocommit=True) as c:
        consumer = c.execute(
            "SELECT ack_wait_seconds, retry_initial_seconds, retry_max_backoff_seconds, retry_max_age_seconds "
            "FROM rule_nats_consumers"
        ).fetchone()
        assert consumer is not None and [float(v) for v in consumer] == [1.0, 86400.0, 604800.0, 2592000.0]
        webhook = c.execute(
            "SELECT retry_initial_seconds, rate_limit_per_second, disable_after_seconds FROM rule_webhooks"
        ).fetchone()
        assert webhook is not None and [float(v) for v in webhook] == [86400.0, 0.001, 60.0]
