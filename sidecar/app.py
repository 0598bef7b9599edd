"""The sidecar process: opens the pool and the NATS pool, wires the three parts of the worker
(configuration, heartbeat, readiness: sidecar.configuration, sidecar.heartbeat, sidecar.readiness),
the listener, the outbox relay and the recorder, and stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar import __version__
from sidecar.config import Settings
from sidecar.configuration import Configuration, NatsLink
from sidecar.consumer import ConsumerRunner
from sidecar.delivery import Sender
from sidecar.endpoints import EndpointGates
from sidecar.errors import DatabaseError
from sidecar.health import HealthServer
from sidecar.heartbeat import Heartbeat
from sidecar.jetstream import NatsPool
from sidecar.listener import Listener
from sidecar.metrics import Metrics
from sidecar.outbox import OutboxRelay
from sidecar.queries import query
from sidecar.readiness import Readiness
from sidecar.recorder import Recorder
from sidecar.supervise import TaskHealth, supervise
from sidecar.worker_state import Events, Io, WorkerState

logger = logging.getLogger(__name__)

CONFIG_CHANNEL = "rule_nats_config_changed"
OUTBOX_CHANNEL = "rule_nats_outbox"
REFRESH_CHANNEL = "rule_nats_refresh"
RECONNECT_SECONDS = 8.0  # a pool connection attempt gives up after this; the next use starts anew
# Seconds the final stats and the stopped mark may take after SHUTDOWN_TIMEOUT is used up (also
# the pool's close): a slack of seconds, not of pool timeouts, when PostgreSQL is gone.
FINAL_WRITES_SECONDS = 1.0
# At shutdown the background tasks (relay passes, heartbeat, listener, ...) get this long to finish
# what they are doing, then they are cancelled: one waiting for a NATS that does not answer must
# not hold up SIGTERM. The recorder is not one of them: it gets what is left of SHUTDOWN_TIMEOUT.
TASK_GRACE_SECONDS = 1.0


class Worker:
    """Wires the parts and runs them: ``run`` starts the background tasks, waits for SIGTERM and
    stops everything within SHUTDOWN_TIMEOUT, the consumers first and the recorder last."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        events = Events()
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url,
            min_size=2,
            max_size=settings.db_pool_size,
            open=False,
            name="webhook-worker",
            kwargs={"application_name": f"webhook-worker {settings.worker_name}"},
        )
        # The callbacks reach parts built below: a NATS client closes or connects only once run() runs.
        self.nats = NatsPool(
            f"webhook-worker {settings.worker_name}",
            in_use=lambda: {c for r in self.runners.values() for c in r.clients_in_use()},
            on_change=lambda name, connected: self.nats_link.on_nats_change(name, connected),
        )
        self.sender = Sender()
        self.recorder = Recorder(self.pool, worker_name=settings.worker_name)
        self.relay = OutboxRelay(
            self.pool,
            self.nats,
            lambda: self.state.connections,
            batch_size=settings.outbox_batch_size,
            poll_interval=settings.outbox_poll_interval,
            registered=lambda config, subject: self.configuration.registered_subject(config, subject),
        )
        metrics = Metrics(lambda: self.readiness.snapshot())
        io = Io(self.pool, self.nats, self.sender, self.recorder, self.relay, EndpointGates(), metrics)
        self.state = WorkerState(settings, events, io)
        self.readiness = Readiness(self.state)
        self.heartbeat = Heartbeat(self.state, self.readiness.components)
        self.configuration = Configuration(self.state, self.heartbeat.flush_stats)
        self.nats_link = NatsLink(self.state)
        self.health = (
            HealthServer(
                settings.metrics_addr, metrics, self.readiness.components, settings.metrics_addr_file
            )
            if settings.metrics_addr
            else None
        )
        # Handles tests and the CLI reach for.
        self.stop = events.stop
        self.config_changed = events.config_changed
        self.runners = self.state.runners

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.state.started_at = loop.time()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self._open_pool()
        await self.sender.start()
        if self.health is not None:
            await self.health.start()
        recorder_stop = self.state.events.recorder_stop
        recorder_task = self._supervised(
            "recorder",
            lambda: self.recorder.run(recorder_stop),
            recorder_stop,
            progress=lambda: self.recorder.commits,
        )
        try:
            await self._register()
            # Registering wrote the worker's row (its first heartbeat): PostgreSQL is fine, and
            # readiness must not say otherwise until the next heartbeat, HEARTBEAT_INTERVAL later.
            self.state.last_db_ok = asyncio.get_running_loop().time()
            tasks, config_task = await self._start()
            await self.stop.wait()
            await self._shutdown(tasks, config_task, recorder_task)
        finally:
            recorder_stop.set()
            recorder_task.cancel()
            self.heartbeat.cancel_purge()
            if self.health is not None:
                await self.health.stop()
            await self.sender.close()
            await self.nats.close()
            await self.pool.close(timeout=FINAL_WRITES_SECONDS)
        logger.info(
            "worker %s stopped (delivered %d; outbox: %d published, %d failed)",
            self.settings.worker_name,
            self.state.totals().delivered,
            self.relay.published,
            self.relay.failed,
            extra={"action": "worker_stopped"},
        )
        return 0

    async def _start(self) -> tuple[list[asyncio.Task[None]], asyncio.Task[None]]:
        """The first reload, then every background task; returns them and the configuration's."""
        ev = self.state.events
        # Neither depends on NATS: heartbeats go on, and the connections are tried (and their
        # problems reported), while the first reload waits for a NATS that does not answer.
        tasks = [
            self._supervised("heartbeat", self.heartbeat.loop, self.stop),
            self._supervised("nats", self.nats_link.loop, self.stop),
        ]
        try:
            await self.configuration.first_reload()
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        listener = Listener(
            self.settings.database_url,
            {
                CONFIG_CHANNEL: ev.config_changed,
                OUTBOX_CHANNEL: ev.outbox_wake,
                REFRESH_CHANNEL: ev.refresh_due,
            },
        )
        config_task = self._supervised("config", self.configuration.loop, self.stop)
        tasks += [
            self._supervised("listener", lambda: listener.run(self.stop), self.stop),
            config_task,
            # Two passes in flight: one publishes while the other's batch is written to PostgreSQL.
            self._supervised("outbox-1", lambda: self.relay.run(ev.outbox_wake, self.stop), self.stop),
            self._supervised("outbox-2", lambda: self.relay.run(ev.outbox_wake, self.stop), self.stop),
            self._supervised("refresh", self.heartbeat.refresh_loop, self.stop),
            self._supervised("endpoints", self.heartbeat.endpoint_loop, self.stop),
            self._supervised("summary", self.heartbeat.summary_loop, self.stop),
        ]
        logger.info(
            "worker %s running (pid %d)",
            self.settings.worker_name,
            os.getpid(),
            extra={"action": "worker_started"},
        )
        return tasks, config_task

    async def _shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        config_task: asyncio.Task[None],
        recorder_task: asyncio.Task[None],
    ) -> None:
        logger.info("shutting down", extra={"action": "worker_stopping"})
        # One budget for the whole shutdown, on the clock the runners use.
        deadline = time.monotonic() + self.settings.shutdown_timeout
        # A reload half-way through (reconciling, starting a runner) ends here, before the runners
        # are stopped, so nothing it was about to start appears after them; Configuration checks
        # the stop event too.
        config_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([config_task], timeout=max(0.0, deadline - time.monotonic()))
        stopped = await self.configuration.stop_runners(list(self.runners), deadline, write_stats=False)
        self.state.events.recorder_stop.set()
        # The tasks finish what they are doing, briefly (a relay pass, a heartbeat); what still
        # waits then (for NATS, say) is cancelled: an unfinished relay pass rolls back, and its
        # rows are published again (JetStream drops the copies by their message id).
        grace = min(TASK_GRACE_SECONDS, max(0.0, deadline - time.monotonic()))
        done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=FINAL_WRITES_SECONDS)
        # The recorder commits what the stopped runners delivered, for the rest of the budget.
        remaining = max(1.0, deadline - time.monotonic())
        recorded, unrecorded = await asyncio.wait([recorder_task], timeout=remaining)
        for task in unrecorded:
            task.cancel()
        for task in {*done, *recorded}:
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "task %s failed: %s", task.get_name(), task.exception(), extra={"action": "task_failed"}
                )
        if self.settings.summary_interval > 0:
            self.heartbeat.log_summary()
        # After the recorder's last commit, so the final counters include the last acknowledgements.
        # Bounded: with PostgreSQL gone each of these would wait for a pool connection (30 s),
        # and SIGTERM must end within SHUTDOWN_TIMEOUT. Unwritten, the worker shows as STALE.
        try:
            await asyncio.wait_for(
                self._final_writes(stopped), timeout=max(FINAL_WRITES_SECONDS, deadline - time.monotonic())
            )
        except TimeoutError:
            logger.warning(
                "final stats and the stopped mark were not written (PostgreSQL unreachable)",
                extra={"action": "final_writes_failed"},
            )

    async def _final_writes(self, stopped: list[ConsumerRunner]) -> None:
        await self.heartbeat.flush_stats(active=False, only=stopped)
        with contextlib.suppress(psycopg.Error):
            async with self.pool.connection() as conn:
                await conn.execute(query("worker_stopped"), {"worker_name": self.settings.worker_name})
                # After the recorder's last commit: a lease still held is a retry whose attempt was
                # cancelled or never recorded; another worker may take it now, not in 10 minutes.
                await self._release_retry_leases(conn)

    def _supervised(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        stop: asyncio.Event,
        progress: Callable[[], int] | None = None,
    ) -> asyncio.Task[None]:
        """A background task that is restarted when it fails, and reported by /readyz meanwhile."""
        health = self.state.task_health[name] = TaskHealth(name)
        if progress is not None:
            health.progress = progress
        return asyncio.create_task(supervise(run, health, stop), name=name)

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
                    "interval": s.heartbeat_interval,
                },
            )
            # A worker of this name that died left its retry leases behind: this one is its successor.
            await self._release_retry_leases(conn)
            # What the summary line and /metrics say about the backlog before the first heartbeat.
            await self.heartbeat.read_backlog(conn)
        # The first reload registers the rows (it may wait for NATS: see sidecar.seed).
        self.configuration.seed.pending = s.seed is not None

    async def _release_retry_leases(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(query("retries_release_mine"), {"worker": self.settings.worker_name})
        if cur.rowcount:
            logger.info(
                "released %d retry leases of worker %s",
                cur.rowcount,
                self.settings.worker_name,
                extra={"action": "retry_leases_released"},
            )

    async def _open_pool(self) -> None:
        try:
            await self.pool.open(wait=True, timeout=30)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc
        # psycopg_pool retries a lost connection with a doubling delay and no cap: after a 36 s
        # outage the next attempt came 27 s after PostgreSQL was back, and delivery waited for it.
        # Giving up an attempt after RECONNECT_SECONDS lets the next use start a fresh one (1 s,
        # 2 s, 4 s...). Only once open: while the pool opens nobody uses it, so an attempt given up
        # then left it short until the 30 s were over, PostgreSQL back or not.
        self.pool.reconnect_timeout = RECONNECT_SECONDS


def run(settings: Settings) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio works, slower
        return asyncio.run(Worker(settings).run())
    return uvloop.run(Worker(settings).run())
