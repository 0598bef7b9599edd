"""sidecar.http1's pure part: URLs, request heads and the response parser, without sockets."""

from __future__ import annotations

import time

import pytest

from sidecar.http1 import MAX_HEAD, ProtocolError, ResponseParser, Target, encode_head


def test_target_keeps_what_the_request_line_and_host_header_need() -> None:
    t = Target.parse("http://Example.COM/a/b?x=1&y=2#frag")
    assert (t.tls, t.host, t.port, t.host_header, t.path) == (
        False,
        "example.com",
        80,
        "example.com",
        "/a/b?x=1&y=2",
    )
    t = Target.parse("https://[::1]:8443")
    assert (t.tls, t.host, t.port, t.host_header, t.path) == (True, "::1", 8443, "[::1]:8443", "/")
    t = Target.parse("https://bücher.example/p ath")
    assert (t.host, t.port, t.host_header, t.path) == (
        "xn--bcher-kva.example",
        443,
        "xn--bcher-kva.example",
        "/p%20ath",
    )
    assert Target.parse("http://127.0.0.1:80/x").host_header == "127.0.0.1"


@pytest.mark.parametrize("url", ["ftp://h/x", "/relative", "http:///nohost"])
def test_target_refuses_what_is_not_an_absolute_http_url(url: str) -> None:
    with pytest.raises(ValueError) as info:
        Target.parse(url)
    assert url not in str(info.value)  # a URL may hold a token: not in error texts


def test_head_sends_names_and_values_as_given_and_fills_in_the_rest() -> None:
    t = Target.parse("http://127.0.0.1:8080/hook?k=v")
    head = encode_head(
        "POST", t, {"Content-Type": "application/json", "webhook-id": "e1", "X-API-Key": "ä"}, 12
    )
    assert head == (
        b"POST /hook?k=v HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Content-Type: application/json\r\nwebhook-id: e1\r\nX-API-Key: \xc3\xa4\r\n"
        b"User-Agent: pg-nats-webhook-worker\r\nAccept: */*\r\nAccept-Encoding: identity\r\n"
        b"Content-Length: 12\r\n\r\n"
    )
    mine = encode_head("PUT", t, {"user-agent": "mine", "ACCEPT": "text/plain", "accept-encoding": "br"}, 0)
    assert mine.count(b"ser-agent") == 1 and mine.lower().count(b"accept:") == 1
    assert b"Accept-Encoding: identity" not in mine and mine.endswith(b"Content-Length: 0\r\n\r\n")


def feed_bytewise(p: ResponseParser, data: bytes) -> list[bool]:
    return [p.feed(data[i : i + 1]) for i in range(len(data))]


def test_content_length_response_in_any_pieces() -> None:
    raw = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nRetry-After: 7\r\n\r\nbusy!"
    p = ResponseParser(4096)
    done = feed_bytewise(p, raw)
    assert done[-1] and not any(done[:-1])
    assert (p.status, bytes(p.body), p.headers["retry-after"], p.keep_alive) == (503, b"busy!", "7", True)
    whole = ResponseParser(4096)
    assert whole.feed(raw) and bytes(whole.body) == b"busy!"


def test_keep_alive_follows_version_and_connection_header() -> None:
    for raw, keep in [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", True),
    ]:
        p = ResponseParser(4096)
        assert p.feed(raw) and p.keep_alive is keep, raw


def test_chunked_body_with_extensions_and_trailers() -> None:
    raw = b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    p = ResponseParser(4096)
    done = feed_bytewise(p, raw)
    assert done[-1] and not any(done[:-1])
    assert bytes(p.body) == b"hello world" and p.keep_alive
    q = ResponseParser(4096)
    assert q.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") and q.keep_alive


