"""delivery.Sender over sidecar.http1 against scripted HTTP servers on loopback: keep-alive,
connections that must not be reused, timeouts, cut bodies, servers that go away."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from sidecar import http1
from sidecar.delivery import RESPONSE_BODY_LIMIT, Request, Sender
from sidecar.ssrf import NetworkPolicy, parse_networks

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))

Answer = Callable[[bytes, bytes], bytes | None]  # (head, body) -> raw response, or None: say nothing


class Scripted:
    """A loopback server reading HTTP/1.1 requests (Content-Length bodies) and answering each
    with what ``answer`` returns; counts connections and records requests."""

    def __init__(self, answer: Answer, close_after: bool = False, hang_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.hang_after = hang_after
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                raw = self.answer(head, body)
                if raw is None:
                    await asyncio.sleep(3600)
                    return
                writer.write(raw)
                await writer.drain()
                if self.close_after:
                    break
                if self.hang_after:
                    await asyncio.sleep(3600)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(head: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def req(url: str, body: bytes = b'{"a": 1}', timeout: float = 5.0) -> Request:
    return Request("POST", url, {"Content-Type": "application/json"}, body, timeout, policy=LOOPBACK)


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    s = Sender()
    await s.start()
    yield s
    await s.close()


async def test_requests_reuse_one_keep_alive_connection(sender: Sender) -> None:
    async with Scripted(ok) as srv:
        statuses = [(await sender.send(req(srv.url, b"%d" % i))).status for i in range(5)]
    assert statuses == [200] * 5
    assert srv.connections == 1
    assert [body for _, body in srv.requests] == [b"0", b"1", b"2", b"3", b"4"]  # exact bytes


async def test_concurrent_requests_each_get_a_connection_and_then_share_them(sender: Sender) -> None:
    async with Scripted(ok) as srv:
        first = await asyncio.gather(*(sender.send(req(srv.url)) for _ in range(4)))
        second = await asyncio.gather(*(sender.send(req(srv.url)) for _ in range(4)))
    assert {r.status for r in [*first, *second]} == {200}
    assert srv.connections == 4


async def test_a_server_that_closes_is_not_reused(sender: Sender) -> None:
    async with Scripted(ok, close_after=True) as srv:
        a = await sender.send(req(srv.url))
        await asyncio.sleep(0.05)  # the close reaches the client before the next request
        b = await sender.send(req(srv.url))
    assert (a.status, b.status) == (200, 200)
    assert srv.connections == 2


async def test_connection_close_is_honoured(sender: Sender) -> None:
    def closing(head: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    async with Scripted(closing) as srv:
        for _ in range(3):
            assert (await sender.send(req(srv.url))).status == 200
    assert srv.connections == 3


async def test_a_long_error_body_is_cut_and_its_connection_dropped(sender: Sender) -> None:
    """The first RESPONSE_BODY_LIMIT bytes are kept and the rest never waited for: a server
    streaming a 10 MB error body (here: never finishing it) costs one connection, not a timeout."""

    def endless_error(head: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 500 Oops\r\nContent-Length: 10000000\r\nRetry-After: 3\r\n\r\n" + b"e" * (
            RESPONSE_BODY_LIMIT * 2
        )

    async with Scripted(endless_error, hang_after=True) as srv:
        a = await sender.send(req(srv.url, timeout=30.0))
        b = await sender.send(req(srv.url, timeout=30.0))
    assert a.status == 500 and a.body == "e" * RESPONSE_BODY_LIMIT and a.retry_after == "3"
    assert a.latency_ms < 10_000
    assert b.status == 500
    assert srv.connections == 2


async def test_chunked_and_gzipped_error_bodies_are_stored_as_text(sender: Sender) -> None:
    packed = gzip.compress(b'{"error": "no such tenant"}')

    def gz(head: bytes, body: bytes) -> bytes:
        return (
            b"HTTP/1.1 422 Unprocessable\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed)
        )

    async with Scripted(gz) as srv:
        resp = await sender.send(req(srv.url))
    assert resp.status == 422 and resp.body == '{"error": "no such tenant"}'
    assert b"Accept-Encoding: identity" in srv.requests[0][0]


async def test_a_silent_server_times_out_within_the_request_timeout(sender: Sender) -> None:
    async with Scripted(lambda head, body: None) as srv:
        start = time.monotonic()
        resp = await sender.send(req(srv.url, timeout=0.5))
        took = time.monotonic() - start
        after = await sender.send(req(srv.url, timeout=0.5))
    assert resp.status is None and resp.error == "timeout after 0.5 s" and 0.4 < took < 3.0
    assert after.status is None and srv.connections == 2  # the timed-out connection was dropped


async def test_a_server_gone_mid_head_is_an_error_to_retry(sender: Sender) -> None:
    async with Scripted(lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Le", close_after=True) as srv:
        resp = await sender.send(req(srv.url))
    assert resp.status is None and resp.error is not None and "closed the connection" in resp.error


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", 200, None),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 50\r\n\r\nshort", 503, "short"),
        (b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n", 500, "abc"),
    ],
    ids=["gone", "gone-error", "malformed-chunk"],
)
async def test_once_the_head_is_in_its_status_is_the_answer(
    sender: Sender, raw: bytes, status: int, body: str | None
) -> None:
    """A body that breaks off or is malformed after the head: the endpoint has answered (a 200
    was delivered, sending it again would repeat it); the connection is not reused."""
    async with Scripted(lambda head, b: raw, close_after=True) as srv:
        resp = await sender.send(req(srv.url))
        again = await sender.send(req(srv.url))
    assert (resp.status, resp.body, resp.error) == (status, body, None), resp
    assert again.status == status and srv.connections == 2


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10, 200, None),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 10000000\r\n\r\n" + b"e" * 1000, 503, "e" * 1000),
    ],
    ids=["delivered", "error"],
)
async def test_a_stalled_body_keeps_the_status(
    sender: Sender, raw: bytes, status: int, body: str | None
) -> None:
    async with Scripted(lambda head, b: raw, hang_after=True) as srv:
        resp = await sender.send(req(srv.url, timeout=0.5))
    assert (resp.status, resp.body, resp.error) == (status, body, None), resp


async def test_garbage_is_an_error_to_retry(sender: Sender) -> None:
    async with Scripted(lambda head, body: b"SSH-2.0-OpenSSH_9.2\r\n\r\n") as srv:
        resp = await sender.send(req(srv.url))
    assert resp.status is None and resp.error is not None and "invalid status line" in resp.error


async def test_a_refused_connection_says_so(sender: Sender) -> None:
    async with Scripted(ok) as srv:
        url = srv.url
    resp = await sender.send(req(url))
    assert resp.status is None and resp.error is not None and resp.error.startswith("connection failed"), resp


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(sender: Sender) -> None:
    async with Scripted(lambda head, body: None if body == b"hang" else ok(head, body)) as srv:
        task = asyncio.create_task(sender.send(req(srv.url, b"hang")))
        while not srv.requests:  # noqa: ASYNC110 - the server's list, polled
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        resp = await sender.send(req(srv.url))
    assert resp.status == 200
    assert srv.connections == 2


async def test_a_server_sending_interim_responses_forever_is_given_up_on(sender: Sender) -> None:
    async with Scripted(lambda head, body: b"HTTP/1.1 100 Continue\r\n\r\n" * 20_000, hang_after=True) as srv:
        resp = await sender.send(req(srv.url, timeout=3.0))
    assert resp.status is None and resp.error is not None and "interim" in resp.error, resp
    assert resp.latency_ms < 2000


async def test_an_answer_before_the_whole_request_was_sent_ends_the_connection(sender: Sender) -> None:
    """A server that answers without reading the body and keeps the connection reads the rest of the
    body as the next request: its answer to that (here a 500) would be taken as the answer to the
    next request sent on the connection. Here the body is such a request."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = True
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if first:  # answer at once, the body unread
                    first = False
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await asyncio.sleep(0.1)
                    continue
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                status = b"500 Smuggled" if head.startswith(b"POST /smuggled ") else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=64 << 20)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    # More than the socket buffers take: most of it is still being written when the answer comes.
    smuggled = b"POST /smuggled HTTP/1.1\r\nContent-Length: 0\r\nX-Pad: " + b"a" * (16 << 20) + b"\r\n\r\n"
    try:
        first = await sender.send(req(url, smuggled, timeout=10.0))
        second = await sender.send(req(url, timeout=10.0))
    finally:
        server.close()
    assert (first.status, second.status) == (200, 200), second
    assert connections == 2


