"""Batched writes of delivery outcomes; each outcome's future says when it is committed.

Deliveries hand their outcome here (``submit``) and wait for its future. Every few milliseconds (or
when enough are waiting) the recorder writes them all in one transaction: attempt rows by COPY,
dead letters, retry-schedule changes. Only after COMMIT does the future say True, and only then does
the delivery acknowledge its NATS message, so a crash at any moment leaves each message either
recorded and acknowledged, or unacknowledged (and redelivered by JetStream).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.errors import DatabaseError
from sidecar.history_ids import HistoryIds
from sidecar.outcome import Outcome as Outcome  # re-exported: the type submit() takes
from sidecar.outcome import settle
from sidecar.poison import bisect_write, clip, is_data_error, storable_row, storable_text
from sidecar.queries import query
from sidecar.rows import LOG_COLUMNS, RETRY_COLUMNS, DeadLetter

logger = logging.getLogger(__name__)


UNRECORDABLE = "unrecordable"  # dead-letter reason of an outcome PostgreSQL refused to store
MESSAGE_ID_LIMIT = 200  # characters of a message id kept in a quarantined dead letter (it is indexed)


def describe(outcome: Outcome) -> str:
    """What the outcome was, for the error text of its quarantined dead letter."""
    if outcome.attempt is not None:
        kind, status = outcome.attempt.outcome, outcome.attempt.http_status
        return kind if status is None else f"{kind}, HTTP {status}"
    if outcome.dead_letter is not None:
        return f"dead letter {outcome.dead_letter.reason}"
    return "retry schedule change"


def quarantined(outcome: Outcome, exc: BaseException) -> Outcome | None:
    """The dead letter that replaces an outcome PostgreSQL refused: the message's bytes (bytea always
    stores), a short storable message id, no headers, the reason and the error. None when the
    outcome carries no message to keep."""
    src = outcome.source
    if src is None:
        return None
    retry_id = outcome.retry_delete
    if retry_id is None and outcome.retry_update is not None:
        retry_id = outcome.retry_update.retry_id  # else the retry comes back after its lease, forever
    now = dt.datetime.now(dt.UTC)
    error = f"the outcome ({describe(outcome)}) could not be recorded: {type(exc).__name__}: {exc}"
    return Outcome(
        dead_letter=DeadLetter(
            message_id=clip(storable_text(src.message_id), MESSAGE_ID_LIMIT) or "",
            stream_name=src.stream,
            consumer_name=src.consumer,
            stream_seq=src.seq,
            subject=clip(storable_text(src.subject), MESSAGE_ID_LIMIT) or "",
            webhook_id=src.webhook_id,
            url=clip(src.url, 2048),
            message_raw=src.raw,
            message_headers=None,
            reason=UNRECORDABLE,
            error=clip(error, 2000) or "",
            attempts=0,
            first_attempt_at=None,
            last_attempt_at=now,
        ),
        retry_delete=retry_id,
        source=src,
        committed=outcome.committed,  # the message is acknowledged once the dead letter commits
    )


# The attempt rows of a batch (bench/recorder.py times it).
# Into the storage of rule_nats_delivery_attempts, names as ids (sidecar/history_ids.py).
COPY_ATTEMPTS = f"COPY public.rule_nats_attempt_log ({', '.join(LOG_COLUMNS)}) FROM STDIN"


class Recorder:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        flush_interval: float = 0.01,
        max_batch: int = 1000,
        max_backlog: int = 20000,
        worker_name: str = "",
    ) -> None:
        self.pool = pool
        self.worker_name = worker_name  # retry-table changes apply only to rows whose lease it holds
        # True from a write that failed for the database (not the data) until the next commit: the
        # consumers take no new messages meanwhile.
        self.failing = False
        self.last_error: str | None = None  # why the last write failed while failing (readiness)
        self.lease_lost = 0  # retry reschedules refused because another worker holds the lease
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._queue: list[Outcome] = []
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()  # write now: nothing else is coming (see flush_now)
        self._room = asyncio.Condition()
        self.max_backlog = max_backlog
        self.commits = 0  # transactions committed: the supervisor sees a restarted recorder work
        self.quarantined = 0
        self.history_ids = HistoryIds()

    async def submit(self, outcome: Outcome) -> asyncio.Future[bool]:
        """Queue an outcome; waits while PostgreSQL is behind (backpressure instead of memory growth).
        The future says once what became of it: True when committed, False when the recorder gave
        up on it (the message stays unacknowledged: JetStream redelivers it)."""
        if len(self._queue) >= self.max_backlog:
            async with self._room:
                await self._room.wait_for(lambda: len(self._queue) < self.max_backlog)
        committed = outcome.committed
        if committed is None:  # (a delivery may make it first: it waits on it before this returns)
            committed = outcome.committed = asyncio.get_running_loop().create_future()
        self._queue.append(outcome)
        # The first outcome wakes the writer at once (it then waits flush_interval for more): the
        # deliveries hold their send slots until the COMMIT, so an idle poll would add to that.
        if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
            self._wake.set()
        return committed

    def flush_now(self) -> None:
        """Write what is queued without waiting for more: a consumer has every send slot taken
        and sends nothing until a COMMIT gives one back, so waiting would only stall it."""
        self._flush.set()

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
            # Let a few more outcomes arrive so one transaction carries many, unless the deliveries
            # said that none is coming (they all wait for this COMMIT).
            if len(self._queue) < self.max_batch and not stop.is_set() and not self._flush.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush.wait(), timeout=self.flush_interval)
            self._flush.clear()
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                await self._record(batch)
                backoff = 0.1
                self.failing = False
            except (psycopg.Error, DatabaseError) as exc:
                self.failing = True
                self.last_error = " ".join(str(exc).split())[:300]
                # What was not committed is back in the queue, unacknowledged: try again later.
                logger.warning(
                    "recording %d outcomes failed: %s; retrying in %.1f s",
                    len(batch),
                    exc,
                    backoff,
                    extra={"action": "record_failed"},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _record(self, batch: list[Outcome]) -> None:
        """Write the batch, isolating rows PostgreSQL refuses; acknowledge each part once committed.
        On an error that is not about the data, the parts not yet committed go back to the queue."""
        done: set[int] = set()

        async def commit(part: Sequence[Outcome]) -> None:
            await self._write(part)
            await self._committed(part, done)

        async def quarantine(outcome: Outcome, exc: Exception) -> None:
            await self._quarantine(outcome, exc, done)

        try:
            await bisect_write(batch, commit, quarantine)
        except (psycopg.Error, DatabaseError, asyncio.CancelledError):
            self._queue[:0] = [o for o in batch if id(o) not in done]
            raise
        except Exception:
            # A bug, not the database: putting the batch back could jam every later one behind it.
            # Unacknowledged, these messages come back from JetStream after the ack wait (retry-table
            # rows after their lease); the supervisor logs the failure and restarts the recorder.
            dropped = [o for o in batch if id(o) not in done]
            logger.error(
                "recording failed unexpectedly; %d outcomes dropped unacknowledged, to be redelivered",
                len(dropped),
                extra={"action": "record_dropped"},
            )
            settle(dropped, committed=False)
            raise

    async def _committed(self, part: Sequence[Outcome], done: set[int]) -> None:
        self.commits += 1
        self.failing = False
        done.update(id(o) for o in part)
        async with self._room:
            self._room.notify_all()
        settle(part, committed=True)

    async def _quarantine(self, outcome: Outcome, exc: Exception, done: set[int]) -> None:
        """One outcome PostgreSQL refuses: record a dead letter with the message's bytes instead."""
        src = outcome.source
        label = src.message_id[:100] if src is not None else "?"
        replacement = quarantined(outcome, exc)
        if replacement is not None:
            logger.error(
                "outcome of message %r cannot be recorded (%s: %s); dead-lettered as %s",
                label,
                type(exc).__name__,
                exc,
                UNRECORDABLE,
                extra={"action": "record_quarantined"},
            )
            try:
                await self._write([replacement])
            except Exception as again:
                if not is_data_error(again):
                    raise  # the database, not the row: the original outcome goes back to the queue
                exc = again
            else:
                self.quarantined += 1
                done.add(id(outcome))
                await self._committed([replacement], set())
                return
        # Not even the dead letter stores: leave the message unacknowledged, JetStream redelivers it
        # (up to max_deliver) and a retry-table row comes back after its lease. Loud, never silent.
        done.add(id(outcome))
        logger.error(
            "outcome of message %r cannot be recorded at all (%s: %s); left unacknowledged",
            label,
            type(exc).__name__,
            exc,
            extra={"action": "record_lost"},
        )
        settle([outcome], committed=False)

    async def _write(self, batch: Sequence[Outcome]) -> None:
        attempts, counted = await self.history_ids.rows(
            self.pool, [o.attempt for o in batch if o.attempt is not None]
        )
        dead = [o.dead_letter.params() for o in batch if o.dead_letter is not None]
        inserts = [o.retry_insert for o in batch if o.retry_insert is not None]
        updates = [o.retry_update for o in batch if o.retry_update is not None]
        deletes = [o.retry_delete for o in batch if o.retry_delete is not None]
        releases = sorted({w for o in batch for w in o.release_webhooks})
        if attempts and not (counted or dead or inserts or updates or deletes or releases):
            await self._copy_alone(attempts)
            return
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor()
            if attempts:
                await self._copy_attempts(cur, attempts)
            if counted:  # recording = 'failures': delivered attempts counted, not kept as rows
                await cur.execute(query("count_successes"), counted)
            if inserts:
                # One row per message (a unique key): a message that comes back, e.g. deferred again
                # after its acknowledgement was lost, keeps the row it has.
                rows = [storable_row(r) for r in inserts]
                await cur.execute(
                    query("retries_insert"), {c: [r[i] for r in rows] for i, c in enumerate(RETRY_COLUMNS)}
                )
            if updates:
                await cur.execute(
                    query("retries_update"),
                    {
                        "ids": [u.retry_id for u in updates],
                        "attempts": [u.attempts for u in updates],
                        "next": [u.next_attempt_at for u in updates],
                        "errors": [
                            None if u.last_error is None else storable_text(u.last_error) for u in updates
                        ],
                        "worker": self.worker_name,
                    },
                )
                if cur.rowcount < len(updates):
                    self.lease_lost += len(updates) - cur.rowcount
                    logger.warning(
                        "%d retries were not rescheduled: their lease is held by another worker",
                        len(updates) - cur.rowcount,
                        extra={"action": "retry_lease_lost"},
                    )
            if deletes:
                await cur.execute(query("retries_delete"), {"ids": deletes})
            if releases:
                await cur.execute(query("retries_release"), {"ids": releases})
            if dead:
                await cur.executemany(query("dead_letter_insert"), dead)

    async def _copy_alone(self, attempts: list[tuple[Any, ...]]) -> None:
        # Only attempt rows (every delivery that succeeded): one COPY is one transaction on its
        # own, so it runs in autocommit and BEGIN and COMMIT are two round trips saved, a fifth
        # to a third of the batch's client CPU (bench/recorder.py).
        async with self.pool.connection() as conn:
            try:
                # Inside the try: psycopg may let the loop run once the mode is set, and a
                # cancellation there left the connection in autocommit for its next user.
                await conn.set_autocommit(True)
                await self._copy_attempts(conn.cursor(), attempts)
            finally:
                try:
                    await conn.set_autocommit(False)
                except psycopg.Error:
                    # Broken: closed, so the pool drops it instead of lending it out in autocommit.
                    # Not raised: that would hide the COPY's own error (a data error is isolated).
                    await conn.close()

    @staticmethod
    async def _copy_attempts(cur: psycopg.AsyncCursor[Any], attempts: list[tuple[Any, ...]]) -> None:
        async with cur.copy(COPY_ATTEMPTS) as copy:
            for row in attempts:
                await copy.write_row(row)
