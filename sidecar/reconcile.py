"""Make JetStream match the registry: create or update streams and durable consumers.

What JetStream refuses (e.g. changing the storage type of an existing stream) is not
forced: the error is written to rule_nats_stream_state / rule_nats_consumer_state, where
the DBA sees it next to the configuration.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from psycopg_pool import AsyncConnectionPool

from sidecar.config import NatsConnection
from sidecar.jetstream import NatsPool, NatsUnavailable
from sidecar.queries import query
from sidecar.registry import ConsumerDef, Registry, StreamDef
from sidecar.validation import redact_urls_in

logger = logging.getLogger(__name__)


def stream_config(s: StreamDef) -> StreamConfig:
    """nats-py takes seconds and converts them to nanoseconds on the wire."""
    return StreamConfig(
        name=s.stream_name,
        description=s.description,
        subjects=list(s.subjects),
        retention=RetentionPolicy(s.retention_policy),
        max_msgs=s.max_messages,
        max_bytes=s.max_bytes,
        max_age=s.max_age_seconds,
        max_msg_size=s.max_message_size,
        storage=StorageType(s.storage_type),
        discard=DiscardPolicy(s.discard_policy),
        num_replicas=s.replicas,
        duplicate_window=s.duplicate_window_seconds,
    )


def consumer_config(c: ConsumerDef) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=c.consumer_name,
        filter_subject=c.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=c.ack_wait_seconds,
        max_deliver=c.max_deliver,
        max_ack_pending=c.max_ack_pending,
        deliver_policy=DeliverPolicy(c.deliver_policy),
    )


def stream_differs(current: StreamConfig, want: StreamConfig) -> list[str]:
    """Names of the settings where JetStream's stream differs from the registry (pure)."""
    fields = [
        "subjects",
        "retention",
        "max_msgs",
        "max_bytes",
        "max_age",
        "max_msg_size",
        "storage",
        "discard",
        "num_replicas",
        "duplicate_window",
        "description",
    ]
    out = []
    for f in fields:
        a, b = getattr(current, f), getattr(want, f)
        if f == "subjects":
            a, b = sorted(a or []), sorted(b or [])
        if f in ("max_age", "duplicate_window"):
            a, b = round(float(a or 0), 3), round(float(b or 0), 3)
        if a != b:
            out.append(f)
    return out


# JetStream's name of a setting -> the registry column (for adopted_config, 0010_adopt.sql).
STREAM_FIELD_COLUMN = {
    "subjects": "subjects",
    "retention": "retention_policy",
    "max_msgs": "max_messages",
    "max_bytes": "max_bytes",
    "max_age": "max_age_seconds",
    "max_msg_size": "max_message_size",
    "storage": "storage_type",
    "discard": "discard_policy",
    "num_replicas": "replicas",
    "duplicate_window": "duplicate_window_seconds",
    "description": "description",
}
CONSUMER_FIELD_COLUMN = {
    "filter_subject": "filter_subject",
    "max_deliver": "max_deliver",
    "max_ack_pending": "max_ack_pending",
    "ack_wait": "ack_wait_seconds",
}


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def adopted_stream(config: StreamConfig) -> dict[str, Any]:
    """A stream JetStream already has, as rule_nats_streams columns (rule_nats_adopt_consumer's p_stream)."""
    return {
        "subjects": list(config.subjects or []),
        "storage_type": str(_value(config.storage) or "file"),
        "retention_policy": str(_value(config.retention) or "limits"),
        "max_messages": int(config.max_msgs if config.max_msgs is not None else -1),
        "max_bytes": int(config.max_bytes if config.max_bytes is not None else -1),
        "max_age_seconds": float(config.max_age or 0),
        "max_message_size": int(config.max_msg_size if config.max_msg_size is not None else -1),
        "discard_policy": str(_value(config.discard) or "old"),
        "replicas": int(config.num_replicas or 1),
        "duplicate_window_seconds": float(config.duplicate_window or 0),
        "description": config.description,
    }


