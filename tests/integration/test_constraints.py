"""Bad configuration rows fail at INSERT time with a message that says what is wrong."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('WEBHOOKS', '{webhooks.>}')")
        yield c


def refused(conn: psycopg.Connection, statement: str, fragment: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        conn.execute(statement)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("statement", "fragment"),
    [
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('bad name', '{a.b}')", "stream_name"),
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('a.b', '{a.b}')", "stream_name"),
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S1', '{}')", "subjects"),
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S1', '{\"a b\"}')", "subjects"),
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S1', '{a..b}')", "subjects"),
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S1', '{a.>.b}')", "subjects"),
        ("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('S1', '{.a}')", "subjects"),
        (
            "INSERT INTO rule_nats_streams (stream_name, subjects, storage_type) VALUES ('S1', '{a}', 'disk')",
            "storage_type: file or memory",
        ),
        (
            "INSERT INTO rule_nats_streams (stream_name, subjects, retention_policy) VALUES ('S1', '{a}', 'x')",
            "retention_policy",
        ),
        (
            "INSERT INTO rule_nats_streams (stream_name, subjects, max_messages) VALUES ('S1', '{a}', -5)",
            "max_messages",
        ),
        (
            "INSERT INTO rule_nats_streams (stream_name, subjects, max_bytes) VALUES ('S1', '{a}', 0)",
            "max_bytes",
        ),
        (
            "INSERT INTO rule_nats_streams (stream_name, subjects, max_age_seconds) VALUES ('S1', '{a}', -1)",
            "max_age_seconds",
        ),
        (
            "INSERT INTO rule_nats_streams (stream_name, subjects, replicas) VALUES ('S1', '{a}', 7)",
            "replicas",
        ),
        (
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('WEBHOOKS', 'has space')",
            "consumer_name",
        ),
        (
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size) VALUES ('WEBHOOKS', 'c', 0)",
            "batch_size",
        ),
        (
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, filter_subject) "
            "VALUES ('WEBHOOKS', 'c', 'webhooks. x')",
            "filter_subject",
        ),
        (
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, ack_wait_seconds) "
            "VALUES ('WEBHOOKS', 'c', 0)",
            "ack_wait_seconds",
        ),
        (
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, max_deliver) VALUES ('WEBHOOKS', 'c', 0)",
            "max_deliver",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'ftp://x/y', 'webhooks.a')",
            "url: absolute http(s)",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'http://u:p@x/y', 'webhooks.a')",
            "no user:pass@",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', '/relative', 'webhooks.a')",
            "url",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'http://x/', 'webhooks.*')",
            "wildcards",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, method) "
            "VALUES ('w', 'http://x/', 'webhooks.a', 'TRACE')",
            "method",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) "
            "VALUES ('w', 'http://x/', 'webhooks.a', '[1]')",
            "headers",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) "
            "VALUES ('w', 'http://x/', 'webhooks.a', '{\"X-N\": 5}')",
            "headers",
        ),
        (
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, timeout_seconds) "
            "VALUES ('w', 'http://x/', 'webhooks.a', -1)",
            "timeout_seconds",
        ),
        ("INSERT INTO rule_nats_config (config_name, nats_url) VALUES ('c2', 'http://x:4222')", "nats_url"),
        (
            "INSERT INTO rule_nats_config (config_name, nats_url, auth_type) VALUES ('c2', 'nats://x', 'kerberos')",
            "auth_type",
        ),
        (
            "INSERT INTO rule_nats_config (config_name, nats_url, auth_type, nats_user) "
            "VALUES ('c2', 'nats://x', 'user_password', 'u')",
            "needs nats_user and nats_password",
        ),
        (
            "INSERT INTO rule_nats_config (config_name, nats_url, auth_type) VALUES ('c2', 'nats://x', 'token')",
            "needs auth_token",
        ),
        (
            "INSERT INTO rule_nats_config (config_name, nats_url, nats_cluster_urls) "
            "VALUES ('c2', 'nats://x', '{\"nats://a b\"}')",
            "nats_cluster_urls",
        ),
        (
            "INSERT INTO rule_nats_config (config_name, nats_url, connect_timeout_seconds) "
            "VALUES ('c2', 'nats://x', 0)",
            "connect_timeout_seconds",
        ),
    ],
)
def test_bad_rows_are_refused_with_a_clear_message(
    conn: psycopg.Connection, statement: str, fragment: str
) -> None:
    refused(conn, statement, fragment)


def test_good_rows_are_accepted(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects, storage_type, max_age_seconds, replicas) "
        "VALUES ('ORDERS', '{orders.*, orders.eu.>}', 'memory', 3600, 1)"
    )
    conn.execute(
        "INSERT INTO rule_nats_consumers (stream_name, consumer_name, filter_subject, batch_size) "
        "VALUES ('ORDERS', 'orders-worker', 'orders.*', 100)"
    )
    conn.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) "
        "VALUES ('orders.hook', 'https://example.invalid:8443/hook?x=1', 'orders.created', "
        '\'{"X-Tenant": "t1"}\')'
    )
    conn.execute(
        "INSERT INTO rule_nats_config (config_name, nats_url, nats_cluster_urls, auth_type, nats_user, "
        "nats_password) VALUES ('prod', 'tls://nats-1:4222', '{nats://nats-2:4222}', 'user_password', 'u', 'p')"
    )
    # One UPDATE of the seeded row is all a single-server setup needs.
    conn.execute(
        "UPDATE rule_nats_config SET nats_url = 'nats://10.1.2.3:4222' WHERE config_name = 'default'"
    )


def test_unknown_config_or_stream_is_a_foreign_key_error(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO rule_nats_streams (stream_name, subjects, config_name) VALUES ('S', '{a}', 'nope')"
        )
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('NOPE', 'c')")


def test_config_changes_notify(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as writer,
    ):
        listener.execute("LISTEN rule_nats_config_changed")
        writer.execute("UPDATE rule_nats_streams SET max_messages = 10")
        writer.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'http://x/', 'webhooks.a')"
        )
        got = [n.payload for n in listener.notifies(timeout=2, stop_after=2)]
    assert '{"table" : "rule_nats_streams", "op" : "UPDATE"}' in got
    assert '{"table" : "rule_webhooks", "op" : "INSERT"}' in got


def test_updated_at_moves_on_update(conn: psycopg.Connection) -> None:
    before = conn.execute(
        "SELECT updated_at FROM rule_nats_streams WHERE stream_name = 'WEBHOOKS'"
    ).fetchone()
    conn.execute("UPDATE rule_nats_streams SET max_messages = 5 WHERE stream_name = 'WEBHOOKS'")
    after = conn.execute("SELECT updated_at FROM rule_nats_streams WHERE stream_name = 'WEBHOOKS'").fetchone()
    assert before and after and after[0] > before[0]
