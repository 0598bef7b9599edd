"""Shutdown: after stop nothing starts again, and SIGTERM ends within SHUTDOWN_TIMEOUT even when
PostgreSQL is gone."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from sidecar import migrate
from sidecar.app import Worker
from sidecar.config import Settings
from tests.support.publish import publish_ids, publish_raw, settled
from tests.support.receiver import Receiver, Response
from tests.support.registry import configure, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer, PostgresCluster
from tests.support.waits import wait_for, wait_until

logger = logging.getLogger(__name__)


async def test_a_reload_after_stop_starts_no_consumer(nats_db: psycopg.Connection, database_url: str) -> None:
    """The config loop may be half-way through a reload when SIGTERM arrives: what it applies after
    the stop must not start a consumer that shutdown has already stopped (or never saw)."""
    configure(nats_db, "STOPPED", "stopped")
    worker = Worker(Settings(database_url=database_url, worker_name="stop-1"))
    await worker.pool.open(wait=True, timeout=10)
    await worker.sender.start()
    try:
        worker.stop.set()
        await worker.configuration.reload()
        assert worker.runners == {}
    finally:
        for runner in worker.runners.values():
            await runner.stop(time.monotonic() + 1)
        await worker.sender.close()
        await worker.nats.close()
        await worker.pool.close()


def test_sigterm_with_postgresql_down_ends_within_the_shutdown_timeout(
    nats_server: NatsServer, receiver: Receiver
) -> None:
    # A cluster of its own: the session's is shared by every test and must keep running.
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-pgdown-")))
    sidecar: Sidecar | None = None
    try:
        cluster.start()
        url = cluster.url()
        migrate.migrate(url)
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_server.url,)
            )
            configure(db, "PGDOWN", "pgdown", batch_size=10)
            receiver.responder = lambda _req: Response(status=200, delay=0.5)
            sidecar = Sidecar(url, {"SHUTDOWN_TIMEOUT": "5", "HEARTBEAT_INTERVAL": "1"}, name="pgdown-1")
            wait_ready(db)
        publish_raw(
            nats_server.url,
            "pgdown.x",
            [
                json.dumps({"webhook_url": receiver.url + "/d", "data": {"id": i}}).encode()
                for i in range(200)
            ],
        )
        assert wait_until(lambda: len(receiver.snapshot()) >= 10, timeout=20)
        cluster.kill()
        # The deliveries in flight end; their outcomes cannot be recorded.
        wait_for(lambda: sidecar.actions("record_failed"), bool, "an outcome that cannot be recorded")
        started = time.monotonic()
        sidecar.proc.send_signal(15)
        try:
            # A generous bound, 6 times SHUTDOWN_TIMEOUT: the point is that the stop does not wait
            # for PostgreSQL (it waited forever before); the time it took is reported, not asserted.
            code = sidecar.proc.wait(30)
        finally:
            logger.warning(
                "SIGTERM with PostgreSQL down took %.1f s (SHUTDOWN_TIMEOUT=5)", time.monotonic() - started
            )
        assert code == 0, sidecar.output()[-3000:]
    finally:
        if sidecar is not None:
            sidecar.kill()
        cluster.cleanup()


def test_sigterm_hands_back_what_was_only_fetched_ahead(
    nats_db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """SIGTERM finishes what is being sent and hands back (nak) what was only fetched ahead, unsent,
    waiting for a send slot: the stop does not wait to send it, and another worker gets it at once
    rather than after the ack wait (30 s here)."""
    db = nats_db
    configure(db, "AHEAD", "ahead", batch_size=2, ack_wait_seconds=30)
    receiver.responder = lambda _req: Response(status=200, delay=2.0)
    first = sidecar_factory(name="ahead-1")
    wait_ready(db)
    n = 10
    publish_ids(nats_server.url, "ahead.x", range(n), receiver.url + "/a")
    assert wait_until(lambda: len(receiver.snapshot()) >= 2, timeout=15)
    # Two being sent (batch_size 2), two more fetched ahead and waiting for a slot.
    wait_for(
        lambda: settled(nats_server.url, "AHEAD")[1], lambda n: n >= 4, "four messages given to the worker"
    )
    assert first.terminate(timeout=30) == 0, first.output()[-3000:]
    sent_by_first = len(receiver.snapshot())
    assert sent_by_first == 2, f"sent {sent_by_first} after SIGTERM"
    sidecar_factory(name="ahead-2")
    ids = lambda: [json.loads(r.body)["id"] for r in receiver.snapshot()]  # noqa: E731
    # Ten messages, two at a time, 2 s each: 10 s. Waiting for the ack wait would take 30 s more.
    assert wait_until(lambda: set(ids()) == set(range(n)), timeout=20), sorted(ids())
    assert len(ids()) == n  # nothing twice


def test_sigterm_hands_back_what_waits_for_a_slot_when_the_sends_outlast_the_shutdown_timeout(
    nats_db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """What was fetched ahead and waits for a send slot is handed back when SIGTERM comes, not when a
    delivery in flight ends: with sends that outlast SHUTDOWN_TIMEOUT no slot ever came free, the
    waiting messages were cancelled unacknowledged at the deadline and came back only after the ack
    wait (30 s here)."""
    db = nats_db
    configure(db, "STUCK", "stuck", batch_size=2, ack_wait_seconds=30)
    slow = [True]
    receiver.responder = lambda _req: Response(status=200, delay=20.0 if slow[0] else 0.0)
    first = sidecar_factory(env={"SHUTDOWN_TIMEOUT": "2"}, name="stuck-1")
    wait_ready(db)
    n = 10
    publish_ids(nats_server.url, "stuck.x", range(n), receiver.url + "/s")
    assert wait_until(lambda: len(receiver.snapshot()) >= 2, timeout=15)
    # Two being sent (batch_size 2), two more fetched ahead and waiting for a slot.
    wait_for(
        lambda: settled(nats_server.url, "STUCK")[1], lambda n: n >= 4, "four messages given to the worker"
    )
    assert first.terminate(timeout=30) == 0, first.output()[-3000:]
    assert len(receiver.snapshot()) == 2
    slow[0] = False
    sidecar_factory(name="stuck-2")
    ids = lambda: {json.loads(r.body)["id"] for r in receiver.snapshot()}  # noqa: E731
    # The two cut off at the deadline were sent (they are in the snapshot) and come again after the
    # ack wait; every other message is there well before it.
    assert wait_until(lambda: ids() == set(range(n)), timeout=15), sorted(ids())
