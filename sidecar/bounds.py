"""The ranges of every time, rate and count the sidecar reads from the registry (pure).

They are the ranges of migration 0015's CHECKs: a row written since then is inside them already.
The sidecar clamps what it reads anyway, so that a row from before (or a constraint someone
dropped) cannot turn into an overflow inside delivery: retry_initial_seconds = 1e300 raised
OverflowError there and the message was POSTed 11 times without an attempt row.
"""

from __future__ import annotations

import math

# (low, high) per setting, as in sql/0015_bulkheads.sql.
ACK_WAIT = (1.0, 43200.0)
RETRY_ATTEMPTS = (1, 1000)
RETRY_INITIAL = (0.1, 86400.0)
RETRY_BACKOFF = (0.1, 604800.0)
RETRY_AGE = (1.0, 2592000.0)
TIMEOUT = (0.1, 300.0)
CONCURRENCY = (1, 10000)
RATE = (0.001, 100000.0)
FAILURE_THRESHOLD = (1, 10000)
OPEN_SECONDS = (0.1, 3600.0)
DISABLE_AFTER = (60.0, 31536000.0)
# Any delay the sidecar computes (a retry, a deferral) is at most this: 30 days, the longest a retry
# may wait (retry_max_age_seconds), well inside what a timestamp can hold.
MAX_DELAY = 2592000.0


def clamp(value: float, bounds: tuple[float, float]) -> float:
    """``value`` within ``bounds``; NaN becomes the low bound (a NaN compares false with everything)."""
    lo, hi = bounds
    if math.isnan(value):
        return lo
    return min(max(value, lo), hi)


def clamp_int(value: int, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    return min(max(int(value), lo), hi)


def clamp_opt(value: float | None, bounds: tuple[float, float]) -> float | None:
    return None if value is None else clamp(value, bounds)


def delay(seconds: float) -> float:
    """A computed wait: 0 to MAX_DELAY (NaN and negatives are 0, infinity is MAX_DELAY)."""
    if math.isnan(seconds) or seconds <= 0.0:
        return 0.0
    return min(seconds, MAX_DELAY)
