"""Soak: the sidecar at its full rate for a set time, with the retention job running.

    .venv/bin/python bench/soak.py [--minutes 30] [--out soak.jsonl]

Starts a private PostgreSQL (fsync on), nats-server and a minimal receiver, and one sidecar. A
publisher process keeps the consumer's backlog between 20,000 and 40,000 messages (the sidecar
never waits for work, JetStream's disk stays bounded: the stream keeps 300,000 messages). The
retention job runs every 60 s with 2 days of attempts and publish history; before the start,
four days of old history (50,000 attempts a day, in their own partitions) are written, and the
job must drop the two that are older than the retention.

Every minute it prints one JSON line: deliveries/s of that minute (the receiver's count), the
worker's CPU (% of one core) and RSS, the bytes of today's attempt partitions (table and indexes)
per message delivered, the dead tuples and autovacuum/autoanalyze runs of the history tables,
and the latency of every monitoring view (nats_*, each read whole) and of "was event X
delivered" on rule_nats_delivery_attempts. At the end: a summary, the per-minute table and an
ASCII plot of the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import NatsServer, PostgresCluster, free_port, wait_for_port  # noqa: E402

RECEIVER = """
import sys
from aiohttp import web
count = [0]
async def hook(request):
    await request.read()
    count[0] += 1
    return web.Response(status=200)
async def stats(request):
    return web.json_response({"count": count[0]})
app = web.Application()
app.router.add_post("/hook", hook)
app.router.add_get("/stats", stats)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

PUBLISHER = """
import asyncio, json, sys, time
import nats
async def main(url, hook):
    nc = await nats.connect(url)
    js = nc.jetstream()
    n = 0
    while True:
        try:
            info = await js.consumer_info("SOAK", "workers")
            pending = info.num_pending
        except Exception:
            pending = 0
        if pending > 20000:
            await asyncio.sleep(0.1)
            continue
        futures = []
        for _ in range(20000):
            body = json.dumps({"webhook_url": hook, "data": {"n": n, "ts": time.time()}}).encode()
            futures.append(await js.publish_async("soak.deliver", body))
            n += 1
            if len(futures) >= 1000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

HISTORY_TABLES = ("rule_nats_attempt_log", "rule_nats_publish_history", "rule_nats_stats_minute",
                  "rule_nats_stats_hourly", "rule_nats_retries", "rule_nats_workers", "rule_nats_consumer_stats",
                  "rule_nats_consumer_state", "rule_nats_stream_state", "rule_nats_retention",
                  "rule_nats_history_routes")  # fmt: skip

# Today's partitions and the DEFAULT one: where the soak's rows are (the old days are not).
TODAY_BYTES = """
SELECT coalesce(sum(pg_total_relation_size(p.relid)), 0)::bigint
  FROM pg_partition_tree('public.rule_nats_attempt_log') p JOIN pg_class c ON c.oid = p.relid
 WHERE p.isleaf AND (c.relname >= 'rule_nats_attempt_log_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')
                     OR c.relname = 'rule_nats_attempt_log_default')
"""

# Dead tuples and autovacuum runs of the tables that change with traffic, partitions included.
VACUUM_STATS = """
SELECT coalesce(sum(n_dead_tup), 0)::bigint, coalesce(sum(autovacuum_count), 0)::bigint,
       coalesce(sum(autoanalyze_count), 0)::bigint, coalesce(max(n_dead_tup), 0)::bigint,
       (SELECT relname FROM pg_stat_user_tables ORDER BY n_dead_tup DESC LIMIT 1)
  FROM pg_stat_user_tables
 WHERE relname = ANY (%(tables)s) OR relname LIKE 'rule_nats_attempt_log_%%'
    OR relname LIKE 'rule_nats_publish_history_%%'
