"""The outbox relay: publishes committed rule_nats_outbox rows to JetStream.

One relay pass, in one PostgreSQL transaction: claim a batch of pending rows with
``FOR UPDATE SKIP LOCKED`` (other sidecars skip them), publish them concurrently
with ``Nats-Msg-Id = message_id``, then mark them and write their history rows,
and commit. A relay killed after publishing and before the commit leaves the rows
pending; the next pass publishes them again and JetStream drops the copies as
duplicates, so the stream holds each event once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar import duplicates
from sidecar.config import NatsConnection
from sidecar.errors import InvalidInput
from sidecar.jetstream import Ack, NatsPool, NatsUnavailable, publish_batch
from sidecar.queries import query
from sidecar.validation import (
    check_header_value,
    check_message_id,
    check_nats_header_name,
    check_subject,
    redact_urls_in,
)

logger = logging.getLogger(__name__)

# Passing failures (NATS down, timeouts) are retried until they succeed; an unexpected
# JetStream API error is given this many attempts before the row is marked failed.
MAX_API_ERROR_ATTEMPTS = 10
# Any login may NOTIFY rule_nats_outbox (PostgreSQL has no channel permissions): after a pass that
# found nothing, a wake-up starts the next one at the earliest this long after it ended, so a flood
# costs at most ten claims a second per relay task (it cost 800). A pass that found rows is
# followed at once when woken: real events are not held back, and what they cost is theirs.
WAKE_MIN_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class OutboxRow:
    outbox_id: int
    config_name: str
    subject: str
    payload: bytes
    headers: dict[str, str]
    message_id: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Outcome:
    outbox_id: int
    status: str  # published | pending | failed
    stream: str | None = None
    seq: int | None = None
    duplicate: bool | None = None
    error: str | None = None
    latency_ms: float = 0.0
    delay: float = 0.0
    # False for rows refused before publishing: nothing was sent, the failed outbox row is the
    # record, and its malformed subject or headers are not copied into rule_nats_publish_history.
    history: bool = True


def row_from_record(rec: Mapping[str, Any]) -> OutboxRow:
    headers = {str(k): str(v) for k, v in (rec["headers"] or {}).items()}
    return OutboxRow(
        outbox_id=int(rec["outbox_id"]),
        config_name=str(rec["config_name"]),
        subject=str(rec["subject"]),
        payload=bytes(rec["payload"]),
        headers=headers,
        message_id=str(rec["message_id"]),
        attempts=int(rec["attempts"]),
    )


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the given number of failed attempts: 1, 2, 4, ... up to 60."""
    return float(min(60, 2 ** max(0, attempts)))


def refusal(row: OutboxRow) -> Outcome | None:
    """A failed outcome for a row that must never reach NATS (pure), None for a row to publish.

    SQL refuses these rows at INSERT; the relay checks again because a row may predate the CHECK
    or come from a superuser, and a reserved subject ($JS.API.STREAM.DELETE.x) or a CR/LF in a
    header is an instruction to the server, not an event. Refused for good: retrying cannot help.
    """
    try:
        check_subject(row.subject)
        for name, value in row.headers.items():
            check_nats_header_name(name)  # no Nats-* header but Nats-Msg-Id (issue 19)
            check_header_value(value)
        check_message_id(row.message_id)
    except InvalidInput as exc:
        return Outcome(row.outbox_id, "failed", error=f"refused before publishing: {exc}", history=False)
    return None


