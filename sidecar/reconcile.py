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


def stream_fields(info: Any) -> dict[str, Any]:
    """The rule_nats_stream_state columns of a JetStream StreamInfo."""
    storage = info.config.storage
    return {
        "present": True,
        "storage_type": None if storage is None else str(getattr(storage, "value", storage)),
        "subjects": list(info.config.subjects or []),
        "messages": info.state.messages,
        "bytes": info.state.bytes,
        "first_seq": info.state.first_seq,
        "last_seq": info.state.last_seq,
        "consumer_count": info.state.consumer_count,
        # The limits in force, beside the configured ones in nats_stream_status.
        "max_age_seconds": float(info.config.max_age) if info.config.max_age else 0.0,
        "max_bytes": info.config.max_bytes,
        "max_messages": info.config.max_msgs,
        "replicas": info.config.num_replicas,
    }


def consumer_fields(cinfo: Any) -> dict[str, Any]:
    """The rule_nats_consumer_state columns of a JetStream ConsumerInfo."""
    return {
        "present": True,
        "filter_subject": cinfo.config.filter_subject,
        "num_pending": cinfo.num_pending,
        "num_ack_pending": cinfo.num_ack_pending,
        "num_redelivered": cinfo.num_redelivered,
        "num_waiting": cinfo.num_waiting,
    }


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
    states: list[dict[str, Any]] = []
    cstates: list[dict[str, Any]] = []
    for s in registry.streams.values():
        if not s.enabled:
            continue
        conn = registry.connections.get(s.config_name)
        state: dict[str, Any] = {
            "stream_name": s.stream_name,
            "config_name": s.config_name,
            "present": False,
            "last_error": None,
            "storage_type": None,
            "subjects": None,
            "messages": None,
            "bytes": None,
            "max_age_seconds": None,
            "max_bytes": None,
            "max_messages": None,
            "replicas": None,
            "first_seq": None,
            "last_seq": None,
            "consumer_count": None,
            "worker": worker,
        }
        states.append(state)
        if conn is None:
            state["last_error"] = f"no NATS configuration named {s.config_name!r}"
            continue
        try:
            client = await _connected(nats_pool, conn)
        except NatsUnavailable as exc:
            state["last_error"] = str(exc)
            continue
        js = client.jetstream(timeout=conn.request_timeout)
        want = stream_config(s)
        try:
            try:
                info = await js.stream_info(s.stream_name)
                plan = plan_update(
                    info.config,
                    want,
                    stream_differs(info.config, want),
                    STREAM_FIELD_COLUMN,
                    s.adopted_unchanged,
                )
                if plan.kept:
                    logger.debug(
                        "stream %s: keeping %s as JetStream has it (adopted; the row does not change it)",
                        s.stream_name,
                        ", ".join(plan.kept),
                        extra={"action": "stream_adopted_kept"},
                    )
                diff = list(plan.changed)
                if diff:
                    lowered = durability_changes(info.config, want, plan.changed)
                    if lowered:
                        # Never by default: only a row that says so (written by a DBA, or changed
                        # after the adoption) gets here. Loud, because a node loss may now cost data.
                        logger.warning(
                            "stream %s: %s, as rule_nats_streams says",
                            s.stream_name,
                            "; ".join(lowered),
                            extra={"action": "stream_durability_change"},
                        )
                    logger.info(
                        "updating stream %s (%s)",
                        s.stream_name,
                        ", ".join(diff),
                        extra={"action": "stream_update"},
                    )
                    try:
                        await js.update_stream(plan.config)
                    except nats.js.errors.APIError as exc:
                        state["last_error"] = (
                            f"JetStream refused the change of {', '.join(diff)}: {exc.description}"
                        )
                        logger.warning(
                            "stream %s: %s",
                            s.stream_name,
                            state["last_error"],
                            extra={"action": "stream_update_refused"},
                        )
                    info = await js.stream_info(s.stream_name)
            except nats.js.errors.NotFoundError:
                logger.info("creating stream %s", s.stream_name, extra={"action": "stream_create"})
                await js.add_stream(want)
                info = await js.stream_info(s.stream_name)
            state.update(stream_fields(info))
            if state["last_error"] is None:
                result.ok_streams.add(s.stream_name)
        except (nats.errors.Error, TimeoutError) as exc:
            state["last_error"] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "stream %s: %s", s.stream_name, state["last_error"], extra={"action": "stream_error"}
            )

    for key in sorted(wanted_consumers):
        c = registry.consumers[key]
        s_def = registry.streams.get(c.stream_name)
        cstate: dict[str, Any] = {
            "stream_name": c.stream_name,
            "consumer_name": c.consumer_name,
            "present": False,
            "last_error": None,
            "filter_subject": None,
            "num_pending": None,
            "num_ack_pending": None,
            "num_redelivered": None,
            "num_waiting": None,
            "worker": worker,
        }
        cstates.append(cstate)
        if s_def is None or not s_def.enabled:
            cstate["last_error"] = f"stream {c.stream_name} is not configured or not enabled"
            continue
        conn = registry.connections.get(s_def.config_name)
        if conn is None:
            cstate["last_error"] = f"no NATS configuration named {s_def.config_name!r}"
            continue
        try:
            client = await _connected(nats_pool, conn)
            js = client.jetstream(timeout=conn.request_timeout)
            want_c = consumer_config(c)
            try:
                cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
                # What cannot change (deliver policy, start) and what the registry does not model
                # (replicas, backoff, ...) stay as JetStream has them: only changed settings are sent.
                cplan = plan_update(
                    cinfo.config,
                    want_c,
                    consumer_differs(cinfo.config, want_c),
                    CONSUMER_FIELD_COLUMN,
                    c.adopted_unchanged,
                )
                diff = list(cplan.changed)
                if diff:
                    logger.info(
                        "updating consumer %s/%s (%s)",
                        c.stream_name,
                        c.consumer_name,
                        ", ".join(diff),
                        extra={"action": "consumer_update"},
                    )
                    await js.add_consumer(c.stream_name, cplan.config)
                    cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
            except nats.js.errors.NotFoundError:
                logger.info(
                    "creating consumer %s/%s",
                    c.stream_name,
                    c.consumer_name,
                    extra={"action": "consumer_create"},
                )
                await js.add_consumer(c.stream_name, want_c)
                cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
            cstate.update(consumer_fields(cinfo))
            result.ok_consumers.add(key)
        except NatsUnavailable as exc:
            cstate["last_error"] = str(exc)
        except (nats.errors.Error, TimeoutError) as exc:
            cstate["last_error"] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "consumer %s/%s: %s",
                c.stream_name,
                c.consumer_name,
                cstate["last_error"],
                extra={"action": "consumer_error"},
            )

    for row in (*states, *cstates):
        # Driver messages may quote a server URL; the monitor role reads these columns.
        if row["last_error"] is not None:
            row["last_error"] = redact_urls_in(row["last_error"])
    async with pool.connection() as db:
        for st in states:
            await db.execute(query("stream_state_upsert"), st)
        for cs in cstates:
            await db.execute(query("consumer_state_upsert"), cs)
    return result


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
    states: list[dict[str, Any]] = []
    cstates: list[dict[str, Any]] = []
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
        st: dict[str, Any] = dict.fromkeys(
            (
                "storage_type",
                "subjects",
                "messages",
                "bytes",
                "first_seq",
                "last_seq",
                "consumer_count",
                "max_age_seconds",
                "max_bytes",
                "max_messages",
                "replicas",
            )
        )
        st.update(
            stream_name=s.stream_name,
            config_name=s.config_name,
            present=False,
            last_error=None,
            worker=worker,
        )
        try:
            info = await js.stream_info(s.stream_name)
            st.update(stream_fields(info))
        except nats.js.errors.NotFoundError:
            st["last_error"] = (
                "the stream does not exist in JetStream (deleted?); it is re-created at the next reload"
            )
            out.missing_streams.append(s.stream_name)
        except (nats.errors.Error, TimeoutError) as exc:
            logger.debug("stream info %s: %s", s.stream_name, exc)
            continue
        states.append(st)
        for key in consumers:
            if key[0] != s.stream_name:
                continue
            cs: dict[str, Any] = dict.fromkeys(
                ("filter_subject", "num_pending", "num_ack_pending", "num_redelivered", "num_waiting")
            )
            cs.update(stream_name=key[0], consumer_name=key[1], present=False, last_error=None, worker=worker)
            try:
                cinfo = await js.consumer_info(*key)
                cs.update(consumer_fields(cinfo))
                out.pending[key] = int(cinfo.num_pending or 0)
            except nats.js.errors.NotFoundError:
                cs["last_error"] = (
                    "the consumer does not exist in JetStream (deleted?); it is re-created at the next reload"
                )
                out.missing_consumers.append(key)
            except (nats.errors.Error, TimeoutError) as exc:
                logger.debug("consumer info %s/%s: %s", *key, exc)
                continue
            cstates.append(cs)
    if states or cstates:
        async with pool.connection() as db:
            for st in states:
                await db.execute(query("stream_state_observe"), st)
            for cs in cstates:
                await db.execute(query("consumer_state_upsert"), cs)
    return out
