"""The relay's side of issue 19 (pure): no Nats-* header but Nats-Msg-Id reaches JetStream, one
Nats-Msg-Id per message, and a duplicate PubAck counts only for the same message."""

from __future__ import annotations

import pytest

from sidecar.duplicates import Stored, mismatch
from sidecar.outbox import OutboxRow, nats_headers, refusal


def row(headers: dict[str, str], message_id: str = "outbox-i-1-abc") -> OutboxRow:
    return OutboxRow(1, "default", "a.b", b'{"x": 1}', headers, message_id, 0)


@pytest.mark.parametrize(
    "name", ["Nats-Rollup", "nats-expected-stream", "NATS-TTL", "Nats-Expected-Last-Sequence"]
)
def test_a_row_with_a_nats_control_header_is_refused(name: str) -> None:
    out = refusal(row({name: "all"}))
    assert out is not None and out.status == "failed" and not out.history
    assert "NATS control header" in (out.error or "")


def test_own_headers_and_nats_msg_id_pass() -> None:
    assert refusal(row({"X-Nats-Rollup": "1", "Nats-Msg-Id": "ignored"})) is None


def test_the_rows_own_id_is_the_only_nats_msg_id() -> None:
    assert nats_headers(row({"nats-msg-id": "other", "X-A": "1"})) == {
        "X-A": "1",
        "Nats-Msg-Id": "outbox-i-1-abc",
    }


SAME = Stored("a.b", "outbox-i-1-abc", b'{"x": 1}')


@pytest.mark.parametrize(
    ("stored", "says"),
    [
        (SAME, None),
        (Stored("a.c", "outbox-i-1-abc", b'{"x": 1}'), "subject 'a.c'"),
        (Stored("a.b", "outbox-i-1-abc", b'{"x": 2}'), "payload sha256"),
        (Stored("a.b", None, b'{"x": 1}'), "Nats-Msg-Id None"),
        (None, "no longer in the stream"),
    ],
)
def test_a_duplicate_is_published_only_when_the_stored_message_is_this_one(
    stored: Stored | None, says: str | None
) -> None:
    r = row({})
    why = mismatch(r.subject, r.message_id, r.payload, "S", 7, stored)
    if says is None:
        assert why is None
    else:
        assert why is not None and says in why and "stream S sequence 7" in why
