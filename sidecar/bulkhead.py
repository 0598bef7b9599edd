"""A bulkhead per endpoint: each endpoint's bounded share of one consumer's send slots.

A consumer keeps at most ``batch_size`` messages sent and not yet committed (its send slots) and
holds at most two windows of them (``sidecar.backpressure.pull_size``). Without a share, an
endpoint answering after 2 s took every slot and the window: 100 messages for a fast endpoint
waited 7.7 s behind 64 for the slow one (alone: 0.27 s).

The rules, per endpoint (a registered webhook, or the origin ``scheme://host:port`` of a bare
``webhook_url``), for a message about to take a send slot:

* **Its share of the slots**: half of ``batch_size``; a *slow* endpoint gets a quarter,
  as a failing one does at its gate (``sidecar.endpoints``), and so does one not heard from yet
  (its first answer decides: a fast one answers within milliseconds; with half, 64 messages for an
  endpoint answering in 2 s took 8 of 16 slots for 2 s and halved the next endpoint's rate); one known to answer within
  FAST_SECONDS all of them (it gives each back that soon: a single fast endpoint loses nothing). A turn lasts from the moment the
  message may go until its response: a send slot is held until the outcome's COMMIT, but that wait
  is the consumer's, so a fast endpoint alone still keeps every slot busy. Slow: its responses take longer than
  SLOW_SECONDS on average, or its oldest request in flight has been running that long (so an
  endpoint that drips or never answers counts before its first response is in).
* **Beyond its share** a message waits in the process only while that costs little: the endpoint is
  known fast and the expected wait is under MAX_LOCAL_WAIT, or its speed is still unknown and either
  its first request went out less than PROBE_SECONDS ago (a fast endpoint answers within
  milliseconds: a burst for a new endpoint is not deferred) or it holds at most half a batch (a
  quarter of the fetch window), or no other endpoint was seen on the consumer for LANE_IDLE_SECONDS (nobody to keep
  room for; until it turns out slow, at most SLOW_SECONDS). Otherwise it is *deferred*: written to
  rule_nats_retries with the time to come back and acknowledged, without using up an attempt, so
  the window holds what other endpoints can send (the consumer fetches past messages being deferred:
  ``backpressure.pull_size``). Deferred, never lost, never sent twice (the
  deferral is committed before the NATS ack, like every outcome).
* Below MIN_SLOTS (``batch_size`` 1 to 3) there is nothing to share: no bulkhead.

The decisions are pure (time is an argument) and unit-tested; ``enter`` is the only asynchronous
part, waiting for the endpoint's turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field

MIN_SLOTS = 4
SLOW_SECONDS = 1.0  # responses slower than this on average, or a request running this long: slow
FAST_SECONDS = 0.5  # responses faster than this on average: the endpoint may use every slot
MAX_LOCAL_WAIT = 0.5  # a known-fast endpoint's message waits in the process if its turn comes sooner
TICK = 0.03  # a waiting message looks again at least this often (its endpoint may have turned slow)
# An endpoint not heard from yet: its messages wait (the first answer comes within milliseconds from
# a fast one) until its oldest request has run this long; then only within the window's share.
PROBE_SECONDS = 0.03
UNKNOWN_DEFER = 0.5  # deferred for an endpoint not heard from yet: back soon (the retry pump polls at 0.25 s)
EWMA = 0.3  # weight of the newest response time in an endpoint's average
DEFER_MIN = 1.0
DEFER_MAX = 30.0
LANE_IDLE_SECONDS = 600.0
PRUNE_EVERY_SECONDS = 60.0
MAX_LANES = 10000  # bare URLs come from messages: the number of origins is not ours to choose

LaneKey = int | str


def lane_key(gate_key: int | str, url: str, registered: bool) -> LaneKey:
    """The endpoint a message goes to: its webhook_id, or the origin of a bare URL."""
    if registered:
        return gate_key
    parts = url.split("/", 3)  # ["http:", "", "host:port", "path"]
    return f"{parts[0].lower()}//{parts[2].lower()}" if len(parts) > 2 else url


@dataclass(slots=True)
class Lane:
    """One endpoint's use of the consumer's send slots."""

    busy: int = 0  # messages that took a turn: waiting for a send slot or for their response
    waiting: int = 0  # messages waiting in the process for a turn
    latency: float | None = None  # average response time (s); None: no response yet
    started: dict[int, float] = field(default_factory=dict)  # requests in flight: token -> start
    used_at: float = 0.0
    queue: deque[asyncio.Future[None]] = field(default_factory=deque)

    def oldest_age(self, now: float) -> float:
        # Insertion order is start order: the first entry is the oldest request.
        for started in self.started.values():
            return now - started
        return 0.0

    def slow(self, now: float) -> bool:
        return (self.latency is not None and self.latency > SLOW_SECONDS) or self.oldest_age(
            now
        ) > SLOW_SECONDS


@dataclass(slots=True)
class Turn:
    go: bool
    wait: bool = False  # not go: wait in the process and ask again
    delay: float = 0.0  # neither: defer the message this long
    why: str = ""


GO = Turn(True)
WAIT = Turn(False, wait=True)


class Bulkhead:
    """The lanes of one consumer (see the module's docstring)."""

    def __init__(self, slots: int, rand: random.Random | None = None) -> None:
        self.slots = slots  # the consumer's batch_size
        self.lanes: dict[LaneKey, Lane] = {}
        self.closed = False
        self.rand = rand or random.Random()  # noqa: S311 - jitter
        self._pruned_at = time.monotonic()

    def share(self, lane: Lane, now: float) -> int:
        """The send slots the endpoint may have waiting for its responses at once."""
        if lane.latency is not None and lane.latency <= FAST_SECONDS and not lane.slow(now):
            return self.slots  # gives each slot back within FAST_SECONDS: others wait no longer
        if lane.slow(now) or lane.latency is None:
            return max(1, self.slots // 4)
        return max(1, self.slots // 2)

    def lane(self, key: LaneKey, now: float) -> Lane:
        lane = self.lanes.get(key)
        if lane is None:
            if now - self._pruned_at >= PRUNE_EVERY_SECONDS or len(self.lanes) >= MAX_LANES:
                self.prune(now)
            lane = self.lanes[key] = Lane()
        lane.used_at = now
        return lane

    def turn(self, lane: Lane, now: float, waiting: bool = False) -> Turn:
        """May a message of ``lane`` take a turn now (``go``: counted busy at once), wait in the
        process (``wait``), or be deferred? ``waiting``: it is one of the lane's waiters already."""
        if self.slots < MIN_SLOTS or lane.busy < self.share(lane, now):
            lane.busy += 1
            return GO
        ahead = lane.waiting if waiting else lane.waiting + 1
        if not lane.slow(now):
            if lane.latency is not None:
                if ahead / max(1, lane.busy) * lane.latency <= MAX_LOCAL_WAIT:
                    return WAIT
            elif (
                lane.oldest_age(now) < PROBE_SECONDS
                or lane.busy + ahead <= self.slots // 2
                or len(self.lanes) == 1  # no other endpoint seen lately: nobody to keep room for
            ):
                return WAIT
        return Turn(False, delay=self._defer_delay(lane, now), why=self._why(lane, now))

    def _defer_delay(self, lane: Lane, now: float) -> float:
        if lane.latency is None and not lane.slow(now):
            return UNKNOWN_DEFER * (1.0 + self.rand.random())
        expected = max(lane.latency or 0.0, lane.oldest_age(now))
        return min(DEFER_MAX, max(DEFER_MIN, expected)) + DEFER_MIN * self.rand.random()

    def _why(self, lane: Lane, now: float) -> str:
        if lane.slow(now):
            return (
                f"slow endpoint holds its share of the send slots ({self.share(lane, now)} of {self.slots})"
            )
        return f"endpoint holds its share of the send slots ({self.share(lane, now)} of {self.slots})"

    def leave(self, key: LaneKey) -> None:
        """A message's turn ends (its request answered, or nothing sent): the next waiter's turn."""
        lane = self.lanes.get(key)
        if lane is None:
            return
        lane.busy -= 1
        self._wake_one(lane)

    @staticmethod
    def _wake_one(lane: Lane) -> None:
        while lane.queue:
            fut = lane.queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def started(self, key: LaneKey, token: int, now: float) -> None:
        lane = self.lanes.get(key)
        if lane is not None:
            lane.started[token] = now

    def finished(self, key: LaneKey, token: int, latency: float | None) -> None:
        """A request ended, and with it the message's turn (``leave``): ``latency`` its response time
        (None: no answer to learn from). The send slot is held until the outcome's COMMIT, but that
        wait is the consumer's, not the endpoint's: counted against the endpoint, it took a quarter
        of a fast endpoint's throughput."""
        lane = self.lanes.get(key)
        if lane is None:
            return
        lane.started.pop(token, None)
        if latency is not None:
            lane.latency = latency if lane.latency is None else (1 - EWMA) * lane.latency + EWMA * latency
        self.leave(key)

    def prune(self, now: float) -> None:
        """Forget endpoints unused for LANE_IDLE_SECONDS that hold nothing (and, over MAX_LANES,
        every idle one)."""
        self._pruned_at = now
        full = len(self.lanes) >= MAX_LANES
        for key in [
            k
            for k, lane in self.lanes.items()
            if lane.busy == 0 and lane.waiting == 0 and (full or now - lane.used_at >= LANE_IDLE_SECONDS)
        ]:
            del self.lanes[key]

    def close(self) -> None:
        """The consumer stops: every waiter gives up its wait (and hands its message back)."""
        self.closed = True
        for lane in self.lanes.values():
            for fut in lane.queue:
                if not fut.done():
                    fut.set_result(None)
            lane.queue.clear()

    def enter(self, key: LaneKey) -> Turn:
        """The message's turn now (``go``; ``finished`` or ``leave`` ends it), a deferral, or
        ``wait``: then ``wait_turn``. (Not a coroutine: most messages go at once.)"""
        now = time.monotonic()
        return self.turn(self.lane(key, now), now)

    async def wait_turn(self, key: LaneKey) -> Turn:
        """After ``enter`` said wait: the message's turn, or a deferral; ``Turn(False)`` without a
        delay once the consumer is closing (hand the message back)."""
        lane = self.lane(key, time.monotonic())
        lane.waiting += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.closed:  # (close() may come while waiting: looked at on every round)
                    return Turn(False)
                fut: asyncio.Future[None] = loop.create_future()
                lane.queue.append(fut)
                # Woken when a turn ends; else looks again: soon while the endpoint is not heard from
                # yet, every SLOW_SECONDS / 4 once known (a hundred waiters polling every 30 ms cost
                # the 50 ms endpoint of bench/deliver.py --scenario slow50 a sixth more CPU).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, TICK if lane.latency is None else SLOW_SECONDS / 4)
                turn = self.turn(lane, time.monotonic(), waiting=True)
                if not turn.wait:
                    return turn
        finally:
            lane.waiting -= 1
