"""A webhook receiver in its own process for the delivery benchmark (loopback only).

    python bench/receiver_proc.py PORT DELAY_MS FAIL_PERCENT

Counts requests by event id (duplicates), fails FAIL_PERCENT% of ids once with 503, and
measures publish-to-delivery latency from the "ts" field of the body. GET /stats returns
the figures as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


def main() -> None:
    port, delay_ms, fail_pct = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    seen: dict[int, int] = {}
    failed_once: set[int] = set()
    latencies: list[float] = []
    span = [0.0, 0.0]  # wall-clock time of the first and the latest successful delivery

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        doc = json.loads(body)
        event = int(doc["id"])
        if "ts" in doc:
            latencies.append((time.time() - float(doc["ts"])) * 1000.0)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000.0)
        if fail_pct and event % int(100 / fail_pct) == 0 and event not in failed_once:
            failed_once.add(event)
            return web.Response(status=503)
        seen[event] = seen.get(event, 0) + 1
        now = time.time()
        if not span[0]:
            span[0] = now
        span[1] = now
        return web.Response(text="ok")

    async def stats(_: web.Request) -> web.Response:
        lat = sorted(latencies)

        def pct(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(len(lat) * p))] if lat else None

        return web.json_response(
            {
                "unique": len(seen),
                "total": sum(seen.values()),
                "duplicates": sum(v - 1 for v in seen.values()),
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "first_at": span[0],
                "last_at": span[1],
                "ids": sorted(seen),
            }
        )

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
