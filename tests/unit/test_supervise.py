"""A background task that fails is logged at ERROR, reported by readiness and restarted."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.supervise import RECOVERY_SECONDS, TaskHealth, supervise


async def test_a_failing_task_is_logged_restarted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0
    commits = 0
    seen_problems: list[str | None] = []
    health = TaskHealth("recorder", progress=lambda: commits)

    async def run() -> None:
        nonlocal runs, commits
        runs += 1
        if runs == 1:
            seen_problems.append(health.problem(0.0))  # healthy before the first failure
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        seen_problems.append(health.problem(1.0))  # restarted, nothing committed yet: not ready
        commits += 1
        seen_problems.append(health.problem(1.0))  # the restarted task works again: ready

    with caplog.at_level(logging.ERROR, logger="sidecar.supervise"):
        await asyncio.wait_for(supervise(run, health, asyncio.Event(), clock=lambda: 0.0, first_delay=0.0), 5)
    assert runs == 2 and health.failures == 1
    assert seen_problems[0] is None
    assert (
        seen_problems[1] is not None and "recorder" in seen_problems[1] and "surrogates" in seen_problems[1]
    )
    assert seen_problems[2] is None
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and getattr(record, "action", None) == "task_restarted"


def test_a_failure_without_progress_clears_after_the_recovery_time() -> None:
    health = TaskHealth("listener")
    health.failed(RuntimeError("boom"), now=100.0)
    assert health.problem(100.0 + RECOVERY_SECONDS - 1) is not None
    assert health.problem(100.0 + RECOVERY_SECONDS) is None


async def test_a_task_that_returns_is_not_restarted() -> None:
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1

    await supervise(run, TaskHealth("t"), asyncio.Event())
    assert runs == 1


async def test_when_stopping_a_failed_task_restarts_at_once_to_finish_its_work() -> None:
    stop = asyncio.Event()
    stop.set()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("flaky")

    await asyncio.wait_for(supervise(run, TaskHealth("t"), stop, first_delay=60.0), 5)
    assert runs == 3
