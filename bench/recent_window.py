"""Why "the attempts of the last 10 seconds" costs what it costs: BRIN summarization or row count.

    .venv/bin/python bench/recent_window.py [--seconds 180] [--every 15] [--rate 5000]

Starts a private PostgreSQL (fsync on) with every migration; a writer COPYs delivered attempts
into rule_nats_attempt_log at --rate rows/s. Every --every seconds the soak's query
(bench/soak.py: "last 10 s" through nats_delivery_attempts) runs under EXPLAIN ANALYZE, then
brin_summarize_new_values() summarizes every page range of today's partition that autovacuum
(autosummarize, default naptime 60 s) has not summarized yet, and the query runs again. Prints
per sample: execution time before and after, the ranges that were unsummarized, and the bitmap
heap scan's lossy blocks, rows and rows removed by recheck; "after" minus "before" is what the
unsummarized ranges cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import PostgresCluster  # noqa: E402

QUERY = (
    "SELECT count(*), count(*) FILTER (WHERE outcome <> 'delivered') FROM nats_delivery_attempts "
    "WHERE attempted_at > now() - interval '10 seconds'"
)
COPY = (
    "COPY rule_nats_attempt_log (route_id, attempt, outcome, http_status, latency_us, message_id, stream_seq) "
    "FROM STDIN"
)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(conn: psycopg.Connection) -> dict[str, Any]:
    row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + QUERY).fetchone()
    assert row is not None
    plan = row[0][0]
    scans = [n for n in nodes(plan["Plan"]) if n.get("Node Type") == "Bitmap Heap Scan"]
    return {
        "ms": round(plan["Execution Time"], 1),
        "lossy_blocks": sum(n.get("Lossy Heap Blocks", 0) for n in scans),
        # A parallel scan reports rows per process: times its loops.
        "rows": sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in scans),
        "removed_by_recheck": sum(n.get("Rows Removed by Index Recheck", 0) for n in scans),
    }


def write(url: str, route: int, rate: int, stop: threading.Event) -> None:
    per_tick = max(1, rate // 10)
    with psycopg.connect(url, autocommit=True) as conn:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            with conn.cursor().copy(COPY) as copy:
                for _ in range(per_tick):
                    n += 1
                    copy.write_row((route, 1, "d", 200, 1000, f"stream-S-{n}", n))
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--every", type=float, default=15)
    ap.add_argument("--rate", type=int, default=5000)
    args = ap.parse_args()
    pg = PostgresCluster(Path(tempfile.mkdtemp(prefix="bench-window-")) / "pg", durable=True)
    pg.start()
    stop = threading.Event()
    writer: threading.Thread | None = None
    samples: list[dict[str, Any]] = []
    try:
        url = pg.url()
        migrate.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            route = conn.execute(
                "INSERT INTO rule_nats_history_routes (stream_name, consumer_name, worker_name, url) "
                "VALUES ('S', 'c', 'w', 'http://127.0.0.1/hook') RETURNING route_id"
            ).fetchone()[0]  # type: ignore[index]
            index = conn.execute(
                "SELECT 'rule_nats_private.rule_nats_attempt_log_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD') "
                "|| '_attempted_at_idx'"
            ).fetchone()[0]  # type: ignore[index]
            writer = threading.Thread(target=write, args=(url, route, args.rate, stop))
            writer.start()
            begun = time.monotonic()
            while time.monotonic() - begun < args.seconds:
                time.sleep(args.every)
                before = explain(conn)
                summarized = conn.execute(
                    "SELECT brin_summarize_new_values(%s::regclass)", (index,)
                ).fetchone()
                ranges = summarized[0] if summarized else 0
                after = explain(conn)
                sample = {"second": round(time.monotonic() - begun), "before": before,
                          "unsummarized_ranges": ranges, "after": after}  # fmt: skip
                samples.append(sample)
                print(json.dumps(sample), flush=True)
        steady = samples[1:]  # the first comes before the table has statistics
        print(json.dumps({"summary": {
            "samples": len(samples),
            "median_ms_before": round(statistics.median(s["before"]["ms"] for s in steady), 1),
            "median_ms_after_summarizing": round(statistics.median(s["after"]["ms"] for s in steady), 1),
            "median_rows": statistics.median(s["before"]["rows"] for s in steady),
            "median_unsummarized_ranges": statistics.median(s["unsummarized_ranges"] for s in steady),
        }}))  # fmt: skip
        return 0
    finally:
        stop.set()
        if writer is not None:
            writer.join(10)
        pg.stop()
        pg.cleanup()


if __name__ == "__main__":
    sys.exit(main())
