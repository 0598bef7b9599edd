"""Changing rule_nats_config while messages are delivered: running consumers move to the new
connection, every message is delivered, and the old connection's closure stops nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.app import Worker
from sidecar.config import Settings
from tests.support.publish import publish_ids
from tests.support.receiver import Receiver, Response
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar, applied, get
from tests.support.stack import NatsServer, free_port
from tests.support.waits import wait_for, wait_until

USERS = {"old-user": "old-secret", "new-user": "new-secret"}


def _write_auth(path: Path, users: dict[str, str]) -> None:
    entries = ", ".join(f'{{user: "{u}", password: "{p}"}}' for u, p in users.items())
    path.write_text(f"authorization {{ users = [ {entries} ] }}\n")


@pytest.fixture
def auth_nats() -> Iterator[tuple[NatsServer, Path]]:
    """A nats-server whose users come from a config file that the test may rewrite and reload."""
    base = Path(tempfile.mkdtemp(prefix="wwtest-nats-auth-"))
    conf = base / "auth.conf"
    base.mkdir(exist_ok=True)
    _write_auth(conf, USERS)
    server = NatsServer(base / "server", extra_args=["-c", str(conf)])
    server.start()
    yield server, conf
    server.cleanup()


def _publish(url: str, ids: range, webhook_url: str, **auth: Any) -> None:
    publish_ids(url, "rot.x", ids, webhook_url, **auth)


def _distinct(receiver: Receiver) -> set[int]:
    return {json.loads(r.body)["id"] for r in receiver.snapshot()}


def _start(
    db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> tuple[Sidecar, str]:
    configure(db, "ROT", "rot", batch_size=20)
    receiver.responder = lambda _req: Response(status=200, delay=0.01)
    port = free_port()
    sidecar = sidecar_factory(
        env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "1"}, name="rot-1"
    )
    wait_ready(db)
    return sidecar, f"http://127.0.0.1:{port}"


def test_password_rotation_during_delivery_moves_consumers_to_the_new_connection(
    database_url: str,
    auth_nats: tuple[NatsServer, Path],
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    record_property: Callable[[str, object], None],
) -> None:
    server, conf = auth_nats
    old = {"user": "old-user", "password": "old-secret"}
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute(
            "UPDATE rule_nats_config SET nats_url = %s, auth_type = 'user_password', nats_user = %s, "
            "nats_password = %s WHERE config_name = 'default'",
            (server.url, old["user"], old["password"]),
        )
        sidecar, base = _start(db, receiver, sidecar_factory)
        n = 1500
        _publish(server.url, range(n), receiver.url + "/r", **old)
        assert wait_until(lambda: len(_distinct(receiver)) >= 200, timeout=20)
        # The rotation: the DBA switches the worker to the new credentials mid-stream.
        db.execute(
            "UPDATE rule_nats_config SET nats_user = 'new-user', nats_password = 'new-secret' "
            "WHERE config_name = 'default'"
        )
        assert wait_until(lambda: _distinct(receiver) == set(range(n)), timeout=40), n - len(
            _distinct(receiver)
        )
        # The old user is removed from the server: whoever still used it is disconnected. The worker
        # must not be among them.
        _write_auth(conf, {"new-user": "new-secret"})
        assert server.proc is not None
        reloads = server.log_file.read_text().count("Reloaded server configuration")
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(
            lambda: server.log_file.read_text().count("Reloaded server configuration"),
            lambda k: k > reloads,
            "nats-server to reload its users",
        )
        _publish(server.url, range(n, n + 300), receiver.url + "/r", user="new-user", password="new-secret")
        assert wait_until(lambda: _distinct(receiver) == set(range(n + 300)), timeout=20), (
            n + 300 - len(_distinct(receiver))
        )
        duplicates = len(receiver.snapshot()) - (n + 300)
        record_property("duplicates", duplicates)
        record_property("longest_gap_s", round(receiver.longest_gap(), 2))
        assert duplicates <= 20, duplicates  # at most what was in flight (batch_size)
        assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=10), get(base + "/readyz")
        # Every delivery is recorded (the last batch may commit a moment after the receiver saw it).
        assert wait_until(
            lambda: (
                scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'")
                == len(receiver.snapshot())
            ),
            timeout=10,
        )
    out = sidecar.output()
    assert out.count("connection closed") < 3, out[-3000:]
    assert "consumer_rebound" in out or "moved to the new NATS connection" in out


def test_a_plain_config_change_during_delivery_loses_nothing(
    nats_db: psycopg.Connection,
    nats_server: NatsServer,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    record_property: Callable[[str, object], None],
) -> None:
    db = nats_db
    sidecar, base = _start(db, receiver, sidecar_factory)
    n = 1000
    _publish(nats_server.url, range(n), receiver.url + "/t")
    assert wait_until(lambda: len(_distinct(receiver)) >= 150, timeout=20)
    with applied(sidecar):
        db.execute("UPDATE rule_nats_config SET request_timeout_seconds = 7 WHERE config_name = 'default'")
    assert wait_until(lambda: _distinct(receiver) == set(range(n)), timeout=40), n - len(_distinct(receiver))
    # Delivery goes on after the change: new messages too.
    _publish(nats_server.url, range(n, n + 100), receiver.url + "/t")
    assert wait_until(lambda: _distinct(receiver) == set(range(n + 100)), timeout=20)
    record_property("duplicates", len(receiver.snapshot()) - (n + 100))
    record_property("longest_gap_s", round(receiver.longest_gap(), 2))
    assert len(receiver.snapshot()) - (n + 100) <= 20
    assert get(base + "/readyz")[0] == 200, get(base + "/readyz")
    assert "connection closed" not in sidecar.output()


async def test_a_consumer_on_a_closed_client_is_not_ready_and_is_moved(
    nats_db: psycopg.Connection, database_url: str
) -> None:
    """However the client got closed, the consumer must not keep pulling through it while the worker
    says it is ready: readiness fails, the runner asks for a reload, the reload moves it."""
    configure(nats_db, "CLOSED", "closed")
    worker = Worker(Settings(database_url=database_url, worker_name="closed-1"))
    await worker.pool.open(wait=True, timeout=10)
    await worker.sender.start()
    try:
        await worker.configuration.reload()
        [runner] = worker.runners.values()
        await runner.client.close()
        assert "consumer CLOSED/workers runs on a closed NATS connection" in worker.readiness.problems()
        await asyncio.wait_for(worker.config_changed.wait(), timeout=5)
        await worker.configuration.reload()
        assert not runner.client.is_closed
        assert [p for p in worker.readiness.problems() if "NATS" in p] == []
    finally:
        for r in worker.runners.values():
            await r.stop(time.monotonic() + 1)
        await worker.sender.close()
        await worker.nats.close()
        await worker.pool.close()
