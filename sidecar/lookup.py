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

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar.lifecycle import Dead, Defer, Job
from sidecar.queries import query
from sidecar.registry import WebhookDef, keys_from_rows, webhook_from_row
from sidecar.routing import on_subject

logger = logging.getLogger(__name__)

LOOKUP_RETRY_SECONDS = 5.0  # an unknown webhook that PostgreSQL could not be asked about
# An unknown webhook that PostgreSQL does not show either is asked about once more after this: the
# webhook may be inserted in the very transaction that published the message (an immediate publish
# reaches NATS before that COMMIT), as the original's examples do.
UNKNOWN_WEBHOOK_WAIT = 2.0
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


class Lookups:
    """What the driver asks PostgreSQL about a message before it is sent or dead-lettered."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        lookup_webhook: Callable[[int], Awaitable[bool]] | None,
        lookup_subject: Callable[[str], Awaitable[list[WebhookDef]]] | None,
    ) -> None:
        self.pool = pool
        # A webhook_id the registry lacks (True: it exists and is in the registry now); the worker's.
        self.lookup_webhook = lookup_webhook
        self.lookup_subject = lookup_subject or functools.partial(read_webhooks_on_subject, pool)
        # Outcomes waiting for their COMMIT, by stream sequence: a copy JetStream redelivers meanwhile
        # waits for it instead of being sent again.
        self.uncommitted: dict[tuple[int, int | None], asyncio.Future[bool]] = {}

    async def webhook(self, job: Job, unknown: Dead) -> Dead | Defer | None:
        """An unknown webhook_id: the registry in memory may be older than the webhook (reloads are
        coalesced). Dead-lettered only once PostgreSQL says there is no such webhook; when it cannot
        say, the message waits in the retry table and is looked at again. Not there either: asked
        about once more after UNKNOWN_WEBHOOK_WAIT, since the transaction inserting it may not have
        committed yet. None: it is there, and in the registry now."""
        if self.lookup_webhook is None or unknown.unknown_webhook is None:
            return unknown
        try:
            found = await self.lookup_webhook(unknown.unknown_webhook)
        except Exception as exc:
            logger.warning(
                "cannot look webhook %s up: %s; message %s/%s waits",
                unknown.unknown_webhook,
                exc,
                job.stream,
                job.seq,
                extra={"action": "webhook_lookup_failed"},
            )
            return Defer(LOOKUP_RETRY_SECONDS, f"webhook {unknown.unknown_webhook} could not be looked up")
        if not found:
            if job.retry_id is None:
                return Defer(UNKNOWN_WEBHOOK_WAIT, f"{unknown.error}: asked again once")
            return unknown
        return None

    async def on_subject(self, job: Job) -> tuple[WebhookDef, ...]:
        """No webhook on the message's subject in the registry in memory, which may be older than a
        webhook just registered (reloads are coalesced): PostgreSQL's answer, and when it has none
        either, its answer UNKNOWN_WEBHOOK_WAIT later (the publishing transaction may be the one
        inserting the webhook). Asked until PostgreSQL answers ("cannot tell" is not "none"); the
        message is held and kept alive meanwhile, holding no send slot."""
        looks, delay = 0, 0.5
        while True:
            try:
                found = on_subject(await self.lookup_subject(job.subject), job.subject)
            except Exception as exc:
                logger.warning(
                    "cannot look up the webhooks on subject %r: %s; message %s/%s waits %.1f s",
                    job.subject,
                    exc,
                    job.stream,
                    job.seq,
                    delay,
                    extra={"action": "webhook_lookup_failed"},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LOOKUP_RETRY_SECONDS)
                continue
            looks += 1
            if found or looks > 1:
                return found
            await asyncio.sleep(UNKNOWN_WEBHOOK_WAIT)

    async def recorded_before(self, job: Job) -> bool:
        """Has this redelivered message an outcome already? Asked until PostgreSQL answers: "cannot
        tell" is not "no" (answering "no" during an outage sent a message nine times). The message
        stays held and alive meanwhile, and is not sent."""
        pending = self.uncommitted.get((job.seq, job.webhook_id)) if job.seq is not None else None
        if pending is not None:
            try:
                if await asyncio.shield(pending):
                    return True  # this worker's own outcome for it was waiting for its COMMIT
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this task is cancelled, not the one waiting for the COMMIT
                # That one was cancelled (shutdown): PostgreSQL says whether its outcome got in.
        delay = 0.5
        while True:
            answer = await self._already_recorded(job)
            if answer is not None:
                return answer
            logger.warning(
                "cannot tell whether message %s/%s was delivered; holding it, asking again in %.1f s",
                job.stream,
                job.seq,
                delay,
                extra={"action": "recorded_unknown"},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _already_recorded(self, job: Job) -> bool | None:
        """True or False as PostgreSQL says; None when it cannot be asked."""
        params = {
            "stream": job.stream,
            "consumer": job.consumer,
            "seq": job.seq,
            "message_id": job.message_id,
        }
        try:
            async with self.pool.connection(timeout=5.0) as conn:
                cur = await conn.execute(query("outcome_recorded"), params)
                row = await cur.fetchone()
                return bool(row and row[0])
        except Exception as exc:
            logger.debug("outcome check failed: %s", exc)
            return None
