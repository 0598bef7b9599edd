"""The sidecar process: pool, listener, NATS connections, outbox relay, heartbeats, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from sidecar import __version__
from sidecar.coalesce import Coalescer
from sidecar.config import NatsConnection, Settings, nats_connection_from_row
from sidecar.consumer import ConsumerRunner, Counters
from sidecar.delivery import Sender
from sidecar.endpoint_health import write_endpoint_health
from sidecar.endpoints import EndpointGate, EndpointGates
from sidecar.errors import DatabaseError
from sidecar.jetstream import NatsPool, NatsUnavailable
from sidecar.listener import Listener
from sidecar.lookup import read_webhook
from sidecar.metrics import Component, ConsumerSnapshot, HealthServer, Metrics, Snapshot, with_stopped
from sidecar.outbox import OutboxRelay
from sidecar.queries import query
from sidecar.reconcile import adopted_consumer, adopted_stream, observe, reconcile
from sidecar.recorder import Outcome as RecorderOutcome
from sidecar.recorder import Recorder
from sidecar.registry import (
    Registry,
    consumer_from_row,
    keys_from_rows,
    settings_from_row,
    stream_from_row,
    webhook_from_row,
)
from sidecar.retention import purge_when_due
from sidecar.stats import Totals, stats_key, totals
from sidecar.supervise import TaskHealth, supervise
from sidecar.validation import subject_matches

logger = logging.getLogger(__name__)

CONFIG_CHANNEL = "rule_nats_config_changed"
OUTBOX_CHANNEL = "rule_nats_outbox"
REFRESH_CHANNEL = "rule_nats_refresh"
# NOTIFY costs nothing to send and any login may send it: at most two registry reads and two
# JetStream state reads a second, whatever arrives (docs/operations.md).
CONFIG_MIN_INTERVAL = 0.5
REFRESH_MIN_INTERVAL = 0.5
# A reload applies the registry even when its rows did not change this often, so what changed in
# JetStream behind the worker's back (a stream edited with the nats CLI) is put back in shape.
HEAL_INTERVAL = 30.0
STATS_MIN_INTERVAL = 1.0  # seconds between consumer-stats writes triggered by traffic (every 100 messages)
RECONNECT_SECONDS = 8.0  # a pool connection attempt gives up after this; the next use starts anew
# The connection STREAM_NAME/SUBJECT register their stream on (NATS_URL etc. override it).
SEED_CONFIG = "default"
# Seconds the final stats and the stopped mark may take after SHUTDOWN_TIMEOUT is used up (also
# the pool's close): a slack of seconds, not of pool timeouts, when PostgreSQL is gone.
FINAL_WRITES_SECONDS = 1.0
# At shutdown the background tasks (relay passes, heartbeat, listener, ...) get this long to finish
# what they are doing, then they are cancelled: one waiting for a NATS that does not answer must
# not hold up SIGTERM. The recorder is not one of them: it gets what is left of SHUTDOWN_TIMEOUT.
TASK_GRACE_SECONDS = 1.0
# How often the configured NATS connections that have no client are tried (see _nats_loop).
NATS_PROBE_INTERVAL = 1.0

# The queries of one registry read, in the order of RegistryRows' fields.
REGISTRY_QUERIES = (
    "nats_config_all",
    "streams_all",
    "consumers_all",
    "webhooks_all",
    "secrets_active",
    "delivery_settings",
)


@dataclass(frozen=True, slots=True)
class RegistryRows:
    """One read of the registry tables, row for row (each query has an ORDER BY, so equal tables
    read equal): comparing two reads says whether there is anything to apply."""

    configs: tuple[dict[str, Any], ...]
    streams: tuple[dict[str, Any], ...]
    consumers: tuple[dict[str, Any], ...]
    webhooks: tuple[dict[str, Any], ...]
    secrets: tuple[dict[str, Any], ...]
    settings: tuple[dict[str, Any], ...]

    def __repr__(self) -> str:  # the rows hold secrets
        return f"RegistryRows({len(self.streams)} streams, {len(self.consumers)} consumers, ...)"


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.config_changed = asyncio.Event()
        self.outbox_wake = asyncio.Event()
        self.connections: Mapping[str, NatsConnection] = {}
        self.registry = Registry()
        self.runners: dict[tuple[str, str], ConsumerRunner] = {}
        # What each runner's counters were at its last committed stats report.
        self._reported: weakref.WeakKeyDictionary[ConsumerRunner, Totals] = weakref.WeakKeyDictionary()
        self.stopped_totals = Counters()  # counters of runners already stopped (metrics, final log line)
        # The same per consumer: a restarted runner's metrics go on from its predecessors'.
        self.stopped_by_key: dict[tuple[str, str], ConsumerSnapshot] = {}
        self.refresh_due = asyncio.Event()
        self.backlog: dict[str, int] = {}
        self.last_db_ok = 0.0  # loop time of the last successful heartbeat
        self.last_db_error: str | None = None  # why the last heartbeat failed, until one succeeds
        self.loaded = False  # the registry has been read (readiness: "configuration")
        self.missing_consumers: set[tuple[str, str]] = set()
        self.missing_streams: set[str] = set()
        # Registry reads, applications to JetStream and JetStream state reads (metrics, tests).
        self.config_reloads = 0
        self.config_applies = 0
        self.state_refreshes = 0
        # The rows of the last reload that applied completely; equal rows at the next reload mean
        # there is nothing to apply (a NOTIFY without a change, e.g. a flood).
        self._applied_rows: RegistryRows | None = None
        self._heal_due = False
        self._rebind_due = False  # a runner's NATS client was closed: the next reload applies
        self._seed_pending = False  # STREAM_NAME/SUBJECT rows not registered yet (NATS did not answer)
        self._observe_lock = asyncio.Lock()
        self.wanted: set[tuple[str, str]] = set()
        self._purge_task: asyncio.Task[None] | None = None
        self._summary_base: tuple[float, Counters, int] | None = None
        self.started_at = 0.0
        self._last_activity: tuple[int, int, int] | None = None  # counters at the last heartbeat
        self.metrics = Metrics(self.snapshot)
        self.health = (
            HealthServer(settings.metrics_addr, self.metrics, self.components, settings.metrics_addr_file)
            if settings.metrics_addr
            else None
        )
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
        self.nats = NatsPool(
            f"webhook-worker {settings.worker_name}",
            in_use=self._clients_in_use,
            on_change=self._on_nats_change,
        )
        self.recorder = Recorder(self.pool, worker_name=settings.worker_name)
        self.task_health: dict[str, TaskHealth] = {}
        self.relay = OutboxRelay(
            self.pool,
            self.nats,
            lambda: self.connections,
            batch_size=settings.outbox_batch_size,
            poll_interval=settings.outbox_poll_interval,
            registered=self._registered_subject,
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self._open_pool()
        await self.sender.start()
        if self.health is not None:
            await self.health.start()
        recorder_task = self._supervised(
            "recorder",
            lambda: self.recorder.run(self.recorder_stop),
            self.recorder_stop,
            progress=lambda: self.recorder.commits,
        )
        try:
            await self._register()
            # Registering wrote the worker's row (its first heartbeat): PostgreSQL is fine, and
            # readiness must not say otherwise until the next heartbeat, HEARTBEAT_INTERVAL later.
            self.last_db_ok = asyncio.get_running_loop().time()
            # Neither depends on NATS: heartbeats go on, and the connections are tried (and their
            # problems reported), while the first reload waits for a NATS that does not answer.
            tasks = [
                self._supervised("heartbeat", self._heartbeat_loop, self.stop),
                self._supervised("nats", self._nats_loop, self.stop),
            ]
            try:
                await self._first_reload()
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
            listener = Listener(
                self.settings.database_url,
                {
                    CONFIG_CHANNEL: self.config_changed,
                    OUTBOX_CHANNEL: self.outbox_wake,
                    REFRESH_CHANNEL: self.refresh_due,
                },
            )
            config_task = self._supervised("config", self._config_loop, self.stop)
            tasks += [
                self._supervised("listener", lambda: listener.run(self.stop), self.stop),
                config_task,
                # Two passes in flight: one publishes while the other's batch is written to PostgreSQL.
                self._supervised("outbox-1", lambda: self.relay.run(self.outbox_wake, self.stop), self.stop),
                self._supervised("outbox-2", lambda: self.relay.run(self.outbox_wake, self.stop), self.stop),
                self._supervised("refresh", self._refresh_loop, self.stop),
                self._supervised("endpoints", self._endpoint_loop, self.stop),
                self._supervised("summary", self._summary_loop, self.stop),
            ]
            logger.info(
                "worker %s running (pid %d)",
                self.settings.worker_name,
                os.getpid(),
                extra={"action": "worker_started"},
            )
            await self.stop.wait()
            logger.info("shutting down", extra={"action": "worker_stopping"})
            # One budget for the whole shutdown, on the clock the runners use.
            deadline = time.monotonic() + self.settings.shutdown_timeout
            # A reload half-way through (reconciling, starting a runner) ends here, before the runners
            # are stopped, so nothing it was about to start appears after them; _apply checks
            # self.stop too.
            config_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([config_task], timeout=max(0.0, deadline - time.monotonic()))
            stopped = await self._stop_runners(list(self.runners), deadline, write_stats=False)
            self.recorder_stop.set()
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
                        "task %s failed: %s",
                        task.get_name(),
                        task.exception(),
                        extra={"action": "task_failed"},
                    )
            if self.settings.summary_interval > 0:
                self._log_summary()
            # After the recorder's last commit, so the final counters include the last acknowledgements.
            # Bounded: with PostgreSQL gone each of these would wait for a pool connection (30 s),
            # and SIGTERM must end within SHUTDOWN_TIMEOUT. Unwritten, the worker shows as STALE.
            try:
                await asyncio.wait_for(
                    self._final_writes(stopped),
                    timeout=max(FINAL_WRITES_SECONDS, deadline - time.monotonic()),
                )
            except TimeoutError:
                logger.warning(
                    "final stats and the stopped mark were not written (PostgreSQL unreachable)",
                    extra={"action": "final_writes_failed"},
                )
        finally:
            self.recorder_stop.set()
            recorder_task.cancel()
            if self._purge_task is not None:
                self._purge_task.cancel()
            if self.health is not None:
                await self.health.stop()
            await self.sender.close()
            await self.nats.close()
            await self.pool.close(timeout=FINAL_WRITES_SECONDS)
        total = self.stopped_totals.delivered + sum(r.counters.delivered for r in self.runners.values())
        logger.info(
            "worker %s stopped (delivered %d; outbox: %d published, %d failed)",
            self.settings.worker_name,
            total,
            self.relay.published,
            self.relay.failed,
            extra={"action": "worker_stopped"},
        )
        return 0

    async def _final_writes(self, stopped: list[ConsumerRunner]) -> None:
        await self._flush_stats(active=False, only=stopped)
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
        health = self.task_health[name] = TaskHealth(name)
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
            await self._read_backlog(conn)
        # The first reload registers the rows (it may wait for NATS: see _seed).
        self._seed_pending = s.seed is not None

    async def _first_reload(self) -> None:
        """The reload at start; SIGTERM meanwhile (NATS does not answer, say) ends it."""
        reload = asyncio.create_task(self._reload(), name="first reload")
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([reload, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not reload.done():
            reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reload
            return
        reload.result()  # a PostgreSQL error ends the start, as before

    async def _seed(self) -> None:
        """STREAM_NAME/SUBJECT/QUEUE_GROUP: register the stream and consumer when the registry lacks
        them, adopting what JetStream already has as it is (rule_nats_adopt_consumer).

        The original worker never changed a stream: one created by an operator with three replicas
        must not become a row with the defaults, which the reconcile would then apply. So the rows are
        written only once JetStream has answered whether the stream exists; until then (NATS down)
        each reload tries again, and nothing is registered or reconciled for them meanwhile.
        """
        seed = self.settings.seed
        if seed is None or not self._seed_pending:
            return
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query("nats_config_all"))
            rows = {r["config_name"]: r for r in await cur.fetchall()}
        if SEED_CONFIG not in rows:
            logger.warning(
                "no NATS configuration %r to seed with", SEED_CONFIG, extra={"action": "seed_waiting"}
            )
            return
        nats_conn = nats_connection_from_row(rows[SEED_CONFIG], self.settings.nats_override)
        try:
            client = await self.nats.get(nats_conn)
            js = client.jetstream(timeout=nats_conn.request_timeout)
            stream: dict[str, Any] | None = None
            consumer: dict[str, Any] | None = None
            with contextlib.suppress(nats.js.errors.NotFoundError):
                stream = adopted_stream((await js.stream_info(seed.stream_name)).config)
            if stream is not None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    consumer = adopted_consumer(
                        (await js.consumer_info(seed.stream_name, seed.consumer_name)).config
                    )
        except (NatsUnavailable, nats.errors.Error, TimeoutError) as exc:
            logger.warning(
                "cannot ask JetStream about stream %s yet (%s); registering it later",
                seed.stream_name,
                exc,
                extra={"action": "seed_waiting"},
            )
            return
        async with self.pool.connection() as conn:
            await conn.execute(
                query("adopt_consumer"),
                {
                    "stream_name": seed.stream_name,
                    "subject": seed.subject,
                    "consumer_name": seed.consumer_name,
                    "batch_size": seed.batch_size,
                    "config_name": SEED_CONFIG,
                    "stream": None if stream is None else Jsonb(stream),
                    "consumer": None if consumer is None else Jsonb(consumer),
                },
            )
        self._seed_pending = False
        logger.info(
            "registered consumer %s on stream %s (subject %s) from the environment%s",
            seed.consumer_name,
            seed.stream_name,
            seed.subject,
            "" if stream is None else " (rows that were missing copy the stream as JetStream has it)",
            extra={"action": "seed_registered", "adopted": stream is not None},
        )

    async def _release_retry_leases(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(query("retries_release_mine"), {"worker": self.settings.worker_name})
        if cur.rowcount:
            logger.info(
                "released %d retry leases of worker %s",
                cur.rowcount,
                self.settings.worker_name,
                extra={"action": "retry_leases_released"},
            )

    async def _reload(self) -> None:
        """Read the whole registry (the tables are the truth); apply it to JetStream and adjust the
        runners unless it is what the last complete application applied."""
        await self._seed()
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            read = []
            for name in REGISTRY_QUERIES:
                await cur.execute(query(name))
                read.append(tuple(await cur.fetchall()))
        rows = RegistryRows(*read)
        self.config_reloads += 1
        self.loaded = True
        unchanged = rows == self._applied_rows
        if unchanged and not (
            self._heal_due or self._rebind_due or self.missing_consumers or self.missing_streams
        ):
            logger.debug("configuration unchanged", extra={"action": "config_unchanged"})
            return
        self._heal_due = self._rebind_due = False
        self.config_applies += 1
        logger.debug(
            "applying the configuration (%s)",
            "unchanged, healing" if unchanged else "changed",
            extra={"action": "config_apply"},
        )
        complete = await self._apply(rows)
        self._applied_rows = rows if complete else None

    async def _apply(self, rows: RegistryRows) -> bool:
        """Build the registry from the rows, apply it to JetStream, adjust the runners; True when
        everything wanted is in place (otherwise the next reload applies again)."""
        was_disabled = {w.webhook_id for w in self.registry.webhooks.values() if not w.enabled}
        keys = keys_from_rows(list(rows.secrets))
        settings_row = rows.settings[0] if rows.settings else None
        self.connections = {
            r["config_name"]: nats_connection_from_row(r, self.settings.nats_override) for r in rows.configs
        }
        streams = {r["stream_name"]: stream_from_row(r) for r in rows.streams}
        consumers = {(c.stream_name, c.consumer_name): c for c in map(consumer_from_row, rows.consumers)}
        self.registry = Registry(
            connections=self.connections,
            streams=streams,
            consumers=consumers,
            webhooks={
                w.webhook_id: w
                for w in (webhook_from_row(r, keys.get(int(r["webhook_id"]), ())) for r in rows.webhooks)
            },
            delivery=settings_from_row(settings_row, self.settings.allow_networks),
        )
        reenabled = tuple(
            w
            for w in sorted(was_disabled)
            if w in self.registry.webhooks and self.registry.webhooks[w].enabled
        )
        if reenabled:
            # Queued behind any delivery the runners held on the old registry (the recorder writes
            # in order), so none of them waits out HELD_SECONDS after the endpoint is enabled.
            await self.recorder.submit(RecorderOutcome(release_webhooks=reenabled))
        wanted = {k for k, c in consumers.items() if c.enabled and k[0] in streams and streams[k[0]].enabled}
        self.wanted = wanted
        try:
            result = await reconcile(self.registry, self.nats, self.pool, self.settings.worker_name, wanted)
        except Exception:
            # Never let one bad reconcile stop the worker: what runs keeps running, the next reload retries.
            logger.exception(
                "applying the configuration to JetStream failed", extra={"action": "reconcile_failed"}
            )
            return False
        loop = asyncio.get_running_loop()
        gone = [k for k in self.runners if k not in wanted]
        if gone:
            await self._stop_runners(gone, loop.time() + self.settings.shutdown_timeout)
        for key in wanted:
            runner = self.runners.get(key)
            if runner is not None:
                runner.update(consumers[key])
                await self._rebind(runner, streams[key[0]].config_name)
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
            if self.stop.is_set():
                # Shutting down (the awaits above let SIGTERM in): a runner started now would run
                # after shutdown stopped the others.
                logger.debug("not starting %s/%s: stopping", *key)
                break
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
                observe_latency=self.metrics.latency.observe,
                on_closed=self._on_runner_closed,
                lookup_webhook=self._lookup_webhook,
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
        enabled = {name for name, s in streams.items() if s.enabled}
        on_closed = any(r.client.is_closed for r in self.runners.values())
        return wanted <= set(self.runners) and enabled <= result.ok_streams and not on_closed

    async def _rebind(self, runner: ConsumerRunner, config_name: str) -> None:
        """Move a running consumer to the pool's client for its configuration when that is another
        one (the configuration changed, or the old client was closed). Within the reload that
        noticed the change; deliveries in progress finish on the old client (ConsumerRunner.rebind)."""
        conn = self.connections.get(config_name)
        if conn is None or self.stop.is_set():
            return
        try:
            client = await self.nats.get(conn)
        except NatsUnavailable as exc:
            # The old client (if it still works) goes on; the error is in rule_nats_stream_state.
            logger.warning(
                "consumer %s stays on its NATS connection: %s",
                runner.name,
                exc,
                extra={"action": "consumer_waiting"},
            )
            return
        if client is not runner.client and not self.stop.is_set():
            await runner.rebind(client)

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

    def _registered_subject(self, config_name: str, subject: str) -> bool:
        """Does an enabled stream of the registry, on this connection, capture the subject?"""
        return any(
            s.enabled
            and s.config_name == config_name
            and any(subject_matches(f, subject) for f in s.subjects)
            for s in self.registry.streams.values()
        )

    def _clients_in_use(self) -> set[int]:
        return {c for r in self.runners.values() for c in r.clients_in_use()}

    def _on_runner_closed(self) -> None:
        self._rebind_due = True
        self.config_changed.set()

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
                self.stopped_totals.add(gone.counters)
                prior = self.stopped_by_key.get(k)
                self.stopped_by_key[k] = with_stopped([_counts(gone)], {} if prior is None else {k: prior})[0]
        return runners

    async def _flush_stats(self, active: bool = True, only: list[ConsumerRunner] | None = None) -> None:
        runners = only if only is not None else list(self.runners.values())
        if not runners:
            return
        sent: dict[ConsumerRunner, Totals] = {}
        try:
            async with self.pool.connection() as conn:
                for r in runners:
                    c = r.counters
                    now = totals(c.delivered, c.failed, c.acked, c.redelivered)
                    since = now.minus(self._reported.get(r, Totals()))
                    key = stats_key(
                        r.cdef.stream_name,
                        r.cdef.consumer_name,
                        self.settings.worker_name,
                        self.settings.seed,
                    )
                    await conn.execute(
                        query("stats_update"),
                        {
                            "stream": key.stream_name,
                            "consumer": key.consumer_name,
                            "worker": key.worker_name,
                            "delivered": since.delivered,
                            "acked": since.acked,
                            "failed": since.failed,
                            "redelivered": since.redelivered,
                            "pending": r.pending,
                            "avg_ms": (c.delivered_ms / c.delivered) if c.delivered else None,
                            "active": active,
                            "nats_acks": since.nats_acks,
                            "avg_ack_ms": (c.processing_ms / c.processed) if c.processed else None,
                            "queue_group": key.queue_group,
                            "max_deliver": r.cdef.max_deliver,
                        },
                    )
                    sent[r] = now
            # Committed when the block ends without an error (the pool's connection context): only
            # then do these counts count as reported. A report refused, even at its COMMIT, is sent
            # again, summed with what comes next; marked earlier, its counts were lost.
            self._reported.update(sent)
        except psycopg.Error as exc:
            logger.warning("writing consumer stats failed: %s", exc, extra={"action": "stats_failed"})

    async def _config_loop(self) -> None:
        gate = Coalescer(self.config_changed, self.stop, CONFIG_MIN_INTERVAL)
        gate.done()  # run() has just reloaded
        while await gate.next():
            try:
                await self._reload()
            except psycopg.Error as exc:
                logger.warning(
                    "configuration reload failed: %s", exc, extra={"action": "config_reload_failed"}
                )
                self.config_changed.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=1)
            finally:
                gate.done()

    async def _refresh_loop(self) -> None:
        """NOTIFY rule_nats_refresh (rule_nats_refresh_status()): JetStream state now, coalesced."""
        gate = Coalescer(self.refresh_due, self.stop, REFRESH_MIN_INTERVAL)
        while await gate.next():
            try:
                await self._observe()
            finally:
                gate.done()

    async def _heartbeat_loop(self) -> None:
        """Every HEARTBEAT_INTERVAL: heartbeat, JetStream state, stats, backlog; stats also every 100
        messages, at most once a second; a summary line every SUMMARY_INTERVAL (_summary_loop); retention when due; every
        HEAL_INTERVAL a reload that applies even unchanged rows heals drift in JetStream."""
        loop = asyncio.get_running_loop()
        last_reload = last_beat = last_stats = loop.time()
        while not self.stop.is_set():
            waiters = [
                asyncio.ensure_future(self.stop.wait()),
                asyncio.ensure_future(self.stats_due.wait()),
            ]
            await asyncio.wait(
                waiters,
                timeout=max(0.0, self.settings.heartbeat_interval - (loop.time() - last_beat)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for w in waiters:
                w.cancel()
            if self.stop.is_set():
                return
            if loop.time() - last_beat < self.settings.heartbeat_interval:
                if self.stats_due.is_set():
                    # At most once a second: written every 100 messages, at 5,000 messages/s they
                    # were 50 statements a second, a few % of the worker's CPU and PostgreSQL's.
                    wait = STATS_MIN_INTERVAL - (loop.time() - last_stats)
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.stop.wait(), timeout=wait)
                        continue
                    self.stats_due.clear()
                    last_stats = loop.time()
                    await self._flush_stats()
                continue
            self.stats_due.clear()
            last_beat = last_stats = loop.time()
            await self._beat()
            await self._observe()
            await self._flush_stats()
            if self._purge_task is None or self._purge_task.done():
                self._purge_task = asyncio.create_task(self._maybe_purge(), name="retention")
            if loop.time() - last_reload > HEAL_INTERVAL:
                last_reload = loop.time()
                self._heal_due = True
                self.config_changed.set()

    def totals(self) -> Counters:
        total = Counters()
        total.add(self.stopped_totals)
        for r in self.runners.values():
            total.add(r.counters)
        return total

    async def _beat(self) -> None:
        t = self.totals()
        activity = (t.delivered, t.failed, self.relay.published)
        active, self._last_activity = activity != self._last_activity, activity
        # Without the database's own problem: it is talking to the database as it writes them.
        components = self.components(database=False)
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    query("worker_heartbeat"),
                    {
                        "worker_name": self.settings.worker_name,
                        "active": active,
                        "delivered": t.delivered,
                        "failed": t.failed,
                        "in_flight": sum(r.in_flight for r in self.runners.values()),
                        "consumers": sorted(r.name for r in self.runners.values()),
                        # nats_worker_status says DEGRADED rather than ACTIVE while there are any.
                        "problems": [c.problem for c in components if not c.ok],
                        # ... and its streams and consumers 'unknown' on these connections.
                        "nats_down": [
                            c.name.removeprefix("nats:")
                            for c in components
                            if c.name.startswith("nats:") and not c.ok
                        ],
                    },
                )
                cur = await conn.execute(
                    query("live_workers"),
                    {
                        "worker_name": self.settings.worker_name,
                        "consumers": sorted(r.name for r in self.runners.values()),
                    },
                )
                live = await cur.fetchone()
                workers = max(1, int(live[0])) if live else 1
                if workers != self.gates.workers:
                    logger.info(
                        "%d live workers share the endpoints' limits",
                        workers,
                        extra={"action": "limit_share"},
                    )
                    self.gates.workers = workers
                await self._read_backlog(conn)
            self.last_db_ok = asyncio.get_running_loop().time()
            self.last_db_error = None
        except psycopg.Error as exc:
            self.last_db_error = " ".join(str(exc).split())[:300]
            logger.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat_failed"})

    async def _read_backlog(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(query("backlog"))
        row = await cur.fetchone()
        if row is not None:
            self.backlog = {"retries_waiting": row[0], "outbox_pending": row[1], "outbox_failed": row[2]}

    async def _observe(self) -> None:
        """Stream and consumer info from JetStream into the state tables (and the consumer lag)."""
        # The heartbeat and NOTIFY rule_nats_refresh both observe: one at a time.
        async with self._observe_lock:
            self.state_refreshes += 1
            try:
                seen = await observe(
                    self.registry, self.nats, self.pool, self.settings.worker_name, sorted(self.runners)
                )
            except (psycopg.Error, OSError) as exc:
                logger.debug("observing JetStream failed: %s", exc)
                return
        self.missing_streams = set(seen.missing_streams)
        for key, pending in seen.pending.items():
            runner = self.runners.get(key)
            if runner is not None:
                runner.pending = pending
        missing = set(seen.missing_consumers)
        for key in missing - self.missing_consumers:
            logger.warning(
                "consumer %s/%s no longer exists in JetStream; it is re-created at the next reload",
                *key,
                extra={"action": "consumer_missing"},
            )
        self.missing_consumers = missing

    async def _summary_loop(self) -> None:
        interval = self.settings.summary_interval
        if interval <= 0:
            return
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=interval)
            if not self.stop.is_set():
                self._log_summary()  # the last one is written after the runners stopped (run())

    def _log_summary(self) -> None:
        """One line with what happened since the last one, like the original worker's statistics block."""
        now = asyncio.get_running_loop().time()
        t = self.totals()
        published = self.relay.published
        if self._summary_base is None:
            self._summary_base = (self.started_at, Counters(), 0)
        since, base, base_published = self._summary_base
        self._summary_base = (now, t, published)
        secs = max(now - since, 1e-9)
        delivered = t.delivered - base.delivered
        lag = sum(r.pending for r in self.runners.values())
        logger.info(
            "summary: %d delivered (%.1f/s), %d failed attempts, %d dead-lettered, %d deferred, %d published from "
            "the outbox; %d in flight, %d retries waiting, %d outbox rows pending, lag %d",
            delivered,
            delivered / secs,
            t.failed - base.failed,
            t.dead_lettered - base.dead_lettered,
            t.deferred - base.deferred,
            published - base_published,
            sum(r.in_flight for r in self.runners.values()),
            self.backlog.get("retries_waiting", 0),
            self.backlog.get("outbox_pending", 0),
            lag,
            extra={
                "action": "summary",
                "delivered": delivered,
                "per_second": round(delivered / secs, 2),
                "failed": t.failed - base.failed,
                "dead_lettered": t.dead_lettered - base.dead_lettered,
                "deferred": t.deferred - base.deferred,
                "outbox_published": published - base_published,
                "retries_waiting": self.backlog.get("retries_waiting", 0),
                "outbox_pending": self.backlog.get("outbox_pending", 0),
                "lag": lag,
            },
        )

    async def _maybe_purge(self) -> None:
        await purge_when_due(self.pool, self.stop)

    def snapshot(self) -> Snapshot:
        consumers = with_stopped([_counts(r) for r in self.runners.values()], self.stopped_by_key)
        return Snapshot(
            consumers=consumers,
            dead_letter_reasons=self.totals().dead_letter_reasons,
            retries_waiting=self.backlog.get("retries_waiting"),
            outbox_pending=self.backlog.get("outbox_pending"),
            outbox_failed_rows=self.backlog.get("outbox_failed"),
            outbox_published=self.relay.published,
            outbox_failed=self.relay.failed,
            circuits=Counter(g.circuit for g in self.gates.gates.values()),
            config_reloads=self.config_reloads,
            config_applies=self.config_applies,
            state_refreshes=self.state_refreshes,
            task_restarts=self.totals().task_restarts + sum(h.failures for h in self.task_health.values()),
        )

    def readiness(self, database: bool = True) -> list[str]:
        """Why the worker is not ready (empty: ready)."""
        return [c.problem or f"{c.name} is not ready" for c in self.components(database) if not c.ok]

    def components(self, database: bool = True) -> list[Component]:
        """Each part of the worker, ok or with its problem (/readyz; the heartbeat writes the
        problems and the NATS connections that are down, without the database's own problem)."""
        out: list[Component] = []
        loop = asyncio.get_running_loop()
        since = loop.time() - self.last_db_ok
        if database and not self.last_db_ok:
            out.append(Component("postgresql", False, "not registered in PostgreSQL yet (starting)"))
        elif database and since > 3 * self.settings.heartbeat_interval + 2:
            why = f" (last error: {self.last_db_error})" if self.last_db_error else ""
            out.append(
                Component(
                    "postgresql", False, f"no successful heartbeat to PostgreSQL for {since:.0f} s{why}"
                )
            )
        else:
            out.append(Component("postgresql", True))
        nats_ok: dict[str, bool] = {}
        for name, conn in sorted(self._needed_connections().items()):
            st = self.nats.state(conn)
            nats_ok[name] = st.connected
            out.append(Component(f"nats:{name}", st.connected, st.problem, st.address))
        now = time.monotonic()
        recorder = self.task_health.get("recorder")
        recording = recorder.problem(now) if recorder is not None else None
        if recording is None and self.recorder.failing:
            recording = (
                f"outcomes cannot be committed to PostgreSQL ({self.recorder.backlog} waiting): "
                f"{self.recorder.last_error or 'unknown error'}"
            )
        out.append(Component("recording", recording is None, recording))
        out.append(
            Component("configuration", True)
            if self.loaded
            else Component("configuration", False, "the registry has not been read yet")
        )
        streams = self.registry.streams
        for key in sorted(self.wanted | set(self.runners)):
            runner = self.runners.get(key)
            config = streams[key[0]].config_name if key[0] in streams else None
            trouble: str | None = None
            if runner is None:
                waits = (
                    f" (waits for NATS connection {config!r})"
                    if config and not nats_ok.get(config, True)
                    else ""
                )
                trouble = f"consumer {key[0]}/{key[1]} is not running{waits}"
            elif runner.client.is_closed:
                trouble = f"consumer {runner.name} runs on a closed NATS connection"
            elif not runner.client.is_connected:
                trouble = f"consumer {runner.name} cannot fetch: its NATS connection is down"
            out.append(Component(f"consumer:{key[0]}/{key[1]}", trouble is None, trouble))
            states = runner.task_states() if runner is not None else {}  # (issue 22: every consumer task)
            for task, alive in sorted(states.items()):
                failed = None if alive else f"consumer task {task} failed and was restarted"
                out.append(Component(f"task:{key[0]}/{key[1]}/{task}", alive, failed))
        for name, health in sorted(self.task_health.items()):
            if name != "recorder":
                failed = health.problem(now)
                out.append(Component(f"task:{name}", failed is None, failed))
        return out

    def _on_nats_change(self, config_name: str, connected: bool) -> None:
        """A NATS connection came up, came back or went down (NatsPool)."""
        if not connected or self.stop.is_set():
            return
        for (stream, _), runner in self.runners.items():
            spec = self.registry.streams.get(stream)
            if spec is not None and spec.config_name == config_name:
                runner.pulls_lost()
        # Applied again now, not at the next heal: consumers that waited for it start, what a
        # restarted server lost (a memory stream) is made again and the errors recorded while it
        # was away are replaced; the relay stops pausing; JetStream's state is read again.
        self._heal_due = True
        self.config_changed.set()
        self.refresh_due.set()
        self.relay.resume.set()

    def _needed_connections(self) -> dict[str, NatsConnection]:
        """The NATS connections this worker must reach (readiness, the probe): those of the enabled
        streams; 'default' when NATS_URL names its server or no stream is configured yet (a
        wrong NATS_URL shows before the first stream does); any other one it has used (the outbox
        relay publishes for every configuration its rows name)."""
        names = {s.config_name for s in self.registry.streams.values() if s.enabled}
        if self.settings.nats_override.url or not names:
            names.add(SEED_CONFIG)
        names |= self.nats.known()
        return {n: c for n, c in self.connections.items() if n in names}

    async def _nats_loop(self) -> None:
        """Connect the needed NATS connections that have no client, every second: a wrong NATS_URL
        shows in /readyz and nats_worker_status even before a stream uses it, and the consumers
        that wait for NATS start as soon as it answers (_on_nats_change)."""
        while not self.stop.is_set():
            for conn in list(self._needed_connections().values()):
                if self.stop.is_set():
                    return
                with contextlib.suppress(NatsUnavailable):
                    await self.nats.get(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=NATS_PROBE_INTERVAL)

    def _on_endpoint_event(self, key: int | str, gate: EndpointGate, events: list[str]) -> None:
        """A circuit opened or closed, an endpoint backs off or must be disabled: log it, write it soon."""
        name = key
        if isinstance(key, int) and key in self.registry.webhooks:
            name = self.registry.webhooks[key].webhook_name
        for event in events:
            if event == "opened":
                # the WARNING with the message id, endpoint and reason is sidecar.oplog's
                pause = (gate.open_until or 0.0) - (gate.last_failure_at or 0.0)
                logger.debug(
                    "endpoint %s: circuit open after %d failures, paused for %.0f s (%s)",
                    name,
                    gate.failures,
                    pause,
                    gate.last_error,
                    extra={"action": "circuit_pause"},
                )
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
                reason = gate.disabled or "disabled by the worker"
                self.disable_queue[key] = reason
                self._hold_disabled(key, reason)
        self.endpoint_due.set()

    def _hold_disabled(self, webhook_id: int, reason: str) -> None:
        """Mark the webhook disabled in the registry in memory now, not at the reload the UPDATE
        causes: reloads are coalesced (up to CONFIG_MIN_INTERVAL away), and until then a runner
        reading ``enabled`` from the old registry would deliver to the endpoint again."""
        webhook = self.registry.webhooks.get(webhook_id)
        if webhook is None or not webhook.enabled:
            return
        webhooks = {
            **self.registry.webhooks,
            webhook_id: replace(webhook, enabled=False, disabled_reason=reason),
        }
        self.registry = replace(self.registry, webhooks=webhooks)
        # The registry is no longer what the last applied rows say: the next reload applies even if
        # the rows read the same again (the webhook enabled again in SQL before that reload came).
        self._applied_rows = None

    async def _lookup_webhook(self, webhook_id: int) -> bool:
        """A message names a webhook the registry in memory lacks: read it from PostgreSQL (see
        sidecar.lookup); True when it exists, and is then in the registry. A full reload follows."""
        webhook = await read_webhook(self.pool, webhook_id)
        if webhook is None:
            return False
        if webhook_id not in self.registry.webhooks:
            self.registry = replace(self.registry, webhooks={**self.registry.webhooks, webhook_id: webhook})
            self._applied_rows = None  # as _hold_disabled: the next reload applies
            self.config_changed.set()
        return True

    async def _endpoint_loop(self) -> None:
        """Write endpoint health (on changes at once, otherwise every heartbeat interval) and disables."""
        while not self.stop.is_set():
            waiters = [
                asyncio.ensure_future(self.endpoint_due.wait()),
                asyncio.ensure_future(self.stop.wait()),
            ]
            await asyncio.wait(
                waiters, timeout=self.settings.heartbeat_interval, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()
            self.endpoint_due.clear()
            await self._flush_endpoints()  # also once more when stopping

    async def _flush_endpoints(self) -> None:
        disables, self.disable_queue = self.disable_queue, {}
        failed = await write_endpoint_health(self.pool, self.settings.worker_name, self.gates, disables)
        self.disable_queue.update(failed)


def _counts(r: ConsumerRunner) -> ConsumerSnapshot:
    c = r.counters
    return ConsumerSnapshot(
        r.cdef.stream_name, r.cdef.consumer_name, c.delivered, c.scheduled, c.dead_lettered, c.deferred,
        c.redelivered, r.in_flight, r.pending,
    )  # fmt: skip


def run(settings: Settings) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio works, slower
        return asyncio.run(Worker(settings).run())
    return uvloop.run(Worker(settings).run())