def adopted_consumer(config: ConsumerConfig) -> dict[str, Any]:
    """A durable consumer JetStream already has, as rule_nats_consumers columns. A start policy the
    table cannot say (by_start_sequence, ...) reads 'all': JetStream keeps its own anyway, it cannot
    be changed on an existing consumer."""
    policy = str(_value(config.deliver_policy) or "all")
    return {
        "filter_subject": config.filter_subject,
        "max_deliver": int(config.max_deliver if config.max_deliver not in (None, 0) else -1),
        "ack_wait_seconds": float(config.ack_wait or 30),
        "max_ack_pending": int(config.max_ack_pending if config.max_ack_pending not in (None, 0) else -1),
        "deliver_policy": policy if policy in ("all", "new", "last") else "all",
    }


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send to JetStream for an existing stream or consumer."""

    config: Any  # JetStream's own config with only the changed settings replaced
    changed: tuple[str, ...]  # settings that change
    kept: tuple[str, ...]  # settings that differ, kept as JetStream has them (adopted, not changed since)


def plan_update(
    current: Any, want: Any, diff: list[str], field_column: dict[str, str], adopted_unchanged: frozenset[str]
) -> Plan:
    """Start from what JetStream has and replace only the settings the registry changes: settings the
    registry does not model (placement, sources, allow_direct, compression, metadata, ...) stay, and a
    setting whose column still holds the adopted value is the operator's, not ours, to change."""
    kept = tuple(f for f in diff if field_column.get(f) in adopted_unchanged)
    changed = tuple(f for f in diff if f not in kept)
    config = dataclasses.replace(current, **{f: getattr(want, f) for f in changed})
    return Plan(config, changed, kept)


def durability_changes(current: StreamConfig, want: StreamConfig, changed: tuple[str, ...]) -> list[str]:
    """The changes that make an existing stream less durable or change what it keeps (pure)."""
    out = []
    if "num_replicas" in changed and int(want.num_replicas or 1) < int(current.num_replicas or 1):
        out.append(f"replicas {current.num_replicas} -> {want.num_replicas}")
    if "storage" in changed:
        out.append(f"storage {_value(current.storage)} -> {_value(want.storage)}")
    if "retention" in changed:
        out.append(f"retention {_value(current.retention)} -> {_value(want.retention)}")
    return out


def consumer_differs(current: ConsumerConfig, want: ConsumerConfig) -> list[str]:
    out = []
    for f in ("filter_subject", "max_deliver", "max_ack_pending"):
        if (getattr(current, f) or None) != (getattr(want, f) or None):
            out.append(f)
    if round(float(current.ack_wait or 0), 3) != round(float(want.ack_wait or 0), 3):
        out.append("ack_wait")
    return out


@dataclass(slots=True)
class StreamState:
    """One rule_nats_stream_state row: what JetStream says of a stream, or why it cannot be asked.
    Not frozen: filled in as JetStream answers."""

    stream_name: str
    config_name: str
    worker: str
    present: bool = False
    last_error: str | None = None
    storage_type: str | None = None
    subjects: list[str] | None = None
    messages: int | None = None
    bytes: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    consumer_count: int | None = None
    max_age_seconds: float | None = None
    max_bytes: int | None = None
    max_messages: int | None = None
    replicas: int | None = None

    def seen(self, info: Any) -> None:
        """The columns of a JetStream StreamInfo."""
        storage = info.config.storage
        self.present = True
        self.storage_type = None if storage is None else str(getattr(storage, "value", storage))
        self.subjects = list(info.config.subjects or [])
        self.messages = info.state.messages
        self.bytes = info.state.bytes
        self.first_seq = info.state.first_seq
        self.last_seq = info.state.last_seq
        self.consumer_count = info.state.consumer_count
        # The limits in force, beside the configured ones in nats_stream_status.
        self.max_age_seconds = float(info.config.max_age) if info.config.max_age else 0.0
        self.max_bytes = info.config.max_bytes
        self.max_messages = info.config.max_msgs
        self.replicas = info.config.num_replicas


@dataclass(slots=True)
class ConsumerState:
    """One rule_nats_consumer_state row. Not frozen: filled in as JetStream answers."""

    stream_name: str
    consumer_name: str
    worker: str
    present: bool = False
    last_error: str | None = None
    filter_subject: str | None = None
    num_pending: int | None = None
    num_ack_pending: int | None = None
    num_redelivered: int | None = None
    num_waiting: int | None = None

    def seen(self, cinfo: Any) -> None:
        """The columns of a JetStream ConsumerInfo."""
        self.present = True
        self.filter_subject = cinfo.config.filter_subject
        self.num_pending = cinfo.num_pending
        self.num_ack_pending = cinfo.num_ack_pending
        self.num_redelivered = cinfo.num_redelivered
        self.num_waiting = cinfo.num_waiting


def _params(row: StreamState | ConsumerState) -> dict[str, Any]:
    """The row as the query's named parameters; driver messages may quote a server URL, and the
    monitor role reads last_error."""
    out = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
    if row.last_error is not None:
        out["last_error"] = redact_urls_in(row.last_error)
    return out


