"""Secrets that reach the process (NATS_URL with user:password@, DATABASE_URL, webhook URLs with
tokens in the query) are redacted wherever the sidecar prints them."""

from __future__ import annotations

import json
import logging

from sidecar.config import NatsOverride, settings_from_env
from sidecar.logs import JsonFormatter, TextFormatter


def record(msg: str, *args: object) -> logging.LogRecord:
    rec = logging.LogRecord("sidecar.x", logging.WARNING, __file__, 1, msg, args, None)
    rec.action = "test"
    return rec


def test_log_formatters_redact_urls_in_any_line() -> None:
    rec = record("driver said: %s", "cannot reach nats://u:s3cret@h:4222 via https://h/x?token=s3cret")
    text = TextFormatter().format(rec)
    assert "s3cret" not in text and "nats://u:***@h:4222" in text and "https://h/x?..." in text
    out = json.loads(JsonFormatter().format(rec))
    assert "s3cret" not in out["msg"] and out["action"] == "test"


def test_nats_url_from_the_environment_is_kept_but_not_shown() -> None:
    s = settings_from_env(
        {
            "DATABASE_URL": "postgresql://sidecar:dbs3cret@db/app",
            "NATS_URL": "nats://user:s3cret@a:4222,nats://tok3n@b:4222",
            "NATS_USER": "u",
            "NATS_PASS": "p4ss",
        }
    )
    assert s.nats_override.url == "nats://user:s3cret@a:4222,nats://tok3n@b:4222"  # used as given
    shown = repr(s)
    for secret in ("s3cret", "tok3n", "p4ss", "dbs3cret"):
        assert secret not in shown, shown
    assert "nats://user:***@a:4222" in repr(NatsOverride(url="nats://user:s3cret@a:4222"))
