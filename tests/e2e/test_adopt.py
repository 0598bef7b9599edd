"""Adopt, don't overwrite: a stream that exists before the worker registers it keeps its settings;
afterwards only what a DBA changes in the row is applied."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats
import psycopg
from nats.js.api import StorageType, StreamConfig

from tests.support.registry import wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until


def _stream_config(url: str) -> Any:
    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info("HANDMADE")).config
        finally:
            await nc.close()

    return asyncio.run(go())


def test_an_existing_stream_is_adopted_and_only_dba_changes_apply(
    nats_db: psycopg.Connection, nats_server: NatsServer, sidecar_factory: Callable[..., Sidecar]
) -> None:
    async def create() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(
            StreamConfig(
                name="HANDMADE",
                subjects=["hand.>"],
                storage=StorageType.MEMORY,
                description="made with the nats CLI",
                max_age=3600,
                max_msgs=5000,
                duplicate_window=30,
                allow_direct=True,  # not modelled by the registry: must survive an update
            )
        )
        await nc.close()

    asyncio.run(create())
    db = nats_db
    sidecar_factory({"STREAM_NAME": "HANDMADE", "SUBJECT": "hand.>", "QUEUE_GROUP": "hand"}, name="hand-1")
    wait_ready(db)
    row = db.execute(
        "SELECT storage_type, description, max_age_seconds::float8, max_messages, "
        "duplicate_window_seconds::float8, adopted_config IS NOT NULL FROM rule_nats_streams"
    ).fetchone()
    assert row == ("memory", "made with the nats CLI", 3600.0, 5000, 30.0, True), row
    # The DBA changes one setting: that one is applied, the rest stays as it was.
    db.execute("UPDATE rule_nats_streams SET max_age_seconds = 7200 WHERE stream_name = 'HANDMADE'")
    assert wait_until(lambda: float(_stream_config(nats_server.url).max_age or 0) == 7200.0, timeout=10)
    config = _stream_config(nats_server.url)
    assert config.description == "made with the nats CLI"
    assert config.allow_direct is True
    assert config.max_msgs == 5000
