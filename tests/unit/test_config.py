from __future__ import annotations

import pytest

from sidecar.config import NatsOverride, nats_connection_from_row, settings_from_env
from sidecar.errors import ConfigError

URL = "postgresql://u@h/db"


def test_minimal() -> None:
    s = settings_from_env({"DATABASE_URL": URL})
    assert s.database_url == URL and s.seed is None and s.worker_name
    assert s.nats_override == NatsOverride()


def test_original_worker_variables_register_a_consumer() -> None:
    s = settings_from_env(
        {
            "DATABASE_URL": URL,
            "STREAM_NAME": "WEBHOOKS",
            "SUBJECT": "webhooks.>",
            "QUEUE_GROUP": "webhook-workers",
            "CONSUMER_NAME": "worker-2",
            "BATCH_SIZE": "50",
            "NATS_URL": "nats://a:4222,nats://b:4222",
            "NATS_USER": "u",
            "NATS_PASS": "p",
        }
    )
    assert s.worker_name == "worker-2"  # CONSUMER_NAME names the instance
    assert s.seed is not None
    assert (s.seed.stream_name, s.seed.subject, s.seed.consumer_name, s.seed.batch_size) == (
        "WEBHOOKS",
        "webhooks.>",
        "webhook-workers",  # QUEUE_GROUP names the shared durable consumer
        50,
    )
    assert s.nats_override == NatsOverride("nats://a:4222,nats://b:4222", "u", "p")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": URL, "STREAM_NAME": "S"}, "STREAM_NAME and SUBJECT go together"),
        ({"DATABASE_URL": URL, "STREAM_NAME": "a.b", "SUBJECT": "x"}, "STREAM_NAME 'a.b'"),
        (
            {"DATABASE_URL": URL, "STREAM_NAME": "S", "SUBJECT": "x", "BATCH_SIZE": "ten"},
            "BATCH_SIZE must be a whole",
        ),
        ({"DATABASE_URL": URL, "STREAM_NAME": "S", "SUBJECT": "x", "BATCH_SIZE": "0"}, "between 1 and 10000"),
        ({"DATABASE_URL": URL, "STREAM_NAME": "S", "SUBJECT": "x", "QUEUE_GROUP": "g.1"}, "QUEUE_GROUP"),
        ({"DATABASE_URL": URL, "WORKER_NAME": "has space"}, "worker name"),
        ({"DATABASE_URL": URL, "OUTBOX_POLL_INTERVAL": "soon"}, "number of seconds"),
    ],
)
def test_bad_settings_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_env(env)


ROW = {
    "config_name": "default",
    "nats_url": "nats://db-host:4222",
    "nats_cluster_urls": ["nats://n2:4222"],
    "auth_type": "token",
    "nats_user": None,
    "nats_password": None,
    "auth_token": "s3cret",
    "auth_credentials_file": None,
    "auth_nkey_seed": None,
    "tls_enabled": False,
    "tls_ca_file": None,
    "tls_cert_file": None,
    "tls_key_file": None,
    "connect_timeout_seconds": 2.0,
    "request_timeout_seconds": 5.0,
    "reconnect_wait_seconds": 2.0,
    "max_reconnect_attempts": -1,
}


def test_row_to_connection_and_override() -> None:
    conn = nats_connection_from_row(ROW)
    assert conn.servers == ("nats://db-host:4222", "nats://n2:4222") and conn.token == "s3cret"
    assert "s3cret" not in repr(conn)
    over = nats_connection_from_row(ROW, NatsOverride("nats://x:1, nats://y:2", "alice", "pw"))
    assert over.servers == ("nats://x:1", "nats://y:2")
    assert (over.auth_type, over.user, over.password) == ("user_password", "alice", "pw")
    other = nats_connection_from_row({**ROW, "config_name": "eu"}, NatsOverride("nats://x:1"))
    assert other.servers[0] == "nats://db-host:4222"  # the override is for 'default' only
