"""The rows a message's outcome writes, as named types.

Attempt and retry rows are NamedTuples: named fields where they are built and read, and still plain
tuples for COPY and the array parameters of the recorder's statements (no conversion per message).
Their field order is the column order of the statement that writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from psycopg.types.json import Jsonb

from sidecar.poison import storable, storable_text


class AttemptRow(NamedTuple):
    """One row of rule_nats_delivery_attempts (written by COPY in this column order)."""

    attempted_at: dt.datetime
    message_id: str
    stream_name: str
    consumer_name: str
    stream_seq: int | None
    subject: str
    webhook_id: int | None
    url: str | None
    attempt: int
    outcome: str  # delivered | retry | dead_letter
    http_status: int | None
    latency_ms: float | None
    error: str | None
    response_body: str | None
    next_attempt_at: dt.datetime | None
    worker_name: str
    notes: str | None


class LogRow(NamedTuple):
    """One row of rule_nats_attempt_log, the storage of rule_nats_delivery_attempts (sql/0019): the
    strings of an AttemptRow that repeat from row to row as one id, the latency in integer
    microseconds. Written by COPY in this column order."""

    attempted_at: dt.datetime
    message_id: str
    route_id: int  # rule_nats_history_routes: stream, consumer, worker and URL
    stream_seq: int | None
    subject: str
    webhook_id: int | None
    attempt: int  # at most ATTEMPT_MAX
    outcome: str  # OUTCOME_CODES
    http_status: int | None
    latency_us: int | None
    error: str | None
    response_body: str | None
    next_attempt_at: dt.datetime | None
    notes: str | None


LATENCY_US_MAX = 2**31 - 1  # an integer column: a longer attempt is recorded as about 35 minutes
ATTEMPT_MAX = 2**15 - 1  # a smallint column
# One byte ("char") per row instead of the name; rule_nats_delivery_attempts spells them out. An
# unknown outcome keeps its name, and the table's CHECK refuses it as it did before.
OUTCOME_CODES = {"delivered": "d", "retry": "r", "dead_letter": "x"}


def route_key(row: AttemptRow) -> tuple[str, str, str, str | None]:
    """What a route of rule_nats_history_routes stands for."""
    return (row.stream_name, row.consumer_name, row.worker_name, row.url)


def log_row(row: AttemptRow, route_id: int) -> tuple[Any, ...]:
    """The stored form of an attempt row (LogRow's fields, as a plain tuple: built for every
    message, and a NamedTuple's constructor costs 3x), given the id of its route."""
    (at, message_id, _, _, seq, subject, webhook_id, _, attempt, outcome, status, latency, error, body,
     next_at, _, notes) = row  # fmt: skip
    return (
        at, message_id, route_id, seq, subject, webhook_id,
        attempt if attempt <= ATTEMPT_MAX else ATTEMPT_MAX, OUTCOME_CODES.get(outcome, outcome), status,
        None if latency is None else min(round(latency * 1000.0), LATENCY_US_MAX),
        error, body, next_at, notes,
    )  # fmt: skip


class RetryRow(NamedTuple):
    """A new row of rule_nats_retries: the message's bytes and when to try it next."""

    message_id: str
    stream_name: str
    consumer_name: str
    stream_seq: int | None
    subject: str
    message_raw: bytes
    message_headers: str | None  # JSON text, made storable
    attempts: int
    first_attempt_at: dt.datetime
    last_error: str | None
    next_attempt_at: dt.datetime
    webhook_id: int | None


class RetryUpdate(NamedTuple):
    """A new schedule for a retry-table row this worker holds the lease of."""

    retry_id: int
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None


ATTEMPT_COLUMNS = AttemptRow._fields
LOG_COLUMNS = LogRow._fields
RETRY_COLUMNS = RetryRow._fields


@dataclass(slots=True)  # not frozen: see outcome.py
class Source:
    """The message an outcome is about: what a quarantined dead letter keeps when the outcome's own
    rows cannot be written."""

    message_id: str
    stream: str
    consumer: str
    seq: int | None
    subject: str
    raw: bytes
    headers: Mapping[str, str] | None
    webhook_id: int | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row of rule_nats_dead_letters."""

    message_id: str
    stream_name: str
    consumer_name: str
    stream_seq: int | None
    subject: str
    webhook_id: int | None
    url: str | None
    message_raw: bytes
    message_headers: Mapping[str, str] | None
    reason: str
    error: str
    attempts: int
    first_attempt_at: dt.datetime | None
    last_attempt_at: dt.datetime | None

    def params(self) -> dict[str, Any]:
        """Query parameters, text made storable; a new dict each time, the row itself never changes."""
        return {
            "message_id": storable_text(self.message_id),
            "stream_name": self.stream_name,
            "consumer_name": self.consumer_name,
            "stream_seq": self.stream_seq,
            "subject": storable_text(self.subject),
            "webhook_id": self.webhook_id,
            "url": None if self.url is None else storable_text(self.url),
            "message_raw": self.message_raw,
            "message_headers": None
            if self.message_headers is None
            else Jsonb(storable(self.message_headers)),
            "reason": self.reason,
            "error": storable_text(self.error),
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
            "last_attempt_at": self.last_attempt_at,
        }
