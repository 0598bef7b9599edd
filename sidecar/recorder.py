"""Batched writes of delivery outcomes, and acknowledgements to NATS only after they commit.

Deliveries hand their outcome here and move on. Every few milliseconds (or when enough
are waiting) the recorder writes them all in one transaction: attempt rows by COPY, dead
letters, retry-schedule changes. Only after COMMIT are the NATS messages acknowledged, so
a crash at any moment leaves each message either recorded and acknowledged, or
unacknowledged (and redelivered by JetStream).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.queries import query

logger = logging.getLogger(__name__)

ATTEMPT_COLUMNS = (
    "attempted_at",
    "message_id",
    "stream_name",
    "consumer_name",
    "stream_seq",
    "subject",
    "webhook_id",
    "url",
    "attempt",
    "outcome",
    "http_status",
    "latency_ms",
    "error",
    "response_body",
    "next_attempt_at",
    "worker_name",
    "notes",
)
RETRY_COLUMNS = (
    "message_id",
    "stream_name",
    "consumer_name",
    "stream_seq",
    "subject",
    "message_raw",
    "message_headers",
    "attempts",
    "first_attempt_at",
    "last_error",
    "next_attempt_at",
    "webhook_id",
)


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


@dataclass(slots=True)
class Outcome:
    """What to write for one message, and what to do once it is committed."""

    attempt: tuple[Any, ...] | None = None
    dead_letter: dict[str, Any] | None = None
    retry_insert: tuple[Any, ...] | None = None
    retry_update: tuple[Any, ...] | None = None  # (retry_id, attempts, next_attempt_at, last_error)
    retry_delete: int | None = None
    # Endpoints seen enabled again: their held deliveries become due. Written after the batch's
    # retry inserts and updates, so a delivery held on the stale registry just before is released too.
    release_webhooks: tuple[int, ...] = ()
    after_commit: Callable[[], Awaitable[None]] | None = None


class Recorder:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        flush_interval: float = 0.005,
        max_batch: int = 1000,
        max_backlog: int = 20000,
    ) -> None:
        self.pool = pool
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._queue: list[Outcome] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self.max_backlog = max_backlog

    async def submit(self, outcome: Outcome) -> None:
        """Queue an outcome; waits while PostgreSQL is behind (backpressure instead of memory growth)."""
        if len(self._queue) >= self.max_backlog:
            async with self._room:
                await self._room.wait_for(lambda: len(self._queue) < self.max_backlog)
        self._queue.append(outcome)
        if len(self._queue) >= self.max_batch:
            self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            if not self._queue:
                if stop.is_set():
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.05)
                continue
            # Let a few more outcomes arrive so one transaction carries many.
            if len(self._queue) < self.max_batch and not stop.is_set():
                await asyncio.sleep(self.flush_interval)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                await self._write(batch)
                backoff = 0.1
            except psycopg.Error as exc:
                # Nothing was acknowledged: put the batch back and try again.
                self._queue[:0] = batch
                logger.warning(
                    "recording %d outcomes failed: %s; retrying in %.1f s",
                    len(batch),
                    exc,
                    backoff,
                    extra={"action": "record_failed"},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            async with self._room:
                self._room.notify_all()
            for outcome in batch:
                if outcome.after_commit is not None:
                    try:
                        await outcome.after_commit()
                    except Exception as exc:  # an ack that fails is redelivered by JetStream: safe
                        logger.debug("after-commit action failed: %s", exc)

    async def _write(self, batch: list[Outcome]) -> None:
        attempts = [o.attempt for o in batch if o.attempt is not None]
        dead = [o.dead_letter for o in batch if o.dead_letter is not None]
        inserts = [o.retry_insert for o in batch if o.retry_insert is not None]
        updates = [o.retry_update for o in batch if o.retry_update is not None]
        deletes = [o.retry_delete for o in batch if o.retry_delete is not None]
        releases = sorted({w for o in batch for w in o.release_webhooks})
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor()
            if attempts:
                async with cur.copy(
                    f"COPY public.rule_nats_delivery_attempts ({', '.join(ATTEMPT_COLUMNS)}) FROM STDIN"
                ) as copy:
                    for row in attempts:
                        await copy.write_row(row)
            if inserts:
                async with cur.copy(
                    f"COPY public.rule_nats_retries ({', '.join(RETRY_COLUMNS)}) FROM STDIN"
                ) as copy:
                    for row in inserts:
                        await copy.write_row(row)
            if updates:
                await cur.execute(
                    query("retries_update"),
                    {
                        "ids": [u[0] for u in updates],
                        "attempts": [u[1] for u in updates],
                        "next": [u[2] for u in updates],
                        "errors": [u[3] for u in updates],
                    },
                )
            if deletes:
                await cur.execute(query("retries_delete"), {"ids": deletes})
            if releases:
                await cur.execute(query("retries_release"), {"ids": releases})
            if dead:
                for d in dead:
                    d["message_headers"] = (
                        None if d["message_headers"] is None else json.dumps(d["message_headers"])
                    )
                await cur.executemany(query("dead_letter_insert"), dead)
