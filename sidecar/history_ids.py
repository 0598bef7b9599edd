"""The small ids that stand for the strings of delivery history that repeat from row to row
(sql/0019): a stream, consumer, worker and URL are one route_id. A route is made once and never
changes or goes, so each worker keeps the ones it has seen; only a route it has not seen yet
costs a statement, on a connection of its own and committed before the attempt rows that use it
(a rolled-back batch cannot leave the worker holding an id that does not exist)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from sidecar.poison import storable_row, storable_text
from sidecar.queries import query
from sidecar.rows import AttemptRow, log_row, route_key

RouteKey = tuple[str, str, str, str | None]


def _stored(key: RouteKey) -> RouteKey:
    stream, consumer, worker, url = key
    return (storable_text(stream), storable_text(consumer), storable_text(worker),
            None if url is None else storable_text(url))  # fmt: skip


class HistoryIds:
    def __init__(self) -> None:
        self.routes: dict[RouteKey, int] = {}

    async def rows(
        self, pool: AsyncConnectionPool[Any], attempts: Sequence[AttemptRow]
    ) -> list[tuple[Any, ...]]:
        """The rows to COPY into rule_nats_attempt_log, text made storable."""
        routes = self.routes
        keys = [route_key(a) for a in attempts]
        new = {k for k in keys if k not in routes}
        if new:
            await self.learn(pool, new)
        return [storable_row(log_row(a, routes[k])) for a, k in zip(attempts, keys, strict=True)]

    async def learn(self, pool: AsyncConnectionPool[Any], keys: set[RouteKey]) -> None:
        # Asked and answered by the stored (storable) text, which may differ from the row's.
        stored = {_stored(k): k for k in keys}
        async with pool.connection() as conn:
            cur = await conn.execute(
                query("history_routes"),
                {
                    "streams": [k[0] for k in stored],
                    "consumers": [k[1] for k in stored],
                    "workers": [k[2] for k in stored],
                    "urls": [k[3] for k in stored],
                },
            )
            got = await cur.fetchall()
        for stream, consumer, worker, url, route_id in got:
            self.routes[stored[(stream, consumer, worker, url)]] = int(route_id)
