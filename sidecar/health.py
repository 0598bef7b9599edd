"""/healthz, /readyz and /metrics over HTTP (``--metrics-addr``), on asyncio streams.

Three GET routes answered in one response per connection need no web framework: this server
reads a bounded request head within a deadline, answers and closes (Prometheus and the image's
HEALTHCHECK open a connection per scrape anyway). It replaced aiohttp's, the last use of aiohttp
in the worker besides its resolver interface (docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.metrics import Component, Metrics, parse_addr_range

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192  # a request head larger than this is answered 431 and the connection closed
REQUEST_SECONDS = 10.0  # a client that has not sent its request head by then is dropped
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}
REASONS |= {400: "Bad Request", 503: "Service Unavailable"}
TEXT = "text/plain; charset=utf-8"


class HealthServer:
    """/healthz: the process and its event loop answer. /readyz: each component by name with ok and
    its problem (503 when any is not ok): PostgreSQL, each NATS connection, recording, each wanted
    consumer, the configuration and the background tasks. /metrics: Prometheus text."""

    def __init__(
        self,
        addr: str,
        metrics: Metrics,
        readiness: Callable[[], list[Component]],
        addr_file: str | None = None,
    ) -> None:
        self.host, self.ports = parse_addr_range(addr)
        self.port = self.ports[0]
        self.metrics = metrics
        self.readiness = readiness
        # where the bound address is written (METRICS_ADDR_FILE): the image's HEALTHCHECK reads it
        self.addr_file = addr_file
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        for i, port in enumerate(self.ports):
            try:
                self._server = await asyncio.start_server(
                    self._serve, self.host, port, limit=MAX_REQUEST_HEAD
                )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or i == len(self.ports) - 1:
                    raise
                continue
            self.port = port
            break
        self._write_addr_file(bound=True)
        logger.info(
            "health and metrics on http://%s:%d (/healthz /readyz /metrics)",
            self.host,
            self.port,
            extra={"action": "metrics_listening"},
        )

    def _write_addr_file(self, bound: bool) -> None:
        """The address bound (a few bytes, written once): a port range makes it unknowable outside."""
        if not self.addr_file:
            return
        if bound:
            host = f"[{self.host}]" if ":" in self.host else self.host
            Path(self.addr_file).write_text(f"{host}:{self.port}\n")
        else:
            Path(self.addr_file).unlink(missing_ok=True)

    async def stop(self) -> None:
        self._write_addr_file(bound=False)
        if self._server is not None:
            self._server.close()
            for writer in list(self._clients):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body, method = self._answer(head)
        except (asyncio.LimitOverrunError, ValueError):
            status, ctype, body, method = 431, TEXT, b"request head too large\n", "GET"
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            self._clients.discard(writer)
            writer.transport.abort()
            return
        reply = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        try:
            writer.write(reply if method == "HEAD" else reply + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, str, bytes, str]:
        """(status, content type, body, method) for one request head."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, TEXT, b"bad request\n", "GET"
        method = parts[0].decode("latin-1")
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/healthz", b"/readyz", b"/metrics"):
            return 404, TEXT, b"404: Not Found\n", method
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"405: Method Not Allowed\n", method
        if path == b"/healthz":
            return 200, TEXT, b"ok\n", method
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render(), method
        components = self.readiness()
        problems = [c.problem or f"{c.name} is not ready" for c in components if not c.ok]
        doc: dict[str, Any] = {
            "ready": not problems,
            "problems": problems,
            "components": [c.as_json() for c in components],
        }
        body = (json.dumps(doc) + "\n").encode()
        return 200 if not problems else 503, "application/json; charset=utf-8", body, method
