from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from sidecar.config import NatsConnection
from sidecar.jetstream import connect_options
from sidecar.outbox import (
    MAX_API_ERROR_ATTEMPTS,
    OutboxRow,
    classify,
    refusal,
    retry_delay,
    row_from_record,
)
from sidecar.validation import subject_matches

ROW = OutboxRow(1, "default", "a.b", b"{}", {}, "outbox-db-1", 0)


def test_row_from_record() -> None:
    row = row_from_record(
        {
            "outbox_id": 7,
            "config_name": "default",
            "webhook_id": None,
            "subject": "a.b",
            "payload": b'{"x": 1}',
            "headers": {"X-N": 5},
            "message_id": "m",
            "attempts": 2,
        }
    )
    assert row == OutboxRow(7, "default", "a.b", b'{"x": 1}', {"X-N": "5"}, "m", 2)


def test_retry_delay_grows_and_is_capped() -> None:
    assert [retry_delay(a) for a in (0, 1, 2, 3)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(30) == 60.0


@pytest.mark.parametrize(
    ("exc", "status", "fragment"),
    [
        (nats.js.errors.NoStreamResponseError(), "failed", "no JetStream stream"),
        (nats.errors.NoRespondersError(), "failed", "no JetStream stream"),
        (nats.errors.MaxPayloadError(), "failed", "payload too large"),
        (nats.errors.BadSubjectError(), "failed", "invalid subject"),
        (
            nats.js.errors.APIError(code=400, description="maximum payload exceeded"),
            "failed",
            "maximum payload",
        ),
        (
            nats.js.errors.APIError(code=503, description="resources exceeded"),
            "pending",
            "resources exceeded",
        ),
        (nats.errors.TimeoutError(), "pending", "TimeoutError"),
        (nats.errors.ConnectionClosedError(), "pending", "ConnectionClosedError"),
    ],
)
def test_classify(exc: BaseException, status: str, fragment: str) -> None:
    out = classify(ROW, exc, 1.5)
    assert out.status == status and fragment in (out.error or "")
    assert (out.delay > 0) == (status == "pending")


def test_api_errors_give_up_after_a_bound() -> None:
    row = OutboxRow(1, "default", "a.b", b"{}", {}, "m", MAX_API_ERROR_ATTEMPTS - 1)
    assert classify(row, nats.js.errors.APIError(code=503, description="x"), 0).status == "failed"


@pytest.mark.parametrize(
    ("subject", "headers", "message_id", "fragment"),
    [
        ("$JS.API.STREAM.DELETE.S", {}, "m", "reserved"),
        ("$KV.bucket.k", {}, "m", "reserved"),
        ("_INBOX.x", {}, "m", "reserved"),
        ("a.*", {}, "m", "subject"),
        ("a.b\n", {}, "m", "subject"),
        ("a.b", {"X-A\r\nNats-Expected-Stream": "S"}, "m", "header name"),
        ("a.b", {"X-A": "v\r\nNats-Expected-Stream: S"}, "m", "header value"),
        ("a.b", {}, "m\r\nNats-Expected-Stream: S", "message id"),
        ("a.b", {}, "", "message id"),
    ],
)
def test_rows_refused_before_publishing(
    subject: str, headers: dict[str, str], message_id: str, fragment: str
) -> None:
    out = refusal(OutboxRow(3, "default", subject, b"{}", headers, message_id, 0))
    assert out is not None and out.outbox_id == 3
    assert (out.status, out.delay, out.history) == ("failed", 0.0, False)
    assert (
        out.error is not None and out.error.startswith("refused before publishing") and fragment in out.error
    )


def test_valid_rows_are_published() -> None:
    assert refusal(ROW) is None
    assert (
        refusal(OutboxRow(1, "default", "a.b", b"{}", {"X-Tenant": "t1", "Auth": ""}, "outbox-db 1", 0))
        is None
    )


def test_connect_options() -> None:
    conn = NatsConnection(
        "default",
        ("nats://a:4222", "nats://b:4222"),
        auth_type="user_password",
        user="u",
        password="p",
        connect_timeout=3.0,
    )
    opts = connect_options(conn, "w1")
    assert opts["servers"] == ["nats://a:4222", "nats://b:4222"] and opts["dont_randomize"] is True
    assert (opts["user"], opts["password"], opts["connect_timeout"]) == ("u", "p", 3.0)
    assert "token" not in opts and "tls" not in opts
    nkey = connect_options(NatsConnection("x", ("tls://h:4222",), auth_type="nkey", nkey_seed="SUA"), "w")
    assert nkey["nkeys_seed_str"] == "SUA" and "tls" in nkey


@pytest.mark.parametrize("exc", [nats.js.errors.NoStreamResponseError(), nats.errors.NoRespondersError()])
def test_no_stream_yet_for_a_registered_subject_is_retried(exc: BaseException) -> None:
    """The registry has a stream for the subject and the sidecar creates it (NATS just came back
    after losing its memory streams, say): the row waits for it instead of failing for good."""
    out = classify(ROW, exc, 1.5, registered=True)
    assert out.status == "pending" and out.delay > 0
    assert "registered" in (out.error or "")


@pytest.mark.parametrize(
    ("subject_filter", "subject", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*.b.>", "x.b.y", True),
        ("*.b.>", "x.c.y", False),
        ("a.b.c", "a.b", False),
    ],
)
def test_subject_matches(subject_filter: str, subject: str, matches: bool) -> None:
    assert subject_matches(subject_filter, subject) is matches
