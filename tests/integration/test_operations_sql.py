"""Monitoring views, status views and retention, checked against known rows."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S', '{s.>}')")
        c.execute(
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, filter_subject) VALUES ('S', 'c1', 's.>')"
        )
        c.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('orders', 'https://o.example/', 's.a')"
        )
        yield c


def add_attempts(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> None:
    """rows: (age interval text, outcome, latency_ms, url)"""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO rule_nats_delivery_attempts (attempted_at, message_id, stream_name, consumer_name, subject, "
            "webhook_id, url, attempt, outcome, http_status, latency_ms, error) "
            "VALUES (now() - %s::interval, 'm', 'S', 'c1', 's.a', 1, %s, 1, %s, %s, %s, %s)",
            [
                (
                    age,
                    url,
                    outcome,
                    200 if outcome == "delivered" else 503,
                    ms,
                    None if outcome == "delivered" else "HTTP 503",
                )
                for age, outcome, ms, url in rows
            ],
        )


def test_performance_stats_match_the_raw_rows(conn: psycopg.Connection[Any]) -> None:
    latencies = [float(i) for i in range(1, 201)]  # 1..200 ms
    rows = [
        ("10 minutes", "delivered" if i % 10 else "retry", ms, "https://o.example/")
        for i, ms in enumerate(latencies)
    ]
    add_attempts(conn, rows[:120])  # two statements: the second merges into the same hourly row
    add_attempts(conn, rows[120:])
    add_attempts(conn, [("26 hours", "delivered", 5000.0, "https://o.example/")])  # outside the window
    conn.execute(
        "INSERT INTO rule_nats_publish_history (subject, webhook_id, success, latency_ms, stream_name) "
        "SELECT 's.a', 1, i <= 48, i / 10.0, 'S' FROM generate_series(1, 50) i"
    )
    conn.execute(
        "INSERT INTO rule_nats_publish_history (subject, success, latency_ms, stream_name, triggered_by) "
        "VALUES ('s.a', true, 0.5, 'S', 'outbox'), ('s.a', true, 0.7, 'S', 'replay')"
    )
    stats = {
        r["source"]: r
        for r in conn.cursor(row_factory=dict_row).execute("SELECT * FROM nats_performance_stats").fetchall()
    }
    d = stats["delivery"]
    assert (d["subject"], d["consumer_name"], d["webhook_name"], d["webhook_id"]) == (
        "s.a",
        "c1",
        "orders",
        1,
    )
    # 200 attempts: 180 delivered, 20 retries scheduled; no message reached a failed outcome.
    assert (d["message_count"], d["attempt_count"], d["success_count"], d["failure_count"]) == (
        180,
        200,
        180,
        0,
    )
    assert d["failed_attempt_count"] == 20
    assert float(d["success_rate_pct"]) == 100.0
    assert float(d["avg_latency_ms"]) == pytest.approx(statistics.fmean(latencies), abs=0.01)
    assert (float(d["min_latency_ms"]), float(d["max_latency_ms"])) == (1.0, 200.0)
    exact = statistics.quantiles(latencies, n=100, method="inclusive")
    for col, q in (("p50_latency_ms", 50), ("p95_latency_ms", 95), ("p99_latency_ms", 99)):
        assert float(d[col]) == pytest.approx(exact[q - 1], rel=0.125), col  # one 25% bucket
    p = stats["publish"]
    # message_count: the original's meaning, successful messages only (issue 18); total_count all.
    assert (p["message_count"], p["total_count"], p["success_count"], p["consumer_name"]) == (
        48,
        50,
        48,
        None,
    )
    assert float(p["max_latency_ms"]) == 5.0
    o = stats["outbox"]  # relayed and replayed by the sidecar, apart from SQL publishes
    assert (o["message_count"], float(o["min_latency_ms"]), float(o["max_latency_ms"])) == (2, 0.5, 0.7)


def test_recent_failures_newest_first_without_query_strings(conn: psycopg.Connection[Any]) -> None:
    add_attempts(
        conn, [(f"{i} seconds", "retry", 1.0, "https://o.example/h?token=s3cret") for i in range(150)]
    )
    add_attempts(conn, [("1 second", "delivered", 1.0, "https://o.example/")])
    conn.execute(
        "INSERT INTO rule_nats_publish_history (published_at, subject, success, error_message) "
        "VALUES (now() - interval '5.5 seconds', 's.a', false, 'no stream')"
    )
    rows = conn.execute(
        "SELECT source, failed_at, url, webhook_name, error_message FROM nats_recent_failures"
    ).fetchall()
    assert len(rows) == 100
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert rows[6][0] == "publish" and rows[6][4] == "no stream"
    assert all(r[2] in (None, "https://o.example") for r in rows)  # the origin only (issue 19)
    assert "s3cret" not in repr(rows)


def test_worker_status_active_idle_stale_stopped(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """
        INSERT INTO rule_nats_workers (worker_name, hostname, pid, version, last_heartbeat, heartbeat_interval_seconds,
                                       last_activity_at, stopped_at)
        VALUES ('busy', 'h', 1, 'v', now(), 5, now(), NULL),
               ('quiet', 'h', 2, 'v', now(), 5, now() - interval '10 minutes', NULL),
               ('gone', 'h', 3, 'v', now() - interval '18 seconds', 5, now(), NULL),
               ('done', 'h', 4, 'v', now(), 5, NULL, now())
        """
    )
    got = dict(conn.execute("SELECT worker_name, status FROM nats_worker_status").fetchall())
    assert got == {"busy": "ACTIVE", "quiet": "IDLE", "gone": "STALE", "done": "STOPPED"}


def test_stream_and_consumer_status(conn: psycopg.Connection[Any]) -> None:
    def consumer_status() -> str:
        return str(conn.execute("SELECT status FROM nats_consumer_status").fetchone()[0])  # type: ignore[index]

    assert conn.execute("SELECT status FROM nats_stream_status").fetchone() == ("unknown",)
    assert consumer_status() == "unknown"
    conn.execute(
        "INSERT INTO rule_nats_stream_state (stream_name, config_name, present, messages, updated_at) "
        "VALUES ('S', 'default', true, 10, now())"
    )
    conn.execute(
        "INSERT INTO rule_nats_consumer_state (stream_name, consumer_name, present, filter_subject, num_pending, "
        "num_ack_pending, num_waiting) VALUES ('S', 'c1', true, 's.>', 7, 2, 1)"
    )
    assert conn.execute("SELECT status, messages FROM nats_stream_status").fetchone() == ("ok", 10)
    assert conn.execute("SELECT status, lag FROM nats_consumer_status").fetchone() == ("ok", 7)
    add_attempts(
        conn, [("1 minute", "delivered", 1.0, "u")] * 30 + [("20 minutes", "delivered", 1.0, "u")] * 5
    )
    row = conn.execute("SELECT per_second_5m, delivered_1h FROM nats_consumer_status").fetchone()
    assert row is not None and (float(row[0]), row[1]) == (0.1, 35)  # 30 in the last 300 s
    conn.execute("UPDATE rule_nats_consumer_state SET filter_subject = 's.other'")
    assert consumer_status() == "filter_mismatch"
    conn.execute("UPDATE rule_nats_consumer_state SET present = false, last_error = 'deleted?'")
    assert consumer_status() == "missing"
    conn.execute("UPDATE rule_nats_consumer_state SET present = true, filter_subject = 's.>', last_error = NULL, "
                 "updated_at = now() - interval '5 minutes'")  # fmt: skip
    assert consumer_status() == "stale"
    conn.execute(
        "UPDATE rule_nats_stream_state SET last_error = 'JetStream refused the change of storage_type'"
    )
    assert conn.execute("SELECT status FROM nats_stream_status").fetchone() == ("drift",)


def test_purge_removes_exactly_what_is_old(conn: psycopg.Connection[Any]) -> None:
    add_attempts(conn, [("40 days", "delivered", 1.0, "u")] * 7 + [("20 days", "delivered", 1.0, "u")] * 3)
    conn.execute(
        "INSERT INTO rule_nats_publish_history (published_at, subject, success) "
        "SELECT now() - make_interval(days => d), 's.a', true FROM generate_series(25, 34) d"
    )
    conn.execute(
        "INSERT INTO rule_nats_dead_letters (created_at, stream_name, consumer_name, subject, message_raw, reason, "
        "replayed) VALUES (now() - interval '100 days', 'S', 'c1', 's.a', '\\x00', 'http_4xx', true), "
        "(now() - interval '100 days', 'S', 'c1', 's.a', '\\x00', 'http_4xx', false), "
        "(now() - interval '10 days', 'S', 'c1', 's.a', '\\x00', 'http_4xx', true)"
    )

    def purge(kind: str, days: int, batch: int = 5000) -> int:
        return int(
            conn.execute(
                "SELECT rule_nats_purge_batch(%s, make_interval(days => %s), %s)", (kind, days, batch)
            ).fetchone()[0]  # type: ignore[index]
        )

    assert purge("attempts", 30, batch=5) == 5  # one batch at a time
    assert purge("attempts", 30, batch=5) == 2
    assert purge("attempts", 30) == 0
    assert conn.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (3,)
    assert purge("publish_history", 30) == 5  # 30..34 days old
    assert purge("dead_letters", 90) == 1  # replayed only
    assert conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE NOT replayed) FROM rule_nats_dead_letters"
    ).fetchone() == (2, 1)
    # the hourly rollup of the 40-day-old attempts is purged by its own setting
    assert purge("stats", 35) >= 1
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        purge("everything", 1)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT rule_nats_purge_batch('attempts', interval '0')")


def test_purge_procedure_commits_per_batch_and_records_the_result(conn: psycopg.Connection[Any]) -> None:
    add_attempts(conn, [("40 days", "delivered", 1.0, "u")] * 250)
    conn.execute("UPDATE rule_nats_retention SET batch_size = 100")
    conn.execute("CALL rule_nats_purge()")
    row = conn.execute("SELECT last_run_at IS NOT NULL, last_result FROM rule_nats_retention").fetchone()
    assert row is not None and row[0] and row[1]["attempts"] == 250
    assert conn.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (0,)


def test_admin_may_run_the_purge_procedure(conn: psycopg.Connection[Any]) -> None:
    add_attempts(conn, [("40 days", "delivered", 1.0, "u")] * 3)
    conn.execute("SET ROLE rule_nats_admin")
    try:
        conn.execute("CALL rule_nats_purge()")
    finally:
        conn.execute("RESET ROLE")
    assert conn.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (0,)


def test_every_view_column_says_what_it_means(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        missing = conn.execute(
            "SELECT c.relname || '.' || a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid "
            "AND a.attnum > 0 AND NOT a.attisdropped WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace "
            "AND col_description(c.oid, a.attnum) IS NULL ORDER BY 1"
        ).fetchall()
    assert missing == []


def test_one_event_failing_twice_then_delivered_is_one_message_three_attempts(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, subject, message_id, attempt, "
            "outcome, latency_ms) VALUES ('S', 'c', 's.a', 'e1', 1, 'retry', 5), ('S', 'c', 's.a', 'e1', 2, "
            "'retry', 5), ('S', 'c', 's.a', 'e1', 3, 'delivered', 5)"
        )
        row = conn.execute(
            "SELECT message_count, attempt_count, success_count, failure_count, success_rate_pct, "
            "failed_attempt_count FROM nats_performance_stats WHERE source = 'delivery'"
        ).fetchone()
        assert row == (1, 3, 1, 0, 100, 2)
        status = conn.execute("SELECT delivered_1h, failed_1h FROM nats_consumer_status").fetchall()
        assert status == []  # no consumer row registered: nothing to show
        conn.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S', '{s.>}')")
        conn.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('S', 'c')")
        assert conn.execute("SELECT delivered_1h, failed_1h FROM nats_consumer_status").fetchone() == (1, 2)
        conn.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('S', 'idle')")
        idle = conn.execute(
            "SELECT delivered_1h, failed_1h, per_second_5m FROM nats_consumer_status WHERE consumer_name = 'idle'"
        ).fetchone()
        assert idle == (0, 0, 0)


def test_relayed_failures_say_outbox_like_the_performance_view(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rule_nats_publish_history (subject, success, error_message, triggered_by) "
            "VALUES ('o.a', false, 'no stream', 'outbox'), ('p.a', false, 'no stream', 'sql')"
        )
        failures = dict(conn.execute("SELECT subject, source FROM nats_recent_failures").fetchall())
        stats = dict(conn.execute("SELECT subject, source FROM nats_performance_stats").fetchall())
        assert failures == stats == {"o.a": "outbox", "p.a": "publish"}


def test_a_recovered_endpoint_shows_no_last_error(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'https://e.example/', 'w.a')"
        )
        conn.execute(
            "INSERT INTO rule_nats_endpoint_state (webhook_id, last_status, last_error, last_failure_at, last_success_at) "
            "VALUES (1, 500, 'HTTP 500', now() - interval '1 minute', now())"
        )
        row = conn.execute(
            "SELECT status, last_status, last_error, attempts_1h, failures_1h FROM nats_endpoint_health"
        ).fetchone()
        assert row == ("healthy", None, None, 0, 0)
        conn.execute("UPDATE rule_nats_endpoint_state SET last_failure_at = now() + interval '1 second'")
        assert conn.execute("SELECT last_error FROM nats_endpoint_health").fetchone() == ("HTTP 500",)


def test_failed_outbox_rows_can_be_retried_by_the_admin_only(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rule_nats_outbox (subject, payload, message_id, status, attempts, error_message) "
            "VALUES ('a.b', '{}', 'm1', 'failed', 1, 'no stream'), ('a.c', '{}', 'm2', 'pending', 0, NULL)"
        )
        conn.execute("SET ROLE rule_nats_monitor")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT rule_nats_outbox_retry()")
        conn.execute("RESET ROLE")
        conn.execute("SET ROLE rule_nats_admin")
        assert conn.execute("SELECT rule_nats_outbox_retry()").fetchone() == (1,)
        conn.execute("RESET ROLE")
        rows = conn.execute(
            "SELECT message_id, status, error_message FROM rule_nats_outbox ORDER BY 1"
        ).fetchall()
        assert rows == [("m1", "pending", None), ("m2", "pending", None)]
