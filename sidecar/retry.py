"""Retry decisions (pure logic): backoff with jitter, Retry-After, when to give up."""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass

from sidecar import bounds
from sidecar.registry import RetryPolicy

# Retry-After beyond this is treated as this: a misconfigured endpoint must not park
# messages for weeks.
MAX_RETRY_AFTER_SECONDS = 86400.0


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    delay: float = 0.0
    reason: str | None = None  # why it gives up


def backoff(attempts_done: int, policy: RetryPolicy, rand: random.Random | None = None) -> float:
    """Delay before the next attempt: initial * 2^(n-1), capped, with jitter in [50%, 100%]."""
    r = rand or random
    # 2.0 ** 60 times any initial delay is past every cap; an int power of 1000 attempts would not
    # even convert to a float (OverflowError), and a float one is inf.
    doubling = 2.0 ** min(max(0, attempts_done - 1), 60)
    base = min(policy.max_backoff_seconds, policy.initial_seconds * doubling)
    return bounds.delay(float(base * (0.5 + 0.5 * r.random())))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - now, MAX_RETRY_AFTER_SECONDS))


def decide(
    attempts_done: int,
    first_attempt_at: float,
    now: float,
    policy: RetryPolicy,
    retry_after: float | None = None,
    rand: random.Random | None = None,
) -> Decision:
    """After a retryable failure: schedule another attempt, or give up (retries_exhausted)."""
    if attempts_done >= policy.max_attempts:
        return Decision(False, reason=f"retries_exhausted: {attempts_done} attempts")
    delay = backoff(attempts_done, policy, rand)
    if retry_after is not None:
        delay = max(delay, retry_after)
    delay = bounds.delay(delay)
    if now + delay - first_attempt_at > policy.max_age_seconds:
        return Decision(False, reason=f"retries_exhausted: older than {policy.max_age_seconds:g} s")
    return Decision(True, delay=delay)
