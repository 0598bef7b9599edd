"""Rows of the registry tables to frozen dataclasses (pure)."""

from __future__ import annotations

import base64
import ipaddress

from sidecar.registry import RetryPolicy, keys_from_rows, settings_from_row, webhook_from_row
from sidecar.ssrf import parse_networks

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def webhook_row(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "webhook_id": 7, "webhook_name": "orders", "url": "https://o.example/h", "method": "PUT",
        "headers": {"Authorization": "Bearer x"}, "timeout_seconds": 2.5, "retry_max_attempts": 3,
        "retry_initial_seconds": None, "retry_max_backoff_seconds": 60.0, "retry_max_age_seconds": None,
        "enabled": True, "allow_networks": [ipaddress.ip_network("10.1.0.0/16")], "https_only": True,
        "max_concurrency": 4, "rate_limit_per_second": 12.5, "circuit_failure_threshold": 7,
        "circuit_open_seconds": 9.0, "disable_after_seconds": None, "disabled_reason": None,
    }  # fmt: skip
    row.update(over)
    return row


def test_webhook_row_with_policy_columns_and_keys() -> None:
    keys = keys_from_rows([{"secret_id": 1, "webhook_id": 7, "secret": SECRET, "expires_at": 99.0}])[7]
    w = webhook_from_row(webhook_row(), keys)
    assert (w.method, w.timeout_seconds, w.headers) == ("PUT", 2.5, (("Authorization", "Bearer x"),))
    assert w.allow_networks == parse_networks("10.1.0.0/16") and w.https_only
    limits = w.limits
    assert (limits.max_concurrency, limits.rate_per_second, limits.failure_threshold) == (4, 12.5, 7)
    assert (limits.open_seconds, limits.disable_after_seconds) == (9.0, None)
    assert w.keys[0].key == b"k" * 32 and w.keys[0].expires_at == 99.0
    policy = w.policy(RetryPolicy(max_attempts=8, initial_seconds=1.0, max_backoff_seconds=3600.0))
    assert (policy.max_attempts, policy.initial_seconds, policy.max_backoff_seconds) == (3, 1.0, 60.0)


def test_malformed_secrets_are_skipped() -> None:
    rows = [
        {"secret_id": 1, "webhook_id": 7, "secret": "whsec_c2hvcnQ=", "expires_at": None},  # 5 bytes
        {"secret_id": 2, "webhook_id": 7, "secret": SECRET, "expires_at": None},
    ]
    assert [k.secret_id for k in keys_from_rows(rows)[7]] == [2]


def test_delivery_settings_add_the_environment_allow_list() -> None:
    env = parse_networks("127.0.0.0/8")
    s = settings_from_row(
        {
            "allow_networks": [ipaddress.ip_network("10.0.0.0/8")],
            "https_only": True,
            "max_payload_bytes": 500,
        },
        env,
    )
    assert s.policy.allow == parse_networks("127.0.0.0/8,10.0.0.0/8")
    assert s.policy.https_only and s.max_payload_bytes == 500
    missing = settings_from_row(None, env)  # no row (a database older than 0004): defaults and the env
    assert missing.policy.allow == env and not missing.policy.https_only
