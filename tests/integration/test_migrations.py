"""Migrations against a real PostgreSQL: apply, re-apply, race, edit detection, schema contents."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from sidecar import migrate
from sidecar.errors import MigrationError

REPO_SQL = Path(__file__).resolve().parents[2] / "sql"

EXPECTED_COLUMNS = {
    "rule_nats_config": {
        "config_id",
        "config_name",
        "nats_url",
        "nats_cluster_urls",
        "auth_type",
        "nats_user",
        "nats_password",
        "auth_token",
        "auth_credentials_file",
        "auth_nkey_seed",
        "tls_enabled",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "connect_timeout_seconds",
        "reconnect_wait_seconds",
        "max_reconnect_attempts",
    },
    "rule_nats_streams": {
        "stream_name",
        "config_name",
        "subjects",
        "storage_type",
        "retention_policy",
        "max_messages",
        "max_bytes",
        "max_age_seconds",
        "discard_policy",
        "replicas",
        "duplicate_window_seconds",
        "enabled",
    },
    "rule_nats_consumers": {
        "stream_name",
        "consumer_name",
        "filter_subject",
        "queue_group",
        "batch_size",
        "max_deliver",
        "ack_wait_seconds",
        "retry_max_attempts",
        "retry_max_age_seconds",
        "enabled",
    },
    "rule_webhooks": {
        "webhook_id",
        "webhook_name",
        "url",
        "method",
        "headers",
        "timeout_seconds",
        "retry_max_attempts",
        "nats_subject",
        "enabled",
        "publish_mode",
    },
    "rule_webhook_secrets": {"webhook_id", "secret", "expires_at"},
    "rule_nats_publish_history": {
        "subject",
        "payload",
        "headers",
        "message_id",
        "sequence_number",
        "stream_name",
        "duplicate",
        "success",
        "error_message",
        "latency_ms",
        "published_at",
    },
    "rule_nats_delivery_attempts": {
        "message_id",
        "stream_seq",
        "webhook_id",
        "url",
        "attempt",
        "http_status",
        "latency_ms",
        "error",
        "worker_name",
        "outcome",
    },
    "rule_nats_dead_letters": {
        "message_raw",
        "reason",
        "attempts",
        "first_attempt_at",
        "last_attempt_at",
        "replayed",
    },
    "rule_nats_consumer_stats": {
        "stream_name",
        "consumer_name",
        "worker_name",
        "messages_delivered",
        "messages_acknowledged",
        "messages_pending",
        "messages_redelivered",
        "avg_processing_time_ms",
        "last_active_at",
        "active",
    },
    "rule_nats_workers": {"worker_name", "hostname", "pid", "version", "started_at", "last_heartbeat"},
    "nats_performance_stats": {
        "subject",
        "consumer_name",
        "message_count",
        "avg_latency_ms",
        "min_latency_ms",
        "max_latency_ms",
        "p50_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
    },
    "nats_recent_failures": {"subject", "error_message", "failed_at", "http_status", "attempt"},
    "nats_publish_summary": {"subject", "total_published", "successful", "failed", "avg_latency_ms"},
}


def columns(conn: psycopg.Connection, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s",
        (table,),
    ).fetchall()
    return {r[0] for r in rows}


def test_apply_then_reapply_is_noop(empty_database_url: str) -> None:
    available = migrate.load_dir(migrate.sql_dir())
    done = migrate.migrate(empty_database_url)
    assert [m.version for m in done] == [m.version for m in available]
    assert migrate.migrate(empty_database_url) == []
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute("SELECT version, checksum FROM rule_nats_schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [m.version for m in available]
    assert all(r[1] == m.checksum for r, m in zip(rows, available, strict=True))


def test_schema_objects_and_columns(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for table, expected in EXPECTED_COLUMNS.items():
            missing = expected - columns(conn, table)
            assert not missing, f"{table} lacks {missing}"
        default = conn.execute(
            "SELECT nats_url FROM rule_nats_config WHERE config_name = 'default'"
        ).fetchone()
        assert default == ("nats://localhost:4222",)
        fn = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname = 'rule_nats_consumer_update_stats'"
        ).fetchone()
        assert fn == (2,)


def test_every_object_has_a_comment(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        uncommented = conn.execute(
            """
            SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v')
               AND (c.relname LIKE 'rule\\_%' OR c.relname LIKE 'nats\\_%')
               AND obj_description(c.oid, 'pg_class') IS NULL
            UNION ALL
            SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'public' AND p.proname LIKE 'rule\\_%'
               AND obj_description(p.oid, 'pg_proc') IS NULL
            """
        ).fetchall()
    assert uncommented == []


def test_psql_style_application_is_recognised(empty_database_url: str) -> None:
    """A file applied by hand (no checksum recorded) counts as applied and gets its checksum filled in."""
    first = migrate.load_dir(migrate.sql_dir())[0]
    with psycopg.connect(empty_database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(first.sql.encode())
    migrate.migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        row = conn.execute("SELECT checksum FROM rule_nats_schema_migrations WHERE version = 1").fetchone()
    assert row == (first.checksum,)


def test_edited_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    for m in migrate.load_dir(migrate.sql_dir()):
        (tmp_path / m.filename).write_text(m.sql)
    migrate.migrate(empty_database_url, tmp_path)
    first = sorted(tmp_path.glob("0001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an edit after release\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate.migrate(empty_database_url, tmp_path)


def test_failing_migration_rolls_back(empty_database_url: str, tmp_path: Path) -> None:
    migrations = migrate.load_dir(migrate.sql_dir())
    for m in migrations:
        (tmp_path / m.filename).write_text(m.sql)
    bad = len(migrations) + 1
    (tmp_path / f"{bad:04d}_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();\n"
    )
    with pytest.raises(MigrationError, match="no_such_function"):
        migrate.migrate(empty_database_url, tmp_path)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        assert conn.execute("SELECT max(version) FROM rule_nats_schema_migrations").fetchone() == (
            len(migrations),
        )


def test_concurrent_migrate_does_not_race(empty_database_url: str) -> None:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(len(migrate.migrate(empty_database_url)))
        except Exception as exc:  # the assertion below shows it
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = len(migrate.load_dir(migrate.sql_dir()))
    assert sorted(results, key=str) == sorted([0, 0, total], key=str)


def test_database_newer_than_code_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO rule_nats_schema_migrations (version, name) VALUES (9999, 'future')")
    with pytest.raises(MigrationError, match="does not know"):
        migrate.migrate(database_url)


def test_upgrade_from_0003_keeps_data_and_backfills_the_rollup(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A database at 0003 (the release before safety and operations) with history upgrades cleanly."""
    old = tmp_path / "old"
    old.mkdir()
    for f in sorted(REPO_SQL.glob("000[123]_*.sql")):
        (old / f.name).write_text(f.read_text())
    migrate.migrate(empty_database_url, old)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rule_nats_delivery_attempts (attempted_at, stream_name, consumer_name, subject, attempt, "
            "outcome, latency_ms) SELECT now() - interval '10 minutes', 'S', 'c', 's.a', 1, "
            "CASE WHEN i % 4 = 0 THEN 'retry' ELSE 'delivered' END, i FROM generate_series(1, 40) i"
        )
        conn.execute(
            "INSERT INTO rule_nats_workers (worker_name, hostname, pid, version) VALUES ('old-worker', 'h', 1, '0.1')"
        )
    done = migrate.migrate(empty_database_url)
    assert [m.version for m in done] == [4, 5, 6, 7]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT message_count, success_count, min_latency_ms, max_latency_ms FROM nats_performance_stats"
        ).fetchone()
        assert row is not None and (row[0], row[1], float(row[2]), float(row[3])) == (40, 30, 1.0, 40.0)
        assert conn.execute("SELECT status FROM nats_worker_status").fetchone() in (("IDLE",), ("STALE",))
