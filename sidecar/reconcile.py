"""Make JetStream match the registry: create or update streams and durable consumers.

What JetStream refuses (e.g. changing the storage type of an existing stream) is not
forced: the error is written to rule_nats_stream_state / rule_nats_consumer_state, where
the DBA sees it next to the configuration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
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
            client = await nats_pool.get(conn)
        except NatsUnavailable as exc:
            state["last_error"] = str(exc)
            continue
        js = client.jetstream(timeout=conn.request_timeout)
        want = stream_config(s)
        try:
            try:
                info = await js.stream_info(s.stream_name)
                diff = stream_differs(info.config, want)
                if diff:
                    logger.info(
                        "updating stream %s (%s)",
                        s.stream_name,
                        ", ".join(diff),
                        extra={"action": "stream_update"},
                    )
                    try:
                        await js.update_stream(want)
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
            client = await nats_pool.get(conn)
            js = client.jetstream(timeout=conn.request_timeout)
            want_c = consumer_config(c)
            try:
                cinfo = await js.consumer_info(c.stream_name, c.consumer_name)
                diff = consumer_differs(cinfo.config, want_c)
                if diff:
                    logger.info(
                        "updating consumer %s/%s (%s)",
                        c.stream_name,
                        c.consumer_name,
                        ", ".join(diff),
                        extra={"action": "consumer_update"},
                    )
                    # Keep what cannot change (deliver policy, start) as JetStream has it.
                    want_c.deliver_policy = cinfo.config.deliver_policy
                    want_c.opt_start_seq = cinfo.config.opt_start_seq
                    await js.add_consumer(c.stream_name, want_c)
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
            client = await nats_pool.get(conn)
            js = client.jetstream(timeout=conn.request_timeout)
        except NatsUnavailable:
            continue
        st: dict[str, Any] = dict.fromkeys(
            ("storage_type", "subjects", "messages", "bytes", "first_seq", "last_seq", "consumer_count")
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
