"""Which HTTP client for webhook delivery: candidates side by side, same run, same receiver.

    .venv/bin/python bench/http_clients.py [--requests 20000] [--concurrency 64] [--rounds 2]
        [--clients aiohttp,pyreqwest,...] [--extra-site DIR]

POSTs 1 KB bodies to a local receiver process (bench/receiver_proc.py) with N requests in
flight. Each client runs in a fresh process of its own (uvloop), the clients alternate within
each round, and aiohttp, the client delivery used before sidecar/http1.py, is the baseline of
every round. Printed per client: requests/s and CPU per request of the client's whole process (all
threads, so the Rust clients' tokio threads count), and both as ratios to aiohttp's figures of
the same round.

Clients whose package is not installed are skipped. The optional candidates are benchmark-only
and need not be in the project's environment: `pip install --target DIR aiosonic curl_cffi
pyqwest niquests`, then `--extra-site DIR` (appended to sys.path, after the project's packages).

``sender`` is the sidecar's own ``delivery.Sender`` from this checkout (sidecar/http1.py, policy
allowing loopback) as delivery uses it: to a host name, resolved once, checked and pinned, with
the SSRF checks, capped response reads and the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.stack import free_port, wait_for_port  # noqa: E402

Send = Callable[[bytes], Awaitable[None]]
HEADERS = {"Content-Type": "application/json"}


async def drive(send: Send, n: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    pad = "x" * 900

    async def one(i: int) -> None:
        async with sem:
            await send(json.dumps({"id": i, "pad": pad}).encode())

    await asyncio.gather(*(one(i) for i in range(n)))


async def with_aiohttp(url: str, n: int, c: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def send(body: bytes) -> None:
            async with session.post(url, data=body, headers=HEADERS) as r:
                await r.read()

        await drive(send, n, c)


async def with_httpx(url: str, n: int, c: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits) as client:

        async def send(body: bytes) -> None:
            r = await client.post(url, content=body, headers=HEADERS)
            r.read()

        await drive(send, n, c)


async def with_pyreqwest(url: str, n: int, c: int) -> None:
    """pyreqwest's native API, the whole response read (the spike of issue 12)."""
    from pyreqwest.client import ClientBuilder

    async with ClientBuilder().build() as client:

        async def send(body: bytes) -> None:
            r = await client.post(url).body_bytes(body).headers(HEADERS).build().send()
            await r.bytes()

        await drive(send, n, c)


async def with_pyreqwest_streamed(url: str, n: int, c: int) -> None:
    """pyreqwest as the Sender uses it: streamed response, at most 4 KB read, per-request timeout."""
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    timeout = timedelta(seconds=10)
    async with ClientBuilder().follow_redirects(False).no_proxy().build() as client:

        async def send(body: bytes) -> None:
            builder = client.post(url).body_bytes(body).headers(HEADERS).timeout(timeout)
            async with builder.streamed_read_buffer_limit(4097).build_streamed() as r:
                await r.body_reader.read(4096)

        await drive(send, n, c)


async def with_httpx_pyreqwest(url: str, n: int, c: int) -> None:
    """httpx's API over pyreqwest's httpx transport."""
    import httpx
    from pyreqwest.compatibility.httpx import HttpxTransport

    async with httpx.AsyncClient(transport=HttpxTransport()) as client:

        async def send(body: bytes) -> None:
            r = await client.post(url, content=body, headers=HEADERS)
            await r.aread()

        await drive(send, n, c)


async def with_pyqwest(url: str, n: int, c: int) -> None:
    """pyqwest (another Rust reqwest binding)."""
    from pyqwest import Client, HTTPTransport

    async with HTTPTransport(follow_redirects=False, enable_otel=False) as transport:
        client = Client(transport)

        async def send(body: bytes) -> None:
            await client.post(url, headers=HEADERS, content=body)

        await drive(send, n, c)


async def with_aiosonic(url: str, n: int, c: int) -> None:
    import aiosonic

    client = aiosonic.HTTPClient()

    async def send(body: bytes) -> None:
        r = await client.post(url, data=body, headers=HEADERS)
        await r.content()

    await drive(send, n, c)
    await client.aclose()


async def with_curl_cffi(url: str, n: int, c: int) -> None:
    from curl_cffi.requests import AsyncSession

    async with AsyncSession(max_clients=c) as session:

        async def send(body: bytes) -> None:
            await session.post(url, data=body, headers=HEADERS)

        await drive(send, n, c)


async def with_niquests(url: str, n: int, c: int) -> None:
    import niquests

    async with niquests.AsyncSession(pool_maxsize=c) as session:

        async def send(body: bytes) -> None:
            await session.post(url, data=body, headers=HEADERS)

        await drive(send, n, c)


