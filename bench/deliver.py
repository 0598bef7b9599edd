"""Delivery benchmark: the sidecar against a local receiver, with a same-run baseline.

    .venv/bin/python bench/deliver.py [--scenario fast|signed|slow50|flaky|latency|all] [--processes N]

Each scenario starts a private PostgreSQL (fsync on), nats-server and a receiver process,
configures everything in SQL, publishes the messages, starts the sidecar(s) and waits until
the receiver has every id. Baseline: a bare nats-py pull-and-ack loop over the same number of
messages (no HTTP, no database). Prints deliveries/s and its ratio to that baseline,
duplicates, missing ids, publish-to-delivery latency (p50, p99; meaningful where messages are
published at a rate, not as a backlog), worker CPU seconds (whole run) and CPU per message from
the first delivery to the last (start-up excluded), and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
import psycopg  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import NatsServer, PostgresCluster, free_port, wait_for_port  # noqa: E402

SCENARIOS = {
    "fast": {"messages": 20000, "delay_ms": 0, "fail_pct": 0, "batch_size": 64},
    # fast, through a registered webhook with two signing secrets (a rotation window) and the
    # endpoint gate: the cost of signatures, registry lookups and per-endpoint policy
    "signed": {"messages": 20000, "delay_ms": 0, "fail_pct": 0, "batch_size": 64, "signed": 1},
    "slow50": {"messages": 2000, "delay_ms": 50, "fail_pct": 0, "batch_size": 100},
    "flaky": {"messages": 5000, "delay_ms": 0, "fail_pct": 10, "batch_size": 64},
    "latency": {"messages": 5000, "delay_ms": 0, "fail_pct": 0, "batch_size": 64, "rate": 500},
}


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (PostgreSQL: the postmaster and its backends)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def others_cpu(pg: PostgresCluster, ns: NatsServer, receiver: subprocess.Popen[bytes]) -> dict[str, float]:
    postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    assert ns.proc is not None
    return {
        "postgres": tree_cpu(postmaster),
        "nats": tree_cpu(ns.proc.pid),
        "receiver": tree_cpu(receiver.pid),
    }


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS in bytes) of a running process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return cpu, hwm


async def publish(
    url: str,
    n: int,
    receiver: str,
    rate: float | None = None,
    start_id: int = 0,
    webhook_id: int | None = None,
) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    pad = "x" * 900  # about 1 KB per message
    futures = []
    interval = 1.0 / rate if rate else 0.0
    t0 = time.perf_counter()
    target_ref: dict[str, Any] = {"webhook_id": webhook_id} if webhook_id else {"webhook_url": receiver}
    for i in range(start_id, start_id + n):
        if rate:
            target = t0 + (i - start_id) * interval
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        # "ts" is taken after the pacing sleep: taken before it, it counted up to one interval
        # (2 ms at 500 msg/s) of the publisher's own waiting as delivery latency.
        body = json.dumps({**target_ref, "data": {"id": i, "ts": time.time(), "pad": pad}}).encode()
        if rate:
            await js.publish("bench.deliver", body)
        else:
            futures.append(
                await js.publish_async("bench.deliver", body)
                if hasattr(js, "publish_async")
                else asyncio.ensure_future(js.publish("bench.deliver", body))
            )
            if len(futures) >= 500:
                await asyncio.gather(*futures)
                futures.clear()
    if futures:
        await asyncio.gather(*futures)
    await nc.close()


async def baseline(url: str, n: int) -> float:
    """Bare pull-and-ack over a copy of the stream: the ceiling without HTTP and PostgreSQL."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    psub = await js.pull_subscribe("bench.deliver", durable="baseline", stream="DELIVER")
    got = 0
    start = time.perf_counter()
    while got < n:
        msgs = await psub.fetch(256, timeout=5)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    elapsed = time.perf_counter() - start
    await nc.close()
    return n / elapsed


