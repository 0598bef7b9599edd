"""Upgrade of a big installation to partitioned history (sql/0019), timed, with a writer running.

    .venv/bin/python bench/upgrade.py [--attempts 3000000] [--publishes 500000] [--days 10]

Starts a private PostgreSQL (fsync on), migrates to 0018, loads the history (spread over --days),
then, while a writer inserts one attempt every 5 ms through rule_nats_delivery_attempts (as the
sidecar of 0018 would, by name): runs migration 0019 (more than 1,000,000 rows: the rows stay
where they are, readable through the view) and then CALL rule_nats_history_upgrade(), which moves
them in batches of 50,000 rows, one short transaction each. Prints the time of each step, the
writer's longest wait in each, and checks that every row arrived once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import PostgresCluster  # noqa: E402

WRITE = (
    "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, message_id, subject, attempt, outcome, "
    "latency_ms) VALUES ('S', 'c', %s, 's.a', 1, 'delivered', 1.0)"
)


class Writer(threading.Thread):
    """One INSERT every 5 ms; records how long each took."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.waits: list[tuple[float, float]] = []  # (start, seconds)
        self.written = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                t0 = time.monotonic()
                conn.execute(WRITE, (f"live-{self.written}",))
                self.waits.append((t0, time.monotonic() - t0))
                self.written += 1
                time.sleep(0.005)

    def longest(self, since: float, until: float) -> float:
        inside = [w for t, w in self.waits if since <= t <= until]
        return round(max(inside, default=0.0) * 1000, 1)

    def median(self, since: float, until: float) -> float:
        inside = [w for t, w in self.waits if since <= t <= until]
        return round(statistics.median(inside) * 1000, 2) if inside else 0.0


def run(attempts: int, publishes: int, days: int) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="bench-upgrade-"))
    pg = PostgresCluster(base / "pg", durable=True)
    old = base / "sql18"
    old.mkdir()
    for f in sorted(migrate.sql_dir().glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if int(f.name[:4]) <= 18:
            (old / f.name).write_text(f.read_text())
    out: dict[str, object] = {"attempts": attempts, "publishes": publishes, "days": days}
    try:
        pg.start()
        url = pg.url()
        migrate.migrate(url, old)
        with psycopg.connect(url, autocommit=True) as conn:
            t0 = time.monotonic()
            conn.execute(
                "INSERT INTO rule_nats_delivery_attempts (attempted_at, message_id, stream_name, consumer_name, "
                "stream_seq, subject, url, attempt, outcome, http_status, latency_ms, worker_name) "
                "SELECT now() - (%s::float8 * i / %s) * interval '1 day', 'old-' || i, 'S', 'c', i, 's.a', "
                "'https://h.example/x', 1, CASE WHEN i %% 50 = 0 THEN 'retry' ELSE 'delivered' END, 200, "
                "(i %% 100) / 10.0, 'w' FROM generate_series(1, %s) i",
                (days, attempts, attempts),
            )
            conn.execute(
                "INSERT INTO rule_nats_publish_history (published_at, subject, success, latency_ms) "
                "SELECT now() - (%s::float8 * i / %s) * interval '1 day', 's.a', true, 1.0 "
                "FROM generate_series(1, %s) i",
                (days, publishes, publishes),
            )
            conn.execute("VACUUM ANALYZE")
            out["load_s"] = round(time.monotonic() - t0, 1)
            size = conn.execute("SELECT pg_total_relation_size('rule_nats_delivery_attempts')").fetchone()
            out["old_attempts_bytes_per_row"] = round(size[0] / attempts, 1)  # type: ignore[index]
            stats = conn.execute("SELECT sum(message_count) FROM rule_nats_stats_hourly").fetchone()
        writer = Writer(url)
        writer.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        migrate.migrate(url)
        t1 = time.monotonic()
        out["migration_0019_s"] = round(t1 - t0, 2)
        out["writer_longest_wait_during_migration_ms"] = writer.longest(t0, t1)
        with psycopg.connect(url, autocommit=True) as conn:
            legacy = conn.execute(
                "SELECT count(*) FROM rule_nats_private.rule_nats_delivery_attempts_legacy"
            ).fetchone()
            out["rows_left_in_legacy_after_migration"] = legacy[0]  # type: ignore[index]
            t2 = time.monotonic()
            conn.execute("CALL rule_nats_history_upgrade(50000)")
            t3 = time.monotonic()
            out["upgrade_procedure_s"] = round(t3 - t2, 1)
            out["writer_longest_wait_during_upgrade_ms"] = writer.longest(t2, t3)
            out["writer_median_wait_during_upgrade_ms"] = writer.median(t2, t3)
            writer.stop.set()
            writer.join()
            out["writer_rows"] = writer.written
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM rule_nats_delivery_attempts), "
                "(SELECT count(DISTINCT message_id) FROM rule_nats_delivery_attempts), "
                "(SELECT count(*) FROM rule_nats_private.rule_nats_delivery_attempts_legacy), "
                "(SELECT count(*) FROM rule_nats_publish_history)"
            ).fetchone()
            assert counts is not None
            out["rows_in_view"], out["distinct_ids"], out["left_in_legacy"], out["publish_rows"] = counts
            out["every_row_once"] = counts[0] == counts[1] == attempts + writer.written and counts[2] == 0
            out["publish_rows_all"] = counts[3] == publishes
            after = conn.execute("SELECT sum(message_count) FROM rule_nats_stats_hourly").fetchone()
            # The counters: the old rows counted once (the move does not count them again).
            out["counters_unchanged_but_live_rows"] = (
                after[0] == stats[0] + writer.written  # type: ignore[index]
            )
            conn.execute("VACUUM ANALYZE rule_nats_attempt_log")
            size = conn.execute(
                "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('rule_nats_attempt_log') "
                "WHERE isleaf"
            ).fetchone()
            out["new_attempts_bytes_per_row"] = round(size[0] / counts[0], 1)  # type: ignore[index]
        return out
    finally:
        pg.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempts", type=int, default=3_000_000)
    ap.add_argument("--publishes", type=int, default=500_000)
    ap.add_argument("--days", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps(run(args.attempts, args.publishes, args.days), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
