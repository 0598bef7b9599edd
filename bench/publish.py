"""Benchmark: publishing to JetStream from SQL, against baselines measured in the same run.

    .venv/bin/python bench/publish.py [--messages 10000] [--outbox 50000] [--rounds 3]
    NATS_SERVER_BIN=/usr/sbin/nats-server .venv/bin/python bench/publish.py   # another server

Starts its own PostgreSQL (durable: fsync on) and nats-server (JetStream file storage).
Each figure is the median of --rounds runs, interleaved with the baselines, because this
machine is noisy; ratios to the baselines are what to compare between machines.

Baselines: nats-py's js.publish in a loop (per-message ack), and the standard-library
protocol client that runs inside PostgreSQL (plpython/pgnats.py) driven directly from
Python: the round-trip limit with no PostgreSQL involved.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.stack import NatsServer, PostgresCluster  # noqa: E402

PAYLOAD = json.dumps(
    {"event": "order.created", "order_id": 12345, "customer": "c-42", "items": [1, 2, 3], "pad": "x" * 100}
)


def _pgnats():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("pgnats_bench", REPO / "plpython" / "pgnats.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def _nats_py_loop(url: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    body = PAYLOAD.encode()
    start = time.perf_counter()
    for _ in range(n):
        await js.publish("bench.base", body)
    elapsed = time.perf_counter() - start
    await nc.close()
    return n / elapsed


def nats_py_loop(url: str, n: int) -> float:
    return asyncio.run(_nats_py_loop(url, n))


def stdlib_loop(url: str, n: int) -> float:
    client = _pgnats().Client([url])
    client.connect()
    body = PAYLOAD.encode()
    start = time.perf_counter()
    for _ in range(n):
        client.publish("bench.raw", body)
    elapsed = time.perf_counter() - start
    client.close()
    return n / elapsed


def sql_loop(conn: psycopg.Connection, n: int) -> float:
    start = time.perf_counter()
    conn.execute(
        "SELECT count(rule_nats_publish('bench.sql', %s::jsonb)) FROM generate_series(1, %s)", (PAYLOAD, n)
    )
    return n / (time.perf_counter() - start)


def client_loop(conn: psycopg.Connection, n: int) -> float:
    # One statement per publish from the client, in one transaction (autocommit would add a
    # WAL flush per call and measure the disk instead).
    start = time.perf_counter()
    with conn.transaction():
        for _ in range(n):
            conn.execute("SELECT rule_nats_publish('bench.rt', %s::jsonb)", (PAYLOAD,))
    return n / (time.perf_counter() - start)


def add_stream(url: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(name="BENCH", subjects=["bench.>"])
        await nc.close()

    asyncio.run(go())


def relay(url: str, conn: psycopg.Connection, m: int) -> tuple[float, float, float]:
    """(insert rows/s, relay msg/s from first to last publish, total seconds incl. start-up)."""
    conn.execute("DELETE FROM rule_nats_publish_history WHERE triggered_by = 'outbox'")
    start = time.perf_counter()
    with conn.transaction():
        conn.execute(
            "SELECT count(rule_nats_publish_on_commit('bench.outbox', %s::jsonb)) FROM generate_series(1, %s)",
            (PAYLOAD, m),
        )
    insert_rate = m / (time.perf_counter() - start)
    env = {"DATABASE_URL": url, "WORKER_NAME": "bench-relay", "LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"], env=env
    )
    try:
        while True:
            row = conn.execute("SELECT count(*) FROM rule_nats_outbox WHERE status = 'pending'").fetchone()
            if row and row[0] == 0:
                break
            if time.perf_counter() - start > 300:
                raise TimeoutError("relay did not finish in 300 s")
            time.sleep(0.02)
        total = time.perf_counter() - start
        # From the first to the last publish: the sidecar's start-up is not relay throughput.
        span = conn.execute(
            "SELECT extract(epoch FROM max(published_at) - min(published_at)) FROM rule_nats_publish_history "
            "WHERE triggered_by = 'outbox'"
        ).fetchone()
    finally:
        proc.terminate()
        proc.wait(30)
    return insert_rate, m / float(span[0]) if span and span[0] else float("nan"), total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--outbox", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    pg = PostgresCluster(base / "pg", durable=True)
    ns = NatsServer(base / "nats")
    pg.start()
    ns.start()
    try:
        url = pg.url()
        migrate.migrate(url)
        add_stream(ns.url)
        figures: dict[str, list[float]] = {}
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (ns.url,))
            # SQL publishes reach registered streams only (publish_registered_subjects_only).
            conn.execute(
                "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('BENCH', '{bench.>}')"
            )
            conn.execute(
                "SELECT rule_nats_publish('bench.warm', %s::jsonb)", (PAYLOAD,)
            )  # load module, connect
            n = args.messages
            for _ in range(args.rounds):
                figures.setdefault("nats_py", []).append(nats_py_loop(ns.url, n))
                figures.setdefault("stdlib", []).append(stdlib_loop(ns.url, n))
                figures.setdefault("sql", []).append(sql_loop(conn, n))
                figures.setdefault("client", []).append(client_loop(conn, min(n, 5000)))
            for _ in range(max(1, args.rounds - 1)):
                ins, rel, total = relay(url, conn, args.outbox)
                figures.setdefault("insert", []).append(ins)
                figures.setdefault("relay", []).append(rel)
                figures.setdefault("relay_total", []).append(total)
        med = {k: statistics.median(v) for k, v in figures.items()}
        version = subprocess.run([ns.binary, "--version"], capture_output=True, text=True).stdout.strip()
        print(
            f"2 cores; payload {len(PAYLOAD)} bytes; PostgreSQL fsync on; {version}, file storage; "
            f"median of {args.rounds} rounds"
        )
        print(f"baseline A: nats-py js.publish loop, per-message ack  : {med['nats_py']:8.0f} msg/s")
        print(f"baseline B: stdlib protocol client, no PostgreSQL      : {med['stdlib']:8.0f} msg/s")
        for key, label in [
            ("sql", "rule_nats_publish, SQL loop in one statement"),
            ("client", "rule_nats_publish, one client statement each"),
        ]:
            print(
                f"{label:<55}: {med[key]:8.0f} msg/s  ({med[key] / med['nats_py']:.2f}x A, "
                f"{med[key] / med['stdlib']:.2f}x B)"
            )
        print(f"{'rule_nats_publish_on_commit (outbox INSERT)':<55}: {med['insert']:8.0f} rows/s")
        print(
            f"{'outbox relay to JetStream, first to last publish':<55}: {med['relay']:8.0f} msg/s  "
            f"({med['relay'] / med['nats_py']:.2f}x A; {args.outbox} rows in {med['relay_total']:.1f} s "
            f"incl. start-up)"
        )
        print("all rounds:", json.dumps({k: [round(x) for x in v] for k, v in figures.items()}))
        return 0
    finally:
        ns.cleanup()
        pg.cleanup()


if __name__ == "__main__":
    sys.exit(main())
