"""Issue 13 in SQL: streams whose subjects overlap are refused at INSERT; the periodic queries of the
sidecar use their indexes; NATS trouble and a broken failure log show in the status views."""

from __future__ import annotations

import psycopg
import pytest

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
