"""Retention: old attempts, history, dead letters and stats deleted by rule_nats_retention's
settings, by one sidecar at a time (an advisory lock), one short transaction per batch. The
history tables are partitioned by day (sql/0019): their old days are dropped whole, and the days
ahead are made here whether or not a retention is set."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.queries import query

logger = logging.getLogger(__name__)

PURGE_KINDS = (
    ("attempts", "attempts_days"),
    ("publish_history", "publish_history_days"),
    ("dead_letters", "dead_letters_days"),
    ("stats", "stats_days"),
)


# Partitions are made a week ahead; looking every 10 minutes is plenty, and once per heartbeat
# would be a statement every few seconds for nothing.
PARTITIONS_EVERY = 600.0
_partitions_checked: list[float] = []  # monotonic time of the last look, in this process


async def make_partitions(conn: psycopg.AsyncConnection[Any]) -> None:
    now = time.monotonic()
    if _partitions_checked and now - _partitions_checked[0] < PARTITIONS_EVERY:
        return
    cur = await conn.execute(query("history_partitions"))
    made = await cur.fetchone()
    _partitions_checked[:] = [now]
    if made and made[0]:
        logger.info(
            "made %d history partitions", made[0], extra={"action": "history_partitions", "made": made[0]}
        )


async def purge_when_due(pool: AsyncConnectionPool[Any], stop: asyncio.Event) -> None:
    """Purge what rule_nats_retention says is old, if a purge is due and no other sidecar runs one."""
    try:
        async with pool.connection() as conn:
            await make_partitions(conn)
            cur = await conn.execute(query("retention_settings"))
            row = await cur.fetchone()
            if row is None:
                return
            attempts, history, dead, stats, batch, every, since = row
            if every is None or (since is not None and since < every):
                return
            cur = await conn.execute(query("retention_lock"))
            locked = await cur.fetchone()
            if not locked or not locked[0]:
                return
            try:
                days = {"attempts_days": attempts, "publish_history_days": history,
                        "dead_letters_days": dead, "stats_days": stats}  # fmt: skip
                result: dict[str, int] = {}
                for kind, column in PURGE_KINDS:
                    if days[column] is None:
                        continue
                    total = 0
                    while not stop.is_set():
                        # `batch` only tells when to stop: the function reads the same row.
                        cur = await conn.execute(query("purge_batch"), {"what": kind})
                        got = await cur.fetchone()
                        n = int(got[0]) if got else 0
                        total += n
                        if n < batch:
                            break
                    result[kind] = total
                await conn.execute(query("retention_done"), {"result": json.dumps(result)})
            finally:
                await conn.execute(query("retention_unlock"))
        if any(result.values()):
            logger.info(
                "retention: deleted %s",
                ", ".join(f"{n} {k}" for k, n in result.items() if n),
                extra={"action": "retention", **{f"purged_{k}": n for k, n in result.items()}},
            )
    except psycopg.Error as exc:
        logger.warning("retention failed: %s", exc, extra={"action": "retention_failed"})
