"""delivery.Sender for real: connections go to the address that was checked, whatever DNS
answers afterwards, and TLS still speaks to the name; proxies are ignored, header names go out
as given.

Every address these tests can reach is on loopback: the policy allows only 127.0.0.2, the
receiver listens there, and a trap on 127.0.0.1 (loopback, so blocked) must see no connection.
Names resolve through a stub (the sender's resolver hook) or, for "localhost", from /etc/hosts:
no DNS query leaves the machine, even if the code under test is wrong.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from sidecar import http1
from sidecar.delivery import Request, Sender
from sidecar.ssrf import NetworkPolicy, parse_networks
from tests.support.trap import Trap

ALLOWED = "127.0.0.2"
BLOCKED = "127.0.0.1"  # loopback, outside the policy: the rebinding target
POLICY = NetworkPolicy(parse_networks(f"{ALLOWED}/32"))


class Listener:
    """An HTTP/1.1 server on one loopback address that records what reaches it (and, with TLS,
    the server name the client asked for)."""

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.server_names: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                outer.connections += 1
                if tls is not None:
                    self.request = tls.wrap_socket(self.request, server_side=True)
                super().setup()

            def finish(self) -> None:
                super().finish()
                if tls is not None:
                    self.request.close()  # the TLS wrapper owns the socket now

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.server_names.append(name)  # type: ignore[assignment]
        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def listener_and_trap(tls: ssl.SSLContext | None = None) -> tuple[Listener, Trap]:
    """The receiver on ALLOWED and a trap on BLOCKED, on the same port (a URL names one port)."""
    for _ in range(20):
        listener = Listener(ALLOWED, tls=tls)
        try:
            return listener, Trap(listener.port, hosts=(BLOCKED,))
        except OSError:
            listener.close()
    raise RuntimeError("no port free on both loopback addresses")


@pytest.fixture
def plain() -> Iterator[tuple[Listener, Trap]]:
    listener, trap = listener_and_trap()
    yield listener, trap
    listener.close()
    trap.close()


class RebindingResolver(AbstractResolver):
    """An attacker's DNS: the first answer is ALLOWED, every later one BLOCKED."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        address = ALLOWED if self.calls == 1 else BLOCKED
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


def request(url: str, body: bytes = b'{"n": 1}') -> Request:
    return Request("POST", url, {"Content-Type": "application/json"}, body, 5.0, policy=POLICY)


async def test_one_checked_answer_serves_a_name_over_one_connection(plain: tuple[Listener, Trap]) -> None:
    """The name is "localhost": the stub's first answer (ALLOWED) passes the check; any second
    lookup, by the sender or by a client resolving on its own (/etc/hosts says 127.0.0.1), yields
    BLOCKED. Everything must reach ALLOWED, over one lookup and one kept-alive connection, with
    the name in Host, and nothing the trap."""
    listener, trap = plain
    resolver = RebindingResolver()
    sender = Sender(resolver=resolver)
    await sender.start()
    url = f"http://localhost:{listener.port}/hook?token=t"
    try:
        responses = [await sender.send(request(url, b'{"n": %d}' % i)) for i in range(5)]
    finally:
        await sender.close()
    assert [r.status for r in responses] == [200] * 5, responses
    assert resolver.calls == 1
    assert [body for _, _, body in listener.requests] == [b'{"n": %d}' % i for i in range(5)]
    assert all(h["Host"] == f"localhost:{listener.port}" for _, h, _ in listener.requests)
    assert listener.connections == 1
    assert trap.accepted == 0