def get_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def run_scenario(name: str, processes: int, messages: int | None = None) -> dict[str, Any]:
    cfg = SCENARIOS[name]
    n = messages or int(cfg["messages"])
    base = Path(tempfile.mkdtemp(prefix=f"bench-deliver-{name}-"))
    pg = PostgresCluster(base / "pg", durable=True)
    ns = NatsServer(base / "nats")
    rport = free_port()
    receiver = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench" / "receiver_proc.py"),
            str(rport),
            str(cfg["delay_ms"]),
            str(cfg["fail_pct"]),
        ]
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        ns.start()
        wait_for_port(rport)
        url = pg.url()
        migrate.migrate(url)
        hook = f"http://127.0.0.1:{rport}/hook"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (ns.url,))
            conn.execute(
                "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('DELIVER', '{bench.>}')"
            )
            conn.execute(
                "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size, max_ack_pending, "
                "retry_initial_seconds, retry_max_backoff_seconds) VALUES ('DELIVER', 'workers', %s, 10000, 0.2, 1)",
                (cfg["batch_size"],),
            )

            async def make_stream() -> None:
                nc = await nats.connect(ns.url)
                await nc.jetstream().add_stream(StreamConfig(name="DELIVER", subjects=["bench.>"]))
                await nc.close()

            asyncio.run(make_stream())
            webhook_id = None
            if cfg.get("signed"):
                webhook_id = conn.execute(
                    "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) "
                    "VALUES ('bench', %s, 'bench.deliver') RETURNING webhook_id",
                    (hook,),
                ).fetchone()[0]  # type: ignore[index]
                conn.execute("SELECT rule_webhook_secret_create(%s)", (webhook_id,))
                conn.execute("SELECT rule_webhook_secret_rotate(%s, interval '1 hour')", (webhook_id,))
            rate = cfg.get("rate")
            if not rate:
                asyncio.run(publish(ns.url, n, hook, webhook_id=webhook_id))
                base_rate = asyncio.run(baseline(ns.url, n))
            else:
                base_rate = float("nan")
            cpu_before = 0.0
            others_before = others_cpu(pg, ns, receiver)
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "LOG_LEVEL": "WARNING",
                "WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
            }
            start = time.perf_counter()
            for i in range(processes):
                prefix = os.environ.get("BENCH_WORKER_PREFIX", "").split()
                workers.append(
                    subprocess.Popen(
                        [*prefix, sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"],
                        env={**env, "WORKER_NAME": f"bench-{i}"},
                    )
                )
            if rate:
                # Wait for the consumer, then publish at the given rate while the worker delivers.
                while conn.execute(
                    "SELECT count(*) FROM rule_nats_consumer_state WHERE present"
                ).fetchone() != (1,):
                    time.sleep(0.05)
                time.sleep(0.5)
                start = time.perf_counter()
                cpu_before = sum(proc_usage(w.pid)[0] for w in workers)
                others_before = others_cpu(pg, ns, receiver)
                asyncio.run(publish(ns.url, n, hook, rate=float(rate)))
            deadline = time.perf_counter() + 600
            stats: dict[str, Any] = {}
            # Worker CPU from the first delivery seen to the last: per message in steady state,
            # without the start-up (imports, migrations check, connections).
            first_seen: tuple[int, float] | None = (0, cpu_before) if rate else None
            others_first = others_before
            while time.perf_counter() < deadline:
                stats = get_stats(rport)
                if first_seen is None and stats["unique"] > 0:
                    first_seen = (stats["unique"], sum(proc_usage(w.pid)[0] for w in workers))
                    others_first = others_cpu(pg, ns, receiver)
                if stats["unique"] >= n:
                    break
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            usage = [proc_usage(w.pid) for w in workers]
            others_last = others_cpu(pg, ns, receiver)
            # The receiver has every id; the last outcomes may still be on their way to their COMMIT.
            settle_by = time.perf_counter() + 10.0
            while True:
                recorded = conn.execute(
                    "SELECT count(*) FILTER (WHERE outcome = 'delivered'), count(*) FROM rule_nats_delivery_attempts"
                ).fetchone()
                if (recorded and recorded[0] >= n) or time.perf_counter() > settle_by:
                    break
                time.sleep(0.05)
        missing = n - stats.get("unique", 0)
        return {
            "scenario": name,
            "processes": processes,
            "messages": n,
            "seconds": round(elapsed, 2),
            "deliveries_per_s": round(n / (stats["last_at"] - stats["first_at"]))
            if stats.get("first_at")
            else None,
            "wall_per_s_incl_startup": round(n / elapsed),
            "baseline_per_s": round(base_rate) if base_rate == base_rate else None,
            "ratio_to_baseline": round(n / (stats["last_at"] - stats["first_at"]) / base_rate, 3)
            if stats.get("first_at") and base_rate == base_rate
            else None,
            "duplicates": stats.get("duplicates"),
            "missing": missing,
            "p50_ms": stats.get("p50_ms"),
            "p99_ms": stats.get("p99_ms"),
            "worker_cpu_s": round(sum(u[0] for u in usage), 2),
            "cpu_ms_per_msg": round(
                (sum(u[0] for u in usage) - first_seen[1]) / max(1, n - first_seen[0]) * 1000.0, 3
            )
            if first_seen
            else None,
            # The same for the other processes on the machine: on 2 cores their CPU per message
            # bounds the throughput as much as the worker's does.
            "others_cpu_ms_per_msg": {
                k: round(
                    (others_last[k] - others_first[k])
                    / max(1, n - (first_seen[0] if first_seen else 0))
                    * 1000,
                    3,
                )
                for k in others_last
            },
            "peak_rss_mb": round(max(u[1] for u in usage) / 2**20, 1),
            "recorded_delivered": recorded[0] if recorded else None,
            "recorded_attempts": recorded[1] if recorded else None,
        }
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        receiver.terminate()
        receiver.wait(10)
        ns.cleanup()
        pg.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all"])
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument(
        "--messages", type=int, help="instead of the scenario's count (e.g. a longer run to profile)"
    )
    args = ap.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        result = run_scenario(name, args.processes, args.messages)
        print(json.dumps(result))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
