"""Webhooks read from PostgreSQL, for a message the registry in memory cannot place: by id when it
names one the registry lacks, by subject when it names none and the registry has none on its subject.

The registry is reloaded on NOTIFY, coalesced to two reads a second (sidecar.app): a webhook
inserted and published to within that half second was dead-lettered ``unknown_webhook`` from a
stale cache. Before a message is dead-lettered for that reason, its webhook is read by primary key.
A webhook_id that does not exist costs one index lookup (no reload), so messages naming random ids
cannot make the worker re-read the registry. The same holds for routing by subject
(``sidecar.routing``): a subject with no webhook costs one lookup on rule_webhooks.
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


async def read_webhooks_on_subject(pool: AsyncConnectionPool[Any], subject: str) -> list[WebhookDef]:
    """The webhooks whose nats_subject is ``subject`` (whatever their state: ``routing.targets``
    chooses), with their active signing keys. Raises what psycopg raises when PostgreSQL cannot
    answer."""
    async with pool.connection(timeout=5.0) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(query("webhooks_on_subject"), {"subject": subject})
        rows = await cur.fetchall()
        found = []
        for row in rows:
            await cur.execute(query("secrets_of_webhook"), {"webhook_id": row["webhook_id"]})
            keys = keys_from_rows(list(await cur.fetchall())).get(int(row["webhook_id"]), ())
            found.append(webhook_from_row(row, keys))
    return found
