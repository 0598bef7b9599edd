"""Talking to JetStream directly: streams made and read without the worker, raw and numbered messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import nats
import nats.js.errors
from nats.js.api import ConsumerInfo, StreamConfig


def publish_ids(url: str, subject: str, ids: range, webhook_url: str, **auth: Any) -> None:
    """One message per id: ``{"webhook_url": ..., "data": {"id": i}}``; ``auth`` goes to nats.connect."""

    async def go() -> None:
        nc = await nats.connect(url, **auth)
        js = nc.jetstream(timeout=10)
        for start in range(ids.start, ids.stop, 100):
            await asyncio.gather(
                *(
                    js.publish(subject, json.dumps({"webhook_url": webhook_url, "data": {"id": i}}).encode())
                    for i in range(start, min(ids.stop, start + 100))
                )
            )
        await nc.close()

    asyncio.run(go())


def publish_raw(url: str, subject: str, bodies: list[bytes]) -> None:
    """These bodies as they are, all in flight at once (JetStream keeps their order per subject)."""

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await asyncio.gather(*(js.publish(subject, b) for b in bodies))
        await nc.close()

    asyncio.run(go())


async def add_stream_async(url: str, name: str, subjects: list[str], **kw: object) -> None:
    """A stream made in JetStream directly (replacing one of that name)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
        await js.add_stream(StreamConfig(name=name, subjects=subjects, **kw))  # type: ignore[arg-type]
    finally:
        await nc.close()


def add_stream(url: str, name: str, subjects: list[str], **kw: object) -> None:
    asyncio.run(add_stream_async(url, name, subjects, **kw))


async def _read_stream(url: str, name: str, seq: int) -> tuple[bytes, dict[str, str]]:
    nc = await nats.connect(url)
    try:
        msg = await nc.jetstream().get_msg(name, seq)
        return msg.data or b"", dict(msg.headers or {})
    finally:
        await nc.close()


def read_stream(url: str, name: str, seq: int) -> tuple[bytes, dict[str, str]]:
    """The data and headers of message ``seq`` of the stream."""
    return asyncio.run(_read_stream(url, name, seq))


async def _consumer_info(url: str, stream: str, consumer: str) -> ConsumerInfo:
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, consumer)
    finally:
        await nc.close()


def consumer_info(url: str, stream: str, consumer: str = "workers") -> ConsumerInfo:
    """What JetStream says of a consumer: ``num_pending`` (not yet delivered to any worker),
    ``num_ack_pending`` (delivered, not acknowledged: could come back), ``num_waiting`` (pulls)."""
    return asyncio.run(_consumer_info(url, stream, consumer))


def settled(url: str, stream: str, consumer: str = "workers") -> tuple[int, int]:
    """(num_pending, num_ack_pending) of the consumer: (0, 0) once every message was delivered and
    acknowledged, so that none can come again."""
    info = consumer_info(url, stream, consumer)
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


async def _stream_messages(url: str, name: str) -> int | None:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(name)
        return int(info.state.messages)
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()


def stream_messages(url: str, name: str) -> int | None:
    """How many messages the stream holds, or None when it does not exist (deleted)."""
    return asyncio.run(_stream_messages(url, name))