def test_a_response_framed_two_ways_is_read_by_transfer_encoding_and_its_connection_dropped() -> None:
    """RFC 9112 6.1 and 6.3: Transfer-Encoding with Content-Length, or in an HTTP/1.0 message, may be
    response splitting; whoever else reads the stream may frame it by the other header."""
    both = ResponseParser(4096)
    assert both.feed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert bytes(both.body) == b"abc" and not both.keep_alive
    old = ResponseParser(4096)
    assert old.feed(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert not old.keep_alive


def test_a_body_over_the_limit_is_cut_and_the_connection_not_reused() -> None:
    p = ResponseParser(10)
    assert p.feed(b"HTTP/1.1 500 x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 20)
    assert bytes(p.body) == b"a" * 10 and not p.keep_alive
    c = ResponseParser(10)
    assert c.feed(b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\nff\r\n" + b"b" * 30)
    assert bytes(c.body) == b"b" * 10 and not c.keep_alive


def test_a_body_without_length_lasts_until_the_connection_closes() -> None:
    p = ResponseParser(4096)
    assert not p.feed(b"HTTP/1.1 502 x\r\n\r\npart one, ")
    assert not p.feed(b"part two")
    assert p.feed_eof() and bytes(p.body) == b"part one, part two" and not p.keep_alive


def test_a_connection_closed_mid_body_is_no_response() -> None:
    p = ResponseParser(4096)
    assert not p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert not p.feed_eof()


def test_bodiless_responses() -> None:
    for status in (204, 304):
        p = ResponseParser(4096)
        assert p.feed(b"HTTP/1.1 %d x\r\nContent-Length: 99\r\n\r\n" % status) and p.status == status
    head = ResponseParser(4096, head_only=True)
    assert (
        head.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n") and head.body == b"" and head.keep_alive
    )


def test_interim_responses_are_skipped() -> None:
    p = ResponseParser(4096)
    assert p.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert p.status == 201 and "link" not in p.headers


def test_interim_responses_are_bounded_like_a_head() -> None:
    """A server answering 100 Continue forever must not be read until the request times out."""
    p = ResponseParser(4096)
    with pytest.raises(ProtocolError, match="interim"):
        for _ in range(MAX_HEAD // 1000 + 2):
            p.feed(b"HTTP/1.1 100 Continue\r\n\r\n" * 40)
    q = ResponseParser(4096)
    assert q.feed(b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" * 100 + b"HTTP/1.1 204 No Content\r\n\r\n")


def test_bytes_after_the_response_spoil_the_connection() -> None:
    p = ResponseParser(4096)
    assert p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert not p.keep_alive
    q = ResponseParser(4096)
    assert q.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") and q.keep_alive
    assert q.feed(b"junk") and not q.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20x OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        # chunk-size is 1*HEXDIG; int(x, 16) also reads "0x", "_" and surrounding whitespace: a
        # reader that frames differently (a proxy in front) would see another response boundary
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\x0b5\r\nhello\r\n0\r\n\r\n",
        # CR, LF or NUL in a field (RFC 9112 5.5: reject or replace): a reader taking a bare LF as a
        # line end (RFC 9112 2.2 allows it) sees a Transfer-Encoding we did not: another framing
        b"HTTP/1.1 200 OK\r\nX: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX: a\rTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 2\xb20 OK\r\n\r\n",  # latin-1 '\xb2' is '²': str.isdigit() says yes, int() says no
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",  # over int()'s 4300 digits
    ],
)
def test_what_is_not_a_response_is_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        ResponseParser(4096).feed(raw)


def test_the_head_is_bounded() -> None:
    p = ResponseParser(4096)
    with pytest.raises(ProtocolError, match="head longer"):
        # after a status line: without one, the first bytes are refused as one (test below)
        p.feed(b"HTTP/1.1 200 OK\r\n")
        for _ in range(MAX_HEAD // 1000 + 2):
            p.feed(b"X-Pad: " + b"a" * 991 + b"\r\n")
    # Two equal Content-Length headers: refused, as llhttp (Node.js) does; RFC 9110 8.6 lets a
    # recipient reject them or read them as one. Our parser read them as one before httptools.
    same = ResponseParser(4096)
    with pytest.raises(ProtocolError, match="Duplicate Content-Length"):
        same.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nk")


@pytest.mark.parametrize(
    "raw",
    [
        b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nRTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_only_an_http_1_status_line_is_a_response(raw: bytes) -> None:
    """llhttp reads RTSP/ and ICE/ status lines as responses too: ours must say HTTP/1.x, also after
    an interim response, fed whole or a byte at a time."""
    with pytest.raises(ProtocolError, match="status line"):
        ResponseParser(4096).feed(raw)
    with pytest.raises(ProtocolError, match="status line"):
        feed_bytewise(ResponseParser(4096), raw)


def test_a_head_and_trailers_sent_a_byte_at_a_time_take_linear_time() -> None:
    """A server may send one byte per packet: each byte must not rescan the whole head for its end
    (a 64 KB head and 64 KB of trailers took 4 s of the event loop's CPU that way)."""
    lines = (MAX_HEAD - 100) // 6
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + b"X: a\r\n" * lines + b"\r\n"
    trailers = b"0\r\n" + b"T: a\r\n" * lines + b"\r\n"
    p = ResponseParser(4096)
    start = time.perf_counter()
    done = feed_bytewise(p, head + trailers)
    took = time.perf_counter() - start
    assert done[-1] and not any(done[:-1]) and p.keep_alive and p.headers["x"] == "a"
    assert took < 1.0, f"{took:.2f} s"


def test_trailers_and_chunk_framing_are_bounded() -> None:
    """A server sending trailers (or chunk extensions) forever is refused, not read until the timeout."""
    p = ResponseParser(4096)
    assert not p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(ProtocolError):
        for _ in range(4 * MAX_HEAD // 1000):
            p.feed(b"T: " + b"a" * 995 + b"\r\n")
    q = ResponseParser(4096)
    with pytest.raises(ProtocolError):
        q.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;x=" + b"e" * 4 * MAX_HEAD)
