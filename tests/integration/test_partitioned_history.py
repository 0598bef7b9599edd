"""Partitioned history (sql/0019): retention drops whole days, a write never fails for want of a
partition, time conditions read only their days, the view keeps the columns of the table it
replaced, and history of before 0019 moves in without a long lock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar import migrate

REPO_SQL = Path(__file__).resolve().parents[2] / "sql"

ATTEMPT = (
    "INSERT INTO rule_nats_delivery_attempts (attempted_at, message_id, stream_name, consumer_name, stream_seq, "
    "subject, url, attempt, outcome, http_status, latency_ms, error, worker_name) "
    "VALUES (now() - %s::interval, %s, 'S', 'c1', 1, 's.a', 'https://o.example/', %s, %s, %s, %s, %s, 'w1')"
)
PUBLISH = "INSERT INTO rule_nats_publish_history (published_at, subject, success) VALUES (now() - %s::interval, 's.a', true)"


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def partitions(conn: psycopg.Connection[Any], table: str) -> list[str]:
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT relid::regclass::text FROM pg_partition_tree(%s::regclass) WHERE isleaf ORDER BY 1",
            (table,),
        ).fetchall()
    ]


def deleted_rows(conn: psycopg.Connection[Any]) -> int:
    """Rows ever deleted from the partitions of both history tables that still exist."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables "
        "WHERE relname LIKE 'rule_nats_attempt_log%' OR relname LIKE 'rule_nats_publish_history%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_purge_drops_the_old_days_without_a_delete(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "UPDATE rule_nats_retention SET attempts_days = 30, publish_history_days = 30, stats_days = 365"
    )
    conn.execute("SELECT rule_nats_history_partitions(interval '12 hours', current_date - 40)")
    for age in ("35 days", "33 days", "1 minute"):
        conn.execute(ATTEMPT, (age, f"m-{age}", 1, "delivered", 200, 1.5, None))
        conn.execute(PUBLISH, (age,))
    old_days = [
        str(r[0])
        for r in conn.execute(
            "SELECT DISTINCT tableoid::regclass::text FROM rule_nats_attempt_log WHERE attempted_at < now() - interval '30 days' "
            "UNION SELECT DISTINCT tableoid::regclass::text FROM rule_nats_publish_history "
            "WHERE published_at < now() - interval '30 days'"
        ).fetchall()
    ]
    assert len(old_days) == 4  # two days of each table hold rows
    # Any DELETE of their rows would fail: only DROP TABLE may take them.
    conn.execute(
        "CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN RAISE EXCEPTION 'row deleted from %', TG_TABLE_NAME; END$$"
    )
    for p in old_days:
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE DELETE ON {p} FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse()"
        )
    before = deleted_rows(conn)

    conn.execute("CALL rule_nats_purge()")

    for p in old_days:
        assert conn.execute("SELECT to_regclass(%s)", (p,)).fetchone() == (None,)
    assert conn.execute("SELECT message_id FROM rule_nats_delivery_attempts").fetchall() == [("m-1 minute",)]
    assert conn.execute("SELECT count(*) FROM rule_nats_publish_history").fetchone() == (1,)
    assert deleted_rows(conn) == before == 0
    result = conn.execute("SELECT last_result FROM rule_nats_retention").fetchone()
    assert result is not None and (result[0]["attempts"], result[0]["publish_history"]) == (2, 2)
    # The counters keep what the dropped rows counted.
    assert conn.execute(
        "SELECT sum(message_count) FROM rule_nats_stats_hourly WHERE source = 'delivery'"
    ).fetchone() == (3,)


