"""Partition management: rule_nats_history_partitions() and partition-dropping retention (native,
managed by the sidecar and rule_nats_purge) against pg_partman 4 on the same table layout.

    .venv/bin/python bench/partitions.py [--days 30] [--rows-per-day 20000] [--rounds 5]

Needs pg_partman installed for the comparison (Debian: postgresql-15-partman); without it only
the native figures are printed. Starts a private PostgreSQL (fsync on) and migrates. For each
manager, on its own copy of rule_nats_attempt_log's layout: the time to make --days daily
partitions ahead, the time of a maintenance run with nothing to do (what runs every 10 minutes),
the time of one COPY of --rows-per-day rows (the insert path is PostgreSQL's own partition routing
in both), and the time to drop --days old partitions by the retention.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import PostgresCluster  # noqa: E402


def timed(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> float:
    t0 = time.perf_counter()
    conn.execute(sql, params)
    return round((time.perf_counter() - t0) * 1000, 1)


def copy_rows(conn: psycopg.Connection[Any], table: str, n: int, day: dt.date) -> float:
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    t0 = time.perf_counter()
    with (
        conn.transaction(),
        conn.cursor().copy(
            f"COPY {table} (attempted_at, message_id, route_id, stream_seq, subject, attempt, outcome, http_status, "
            "latency_us) FROM STDIN"
        ) as cp,
    ):
        for i in range(n):
            cp.write_row(
                (start + dt.timedelta(seconds=i * 86000 / n), f"stream-S-{i}", 1, i, "s.a", 1, "d", 200, 900)
            )
    return round((time.perf_counter() - t0) * 1000, 1)


def native(conn: psycopg.Connection[Any], days: int, rows: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    today = conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()[0]  # type: ignore[index]
    out["make_days_ahead_ms"] = timed(
        conn, "SELECT rule_nats_history_partitions(make_interval(days => %s))", (days,)
    )
    out["maintenance_noop_ms"] = statistics.median(
        timed(conn, "SELECT rule_nats_history_partitions()") for _ in range(rounds)
    )
    out["copy_rows_ms"] = copy_rows(conn, "rule_nats_attempt_log", rows, today)
    conn.execute(
        "SELECT rule_nats_history_partitions(interval '0', %s)", (today - dt.timedelta(days=days + 1),)
    )
    conn.execute("UPDATE rule_nats_retention SET attempts_days = 1")
    out["drop_old_days_ms"] = timed(conn, "SELECT rule_nats_purge_batch('attempts', interval '1 day', 5000)")
    return out


PARTMAN_TABLE = """
CREATE TABLE pm_log (LIKE rule_nats_attempt_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY)
    PARTITION BY RANGE (attempted_at);
CREATE INDEX ON pm_log USING hash (message_id) WITH (fillfactor = 100);
CREATE INDEX ON pm_log USING brin (attempted_at);
CREATE INDEX ON pm_log (attempted_at) WHERE outcome <> 'd';
"""


def partman(conn: psycopg.Connection[Any], days: int, rows: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conn.execute("CREATE SCHEMA partman")
    conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
    out["pg_partman"] = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'"
    ).fetchone()[0]  # type: ignore[index]
    conn.execute(PARTMAN_TABLE)
    today = conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()[0]  # type: ignore[index]
    out["make_days_ahead_ms"] = timed(
        conn,
        "SELECT partman.create_parent('public.pm_log', 'attempted_at', 'native', 'daily', p_premake := %s, "
        "p_start_partition := %s)",
        (days, str(today - dt.timedelta(days=days + 1))),
    )
    out["maintenance_noop_ms"] = statistics.median(
        timed(conn, "SELECT partman.run_maintenance('public.pm_log')") for _ in range(rounds)
    )
    out["copy_rows_ms"] = copy_rows(conn, "pm_log", rows, today)
    conn.execute(
        "UPDATE partman.part_config SET retention = '1 day', retention_keep_table = false "
        "WHERE parent_table = 'public.pm_log'"
    )
    out["drop_old_days_ms"] = timed(conn, "SELECT partman.run_maintenance('public.pm_log')")
    out["partitions_left"] = conn.execute(
        "SELECT count(*) FROM pg_partition_tree('pm_log') WHERE isleaf"
    ).fetchone()[0]  # type: ignore[index]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--rows-per-day", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    pg = PostgresCluster(base / "pg", durable=True)
    try:
        pg.start()
        url = pg.url()
        migrate.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO rule_nats_history_routes (stream_name, consumer_name) VALUES ('S', 'c')"
            )
            result: dict[str, Any] = {"native": native(conn, args.days, args.rows_per_day, args.rounds)}
            try:
                result["pg_partman"] = partman(conn, args.days, args.rows_per_day, args.rounds)
            except psycopg.errors.UndefinedFile as exc:
                result["pg_partman"] = f"not installed: {exc}"
        print(json.dumps(result, indent=1))
    finally:
        pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
