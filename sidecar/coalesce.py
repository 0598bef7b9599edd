"""Turn a stream of wake-ups into at most one run per interval, losing none of them.

NOTIFY is a hint that any login may send to any channel (PostgreSQL has no channel
permissions), so a wake-up must never cost more than a bounded amount of work: whatever
arrives, a run starts at the earliest ``min_interval`` after the previous one ended, and every
wake-up that arrived meanwhile is served by that one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math


class Coalescer:
    def __init__(self, event: asyncio.Event, stop: asyncio.Event, min_interval: float) -> None:
        self.event = event
        self.stop = stop
        self.min_interval = min_interval
        self._last_end = -math.inf

    async def next(self) -> bool:
        """Wait until a run is due and allowed; False when stopping.

        The event is cleared right before the run, not after it: a wake-up that arrives while
        the run reads the tables is kept and starts the next run.
        """
        loop = asyncio.get_running_loop()
        await _first(self.event, self.stop)
        if self.stop.is_set():
            return False
        delay = self._last_end + self.min_interval - loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
            if self.stop.is_set():
                return False
        self.event.clear()
        return True

    def done(self) -> None:
        """A run ended (successful or not): the interval starts now."""
        self._last_end = asyncio.get_running_loop().time()


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