async def with_sender(url: str, n: int, c: int) -> None:
    """The sidecar's delivery.Sender from this checkout (sidecar/http1.py), with its SSRF checks
    and capped reads, to a name ("localhost": resolved once, checked, pinned), as webhook URLs go."""
    from sidecar.delivery import Request, Sender
    from sidecar.ssrf import NetworkPolicy, parse_networks

    policy = NetworkPolicy(parse_networks("127.0.0.0/8,::1/128"))
    sender = Sender()
    await sender.start()
    url = url.replace("127.0.0.1", "localhost")

    async def send(body: bytes) -> None:
        resp = await sender.send(Request("POST", url, dict(HEADERS), body, 10.0, policy=policy))
        assert resp.status == 200, resp

    try:
        await drive(send, n, c)
    finally:
        await sender.close()


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[None]]] = {
    "aiohttp": with_aiohttp,
    "pyreqwest": with_pyreqwest,
    "pyreqwest-streamed": with_pyreqwest_streamed,
    "sender": with_sender,
    "httpx+pyreqwest": with_httpx_pyreqwest,
    "pyqwest": with_pyqwest,
    "aiosonic": with_aiosonic,
    "curl_cffi": with_curl_cffi,
    "niquests": with_niquests,
    "httpx": with_httpx,
}


def measure_here(name: str, url: str, n: int, c: int) -> dict[str, float]:
    """Run one client in this process and return its figures."""
    import uvloop

    fn = CLIENTS[name]
    # Connections and the client's own start-up are not what is measured: warm up first.
    uvloop.run(fn(url, min(n, 500), c))
    cpu0, t0 = time.process_time(), time.perf_counter()
    uvloop.run(fn(url, n, c))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"rps": n / wall, "cpu_ms": cpu / n * 1000.0}


def available(name: str, extra_site: str | None) -> bool:
    code = {
        "aiohttp": "aiohttp",
        "httpx": "httpx",
        "pyreqwest": "pyreqwest",
        "pyreqwest-streamed": "pyreqwest",
        "sender": "sidecar.delivery",
        "httpx+pyreqwest": "pyreqwest.compatibility.httpx",
        "pyqwest": "pyqwest",
        "aiosonic": "aiosonic",
        "curl_cffi": "curl_cffi",
        "niquests": "niquests",
    }[name]
    prelude = f"import sys; sys.path.append({extra_site!r}); " if extra_site else ""
    probe = subprocess.run(
        [sys.executable, "-c", f"{prelude}import {code}"], capture_output=True, cwd=REPO, check=False
    )
    return probe.returncode == 0


def run_one(name: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, __file__, "--one", name, "--url", url]
    argv += ["--requests", str(args.requests), "--concurrency", str(args.concurrency)]
    if args.extra_site:
        argv += ["--extra-site", args.extra_site]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--clients", default=",".join(CLIENTS), help="comma-separated, from: " + ", ".join(CLIENTS)
    )
    ap.add_argument("--extra-site", help="a directory with optional candidates (pip install --target)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.extra_site:
        sys.path.append(args.extra_site)
    if args.one:
        print(json.dumps(measure_here(args.one, args.url, args.requests, args.concurrency)))
        return 0

    wanted = ["aiohttp"] + [c for c in args.clients.split(",") if c and c != "aiohttp"]
    unknown = [c for c in wanted if c not in CLIENTS]
    if unknown:
        ap.error(f"unknown clients: {unknown}")
    names = [c for c in wanted if available(c, args.extra_site)]
    skipped = [c for c in wanted if c not in names]
    if skipped:
        print(f"skipped (not installed): {', '.join(skipped)}", flush=True)
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "receiver_proc.py"), str(port), "0", "0"]
    )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/hook"
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            # Alternate the order, so that no client always runs first or last.
            order = names if r % 2 == 0 else [names[0], *reversed(names[1:])]
            got = {name: run_one(name, url, args) for name in order}
            rounds.append(got)
            base = got["aiohttp"]
            print(
                f"\nround {r + 1}: {args.requests} POSTs of 1 KB, {args.concurrency} in flight, "
                "one client process each, uvloop"
            )
            print(f"{'client':20s} {'requests/s':>10s} {'CPU ms/req':>10s} {'x rate':>7s} {'x CPU':>6s}")
            for name in names:
                m = got[name]
                print(
                    f"{name:20s} {m['rps']:10.0f} {m['cpu_ms']:10.3f} "
                    f"{m['rps'] / base['rps']:7.2f} {m['cpu_ms'] / base['cpu_ms']:6.2f}",
                    flush=True,
                )
        print(f"\nmedian of {args.rounds} rounds (ratios to aiohttp are medians of the per-round ratios)")
        print(f"{'client':20s} {'requests/s':>10s} {'CPU ms/req':>10s} {'x rate':>7s} {'x CPU':>6s}")
        for name in names:
            rps = statistics.median(g[name]["rps"] for g in rounds)
            cpu = statistics.median(g[name]["cpu_ms"] for g in rounds)
            xr = statistics.median(g[name]["rps"] / g["aiohttp"]["rps"] for g in rounds)
            xc = statistics.median(g[name]["cpu_ms"] / g["aiohttp"]["cpu_ms"] for g in rounds)
            print(f"{name:20s} {rps:10.0f} {cpu:10.3f} {xr:7.2f} {xc:6.2f}")
        return 0
    finally:
        receiver.terminate()
        receiver.wait(10)


if __name__ == "__main__":
    sys.exit(main())