def test_a_write_never_fails_for_want_of_a_partition(conn: psycopg.Connection[Any]) -> None:
    """A row for a day without a partition (a clock far ahead, a sidecar down for days) lands in
    the DEFAULT partition, and moves to its day's partition when that is made."""
    conn.execute(ATTEMPT, ("-100 days", "future", 1, "delivered", 200, 1.0, None))
    conn.execute(PUBLISH, ("-100 days",))
    where = conn.execute("SELECT tableoid::regclass::text FROM rule_nats_attempt_log").fetchone()
    assert where == ("rule_nats_private.rule_nats_attempt_log_default",)
    assert conn.execute("SELECT rule_nats_history_partitions(interval '101 days')").fetchone() != (0,)
    moved = conn.execute(
        "SELECT (SELECT tableoid::regclass::text FROM rule_nats_attempt_log), "
        "(SELECT tableoid::regclass::text FROM rule_nats_publish_history)"
    ).fetchone()
    assert moved is not None
    assert all(not t.endswith("_default") for t in moved), moved
    assert conn.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (1,)
    assert conn.execute("SELECT rule_nats_history_partitions(interval '101 days')").fetchone() == (0,)


def plan_relations(conn: psycopg.Connection[Any], sql: str) -> list[str]:
    row = conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()
    assert row is not None
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            found.append(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(row[0][0]["Plan"])
    return found


def test_a_condition_on_time_reads_only_its_days(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT rule_nats_history_partitions(interval '3 days', current_date - 5)")
    day = conn.execute("SELECT to_char(current_date - 2, 'YYYYMMDD'), (current_date - 2)::text").fetchone()
    assert day is not None
    window = f"'{day[1]} 00:00+00' AND attempted_at < '{day[1]} 23:00+00'"
    read = plan_relations(conn, f"SELECT * FROM rule_nats_delivery_attempts WHERE attempted_at >= {window}")
    assert [r for r in read if r.startswith("rule_nats_attempt_log")] == [f"rule_nats_attempt_log_{day[0]}"]
    read = plan_relations(
        conn,
        f"SELECT count(*) FROM rule_nats_publish_history WHERE published_at >= '{day[1]} 00:00+00' "
        f"AND published_at < '{day[1]} 23:00+00'",
    )
    assert read == [f"rule_nats_publish_history_{day[0]}"]
    # now()-relative conditions are pruned when the query runs: the old days are not scanned.
    row = conn.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM rule_nats_delivery_attempts "
        "WHERE attempted_at > now() - interval '1 hour'"
    ).fetchone()
    assert row is not None
    assert "Subplans Removed" in json.dumps(row[0])


def test_the_view_answers_was_it_delivered_from_the_index(conn: psycopg.Connection[Any]) -> None:
    conn.execute(ATTEMPT, ("2 minutes", "evt-1", 1, "retry", 503, 12.345, "HTTP 503"))
    conn.execute(ATTEMPT, ("1 minute", "evt-1", 2, "delivered", 200, 7.0, None))
    conn.execute(ATTEMPT, ("1 minute", "evt-2", 1, "dead_letter", 410, None, "HTTP 410"))
    rows = conn.execute(
        "SELECT message_id, stream_name, consumer_name, url, attempt, outcome, http_status, latency_ms, error, "
        "worker_name FROM rule_nats_delivery_attempts WHERE message_id = 'evt-1' ORDER BY attempt"
    ).fetchall()
    assert rows == [
        ("evt-1", "S", "c1", "https://o.example/", 1, "retry", 503, 12.345, "HTTP 503", "w1"),
        ("evt-1", "S", "c1", "https://o.example/", 2, "delivered", 200, 7.0, None, "w1"),
    ]
    read = json.dumps(
        conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT * FROM rule_nats_delivery_attempts WHERE message_id = 'evt-1'"
        ).fetchone()
    )
    assert "_message_id_idx" in read
    failures = conn.execute(
        "SELECT message_id, outcome, url FROM nats_recent_failures ORDER BY message_id"
    ).fetchall()
    assert failures == [
        ("evt-1", "retry", "https://o.example"),  # redacted as before: no path
        ("evt-2", "dead_letter", "https://o.example"),
    ]
    # Names are stored once: three attempts, one route.
    assert conn.execute("SELECT count(*) FROM rule_nats_history_routes").fetchone() == (1,)
    conn.execute("DELETE FROM rule_nats_delivery_attempts WHERE message_id = 'evt-2'")
    assert conn.execute("SELECT count(*) FROM rule_nats_attempt_log").fetchone() == (2,)


