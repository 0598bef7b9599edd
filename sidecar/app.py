"""The sidecar process: pool, listener, NATS connections, outbox relay, heartbeats, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar import __version__
from sidecar.config import NatsConnection, Settings, nats_connection_from_row
from sidecar.errors import DatabaseError
from sidecar.jetstream import NatsPool
from sidecar.listener import Listener
from sidecar.outbox import OutboxRelay
from sidecar.queries import query

logger = logging.getLogger(__name__)

CONFIG_CHANNEL = "rule_nats_config_changed"
OUTBOX_CHANNEL = "rule_nats_outbox"


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.config_changed = asyncio.Event()
        self.outbox_wake = asyncio.Event()
        self.connections: Mapping[str, NatsConnection] = {}
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url,
            min_size=2,
            max_size=settings.db_pool_size,
            open=False,
            name="webhook-worker",
            kwargs={"application_name": f"webhook-worker {settings.worker_name}"},
        )
        self.nats = NatsPool(f"webhook-worker {settings.worker_name}")
        self.relay = OutboxRelay(
            self.pool,
            self.nats,
            lambda: self.connections,
            batch_size=settings.outbox_batch_size,
            poll_interval=settings.outbox_poll_interval,
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.pool.open(wait=True, timeout=30)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            await self._register()
            await self._reload()
            listener = Listener(
                self.settings.database_url,
                {CONFIG_CHANNEL: self.config_changed, OUTBOX_CHANNEL: self.outbox_wake},
            )
            tasks = [
                asyncio.create_task(listener.run(self.stop), name="listener"),
                asyncio.create_task(self._config_loop(), name="config"),
                # Two passes in flight: one publishes while the other's batch is written to PostgreSQL.
                asyncio.create_task(self.relay.run(self.outbox_wake, self.stop), name="outbox-1"),
                asyncio.create_task(self.relay.run(self.outbox_wake, self.stop), name="outbox-2"),
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            ]
            logger.info(
                "worker %s running (pid %d)",
                self.settings.worker_name,
                os.getpid(),
                extra={"action": "worker_started"},
            )
            await self.stop.wait()
            logger.info("shutting down", extra={"action": "worker_stopping"})
            done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
            for task in pending:
                task.cancel()
            for task in done:
                if task.exception() is not None:
                    logger.error(
                        "task %s failed: %s",
                        task.get_name(),
                        task.exception(),
                        extra={"action": "task_failed"},
                    )
            with contextlib.suppress(psycopg.Error):
                async with self.pool.connection() as conn:
                    await conn.execute(query("worker_stopped"), {"worker_name": self.settings.worker_name})
        finally:
            await self.nats.close()
            await self.pool.close()
        logger.info(
            "worker %s stopped (outbox: %d published, %d failed)",
            self.settings.worker_name,
            self.relay.published,
            self.relay.failed,
            extra={"action": "worker_stopped"},
        )
        return 0

    def _on_signal(self, sig: int) -> None:
        logger.info("received %s", signal.Signals(sig).name, extra={"action": "signal"})
        self.stop.set()

    async def _register(self) -> None:
        s = self.settings
        async with self.pool.connection() as conn:
            await conn.execute(
                query("worker_register"),
                {
                    "worker_name": s.worker_name,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                },
            )
            if s.seed is not None:
                await conn.execute(
                    query("register_consumer"),
                    {
                        "stream_name": s.seed.stream_name,
                        "subject": s.seed.subject,
                        "consumer_name": s.seed.consumer_name,
                        "batch_size": s.seed.batch_size,
                    },
                )
                logger.info(
                    "registered consumer %s on stream %s (subject %s) from the environment",
                    s.seed.consumer_name,
                    s.seed.stream_name,
                    s.seed.subject,
                    extra={"action": "seed_registered"},
                )

    async def _reload(self) -> None:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query("nats_config_all"))
            rows = await cur.fetchall()
        self.connections = {
            r["config_name"]: nats_connection_from_row(r, self.settings.nats_override) for r in rows
        }
        logger.debug(
            "configuration loaded: %d NATS connections",
            len(self.connections),
            extra={"action": "config_loaded"},
        )

    async def _config_loop(self) -> None:
        while not self.stop.is_set():
            waiter = asyncio.ensure_future(self.config_changed.wait())
            stopper = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self.stop.is_set():
                return
            self.config_changed.clear()
            try:
                await self._reload()
            except psycopg.Error as exc:
                logger.warning(
                    "configuration reload failed: %s", exc, extra={"action": "config_reload_failed"}
                )
                self.config_changed.set()
                await asyncio.sleep(1)

    async def _heartbeat_loop(self) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=self.settings.heartbeat_interval)
                return
            except TimeoutError:
                pass
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(query("worker_heartbeat"), {"worker_name": self.settings.worker_name})
            except psycopg.Error as exc:
                logger.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat_failed"})


def run(settings: Settings) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio works, slower
        return asyncio.run(Worker(settings).run())
    return uvloop.run(Worker(settings).run())
