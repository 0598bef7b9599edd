"""The recorder's autocommit COPY (a batch of attempt rows only), against a real PostgreSQL: the pool
connection it switches to autocommit goes back to the pool switched back, whatever interrupts it."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg.waiting
import pytest
from psycopg_pool import AsyncConnectionPool

from sidecar.recorder import Outcome, Recorder
from sidecar.rows import AttemptRow


def attempt_row(seq: int) -> AttemptRow:
    now = dt.datetime.now(dt.UTC)
    return AttemptRow(
        now, f"m-{seq}", "S", "c", seq, "s.a", None, "https://e.example/", 1, "delivered", 200, 1.0,
        None, None, None, "me", None,
    )  # fmt: skip


async def test_a_copy_cancelled_while_switching_to_autocommit_gives_the_connection_back_in_transactions(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled (shutdown, a supervisor restart) in set_autocommit(True): psycopg sets the mode, then
    lets the event loop run when it has been busy for MAX_BUSY_TIME, and a cancellation lands there.
    The connection went back to the pool in autocommit, and the next user's statements, meant as one
    transaction (e.g. the endpoint-health writes), each committed on their own."""
    monkeypatch.setattr(psycopg.waiting, "MAX_BUSY_TIME", 0.0)  # a busy loop: psycopg yields every time
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
        conn = await pool.getconn()
        await pool.putconn(conn)
        recorder = Recorder(pool)
        task = asyncio.create_task(recorder._write([Outcome(attempt=attempt_row(1))]))
        while not conn.autocommit:  # noqa: ASYNC110 - step by step until the batch switched it
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.connection() as again:
            assert again is conn
            assert not again.autocommit