def classify(row: OutboxRow, exc: BaseException, latency_ms: float, registered: bool = False) -> Outcome:
    """Decide what a publish error means for the row (pure). ``registered``: an enabled stream of
    the registry captures the row's subject, so the sidecar creates it (a NATS server that lost its
    memory streams in a restart, say): no stream in JetStream yet is then worth waiting for."""
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        if registered:
            return Outcome(
                row.outbox_id,
                "pending",
                error=f"no JetStream stream captures subject {row.subject!r} yet; a registered stream does "
                "(see nats_stream_status)",
                latency_ms=latency_ms,
                delay=retry_delay(row.attempts),
            )
        return Outcome(
            row.outbox_id,
            "failed",
            error=f"no JetStream stream captures subject {row.subject!r}",
            latency_ms=latency_ms,
        )
    if isinstance(exc, nats.errors.MaxPayloadError):
        return Outcome(
            row.outbox_id,
            "failed",
            error=f"payload too large for the NATS server: {exc}",
            latency_ms=latency_ms,
        )
    if isinstance(exc, nats.errors.BadSubjectError):
        return Outcome(
            row.outbox_id, "failed", error=f"invalid subject {row.subject!r}", latency_ms=latency_ms
        )
    if isinstance(exc, nats.js.errors.APIError):
        description = str(exc.description or exc)
        too_big = "maximum" in description and ("payload" in description or "size" in description)
        if too_big or row.attempts + 1 >= MAX_API_ERROR_ATTEMPTS:
            return Outcome(
                row.outbox_id,
                "failed",
                error=f"JetStream refused the message: {description}",
                latency_ms=latency_ms,
            )
        return Outcome(
            row.outbox_id,
            "pending",
            error=f"JetStream refused the message: {description}",
            latency_ms=latency_ms,
            delay=retry_delay(row.attempts),
        )
    # Timeouts, lost connections: the row stays pending and is tried again after a backoff.
    return Outcome(
        row.outbox_id,
        "pending",
        error=redact_urls_in(f"{type(exc).__name__}: {exc}".strip()),
        latency_ms=latency_ms,
        delay=retry_delay(row.attempts),
    )


