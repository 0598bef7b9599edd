"""The coalescer under a flood of wake-ups: bounded runs, none lost, stops promptly (real event loop)."""

from __future__ import annotations

import asyncio

from sidecar.coalesce import Coalescer


async def _count_runs(flood_seconds: float, interval: float) -> tuple[int, int]:
    event, stop = asyncio.Event(), asyncio.Event()
    gate = Coalescer(event, stop, interval)
    runs = 0

    async def loop() -> None:
        nonlocal runs
        while await gate.next():
            runs += 1
            await asyncio.sleep(0.001)  # the work of one run
            gate.done()

    task = asyncio.create_task(loop())
    sent = 0
    deadline = asyncio.get_running_loop().time() + flood_seconds
    while asyncio.get_running_loop().time() < deadline:
        event.set()
        sent += 1
        await asyncio.sleep(0)
    await asyncio.sleep(interval * 2)  # the last wake-up is served, not lost
    stop.set()
    await asyncio.wait_for(task, timeout=1)
    return runs, sent


def test_a_flood_becomes_at_most_one_run_per_interval() -> None:
    runs, sent = asyncio.run(_count_runs(0.5, 0.1))
    assert sent > 1000
    assert 3 <= runs <= 0.5 / 0.1 + 2, runs


async def _wake_during_run() -> list[str]:
    event, stop = asyncio.Event(), asyncio.Event()
    gate = Coalescer(event, stop, 0.01)
    seen: list[str] = []
    event.set()
    assert await gate.next()
    seen.append("run 1")
    event.set()  # arrives while run 1 reads: must start run 2
    gate.done()
    assert await asyncio.wait_for(gate.next(), timeout=1)
    seen.append("run 2")
    gate.done()
    stop.set()
    assert not await asyncio.wait_for(gate.next(), timeout=1)
    return seen


def test_a_wake_up_during_a_run_starts_the_next_one() -> None:
    assert asyncio.run(_wake_during_run()) == ["run 1", "run 2"]


async def _stop_while_waiting_out_the_interval() -> bool:
    event, stop = asyncio.Event(), asyncio.Event()
    gate = Coalescer(event, stop, 60.0)
    gate.done()
    event.set()
    waiting = asyncio.create_task(gate.next())
    await asyncio.sleep(0.01)
    stop.set()
    return await asyncio.wait_for(waiting, timeout=1)


def test_stop_ends_the_wait_for_the_interval() -> None:
    assert asyncio.run(_stop_while_waiting_out_the_interval()) is False
