"""Per-endpoint policy: concurrency and rate limits, endpoint-wide backoff, circuit breaker.

The decisions are pure (``admit`` and ``record`` take the time as an argument) so they are
unit-tested with a fake clock; the only asynchronous part is waiting for a concurrency slot.
One gate per endpoint per sidecar process, shared by all consumers: a limit is a limit on
the endpoint, whichever stream its messages come from. With several sidecars each takes an
equal share of the endpoint's limits (share_of), counted from the heartbeats in PostgreSQL.

A message that may not go now is *deferred*: it waits in rule_nats_retries without using up
an attempt, and the consumer's send slot is free for other endpoints once that is committed. Only
a small number (a quarter of the consumer's slots) may wait inside the process, each holding a
send slot.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, replace

MAX_LOCAL_WAIT = 1.0  # a rate-limited message sleeps in the process at most this long
DEGRADED_AFTER = 3  # failures in a row after which an endpoint gets only a quarter of the slots
DEFER_SECONDS = 2.0
HELD_SECONDS = 300.0  # disabled endpoints: re-enabling releases held messages at once anyway
MAX_OPEN_FACTOR = 16
MAX_BACKOFF_SECONDS = 3600.0
PROBE_TIMEOUT_EXTRA = 60.0
GATE_IDLE_SECONDS = 600.0  # a gate unused this long, holding no state worth keeping, is dropped
PRUNE_EVERY_SECONDS = 60.0
MAX_FAILED_IDS = 10000  # the ids of one run of failures kept (circuit_failure_threshold is at most this)


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    max_concurrency: int | None = None
    rate_per_second: float | None = None
    failure_threshold: int = 5
    open_seconds: float = 30.0
    disable_after_seconds: float | None = None  # None: never disabled for failing


def share_of(limits: EndpointLimits, workers: int) -> EndpointLimits:
    """This sidecar's part of an endpoint's limits when ``workers`` live sidecars run its consumers:
    the rate split evenly, the concurrency split and rounded up (at least 1)."""
    if workers <= 1 or (limits.rate_per_second is None and limits.max_concurrency is None):
        return limits
    return replace(
        limits,
        rate_per_second=None if limits.rate_per_second is None else limits.rate_per_second / workers,
        max_concurrency=None
        if limits.max_concurrency is None
        else math.ceil(limits.max_concurrency / workers),
    )


@dataclass(slots=True)  # not frozen: see outcome.py
class Admission:
    go: bool
    wait: float = 0.0  # go: sleep this long first (rate limit)
    until: float = 0.0  # not go: defer the message until then (unix seconds)
    why: str = ""
    probe: bool = False


class EndpointGate:
    def __init__(self, limits: EndpointLimits, rand: random.Random | None = None) -> None:
        self.limits = limits
        self.rand = rand or random.Random()  # noqa: S311 - jitter
        self.reset()
        self.active = 0
        self.waiting = 0
        self.workers = 1  # sidecars sharing the endpoint's limits
        self.used_at = 0.0  # monotonic time of the last EndpointGates.get
        self._slot_free: asyncio.Condition | None = None

    def reset(self) -> None:
        self.circuit = "closed"
        self.failures = 0
        self.failing_since: float | None = None
        self.open_until: float | None = None
        self.open_count = 0
        self.backoff_until: float | None = None
        self.backoff_rounds = 0  # 429/503 rounds in a row: each doubles the pause
        self.probe_started: float | None = None
        self.tat = 0.0  # theoretical arrival time of the next request (GCRA)
        self.disabled: str | None = None
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_success_at: float | None = None
        self.last_failure_at: float | None = None
        # The messages behind the current run of failures: one that fails again is not another
        # failure of the endpoint (one event it always refuses opened the circuit for everyone).
        self.failed_ids: set[str] = set()
        self.dirty = False

    def idle(self, wall: float) -> bool:
        """Nothing would be lost by forgetting this gate: no request in flight or waiting, circuit
        closed, no backoff running, not disabled, nothing left to write to PostgreSQL."""
        return (
            self.active == 0
            and self.waiting == 0
            and self.circuit == "closed"
            and self.disabled is None
            and (self.backoff_until is None or self.backoff_until <= wall)
            and self.tat <= wall
            and not self.dirty
        )

    def _jitter(self, spread: float = 1.0) -> float:
        return spread * self.rand.random()

    # -- before a request --------------------------------------------------------

    def admit(self, now: float, slots: int) -> Admission:
        """May a message for this endpoint be sent now? ``slots`` is the consumer's batch_size."""
        if self.disabled is not None:
            return Admission(False, until=now + HELD_SECONDS, why=f"endpoint disabled: {self.disabled}")
        if self.backoff_until is not None and now < self.backoff_until:
            return Admission(
                False, until=self.backoff_until + self._jitter(), why="endpoint backing off (429/503)"
            )
        probe = False
        if self.circuit == "open":
            assert self.open_until is not None
            if now < self.open_until:
                return Admission(False, until=self.open_until + self._jitter(2.0), why="circuit open")
            self.circuit = "half_open"
            self.probe_started = None
            self.dirty = True
        if self.circuit == "half_open":
            stale = self.limits.open_seconds + PROBE_TIMEOUT_EXTRA
            if self.probe_started is not None and now - self.probe_started < stale:
                return Admission(
                    False,
                    until=now + min(self.limits.open_seconds, 5.0) + self._jitter(),
                    why="circuit half-open",
                )
            self.probe_started = now
            probe = True
        cap = max(1, slots // 4)
        if not probe and self.failures >= DEGRADED_AFTER and self.active + self.waiting >= cap:
            return Admission(
                False, until=now + DEFER_SECONDS + self._jitter(DEFER_SECONDS), why="endpoint failing"
            )
        limit = self.limits.max_concurrency
        if limit is not None and self.active + self.waiting >= limit + cap:
            return Admission(
                False, until=now + DEFER_SECONDS + self._jitter(DEFER_SECONDS), why="concurrency limit"
            )
        wait = 0.0
        rate = self.limits.rate_per_second
        if rate is not None:
            start = max(now, self.tat)
            wait = start - now
            if wait > MAX_LOCAL_WAIT or (wait > 0 and self.waiting >= cap):
                # Back when the endpoint as a whole has room: with other sidecars sharing it, one of
                # them may take the message sooner than this one's share allows.
                until = now + wait / max(1, self.workers)
                return Admission(False, until=until + self._jitter(), why="rate limit")
            self.tat = start + 1.0 / rate
        self.waiting += 1
        return Admission(True, wait=wait, probe=probe)

    async def acquire(self) -> None:
        """After a go: wait for a concurrency slot (max_concurrency), then count as active."""
        limit = self.limits.max_concurrency
        if limit is not None and self.active >= limit:
            if self._slot_free is None:
                self._slot_free = asyncio.Condition()
            async with self._slot_free:
                await self._slot_free.wait_for(
                    lambda: self.limits.max_concurrency is None or self.active < self.limits.max_concurrency
                )
        self.waiting -= 1
        self.active += 1

    def recheck(self, now: float, probe: bool) -> Admission | None:
        """After waiting for a slot or a token: did the endpoint close meanwhile (429/503, circuit, 410)?"""
        if self.disabled is not None:
            return Admission(False, until=now + HELD_SECONDS, why=f"endpoint disabled: {self.disabled}")
        if self.backoff_until is not None and now < self.backoff_until:
            return Admission(
                False, until=self.backoff_until + self._jitter(), why="endpoint backing off (429/503)"
            )
        if not probe and self.circuit == "open" and self.open_until is not None and now < self.open_until:
            return Admission(False, until=self.open_until + self._jitter(2.0), why="circuit open")
        return None

    def cancel(self) -> None:
        """A go that is not sent after all (cancelled while waiting)."""
        self.waiting -= 1

    async def release(self) -> None:
        self.active -= 1
        if self._slot_free is not None:
            async with self._slot_free:
                self._slot_free.notify(1)

    # -- after a request ----------------------------------------------------------

    def record(
        self,
        now: float,
        kind: str,
        status: int | None,
        error: str | None,
        retry_after: float | None = None,
        message_id: str | None = None,
    ) -> list[str]:
        """Account for one attempt's result; returns the state changes it caused.

        kind: ``ok`` (2xx), ``neutral`` (the endpoint answered, e.g. 4xx: a message problem, not an
        outage), ``fail`` (timeout, connection error, 5xx, 429) or ``gone`` (410). A failure of a
        message that failed already since the endpoint's last success (``message_id``) counts against
        the endpoint only as a probe: the same event failing again says nothing about the others.
        """
        events: list[str] = []
        self.dirty = True
        self.last_status = status
        was_probe = self.circuit == "half_open"
        if kind in ("ok", "neutral"):
            self._answered(now, kind == "ok", events)
            return events
        self.last_failure_at = now
        self.last_error = error
        if kind == "gone":
            self.disabled = "HTTP 410 Gone"
            events.append("disable")
            return events
        repeat = message_id is not None and message_id in self.failed_ids
        if repeat and not was_probe and (status not in (429, 503) or retry_after is None):
            # A repeat: neither a failure more in a row, nor failing time, nor a backoff round (a
            # 429/503 that asks for a pause with Retry-After is the endpoint's word, and obeyed).
            return events
        if message_id is not None and len(self.failed_ids) < MAX_FAILED_IDS:
            self.failed_ids.add(message_id)
        if not repeat:
            self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if status in (429, 503):
            self._back_off(now, retry_after, events)
        if was_probe or (self.circuit == "closed" and self.failures >= self.limits.failure_threshold):
            self.open_count = min(self.open_count + 1, 1 + MAX_OPEN_FACTOR.bit_length())
            factor = min(MAX_OPEN_FACTOR, 2 ** (self.open_count - 1))
            self.circuit = "open"
            self.open_until = now + self.limits.open_seconds * factor
            self.probe_started = None
            events.append("opened")
        after = self.limits.disable_after_seconds
        if after is not None and now - self.failing_since >= after:
            self.disabled = f"failing without a success for {now - self.failing_since:.0f} s"
            events.append("disable")
        return events

    def _answered(self, now: float, success: bool, events: list[str]) -> None:
        """The endpoint answered (2xx, or a 4xx that is the message's problem): all is forgiven."""
        if success:
            self.last_success_at = now
        self.failures = 0
        self.failing_since = None
        self.failed_ids.clear()
        self.backoff_until = None
        self.backoff_rounds = 0
        self.open_count = 0
        if self.circuit != "closed":
            self.circuit = "closed"
            self.open_until = None
            events.append("closed")
        self.probe_started = None

    def _back_off(self, now: float, retry_after: float | None, events: list[str]) -> None:
        """A 429 or 503: pause as Retry-After asks, or for a doubling pause per round."""
        if retry_after is not None:
            self.backoff_until = now + max(1.0, min(retry_after, MAX_BACKOFF_SECONDS))
            events.append("backoff")
        elif self.backoff_until is None or now >= self.backoff_until:
            # A new round: the requests in flight when the endpoint began refusing fail within a
            # moment of each other and are one round, not one each (twenty of them made 64 s).
            self.backoff_rounds += 1
            pause = float(2 ** min(self.backoff_rounds - 1, 6))
            self.backoff_until = now + max(1.0, min(pause, MAX_BACKOFF_SECONDS))
            events.append("backoff")


class EndpointGates:
    """The gates of one sidecar process, by endpoint key (webhook_id, or host:port for bare URLs).

    Bare URLs come from messages, so the number of hosts is unbounded: gates that stay idle for
    GATE_IDLE_SECONDS are dropped (checked at most every PRUNE_EVERY_SECONDS, on ``get``).
    """

    def __init__(self) -> None:
        self.gates: dict[int | str, EndpointGate] = {}
        self.workers = 1  # live sidecars sharing this one's consumers (set at each heartbeat)
        self._pruned_at = time.monotonic()

    def get(self, key: int | str, limits: EndpointLimits, now: float | None = None) -> EndpointGate:
        now = time.monotonic() if now is None else now
        if now - self._pruned_at >= PRUNE_EVERY_SECONDS:
            self.prune(now, time.time())
        limits = share_of(limits, self.workers)
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = EndpointGate(limits)
        elif gate.limits != limits:
            gate.limits = limits
        gate.workers = self.workers
        gate.used_at = now
        return gate

    def prune(self, now: float, wall: float) -> int:
        """Drop gates unused since ``now - GATE_IDLE_SECONDS`` (monotonic) that hold nothing; how many.
        ``wall`` is the unix time the gates' own deadlines are in."""
        self._pruned_at = now
        stale = [k for k, g in self.gates.items() if now - g.used_at >= GATE_IDLE_SECONDS and g.idle(wall)]
        for k in stale:
            del self.gates[k]
        return len(stale)

    def enabled_again(self, key: int | str) -> None:
        """The endpoint was re-enabled in SQL: forget the failures that disabled it."""
        gate = self.gates.get(key)
        if gate is not None and gate.disabled is not None:
            gate.reset()

    def dirty(self) -> list[tuple[int | str, EndpointGate]]:
        out = [(k, g) for k, g in self.gates.items() if g.dirty]
        for _, g in out:
            g.dirty = False
        return out
