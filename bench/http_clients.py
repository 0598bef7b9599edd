"""Which HTTP client for webhook delivery: httpx vs aiohttp, same run, same receiver.

    .venv/bin/python bench/http_clients.py [--requests 5000] [--concurrency 64]

POSTs 1 KB bodies to a local receiver process (bench/receiver_proc.py) with N requests in
flight, and prints requests/s and the client's CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from tests.support.stack import free_port, wait_for_port  # noqa: E402


async def drive(send, n: int, concurrency: int) -> None:  # type: ignore[no-untyped-def]
    sem = asyncio.Semaphore(concurrency)
    pad = "x" * 900

    async def one(i: int) -> None:
        async with sem:
            await send(json.dumps({"id": i, "pad": pad}).encode())

    await asyncio.gather(*(one(i) for i in range(n)))


async def with_aiohttp(url: str, n: int, c: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def send(body: bytes) -> None:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()

        await drive(send, n, c)


async def with_httpx(url: str, n: int, c: int) -> None:
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits) as client:

        async def send(body: bytes) -> None:
            r = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            r.read()

        await drive(send, n, c)


def measure(fn, url: str, n: int, c: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    cpu0, t0 = time.process_time(), time.perf_counter()
    runner(fn(url, n, c))
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "receiver_proc.py"), str(port), "0", "0"]
    )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/hook"
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(2):
            for name, fn in (("aiohttp", with_aiohttp), ("httpx", with_httpx)):
                results.setdefault(name, []).append(measure(fn, url, args.requests, args.concurrency))
        for name, runs in results.items():
            best = max(runs)
            print(
                f"{name:8s}: {best[0]:7.0f} requests/s, {best[1]:.2f} ms client CPU per request "
                f"({args.concurrency} in flight, best of {len(runs)})"
            )
        ratio = max(results["aiohttp"])[0] / max(results["httpx"])[0]
        print(f"aiohttp/httpx throughput ratio: {ratio:.1f}x")
        return 0
    finally:
        receiver.terminate()
        receiver.wait(10)


if __name__ == "__main__":
    sys.exit(main())
