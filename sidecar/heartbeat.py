"""The heartbeat: the worker's row in PostgreSQL, the backlog, the consumers' stats, JetStream's
state in the state tables, endpoint health, the summary line and retention, each on its clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

import psycopg

from sidecar.coalesce import Coalescer
from sidecar.consumer import ConsumerRunner, Counters
from sidecar.endpoint_health import write_endpoint_health
from sidecar.metrics import Component
from sidecar.queries import query
from sidecar.reconcile import observe
from sidecar.retention import purge_when_due
from sidecar.stats import Totals, stats_key, totals
from sidecar.worker_state import WorkerState

logger = logging.getLogger(__name__)

REFRESH_MIN_INTERVAL = 0.5
# A reload applies the registry even when its rows did not change this often, so what changed in
# JetStream behind the worker's back (a stream edited with the nats CLI) is put back in shape.
HEAL_INTERVAL = 30.0
STATS_MIN_INTERVAL = 1.0  # seconds between consumer-stats writes triggered by traffic (every 100 messages)


class Heartbeat:
    def __init__(self, state: WorkerState, components: Callable[[bool], list[Component]]) -> None:
        self.state = state
        self.components = components
        # What each runner's counters were at its last committed stats report.
        self._reported: weakref.WeakKeyDictionary[ConsumerRunner, Totals] = weakref.WeakKeyDictionary()
        self._observe_lock = asyncio.Lock()
        self._purge_task: asyncio.Task[None] | None = None
        self._summary_base: tuple[float, Counters, int] | None = None
        self._last_activity: tuple[int, int, int] | None = None  # counters at the last heartbeat

    async def loop(self) -> None:
        """Every HEARTBEAT_INTERVAL: heartbeat, JetStream state, stats, backlog; stats also every 100
        messages, at most once a second; a summary line every SUMMARY_INTERVAL (summary_loop); retention when due; every
        HEAL_INTERVAL a reload that applies even unchanged rows heals drift in JetStream."""
        s, ev = self.state, self.state.events
        loop = asyncio.get_running_loop()
        last_reload = last_beat = last_stats = loop.time()
        while not ev.stop.is_set():
            waiters = [asyncio.ensure_future(ev.stop.wait()), asyncio.ensure_future(ev.stats_due.wait())]
            await asyncio.wait(
                waiters,
                timeout=max(0.0, s.settings.heartbeat_interval - (loop.time() - last_beat)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for w in waiters:
                w.cancel()
            if ev.stop.is_set():
                return
            if loop.time() - last_beat < s.settings.heartbeat_interval:
                if ev.stats_due.is_set():
                    # At most once a second: written every 100 messages, at 5,000 messages/s they
                    # were 50 statements a second, a few % of the worker's CPU and PostgreSQL's.
                    wait = STATS_MIN_INTERVAL - (loop.time() - last_stats)
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(ev.stop.wait(), timeout=wait)
                        continue
                    ev.stats_due.clear()
                    last_stats = loop.time()
                    await self.flush_stats()
                continue
            ev.stats_due.clear()
            last_beat = last_stats = loop.time()
            await self._every_interval()
            if loop.time() - last_reload > HEAL_INTERVAL:
                last_reload = loop.time()
                s.heal_due = True
                ev.config_changed.set()

    async def _every_interval(self) -> None:
        await self.beat()
        await self.observe()
        await self.flush_stats()
        if self._purge_task is None or self._purge_task.done():
            self._purge_task = asyncio.create_task(self._maybe_purge(), name="retention")

    def cancel_purge(self) -> None:
        if self._purge_task is not None:
            self._purge_task.cancel()

    async def beat(self) -> None:
        s = self.state
        t = s.totals()
        activity = (t.delivered, t.failed, s.io.relay.published)
        active, self._last_activity = activity != self._last_activity, activity
        # Without the database's own problem: it is talking to the database as it writes them.
        components = self.components(False)
        consumers = sorted(r.name for r in s.runners.values())
        try:
            async with s.io.pool.connection() as conn:
                await conn.execute(
                    query("worker_heartbeat"),
                    {
                        "worker_name": s.settings.worker_name,
                        "active": active,
                        "delivered": t.delivered,
                        "failed": t.failed,
                        "in_flight": sum(r.in_flight for r in s.runners.values()),
                        "consumers": consumers,
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
                await self._share_limits(conn, consumers)
                await self.read_backlog(conn)
            s.last_db_ok = asyncio.get_running_loop().time()
            s.last_db_error = None
        except psycopg.Error as exc:
            s.last_db_error = " ".join(str(exc).split())[:300]
            logger.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat_failed"})

    async def _share_limits(self, conn: psycopg.AsyncConnection[Any], consumers: list[str]) -> None:
        """The endpoints' limits are shared by the live workers that run the same consumers."""
        cur = await conn.execute(
            query("live_workers"), {"worker_name": self.state.settings.worker_name, "consumers": consumers}
        )
        live = await cur.fetchone()
        workers = max(1, int(live[0])) if live else 1
        gates = self.state.io.gates
        if workers != gates.workers:
            logger.info(
                "%d live workers share the endpoints' limits", workers, extra={"action": "limit_share"}
            )
            gates.workers = workers

    async def read_backlog(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(query("backlog"))
        row = await cur.fetchone()
        if row is not None:
            self.state.backlog = {
                "retries_waiting": row[0],
                "outbox_pending": row[1],
                "outbox_failed": row[2],
            }

    async def observe(self) -> None:
        """Stream and consumer info from JetStream into the state tables (and the consumer lag)."""
        s = self.state
        # The heartbeat and NOTIFY rule_nats_refresh both observe: one at a time.
        async with self._observe_lock:
            s.state_refreshes += 1
            try:
                seen = await observe(
                    s.registry, s.io.nats, s.io.pool, s.settings.worker_name, sorted(s.runners)
                )
            except (psycopg.Error, OSError) as exc:
                logger.debug("observing JetStream failed: %s", exc)
                return
        s.missing_streams = set(seen.missing_streams)
        for key, pending in seen.pending.items():
            runner = s.runners.get(key)
            if runner is not None:
                runner.pending = pending
        missing = set(seen.missing_consumers)
        for key in missing - s.missing_consumers:
            logger.warning(
                "consumer %s/%s no longer exists in JetStream; it is re-created at the next reload",
                *key,
                extra={"action": "consumer_missing"},
            )
        s.missing_consumers = missing

    async def refresh_loop(self) -> None:
        """NOTIFY rule_nats_refresh (rule_nats_refresh_status()): JetStream state now, coalesced."""
        gate = Coalescer(self.state.events.refresh_due, self.state.events.stop, REFRESH_MIN_INTERVAL)
        while await gate.next():
            try:
                await self.observe()
            finally:
                gate.done()

    async def flush_stats(self, active: bool = True, only: list[ConsumerRunner] | None = None) -> None:
        s = self.state
        runners = only if only is not None else list(s.runners.values())
        if not runners:
            return
        sent: dict[ConsumerRunner, Totals] = {}
        try:
            async with s.io.pool.connection() as conn:
                for r in runners:
                    c = r.counters
                    now = totals(c.delivered, c.failed, c.acked, c.redelivered)
                    since = now.minus(self._reported.get(r, Totals()))
                    key = stats_key(
                        r.cdef.stream_name, r.cdef.consumer_name, s.settings.worker_name, s.settings.seed
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

    async def summary_loop(self) -> None:
        interval = self.state.settings.summary_interval
        stop = self.state.events.stop
        if interval <= 0:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if not stop.is_set():
                self.log_summary()  # the last one is written after the runners stopped (Worker.run)

    def log_summary(self) -> None:
        """One line with what happened since the last one, like the original worker's statistics block."""
        s = self.state
        now = asyncio.get_running_loop().time()
        t = s.totals()
        published = s.io.relay.published
        if self._summary_base is None:
            self._summary_base = (s.started_at, Counters(), 0)
        since, base, base_published = self._summary_base
        self._summary_base = (now, t, published)
        secs = max(now - since, 1e-9)
        delivered = t.delivered - base.delivered
        lag = sum(r.pending for r in s.runners.values())
        logger.info(
            "summary: %d delivered (%.1f/s), %d failed attempts, %d dead-lettered, %d deferred, %d published from "
            "the outbox; %d in flight, %d retries waiting, %d outbox rows pending, lag %d",
            delivered,
            delivered / secs,
            t.failed - base.failed,
            t.dead_lettered - base.dead_lettered,
            t.deferred - base.deferred,
            published - base_published,
            sum(r.in_flight for r in s.runners.values()),
            s.backlog.get("retries_waiting", 0),
            s.backlog.get("outbox_pending", 0),
            lag,
            extra={
                "action": "summary",
                "delivered": delivered,
                "per_second": round(delivered / secs, 2),
                "failed": t.failed - base.failed,
                "dead_lettered": t.dead_lettered - base.dead_lettered,
                "deferred": t.deferred - base.deferred,
                "outbox_published": published - base_published,
                "retries_waiting": s.backlog.get("retries_waiting", 0),
                "outbox_pending": s.backlog.get("outbox_pending", 0),
                "lag": lag,
            },
        )

    async def _maybe_purge(self) -> None:
        await purge_when_due(self.state.io.pool, self.state.events.stop)

    async def endpoint_loop(self) -> None:
        """Write endpoint health (on changes at once, otherwise every heartbeat interval) and disables."""
        ev = self.state.events
        while not ev.stop.is_set():
            waiters = [asyncio.ensure_future(ev.endpoint_due.wait()), asyncio.ensure_future(ev.stop.wait())]
            await asyncio.wait(
                waiters, timeout=self.state.settings.heartbeat_interval, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()
            ev.endpoint_due.clear()
            await self._flush_endpoints()  # also once more when stopping

    async def _flush_endpoints(self) -> None:
        s = self.state
        disables, s.disable_queue = s.disable_queue, {}
        failed = await write_endpoint_health(s.io.pool, s.settings.worker_name, s.io.gates, disables)
        s.disable_queue.update(failed)
