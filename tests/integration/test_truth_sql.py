"""Issue 13 in SQL: streams whose subjects overlap are refused at INSERT; the periodic queries of the
sidecar use their indexes; NATS trouble and a broken failure log show in the status views."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from sidecar.queries import query

OVERLAPPING = [
    # (subjects of stream A, subjects of stream B): some subject is captured by both
    (["a.>"], ["a.x"]),
    (["a.>"], ["a.b.c.d"]),
    (["a.*.c"], ["a.b.*"]),
    (["a.*"], ["*.b"]),
    ([">"], ["z.y"]),
    (["a.b"], ["a.b"]),
    (["x.y", "a.*"], ["q.r", "a.b"]),
    (["a.*.>"], ["a.b.c"]),
]
DISJOINT = [
    (["a.>"], ["a"]),  # > needs at least one more token
    (["a.*"], ["a.b.c"]),
    (["a.*"], ["a"]),
    (["a.b"], ["a.c"]),
    (["a.*.c"], ["a.b.d"]),
    (["a.*.>"], ["a.b"]),
    (["orders.>"], ["order.>"]),
]


def _add(db: psycopg.Connection, name: str, subjects: list[str], config: str = "default") -> None:
    db.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects, config_name) VALUES (%s, %s, %s)",
        (name, subjects, config),
    )


@pytest.mark.parametrize(("a", "b"), OVERLAPPING, ids=[f"{a}-{b}" for a, b in OVERLAPPING])
def test_a_stream_overlapping_another_is_refused_at_insert(
    database_url: str, a: list[str], b: list[str]
) -> None:
    """Before, the row was accepted and JetStream refused the stream (err 10065) later, in the log."""
    with psycopg.connect(database_url, autocommit=True) as db:
        _add(db, "A", a)
        with pytest.raises(psycopg.errors.ExclusionViolation) as info:
            _add(db, "B", b)
        diag = info.value.diag
        assert diag.message_primary == 'subjects of stream "B" overlap those of stream "A"'
        assert diag.message_detail is not None and "10065" in diag.message_detail
        assert diag.message_hint is not None and '"A"' in diag.message_hint
        assert diag.context is None or "Traceback" not in diag.context


@pytest.mark.parametrize(("a", "b"), DISJOINT, ids=[f"{a}-{b}" for a, b in DISJOINT])
def test_streams_with_disjoint_subjects_are_accepted(database_url: str, a: list[str], b: list[str]) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        _add(db, "A", a)
        _add(db, "B", b)


def test_overlap_is_checked_on_update_within_one_nats_connection(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO rule_nats_config (config_name, nats_url) VALUES ('other', 'nats://127.0.0.1:4999')"
        )
        _add(db, "A", ["a.>"])
        _add(db, "ELSEWHERE", ["a.>"], config="other")  # another server or account: no conflict
        _add(db, "B", ["b.>"])
        db.execute("UPDATE rule_nats_streams SET subjects = '{a.>, a.b}' WHERE stream_name = 'A'")  # itself
        db.execute("UPDATE rule_nats_streams SET max_age_seconds = 60 WHERE stream_name = 'B'")
        with pytest.raises(psycopg.errors.ExclusionViolation, match='stream "B" overlap those of stream "A"'):
            db.execute("UPDATE rule_nats_streams SET subjects = '{a.x.>}' WHERE stream_name = 'B'")
        with pytest.raises(psycopg.errors.ExclusionViolation, match='stream "ELSEWHERE"'):
            db.execute("UPDATE rule_nats_streams SET config_name = 'other' WHERE stream_name = 'A'")
        # An existing row inserted again (a worker registering what is there) is no conflict with itself.
        db.execute(
            "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('B', '{b.>}') "
            "ON CONFLICT (stream_name) DO NOTHING"
        )


def _examined(plan: dict[str, Any], relation: str) -> int:
    """Rows a plan read from a relation: what its scans returned plus what their filters dropped."""
    total = 0
    if plan.get("Relation Name") == relation or plan.get("Index Name", "").startswith(relation):
        total += int(plan.get("Actual Rows", 0)) * int(plan.get("Actual Loops", 1))
        total += int(plan.get("Rows Removed by Filter", 0)) + int(
            plan.get("Rows Removed by Index Recheck", 0)
        )
    for child in plan.get("Plans", []):
        total += _examined(child, relation)
    return total


def _explain(db: psycopg.Connection, sql: str, params: dict[str, object]) -> dict[str, Any]:
    """EXPLAIN ANALYZE of a statement, rolled back (the claim is an UPDATE)."""
    with db.transaction(force_rollback=True):
        row = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def _add_retries(db: psycopg.Connection, consumer: str, n: int, first_seq: int) -> None:
    db.execute(
        "INSERT INTO rule_nats_retries (message_id, stream_name, consumer_name, stream_seq, subject, message_raw, "
        "attempts, first_attempt_at, next_attempt_at) "
        "SELECT 'm' || g, 'S', %s, g, 's.x', '\\x7b7d', 1, now(), now() - interval '1 minute' "
        "FROM generate_series(%s::bigint, %s::bigint) g",
        (consumer, first_seq, first_seq + n - 1),
    )


def test_the_retry_claim_reads_neither_leased_rows_nor_other_consumers(database_url: str) -> None:
    """Claimed rows kept their old next_attempt_at, so every claim (4 times a second per consumer)
    walked past all the leased rows, and past the due rows of every other consumer, before finding
    one to take: 40,000 rows read to claim 1 here."""
    params = {"lease": 600, "worker": "w1", "stream": "S", "consumer": "c1", "limit": 20000}
    with psycopg.connect(database_url, autocommit=True) as db:
        _add_retries(db, "c1", 20000, 1)
        assert len(db.execute(query("retries_claim"), params).fetchall()) == 20000  # in flight now
        _add_retries(db, "c2", 20000, 100001)  # another consumer's backlog, all due
        _add_retries(db, "c1", 1, 200001)
        db.execute("ANALYZE rule_nats_retries")
        plan = _explain(db, query("retries_claim"), {**params, "limit": 10})
        assert plan["Actual Rows"] == 1
        assert _examined(plan, "rule_nats_retries") < 100, plan
        # A worker that died leaves its leases: they are due again once they expire.
        db.execute(
            "UPDATE rule_nats_retries SET leased_until = now() - interval '1 s', "
            "next_attempt_at = now() - interval '1 s' WHERE consumer_name = 'c1' AND stream_seq <= 5"
        )
        taken = db.execute(query("retries_claim"), {**params, "worker": "w2", "limit": 100}).fetchall()
        assert len(taken) == 6
        # At exit, a worker lets go of what it holds: due at once, for anyone.
        db.execute(query("retries_release_mine"), {"worker": "w1"})
        taken = db.execute(query("retries_claim"), {**params, "worker": "w3", "limit": 50000}).fetchall()
        assert len(taken) == 20000 - 5


def test_the_heartbeats_backlog_count_is_bounded(database_url: str) -> None:
    """count(*) over the retry table and the outbox every heartbeat grew with the backlog it reports:
    exact up to 10,000 rows each, PostgreSQL's estimate beyond."""
    with psycopg.connect(database_url, autocommit=True) as db:
        _add_retries(db, "c1", 25000, 1)
        db.execute(
            "INSERT INTO rule_nats_outbox (subject, payload, message_id, status) "
            "SELECT 's.x', '{}', 'o' || g, CASE WHEN g % 5 = 0 THEN 'failed' ELSE 'pending' END "
            "FROM generate_series(1, 25000) g"
        )
        db.execute("ANALYZE rule_nats_retries, rule_nats_outbox")
        plan = _explain(db, query("backlog"), {})
        examined = _examined(plan, "rule_nats_retries") + _examined(plan, "rule_nats_outbox")
        assert examined <= 3 * 10000, examined
        retries, pending, failed = db.execute(query("backlog")).fetchone() or (0, 0, 0)
        assert (retries, pending, failed) == (25000, 20000, 5000)
        db.execute("DELETE FROM rule_nats_retries WHERE stream_seq > 7")
        db.execute("DELETE FROM rule_nats_outbox WHERE outbox_id > 30")
        assert db.execute(query("backlog")).fetchone() == (
            7,
            24,
            6,
        )  # small: exact, whatever the statistics say
