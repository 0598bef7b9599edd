"""Background tasks that must not die silently: a failure is logged at ERROR, reported by /readyz
and the task is restarted (with a growing pause, so a task failing at once does not spin)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

RECOVERY_SECONDS = 60.0  # a restarted task counts as healthy again after this long without failing
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


def _no_progress() -> int:
    return 0


@dataclass(slots=True)
class TaskHealth:
    """Failures of one supervised task, and whether readiness should still report them."""

    name: str
    progress: Callable[[], int] = _no_progress  # grows when the task did useful work (e.g. a commit)
    failures: int = 0
    last_error: str | None = None
    failed_at: float | None = None  # monotonic
    progress_at_failure: int = 0
    on_failure: Callable[[], None] | None = None  # e.g. counts the restart in a metric

    def failed(self, exc: BaseException, now: float) -> None:
        self.failures += 1
        if self.on_failure is not None:
            self.on_failure()
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.failed_at = now
        self.progress_at_failure = self.progress()

    def problem(self, now: float) -> str | None:
        """Why readiness fails (None: healthy): from a failure until the restarted task did useful
        work, or ran RECOVERY_SECONDS without failing again."""
        if self.failed_at is None:
            return None
        if self.progress() > self.progress_at_failure or now - self.failed_at >= RECOVERY_SECONDS:
            return None
        return f"task {self.name} failed ({self.failures} times, last: {self.last_error}) and was restarted"


async def supervise(
    run: Callable[[], Awaitable[None]],
    health: TaskHealth,
    stop: asyncio.Event,
    clock: Callable[[], float] = time.monotonic,
    first_delay: float = FIRST_RESTART_DELAY,
    max_delay: float = MAX_RESTART_DELAY,
) -> None:
    """Run ``run()`` until it returns; restart it whenever it raises. Once ``stop`` is set the
    restart is immediate, so a task that must finish its work (the recorder's last commit) gets to."""
    delay = first_delay
    while True:
        try:
            await run()
            return
        except Exception as exc:
            health.failed(exc, clock())
            logger.exception(
                "task %s failed (%d times so far); restarting it in %.1f s",
                health.name,
                health.failures,
                min(delay, 0.1) if stop.is_set() else delay,
                extra={"action": "task_restarted", "task": health.name},
            )
        if stop.is_set():
            await asyncio.sleep(min(delay, 0.1))  # shutting down: at once, but never a busy loop
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, max_delay)