async def _connected(nats_pool: NatsPool, conn: NatsConnection) -> NatsClient:
    """The configuration's client, connecting it if there is none; NatsUnavailable at once while it
    reconnects (a request would only wait for its timeout) or after a failed connect."""
    await nats_pool.get(conn)
    return nats_pool.connected(conn)


@dataclass
class ReconcileResult:
    ok_streams: set[str]
    ok_consumers: set[tuple[str, str]]


async def reconcile(
    registry: Registry,
    nats_pool: NatsPool,
    pool: AsyncConnectionPool[Any],
    worker: str,
    wanted_consumers: set[tuple[str, str]],
) -> ReconcileResult:
    """Apply every enabled stream and the wanted consumers; record state and errors."""
    result = ReconcileResult(set(), set())
    states: list[StreamState] = []
    for s in registry.streams.values():
        if s.enabled:
            state = await reconcile_stream(s, registry.connections.get(s.config_name), nats_pool, worker)
            states.append(state)
            if state.present and state.last_error is None:
                result.ok_streams.add(s.stream_name)
    cstates: list[ConsumerState] = []
    for key in sorted(wanted_consumers):
        cstate = await reconcile_consumer(registry.consumers[key], registry, nats_pool, worker)
        cstates.append(cstate)
        if cstate.present:
            result.ok_consumers.add(key)
    async with pool.connection() as db:
        for st in states:
            await db.execute(query("stream_state_upsert"), _params(st))
        for cs in cstates:
            await db.execute(query("consumer_state_upsert"), _params(cs))
    return result


async def reconcile_stream(
    s: StreamDef, conn: NatsConnection | None, nats_pool: NatsPool, worker: str
) -> StreamState:
    """Create the stream, or update what the registry changes of it; its state row says how it went."""
    state = StreamState(s.stream_name, s.config_name, worker)
    if conn is None:
        state.last_error = f"no NATS configuration named {s.config_name!r}"
        return state
    try:
        client = await _connected(nats_pool, conn)
    except NatsUnavailable as exc:
        state.last_error = str(exc)
        return state
    js = client.jetstream(timeout=conn.request_timeout)
    want = stream_config(s)
    try:
        try:
            info = await js.stream_info(s.stream_name)
            if await _update_stream(js, s, info.config, want, state):
                info = await js.stream_info(s.stream_name)
        except nats.js.errors.NotFoundError:
            logger.info("creating stream %s", s.stream_name, extra={"action": "stream_create"})
            await js.add_stream(want)
            info = await js.stream_info(s.stream_name)
        state.seen(info)
    except (nats.errors.Error, TimeoutError) as exc:
        state.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning("stream %s: %s", s.stream_name, state.last_error, extra={"action": "stream_error"})
    return state


async def _update_stream(
    js: Any, s: StreamDef, current: StreamConfig, want: StreamConfig, state: StreamState
) -> bool:
    """Send what the registry changes of an existing stream; True when something was sent (a
    refusal is the state's last_error)."""
    plan = plan_update(current, want, stream_differs(current, want), STREAM_FIELD_COLUMN, s.adopted_unchanged)
    if plan.kept:
        logger.debug(
            "stream %s: keeping %s as JetStream has it (adopted; the row does not change it)",
            s.stream_name,
            ", ".join(plan.kept),
            extra={"action": "stream_adopted_kept"},
        )
    diff = list(plan.changed)
    if not diff:
        return False
    lowered = durability_changes(current, want, plan.changed)
    if lowered:
        # Never by default: only a row that says so (written by a DBA, or changed after the
        # adoption) gets here. Loud, because a node loss may now cost data.
        logger.warning(
            "stream %s: %s, as rule_nats_streams says",
            s.stream_name,
            "; ".join(lowered),
            extra={"action": "stream_durability_change"},
        )
    logger.info("updating stream %s (%s)", s.stream_name, ", ".join(diff), extra={"action": "stream_update"})
    try:
        await js.update_stream(plan.config)
    except nats.js.errors.APIError as exc:
        state.last_error = f"JetStream refused the change of {', '.join(diff)}: {exc.description}"
        logger.warning(
            "stream %s: %s", s.stream_name, state.last_error, extra={"action": "stream_update_refused"}
        )
    return True


