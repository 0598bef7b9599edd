"""LISTEN for configuration changes and outbox events on a dedicated connection.

NOTIFY is only a wake-up hint: the tables are the truth. After (re)connecting, every
event is set, so the worker reloads everything it may have missed while disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)


class Listener:
    def __init__(self, conninfo: str, events: dict[str, asyncio.Event]) -> None:
        self.conninfo = conninfo
        self.events = events
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
                    for channel in self.events:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.connected.set()
                    backoff = 0.2
                    for event in self.events.values():
                        event.set()  # reload: we may have missed notifications while away
                    logger.debug("listening on %s", ", ".join(self.events), extra={"action": "listen"})
                    while not stop.is_set():
                        async for note in conn.notifies(timeout=1.0):
                            woken = self.events.get(note.channel)
                            if woken is not None:
                                woken.set()
                        # The timeout returns here every second, which also lets psycopg
                        # notice a dead connection.
                        await conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                self.connected.clear()
                logger.warning(
                    "lost the LISTEN connection: %s; reconnecting", exc, extra={"action": "listen_lost"}
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, 5.0)