class OutboxRelay:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        nats_pool: NatsPool,
        connections: Callable[[], Mapping[str, NatsConnection]],
        batch_size: int = 500,
        poll_interval: float = 1.0,
        registered: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.pool = pool
        # (config name, subject) -> does an enabled stream of the registry capture it? (classify)
        self.registered = registered or (lambda _config, _subject: False)
        self.nats_pool = nats_pool
        self.connections = connections
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.published = 0
        self.failed = 0
        self.resume = asyncio.Event()  # set when a NATS connection comes (back) up: stop pausing
        # Test-only fault injection: die between publishing and marking (proves no duplicates).
        self._kill_after_publish = os.environ.get("WEBHOOK_WORKER_FAULT") == "outbox_kill_after_publish"

    async def run(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            # Clear before the pass, not after: a NOTIFY during the pass then starts the next one.
            wake.clear()
            self.resume.clear()
            try:
                n = await self.relay_once()
                backoff = 0.5
            except (psycopg.OperationalError, NatsUnavailable) as exc:
                logger.warning("outbox relay paused: %s", exc, extra={"action": "outbox_paused"})
                n = 0
                await _wait_any(stop, self.resume, backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if n >= self.batch_size:
                continue  # more is waiting: no sleep
            ended = asyncio.get_running_loop().time()
            await _wait_any(stop, wake, self.poll_interval)
            rest = ended + WAKE_MIN_INTERVAL - asyncio.get_running_loop().time()
            if n == 0 and rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=rest)

    async def relay_once(self) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await conn.execute(query("outbox_claim_plan"))
            await cur.execute(query("outbox_claim"), {"limit": self.batch_size})
            rows = [row_from_record(r) for r in await cur.fetchall()]
            if not rows:
                return 0
            outcomes = await self._publish_all(rows)
            if self._kill_after_publish:
                os.kill(os.getpid(), signal.SIGKILL)
            params = {
                "ids": [o.outbox_id for o in outcomes],
                "statuses": [o.status for o in outcomes],
                "streams": [o.stream for o in outcomes],
                "seqs": [o.seq for o in outcomes],
                "duplicates": [o.duplicate for o in outcomes],
                "errors": [o.error for o in outcomes],
                "delays": [o.delay for o in outcomes],
                "latencies": [o.latency_ms for o in outcomes],
                "history": [o.history for o in outcomes],
            }
            await conn.execute(query("outbox_done"), params)
        ok = sum(1 for o in outcomes if o.status == "published")
        failed = sum(1 for o in outcomes if o.status == "failed")
        self.published += ok
        self.failed += failed
        if failed:
            logger.warning(
                "outbox: %d of %d events cannot be published (see rule_nats_outbox.error_message)",
                failed,
                len(rows),
                extra={"action": "outbox_failed"},
            )
        logger.debug("outbox: relayed %d events", ok, extra={"action": "outbox_relayed"})
        return len(rows)

    async def _publish_all(self, rows: list[OutboxRow]) -> list[Outcome]:
        by_config: dict[str, list[OutboxRow]] = {}
        outcomes: list[Outcome] = []
        for row in rows:
            refused = refusal(row)
            if refused is not None:
                outcomes.append(refused)
                continue
            by_config.setdefault(row.config_name, []).append(row)
        if len(outcomes) > 0:
            logger.warning(
                "outbox: %d rows refused before publishing (invalid or reserved subject, header or "
                "message id; see rule_nats_outbox.error_message)",
                len(outcomes),
                extra={"action": "outbox_refused"},
            )
        known = self.connections()
        for config_name, group in by_config.items():
            conn = known.get(config_name)
            if conn is None:
                outcomes += [
                    Outcome(r.outbox_id, "failed", error=f"no NATS configuration named {config_name!r}")
                    for r in group
                ]
                continue
            # NatsUnavailable (no connection, or reconnecting: the acks would only time out):
            # nothing claimed is lost, the transaction rolls back and the rows wait, untouched.
            await self.nats_pool.get(conn)
            client = self.nats_pool.connected(conn)
            items = [(r.subject, r.payload, nats_headers(r)) for r in group]
            results = await publish_batch(client, items, conn.request_timeout)
            # Each row its own publish-to-ack time (nats_performance_stats reads it per message).
            for row, (res, latency) in zip(group, results, strict=True):
                if isinstance(res, Ack) and res.duplicate:
                    outcomes.append(await self._verify_duplicate(client, conn, row, res, latency))
                elif isinstance(res, Ack):
                    outcomes.append(
                        Outcome(
                            row.outbox_id,
                            "published",
                            stream=res.stream,
                            seq=res.seq,
                            duplicate=res.duplicate,
                            latency_ms=latency,
                        )
                    )
                else:
                    outcomes.append(classify(row, res, latency, self.registered(config_name, row.subject)))
        return outcomes

    async def _verify_duplicate(
        self, client: Any, conn: NatsConnection, row: OutboxRow, ack: Ack, latency: float
    ) -> Outcome:
        """published when the message JetStream kept under the row's id is this one; failed, with
        the reason, when it is another publisher's or gone; pending when it cannot be read now."""
        try:
            stored = await duplicates.fetch(client, ack.stream, ack.seq, conn.request_timeout)
        except Exception as exc:  # timeouts, a lost connection: try the row again
            return classify(row, exc, latency)
        why = duplicates.mismatch(row.subject, row.message_id, row.payload, ack.stream, ack.seq, stored)
        if why is None:
            return Outcome(
                row.outbox_id, "published", stream=ack.stream, seq=ack.seq, duplicate=True, latency_ms=latency
            )
        logger.warning(
            "outbox: event %d not published: %s", row.outbox_id, why, extra={"action": "outbox_duplicate_id"}
        )
        return Outcome(
            row.outbox_id,
            "failed",
            stream=ack.stream,
            seq=ack.seq,
            duplicate=True,
            error=why,
            latency_ms=latency,
        )


def nats_headers(row: OutboxRow) -> dict[str, str]:
    """The row's headers with its own Nats-Msg-Id: a header of another case (nats-msg-id) would
    be a second id on the wire."""
    headers = {k: v for k, v in row.headers.items() if k.lower() != "nats-msg-id"}
    headers["Nats-Msg-Id"] = row.message_id
    return headers


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
