"""TLS to NATS, for real: a throwaway CA, a nats-server with TLS (and with client certificates),
rule_nats_publish from PL/Python and the sidecar's nats-py connection."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import psycopg
import pytest
from nats.js.api import StreamConfig

from sidecar.config import NatsConnection
from sidecar.jetstream import NatsPool
from tests.support.registry import register_stream
from tests.support.stack import NatsServer


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(base: Path) -> Path:
    """ca.pem, server.pem/key (127.0.0.1, localhost), client.pem/key, readable by the postgres user."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=wwtest CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=base)  # fmt: skip
    for name, usage, san in (
        ("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        ("client", "clientAuth", "DNS:postgres-client"),
    ):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=base)
        (base / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=base)  # fmt: skip
    base.chmod(0o755)
    for p in base.iterdir():
        p.chmod(0o644)  # PostgreSQL runs as another OS user in the tests
    return base


@pytest.fixture(scope="module")
def pki() -> Path:
    base = Path(tempfile.mkdtemp(prefix="wwtest-pki-"))
    return make_pki(base)


def tls_server(pki: Path, verify_clients: bool) -> NatsServer:
    args = ["--tls", "--tlscert", str(pki / "server.pem"), "--tlskey", str(pki / "server.key")]
    if verify_clients:
        args += ["--tlsverify", "--tlscacert", str(pki / "ca.pem")]
    srv = NatsServer(Path(tempfile.mkdtemp(prefix="wwtest-natstls-")), extra_args=args)
    srv.start()
    return srv


@pytest.fixture
def server(pki: Path) -> Iterator[NatsServer]:
    srv = tls_server(pki, verify_clients=False)
    yield srv
    srv.cleanup()


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[NatsServer]:
    srv = tls_server(pki, verify_clients=True)
    yield srv
    srv.cleanup()


def add_stream(url: str, pki: Path, client_cert: bool = False) -> None:
    async def go() -> None:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if client_cert:
            ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        nc = await nats.connect(url, tls=ctx)
        await nc.jetstream().add_stream(StreamConfig(name="TLS", subjects=["tls.>"]))
        await nc.close()

    asyncio.run(go())


def test_publish_from_sql_over_tls(database_url: str, server: NatsServer, pki: Path) -> None:
    add_stream(server.url, pki)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_config SET nats_url = %s, tls_enabled = true, tls_ca_file = %s",
            (server.url, str(pki / "ca.pem")),
        )
        register_stream(conn, "TLS", ["tls.>"])
        ack = conn.execute("SELECT rule_nats_publish('tls.a', '{\"secure\": true}')").fetchone()
        assert ack is not None and ack[0]["stream"] == "TLS"
        health = conn.execute("SELECT rule_nats_health_check()").fetchone()[0]  # type: ignore[index]
        assert health["ok"] and health["server_version"], health
        # Without our CA the server's certificate is not trusted: a clear error, recorded.
        conn.execute("UPDATE rule_nats_config SET tls_ca_file = NULL")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT rule_nats_publish('tls.a', '{}')")
        assert "certificate" in str(info.value).lower()
        failed = conn.execute(
            "SELECT error_message FROM rule_nats_publish_history WHERE NOT success ORDER BY publish_id DESC LIMIT 1"
        ).fetchone()
        assert failed is not None and "certificate" in failed[0].lower()


def test_client_certificates(database_url: str, mtls_server: NatsServer, pki: Path) -> None:
    add_stream(mtls_server.url, pki, client_cert=True)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_config SET nats_url = %s, tls_enabled = true, tls_ca_file = %s, tls_cert_file = %s, "
            "tls_key_file = %s",
            (mtls_server.url, str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")),
        )
        register_stream(conn, "TLS", ["tls.>"])
        ack = conn.execute("SELECT rule_nats_publish('tls.b', '{}')").fetchone()
        assert ack is not None and ack[0]["stream"] == "TLS"
        conn.execute("UPDATE rule_nats_config SET tls_cert_file = NULL, tls_key_file = NULL")
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT rule_nats_publish('tls.b', '{}')")


async def test_sidecar_connects_with_tls_and_a_client_certificate(mtls_server: NatsServer, pki: Path) -> None:
    conn = NatsConnection(
        config_name="default",
        servers=(mtls_server.url,),
        tls=True,
        tls_ca_file=str(pki / "ca.pem"),
        tls_cert_file=str(pki / "client.pem"),
        tls_key_file=str(pki / "client.key"),
    )
    pool = NatsPool("wwtest tls")
    try:
        client = await pool.get(conn)
        assert client.is_connected
        resp = await client.request("$JS.API.INFO", b"", timeout=5)
        assert "memory" in json.loads(resp.data)
    finally:
        await pool.close()


def test_client_certificates_as_data(database_url: str, mtls_server: NatsServer, pki: Path) -> None:
    """Credentials are data (issue 19, defect 6): PEM text in rule_nats_config, no server file."""
    add_stream(mtls_server.url, pki, client_cert=True)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_config SET nats_url = %s, tls_enabled = true, tls_ca_pem = %s, tls_cert_pem = %s, "
            "tls_key_pem = %s",
            (
                mtls_server.url,
                (pki / "ca.pem").read_text(),
                (pki / "client.pem").read_text(),
                (pki / "client.key").read_text(),
            ),
        )
        register_stream(conn, "TLS", ["tls.>"])
        ack = conn.execute("SELECT rule_nats_publish('tls.c', '{}')").fetchone()
        assert ack is not None and ack[0]["stream"] == "TLS"
        conn.execute("UPDATE rule_nats_config SET tls_cert_pem = NULL, tls_key_pem = NULL")
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT rule_nats_publish('tls.c', '{}')")


async def test_sidecar_connects_with_pem_text(mtls_server: NatsServer, pki: Path) -> None:
    conn = NatsConnection(
        config_name="default",
        servers=(mtls_server.url,),
        tls=True,
        tls_ca_pem=(pki / "ca.pem").read_text(),
        tls_cert_pem=(pki / "client.pem").read_text(),
        tls_key_pem=(pki / "client.key").read_text(),
    )
    pool = NatsPool("wwtest tls pem")
    try:
        client = await pool.get(conn)
        assert client.is_connected
        resp = await client.request("$JS.API.INFO", b"", timeout=5)
        assert "memory" in json.loads(resp.data)
    finally:
        await pool.close()
