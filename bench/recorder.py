"""What one recorder batch costs the worker's process: the attempt rows of a batch of deliveries
written by COPY inside BEGIN/COMMIT (how every batch was written before) against the same COPY in
autocommit (what the recorder does now for a batch holding only attempt rows: a COPY is one
transaction by itself).

    .venv/bin/python bench/recorder.py [--rows 30] [--batches 300] [--rounds 3]

Starts a private PostgreSQL (fsync on) and migrates it. Prints, per round and variant, the CPU
time of this process per batch (client side only: the server's work is not counted) and the
wall time per batch, then the median ratio autocommit / transaction of the same rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402
from psycopg_pool import AsyncConnectionPool  # noqa: E402

from sidecar.migrate import migrate  # noqa: E402
from sidecar.poison import storable_row  # noqa: E402
from sidecar.recorder import COPY_ATTEMPTS  # noqa: E402
from sidecar.rows import AttemptRow, log_row  # noqa: E402
from tests.support.stack import PostgresCluster  # noqa: E402


def rows(batch: int, n: int) -> list[tuple[Any, ...]]:
    now = dt.datetime.now(dt.UTC)
    url = "http://127.0.0.1:9/hook"
    out = []
    for i in range(n):
        row = AttemptRow(now, f"m-{batch}-{i}", "DELIVER", "workers", batch * n + i, "bench.deliver", None,
                         url, 1, "delivered", 200, 1.2, None, None, None, "bench", None)  # fmt: skip
        out.append(storable_row(log_row(row, 1)))  # as the recorder writes it: route 1
    return out


async def in_transaction(pool: AsyncConnectionPool[Any], batch: list[tuple[Any, ...]]) -> None:
    async with pool.connection() as conn, conn.transaction(), conn.cursor().copy(COPY_ATTEMPTS) as copy:
        for row in batch:
            await copy.write_row(row)


async def in_autocommit(pool: AsyncConnectionPool[Any], batch: list[tuple[Any, ...]]) -> None:
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            async with conn.cursor().copy(COPY_ATTEMPTS) as copy:
                for row in batch:
                    await copy.write_row(row)
        finally:
            await conn.set_autocommit(False)


async def run(url: str, n: int, batches: int, rounds: int) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=2, max_size=2, open=False)
    await pool.open()
    await pool.wait()
    variants = {"transaction": in_transaction, "autocommit": in_autocommit}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    k = 0
    for r in range(rounds):
        for name, write in variants.items():
            data = [rows(k + b, n) for b in range(batches)]
            k += batches
            c0, w0 = time.process_time(), time.perf_counter()
            for batch in data:
                await write(pool, batch)
            c, w = time.process_time() - c0, time.perf_counter() - w0
            cpu[name].append(c / batches)
            print(
                f"round {r + 1} {name:12s} CPU {c / batches * 1e6:6.0f} us/batch  wall {w / batches * 1e6:6.0f} us/batch"
            )
    await pool.close()
    ratios = [a / t for a, t in zip(cpu["autocommit"], cpu["transaction"], strict=True)]
    print(f"autocommit / transaction, CPU per batch of {n} rows: median {statistics.median(ratios):.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=int, default=30, help="rows per batch (the fast scenario commits about 30)"
    )
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pg = PostgresCluster(Path(tempfile.mkdtemp(prefix="bench-recorder-")) / "pg", durable=True)
    try:
        pg.init()
        pg.start()
        migrate(pg.url())
        uvloop.run(run(pg.url(), args.rows, args.batches, args.rounds))
    finally:
        pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
