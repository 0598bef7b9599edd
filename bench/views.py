"""Monitoring views at scale: 1,000,000 delivery attempts and 200,000 publishes in the last 24 h.

    .venv/bin/python bench/views.py [--attempts 1000000] [--publishes 200000] [--rounds 5]
    .venv/bin/python bench/views.py --attempts 10000000 --last-hour --target-ms 50   # the worst case

Starts a private PostgreSQL (fsync on), migrates, loads the rows with COPY (the rollup
triggers run as they do for the sidecar's batches: the load is cut into batches of 1,000),
ANALYZEs, then times each view (median of --rounds). Baseline measured in the same run:
the aggregate that nats_performance_stats ran before the rollup (percentile_cont over the raw
rows of the last 24 h).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import PostgresCluster  # noqa: E402

RAW_AGGREGATE = """
SELECT a.subject, a.consumer_name, w.webhook_name, count(*),
       count(*) FILTER (WHERE a.outcome = 'delivered'), avg(a.latency_ms), min(a.latency_ms), max(a.latency_ms),
       percentile_cont(0.50) WITHIN GROUP (ORDER BY a.latency_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.latency_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY a.latency_ms)
  FROM rule_nats_delivery_attempts a LEFT JOIN rule_webhooks w ON w.webhook_id = a.webhook_id
 WHERE a.attempted_at >= now() - interval '24 hours'
 GROUP BY 1, 2, 3
"""

VIEWS = {
    "nats_performance_stats": "SELECT * FROM nats_performance_stats",
    "nats_recent_failures": "SELECT * FROM nats_recent_failures",
    "nats_endpoint_health": "SELECT * FROM nats_endpoint_health",
    "nats_consumer_status": "SELECT * FROM nats_consumer_status",
    "nats_worker_status": "SELECT * FROM nats_worker_status",
    "nats_stream_status": "SELECT * FROM nats_stream_status",
    "nats_publish_summary": "SELECT * FROM nats_publish_summary",
    "baseline: raw 24 h aggregate": RAW_AGGREGATE,
}


def load(conn: psycopg.Connection, attempts: int, publishes: int, window_s: float = 86000.0) -> float:
    rnd = random.Random(7)
    conn.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S', '{s.>}')")
    for c in range(4):
        conn.execute(
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('S', %s)", (f"c{c}",)
        )
    for w in range(20):
        conn.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES (%s, %s, %s)",
            (f"hook{w}", f"https://h{w}.example.com/x", f"s.w{w}"),
        )
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    batch = 1000
    cols = "attempted_at, message_id, stream_name, consumer_name, stream_seq, subject, webhook_id, url, attempt, "
    cols += "outcome, http_status, latency_ms, error, worker_name"
    for start in range(0, attempts, batch):
        with (
            conn.transaction(),
            conn.cursor().copy(f"COPY rule_nats_delivery_attempts ({cols}) FROM STDIN") as cp,
        ):
            for i in range(start, min(attempts, start + batch)):
                w = rnd.randrange(20)
                ok = rnd.random() > 0.05
                at = now - dt.timedelta(seconds=window_s * (1 - i / attempts))
                cp.write_row(
                    (
                        at,
                        f"m{i}",
                        "S",
                        f"c{w % 4}",
                        i,
                        f"s.w{w}",
                        w + 1,
                        f"https://h{w}.example.com/x",
                        1,
                        "delivered" if ok else "retry",
                        200 if ok else 503,
                        rnd.lognormvariate(1.0, 0.8),
                        None if ok else "HTTP 503",
                        "bench",
                    )
                )
    for start in range(0, publishes, batch):
        with (
            conn.transaction(),
            conn.cursor().copy(
                "COPY rule_nats_publish_history (published_at, subject, webhook_id, success, latency_ms, stream_name, "
                "sequence_number) FROM STDIN"
            ) as cp,
        ):
            for i in range(start, min(publishes, start + batch)):
                w = rnd.randrange(20)
                at = now - dt.timedelta(seconds=window_s * (1 - i / publishes))
                cp.write_row(
                    (at, f"s.w{w}", w + 1, rnd.random() > 0.01, rnd.lognormvariate(-1.0, 0.5), "S", i)
                )
    conn.execute(
        "INSERT INTO rule_nats_workers (worker_name, hostname, pid, version) VALUES ('bench', 'h', 1, 'x')"
    )
    elapsed = time.perf_counter() - t0
    conn.execute("ANALYZE")
    return elapsed


def timed(conn: psycopg.Connection, sql: str, rounds: int) -> tuple[float, int]:
    times = []
    rows = 0
    for _ in range(rounds):
        t = time.perf_counter()
        rows = len(conn.execute(sql).fetchall())  # type: ignore[arg-type]
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times), rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempts", type=int, default=1_000_000)
    ap.add_argument("--publishes", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--last-hour",
        action="store_true",
        help="put every row in the last hour (the worst case of the status views: e.g. --attempts 10000000)",
    )
    ap.add_argument("--target-ms", type=float, default=200.0, help="what the slowest view must stay under")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-views-"))
    pg = PostgresCluster(base / "pg", durable=True)
    try:
        pg.start()
        url = pg.url()
        migrate.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            secs = load(conn, args.attempts, args.publishes, 3500.0 if args.last_hour else 86000.0)
            total = args.attempts + args.publishes
            print(
                f"loaded {args.attempts:,} attempts and {args.publishes:,} publishes in {secs:.1f} s "
                f"({total / secs:,.0f} rows/s incl. rollup triggers)"
            )
            rollup_rows = conn.execute("SELECT count(*) FROM rule_nats_stats_hourly").fetchone()[0]  # type: ignore[index]
            print(f"rule_nats_stats_hourly: {rollup_rows:,} rows")
            results = {}
            for name, sql in VIEWS.items():
                ms, rows = timed(conn, sql, args.rounds)
                results[name] = ms
                print(f"{name:32s} {ms:9.1f} ms  ({rows} rows)")
            base_ms = results["baseline: raw 24 h aggregate"]
            print(
                f"nats_performance_stats vs raw aggregate: {base_ms / results['nats_performance_stats']:.0f}x faster"
            )
            worst = max(v for k, v in results.items() if not k.startswith("baseline"))
            print(f"slowest view: {worst:.1f} ms (target: under {args.target_ms:.0f} ms)")
    finally:
        pg.stop()
        pg.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
