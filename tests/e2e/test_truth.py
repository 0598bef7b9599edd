"""Issue 13, "tell the operator the truth": outbox latency per message, readiness that names each
component, NATS problems reported as NATS problems (in /readyz, the log and SQL), a prompt SIGTERM
with NATS down."""

from __future__ import annotations

import json
from typing import Any

import nats
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar.config import nats_connection_from_row
from sidecar.jetstream import NatsPool
from sidecar.outbox import OutboxRelay
from sidecar.queries import query
from tests.integration.test_publish_sql import _add_stream, register_stream
from tests.support.stack import NatsServer


async def test_outbox_latency_is_measured_per_message(
    nats_db: psycopg.Connection, database_url: str, nats_server: NatsServer
) -> None:
    """Each published row gets its own publish-to-ack time. Before, every row of a relay batch got
    the batch's elapsed time: five events acknowledged at once showed the one second that a sixth,
    never acknowledged, waited for its timeout."""
    await _add_stream(nats_server.url, "LAT", ["lat.>"])
    register_stream(nats_db, "LAT", ["lat.>"])
    nats_db.execute("UPDATE rule_nats_config SET request_timeout_seconds = 1")
    with nats_db.transaction():
        for i in range(5):
            nats_db.execute(
                "SELECT rule_nats_publish_on_commit('lat.fast', %s::jsonb)", (json.dumps({"i": i}),)
            )
        # A subject someone listens to on plain NATS, without a stream: nobody acknowledges it.
        nats_db.execute(
            "INSERT INTO rule_nats_outbox (subject, payload, message_id) VALUES ('silent.x', '{}', 'silent-1')"
        )
    listener = await nats.connect(nats_server.url)
    await listener.subscribe("silent.>")
    await listener.flush()
    row = nats_db.cursor(row_factory=dict_row).execute(query("nats_config_all")).fetchone()
    assert row is not None
    conn = nats_connection_from_row(row, None)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False)
    nats_pool = NatsPool("latency-test")
    await pool.open(wait=True)
    try:
        relay = OutboxRelay(pool, nats_pool, lambda: {conn.config_name: conn}, batch_size=10)
        assert await relay.relay_once() == 6
    finally:
        await nats_pool.close()
        await pool.close()
        await listener.close()
    rows = nats_db.execute(
        "SELECT success, latency_ms FROM rule_nats_publish_history WHERE triggered_by = 'outbox'"
    ).fetchall()
    acked = [ms for ok, ms in rows if ok]
    timed_out = [ms for ok, ms in rows if not ok]
    assert len(acked) == 5 and len(timed_out) == 1, rows
    assert max(acked) < timed_out[0], rows
    stats = nats_db.execute(
        "SELECT message_count, min_latency_ms, max_latency_ms FROM nats_performance_stats WHERE source = 'outbox'"
    ).fetchall()
    assert len(stats) == 2, stats  # lat.fast and silent.x
    fast = next(s for s in stats if s[0] == 5)
    assert fast[2] < max(s[2] for s in stats), stats
