"""The worker's configuration at run time (not its settings: see sidecar.config): read the registry
tables, apply them to JetStream (sidecar.reconcile) and to the running consumers, register the
STREAM_NAME/SUBJECT seed, move consumers to a new NATS client, and keep the registry in memory in
step with what the endpoints' gates decide."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg.rows import dict_row

from sidecar.coalesce import Coalescer
from sidecar.config import nats_connection_from_row
from sidecar.consumer import ConsumerRunner
from sidecar.endpoints import EndpointGate
from sidecar.jetstream import NatsUnavailable
from sidecar.lookup import read_webhook
from sidecar.queries import query
from sidecar.reconcile import ReconcileResult, reconcile
from sidecar.recorder import Outcome as RecorderOutcome
from sidecar.registry import (
    ConsumerDef,
    Registry,
    StreamDef,
    consumer_from_row,
    keys_from_rows,
    settings_from_row,
    stream_from_row,
    webhook_from_row,
)
from sidecar.seed import Seed
from sidecar.validation import subject_matches
from sidecar.worker_state import RunnerKey, WorkerState

logger = logging.getLogger(__name__)

# NOTIFY costs nothing to send and any login may send it: at most two registry reads and two
# JetStream state reads a second, whatever arrives (docs/operations.md).
CONFIG_MIN_INTERVAL = 0.5
# How often the configured NATS connections that have no client are tried (see nats_loop).
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

FlushStats = Callable[..., Awaitable[None]]  # Heartbeat.flush_stats(active=, only=)


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


class Configuration:
    def __init__(self, state: WorkerState, flush_stats: FlushStats) -> None:
        self.state = state
        self.flush_stats = flush_stats
        # The rows of the last reload that applied completely; equal rows at the next reload mean
        # there is nothing to apply (a NOTIFY without a change, e.g. a flood).
        self._applied_rows: RegistryRows | None = None
        self._rebind_due = False  # a runner's NATS client was closed: the next reload applies
        self.seed = Seed(state)

    async def first_reload(self) -> None:
        """The reload at start; SIGTERM meanwhile (NATS does not answer, say) ends it."""
        reload = asyncio.create_task(self.reload(), name="first reload")
        stopping = asyncio.ensure_future(self.state.events.stop.wait())
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

    async def loop(self) -> None:
        ev = self.state.events
        gate = Coalescer(ev.config_changed, ev.stop, CONFIG_MIN_INTERVAL)
        gate.done()  # Worker.run has just reloaded
        while await gate.next():
            try:
                await self.reload()
            except psycopg.Error as exc:
                logger.warning(
                    "configuration reload failed: %s", exc, extra={"action": "config_reload_failed"}
                )
                ev.config_changed.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.stop.wait(), timeout=1)
            finally:
                gate.done()

    async def reload(self) -> None:
        """Read the whole registry (the tables are the truth); apply it to JetStream and adjust the
        runners unless it is what the last complete application applied."""
        s = self.state
        await self.seed.run()
        async with s.io.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            read = []
            for name in REGISTRY_QUERIES:
                await cur.execute(query(name))
                read.append(tuple(await cur.fetchall()))
        rows = RegistryRows(*read)
        s.config_reloads += 1
        s.loaded = True
        unchanged = rows == self._applied_rows
        if unchanged and not (s.heal_due or self._rebind_due or s.missing_consumers or s.missing_streams):
            logger.debug("configuration unchanged", extra={"action": "config_unchanged"})
            return
        s.heal_due = self._rebind_due = False
        logger.debug(
            "applying the configuration (%s)",
            "unchanged, healing" if unchanged else "changed",
            extra={"action": "config_apply"},
        )
        try:
            complete = await self._apply(rows)
        finally:
            # Counted when the application has ended (runners started, stopped, updated), so a
            # test or a dashboard waiting on the counter sees the change in effect.
            s.config_applies += 1
        self._applied_rows = rows if complete else None

    async def _apply(self, rows: RegistryRows) -> bool:
        """Build the registry from the rows, apply it to JetStream, adjust the runners; True when
        everything wanted is in place (otherwise the next reload applies again)."""
        s = self.state
        was_disabled = {w.webhook_id for w in s.registry.webhooks.values() if not w.enabled}
        s.registry = self._registry_from(rows)
        webhooks = s.registry.webhooks
        reenabled = tuple(w for w in sorted(was_disabled) if w in webhooks and webhooks[w].enabled)
        if reenabled:
            # Queued behind any delivery the runners held on the old registry (the recorder writes
            # in order), so none of them waits out HELD_SECONDS after the endpoint is enabled.
            await s.io.recorder.submit(RecorderOutcome(release_webhooks=reenabled))
        streams, consumers = s.registry.streams, s.registry.consumers
        wanted = {k for k, c in consumers.items() if c.enabled and k[0] in streams and streams[k[0]].enabled}
        s.wanted = wanted
        try:
            result = await reconcile(s.registry, s.io.nats, s.io.pool, s.settings.worker_name, wanted)
        except Exception:
            # Never let one bad reconcile stop the worker: what runs keeps running, the next reload retries.
            logger.exception(
                "applying the configuration to JetStream failed", extra={"action": "reconcile_failed"}
            )
            return False
        await self._adjust_runners(wanted, result)
        logger.debug(
            "configuration loaded: %d streams, %d consumers running, %d webhooks",
            len(streams),
            len(s.runners),
            len(webhooks),
            extra={"action": "config_loaded"},
        )
        enabled = {name for name, st in streams.items() if st.enabled}
        on_closed = any(r.client.is_closed for r in s.runners.values())
        return wanted <= set(s.runners) and enabled <= result.ok_streams and not on_closed

    def _registry_from(self, rows: RegistryRows) -> Registry:
        s = self.state
        keys = keys_from_rows(list(rows.secrets))
        settings_row = rows.settings[0] if rows.settings else None
        s.connections = {
            r["config_name"]: nats_connection_from_row(r, s.settings.nats_override) for r in rows.configs
        }
        consumers = {(c.stream_name, c.consumer_name): c for c in map(consumer_from_row, rows.consumers)}
        return Registry(
            connections=s.connections,
            streams={r["stream_name"]: stream_from_row(r) for r in rows.streams},
            consumers=consumers,
            webhooks={
                w.webhook_id: w
                for w in (webhook_from_row(r, keys.get(int(r["webhook_id"]), ())) for r in rows.webhooks)
            },
            delivery=settings_from_row(settings_row, s.settings.allow_networks),
        )

    async def _adjust_runners(self, wanted: set[RunnerKey], result: ReconcileResult) -> None:
        """Stop the runners no longer wanted, update the others, start those that are missing."""
        s = self.state
        streams, consumers = s.registry.streams, s.registry.consumers
        gone = [k for k in s.runners if k not in wanted]
        if gone:
            await self.stop_runners(gone, asyncio.get_running_loop().time() + s.settings.shutdown_timeout)
        for key in wanted:
            runner = s.runners.get(key)
            if runner is not None:
                runner.update(consumers[key])
                await self._rebind(runner, streams[key[0]].config_name)
                continue
            if key not in result.ok_consumers:
                continue  # the error is in rule_nats_consumer_state; retried at the next reload
            if not await self._start_runner(key, consumers[key], streams[key[0]]):
                break

    async def _start_runner(self, key: RunnerKey, consumer: ConsumerDef, stream: StreamDef) -> bool:
        """Start the runner of one consumer (it waits when NATS does not answer); False: stopping."""
        s = self.state
        try:
            client = await s.io.nats.get(s.connections[stream.config_name])
        except NatsUnavailable as exc:
            logger.warning(
                "consumer %s/%s waits for NATS: %s", *key, exc, extra={"action": "consumer_waiting"}
            )
            return True
        if s.events.stop.is_set():
            # Shutting down (the awaits above let SIGTERM in): a runner started now would run
            # after shutdown stopped the others.
            logger.debug("not starting %s/%s: stopping", *key)
            return False
        runner = ConsumerRunner(
            consumer,
            client,
            s.io.pool,
            s.io.sender,
            s.io.recorder,
            lambda: s.registry,
            s.settings.worker_name,
            stats_due=s.events.stats_due,
            gates=s.io.gates,
            on_endpoint_event=self.on_endpoint_event,
            observe_latency=s.io.metrics.latency.observe,
            on_closed=self.on_runner_closed,
            lookup_webhook=self.lookup_webhook,
        )
        await runner.start()
        s.runners[key] = runner
        return True

    async def _rebind(self, runner: ConsumerRunner, config_name: str) -> None:
        """Move a running consumer to the pool's client for its configuration when that is another
        one (the configuration changed, or the old client was closed). Within the reload that
        noticed the change; deliveries in progress finish on the old client (ConsumerRunner.rebind)."""
        s = self.state
        conn = s.connections.get(config_name)
        if conn is None or s.events.stop.is_set():
            return
        try:
            client = await s.io.nats.get(conn)
        except NatsUnavailable as exc:
            # The old client (if it still works) goes on; the error is in rule_nats_stream_state.
            logger.warning(
                "consumer %s stays on its NATS connection: %s",
                runner.name,
                exc,
                extra={"action": "consumer_waiting"},
            )
            return
        if client is not runner.client and not s.events.stop.is_set():
            await runner.rebind(client)

    async def stop_runners(
        self, keys: list[RunnerKey], deadline: float, write_stats: bool = True
    ) -> list[ConsumerRunner]:
        runners = [self.state.runners[k] for k in keys if k in self.state.runners]
        await asyncio.gather(*(r.stop(deadline) for r in runners))
        if write_stats:
            await self.flush_stats(active=False, only=runners)
        for k in keys:
            self.state.forget_runner(k)
        return runners

    def registered_subject(self, config_name: str, subject: str) -> bool:
        """Does an enabled stream of the registry, on this connection, capture the subject?"""
        return any(
            s.enabled
            and s.config_name == config_name
            and any(subject_matches(f, subject) for f in s.subjects)
            for s in self.state.registry.streams.values()
        )

    def on_runner_closed(self) -> None:
        self._rebind_due = True
        self.state.events.config_changed.set()

    def on_endpoint_event(self, key: int | str, gate: EndpointGate, events: list[str]) -> None:
        """A circuit opened or closed, an endpoint backs off or must be disabled: log it, write it soon."""
        s = self.state
        name = key
        if isinstance(key, int) and key in s.registry.webhooks:
            name = s.registry.webhooks[key].webhook_name
        for event in events:
            log_endpoint_event(name, gate, event, webhook=isinstance(key, int))
            if event == "disable" and isinstance(key, int):
                reason = gate.disabled or "disabled by the worker"
                s.disable_queue[key] = reason
                self.hold_disabled(key, reason)
        s.events.endpoint_due.set()

    def hold_disabled(self, webhook_id: int, reason: str) -> None:
        """Mark the webhook disabled in the registry in memory now, not at the reload the UPDATE
        causes: reloads are coalesced (up to CONFIG_MIN_INTERVAL away), and until then a runner
        reading ``enabled`` from the old registry would deliver to the endpoint again."""
        s = self.state
        webhook = s.registry.webhooks.get(webhook_id)
        if webhook is None or not webhook.enabled:
            return
        webhooks = {
            **s.registry.webhooks,
            webhook_id: replace(webhook, enabled=False, disabled_reason=reason),
        }
        s.registry = replace(s.registry, webhooks=webhooks)
        # The registry is no longer what the last applied rows say: the next reload applies even if
        # the rows read the same again (the webhook enabled again in SQL before that reload came).
        self._applied_rows = None

    async def lookup_webhook(self, webhook_id: int) -> bool:
        """A message names a webhook the registry in memory lacks: read it from PostgreSQL (see
        sidecar.lookup); True when it exists, and is then in the registry. A full reload follows."""
        s = self.state
        webhook = await read_webhook(s.io.pool, webhook_id)
        if webhook is None:
            return False
        if webhook_id not in s.registry.webhooks:
            s.registry = replace(s.registry, webhooks={**s.registry.webhooks, webhook_id: webhook})
            self._applied_rows = None  # as hold_disabled: the next reload applies
            s.events.config_changed.set()
        return True


class NatsLink:
    """The worker's NATS connections as a whole: connected when needed, and what follows when one
    comes up or back."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def on_nats_change(self, config_name: str, connected: bool) -> None:
        """A NATS connection came up, came back or went down (NatsPool)."""
        s = self.state
        if not connected or s.events.stop.is_set():
            return
        for (stream, _), runner in s.runners.items():
            spec = s.registry.streams.get(stream)
            if spec is not None and spec.config_name == config_name:
                runner.pulls_lost()
        # Applied again now, not at the next heal: consumers that waited for it start, what a
        # restarted server lost (a memory stream) is made again and the errors recorded while it
        # was away are replaced; the relay stops pausing; JetStream's state is read again.
        s.heal_due = True
        s.events.config_changed.set()
        s.events.refresh_due.set()
        s.io.relay.resume.set()

    async def loop(self) -> None:
        """Connect the needed NATS connections that have no client, every second: a wrong NATS_URL
        shows in /readyz and nats_worker_status even before a stream uses it, and the consumers
        that wait for NATS start as soon as it answers (on_nats_change)."""
        stop = self.state.events.stop
        while not stop.is_set():
            for conn in list(self.state.needed_connections().values()):
                if stop.is_set():
                    return
                with contextlib.suppress(NatsUnavailable):
                    await self.state.io.nats.get(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=NATS_PROBE_INTERVAL)


def log_endpoint_event(name: int | str, gate: EndpointGate, event: str, webhook: bool) -> None:
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
    elif event == "disable" and webhook:
        logger.warning(
            "endpoint %s: disabling (%s)", name, gate.disabled, extra={"action": "endpoint_disabled"}
        )
