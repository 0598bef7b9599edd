"""The SQL API of rule-engine-postgres, as its users wrote against it (issue 18): every function with
its argument names, types and defaults, every column, the result shapes (JSON keys), the counters'
meaning, the bounded stream defaults. Real PostgreSQL and nats-server.

Failed on main: 12 of the 15 functions did not exist, the three that did answered other keys, and
the columns below were missing.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from psycopg import sql

# name -> arguments as pg_get_function_arguments prints them (the original's names, types, defaults)
ORIGINAL_FUNCTIONS = {
    "rule_nats_init": "config_name text",
    "rule_webhook_publish_nats": "webhook_id integer, payload jsonb, message_id text DEFAULT NULL::text",
    "rule_webhook_call_unified": "webhook_id integer, payload jsonb",
    "rule_nats_health_check": "config_name text DEFAULT 'default'::text",
    "rule_nats_configure": (
        "p_config_name text DEFAULT 'default'::text, p_nats_url text DEFAULT 'nats://localhost:4222'::text, "
        "p_auth_type text DEFAULT 'none'::text, p_jetstream_enabled boolean DEFAULT true, "
        "p_stream_name text DEFAULT 'WEBHOOKS'::text, p_subject_prefix text DEFAULT 'webhooks'::text"
    ),
    "rule_nats_stream_create": (
        "p_stream_name text, p_subjects text[], p_config_name text DEFAULT 'default'::text, "
        "p_description text DEFAULT NULL::text, p_retention_policy text DEFAULT 'limits'::text, "
        "p_max_age_seconds bigint DEFAULT 604800"
    ),
    "rule_webhook_enable_nats": (
        "p_webhook_id integer, p_nats_subject text DEFAULT NULL::text, p_publish_mode text DEFAULT 'both'::text, "
        "p_config_name text DEFAULT 'default'::text"
    ),
    "rule_webhook_disable_nats": "p_webhook_id integer",
    "rule_nats_stats": "p_webhook_id integer DEFAULT NULL::integer, p_hours integer DEFAULT 24",
    "rule_nats_config_info": "p_config_name text DEFAULT 'default'::text",
    "rule_nats_webhooks_list": "",
    "rule_nats_cleanup_expired": "",
    "rule_nats_cleanup_old_history": (
        "p_older_than interval DEFAULT '30 days'::interval, p_keep_failed boolean DEFAULT true"
    ),
    "rule_nats_test_connection": "p_config_name text DEFAULT 'default'::text",
    "rule_nats_consumer_update_stats": (
        "p_stream_name text, p_consumer_name text, p_messages_delivered bigint, p_messages_acknowledged bigint, "
        "p_messages_pending bigint, p_avg_processing_time_ms numeric DEFAULT NULL::numeric"
    ),
}

ORIGINAL_COLUMNS = {
    "rule_webhooks": (
        "webhook_id webhook_name description url method headers timeout_ms retry_enabled max_retries "
        "retry_delay_ms retry_backoff_multiplier enabled created_at created_by updated_at tags nats_enabled "
        "nats_subject nats_config_id publish_mode"
    ),
    "rule_nats_config": (
        "config_id config_name nats_url nats_cluster_urls auth_type auth_token auth_credentials_file auth_nkey_seed "
        "tls_enabled tls_cert_file tls_key_file tls_ca_file max_connections connection_timeout_ms reconnect_delay_ms "
        "max_reconnect_attempts jetstream_enabled stream_name subject_prefix enabled created_at updated_at"
    ),
    "rule_nats_streams": (
        "stream_id config_id stream_name subjects description storage_type max_messages max_bytes max_age_seconds "
        "retention_policy discard_policy replicas duplicate_window_seconds enabled created_at"
    ),
    "rule_nats_publish_history": (
        "publish_id webhook_id subject payload headers published_at message_id sequence_number success "
        "error_message latency_ms triggered_by rule_execution_id expires_at"
    ),
    "rule_nats_consumer_stats": (
        "consumer_id stream_name consumer_name queue_group ack_policy max_deliver messages_delivered "
        "messages_acknowledged messages_pending messages_redelivered avg_processing_time_ms last_active_at active "
        "created_at updated_at"
    ),
    "nats_publish_summary": (
        "webhook_id webhook_name subject publish_mode total_published successful failed success_rate_pct "
        "avg_latency_ms min_latency_ms max_latency_ms last_published_at"
    ),
    "nats_recent_failures": "publish_id webhook_name subject error_message payload published_at latency_ms",
    "nats_performance_stats": (
        "webhook_name subject message_count avg_latency_ms min_latency_ms max_latency_ms p50_latency_ms "
        "p95_latency_ms p99_latency_ms"
    ),
}


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    nats_db.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects, storage_type) VALUES ('WEBHOOKS', '{webhooks.>}', 'memory')"
    )
    nats_db.execute("SELECT rule_nats_init('default')")  # creates it in JetStream (no sidecar here)
    return nats_db


def _hook(db: psycopg.Connection, name: str, **cols: object) -> int:
    cols = {"url": f"http://127.0.0.1:9/{name}", **cols}
    names = ["webhook_name", *cols]
    row = db.execute(
        sql.SQL("INSERT INTO rule_webhooks ({}) VALUES ({}) RETURNING webhook_id").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), sql.SQL(", ").join(sql.Placeholder() * len(names))
        ),
        (name, *cols.values()),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_every_function_of_the_original_exists_with_its_arguments(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT proname, pg_get_function_arguments(oid) FROM pg_proc "
            "WHERE pronamespace = 'public'::regnamespace AND proname = ANY(%s)",
            (list(ORIGINAL_FUNCTIONS),),
        ).fetchall()
    found: dict[str, set[str]] = {}
    for name, args in rows:
        found.setdefault(name, set()).add(args)
    for name, args in ORIGINAL_FUNCTIONS.items():
        assert args in found.get(name, set()), (name, found.get(name))


def test_every_column_of_the_original_exists(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for table, columns in ORIGINAL_COLUMNS.items():
            have = {
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s",
                    (table,),
                )
            }
            assert set(columns.split()) - have == set(), table
        types = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, format_type(atttypid, atttypmod) FROM information_schema.columns c "
                "JOIN pg_attribute a ON a.attrelid = (c.table_schema || '.' || c.table_name)::regclass "
                "AND a.attname = c.column_name WHERE c.column_name IN ('latency_ms', 'avg_processing_time_ms') "
                "AND c.table_name IN ('rule_nats_publish_history', 'rule_nats_consumer_stats')"
            ).fetchall()
        )
        assert types == {
            "rule_nats_publish_history.latency_ms": "numeric(10,2)",
            "rule_nats_consumer_stats.avg_processing_time_ms": "numeric(10,2)",
        }


def test_configuration_functions_answer_as_the_original(db: psycopg.Connection) -> None:
    assert db.execute("SELECT rule_nats_configure('second', 'nats://127.0.0.1:4333')").fetchone() == (True,)
    info = db.execute("SELECT rule_nats_config_info('second')").fetchone()[0]  # type: ignore[index]
    assert set(info) == {
        "config_id", "config_name", "nats_url", "auth_type", "jetstream_enabled", "stream_name", "subject_prefix",
        "max_connections", "connection_timeout_ms", "enabled", "created_at", "updated_at",
    }  # fmt: skip
    assert (info["nats_url"], info["stream_name"], info["subject_prefix"], info["max_connections"]) == (
        "nats://127.0.0.1:4333", "WEBHOOKS", "webhooks", 10,
    )  # fmt: skip
    # The original's milliseconds and this project's seconds are one setting.
    db.execute("UPDATE rule_nats_config SET connection_timeout_ms = 7000 WHERE config_name = 'second'")
    assert db.execute(
        "SELECT connect_timeout_seconds, connection_timeout_ms FROM rule_nats_config WHERE config_name = 'second'"
    ).fetchone() == (7, 7000)
    sid = db.execute("SELECT rule_nats_stream_create('AUDIT', ARRAY['audit.>'], 'second')").fetchone()[0]  # type: ignore[index]
    row = db.execute(
        "SELECT config_id = (SELECT config_id FROM rule_nats_config WHERE config_name = 'second'), max_age_seconds, "
        "max_bytes, max_messages FROM rule_nats_streams WHERE stream_id = %s",
        (sid,),
    ).fetchone()
    assert row == (True, 604800, 1073741824, 1000000)
    with pytest.raises(psycopg.errors.UndefinedObject):
        db.execute("SELECT rule_nats_stream_create('X', ARRAY['x.>'], 'nope')")
    with pytest.raises(psycopg.errors.UndefinedObject) as err:
        db.execute("SELECT rule_nats_config_info('nope')")
    assert err.value.diag.message_hint


def test_a_stream_row_that_does_not_say_gets_the_original_bounds(db: psycopg.Connection) -> None:
    db.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('EVENTS', '{events.>}')")
    assert db.execute(
        "SELECT max_age_seconds, max_bytes, max_messages FROM rule_nats_streams WHERE stream_name = 'EVENTS'"
    ).fetchone() == (604800, 1073741824, 1000000)


def test_webhook_columns_of_the_original_stay_in_step_with_this_projects(db: psycopg.Connection) -> None:
    wid = _hook(
        db, "pay", method="delete", timeout_ms=30000, max_retries=5, retry_delay_ms=2000,
        nats_config_id=db.execute("SELECT config_id FROM rule_nats_config WHERE config_name = 'default'").fetchone()[0],  # type: ignore[index]
    )  # fmt: skip
    row = db.execute(
        "SELECT method, timeout_seconds, retry_max_attempts, retry_initial_seconds, config_name, nats_subject, "
        "nats_enabled, created_by IS NOT NULL, tags FROM rule_webhooks WHERE webhook_id = %s",
        (wid,),
    ).fetchone()
    assert row == ("DELETE", 30, 6, 2, "default", "webhooks.pay", True, True, [])
    db.execute(
        "UPDATE rule_webhooks SET timeout_seconds = 12, retry_enabled = false WHERE webhook_id = %s", (wid,)
    )
    assert db.execute(
        "SELECT timeout_ms, retry_max_attempts FROM rule_webhooks WHERE webhook_id = %s", (wid,)
    ).fetchone() == (12000, 1)
    for mode in ("queue", "nats", "both"):
        db.execute("UPDATE rule_webhooks SET publish_mode = %s WHERE webhook_id = %s", (mode, wid))


def test_enable_disable_and_publish_answer_in_the_original_shape(db: psycopg.Connection) -> None:
    wid = _hook(db, "slack", nats_subject="webhooks.slack", nats_enabled=False)
    with pytest.raises(psycopg.errors.UndefinedObject) as err:
        db.execute("SELECT rule_webhook_publish_nats(%s, '{}')", (wid,))
    assert "NATS not enabled" in str(err.value) and err.value.diag.message_hint
    assert db.execute("SELECT rule_webhook_enable_nats(%s, 'webhooks.slack', 'nats')", (wid,)).fetchone() == (
        True,
    )
    mid = f"m-{uuid.uuid4()}"
    out = db.execute("SELECT rule_webhook_publish_nats(%s, '{\"t\": 1}', %s)", (wid, mid)).fetchone()[0]  # type: ignore[index]
    assert {k: out[k] for k in ("success", "webhook_name", "subject", "stream", "duplicate")} == {
        "success": True, "webhook_name": "slack", "subject": "webhooks.slack", "stream": "WEBHOOKS", "duplicate": False,
    }  # fmt: skip
    assert out["sequence"] >= 1 and isinstance(out["latency_ms"], float)
    again = db.execute("SELECT rule_webhook_publish_nats(%s, '{\"t\": 1}', %s)", (wid, mid)).fetchone()[0]  # type: ignore[index]
    assert again["duplicate"] is True and again["sequence"] == out["sequence"]
    nats = db.execute("SELECT rule_webhook_call_unified(%s, '{\"t\": 2}')", (wid,)).fetchone()[0]  # type: ignore[index]
    assert set(nats) == {"nats"} and nats["nats"]["success"] is True
    db.execute("UPDATE rule_webhooks SET publish_mode = 'queue' WHERE webhook_id = %s", (wid,))
    queued = db.execute("SELECT rule_webhook_call_unified(%s, '{\"t\": 3}')", (wid,)).fetchone()[0]  # type: ignore[index]
    assert set(queued) == {"queue"} and queued["queue"]["status"] == "pending"
    assert db.execute(
        "SELECT status FROM rule_webhook_queue WHERE queue_id = %s", (queued["queue"]["queue_id"],)
    ).fetchone() == ("pending",)
    db.execute("UPDATE rule_webhooks SET publish_mode = 'both' WHERE webhook_id = %s", (wid,))
    both = db.execute("SELECT rule_webhook_call_unified(%s, '{\"t\": 4}')", (wid,)).fetchone()[0]  # type: ignore[index]
    assert both["nats"]["success"] is True and both["queue"]["status"] == "not_needed"
    listed = db.execute("SELECT * FROM rule_nats_webhooks_list()").fetchall()
    assert [(r[1], r[2], r[3], r[4], r[5]) for r in listed] == [
        ("slack", "webhooks.slack", "both", "default", 4)
    ]
    assert db.execute("SELECT rule_webhook_disable_nats(%s)", (wid,)).fetchone() == (True,)
    assert db.execute(
        "SELECT nats_enabled, publish_mode FROM rule_webhooks WHERE webhook_id = %s", (wid,)
    ).fetchone() == (False, "queue")


def test_both_queues_what_nats_cannot_take_now(db: psycopg.Connection) -> None:
    wid = _hook(db, "pay", nats_subject="webhooks.pay", publish_mode="both")
    db.execute("UPDATE rule_nats_config SET nats_url = 'nats://127.0.0.1:9' WHERE config_name = 'default'")
    out = db.execute("SELECT rule_webhook_call_unified(%s, '{\"t\": 5}')", (wid,)).fetchone()[0]  # type: ignore[index]
    assert out["nats"]["success"] is False and out["queue"]["status"] == "pending"
    assert db.execute("SELECT count(*) FROM rule_nats_outbox WHERE webhook_id = %s", (wid,)).fetchone() == (
        1,
    )


def test_init_health_and_test_connection_answer_in_the_original_shape(nats_db: psycopg.Connection) -> None:
    db = nats_db
    init = db.execute("SELECT rule_nats_init('default')").fetchone()[0]  # type: ignore[index]
    assert init["success"] is True and init["stream_name"] == "WEBHOOKS" and init["stream_registered"] is True
    assert db.execute("SELECT subjects FROM rule_nats_streams WHERE stream_name = 'WEBHOOKS'").fetchone() == (
        ["webhooks.>"],
    )
    health = db.execute("SELECT rule_nats_health_check('default')").fetchone()[0]  # type: ignore[index]
    assert (health["success"], health["config"], health["connected"], health["jetstream_enabled"]) == (
        True, "default", True, True,
    )  # fmt: skip
    assert health["pool_stats"]["health_percentage"] == 100.0
    test = db.execute("SELECT rule_nats_test_connection()").fetchone()[0]  # type: ignore[index]
    assert test["success"] is True and test["config"]["name"] == "default"
    db.execute("UPDATE rule_nats_config SET enabled = false")
    with pytest.raises(psycopg.errors.UndefinedObject):
        db.execute("SELECT rule_nats_init('default')")
    assert db.execute("SELECT rule_nats_test_connection()").fetchone()[0]["success"] is False  # type: ignore[index]


def test_stats_views_and_cleanup_answer_as_the_original(db: psycopg.Connection) -> None:
    used = _hook(db, "used", nats_subject="webhooks.used")
    idle = _hook(db, "idle", nats_subject="webhooks.idle")
    for i in range(3):
        db.execute("SELECT rule_webhook_publish_nats(%s, %s::jsonb)", (used, json.dumps({"i": i})))
    stats = db.execute("SELECT rule_nats_stats(%s)", (used,)).fetchone()[0]  # type: ignore[index]
    assert set(stats) == {
        "total_published", "successful", "failed", "success_rate_pct", "avg_latency_ms", "min_latency_ms",
        "max_latency_ms", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "unique_subjects",
        "time_range_hours", "period_start", "period_end",
    }  # fmt: skip
    assert (stats["total_published"], stats["successful"], stats["success_rate_pct"]) == (3, 3, 100)
    # numeric(10,2): the original's ROUND(x, 2) works.
    assert db.execute(
        "SELECT round(avg(latency_ms), 2) IS NOT NULL FROM rule_nats_publish_history"
    ).fetchone() == (True,)
    summary = dict(
        db.execute(
            "SELECT webhook_id, total_published FROM nats_publish_summary WHERE webhook_id IS NOT NULL"
        ).fetchall()
    )
    assert summary == {used: 3, idle: 0}  # a webhook without publishes has its row
    # A failed publish, seen with its payload by the admin.
    db.execute("UPDATE rule_nats_config SET nats_url = 'nats://127.0.0.1:9', connect_timeout_seconds = 0.2")
    with pytest.raises(psycopg.Error):
        db.execute("SELECT rule_webhook_publish_nats(%s, '{\"secret\": 1}')", (used,))
    row = db.execute(
        "SELECT publish_id IS NOT NULL, webhook_name, subject, payload -> 'data', published_at IS NOT NULL "
        "FROM nats_recent_failures WHERE source = 'publish'"
    ).fetchone()
    assert row == (True, "used", "webhooks.used", {"secret": 1}, True)
    db.execute("SET ROLE rule_nats_monitor")
    assert db.execute("SELECT payload FROM nats_recent_failures WHERE source = 'publish'").fetchone() == (
        None,
    )
    db.execute("RESET ROLE")
    perf = db.execute(
        "SELECT message_count, total_count FROM nats_performance_stats WHERE webhook_id = %s AND source = 'publish'",
        (used,),
    ).fetchone()
    assert perf == (3, 4)  # the original's message_count: successful ones only
    assert db.execute("SELECT rule_nats_cleanup_expired()").fetchone() == (0,)
    db.execute("UPDATE rule_nats_publish_history SET expires_at = now() - interval '1 s' WHERE success")
    assert db.execute("SELECT rule_nats_cleanup_expired()").fetchone() == (3,)
    db.execute("UPDATE rule_nats_publish_history SET published_at = now() - interval '40 days'")
    assert db.execute("SELECT rule_nats_cleanup_old_history()").fetchone() == (0,)  # keeps the failure
    assert db.execute("SELECT rule_nats_cleanup_old_history('30 days', false)").fetchone() == (1,)


def test_consumer_stats_take_the_original_workers_statements(db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO rule_nats_consumer_stats (stream_name, consumer_name, queue_group, ack_policy, max_deliver, active) "
        "VALUES ('WEBHOOKS', 'w-1', 'webhook-workers', 'explicit', 3, true) "
        "ON CONFLICT (stream_name, consumer_name) DO NOTHING"
    )
    assert db.execute(
        "SELECT rule_nats_consumer_update_stats('WEBHOOKS', 'w-1', 12, 8, 4, 45.678)"
    ).fetchone() == (True,)
    assert db.execute(
        "SELECT messages_delivered, messages_acknowledged, round(avg_processing_time_ms, 2)::float8, queue_group, consumer_id > 0 "
        "FROM rule_nats_consumer_stats WHERE consumer_name = 'w-1'"
    ).fetchone() == (12, 8, 45.68, "webhook-workers", True)