async def reconcile_consumer(
    c: ConsumerDef, registry: Registry, nats_pool: NatsPool, worker: str
) -> ConsumerState:
    """Create the durable consumer, or update what the registry changes of it; its state row says
    how it went (present: it is in place)."""
    cstate = ConsumerState(c.stream_name, c.consumer_name, worker)
    s_def = registry.streams.get(c.stream_name)
    if s_def is None or not s_def.enabled:
        cstate.last_error = f"stream {c.stream_name} is not configured or not enabled"
        return cstate
    conn = registry.connections.get(s_def.config_name)
    if conn is None:
        cstate.last_error = f"no NATS configuration named {s_def.config_name!r}"
        return cstate
    try:
        client = await _connected(nats_pool, conn)
        js = client.jetstream(timeout=conn.request_timeout)
        want = consumer_config(c)
        try:
            cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
            # What cannot change (deliver policy, start) and what the registry does not model
            # (replicas, backoff, ...) stay as JetStream has them: only changed settings are sent.
            plan = plan_update(
                cinfo.config,
                want,
                consumer_differs(cinfo.config, want),
                CONSUMER_FIELD_COLUMN,
                c.adopted_unchanged,
            )
            if plan.changed:
                logger.info(
                    "updating consumer %s/%s (%s)",
                    c.stream_name,
                    c.consumer_name,
                    ", ".join(plan.changed),
                    extra={"action": "consumer_update"},
                )
                await js.add_consumer(c.stream_name, plan.config)
                cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
        except nats.js.errors.NotFoundError:
            logger.info(
                "creating consumer %s/%s", c.stream_name, c.consumer_name, extra={"action": "consumer_create"}
            )
            await js.add_consumer(c.stream_name, want)
            cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
        cstate.seen(cinfo)
    except NatsUnavailable as exc:
        cstate.last_error = str(exc)
    except (nats.errors.Error, TimeoutError) as exc:
        cstate.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "consumer %s/%s: %s",
            c.stream_name,
            c.consumer_name,
            cstate.last_error,
            extra={"action": "consumer_error"},
        )
    return cstate


@dataclass
class Observation:
    pending: dict[tuple[str, str], int]  # consumer -> num_pending
    missing_consumers: list[tuple[str, str]]
    missing_streams: list[str]


async def observe(
    registry: Registry,
    nats_pool: NatsPool,
    pool: AsyncConnectionPool[Any],
    worker: str,
    consumers: list[tuple[str, str]],
) -> Observation:
    """Read stream and consumer info from JetStream (changing nothing) into the state tables.

    A consumer deleted behind our back is recorded as missing here and re-created by the next
    reload, so the status views show what happened for a while instead of nothing.
    """
    out = Observation({}, [], [])
    states: list[StreamState] = []
    cstates: list[ConsumerState] = []
    for s in registry.streams.values():
        conn = registry.connections.get(s.config_name)
        if not s.enabled or conn is None:
            continue
        try:
            # Not while it reconnects: every request would only wait for its timeout, delaying the
            # heartbeat; the worker's row says the connection is down meanwhile (nats_down).
            js = nats_pool.connected(conn).jetstream(timeout=conn.request_timeout)
        except NatsUnavailable:
            continue
        st = await observe_stream(js, s, worker, out)
        if st is None:
            continue
        states.append(st)
        for key in consumers:
            if key[0] == s.stream_name:
                cs = await observe_consumer(js, key, worker, out)
                if cs is not None:
                    cstates.append(cs)
    if states or cstates:
        async with pool.connection() as db:
            for st in states:
                await db.execute(query("stream_state_observe"), _params(st))
            for cs in cstates:
                await db.execute(query("consumer_state_upsert"), _params(cs))
    return out


async def observe_stream(js: Any, s: StreamDef, worker: str, out: Observation) -> StreamState | None:
    """The stream's state row (None: JetStream did not answer; the row stays as it was)."""
    st = StreamState(s.stream_name, s.config_name, worker)
    try:
        st.seen(await js.stream_info(s.stream_name))
    except nats.js.errors.NotFoundError:
        st.last_error = (
            "the stream does not exist in JetStream (deleted?); it is re-created at the next reload"
        )
        out.missing_streams.append(s.stream_name)
    except (nats.errors.Error, TimeoutError) as exc:
        logger.debug("stream info %s: %s", s.stream_name, exc)
        return None
    return st


async def observe_consumer(
    js: Any, key: tuple[str, str], worker: str, out: Observation
) -> ConsumerState | None:
    """The consumer's state row and its lag in ``out`` (None: JetStream did not answer)."""
    cs = ConsumerState(key[0], key[1], worker)
    try:
        cinfo = await js.consumer_info(*key)
        cs.seen(cinfo)
        out.pending[key] = int(cinfo.num_pending or 0)
    except nats.js.errors.NotFoundError:
        cs.last_error = (
            "the consumer does not exist in JetStream (deleted?); it is re-created at the next reload"
        )
        out.missing_consumers.append(key)
    except (nats.errors.Error, TimeoutError) as exc:
        logger.debug("consumer info %s/%s: %s", *key, exc)
        return None
    return cs
