"""The harness itself: private PostgreSQL (with plpython3u) and nats-server start, die and come back."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

import aiohttp
import nats
import psycopg
import pytest

from tests.support.receiver import Receiver, Response
from tests.support.stack import NatsServer, PostgresCluster


def test_postgres_cluster_has_plpython_and_survives_kill(pg_cluster: PostgresCluster) -> None:
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        conn.execute(
            "CREATE OR REPLACE FUNCTION pg_temp.py_version() RETURNS text LANGUAGE plpython3u "
            "AS $$ import sys; return sys.version $$"
        )
        version = conn.execute("SELECT pg_temp.py_version()").fetchone()
        assert version and version[0].startswith("3.")


def test_own_postgres_can_be_killed_and_restarted() -> None:
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-pgk-")))
    try:
        cluster.start()
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
        cluster.kill()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(cluster.url(), connect_timeout=2)
        cluster.start()
        with psycopg.connect(cluster.url()) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (1,)
    finally:
        cluster.cleanup()


async def test_nats_server_jetstream_and_restart(own_nats_server: NatsServer) -> None:
    nc = await nats.connect(own_nats_server.url, max_reconnect_attempts=0)
    js = nc.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    ack = await js.publish("t.1", b"hello")
    assert ack.seq == 1
    await nc.close()

    own_nats_server.kill()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", own_nats_server.port), timeout=2)
    own_nats_server.start()

    nc = await nats.connect(own_nats_server.url)
    js = nc.jetstream()
    info = await js.stream_info("T")
    assert info.state.messages == 1  # the file store kept the message across the kill
    await nc.close()


async def test_receiver_records_and_answers_as_told() -> None:
    statuses = iter([503, 200])
    rcv = Receiver(lambda req: Response(status=next(statuses), delay=0.01)).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(rcv.url + "/hook?id=1", data=b'{"a":1}') as r1:
                assert r1.status == 503
            async with session.post(rcv.url + "/hook?id=1", data=b'{"a":1}') as r2:
                assert r2.status == 200
        got = rcv.wait_for(2, timeout=5)
        assert [r.path for r in got] == ["/hook?id=1", "/hook?id=1"]
        assert got[0].body == b'{"a":1}'
    finally:
        rcv.stop()
    await asyncio.sleep(0)
