"""rule_nats_publish authenticates to NATS with user/password, token and nkey from rule_nats_config."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.publish import add_stream
from tests.support.registry import register_stream
from tests.support.stack import NatsServer

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pgnats_for_auth", REPO / "plpython" / "pgnats.py")
assert _spec and _spec.loader
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)


def _server(args: list[str]) -> NatsServer:
    srv = NatsServer(Path(tempfile.mkdtemp(prefix="wwtest-natsauth-")), extra_args=args)
    srv.start()
    return srv


@pytest.fixture
def nkey_server() -> Iterator[tuple[NatsServer, str]]:
    seed = pg.encode_user_seed(os.urandom(32))
    public = pg.user_public_key(pg.decode_user_seed(seed))
    base = Path(tempfile.mkdtemp(prefix="wwtest-natsconf-"))
    conf = base / "nats.conf"
    conf.write_text(f"authorization {{ users = [ {{ nkey: {public} }} ] }}\n")
    srv = _server(["-c", str(conf)])
    yield srv, seed
    srv.cleanup()


def _publish(database_url: str, update_sql: str, params: tuple[object, ...]) -> dict[str, object]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(update_sql, params)
        register_stream(conn, "AUTH", ["auth.>"])
        row = conn.execute("SELECT rule_nats_publish('auth.x', '{\"a\": 1}')").fetchone()
        assert row is not None
        return dict(row[0])


def test_user_password(database_url: str) -> None:
    srv = _server(["--user", "alice", "--pass", "pw with spaces"])
    try:
        add_url = f"nats://alice:pw%20with%20spaces@127.0.0.1:{srv.port}"
        add_stream(add_url.replace("%20", " "), "AUTH", ["auth.>"])
        ack = _publish(
            database_url,
            "UPDATE rule_nats_config SET nats_url = %s, auth_type = 'user_password', nats_user = 'alice', "
            "nats_password = 'pw with spaces' WHERE config_name = 'default'",
            (srv.url,),
        )
        assert ack["stream"] == "AUTH"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE rule_nats_config SET nats_password = 'wrong' WHERE config_name = 'default'")
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT rule_nats_publish('auth.x', '{}')")
            assert "refused the credentials" in str(info.value)
            assert info.value.diag.message_hint and "auth_type" in info.value.diag.message_hint
    finally:
        srv.cleanup()


def test_token(database_url: str) -> None:
    srv = _server(["--auth", "t0ken"])
    try:
        add_stream(f"nats://t0ken@127.0.0.1:{srv.port}", "AUTH", ["auth.>"])
        ack = _publish(
            database_url,
            "UPDATE rule_nats_config SET nats_url = %s, auth_type = 'token', auth_token = 't0ken' "
            "WHERE config_name = 'default'",
            (srv.url,),
        )
        assert ack["stream"] == "AUTH"
    finally:
        srv.cleanup()


def test_nkey(database_url: str, nkey_server: tuple[NatsServer, str]) -> None:
    srv, seed = nkey_server
    # The server verifies our pure-Python ed25519 signature: a real check of the signing code.
    client = pg.Client([srv.url], nkey_seed=seed)
    client.connect()
    created = client.js_api(
        "STREAM.CREATE.AUTH", json.dumps({"name": "AUTH", "subjects": ["auth.>"]}).encode()
    )
    assert created.get("config", {}).get("name") == "AUTH", created
    client.close()
    wrong = pg.Client([srv.url], nkey_seed=pg.encode_user_seed(os.urandom(32)))
    with pytest.raises(pg.AuthFailed):
        wrong.connect()
    ack = _publish(
        database_url,
        "UPDATE rule_nats_config SET nats_url = %s, auth_type = 'nkey', auth_nkey_seed = %s "
        "WHERE config_name = 'default'",
        (srv.url, seed),
    )
    assert ack["stream"] == "AUTH"
