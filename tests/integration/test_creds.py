"""Decentralised auth (.creds files), for real: a throwaway operator, account and user, signed
here with the pure-Python ed25519 of plpython/pgnats.py, a nats-server in operator mode, and
both rule_nats_publish and the sidecar logging in with the user's .creds file."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import psycopg
import pytest

from sidecar.config import NatsConnection
from sidecar.jetstream import NatsPool
from tests.support.pgnats import pgnats as pg
from tests.support.registry import register_stream
from tests.support.stack import NatsServer

REPO = Path(__file__).resolve().parents[2]

PREFIX = {"operator": 14 << 3, "account": 0, "user": 20 << 3}


def public_key(kind: str, seed32: bytes) -> str:
    data = bytes([PREFIX[kind]]) + pg.ed25519_public_key(seed32)
    return str(pg._b32encode(data + pg._crc16(data).to_bytes(2, "little")))


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(claims: dict[str, object], issuer_seed: bytes, issuer: str) -> str:
    header = b64u(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = b64u(
        json.dumps({**claims, "iss": issuer, "iat": int(time.time()), "jti": uuid.uuid4().hex}).encode()
    )
    sig = pg.ed25519_sign(issuer_seed, f"{header}.{body}".encode())
    return f"{header}.{body}.{b64u(sig)}"


def creds_text(user_jwt: str, user_seed: str) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n"
    )


@pytest.fixture(scope="module")
def operator_mode() -> Iterator[tuple[NatsServer, Path, Path]]:
    """(server, good.creds, bad.creds): bad.creds carries the user JWT with another key's seed."""
    op, sys_acc, acc, user = (os.urandom(32) for _ in range(4))
    op_pub, sys_pub = public_key("operator", op), public_key("account", sys_acc)
    acc_pub, user_pub = public_key("account", acc), public_key("user", user)
    op_claims = {"type": "operator", "version": 2, "system_account": sys_pub}
    op_jwt = jwt({"sub": op_pub, "name": "wwtest", "nats": op_claims}, op, op_pub)
    sys_jwt = jwt({"sub": sys_pub, "name": "SYS", "nats": {"type": "account", "version": 2}}, op, op_pub)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
              "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}  # fmt: skip
    acc_jwt = jwt(
        {"sub": acc_pub, "name": "APP", "nats": {"type": "account", "version": 2, "limits": limits}},
        op,
        op_pub,
    )
    user_jwt = jwt(
        {"sub": user_pub, "name": "sidecar",
         "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}},
        acc, acc_pub,
    )  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="wwtest-creds-"))
    base.chmod(0o755)
    conf = base / "nats.conf"
    conf.write_text(
        f'operator: "{op_jwt}"\nsystem_account: {sys_pub}\nresolver: MEMORY\n'
        f'resolver_preload: {{\n  {sys_pub}: "{sys_jwt}"\n  {acc_pub}: "{acc_jwt}"\n}}\n'
    )
    good, bad = base / "good.creds", base / "bad.creds"
    good.write_text(creds_text(user_jwt, pg.encode_user_seed(user)))
    bad.write_text(creds_text(user_jwt, pg.encode_user_seed(os.urandom(32))))
    for p in (good, bad):
        p.chmod(0o644)  # PostgreSQL runs as another OS user in the tests
    srv = NatsServer(base / "nats", extra_args=["-c", str(conf)])
    srv.start()

    async def make_stream() -> None:
        nc = await nats.connect(srv.url, user_credentials=str(good))
        await nc.jetstream().add_stream(name="CREDS", subjects=["creds.>"])
        await nc.close()

    asyncio.run(make_stream())
    yield srv, good, bad
    srv.cleanup()


async def test_sidecar_logs_in_with_a_creds_file(operator_mode: tuple[NatsServer, Path, Path]) -> None:
    srv, good, _ = operator_mode
    pool = NatsPool("wwtest creds")
    try:
        conn = NatsConnection("default", (srv.url,), auth_type="credentials", credentials_file=str(good))
        client = await pool.get(conn)
        ack = await client.jetstream(timeout=5).publish("creds.x", b"{}")
        assert ack.stream == "CREDS"
    finally:
        await pool.close()


def test_publish_from_sql_with_a_creds_file(
    database_url: str, operator_mode: tuple[NatsServer, Path, Path]
) -> None:
    srv, good, bad = operator_mode
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_config SET nats_url = %s, auth_type = 'credentials', auth_credentials_file = %s",
            (srv.url, str(good)),
        )
        register_stream(conn, "CREDS", ["creds.>"])
        ack = conn.execute("SELECT rule_nats_publish('creds.sql', '{\"via\": \"creds\"}')").fetchone()
        assert ack is not None and ack[0]["stream"] == "CREDS"
        # The same JWT with a seed that does not match it: the server refuses the signature.
        conn.execute("UPDATE rule_nats_config SET auth_credentials_file = %s", (str(bad),))
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT rule_nats_publish('creds.sql', '{}')")
        assert "credentials" in str(info.value).lower() or "authorization" in str(info.value).lower()


async def test_sidecar_logs_in_with_creds_text(operator_mode: tuple[NatsServer, Path, Path]) -> None:
    """Credentials are data (issue 19, defect 6): the .creds text in rule_nats_config.auth_credentials."""
    srv, good, _ = operator_mode
    pool = NatsPool("wwtest creds text")
    try:
        conn = NatsConnection("default", (srv.url,), auth_type="credentials", credentials=good.read_text())
        client = await pool.get(conn)
        ack = await client.jetstream(timeout=5).publish("creds.y", b"{}")
        assert ack.stream == "CREDS"
    finally:
        await pool.close()


def test_publish_from_sql_with_creds_text(
    database_url: str, operator_mode: tuple[NatsServer, Path, Path]
) -> None:
    srv, good, bad = operator_mode
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_config SET nats_url = %s, auth_type = 'credentials', auth_credentials = %s",
            (srv.url, good.read_text()),
        )
        register_stream(conn, "CREDS", ["creds.>"])
        ack = conn.execute("SELECT rule_nats_publish('creds.text', '{}')").fetchone()
        assert ack is not None and ack[0]["stream"] == "CREDS"
        conn.execute("UPDATE rule_nats_config SET auth_credentials = %s", (bad.read_text(),))
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT rule_nats_publish('creds.text', '{}')")
        assert "credentials" in str(info.value).lower() or "authorization" in str(info.value).lower()
