"""A pinned sender on pyreqwest (Rust reqwest + tokio): measured, tested, not used by the worker.

Same interface as ``delivery.Sender`` (``start``, ``send(Request) -> Response``, ``close``) and
the same guarantees but one: pyreqwest 0.15 writes HTTP/1 header names in its own case (title
case, or all lower case), never as given, while the worker sends them as built ("webhook-id",
"Content-Type", a registry's "X-API-Key") and tests/e2e/test_safety.py and test_delivery.py
check that on the wire. So delivery stays on aiohttp (``delivery.Sender``); this one is
what replaces it when the client can send header names as given (docs/delivery.md, "The HTTP
client", has the figures: 1.2x aiohttp's requests/s at 0.6x its CPU per request, pinned, and
the other difference: rustls offers no CBC or DHE cipher suites, so endpoints limited to those
fail the handshake).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import ConnectError, ConnectTimeoutError, RequestError, RequestTimeoutError
from pyreqwest.http import Url

from sidecar.delivery import RESPONSE_BODY_LIMIT, PolicyResolver, Request, Response, body_text
from sidecar.ssrf import BlockedAddress, NetworkPolicy, check_address
from sidecar.validation import redact_urls_in

USER_AGENT = "pg-nats-webhook-worker"
CONNECT_TIMEOUT = 10.0  # with the request's total timeout, as min(total, 10) before
KEEPALIVE_SECONDS = 30.0  # an idle pooled connection is closed after this
PIN_SECONDS = 60.0  # a checked DNS answer is used this long, then the name is resolved again
# A pinned client costs about 115 KB and 3.5 ms of CPU to build (pyreqwest loads the system's
# root certificates for each client): at most this many are kept, the oldest pin goes first.
MAX_PINS = 256


@functools.lru_cache(maxsize=64)
def _timedelta(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _client(host: str | None = None, address: str | None = None) -> Client:
    """A client that connects ``host`` to ``address`` and nothing else (pyreqwest's static DNS
    override; the port stays the URL's), or, without a host, one for URLs that name an IP address.
    TLS (SNI, certificate verification) is on the URL's host name, as is the Host header."""
    builder = (
        ClientBuilder()
        .user_agent(USER_AGENT)
        # Response bodies are stored as text: ask for them unencoded, and decode nothing (see
        # body_text for servers that compress anyway).
        .default_headers({"Accept-Encoding": "identity"})
        .gzip(False)
        .brotli(False)
        .zstd(False)
        .deflate(False)
        .follow_redirects(False)
        .referer(False)
        # A proxy would connect on our behalf to addresses the policy never saw: none, and
        # HTTP(S)_PROXY / ALL_PROXY from the environment are ignored.
        .no_proxy()
        .connect_timeout(_timedelta(CONNECT_TIMEOUT))
        .pool_idle_timeout(_timedelta(KEEPALIVE_SECONDS))
    )
    if host is not None and address is not None:
        builder = builder.resolve(host, address, 0)
    return builder.build()


@dataclass(slots=True)
class _Pin:
    """Where a host name leads under one policy: its checked addresses, a client pinned to each
    (built when first needed), and the one that answered last. A pin replaced by a newer answer or
    evicted is retired: its clients are closed once its last request has finished (but those the
    newer pin took over)."""

    addresses: tuple[str, ...]
    clients: list[Client | None]
    expires: float
    current: int = 0
    in_flight: int = 0
    retired: bool = False
    successor: _Pin | None = None


class _Failed(Exception):
    """A request that got no response: the text to record, and whether nothing was sent (so that
    the next address may be tried)."""

    def __init__(self, error: str, connect: bool = False, timeout: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.connect = connect
        self.timeout = timeout


def _causes(exc: RequestError) -> list[str]:
    causes = exc.details.get("causes") if isinstance(exc.details, dict) else None
    return [str(c.get("message", "")) for c in causes or ()]


class PinnedSender:
    """``delivery.Sender``'s interface on pyreqwest (Rust reqwest), every connection pinned.

    Every URL is parsed as the client parses it. A host that is an IP address is checked against
    the request's policy; a host name is resolved here (``resolver`` replaces the system resolver,
    as tests do), each address is checked, and the request goes through a client whose DNS is
    overridden to map that name to one checked address: the client never resolves a name itself,
    so no answer can change between the check and the connect. The name, not the address, stays in
    the URL: Host header, TLS SNI and certificate verification are as without pinning. Clients are
    kept per (policy, host name, address), so a keep-alive connection is only reused under the
    policy that allowed it; an answer is used for PIN_SECONDS, then the name is resolved again.
    When an address refuses the connection, the name's next address is tried within the timeout.
    """

    def __init__(self, resolver: AbstractResolver | None = None) -> None:
        self._resolver = resolver
        self._policy_resolvers: dict[NetworkPolicy, PolicyResolver] = {}
        self._pins: dict[tuple[NetworkPolicy, str], _Pin] = {}
        self._resolving: dict[tuple[NetworkPolicy, str], asyncio.Future[_Pin]] = {}
        self._literal: Client | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        clients = [c for pin in self._pins.values() for c in pin.clients if c is not None]
        if self._literal is not None:
            clients.append(self._literal)
        resolvers = list(self._policy_resolvers.values())
        self._pins, self._literal, self._policy_resolvers = {}, None, {}
        for client in clients:
            await client.close()
        if self._closing:
            await asyncio.wait(list(self._closing))
        if resolvers:
            await resolvers[0].close()  # they share one base resolver
        if clients:
            # pyreqwest's runtime thread finishes closing in the background, holding the GIL for a
            # moment: a process that ends meanwhile can abort in interpreter finalization (CPython
            # 3.11; 6 of 30 exits right after close, none of 30 after a 10 ms pause).
            await asyncio.sleep(0.1)
        self._started = False

    async def send(self, req: Request) -> Response:
        assert self._started, "Sender.start() first"
        start = time.perf_counter()
        try:
            url = Url(req.url)
        except ValueError as exc:
            return self._failed(start, redact_urls_in(f"invalid URL: {exc}"))
        host = url.domain
        try:
            if host is None:
                check_address((url.host_str or "").strip("[]"), req.policy)
                return await self._exchange(self._literal_client(), url, req, req.timeout, start)
            pin = self._pins.get((req.policy, host))
            if pin is None or pin.expires <= time.monotonic():
                pin = await self._pin(req.policy, host, url.port_or_known_default or 0)
            while pin.retired:  # replaced or evicted while this request waited for it
                pin = await self._pin(req.policy, host, url.port_or_known_default or 0)
        except BlockedAddress as exc:
            return Response(None, (time.perf_counter() - start) * 1000.0, str(exc), blocked=exc.reason)
        except _Failed as exc:
            return self._failed(start, f"timeout after {req.timeout:g} s" if exc.timeout else exc.error)
        except OSError as exc:  # the name does not resolve
            return self._failed(start, redact_urls_in(f"connection failed: {exc}"))
        pin.in_flight += 1
        try:
            return await self._send_pinned(pin, host, url, req, start)
        finally:
            self._release(pin)

    async def _send_pinned(self, pin: _Pin, host: str, url: Url, req: Request, start: float) -> Response:
        deadline = start + req.timeout
        first = pin.current
        for k in range(len(pin.addresses)):
            i = (first + k) % len(pin.addresses)
            client = pin.clients[i]
            if client is None:
                client = pin.clients[i] = _client(host, pin.addresses[i])
            seconds = req.timeout if k == 0 else deadline - time.perf_counter()
            try:
                response = await self._exchange(client, url, req, seconds, start)
            except _Failed as exc:
                if exc.connect and k + 1 < len(pin.addresses) and deadline - time.perf_counter() > 0:
                    continue  # nothing was sent: try the name's next address
                return self._failed(start, f"timeout after {req.timeout:g} s" if exc.timeout else exc.error)
            pin.current = i
            return response
        raise AssertionError("a pin has at least one address")  # pragma: no cover

    @staticmethod
    def _failed(start: float, error: str) -> Response:
        return Response(None, (time.perf_counter() - start) * 1000.0, error)

    async def _exchange(
        self, client: Client, url: Url, req: Request, seconds: float, start: float
    ) -> Response:
        """One HTTP exchange; the start of the body is read for failed attempts, never more than
        RESPONSE_BODY_LIMIT (a longer body ends the connection instead of being read)."""
        builder = (
            client.request(req.method, url)
            .headers(req.headers)
            .body_bytes(req.body)
            .timeout(_timedelta(max(seconds, 0.001)))
            # What the client reads before returning: all of a small body (so that the connection
            # goes back to the pool at once), the first RESPONSE_BODY_LIMIT + 1 bytes of a large one.
            .streamed_read_buffer_limit(RESPONSE_BODY_LIMIT + 1)
        )
        try:
            async with builder.build_streamed() as resp:
                status = resp.status
                body = None
                if not 200 <= status < 300:
                    chunk = await resp.body_reader.read(RESPONSE_BODY_LIMIT)
                    body = body_text(bytes(chunk or b""), resp.get_header("Content-Encoding"))
                return Response(
                    status=status,
                    latency_ms=(time.perf_counter() - start) * 1000.0,
                    body=body,
                    retry_after=resp.get_header("Retry-After"),
                )
        except RequestTimeoutError as exc:
            raise _Failed("timeout", connect=isinstance(exc, ConnectTimeoutError), timeout=True) from None
        except ConnectError as exc:
            causes = _causes(exc)
            raise _Failed(
                redact_urls_in(f"connection failed: {causes[-1] if causes else exc.message}"), True
            ) from None
        except RequestError as exc:
            # reqwest quotes the URL in its errors: its query may hold a token.
            text = ": ".join([exc.message, *_causes(exc)])
            raise _Failed(redact_urls_in(f"{type(exc).__name__}: {text}")) from None

    def _literal_client(self) -> Client:
        if self._literal is None:
            self._literal = _client()
        return self._literal

    def _policy_resolver(self, policy: NetworkPolicy) -> PolicyResolver:
        resolver = self._policy_resolvers.get(policy)
        if resolver is None:
            if self._resolver is None:
                self._resolver = DefaultResolver()
            resolver = self._policy_resolvers[policy] = PolicyResolver(policy, self._resolver)
        return resolver

    async def _pin(self, policy: NetworkPolicy, host: str, port: int) -> _Pin:
        """The pin for a name under a policy, resolved once for all the requests that wait for it."""
        key = (policy, host)
        pending = self._resolving.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve_pin(policy, host, port))
            self._resolving[key] = pending
            pending.add_done_callback(lambda _: self._resolving.pop(key, None))
        return await asyncio.shield(pending)

    async def _resolve_pin(self, policy: NetworkPolicy, host: str, port: int) -> _Pin:
        results = await self._policy_resolver(policy).resolve(host, port, socket.AF_UNSPEC)
        # Checked again here, on exactly the strings the clients will connect to: the filtered
        # lookup above is the rule, this is the guard should anything get past it.
        addresses: list[str] = []
        first: BlockedAddress | None = None
        for r in results:
            address = r["host"]
            try:
                check_address(address, policy)
            except BlockedAddress as exc:
                first = first or exc
                continue
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise first or OSError(f"{host} did not resolve")
        key = (policy, host)
        old = self._pins.get(key)
        kept = {} if old is None else dict(zip(old.addresses, old.clients, strict=True))
        clients = [kept.get(a) for a in addresses]
        if clients[0] is None:
            # Off the event loop: the build reads the system's root certificates.
            clients[0] = await asyncio.to_thread(_client, host, addresses[0])
        pin = _Pin(tuple(addresses), clients, time.monotonic() + PIN_SECONDS)
        old = self._pins.pop(key, None)
        if old is not None:
            self._retire(old, successor=pin)
        while len(self._pins) >= MAX_PINS:
            self._retire(self._pins.pop(next(iter(self._pins))))
        self._pins[key] = pin
        return pin

    def _release(self, pin: _Pin) -> None:
        pin.in_flight -= 1
        if pin.retired and not pin.in_flight:
            self._close_retired(pin)

    def _retire(self, pin: _Pin, successor: _Pin | None = None) -> None:
        pin.retired, pin.successor = True, successor
        if not pin.in_flight:
            self._close_retired(pin)

    def _close_retired(self, pin: _Pin) -> None:
        kept = pin.successor.clients if pin.successor is not None else []
        for client in pin.clients:
            if client is not None and not any(client is k for k in kept):
                task = asyncio.ensure_future(client.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        pin.clients = []
