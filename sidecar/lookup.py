"""One webhook read from PostgreSQL by id, for a message that names one the registry in memory lacks.

The registry is reloaded on NOTIFY, coalesced to two reads a second (sidecar.app): a webhook
inserted and published to within that half second was dead-lettered ``unknown_webhook`` from a
stale cache. Before a message is dead-lettered for that reason, its webhook is read by primary key.
A webhook_id that does not exist costs one index lookup (no reload), so messages naming random ids
cannot make the worker re-read the registry.
"""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar.queries import query
from sidecar.registry import WebhookDef, keys_from_rows, webhook_from_row

_INT4 = 2**31  # rule_webhooks.webhook_id is an integer: ids outside it cannot exist


async def read_webhook(pool: AsyncConnectionPool[Any], webhook_id: int) -> WebhookDef | None:
    """The webhook with its active signing keys, or None when rule_webhooks has no such row.
    Raises what psycopg raises when PostgreSQL cannot answer ("cannot tell" is not "unknown")."""
    if not -_INT4 <= webhook_id < _INT4:
        return None
    async with pool.connection(timeout=5.0) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(query("webhook_by_id"), {"webhook_id": webhook_id})
        row = await cur.fetchone()
        if row is None:
            return None
        await cur.execute(query("secrets_of_webhook"), {"webhook_id": webhook_id})
        secrets = await cur.fetchall()
    keys = keys_from_rows(list(secrets)).get(webhook_id, ())
    return webhook_from_row(row, keys)
