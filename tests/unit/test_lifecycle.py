"""The decisions of a message's life (sidecar.lifecycle), without servers."""

from __future__ import annotations

import json
import random

import pytest

from sidecar.delivery import Response
from sidecar.endpoints import HELD_SECONDS
from sidecar.lifecycle import (
    GONE_ERROR,
    Dead,
    Defer,
    Delivered,
    Job,
    Prepared,
    Retry,
    classify,
    outcome_of,
    prepare,
)
from sidecar.registry import DeliverySettings, Registry, RetryPolicy, WebhookDef
from sidecar.rows import RetryRow, RetryUpdate

NOW = 1_700_000_000.0
POLICY = RetryPolicy(max_attempts=3, initial_seconds=1.0, max_backoff_seconds=60.0, max_age_seconds=3600.0)
HOOK = WebhookDef(webhook_id=5, webhook_name="h", url="https://hooks.example/in")
REGISTRY = Registry(webhooks={5: HOOK, 6: WebhookDef(6, "off", "https://x.example/", enabled=False)})


def job(body: object, **kw: object) -> Job:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Job(raw=raw, nats_headers=None, stream="S", consumer="c", seq=9, subject="s.a", **kw)  # type: ignore[arg-type]


def prepared(j: Job) -> Prepared:
    p = prepare(j, REGISTRY, POLICY)
    assert isinstance(p, Prepared), p
    return p


def test_prepare_builds_the_request_and_learns_the_identity() -> None:
    j = job({"webhook_id": 5, "event_id": "evt-1", "data": {"a": 1}})
    p = prepared(j)
    assert p.request.url == HOOK.url and p.gate_key == 5 and p.webhook is HOOK
    assert j.message_id == "evt-1" and j.webhook_id == 5 and j.url == HOOK.url
    assert not j.recorded  # nothing on its way to PostgreSQL yet
    bare = prepared(job({"webhook_url": "https://bare.example:8443/x", "data": 1}))
    assert bare.gate_key == "bare.example:8443" and bare.webhook is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "invalid_json"),
        ({"webhook_id": 99, "data": 1}, "unknown_webhook"),
        ({"data": 1}, "missing_webhook_url"),
        ({"webhook_url": "https://a.example/", "event_id": "a\nb", "data": 1}, "invalid_header"),
    ],
)
def test_what_can_never_be_delivered_is_a_dead_letter_at_once(body: object, reason: str) -> None:
    verdict = prepare(job(body), REGISTRY, POLICY)
    assert isinstance(verdict, Dead) and verdict.reason == reason and not verdict.attempted


def test_oversized_payloads_and_disabled_endpoints() -> None:
    small = Registry(delivery=DeliverySettings(max_payload_bytes=10))
    verdict = prepare(job({"webhook_url": "https://a.example/", "data": "x" * 20}), small, POLICY)
    assert isinstance(verdict, Dead) and verdict.reason == "payload_too_large"
    held = prepare(job({"webhook_id": 6, "data": 1}), REGISTRY, POLICY)
    assert isinstance(held, Defer) and held.delay == HELD_SECONDS and "webhook disabled" in held.why


def resp(status: int | None, error: str | None = None, retry_after: str | None = None) -> Response:
    return Response(status=status, latency_ms=3.0, error=error, body="b", retry_after=retry_after)


def test_classify_each_kind_of_response() -> None:
    j = job({"webhook_id": 5, "data": 1})
    p = prepared(j)
    rand = random.Random(1)
    ok = classify(resp(204), j, p, NOW, rand)
    assert ok.verdict == Delivered(204, 3.0) and ok.gate == "ok"
    again = classify(resp(503), j, p, NOW, rand)
    assert isinstance(again.verdict, Retry) and again.gate == "fail" and again.verdict.error == "HTTP 503"
    assert NOW < again.verdict.next_ts <= NOW + 1.0
    waited = classify(resp(429, retry_after="120"), j, p, NOW, rand)
    assert isinstance(waited.verdict, Retry) and waited.verdict.next_ts >= NOW + 120
    gone = classify(resp(410), j, p, NOW, rand)
    assert isinstance(gone.verdict, Retry) and gone.gate == "gone" and gone.verdict.error == GONE_ERROR
    bad = classify(resp(404), j, p, NOW, rand)
    assert isinstance(bad.verdict, Dead) and bad.verdict.reason == "http_4xx" and bad.gate == "neutral"
    moved = classify(resp(301), j, p, NOW, rand)
    assert isinstance(moved.verdict, Dead) and moved.verdict.reason == "http_3xx_redirect"
    down = classify(resp(None, error="connection failed: refused"), j, p, NOW, rand)
    assert isinstance(down.verdict, Retry) and down.verdict.error == "connection failed: refused"
    blocked = classify(Response(None, 0.1, "10.0.0.1 is private", blocked="private"), j, p, NOW, rand)
    assert isinstance(blocked.verdict, Dead) and blocked.verdict.reason == "ssrf_blocked"
    assert blocked.gate is None and not blocked.verdict.attempted


