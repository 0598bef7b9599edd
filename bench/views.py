"""Monitoring views and the sidecar's periodic queries at scale: 1,000,000 delivery attempts and
200,000 publishes in the last 24 h, 1,000,000 rows waiting in rule_nats_retries and as many in
rule_nats_outbox.

    .venv/bin/python bench/views.py [--attempts 1000000] [--publishes 200000] [--rounds 5]
    .venv/bin/python bench/views.py --attempts 10000000 --last-hour --target-ms 50   # the worst case

Starts a private PostgreSQL (fsync on), migrates, loads the rows with COPY (the rollup
triggers run as they do for the sidecar's batches: the load is cut into batches of 1,000),
fills the retry table (one consumer with 1,000 retries in flight and a few due, the others with
an outage's backlog, half of it due over the last hour) and the outbox (1 % failed), ANALYZEs,
then times each view and each query the sidecar runs periodically, with the sidecar's own SQL
text (sidecar/queries.sql; median of --rounds; writes are rolled back). Baselines measured in the same run: the aggregate
that nats_performance_stats ran before the rollup (percentile_cont over the raw rows of the last
24 h), and the backlog count(*) the heartbeat ran before 0013.
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
from sidecar.queries import query  # noqa: E402
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

OLD_BACKLOG = """
SELECT (SELECT count(*) FROM rule_nats_retries), (SELECT count(*) FROM rule_nats_outbox WHERE status = 'pending'),
       (SELECT count(*) FROM rule_nats_outbox WHERE status = 'failed')
