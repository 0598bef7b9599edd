"""What the recorder writes of delivery history (sql/0019).

The strings that repeat from row to row (stream, consumer, worker, URL) are one route_id. A route
is made once and never changes or goes, so each worker keeps the ones it has seen; only a route it
has not seen yet costs a statement, on a connection of its own and committed before the attempt
rows that use it (a rolled-back batch cannot leave the worker holding an id that does not exist).

A consumer or webhook whose recording is 'failures' keeps no row for a delivered attempt: the
attempt is counted instead (rule_nats_count_successes), in the same transaction. The settings are
read again every RECORDING_EVERY seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from sidecar.poison import storable_row, storable_text
from sidecar.queries import query
from sidecar.rows import AttemptRow, LogRow, log_row, route_key

RouteKey = tuple[str, str, str, str | None]
RECORDING_EVERY = 30.0


def _stored(key: RouteKey) -> RouteKey:
    stream, consumer, worker, url = key
    return (storable_text(stream), storable_text(consumer), storable_text(worker),
            None if url is None else storable_text(url))  # fmt: skip


def counted_params(rows: Sequence[LogRow]) -> dict[str, list[Any]]:
    """The parameters of count_successes for delivered attempts kept as counts only."""
    return {
        "at": [r.attempted_at for r in rows],
        "route": [r.route_id for r in rows],
        "subject": [storable_text(r.subject) for r in rows],
        "webhook": [r.webhook_id for r in rows],
        "latency_us": [r.latency_us for r in rows],
    }


class HistoryIds:
    def __init__(self) -> None:
        self.routes: dict[RouteKey, int] = {}
        # recording = 'failures': (stream, consumer) pairs and webhook ids
        self.failures_consumers: set[tuple[str, str]] = set()
        self.failures_webhooks: set[int] = set()
        self._recording_read: float | None = None

    async def rows(
        self, pool: AsyncConnectionPool[Any], attempts: Sequence[AttemptRow]
    ) -> tuple[list[tuple[Any, ...]], dict[str, list[Any]] | None]:
        """The rows to COPY into rule_nats_attempt_log (text made storable), and the parameters of
        count_successes for the deliveries kept as counts only (None: there are none)."""
        if not attempts:
            return [], None
        await self._read_recording(pool)
        routes = self.routes
        try:
            # The common case: every route known, one pass.
            rows = [log_row(a, routes[(a[2], a[3], a[15], a[7])]) for a in attempts]
        except KeyError:
            await self.learn(pool, {route_key(a) for a in attempts} - routes.keys())
            rows = [log_row(a, routes[(a[2], a[3], a[15], a[7])]) for a in attempts]
        if not (self.failures_consumers or self.failures_webhooks):
            return [storable_row(r) for r in rows], None
        kept: list[tuple[Any, ...]] = []
        counted: list[LogRow] = []
        for a, row in zip(attempts, rows, strict=True):
            if a.outcome == "delivered" and (
                (a.stream_name, a.consumer_name) in self.failures_consumers
                or a.webhook_id in self.failures_webhooks
            ):
                counted.append(LogRow(*row))
            else:
                kept.append(storable_row(row))
        return kept, counted_params(counted) if counted else None

    async def _read_recording(self, pool: AsyncConnectionPool[Any]) -> None:
        now = time.monotonic()
        if self._recording_read is not None and now - self._recording_read < RECORDING_EVERY:
            return
        async with pool.connection() as conn:
            cur = await conn.execute(query("recording_failures"))
            got = await cur.fetchall()
        self.failures_consumers = {(s, c) for s, c, w in got if w is None}
        self.failures_webhooks = {int(w) for _, _, w in got if w is not None}
        self._recording_read = now

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
