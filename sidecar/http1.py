"""The HTTP/1.1 client webhook delivery uses: one request per keep-alive connection at a time, to
an address the network policy has checked, nothing else.

Why our own: aiohttp's request path was 40% of the worker's CPU (cookies, tracing, redirects,
proxies, URL joining, a timeout object and several tasks per request, none of which delivery
uses), and the faster Rust clients cannot send header names as given (docs/delivery.md).
What a webhook POST needs of HTTP/1.1 is small: write the head and the exact body bytes, read a
status line, a few headers and at most ``RESPONSE_BODY_LIMIT`` bytes of body.

Pure part, unit-tested without sockets: ``Target`` (a URL parsed once), ``encode_head``, and
``ResponseParser`` (incremental; Content-Length, chunked and read-until-close bodies; 1xx
skipped). I/O part: ``Connection`` (an asyncio protocol) and ``Pool`` (idle connections per
policy, TLS, host and port; connects to the addresses a resolver returned and the policy
allows, so no second lookup can change where a request goes; TLS verified on the name).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools
import yarl

from sidecar.errors import HttpError, WorkerError
from sidecar.ssrf import NetworkPolicy, check_address

MAX_HEAD = 64 * 1024  # a response head larger than this is refused
IDLE_SECONDS = 30.0  # an idle keep-alive connection is closed after this long
CONNECT_SECONDS = 10.0
NEXT_ADDRESS_SECONDS = 1.0  # a name's next address is tried when a connect takes longer than this
USER_AGENT = "pg-nats-webhook-worker"
_NO_BODY_STATUS = frozenset({204, 304})
# What a webhook endpoint answers in: llhttp also reads RTSP/1.0 and ICE/1.0 status lines.
_PROTOCOL = b"HTTP/1."
# Bytes of chunk framing (size lines, extensions, CRLFs) and trailers a response may have besides
# its body: a server sending trailers or extensions forever must not be read until the timeout.
MAX_FRAMING = 2 * MAX_HEAD


class ProtocolError(HttpError):
    """The peer's bytes are not an HTTP/1.x response we can read."""


class Disconnected(HttpError):
    """The connection closed before the response was complete."""


