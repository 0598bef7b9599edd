"""Endpoint health written to PostgreSQL: circuit state per endpoint (rule_nats_endpoint_state,
shown by nats_endpoint_health) and endpoints the worker disables (HTTP 410, or failing for longer
than disable_after_seconds)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.endpoints import EndpointGates
from sidecar.queries import query

logger = logging.getLogger(__name__)


async def write_endpoint_health(
    pool: AsyncConnectionPool[Any], worker: str, gates: EndpointGates, disables: dict[int, str]
) -> dict[int, str]:
    """Write the gates changed since the last write and the disables; what could not be written is
    written next time (the gates stay dirty, the disables not written are returned)."""
    dirty = [(k, g) for k, g in gates.dirty() if isinstance(k, int)]
    if not dirty and not disables:
        return {}
    try:
        async with pool.connection() as conn:
            for webhook_id, reason in disables.items():
                await conn.execute(query("endpoint_disable"), {"webhook_id": webhook_id, "reason": reason})
            if dirty:
                await conn.execute(
                    query("endpoint_state_upsert"),
                    {
                        "worker": worker,
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
        logger.warning("writing endpoint health failed: %s", exc, extra={"action": "endpoint_state_failed"})
        return disables
    return {}