async def test_the_rebinding_tests_catch_an_unpinned_client(
    plain: tuple[Listener, Trap], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: the same scenario with the pin left out (the answer is checked, then the connect
    resolves the name on its own) ends in the trap, so the tests here can see a rebinding."""
    listener, trap = plain
    real = Sender._resolve

    async def check_then_resolve_again(
        self: Sender, host: str, port: int, policy: NetworkPolicy
    ) -> list[str]:
        await real(self, host, port, policy)  # the stub's first answer passes the check
        return [host]  # ...and the connect looks the name up itself

    monkeypatch.setattr(Sender, "_resolve", check_then_resolve_again)
    monkeypatch.setattr(http1, "check_address", lambda address, policy: None)
    sender = Sender(resolver=RebindingResolver())
    await sender.start()
    try:
        await sender.send(request(f"http://localhost:{listener.port}/hook"))
    finally:
        await sender.close()
    assert trap.accepted >= 1
    assert listener.requests == []


async def test_a_changed_dns_answer_cannot_redirect_the_delivery_sender(plain: tuple[Listener, Trap]) -> None:
    """The same attack against delivery.Sender, the sender the worker uses: the checked
    answer is the one connected to (PolicyResolver filters it, and http1.Pool
    checks the address again before connect), and a later answer is checked like the first."""
    listener, trap = plain
    resolver = RebindingResolver()
    url = f"http://localhost:{listener.port}/hook"
    sender = Sender(resolver=resolver)
    await sender.start()
    try:
        responses = [await sender.send(request(url, b'{"n": %d}' % i)) for i in range(5)]
    finally:
        await sender.close()
    assert [r.status for r in responses] == [200] * 5, responses
    again = Sender(resolver=resolver)  # no cached answer, no pooled connection: a new lookup
    await again.start()
    try:
        refused = await again.send(request(url))
    finally:
        await again.close()
    assert refused.status is None and refused.blocked == "loopback", refused
    assert resolver.calls == 2
    assert len(listener.requests) == 5
    assert trap.accepted == 0


async def test_proxy_variables_are_ignored(
    plain: tuple[Listener, Trap], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy would connect on the worker's behalf to addresses the policy never saw."""
    listener, trap = plain
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://{BLOCKED}:{trap.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sender = Sender()
    await sender.start()
    try:
        resp = await sender.send(request(f"http://{ALLOWED}:{listener.port}/direct"))
    finally:
        await sender.close()
    assert resp.status == 200, resp
    assert trap.accepted == 0
    assert [path for path, _, _ in listener.requests] == ["/direct"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki() -> Path:
    """A CA, and two server certificates signed by it: for "localhost" (no IP address in it, so
    only a check on the name passes) and for another name."""
    base = Path(tempfile.mkdtemp(prefix="wwtest-pin-pki-"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=wwtest pin CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=base)  # fmt: skip
    for name, san in (("localhost", "DNS:localhost"), ("other", "DNS:other.example")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=base)
        (base / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=base)  # fmt: skip
    return base


def tls_context(pki: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    return ctx


@pytest.mark.parametrize(("cert", "ok"), [("localhost", True), ("other", False)])
async def test_tls_is_verified_on_the_name_over_the_pinned_address(
    pki: Path, monkeypatch: pytest.MonkeyPatch, cert: str, ok: bool
) -> None:
    """https://localhost pinned to ALLOWED: SNI and certificate verification are on "localhost"
    (the certificate names no address), trusted through SSL_CERT_FILE as with OpenSSL."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    listener, trap = listener_and_trap(tls_context(pki, cert))
    resolver = RebindingResolver()
    sender = Sender(resolver=resolver)
    await sender.start()
    try:
        resp = await sender.send(request(f"https://localhost:{listener.port}/secure?token=t"))
    finally:
        await sender.close()
        listener.close()
        trap.close()
    assert trap.accepted == 0
    assert listener.server_names and set(listener.server_names) == {"localhost"}
    if ok:
        assert resp.status == 200, resp
        assert [(path, body) for path, _, body in listener.requests] == [("/secure?token=t", b'{"n": 1}')]
    else:
        assert resp.status is None and resp.error is not None and "certificate" in resp.error.lower(), resp
        assert "token=t" not in resp.error
        assert listener.requests == []


async def test_header_names_go_out_as_given(plain: tuple[Listener, Trap]) -> None:
    """delivery.Sender sends "webhook-id" as "webhook-id" and "X-API-Key" as it is written;
    tests/e2e/test_safety.py reads them so (pyreqwest 0.15 would send "Webhook-Id", "X-Api-Key")."""
    listener, _ = plain
    sender = Sender()
    await sender.start()
    headers = {"Content-Type": "application/json", "webhook-id": "evt-1", "X-API-Key": "k"}
    try:
        resp = await sender.send(
            Request("POST", f"http://{ALLOWED}:{listener.port}/", headers, b"{}", 5.0, policy=POLICY)
        )
    finally:
        await sender.close()
    assert resp.status == 200, resp
    [(_, got, _)] = listener.requests
    assert {k: got.get(k) for k in headers} == headers, got