# -- pure ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL's request goes and what its head says: parsed once per URL (yarl: IDNA host,
    percent-encoded path), with no fragment."""

    tls: bool
    host: str  # for the resolver, SNI and certificate checks: IDNA, lower case, no brackets
    port: int
    host_header: str  # host[:port], the port only when it is not the scheme's default
    path: str  # path and query as sent in the request line

    @classmethod
    def parse(cls, url: str) -> Target:
        u = yarl.URL(url)
        if u.scheme not in ("http", "https") or not u.raw_host or u.port is None:
            raise ValueError("not an absolute http(s) URL with a host")  # no URL: it may hold a token
        return cls(
            u.scheme == "https",
            u.raw_host,
            u.port,
            u.host_port_subcomponent or u.raw_host,
            u.raw_path_qs or "/",
        )


def encode_head(method: str, target: Target, headers: dict[str, str], body_length: int) -> bytes:
    """The request line and headers: names and values exactly as given, then Host, Content-Length
    and the defaults (User-Agent, Accept, Accept-Encoding: identity) the caller did not set.
    Callers have refused CR, LF and other controls in names and values (delivery.build_request)."""
    lines = [f"{method} {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"]
    given = set()
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
        given.add(name.lower())
    if "user-agent" not in given:
        lines.append(f"User-Agent: {USER_AGENT}\r\n")
    if "accept" not in given:
        lines.append("Accept: */*\r\n")
    if "accept-encoding" not in given:
        # Bodies are stored as text: ask for them unencoded (delivery.body_text inflates the
        # gzip some servers send anyway).
        lines.append("Accept-Encoding: identity\r\n")
    lines.append(f"Content-Length: {body_length}\r\n\r\n")
    return "".join(lines).encode("utf-8")


class _Stop(WorkerError):  # not an error: raised from a callback to halt llhttp
    """The response is complete as far as we read it: llhttp need not parse further."""


class _Interim(WorkerError):  # not an error: raised from a callback when a 1xx response ends
    """An interim (1xx) response ended: the final one starts right after its head."""


class ResponseParser:
    """One response, fed as bytes arrive. ``feed`` returns True once the response is complete as
    far as we read it: the whole body, or its first ``limit`` bytes (then ``keep_alive`` is False:
    the rest is never read and the connection must be closed). Raises ProtocolError.

    The bytes are parsed by llhttp (httptools), strict but for two leniencies that keep what this
    parser accepted before: BWS after a chunk size, and Transfer-Encoding with Content-Length (read
    by Transfer-Encoding, then the connection is closed). Ours: the status line must say HTTP/1.0 or
    HTTP/1.1 (llhttp also reads RTSP/ and ICE/), the bounds (head, interim heads, trailers, body),
    interim (1xx) responses skipped, keep-alive, and what marks a connection unfit for reuse."""

    __slots__ = (
        "_after_head",
        "_begun",
        "_body_seen",
        "_done",
        "_fields",
        "_head",
        "_head_only",
        "_in_head",
        "_interim",
        "_interim_end",
        "_lengths",
        "_limit",
        "_parser",
        "_until_close",
        "body",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, limit: int, head_only: bool = False) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case name -> value (the last one of a name)
        self.body = bytearray()
        self.keep_alive = True
        self._limit = limit
        self._head_only = head_only  # a response to HEAD has no body, whatever its headers say
        self._done = False
        self._interim = 0  # bytes of interim (1xx) heads read: bounded like a head
        self._new_message()

    def _new_message(self) -> None:
        """A fresh llhttp parser per message: each one's status line is checked from its first byte."""
        self._parser = httptools.HttpResponseParser(self)
        self._parser.set_dangerous_leniencies(
            lenient_chunked_length=True, lenient_spaces_after_chunk_size=True
        )
        self._head = bytearray()  # the message's bytes until its head is complete
        self._in_head = True
        self._begun = False
        self._fields: dict[str, str] = {}
        self._lengths: set[str] = set()
        self._interim_end = -1
        self._until_close = False
        self._after_head = 0  # bytes fed after the head, and of them body bytes: the rest is framing
        self._body_seen = 0

    def feed(self, data: bytes) -> bool:
        if self._done:
            if data:
                self.keep_alive = False  # bytes nobody asked for: do not reuse the connection
            return True
        while True:
            if self._in_head:
                self._head += data
                head = self._head
                if head[:7] != _PROTOCOL[: len(head)]:
                    line = bytes(head.split(b"\r\n", 1)[0][:60]).decode("latin-1")
                    raise ProtocolError(f"invalid status line {line!r}")
            else:
                self._after_head += len(data)
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # Upgrade: not a subclass
                cause = exc.__context__
                if isinstance(cause, _Interim):
                    data = bytes(self._head[self._interim_end :])
                    self._new_message()
                    continue
                if isinstance(cause, ProtocolError):
                    raise cause from None
                if isinstance(cause, _Stop) or self._done:
                    self.keep_alive = self.keep_alive and isinstance(cause, _Stop)
                    return True
                raise ProtocolError(f"invalid response: {exc}") from None
            return self._fed()

    def _fed(self) -> bool:
        """After llhttp has read what came: is the response complete, or out of bounds?"""
        if self._done:
            return True
        if self._in_head:
            if len(self._head) > MAX_HEAD:
                raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
            return False
        if len(self.body) >= self._limit:
            self._done = True  # cut: the rest is never read
            self.keep_alive = False
            return True
        if self._after_head - self._body_seen > MAX_FRAMING:
            raise ProtocolError(f"chunk framing and trailers longer than {MAX_FRAMING} bytes")
        return False

    def feed_eof(self) -> bool:
        """The peer closed the connection: True if that completes the response."""
        self.keep_alive = False
        if self._until_close and not self._in_head:
            self._done = True
        return self._done

    # -- llhttp's callbacks (httptools calls them by name) --

    def on_message_begin(self) -> None:
        if self._begun:  # a second message in the bytes of this one
            self.keep_alive = False
            raise _Stop
        self._begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer: bounded with the framing, not kept
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip(" \t")
        if key == "content-length":
            self._lengths.add(text)
        self._fields[key] = text

    def on_headers_complete(self) -> None:
        # llhttp has refused a bare CR or LF: the first blank line ends the head.
        end = self._head.find(b"\r\n\r\n")
        if end > MAX_HEAD:
            raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
        status = self._parser.get_status_code()
        if status < 100:
            raise ProtocolError(
                f"invalid status code {status:03d}"
            )  # RFC 9110 15: 100-599 (6xx-9xx read as 5xx)
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            if status == 101:
                raise ProtocolError("101 Switching Protocols to a webhook POST")
            self._interim += end + 4
            if self._interim > MAX_HEAD:
                raise ProtocolError(f"interim (1xx) responses longer than {MAX_HEAD} bytes")
            self._interim_end = end + 4
            return
        self.status = status
        self.headers = self._fields
        self._in_head = False
        self._after_head = len(self._head) - (end + 4)
        self._head = bytearray()
        self._framing(self._parser.get_http_version() == "1.0")
        if self._head_only:
            self._done = True
            if self._after_head:
                self.keep_alive = False  # bytes after the head of a HEAD response
            raise _Stop

    def _framing(self, http10: bool) -> None:
        """Keep-alive, and whether the body lasts until the connection closes."""
        headers = self.headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = "keep-alive" in connection if http10 else "close" not in connection
        if self._head_only or self.status in _NO_BODY_STATUS:
            return
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if self._lengths or http10:
                # Framed two ways, or by a header HTTP/1.0 lacks: possibly response splitting
                # (RFC 9112 6.1, 6.3). Read by Transfer-Encoding, then close.
                self.keep_alive = False
            if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
                self._until_close = True
                self.keep_alive = False
        elif not self._lengths:
            self._until_close = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        room = self._limit - len(self.body)
        if room > 0:
            self.body += body[:room]

    def on_message_complete(self) -> None:
        if self._interim_end >= 0:
            raise _Interim
        self._done = True


