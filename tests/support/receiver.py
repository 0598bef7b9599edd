"""A real HTTP receiver on loopback that records requests (for delivery tests and benchmarks).

It runs an aiohttp server in a background thread with its own event loop, so
both synchronous and asynchronous tests can use it. Behaviour per request is
decided by ``responder``: a function from the recorded request to
``Response(status, delay, body, headers)``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float


@dataclass(frozen=True)
class Response:
    status: int = 200
    delay: float = 0.0
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    drip: float = 0.0  # > 0: send the body one byte every this many seconds (a dripping endpoint)


Responder = Callable[[Request], Response]


class Receiver:
    def __init__(self, responder: Responder | None = None, record: bool = True) -> None:
        self.responder: Responder = responder or (lambda _req: Response())
        self.record = record
        self.requests: list[Request] = []
        self.count = 0
        # Requests being answered now, and the most at once: what a concurrency limit bounds,
        # counted from the requests themselves rather than inferred from arrival times.
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = Request(request.method, request.path_qs, dict(request.headers), body, time.monotonic())
        with self._lock:
            self.count += 1
            if self.record:
                self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, req)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, request: web.Request, req: Request) -> web.StreamResponse:
        resp = self.responder(req)
        if resp.delay:
            await asyncio.sleep(resp.delay)
        if resp.drip:
            out = web.StreamResponse(status=resp.status, headers=resp.headers)
            out.content_length = len(resp.body)
            await out.prepare(request)
            for i in range(len(resp.body)):
                await out.write(resp.body[i : i + 1])
                await asyncio.sleep(resp.drip)
            await out.write_eof()
            return out
        return web.Response(status=resp.status, body=resp.body, headers=resp.headers)

    def start(self) -> Receiver:
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                app = web.Application(client_max_size=64 * 1024 * 1024)
                app.router.add_route("*", "/{tail:.*}", self._handle)
                runner = web.AppRunner(app, access_log=None)
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
                loop.run_until_complete(site.start())
                server = site._server
                assert server is not None
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                self._runner = runner
            except BaseException as exc:
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="http-receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def longest_gap(self) -> float:
        """The longest time between two consecutive requests: how long delivery stalled (a figure
        the fault tests report, not assert on)."""
        times = sorted(r.received_at for r in self.snapshot())
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Request]:
        """Wait until at least n requests arrived; return what arrived either way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.count >= n:
                    break
            time.sleep(0.02)
        return self.snapshot()


def ids(receiver: Receiver, path: str | None = None) -> list[int]:
    """The ``data.id`` of each request received (on ``path`` only, if given), in arrival order."""
    return [json.loads(r.body)["id"] for r in receiver.snapshot() if path is None or r.path == path]
