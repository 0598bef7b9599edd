"""Least privilege: the monitoring role reads no secrets and writes nothing; PUBLIC gets nothing that writes."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('WEBHOOKS', '{webhooks.>}')")
        c.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) "
            "VALUES ('w', 'http://x/', 'webhooks.a', '{\"Authorization\": \"Bearer s3cret\"}')"
        )
        c.execute(
            "INSERT INTO rule_webhook_secrets (webhook_id, secret) "
            "VALUES (1, 'whsec_' || encode(decode(repeat('ab', 32), 'hex'), 'base64'))"
        )
        # Roles are cluster-wide: create the plain role once for the whole test session.
        c.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nobody_in_particular') "
            "THEN CREATE ROLE nobody_in_particular NOLOGIN; END IF; END $$"
        )
        yield c


def as_role(conn: psycopg.Connection, role: str, statement: str) -> None:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    try:
        conn.execute(statement)
    finally:
        conn.execute("RESET ROLE")


def denied(conn: psycopg.Connection, role: str, statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(conn, role, statement)


SECRET_READS = [
    "SELECT nats_password FROM rule_nats_config",
    "SELECT auth_token FROM rule_nats_config",
    "SELECT auth_nkey_seed FROM rule_nats_config",
    "SELECT * FROM rule_nats_config",
    "SELECT secret FROM rule_webhook_secrets",
    "SELECT headers FROM rule_webhooks",
    "SELECT message_raw FROM rule_nats_dead_letters",
    "SELECT message_headers FROM rule_nats_dead_letters",
]
WRITES = [
    "UPDATE rule_nats_config SET nats_url = 'nats://evil:4222'",
    "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('X', '{x}')",
    "DELETE FROM rule_nats_streams",
    "UPDATE rule_nats_consumers SET enabled = false",
    "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('e', 'http://e/', 'e.e')",
    "DELETE FROM rule_nats_publish_history",
    "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, attempt, outcome) "
    "VALUES ('s', 'c', 1, 'delivered')",
    "UPDATE rule_nats_dead_letters SET replayed = true",
    "TRUNCATE rule_nats_consumer_stats",
    "SELECT rule_nats_consumer_update_stats('s', 'c', 1, 1, 1, 1)",
    "SELECT rule_nats_register_consumer('S', 's.x', 'c')",
    "SELECT rule_webhook_secret_create(1)",
    "SELECT rule_webhook_secret_rotate(1)",
    "SELECT rule_webhook_secret_revoke(1)",
    "SELECT rule_nats_endpoint_enable(1)",
    "SELECT rule_nats_endpoint_disable(1, 'x')",
    "UPDATE rule_nats_delivery_settings SET allow_networks = '{0.0.0.0/0}'",
    "UPDATE rule_webhooks SET allow_networks = '{0.0.0.0/0}'",
    "INSERT INTO rule_nats_endpoint_state (webhook_id) VALUES (1)",
    "SELECT rule_nats_purge_batch('attempts', interval '1 day')",
    "CALL rule_nats_purge()",
    "UPDATE rule_nats_retention SET attempts_days = 1",
    "DELETE FROM rule_nats_stats_hourly",
]


@pytest.mark.parametrize("statement", SECRET_READS + WRITES)
def test_monitor_is_refused_secrets_and_writes(conn: psycopg.Connection, statement: str) -> None:
    denied(conn, "rule_nats_monitor", statement)


@pytest.mark.parametrize("statement", SECRET_READS + WRITES)
def test_public_is_refused_secrets_and_writes(conn: psycopg.Connection, statement: str) -> None:
    denied(conn, "nobody_in_particular", statement)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM nats_performance_stats",
        "SELECT * FROM nats_recent_failures",
        "SELECT * FROM nats_publish_summary",
        "SELECT config_name, nats_url, auth_type, nats_user FROM rule_nats_config",
        "SELECT webhook_name, url, enabled FROM nats_webhooks",
        "SELECT * FROM rule_nats_streams",
        "SELECT * FROM rule_nats_consumer_stats",
        "SELECT reason, error, attempts FROM rule_nats_dead_letters",
        "SELECT * FROM nats_endpoint_health",
        "SELECT * FROM rule_nats_delivery_settings",
        "SELECT * FROM nats_worker_status",
        "SELECT * FROM nats_stream_status",
        "SELECT * FROM nats_consumer_status",
        "SELECT * FROM rule_nats_retention",
        "SELECT rule_nats_refresh_status()",
        "SELECT webhook_name, allow_networks, rate_limit_per_second, disabled_reason FROM rule_webhooks",
    ],
)
def test_monitor_reads_views_and_non_secret_columns(conn: psycopg.Connection, statement: str) -> None:
    as_role(conn, "rule_nats_monitor", statement)


def test_worker_has_what_the_sidecar_needs_and_no_more(conn: psycopg.Connection) -> None:
    for ok in [
        "SELECT nats_password, auth_token FROM rule_nats_config",
        "SELECT secret FROM rule_webhook_secrets",
        "SELECT headers FROM rule_webhooks",
        "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, attempt, outcome) "
        "VALUES ('s', 'c', 1, 'delivered')",
        "INSERT INTO rule_nats_dead_letters (stream_name, consumer_name, subject, message_raw, reason) "
        "VALUES ('s', 'c', 'x', '\\x00', 'invalid_json')",
        "SELECT rule_nats_consumer_update_stats('s', 'c', 'w1', 1, 1, 0, 0, 0, 1.5, true)",
        "SELECT rule_nats_register_consumer('ENVSTREAM', 'env.subject', 'env-group', 50)",
        "SELECT * FROM rule_nats_delivery_settings",
        "INSERT INTO rule_nats_endpoint_state (webhook_id, circuit) VALUES (1, 'open')",
        "SELECT rule_nats_endpoint_disable(1, 'HTTP 410 Gone')",
    ]:
        as_role(conn, "rule_nats_worker", ok)
    for no in [
        "UPDATE rule_nats_config SET nats_url = 'nats://evil:4222'",
        "DELETE FROM rule_nats_streams",
        "UPDATE rule_webhooks SET url = 'http://evil/'",
        "DELETE FROM rule_nats_delivery_attempts",
        "INSERT INTO rule_webhook_secrets (webhook_id, secret) VALUES (1, 'whsec_x')",
        "SELECT rule_webhook_secret_create(1)",
        "SELECT rule_webhook_secret_rotate(1)",
        "SELECT rule_nats_endpoint_enable(1)",
        "UPDATE rule_nats_delivery_settings SET allow_networks = '{0.0.0.0/0}'",
    ]:
        denied(conn, "rule_nats_worker", no)
    row = conn.execute(
        "SELECT batch_size, queue_group FROM rule_nats_consumers WHERE stream_name = 'ENVSTREAM'"
    ).fetchone()
    assert row == (50, "env-group")


def test_nothing_that_writes_is_granted_to_public(conn: psycopg.Connection) -> None:
    table_grants = conn.execute(
        """
        SELECT c.relname, a.privilege_type
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
               LATERAL aclexplode(c.relacl) a
         WHERE n.nspname = 'public' AND a.grantee = 0
           AND (c.relname LIKE 'rule\\_%' OR c.relname LIKE 'nats\\_%')
        """
    ).fetchall()
    assert table_grants == []
    # Functions are executable by PUBLIC by default; only pure validators may stay that way.
    public_functions = conn.execute(
        """
        SELECT p.proname
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' AND p.proname LIKE 'rule\\_%'
           AND has_function_privilege('nobody_in_particular', p.oid, 'EXECUTE')
           AND p.provolatile <> 'i'
        """
    ).fetchall()
    assert public_functions == []