# -- I/O ----------------------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange at a time."""

    __slots__ = ("_parser", "_waiter", "closed", "idle_since", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: ResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport: create_connection

    def data_received(self, data: bytes) -> None:
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None or waiter.done():
            self.close()  # bytes while no request is out: the connection cannot be trusted
            return
        try:
            if parser.feed(data):
                if self.transport is not None and self.transport.get_write_buffer_size():
                    # Answered before the request was all sent: the server did not read it all
                    # and would read the rest as the next request.
                    parser.keep_alive = False
                waiter.set_result(None)
        except ProtocolError as exc:
            waiter.set_exception(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None or waiter.done():
            return
        if parser.feed_eof():
            waiter.set_result(None)
        else:
            waiter.set_exception(
                Disconnected("the server closed the connection before the response was complete")
            )

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def exchange(self, head: bytes, body: bytes, parser: ResponseParser) -> asyncio.Future[None]:
        """Write one request; the future is done when ``parser`` has the response."""
        assert self.transport is not None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parser, self._waiter = parser, waiter
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return waiter

    def finished(self) -> None:
        self._parser = self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


Resolve = Callable[[str, int, NetworkPolicy], Awaitable[list[str]]]
PoolKey = tuple[NetworkPolicy, bool, str, int]


class Pool:
    """Idle connections by (policy, TLS, host, port), so a connection is only reused under the
    policy that allowed its address. ``resolve(host, port, policy)`` returns the addresses the policy
    allows (or raises BlockedAddress); each is checked once more right before its connect."""

    def __init__(self, resolve: Resolve) -> None:
        self._resolve = resolve
        self._ssl: ssl.SSLContext | None = None
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Built on first use: loading the system's roots costs milliseconds. create_default_context
            # reads SSL_CERT_FILE / SSL_CERT_DIR like OpenSSL does.
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def connect(self, key: PoolKey, connect_seconds: float) -> Connection:
        """An idle connection of ``key``, or a new one opened within ``connect_seconds``."""
        policy, tls, host, port = key
        idle = self._idle.get(key)
        if idle:
            stale = time.monotonic() - IDLE_SECONDS  # the sweep may not have run yet
            while idle:
                conn = idle.pop()
                if conn.usable:
                    if conn.idle_since > stale:
                        return conn
                    conn.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_seconds):
            addresses = await self._resolve(host, port, policy)
            last: BaseException | None = None
            for i, address in enumerate(addresses):
                check_address(address, policy)  # the address connected to, whatever resolved it
                try:
                    # Each address but the last gets NEXT_ADDRESS_SECONDS: an unreachable first one
                    # (IPv6 without a route on a dual-stack host) must not use the whole budget.
                    async with asyncio.timeout(NEXT_ADDRESS_SECONDS if i < len(addresses) - 1 else None):
                        transport, conn = await loop.create_connection(
                            Connection,
                            host=address,
                            port=port,
                            ssl=self._ssl_context() if tls else None,
                            server_hostname=host if tls else None,
                        )
                    # uvloop may call connection_made only after create_connection has returned.
                    conn.transport = transport
                    return conn
                except (OSError, TimeoutError) as exc:
                    last = exc
            assert last is not None, "the resolver returned no address"
            raise last

    def give_back(self, key: PoolKey, conn: Connection) -> None:
        conn.finished()
        if self._closed:  # a request that was out when the pool closed
            conn.close()
            return
        if not conn.usable:
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS / 3, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for IDLE_SECONDS (servers close theirs too; a reused one that the
        server has just closed fails the request)."""
        self._sweeper = None
        cutoff = time.monotonic() - IDLE_SECONDS
        for key in list(self._idle):
            conns = [c for c in self._idle[key] if c.usable]
            for conn in conns:
                if conn.idle_since < cutoff:
                    conn.close()
            conns = [c for c in conns if not c.closed]
            if conns:
                self._idle[key] = conns
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS / 3, self._sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = [c for cs in self._idle.values() for c in cs]
        self._idle.clear()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
            conn.closed = True
