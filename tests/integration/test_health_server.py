"""sidecar.health's HTTP server (asyncio streams, no aiohttp) against real sockets on loopback:
the three routes, status codes and content types, and the bounds on what a client may send."""

from __future__ import annotations

import asyncio
import json
import socket

from sidecar.health import MAX_REQUEST_HEAD, HealthServer
from sidecar.metrics import Component, Metrics, Snapshot
from sidecar.resolver import SystemResolver
from tests.support.stack import free_port


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)  # the server closes after its answer
    writer.close()
    return data


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0].startswith("HTTP/1.1 ")
    return int(lines[0].split(" ")[1]), headers, body


async def test_routes_answer_as_before() -> None:
    components = [Component("postgresql", True)]
    server = HealthServer(f"127.0.0.1:{free_port()}", Metrics(Snapshot), lambda: list(components))
    await server.start()
    try:
        port = server.port
        status, headers, body = _split(await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert (status, headers["content-type"], body) == (200, "text/plain; charset=utf-8", b"ok\n")
        assert headers["content-length"] == "3"

        status, headers, body = _split(await _exchange(port, b"GET /readyz HTTP/1.1\r\n\r\n"))
        assert status == 200 and headers["content-type"].startswith("application/json")
        assert json.loads(body) == {
            "ready": True,
            "problems": [],
            "components": [{"name": "postgresql", "ok": True, "problem": None}],
        }
        components.append(Component("nats:default", False, "NATS connection 'default' is down"))
        status, _, body = _split(await _exchange(port, b"GET /readyz?verbose HTTP/1.1\r\n\r\n"))
        assert status == 503 and json.loads(body)["problems"] == ["NATS connection 'default' is down"]

        status, headers, body = _split(await _exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n"))
        assert status == 200 and headers["content-type"].startswith("text/plain; version=")
        assert b"webhook_outbox_published" in body

        status, headers, body = _split(await _exchange(port, b"HEAD /healthz HTTP/1.1\r\n\r\n"))
        assert (status, headers["content-length"], body) == (200, "3", b"")
        assert _split(await _exchange(port, b"GET /other HTTP/1.1\r\n\r\n"))[0] == 404
        assert _split(await _exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
        assert _split(await _exchange(port, b"nonsense\r\n\r\n"))[0] == 400
    finally:
        await server.stop()


async def test_a_request_head_is_bounded_and_a_silent_client_does_not_stop_the_server() -> None:
    server = HealthServer(f"127.0.0.1:{free_port()}", Metrics(Snapshot), list)
    await server.start()
    try:
        port = server.port
        big = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n"
        assert _split(await _exchange(port, big))[0] == 431
        # A client that connects and says nothing holds no other request up.
        _idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        assert _split(await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        idle_writer.close()
    finally:
        await server.stop()


async def test_stop_closes_open_connections_and_frees_the_port() -> None:
    server = HealthServer(f"127.0.0.1:{free_port()}", Metrics(Snapshot), list)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await server.stop()
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed by the server
    writer.close()
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port is free again


async def test_the_system_resolver_answers_an_address_as_itself() -> None:
    [r] = await SystemResolver().resolve("127.0.0.1", 8080, socket.AF_INET)
    assert (r["hostname"], r["host"], r["port"], r["family"]) == (
        "127.0.0.1",
        "127.0.0.1",
        8080,
        socket.AF_INET,
    )
