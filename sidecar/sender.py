"""Sending a delivery's request (I/O) over the project's own HTTP/1.1 client (``sidecar.http1``:
keep-alive pool per policy, no redirects, capped response reads), which measured cheaper per request
than aiohttp, httpx and the Rust-backed clients that keep every guarantee (docs/delivery.md, "The
HTTP client"); and what the answer means (``classify_status``)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import zlib
from dataclasses import dataclass

from sidecar.cache import BoundedMap
from sidecar.errors import HttpError
from sidecar.http1 import CONNECT_SECONDS, Connection, Pool, ResponseParser, Target, encode_head
from sidecar.request import Request
from sidecar.resolver import PolicyResolver, Resolver, SystemResolver
from sidecar.ssrf import BlockedAddress, NetworkPolicy
from sidecar.urls import URL_CACHE_BYTES, URL_CACHE_ENTRIES, URL_CACHE_ITEM

RESPONSE_BODY_LIMIT = 4096
DNS_TTL = 60.0  # seconds an answer is used, like aiohttp's DNS cache before
DNS_CACHE_ENTRIES = 1024


def classify_status(status: int) -> str:
    """delivered | retry | permanent for an HTTP status."""
    if 200 <= status < 300:
        return "delivered"
    if status >= 500 or status in (408, 429):
        return "retry"
    return "permanent"


@dataclass(slots=True)  # not frozen: see outcome.py
class Response:
    status: int | None
    latency_ms: float
    error: str | None = None
    body: str | None = None
    retry_after: str | None = None
    blocked: str | None = None  # the SSRF policy refused the address: a permanent failure


def body_text(chunk: bytes, encoding: str | None) -> str:
    """The start of a response body as text to store. A compressed body (sent although we asked for
    identity) is inflated up to the same limit; a truncated stream yields what inflates."""
    coding = (encoding or "identity").strip().lower()
    if coding in ("gzip", "x-gzip", "deflate"):
        # wbits 47: gzip or zlib header, detected; raw deflate as a fallback for broken servers.
        for wbits in (47, -15):
            try:
                inflated = zlib.decompressobj(wbits).decompress(chunk, RESPONSE_BODY_LIMIT)
            except zlib.error:
                continue
            return inflated.decode("utf-8", "replace")
        return f"<{len(chunk)}+ bytes of {coding}-encoded body that does not inflate>"
    if coding != "identity":
        return f"<{len(chunk)}+ bytes of {coding}-encoded body, not decoded>"
    return chunk.decode("utf-8", "replace")


class Sender:
    """All deliveries of the process, over ``sidecar.http1``: keep-alive connections per network
    policy, scheme, host and port (a connection is only reused under the policy that allowed its
    address), no redirects, no proxies (the environment's proxy variables are never read: a proxy
    would connect on our behalf to addresses the policy never saw), capped response reads.

    A name is resolved once (answers kept 60 s), the answer filtered by the policy
    (``PolicyResolver``) and connected to as it is: no second lookup can change where the request
    goes, and each address is checked again right before its connect. TLS verifies the name.
    ``resolver`` replaces the system resolver (tests map names to addresses with it).
    """

    def __init__(self, resolver: Resolver | None = None) -> None:
        self._resolver = resolver
        self._base: Resolver | None = None
        self._policies: dict[NetworkPolicy, PolicyResolver] = {}
        self._answers = BoundedMap[tuple[NetworkPolicy, str, int], tuple[float, list[str]]](
            DNS_CACHE_ENTRIES, DNS_CACHE_ENTRIES * 300, 300
        )
        self._pool: Pool | None = None

    async def start(self) -> None:
        self._base = self._resolver or SystemResolver()
        self._pool = Pool(self._resolve)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._answers.clear()

    async def _resolve(self, host: str, port: int, policy: NetworkPolicy) -> list[str]:
        """The addresses of ``host`` the policy allows (BlockedAddress when it allows none)."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]  # an address: checked right before connect
        key = (policy, host, port)
        loop = asyncio.get_running_loop()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        resolver = self._policies.get(policy)
        if resolver is None:
            assert self._base is not None, "Sender.start() first"
            resolver = self._policies[policy] = PolicyResolver(policy, self._base)
        results = await resolver.resolve(host, port, socket.AF_UNSPEC)
        addresses = [r["host"] for r in results]
        self._answers.put(key, (loop.time() + DNS_TTL, addresses), len(host))
        return addresses

    async def send(self, req: Request) -> Response:
        pool = self._pool
        assert pool is not None, "Sender.start() first"
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout
        conn: Connection | None = None
        parser: ResponseParser | None = None

        def failed(error: str, blocked: str | None = None) -> Response:
            return Response(None, (time.perf_counter() - start) * 1000.0, error, blocked=blocked)

        try:
            target = _target(req.url)
            key = (req.policy, target.tls, target.host, target.port)
            connect = min(req.timeout, CONNECT_SECONDS)
            try:
                conn = await pool.connect(key, connect)
            except TimeoutError:
                return failed(f"connect timeout after {connect:g} s")
            parser = ResponseParser(RESPONSE_BODY_LIMIT, head_only=req.method == "HEAD")
            waiter = conn.exchange(
                encode_head(req.method, target, req.headers, len(req.body)), req.body, parser
            )
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
            if parser.keep_alive:
                pool.give_back(key, conn)
            else:
                conn.close()
            conn = None
            return _response(parser, start)
        except (TimeoutError, HttpError) as exc:
            if parser is not None and parser.status:
                return _response(parser, start)  # the head is in: the body stalled or broke off
            if isinstance(exc, TimeoutError):
                return failed(f"timeout after {req.timeout:g} s")
            return failed(f"{type(exc).__name__}: {exc}")
        except BlockedAddress as exc:
            return failed(str(exc), blocked=exc.reason)
        except (OSError, ValueError) as exc:
            # Raised by resolving or connecting (nothing was sent): errno texts, no URL.
            return failed(f"connection failed: {exc}")
        finally:
            if conn is not None:
                conn.close()  # the exchange did not finish: the connection's state is unknown


def _response(parser: ResponseParser, start: float) -> Response:
    """The response as far as it was read. Once the head is in, its status is the endpoint's answer
    even if the body then stalls, breaks off or is malformed (the connection is dropped then): a 200
    whose body never ends was delivered, and sending it again would repeat it; an error keeps the
    part of its body that came."""
    status = parser.status
    headers = parser.headers
    return Response(
        status=status,
        latency_ms=(time.perf_counter() - start) * 1000.0,
        body=None if 200 <= status < 300 else body_text(bytes(parser.body), headers.get("content-encoding")),
        retry_after=headers.get("retry-after"),
    )


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


_targets = BoundedMap[str, Target](URL_CACHE_ENTRIES, URL_CACHE_BYTES, URL_CACHE_ITEM)


def _target(url: str) -> Target:
    target = _targets.get(url)
    if target is None:
        target = Target.parse(url)
        _targets.put(url, target, len(url))
    return target