"""

_STATE = {"present": True, "last_error": None, "worker": "bench"}
STREAM_STATE = {
    **_STATE, "stream_name": "S", "config_name": "default", "storage_type": "file", "subjects": ["s.>"],
    "messages": 10, "bytes": 100, "first_seq": 1, "last_seq": 10, "consumer_count": 4, "max_age_seconds": 0.0,
    "max_bytes": -1, "max_messages": -1, "replicas": 1,
}  # fmt: skip
CONSUMER_STATE = {
    **_STATE, "stream_name": "S", "consumer_name": "c0", "filter_subject": None, "num_pending": 0,
    "num_ack_pending": 0, "num_redelivered": 0, "num_waiting": 1,
}  # fmt: skip
CLAIM = {"lease": 600, "worker": "bench", "stream": "S", "limit": 100}

# (label, when the sidecar runs it, [(query name, parameters), ...] run in one transaction, rolled back)
PERIODIC: list[tuple[str, str, list[tuple[str, dict[str, object]]]]] = [
    ("worker_heartbeat", "heartbeat", [("worker_heartbeat", {
        "worker_name": "bench", "active": True, "delivered": 1, "failed": 0, "in_flight": 0,
        "consumers": ["S/c0"], "problems": [], "nats_down": []})]),
    ("live_workers", "heartbeat", [("live_workers", {"worker_name": "bench", "consumers": ["S/c0"]})]),
    ("backlog", "heartbeat", [("backlog", {})]),
    ("stats_update", "heartbeat", [("stats_update", {
        "stream": "S", "consumer": "c0", "worker": "bench", "delivered": 10, "acked": 10, "failed": 0,
        "redelivered": 0, "pending": 0, "avg_ms": 1.0, "active": True})]),
    ("stream_state_observe", "heartbeat", [("stream_state_observe", STREAM_STATE)]),
    ("consumer_state_upsert", "heartbeat", [("consumer_state_upsert", CONSUMER_STATE)]),
    ("retention_settings", "heartbeat", [("retention_settings", {})]),
    ("endpoint_state_upsert", "heartbeat", [("endpoint_state_upsert", {
        "worker": "bench", "ids": [1, 2], "circuits": ["closed", "open"], "failures": [0, 5],
        "failing_since": [None, 1.7e9], "open_until": [None, 1.7e9], "backoff_until": [None, None],
        "statuses": [200, 503], "errors": [None, "HTTP 503"], "success_at": [1.7e9, None],
        "failure_at": [None, 1.7e9]})]),
    ("retries_claim (in flight + few due)", "4/s per consumer", [("retries_claim", {**CLAIM, "consumer": "c0"})]),
    ("retries_claim (large due backlog)", "4/s per consumer", [("retries_claim", {**CLAIM, "consumer": "c1"})]),
    ("outbox_claim", "each relay pass", [("outbox_claim_plan", {}), ("outbox_claim", {"limit": 500})]),
    ("purge_batch attempts", "retention run", [("purge_batch", {"what": "attempts"})]),
    ("purge_batch stats", "retention run", [("purge_batch", {"what": "stats"})]),
    ("registry read (6 queries)", "each reload, 30 s", [
        (name, {}) for name in
        ("nats_config_all", "streams_all", "consumers_all", "webhooks_all", "secrets_active", "delivery_settings")]),
    ("outcome_recorded", "each redelivery", [("outcome_recorded", {
        "stream": "S", "consumer": "c1", "seq": 123456, "message_id": "m123456"})]),
]  # fmt: skip


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
    # As the sidecar writes them (sql/0019): into the day partitions of rule_nats_attempt_log, the
    # stream, consumer, worker and URL as a route id.
    conn.execute("SELECT rule_nats_history_partitions(interval '12 hours', current_date - 1)")
    routes = [
        conn.execute(
            "SELECT rule_nats_history_route_id('S', %s, 'bench', %s)",
            (f"c{w % 4}", f"https://h{w}.example.com/x"),
        ).fetchone()[0]  # type: ignore[index]
        for w in range(20)
    ]
    cols = (
        "attempted_at, message_id, route_id, stream_seq, subject, webhook_id, attempt, outcome, http_status, "
    )
    cols += "latency_us, error"
    for start in range(0, attempts, batch):
        with (
            conn.transaction(),
            conn.cursor().copy(f"COPY rule_nats_attempt_log ({cols}) FROM STDIN") as cp,
        ):
            for i in range(start, min(attempts, start + batch)):
                w = rnd.randrange(20)
                ok = rnd.random() > 0.05
                at = now - dt.timedelta(seconds=window_s * (1 - i / attempts))
                cp.write_row(
                    (
                        at,
                        f"m{i}",
                        routes[w],
                        i,
                        f"s.w{w}",
                        w + 1,
                        1,
                        "d" if ok else "r",
                        200 if ok else 503,
                        round(rnd.lognormvariate(1.0, 0.8) * 1000),
                        None if ok else "HTTP 503",
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


def load_backlog(conn: psycopg.Connection, retries: int, outbox: int) -> float:
    """rule_nats_retries: consumer c0 has 1,000 retries in flight (leased by the claim itself, as a
    running sidecar leaves them) and 10 due a second ago; c1-c3 share the rest, an outage's backlog:
    half of it due over the last hour, half due in an hour. The outbox: `outbox` rows, 1 % failed."""
    t0 = time.perf_counter()
    insert = (
        "INSERT INTO rule_nats_retries (message_id, stream_name, consumer_name, stream_seq, subject, "
        "message_raw, attempts, first_attempt_at, next_attempt_at, last_error, webhook_id) "
        "SELECT 'r' || g, 'S', %s, g, 's.w' || (g %% 20), convert_to(repeat('x', 200), 'UTF8'), 1, now(), "
        "{due}, 'HTTP 503', g %% 20 + 1 FROM generate_series(%s::bigint, %s::bigint) g"
    )
    conn.execute(insert.format(due="now() - interval '2 hours'"), ("c0", 1, 1000))
    conn.execute(query("retries_claim"), {**CLAIM, "consumer": "c0", "limit": 1000})
    conn.execute(insert.format(due="now() - interval '1 second'"), ("c0", 1001, 1010))
    backlog = "CASE WHEN g %% 2 = 0 THEN now() - (g %% 3600) * interval '1 second' ELSE now() + interval '1 hour' END"
    rest = max(0, retries - 1010)
    for c in range(3):
        first = 10_000_000 * (c + 1)
        conn.execute(insert.format(due=backlog), (f"c{c + 1}", first, first + rest // 3 - 1))
    conn.execute(
        "INSERT INTO rule_nats_outbox (subject, payload, message_id, status) "
        "SELECT 's.w' || (g %% 20), jsonb_build_object('i', g), 'o' || g, "
        "CASE WHEN g %% 100 = 0 THEN 'failed' ELSE 'pending' END FROM generate_series(1, %s) g",
        (outbox,),
    )
    conn.execute("VACUUM ANALYZE rule_nats_retries")
    conn.execute("VACUUM ANALYZE rule_nats_outbox")
    return time.perf_counter() - t0


def timed_periodic(
    conn: psycopg.Connection, steps: list[tuple[str, dict[str, object]]], rounds: int
) -> float:
    """Median ms of the steps in one transaction, rolled back (claims and upserts change rows)."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        with conn.transaction(force_rollback=True):
            for name, params in steps:
                cur = conn.execute(query(name), params or None)  # none: as the sidecar (SET LOCAL; SET LOCAL)
                if cur.description is not None:
                    cur.fetchall()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


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
    ap.add_argument("--retries", type=int, default=1_000_000, help="rows waiting in rule_nats_retries")
    ap.add_argument("--outbox", type=int, default=1_000_000, help="rows waiting in rule_nats_outbox")
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
            secs = load_backlog(conn, args.retries, args.outbox)
            print(f"loaded {args.retries:,} retries and {args.outbox:,} outbox rows in {secs:.1f} s")
            results = {}
            print("\nviews:")
            for name, sql in VIEWS.items():
                ms, rows = timed(conn, sql, args.rounds)
                results[name] = ms
                print(f"{name:32s} {ms:9.1f} ms  ({rows} rows)")
            print("\nthe sidecar's periodic queries (sidecar/queries.sql):")
            for label, when, steps in PERIODIC:
                ms = timed_periodic(conn, steps, args.rounds)
                results[label] = ms
                print(f"{label:38s} {ms:9.2f} ms  ({when})")
            ms, _ = timed(conn, OLD_BACKLOG, args.rounds)
            results["baseline: backlog count(*) before 0013"] = ms
            print(f"{'baseline: backlog count(*) before 0013':38s} {ms:9.2f} ms")
            base_ms = results["baseline: raw 24 h aggregate"]
            print(
                f"nats_performance_stats vs raw aggregate: {base_ms / results['nats_performance_stats']:.0f}x faster"
            )
            worst = max(v for k, v in results.items() if not k.startswith("baseline"))
            slowest = max((k for k in results if not k.startswith("baseline")), key=results.__getitem__)
            print(
                f"slowest view or periodic query: {slowest}, {worst:.1f} ms (target: under {args.target_ms:.0f} ms)"
            )
    finally:
        pg.stop()
        pg.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
