"""Reading messages, building requests, classifying answers, retry decisions (no servers)."""

from __future__ import annotations

import random

import pytest

from sidecar.delivery import Envelope, Refused, build_request, check_url, classify_status, parse_envelope
from sidecar.registry import RetryPolicy, WebhookDef
from sidecar.retry import backoff, decide, parse_retry_after


def env(headers: tuple[tuple[str, str], ...] = (), url: str | None = "https://example.com/h") -> Envelope:
    return Envelope(url, None, None, headers, b"{}")


def test_data_keeps_its_exact_bytes() -> None:
    raw = b'{"webhook_url": "https://e.com/x", "data": {"b": 1.10, "a": "\\u00e9"}, "headers": {"X-A": "1"}}'
    e = parse_envelope(raw)
    assert e.body == b'{"b": 1.10, "a": "\\u00e9"}'
    assert e.headers == (("X-A", "1"),)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"data": 1}', "missing_webhook_url"),
        (b'{"webhook_url": 5, "data": 1}', "invalid_webhook_url"),
        (b'{"webhook_id": "7", "data": 1}', "invalid_webhook_id"),
        (b'{"webhook_url": "https://e.com", "headers": [1]}', "invalid_headers"),
        (b'{"webhook_url": "https://e.com", "headers": {"X": {"a": 1}}}', "invalid_headers"),
        (b'{"webhook_url": "https://e.com"} trailing', "invalid_json"),
        # event_id is sent as the webhook-id header
        (b'{"webhook_url": "https://e.com", "event_id": "e\\r\\nX-Injected: 1"}', "invalid_header"),
        (b'{"webhook_url": "https://e.com", "event_id": "' + b"e" * 257 + b'"}', "invalid_header"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(Refused) as info:
        parse_envelope(raw)
    assert info.value.reason == reason


INJECTION = [
    ("X-Evil", "a\r\nX-Injected: 1"),
    ("X-Evil\n", "x"),  # a trailing newline: `$` in a pattern matches before it, fullmatch does not
    ("X-Evil", "a\x00b"),
    ("X-Evil", "x" * 8193),
    ("X-Evil", "a\nb"),
    ("X-Evil", "a\rb"),
    ("X-Evil\r\nHost", "x"),
    ("X Evil", "x"),
    ("X:Evil", "x"),
    ("", "x"),
    ("X-\u00e9", "x"),
]


@pytest.mark.parametrize(("name", "value"), INJECTION)
def test_header_injection_is_refused(name: str, value: str) -> None:
    with pytest.raises(Refused) as info:
        build_request(env(((name, value),)), None)
    assert info.value.reason == "invalid_header"


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "content-length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Proxy-Authorization",
        "webhook-signature",
        "Webhook-Id",
        "WEBHOOK-TIMESTAMP",
    ],
)
def test_transport_and_signature_headers_are_dropped_and_reported(name: str) -> None:
    req = build_request(env(((name, "forged"), ("X-Keep", "yes"))), None)
    assert name in req.dropped_headers
    assert all(k.lower() != name.lower() for k in req.headers)
    assert req.headers["X-Keep"] == "yes"


def test_registry_headers_win_over_message_headers() -> None:
    hook = WebhookDef(1, "w", "https://example.com/r", headers=(("Authorization", "Bearer real"),))
    req = build_request(env((("authorization", "Bearer forged"), ("Content-Type", "text/plain"))), hook)
    assert req.url == "https://example.com/r"
    assert [v for k, v in req.headers.items() if k.lower() == "authorization"] == ["Bearer real"]
    assert req.headers["Content-Type"] == "text/plain"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/", "scheme"),
        ("https:///path", "no host"),
        ("/relative", "scheme"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://user@example.com/", "credentials"),
        ("https://example.com/a b", "whitespace"),
        ("https://example.com/\r\nx", "whitespace"),
        ("https://example.com/x\n", "whitespace"),
        ("https://example.com/a\x00b", "control"),
        ("https://example.com/\x7f", "control"),
        ("https://example.com/" + "a" * 2029, "longer than 2048"),
    ],
)
def test_bad_urls_have_clear_reasons(url: str, fragment: str) -> None:
    with pytest.raises(Refused) as info:
        check_url(url)
    assert info.value.reason == "invalid_webhook_url"
    assert fragment in info.value.detail


def test_classify_status() -> None:
    assert [classify_status(s) for s in (200, 204, 301, 400, 404, 408, 410, 429, 500, 503)] == [
        "delivered",
        "delivered",
        "permanent",
        "permanent",
        "permanent",
        "retry",
        "permanent",
        "retry",
        "retry",
        "retry",
    ]


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, initial_seconds=1.0, max_backoff_seconds=8.0)
    rand = random.Random(3)
    delays = [backoff(n, policy, rand) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        base = min(8.0, 2 ** (n - 1))
        assert base * 0.5 <= d <= base


def test_retry_after_forms() -> None:
    assert parse_retry_after("120", 0.0) == 120.0
    assert parse_retry_after("99999999", 0.0) == 86400.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0) == 0.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


def test_decide_gives_up_on_attempts_and_age() -> None:
    policy = RetryPolicy(max_attempts=3, initial_seconds=1.0, max_backoff_seconds=10.0, max_age_seconds=100.0)
    assert decide(1, 0.0, 0.0, policy).retry
    assert not decide(3, 0.0, 0.0, policy).retry
    late = decide(1, 0.0, 99.9, policy)
    assert not late.retry and "older" in (late.reason or "")
    assert decide(1, 0.0, 0.0, policy, retry_after=50.0).delay == 50.0
