"""webhook_config_applies_total counts an application of the registry once it has ended, so that
whoever waits on the counter (tests/support/sidecar.py, a dashboard) sees the change in effect."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from psycopg_pool import AsyncConnectionPool

from sidecar.config import Settings
from sidecar.configuration import Configuration, RegistryRows
from sidecar.worker_state import Events, WorkerState


async def test_an_application_is_counted_when_it_has_ended(database_url: str) -> None:
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
        io: Any = SimpleNamespace(pool=pool)  # reload() reads the registry; _apply is replaced below
        state = WorkerState(
            settings=Settings(database_url=database_url, worker_name="w"), events=Events(), io=io
        )
        configuration = Configuration(state, flush_stats=lambda: None)  # type: ignore[arg-type]
        entered, release = asyncio.Event(), asyncio.Event()

        async def apply(rows: RegistryRows) -> bool:
            entered.set()
            await release.wait()  # runners being started, JetStream being reconciled
            return True

        configuration._apply = apply  # type: ignore[method-assign]
        reload = asyncio.create_task(configuration.reload())
        await asyncio.wait_for(entered.wait(), 10)
        assert state.config_reloads == 1
        assert state.config_applies == 0  # applying, not applied yet
        release.set()
        await asyncio.wait_for(reload, 10)
        assert state.config_applies == 1