async def test_a_request_finishing_after_close_does_not_leave_its_connection_open() -> None:
    """Sender.close() while a request is out: its connection is closed when it finishes, not kept
    in the closed pool (nor a sweep timer started again for it)."""
    received, release, gone = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            received.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        gone.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    s = Sender()
    await s.start()
    try:
        task = asyncio.create_task(s.send(req(url, b"")))
        await received.wait()
        await s.close()
        release.set()
        assert (await task).status == 200
        await asyncio.wait_for(gone.wait(), 2.0)
    finally:
        server.close()


async def test_a_connection_idle_past_the_limit_is_not_reused(
    sender: Sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep runs every IDLE_SECONDS / 3, so between two sweeps a connection can be idle past
    IDLE_SECONDS (servers close theirs about then): it must not be handed out any more."""
    async with Scripted(ok) as srv:
        assert (await sender.send(req(srv.url))).status == 200
        monkeypatch.setattr(http1, "IDLE_SECONDS", 0.2)  # the next sweep is still 10 s away
        await asyncio.sleep(0.3)
        assert (await sender.send(req(srv.url))).status == 200
    assert srv.connections == 2


class Answers(AbstractResolver):
    """A resolver stub: names to fixed addresses (no DNS)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        pass


@contextlib.contextmanager
def unreachable(port: int) -> Iterator[str]:
    """127.0.0.3:port where a connect never completes: a listener whose accept queue is full (the
    kernel drops further SYNs). Loopback only."""
    stuck = socket.socket()
    stuck.bind(("127.0.0.3", port))
    stuck.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; nothing accepts them
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.3", port))
            fillers.append(f)
        time.sleep(0.1)
        yield "127.0.0.3"
    finally:
        for f in fillers:
            f.close()
        stuck.close()


async def test_an_unreachable_first_address_does_not_use_the_whole_connect_budget() -> None:
    """A name answering with an address where a connect never completes and one that works: the
    second is tried after NEXT_ADDRESS_SECONDS, not after the 10 s connect budget."""
    async with Scripted(ok) as srv:
        with unreachable(srv.port) as stuck:
            s = Sender(resolver=Answers({"dual.test": [stuck, "127.0.0.1"]}))
            await s.start()
            try:
                t0 = time.monotonic()
                resp = await s.send(req(f"http://dual.test:{srv.port}/hook", timeout=30.0))
                took = time.monotonic() - t0
            finally:
                await s.close()
    assert resp.status == 200, resp
    assert len(srv.requests) == 1
    assert http1.NEXT_ADDRESS_SECONDS * 0.9 < took < http1.NEXT_ADDRESS_SECONDS + 3.0


async def test_a_connect_that_never_completes_says_so(sender: Sender) -> None:
    async with Scripted(ok) as srv:
        with unreachable(srv.port) as stuck:
            resp = await sender.send(req(f"http://{stuck}:{srv.port}/hook", timeout=0.5))
    assert resp.status is None and resp.error == "connect timeout after 0.5 s", resp