def test_a_410_from_a_bare_url_is_permanent() -> None:
    j = job({"webhook_url": "https://bare.example/x", "data": 1})
    verdict = classify(resp(410), j, prepared(j), NOW).verdict
    assert isinstance(verdict, Dead) and verdict.reason == "http_4xx"


def test_the_last_allowed_attempt_is_dead_lettered() -> None:
    j = job({"webhook_id": 5, "data": 1}, attempts_done=2, first_attempt_at=NOW - 10)
    verdict = classify(resp(500), j, prepared(j), NOW).verdict
    assert isinstance(verdict, Dead) and verdict.reason == "retries_exhausted" and verdict.attempted
    assert verdict.error.startswith("HTTP 500; ")


def test_rows_of_a_delivery_from_the_retry_table_continue_a_replay() -> None:
    j = job(
        {"webhook_id": 5, "event_id": "e", "data": 1}, attempts_done=2, retry_id=77, first_attempt_at=NOW - 5
    )
    j.nats_headers = {"Rule-Nats-Message-Id": "e", "Rule-Nats-Attempts": "4"}
    prepared(j)
    out = outcome_of(j, Delivered(200, 1.5), NOW, "w1", notes="n")
    assert out.attempt is not None and out.retry_delete == 77 and out.dead_letter is None
    row = out.attempt
    assert (row.message_id, row.attempt, row.outcome, row.http_status, row.webhook_id, row.worker_name) == (
        "e", 7, "delivered", 200, 5, "w1",
    )  # fmt: skip
    assert row.url == HOOK.url and row.notes == "n" and row.next_attempt_at is None


def test_a_failed_first_attempt_inserts_a_retry_row_a_later_one_updates_it() -> None:
    j = job({"webhook_id": 5, "data": 1})
    prepared(j)
    first = outcome_of(j, Retry(NOW + 30, "HTTP 500", 500, 2.0, "oops"), NOW, "w")
    assert isinstance(first.retry_insert, RetryRow) and first.retry_update is None
    assert first.retry_insert.attempts == 1 and first.retry_insert.last_error == "HTTP 500"
    assert (
        first.attempt is not None
        and first.attempt.outcome == "retry"
        and first.attempt.response_body == "oops"
    )
    j.retry_id, j.attempts_done = 3, 1
    later = outcome_of(j, Retry(NOW + 60, "HTTP 502", 502, 2.0, None), NOW, "w")
    assert later.retry_update == RetryUpdate(3, 2, later.retry_update.next_attempt_at, "HTTP 502")  # type: ignore[union-attr]


def test_a_deferral_uses_no_attempt_and_writes_no_attempt_row() -> None:
    j = job({"webhook_id": 5, "data": 1}, attempts_done=1)
    out = outcome_of(j, Defer(10.0, "rate limit"), NOW, "w")
    assert out.attempt is None and out.retry_insert is not None
    assert out.retry_insert.attempts == 1 and out.retry_insert.last_error == "deferred: rate limit"


def test_a_dead_letter_counts_the_attempt_only_when_one_was_made() -> None:
    j = job({"webhook_id": 5, "data": 1}, attempts_done=2, retry_id=8, first_attempt_at=NOW - 60)
    prepared(j)
    out = outcome_of(j, Dead("retries_exhausted", "HTTP 500; 3 attempts", True, 500, 1.0, "b"), NOW, "w")
    assert out.dead_letter is not None and out.dead_letter.attempts == 3 and out.retry_delete == 8
    assert out.dead_letter.last_attempt_at is not None and out.attempt is not None
    assert out.attempt.error == "retries_exhausted: HTTP 500; 3 attempts"
    never = outcome_of(job(b"{"), Dead("invalid_json", "x", attempted=False), NOW, "w")
    assert never.dead_letter is not None and never.dead_letter.attempts == 0
    assert (
        never.dead_letter.first_attempt_at is None
        and never.attempt is not None
        and never.attempt.attempt == 1
    )
