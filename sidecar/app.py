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
from sidecar.consumer import ConsumerRunner
from sidecar.delivery import Sender
from sidecar.endpoints import EndpointGate, EndpointGates
from sidecar.errors import DatabaseError
from sidecar.jetstream import NatsPool, NatsUnavailable
from sidecar.listener import Listener
from sidecar.outbox import OutboxRelay
from sidecar.queries import query
from sidecar.reconcile import reconcile
from sidecar.recorder import Recorder
from sidecar.registry import (
    Registry,
    consumer_from_row,
    keys_from_rows,
    settings_from_row,
    stream_from_row,
    webhook_from_row,
)

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
        self.registry = Registry()
        self.runners: dict[tuple[str, str], ConsumerRunner] = {}
        self.delivered_by_stopped = 0  # deliveries of runners already stopped, for the final log line
        self.sender = Sender()
        self.recorder_stop = asyncio.Event()
        self.stats_due = asyncio.Event()
        self.gates = EndpointGates()
        self.endpoint_due = asyncio.Event()
        self.disable_queue: dict[int, str] = {}
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url,
            min_size=2,
            max_size=settings.db_pool_size,
            open=False,
            name="webhook-worker",
            kwargs={"application_name": f"webhook-worker {settings.worker_name}"},
        )
        self.nats = NatsPool(f"webhook-worker {settings.worker_name}")
        self.recorder = Recorder(self.pool)
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
        await self.sender.start()
        recorder_task = asyncio.create_task(self.recorder.run(self.recorder_stop), name="recorder")
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
                asyncio.create_task(self._endpoint_loop(), name="endpoints"),
            ]
            logger.info(
                "worker %s running (pid %d)",
                self.settings.worker_name,
                os.getpid(),
                extra={"action": "worker_started"},
            )
            await self.stop.wait()
            logger.info("shutting down", extra={"action": "worker_stopping"})
            deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
            stopped = await self._stop_runners(list(self.runners), deadline, write_stats=False)
            self.recorder_stop.set()
            remaining = max(1.0, deadline - asyncio.get_running_loop().time())
            done, pending = await asyncio.wait([*tasks, recorder_task], timeout=remaining)
            for task in pending:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    logger.error(
                        "task %s failed: %s",
                        task.get_name(),
                        task.exception(),
                        extra={"action": "task_failed"},
                    )
            # After the recorder's last commit, so the final counters include the last acknowledgements.
            await self._flush_stats(active=False, only=stopped)
            with contextlib.suppress(psycopg.Error):
                async with self.pool.connection() as conn:
                    await conn.execute(query("worker_stopped"), {"worker_name": self.settings.worker_name})
        finally:
            self.recorder_stop.set()
            recorder_task.cancel()
            await self.sender.close()
            await self.nats.close()
            await self.pool.close()
        total = self.delivered_by_stopped + sum(r.counters.delivered for r in self.runners.values())
        logger.info(
            "worker %s stopped (delivered %d; outbox: %d published, %d failed)",
            self.settings.worker_name,
            total,
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
        """Read the whole registry (the tables are the truth), apply it to JetStream, adjust the runners."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query("nats_config_all"))
            config_rows = await cur.fetchall()
            await cur.execute(query("streams_all"))
            stream_rows = await cur.fetchall()
            await cur.execute(query("consumers_all"))
            consumer_rows = await cur.fetchall()
            await cur.execute(query("webhooks_all"))
            webhook_rows = await cur.fetchall()
            await cur.execute(query("secrets_active"))
            keys = keys_from_rows(await cur.fetchall())
            await cur.execute(query("delivery_settings"))
            settings_row = await cur.fetchone()
        self.connections = {
            r["config_name"]: nats_connection_from_row(r, self.settings.nats_override) for r in config_rows
        }
        streams = {r["stream_name"]: stream_from_row(r) for r in stream_rows}
        consumers = {(c.stream_name, c.consumer_name): c for c in map(consumer_from_row, consumer_rows)}
        self.registry = Registry(
            connections=self.connections,
            streams=streams,
            consumers=consumers,
            webhooks={
                w.webhook_id: w
                for w in (webhook_from_row(r, keys.get(int(r["webhook_id"]), ())) for r in webhook_rows)
            },
            delivery=settings_from_row(settings_row, self.settings.allow_networks),
        )
        wanted = {k for k, c in consumers.items() if c.enabled and k[0] in streams and streams[k[0]].enabled}
        try:
            result = await reconcile(self.registry, self.nats, self.pool, self.settings.worker_name, wanted)
        except Exception:
            # Never let one bad reconcile stop the worker: what runs keeps running, the next reload retries.
            logger.exception(
                "applying the configuration to JetStream failed", extra={"action": "reconcile_failed"}
            )
            return
        loop = asyncio.get_running_loop()
        gone = [k for k in self.runners if k not in wanted]
        if gone:
            await self._stop_runners(gone, loop.time() + self.settings.shutdown_timeout)
        for key in wanted:
            runner = self.runners.get(key)
            if runner is not None:
                runner.update(consumers[key])
                continue
            if key not in result.ok_consumers:
                continue  # the error is in rule_nats_consumer_state; retried at the next reload
            stream = streams[key[0]]
            try:
                client = await self.nats.get(self.connections[stream.config_name])
            except NatsUnavailable as exc:
                logger.warning(
                    "consumer %s/%s waits for NATS: %s", *key, exc, extra={"action": "consumer_waiting"}
                )
                continue
            runner = ConsumerRunner(
                consumers[key],
                client,
                self.pool,
                self.sender,
                self.recorder,
                lambda: self.registry,
                self.settings.worker_name,
                stats_due=self.stats_due,
                gates=self.gates,
                on_endpoint_event=self._on_endpoint_event,
            )
            await runner.start()
            self.runners[key] = runner
        logger.debug(
            "configuration loaded: %d streams, %d consumers running, %d webhooks",
            len(streams),
            len(self.runners),
            len(self.registry.webhooks),
            extra={"action": "config_loaded"},
        )

    async def _stop_runners(
        self, keys: list[tuple[str, str]], deadline: float, write_stats: bool = True
    ) -> list[ConsumerRunner]:
        runners = [self.runners[k] for k in keys if k in self.runners]
        await asyncio.gather(*(r.stop(deadline) for r in runners))
        if write_stats:
            await self._flush_stats(active=False, only=runners)
        for k in keys:
            gone = self.runners.pop(k, None)
            if gone is not None:
                self.delivered_by_stopped += gone.counters.delivered
        return runners

    async def _flush_stats(self, active: bool = True, only: list[ConsumerRunner] | None = None) -> None:
        runners = only if only is not None else list(self.runners.values())
        if not runners:
            return
        try:
            async with self.pool.connection() as conn:
                for r in runners:
                    c = r.counters
                    await conn.execute(
                        query("stats_update"),
                        {
                            "stream": r.cdef.stream_name,
                            "consumer": r.cdef.consumer_name,
                            "worker": self.settings.worker_name,
                            "delivered": c.delivered,
                            "acked": c.acked,
                            "failed": c.failed,
                            "redelivered": c.redelivered,
                            "pending": r.pending,
                            "avg_ms": (c.processing_ms / c.processed) if c.processed else None,
                            "active": active,
                        },
                    )
        except psycopg.Error as exc:
            logger.warning("writing consumer stats failed: %s", exc, extra={"action": "stats_failed"})

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
        """Heartbeat and consumer stats every HEARTBEAT_INTERVAL seconds, stats also every 100 messages;
        a full reload every 30 s heals drift."""
        loop = asyncio.get_running_loop()
        last_reload = last_beat = loop.time()
        while not self.stop.is_set():
            waiters = [asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.stats_due.wait())]
            await asyncio.wait(
                waiters,
                timeout=self.settings.heartbeat_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for w in waiters:
                w.cancel()
            if self.stop.is_set():
                return
            if self.stats_due.is_set() and loop.time() - last_beat < self.settings.heartbeat_interval:
                self.stats_due.clear()
                await self._flush_stats()
                continue
            self.stats_due.clear()
            last_beat = loop.time()
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(query("worker_heartbeat"), {"worker_name": self.settings.worker_name})
            except psycopg.Error as exc:
                logger.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat_failed"})
            for runner in list(self.runners.values()):
                await runner.refresh_pending()
            await self._flush_stats()
            if loop.time() - last_reload > 30:
                last_reload = loop.time()
                self.config_changed.set()

    def _on_endpoint_event(self, key: int | str, gate: EndpointGate, events: list[str]) -> None:
        """A circuit opened or closed, an endpoint backs off or must be disabled: log it, write it soon."""
        name = key
        if isinstance(key, int) and key in self.registry.webhooks:
            name = self.registry.webhooks[key].webhook_name
        for event in events:
            if event == "opened":
                logger.warning(
                    "endpoint %s: circuit open after %d failures, paused until %.0f s from now (%s)",
                    name,
                    gate.failures,
                    (gate.open_until or 0) - gate.last_failure_at if gate.last_failure_at else 0,
                    gate.last_error,
                    extra={"action": "circuit_opened"},
                )
            elif event == "closed":
                logger.info("endpoint %s: circuit closed", name, extra={"action": "circuit_closed"})
            elif event == "backoff":
                logger.info(
                    "endpoint %s: backing off after HTTP %s",
                    name,
                    gate.last_status,
                    extra={"action": "endpoint_backoff"},
                )
            elif event == "disable" and isinstance(key, int):
                logger.warning(
                    "endpoint %s: disabling (%s)", name, gate.disabled, extra={"action": "endpoint_disabled"}
                )
                self.disable_queue[key] = gate.disabled or "disabled by the worker"
        self.endpoint_due.set()

    async def _endpoint_loop(self) -> None:
        """Write endpoint health (on changes at once, otherwise every heartbeat interval) and disables."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.endpoint_due.wait(), timeout=self.settings.heartbeat_interval)
            self.endpoint_due.clear()
            await self._flush_endpoints()

    async def _flush_endpoints(self) -> None:
        disables, self.disable_queue = self.disable_queue, {}
        dirty = [(k, g) for k, g in self.gates.dirty() if isinstance(k, int)]
        if not dirty and not disables:
            return
        try:
            async with self.pool.connection() as conn:
                for webhook_id, reason in disables.items():
                    await conn.execute(
                        query("endpoint_disable"), {"webhook_id": webhook_id, "reason": reason}
                    )
                if dirty:
                    await conn.execute(
                        query("endpoint_state_upsert"),
                        {
                            "worker": self.settings.worker_name,
                            "ids": [k for k, _ in dirty],
                            "circuits": [g.circuit for _, g in dirty],
                            "failures": [g.failures for _, g in dirty],
                            "failing_since": [g.failing_since for _, g in dirty],
                            "open_until": [g.open_until for _, g in dirty],
                            "backoff_until": [g.backoff_until for _, g in dirty],
                            "statuses": [g.last_status for _, g in dirty],
                            "errors": [g.last_error for _, g in dirty],
                            "success_at": [g.last_success_at for _, g in dirty],
                            "failure_at": [g.last_failure_at for _, g in dirty],
                        },
                    )
        except psycopg.Error as exc:
            for _, g in dirty:
                g.dirty = True
            self.disable_queue.update(disables)
            logger.warning(
                "writing endpoint health failed: %s", exc, extra={"action": "endpoint_state_failed"}
            )


def run(settings: Settings) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio works, slower
        return asyncio.run(Worker(settings).run())
    return uvloop.run(Worker(settings).run())
