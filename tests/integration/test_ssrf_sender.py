"""The real delivery sender (sidecar.http1) under the SSRF policy.

Loopback forms are attempted for real against a listening trap on loopback, which must see
no connection. Other blocked ranges are reached only through a fake resolver, and every test
here runs with connect() patched to refuse anything but loopback, so not a packet leaves the
machine even if the code under test is wrong.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from sidecar.delivery import PolicyResolver, Refused, Request, Sender, check_target
from sidecar.ssrf import NetworkPolicy, parse_networks
from tests.support.receiver import Receiver
from tests.support.trap import Trap

DEFAULT = NetworkPolicy()
LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8,::1/128"))


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """connect() to a non-loopback address fails before any packet is sent."""
    tried: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def check(address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        try:
            ok = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            ok = False
        if not ok:
            tried.append(address)
            raise PermissionError(f"test guard: refusing to connect to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return tried


class FakeResolver(AbstractResolver):
    """Names to addresses, like a DNS server an attacker controls."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        out: list[ResolveResult] = []
        for a in self.answers[host]:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            out.append({"hostname": host, "host": a, "port": port, "family": fam, "proto": 0, "flags": 0})
        return out

    async def close(self) -> None:
        pass


def request(url: str, policy: NetworkPolicy) -> Request:
    return Request("POST", url, {"Content-Type": "application/json"}, b"{}", 2.0, policy=policy)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "127.0.0.2", "[::ffff:7f00:1]"],
)
async def test_loopback_literals_never_connect(trap: Trap, host: str) -> None:
    url = f"http://{host}:{trap.port}/hook"
    with pytest.raises(Refused) as info:
        check_target(url, DEFAULT)
    assert info.value.reason == "ssrf_blocked"
    # and the sender refuses on its own too (socket factory), even without the pre-check
    sender = Sender()
    await sender.start()
    try:
        resp = await sender.send(request(url, DEFAULT))
    finally:
        await sender.close()
    assert resp.blocked is not None and resp.status is None, resp
    assert trap.accepted == 0


@pytest.mark.parametrize("host", ["localhost", "0x7f.1", "127.1", "0177.0.0.1"])
async def test_names_resolving_to_loopback_never_connect(trap: Trap, host: str) -> None:
    sender = Sender()
    await sender.start()
    try:
        resp = await sender.send(request(f"http://{host}:{trap.port}/", DEFAULT))
    finally:
        await sender.close()
    assert resp.status is None
    assert resp.blocked is not None or "canonical" in (resp.error or ""), resp
    assert trap.accepted == 0


async def test_allow_list_lets_loopback_through(trap: Trap) -> None:
    sender = Sender()
    await sender.start()
    rcv = Receiver().start()
    try:
        resp = await sender.send(request(rcv.url + "/ok", LOOPBACK))
        resp_name = await sender.send(request(rcv.url.replace("127.0.0.1", "localhost") + "/ok", LOOPBACK))
    finally:
        await sender.close()
        rcv.stop()
    assert resp.status == 200 and resp_name.status == 200
    assert len(rcv.snapshot()) == 2


@pytest.mark.parametrize(
    ("name", "addresses", "reason"),
    [
        ("metadata.test", ["169.254.169.254"], "cloud metadata"),
        ("private.test", ["10.0.0.7"], "private"),
        ("cgnat.test", ["100.64.3.3"], "cgnat"),
        ("v6private.test", ["fd00::5"], "private"),
        ("mapped.test", ["::ffff:192.168.1.1"], "private"),
        ("nat64.test", ["64:ff9b::a9fe:a9fe"], "cloud metadata"),
        ("linklocal.test", ["fe80::1"], "link-local"),
    ],
)
async def test_names_resolving_to_internal_ranges_are_blocked(
    loopback_only: list[Any], name: str, addresses: list[str], reason: str
) -> None:
    resolver = FakeResolver({name: addresses})
    sender = Sender(resolver=resolver)
    await sender.start()
    try:
        resp = await sender.send(request(f"http://{name}/x", DEFAULT))
    finally:
        await sender.close()
    assert resolver.calls == [name]
    assert resp.blocked is not None and reason in resp.blocked, resp
    assert loopback_only == []  # not even an attempt reached connect()


async def test_only_allowed_addresses_of_a_mixed_answer_are_used(
    trap: Trap, loopback_only: list[Any]
) -> None:
    """A name answering with a blocked and an allowed address connects to the allowed one only."""
    rcv = Receiver().start()
    port = int(rcv.url.rsplit(":", 1)[1])
    resolver = FakeResolver({"mixed.test": ["10.9.9.9", "127.0.0.1"]})
    sender = Sender(resolver=resolver)
    await sender.start()
    try:
        resp = await sender.send(request(f"http://mixed.test:{port}/m", LOOPBACK))
    finally:
        await sender.close()
        rcv.stop()
    assert resp.status == 200
    assert loopback_only == []


async def test_socket_factory_checks_the_connected_address_even_if_resolution_is_bypassed(
    trap: Trap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: if the filtered lookup were skipped (a rebinding race, a cache), the
    address is checked again right before connect()."""

    async def unfiltered(
        self: PolicyResolver, host: str, port: int = 0, family: Any = 0
    ) -> list[ResolveResult]:
        return await self.base.resolve(host, port, family)

    monkeypatch.setattr(PolicyResolver, "resolve", unfiltered)
    sender = Sender(resolver=FakeResolver({"rebind.test": ["127.0.0.1"]}))
    await sender.start()
    try:
        resp = await sender.send(request(f"http://rebind.test:{trap.port}/", DEFAULT))
    finally:
        await sender.close()
    assert resp.blocked == "loopback", resp
    assert trap.accepted == 0


async def test_redirects_are_not_followed(trap: Trap) -> None:
    from tests.support.receiver import Response

    rcv = Receiver(
        lambda r: Response(status=302, headers={"Location": f"http://127.0.0.1:{trap.port}/"})
    ).start()
    sender = Sender()
    await sender.start()
    try:
        resp = await sender.send(request(rcv.url + "/r", LOOPBACK))
    finally:
        await sender.close()
        rcv.stop()
    assert resp.status == 302
    assert trap.accepted == 0