"""


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return cpu, rss


def received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        return int(json.loads(resp.read())["count"])


def setup(url: str, nats_url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_url,))
        conn.execute(
            "INSERT INTO rule_nats_streams (stream_name, subjects, max_messages) VALUES ('SOAK', '{soak.>}', 300000)"
        )
        conn.execute(
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size, max_ack_pending) "
            "VALUES ('SOAK', 'workers', 64, 10000)"
        )
        conn.execute(
            "UPDATE rule_nats_retention SET attempts_days = 2, publish_history_days = 2, run_every_seconds = 60, "
            "batch_size = 5000"
        )
        # Four old days of history, each in its own partition (as a sidecar would have left them).
        conn.execute("SELECT rule_nats_history_partitions(interval '12 hours', current_date - 4)")
        for day in range(1, 5):
            conn.execute(
                "INSERT INTO rule_nats_attempt_log (attempted_at, message_id, route_id, stream_seq, subject, "
                "attempt, outcome, http_status, latency_us) "
                "SELECT current_date - %s + interval '12 hours', 'old-' || %s || '-' || i, "
                "rule_nats_history_route_id('SOAK', 'workers', 'old', 'http://127.0.0.1/hook'), i, 'soak.deliver', "
                "1, 'd', 200, 1000 FROM generate_series(1, 50000) i",
                (day, day),
            )


def view_names(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'v' "
        "AND relname LIKE 'nats\\_%' ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


# The views over raw history are read as they are meant to be (their comments say so): by event
# id, by a time window. The others are read whole.
RAW_QUERIES = {
    "nats_delivery_attempts": "SELECT * FROM nats_delivery_attempts WHERE message_id = %(id)s ORDER BY attempt",
    "nats_delivery_attempts (last 10 s)": "SELECT count(*), count(*) FILTER (WHERE outcome <> 'delivered') "
    "FROM nats_delivery_attempts WHERE attempted_at > now() - interval '10 seconds'",
    "was_event_x_delivered": "SELECT attempted_at, attempt, outcome, http_status, error "
    "FROM rule_nats_delivery_attempts WHERE message_id = %(id)s ORDER BY attempt",
}


def time_views(conn: psycopg.Connection[Any], names: list[str], seq: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        if name in RAW_QUERIES:
            continue
        t0 = time.perf_counter()
        conn.execute(f'SELECT * FROM "{name}"').fetchall()
        out[name] = round((time.perf_counter() - t0) * 1000, 1)
    for name, sql in RAW_QUERIES.items():
        t0 = time.perf_counter()
        conn.execute(sql, {"id": f"stream-SOAK-{max(1, seq)}"}).fetchall()
        out[name] = round((time.perf_counter() - t0) * 1000, 1)
    return out


def sample(
    conn: psycopg.Connection[Any],
    minute: int,
    count: int,
    prev: dict[str, Any],
    worker_pid: int,
    views: list[str],
) -> dict[str, Any]:
    now = time.monotonic()
    cpu, rss = proc_stat(worker_pid)
    today_bytes = conn.execute(TODAY_BYTES).fetchone()[0]  # type: ignore[index]
    dead, vacuums, analyzes, worst, worst_table = conn.execute(
        VACUUM_STATS, {"tables": list(HISTORY_TABLES)}
    ).fetchone()  # type: ignore[misc]
    partitions = conn.execute(
        "SELECT count(*) FROM pg_partition_tree('public.rule_nats_attempt_log') WHERE isleaf"
    ).fetchone()[0]  # type: ignore[index]
    retention = conn.execute("SELECT last_result FROM rule_nats_retention").fetchone()[0]  # type: ignore[index]
    # An event of the last seconds: its attempt is in the newest pages of today's partition.
    seq = max(1, count - 1000)
    elapsed = now - prev["t"]
    return {
        "minute": minute,
        "deliveries_per_s": round((count - prev["count"]) / elapsed),
        "delivered_total": count,
        "worker_cpu_pct": round((cpu - prev["cpu"]) / elapsed * 100, 1),
        "worker_rss_mb": round(rss / 2**20, 1),
        "bytes_per_message": round(today_bytes / max(1, count), 1),
        "dead_tuples": dead,
        "dead_tuples_worst": [worst_table, worst],
        "autovacuum_runs": vacuums,
        "autoanalyze_runs": analyzes,
        "attempt_partitions": partitions,
        "retention_last_result": retention,
        "view_ms": time_views(conn, views, int(seq)),
        "_t": now,
        "_cpu": cpu,
    }


def plot(rates: list[int], height: int = 10) -> str:
    top = max(rates) or 1
    lines = []
    for level in range(height, 0, -1):
        cut = top * level / height
        lines.append(
            f"{round(cut):>6} |" + "".join("#" if r >= cut - top / height / 2 else " " for r in rates)
        )
    lines.append("       +" + "-" * len(rates))
    lines.append("        minute 1" + " " * max(0, len(rates) - 10) + f"{len(rates)}")
    return "\n".join(lines)


def run(minutes: int, out: Path | None) -> int:
    base = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    pg = PostgresCluster(base / "pg", durable=True)
    ns = NatsServer(base / "nats")
    rport = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    try:
        pg.start()
        ns.start()
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(rport)])
        procs.append(receiver)
        wait_for_port(rport)
        url = pg.url()
        migrate.migrate(url)
        setup(url, ns.url)
        hook = f"http://127.0.0.1:{rport}/hook"

        async def make_stream() -> None:
            import nats
            from nats.js.api import StreamConfig

            nc = await nats.connect(ns.url)
            await nc.jetstream().add_stream(
                StreamConfig(
                    name="SOAK", subjects=["soak.>"], max_msgs=300000, max_bytes=2**30, max_age=604800.0
                )
            )
            await nc.close()

        asyncio.run(make_stream())
        env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
               "WORKER_NAME": "soak-0"}  # fmt: skip
        worker = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"], env=env
        )
        procs.append(worker)
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, ns.url, hook])
        procs.append(publisher)
        with psycopg.connect(url, autocommit=True) as conn:
            views = view_names(conn)
            # The first minute starts once deliveries flow (start-up excluded).
            while received(rport) < 1000:
                time.sleep(0.2)
            cpu, _ = proc_stat(worker.pid)
            prev = {"t": time.monotonic(), "count": received(rport), "cpu": cpu}
            start_count = prev["count"]
            for minute in range(1, minutes + 1):
                time.sleep(max(0.0, prev["t"] + 60 - time.monotonic()))
                if worker.poll() is not None:
                    raise SystemExit(f"the sidecar exited with {worker.returncode}")
                row = sample(conn, minute, received(rport), prev, worker.pid, views)
                prev = {"t": row.pop("_t"), "count": row["delivered_total"], "cpu": row.pop("_cpu")}
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if out is not None:
                    with out.open("a") as fh:
                        fh.write(line + "\n")
            old_left = conn.execute(
                "SELECT count(*) FROM rule_nats_delivery_attempts WHERE message_id LIKE 'old-%'"
            ).fetchone()[0]  # type: ignore[index]
            deletes = conn.execute(
                "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables WHERE relname LIKE 'rule_nats_attempt_log%'"
            ).fetchone()[0]  # type: ignore[index]
        rates = [r["deliveries_per_s"] for r in rows]
        views_max = max(max(r["view_ms"].values()) for r in rows)
        summary = {
            "minutes": minutes,
            "delivered": rows[-1]["delivered_total"] - start_count,
            "first_minute_per_s": rates[0],
            "last_minute_per_s": rates[-1],
            "last_to_first": round(rates[-1] / rates[0], 3),
            "mean_per_s": round(sum(rates) / len(rates)),
            "rss_mb_first_last_max": [
                rows[0]["worker_rss_mb"],
                rows[-1]["worker_rss_mb"],
                max(r["worker_rss_mb"] for r in rows),
            ],
            "dead_tuples_max": max(r["dead_tuples"] for r in rows),
            "view_ms_max": views_max,
            "view_ms_max_by_view": {k: max(r["view_ms"][k] for r in rows) for k in rows[0]["view_ms"]},
            "bytes_per_message_last": rows[-1]["bytes_per_message"],
            "old_rows_left_of_200000": old_left,
            "rows_deleted_from_attempt_partitions": int(deletes),
        }
        print(json.dumps({"summary": summary}), flush=True)
        print(textwrap.indent(plot(rates), "  "))
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        ns.cleanup()
        pg.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--out", type=Path, help="also append each minute's JSON line to this file")
    args = ap.parse_args()
    return run(args.minutes, args.out)


if __name__ == "__main__":
    sys.exit(main())