def test_the_outcome_constraint_still_refuses_another_outcome(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="outcome: delivered, retry or dead_letter"):
        conn.execute(ATTEMPT, ("1 minute", "bad", 1, "maybe", 200, 1.0, None))


def migrate_to(url: str, tmp_path: Path, last: int) -> None:
    old = tmp_path / f"upto{last}"
    old.mkdir()
    for f in sorted(REPO_SQL.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if int(f.name[:4]) <= last:
            (old / f.name).write_text(f.read_text())
    migrate.migrate(url, old)


def test_upgrade_copies_a_small_history_and_moves_a_big_one_in_batches(
    empty_database_url: str, tmp_path: Path
) -> None:
    migrate_to(empty_database_url, tmp_path, 18)
    with psycopg.connect(empty_database_url, autocommit=True) as c:
        c.execute(
            "INSERT INTO rule_nats_delivery_attempts (attempted_at, message_id, stream_name, consumer_name, subject, "
            "url, attempt, outcome, latency_ms, worker_name) SELECT now() - i * interval '1 hour', 'old-' || i, 'S', "
            "'c', 's.a', 'http://h/', 1, 'delivered', 2.5, 'w' FROM generate_series(1, 50) i"
        )
        c.execute(
            "INSERT INTO rule_nats_publish_history (published_at, subject, success) "
            "SELECT now() - i * interval '1 hour', 's.a', true FROM generate_series(1, 30) i"
        )
        stats = c.execute("SELECT sum(message_count) FROM rule_nats_stats_hourly").fetchone()
        ids = c.execute("SELECT min(attempt_id), max(attempt_id) FROM rule_nats_delivery_attempts").fetchone()
    migrate.migrate(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as c:
        # Small: copied by the migration, ids and counters as they were, the old table empty.
        assert (
            c.execute("SELECT min(attempt_id), max(attempt_id) FROM rule_nats_delivery_attempts").fetchone()
            == ids
        )
        assert c.execute("SELECT count(*) FROM rule_nats_attempt_log").fetchone() == (50,)
        assert c.execute("SELECT count(*) FROM rule_nats_publish_history").fetchone() == (30,)
        assert c.execute("SELECT sum(message_count) FROM rule_nats_stats_hourly").fetchone() == stats
        assert c.execute(
            "SELECT count(*) FROM rule_nats_private.rule_nats_delivery_attempts_legacy"
        ).fetchone() == (0,)
        assert c.execute(
            "SELECT latency_ms, url, worker_name FROM rule_nats_delivery_attempts LIMIT 1"
        ).fetchone() == (
            2.5,
            "http://h/",
            "w",
        )
        # Big (as the migration leaves more than 1,000,000 rows): readable where they are, moved by
        # the procedure in short transactions, new ids after the old ones.
        c.execute(
            "INSERT INTO rule_nats_private.rule_nats_delivery_attempts_legacy (attempt_id, attempted_at, message_id, "
            "stream_name, consumer_name, subject, attempt, outcome) SELECT 1000 + i, now() - i * interval '1 minute', "
            "'big-' || i, 'S', 'c', 's.a', 1, 'delivered' FROM generate_series(1, 2500) i"
        )
        assert c.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (2550,)
        c.execute("CALL rule_nats_history_upgrade(1000)")
        assert c.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (2550,)
        assert c.execute(
            "SELECT count(*) FROM rule_nats_private.rule_nats_delivery_attempts_legacy"
        ).fetchone() == (0,)
        assert c.execute("SELECT sum(message_count) FROM rule_nats_stats_hourly").fetchone() == stats
        c.execute(
            "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, attempt, outcome) "
            "VALUES ('S', 'c', 1, 'delivered')"
        )
        newest = c.execute("SELECT max(attempt_id) FROM rule_nats_delivery_attempts").fetchone()
        assert newest is not None and ids is not None and newest[0] > ids[1]
