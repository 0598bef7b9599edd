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

import yarl

from sidecar.errors import HttpError
from sidecar.ssrf import NetworkPolicy, check_address

MAX_HEAD = 64 * 1024  # a response head larger than this is refused
IDLE_SECONDS = 30.0  # an idle keep-alive connection is closed after this long
CONNECT_SECONDS = 10.0
NEXT_ADDRESS_SECONDS = 1.0  # a name's next address is tried when a connect takes longer than this
USER_AGENT = "pg-nats-webhook-worker"
_NO_BODY_STATUS = frozenset({204, 304})
_HEXDIG = b"0123456789abcdefABCDEF"


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


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """One response, fed as bytes arrive. ``feed`` returns True once the response is complete as
    far as we read it: the whole body, or its first ``limit`` bytes (then ``keep_alive`` is False:
    the rest is never read and the connection must be closed). Raises ProtocolError."""

    __slots__ = (
        "_buf",
        "_head_only",
        "_interim",
        "_limit",
        "_remaining",
        "_scan",
        "_state",
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
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._interim = 0  # bytes of interim (1xx) heads read: bounded like a head
        self._scan = 0  # where the search for the end of a head or trailers resumes

    def feed(self, data: bytes) -> bool:
        if self._state == _DONE:
            if data:
                self.keep_alive = False  # bytes nobody asked for: do not reuse the connection
            return True
        self._buf += data
        while True:
            state = self._state
            buf = self._buf
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", self._scan)
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
                    self._scan = max(0, len(buf) - 3)  # not again from the start: quadratic
                    return False
                self._scan = 0
                if end > MAX_HEAD:
                    raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._parse_head(head)
                continue  # _parse_head chose the next state
            if state == _LENGTH:
                take = min(self._remaining, len(buf))
                self._keep(buf[:take])
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    return self._finish()
                if len(self.body) >= self._limit:
                    return self._finish(cut=True)
                return False
            if state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    return False
                line = bytes(buf[:end]).split(b";", 1)[0].rstrip(b" \t")  # BWS before ";ext"
                del buf[: end + 2]
                # 1*HEXDIG only: int(x, 16) also takes a sign, "0x", "_" and whitespace.
                if not line or line.lstrip(_HEXDIG):
                    raise ProtocolError(f"invalid chunk size {line[:20]!r}")
                size = int(line, 16)
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                continue
            if state == _CHUNK_DATA:
                take = min(self._remaining, len(buf))
                self._keep(buf[:take])
                del buf[:take]
                self._remaining -= take
                if len(self.body) >= self._limit:
                    return self._finish(cut=True)
                if self._remaining:
                    return False
                self._state = _CHUNK_END
                continue
            if state == _CHUNK_END:
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
                continue
            if state == _TRAILERS:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    return self._finish()
                end = buf.find(b"\r\n\r\n", self._scan)
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ProtocolError("trailers too long")
                    self._scan = max(0, len(buf) - 3)
                    return False
                del buf[: end + 4]
                return self._finish()
            if state == _UNTIL_CLOSE:
                self._keep(buf)
                buf.clear()
                if len(self.body) >= self._limit:
                    return self._finish(cut=True)
                return False
            return True

    def feed_eof(self) -> bool:
        """The peer closed the connection: True if that completes the response."""
        self.keep_alive = False
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        return self._state == _DONE

    def _keep(self, data: bytes | bytearray) -> None:
        room = self._limit - len(self.body)
        if room > 0:
            self.body += data[:room]

    def _finish(self, cut: bool = False) -> bool:
        self._state = _DONE
        if cut or self._buf:
            self.keep_alive = False
        return True

    def _parse_head(self, head: bytes) -> None:
        # Every CR and LF in a CRLF, no NUL (one pass each): RFC 9112 5.5 says reject (or replace)
        # them in a field; a reader that ends lines at a bare LF (2.2 allows it) would see other
        # fields than ours, maybe another framing.
        if len(head) - len(head.translate(None, b"\r\n\0")) != 2 * head.count(b"\r\n"):
            raise ProtocolError("bare CR, LF or NUL in the response head")
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise ProtocolError("undecodable response head") from None
        status_line, _, rest = text.partition("\r\n")
        version, _, tail = status_line.partition(" ")
        code = tail[:3]
        if (
            version not in ("HTTP/1.1", "HTTP/1.0")
            or len(code) != 3
            or not code.isascii()  # str.isdigit() also says yes to latin-1 '²', which int() refuses
            or not code.isdigit()
            or tail[3:4] not in ("", " ")
        ):
            raise ProtocolError(f"invalid status line {status_line[:60]!r}")
        status = int(code)
        if status < 100:
            raise ProtocolError(f"invalid status code {code}")  # RFC 9110 15: 100-599 (6xx-9xx read as 5xx)
        headers: dict[str, str] = {}
        lengths: set[str] = set()
        if rest:
            for line in rest.split("\r\n"):
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip() or line[:1] in (" ", "\t"):
                    raise ProtocolError(f"invalid header line {line[:60]!r}")
                key = name.lower()
                value = value.strip(" \t")
                if key == "content-length":
                    lengths.add(value)
                headers[key] = value
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            if status == 101:
                raise ProtocolError("101 Switching Protocols to a webhook POST")
            self._interim += len(head) + 4
            if self._interim > MAX_HEAD:
                raise ProtocolError(f"interim (1xx) responses longer than {MAX_HEAD} bytes")
            self._state = _HEAD
            return
        self.status = status
        self.headers = headers
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in connection
        else:
            self.keep_alive = "close" not in connection
        if self._head_only or status in _NO_BODY_STATUS:
            self._finish()
            return
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if lengths or version == "HTTP/1.0":
                # Framed two ways, or by a header HTTP/1.0 lacks: possibly response splitting
                # (RFC 9112 6.1, 6.3). Read by Transfer-Encoding, then close.
                self.keep_alive = False
            if coding.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self.keep_alive = False
            return
        if lengths:
            if len(lengths) > 1:
                raise ProtocolError(f"conflicting Content-Length headers {sorted(lengths)}")
            (length,) = lengths
            # 18 digits: beyond any real body, and int() refuses strings over 4300 digits.
            if not length.isdigit() or not length.isascii() or len(length) > 18:
                raise ProtocolError(f"invalid Content-Length {length[:20]!r}")
            self._remaining = int(length)
            if self._remaining == 0:
                self._finish()
            else:
                self._state = _LENGTH
            return
        self._state = _UNTIL_CLOSE
        self.keep_alive = False


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
