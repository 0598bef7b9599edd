"""What one message's outcome writes, as the recorder receives it (no I/O here).

Per-message types in the sidecar are ``@dataclass(slots=True)`` and not frozen: they are built for
every message, and a frozen dataclass's ``__init__`` costs four times as much (measured when the
message path was tuned; it showed in the CPU per message).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.rows import AttemptRow, DeadLetter, RetryRow, RetryUpdate, Source

# The timestamps an outcome may carry: a computed time outside them (an overflowing delay) is
# clamped, not an OverflowError between a POST and its attempt row.
_MIN_TS = 0.0
_MAX_TS = 32503680000.0  # 3000-01-01


def utc(ts: float) -> dt.datetime:
    if not _MIN_TS <= ts <= _MAX_TS:  # also NaN
        ts = _MAX_TS if ts > _MAX_TS else _MIN_TS
    return dt.datetime.fromtimestamp(ts, dt.UTC)


@dataclass(slots=True)
class Outcome:
    """What to write for one message, in one transaction with others."""

    attempt: AttemptRow | None = None
    dead_letter: DeadLetter | None = None
    retry_insert: RetryRow | None = None
    retry_update: RetryUpdate | None = None
    retry_delete: int | None = None
    # Endpoints seen enabled again: their held deliveries become due. Written after the batch's
    # retry inserts and updates, so a delivery held on the stale registry just before is released too.
    release_webhooks: tuple[int, ...] = ()
    source: Source | None = None  # the message, kept in a dead letter should the rows be refused
    # Set by Recorder.submit: True once committed, False when the recorder gave up on it.
    committed: asyncio.Future[bool] | None = None


def settle(outcomes: Sequence[Outcome], committed: bool) -> None:
    """Tell each outcome's delivery what became of it (once; a delivery cancelled meanwhile, at
    shutdown, cancelled its future and is told nothing)."""
    for outcome in outcomes:
        fut = outcome.committed
        if fut is not None and not fut.done():
            fut.set_result(committed)
