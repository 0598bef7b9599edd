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
RETRY_COLUMNS = RetryRow._fields


@dataclass(slots=True)  # not frozen: built for every message, and a frozen __init__ costs 4x
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
