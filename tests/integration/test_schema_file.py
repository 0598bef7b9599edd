"""sql/schema.sql is what a fresh migration gives, and the previous release upgrades to the same
schema with its data (procrastinate's sql/schema.sql and tests/migration/, docs/schema.md)."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import psycopg

from sidecar import migrate, schema_dump

REPO_SQL = Path(__file__).resolve().parents[2] / "sql"
# The newest migration of the previous release: its databases are upgraded by this one.
PREVIOUS_RELEASE = 18


def differences(expected: str, got: str, expected_name: str, got_name: str) -> str:
    diff = list(
        difflib.unified_diff(expected.splitlines(True), got.splitlines(True), expected_name, got_name)
    )
    shown = "".join(diff[:200]) + (f"\n... {len(diff) - 200} more lines\n" if len(diff) > 200 else "")
    return shown


def test_schema_file_is_what_a_fresh_migration_gives(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    fresh = schema_dump.dump(empty_database_url)
    committed = (REPO_SQL / "schema.sql").read_text(encoding="utf-8")
    assert fresh == committed, (
        "sql/schema.sql differs from a fresh migration; regenerate it with scripts/schema-dump and commit it:\n"
        + differences(committed, fresh, "sql/schema.sql", "fresh migration")
    )


def test_schema_file_does_not_depend_on_the_day(empty_database_url: str) -> None:
    # The daily partitions are data of the day the database was migrated on (and tomorrow's exists
    # only after 12:00 UTC): the file must be the same whichever days have partitions.
    migrate.migrate(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        made = conn.execute("SELECT rule_nats_history_partitions('2 days', current_date - 3)").fetchone()
    assert made is not None and made[0] >= 6
    fresh = schema_dump.dump(empty_database_url)
    committed = (REPO_SQL / "schema.sql").read_text(encoding="utf-8")
    assert fresh == committed, differences(committed, fresh, "sql/schema.sql", "with other days' partitions")
    assert "rule_nats_attempt_log_default" in fresh


def previous_release(folder: Path) -> Path:
    """The previous release's sql/: its numbered migrations, no definition files (`*_definitions.sql` brought them)."""
    folder.mkdir()
    for f in REPO_SQL.glob("[0-9][0-9][0-9][0-9]_*.sql"):
        if int(f.name[:4]) <= PREVIOUS_RELEASE:
            shutil.copy(f, folder / f.name)
    return folder


def fill(url: str) -> None:
    """Data of a working installation: a webhook with a secret, a stream and its consumer, an
    attempt, a dead letter, an event in the outbox."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('WEBHOOKS', '{webhooks.>}')"
        )
        conn.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('WEBHOOKS', 'c1')")
        conn.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) "
            "VALUES ('orders', 'https://example.com/hook', 'webhooks.orders')"
        )
        conn.execute("SELECT rule_webhook_secret_create(1)")
        conn.execute(
            "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, subject, webhook_id, url, attempt, "
            "outcome, http_status, latency_ms) VALUES ('WEBHOOKS', 'c1', 'webhooks.orders', 1, "
            "'https://example.com/hook', 1, 'delivered', 200, 12.5)"
        )
        conn.execute(
            "INSERT INTO rule_nats_dead_letters (stream_name, consumer_name, subject, webhook_id, message_raw, reason, "
            "attempts, error) VALUES ('WEBHOOKS', 'c1', 'webhooks.orders', 1, '\\x7b7d', 'ssrf_blocked', 1, 'refused')"
        )
        conn.execute("SELECT rule_nats_publish_on_commit('webhooks.orders', '{\"id\": 7}'::jsonb)")


def test_the_previous_release_upgrades_to_the_fresh_schema_with_its_data(
    empty_database_url: str, database_url: str, tmp_path: Path
) -> None:
    migrate.migrate(empty_database_url, previous_release(tmp_path / "previous"))
    fill(empty_database_url)
    done = migrate.run(empty_database_url)
    assert [m.version for m in done.migrations] == list(
        range(PREVIOUS_RELEASE + 1, len(migrate.load_dir(REPO_SQL)) + 1)
    )
    assert len(done.definitions) == len(migrate.definitions.load_dir(REPO_SQL))

    upgraded, fresh = schema_dump.dump(empty_database_url), schema_dump.dump(database_url)
    assert upgraded == fresh, "the upgraded schema differs from a fresh one:\n" + differences(
        fresh, upgraded, "fresh", "upgraded"
    )
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM rule_webhook_secrets WHERE webhook_id = 1").fetchone() == (
            1,
        )
        assert conn.execute("SELECT subject, payload FROM rule_nats_outbox").fetchall() == [
            ("webhooks.orders", {"id": 7})
        ]
        health = conn.execute("SELECT webhook_name, status, last_error FROM nats_endpoint_health").fetchall()
        assert health == [("orders", "blocked", "refused")]
        stats = conn.execute("SELECT message_count, success_count FROM nats_performance_stats").fetchall()
        assert stats == [(1, 1)]
        consumer = conn.execute("SELECT stream_name, consumer_name FROM nats_consumer_status").fetchall()
        assert consumer == [("WEBHOOKS", "c1")]
        # Every view answers on the upgraded data.
        for (view,) in conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace"
        ).fetchall():
            conn.execute(f'SELECT * FROM "{view}"').fetchall()
    assert migrate.run(empty_database_url).lines() == ["schema is up to date"]
