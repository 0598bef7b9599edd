"""Every case of tests/security/cases.py against sidecar.validation (the SQL and PL/Python runs are
separate), plus the redaction of URLs in what the sidecar logs and writes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar import validation
from sidecar.errors import InvalidInput, WorkerError
from tests.security.cases import CASES, KINDS, Case

CHECKS: dict[str, Callable[[str], str]] = {
    "subject": validation.check_subject,
    "subject_filter": validation.check_subject_filter,
    "header_name": validation.check_header_name,
    "header_value": validation.check_header_value,
    "message_id": validation.check_message_id,
    "caller_message_id": validation.check_caller_message_id,
    "nats_header_name": validation.check_nats_header_name,
    "webhook_url": validation.check_webhook_url,
    "nats_url": validation.check_nats_url,
}


def test_every_kind_has_a_check() -> None:
    assert set(CHECKS) == set(KINDS)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}:{c.value[:40]!r}" for c in CASES])
def test_case(case: Case) -> None:
    check = CHECKS[case.kind]
    if case.valid:
        assert check(case.value) == case.value, case.why
    else:
        with pytest.raises(InvalidInput) as info:
            check(case.value)
        assert str(info.value), case.why


def test_invalid_input_is_a_worker_error() -> None:
    assert issubclass(InvalidInput, WorkerError)


@pytest.mark.parametrize(
    ("subject", "reserved"),
    [
        ("$JS.API.STREAM.DELETE.X", True),
        ("$", True),
        ("_INBOX.x", True),
        ("_INBOX", True),
        ("_INBOXES.x", False),
        ("x.$JS", False),
        ("webhooks.orders", False),
    ],
)
def test_is_reserved_subject(subject: str, reserved: bool) -> None:
    assert validation.is_reserved_subject(subject) is reserved


def test_messages_say_what_is_wrong_and_hide_secrets() -> None:
    with pytest.raises(InvalidInput, match="reserved"):
        validation.check_subject("$JS.API.STREAM.DELETE.X")
    with pytest.raises(InvalidInput, match=r"'a\\nb'"):
        validation.check_subject("a\nb")
    with pytest.raises(InvalidInput) as info:
        validation.check_nats_url("nats://user:s3cret@h:4222\n")
    assert "s3cret" not in str(info.value)
    with pytest.raises(InvalidInput) as info:
        validation.check_webhook_url("https://h/x?token=s3cret x")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:pw@h:4222", "nats://user:***@h:4222"),
        ("nats://tok@h:4222", "nats://***@h:4222"),
        ("tls://u:p@a@h:4222/", "tls://u:***@h:4222/"),
        ("nats://h:4222", "nats://h:4222"),
        ("https://h/p?token=x", "https://h/p?..."),
        ("https://h?token=x#frag", "https://h?..."),
        ("https://u:p@h/p?q", "https://u:***@h/p?..."),
        ("https://h/p#a?b", "https://h/p#a?..."),
        ("postgresql://sidecar:pw@db/app?sslmode=require", "postgresql://sidecar:***@db/app?..."),
        ("not a url", "not a url"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert validation.redact_url(url) == shown


def test_redact_urls_in_text() -> None:
    text = "cannot connect to NATS (default: nats://u:s3cret@h:4222, nats://tok@h2): 'https://x/y?k=s3cret'"
    out = validation.redact_urls_in(text)
    assert "s3cret" not in out and "tok" not in out
    assert out == "cannot connect to NATS (default: nats://u:***@h:4222, nats://***@h2): 'https://x/y?...'"
    assert validation.redact_urls_in("no url here") == "no url here"
