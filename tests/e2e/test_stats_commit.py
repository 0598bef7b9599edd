"""Consumer stats are reported as deltas that PostgreSQL adds up: a report counts as sent only once
its transaction is committed, or the counts in it are lost for good."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import psycopg

from sidecar.app import Worker
from sidecar.config import Settings
from sidecar.consumer import Counters
from tests.support.registry import configure


class FakeRunner:
    """What _flush_stats reads of a ConsumerRunner (weak-referenceable, like the real one)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.cdef = SimpleNamespace(stream_name="STATSC", consumer_name="workers", max_deliver=20)
        self.pending = 0


async def test_a_stats_report_whose_commit_fails_is_sent_again(
    nats_db: psycopg.Connection, database_url: str
) -> None:
    db = nats_db
    configure(db, "STATSC", "statsc")
    # A check PostgreSQL makes only at COMMIT (a deferred constraint trigger), switched by a table.
    db.execute("CREATE TABLE stats_commit_fails (on_ boolean NOT NULL)")
    db.execute("INSERT INTO stats_commit_fails VALUES (true)")
    db.execute(
        """CREATE FUNCTION stats_commit_check() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF (SELECT on_ FROM stats_commit_fails) THEN RAISE EXCEPTION 'commit refused (test)'; END IF;
             RETURN NULL;
           END $$"""
    )
    db.execute(
        "CREATE CONSTRAINT TRIGGER stats_commit_check AFTER INSERT OR UPDATE ON rule_nats_consumer_stats "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stats_commit_check()"
    )
    worker = Worker(Settings(database_url=database_url, worker_name="statsc-1"))
    await worker.pool.open(wait=True, timeout=10)
    counters = Counters(delivered=7, acked=7)
    runner: Any = FakeRunner(counters)
    try:
        await worker.heartbeat.flush_stats(only=[runner])  # refused at COMMIT: nothing recorded
        db.execute("UPDATE stats_commit_fails SET on_ = false")
        counters.delivered = counters.acked = 10
        await worker.heartbeat.flush_stats(only=[runner])
    finally:
        await worker.pool.close()
    row = db.execute(
        "SELECT messages_delivered, messages_acknowledged FROM rule_nats_consumer_stats WHERE worker_name = 'statsc-1'"
    ).fetchone()
    assert row == (10, 10), row  # all ten, not the three since the refused report
