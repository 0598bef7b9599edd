"""A duplicate PubAck for an outbox row is checked against the message JetStream kept.

JetStream de-duplicates by Nats-Msg-Id per stream, and any publisher of the stream can use any
id. A PubAck with ``duplicate: true`` only says that *some* message with this id is in the
stream: the relay's own earlier publish (a relay killed before its COMMIT), or another
publisher's message. Marking the row published on the flag alone let a publisher that used the
id first make the event vanish (issue 19, defect 2). So the relay reads the stored message
(``$JS.API.STREAM.MSG.GET``) and compares subject, Nats-Msg-Id and payload: the same message is
published; another one, or one that is gone, fails the row with the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import nats.js.errors


@dataclass(frozen=True, slots=True)
class Stored:
    """What JetStream holds at the sequence a duplicate PubAck named (None: nothing any more)."""

    subject: str
    message_id: str | None
    data: bytes


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def mismatch(
    subject: str, message_id: str, payload: bytes, stream: str, seq: int, stored: Stored | None
) -> str | None:
    """None when the stored message is this one, else why not (pure: the failed row's error)."""
    where = f"stream {stream} sequence {seq}"
    if stored is None:
        return (
            f"duplicate Nats-Msg-Id {message_id!r}: JetStream says {where} has it, and that message is no "
            "longer in the stream, so it cannot be verified to be this event; see docs/publishing.md"
        )
    differs = []
    if stored.subject != subject:
        differs.append(f"subject {stored.subject!r}")
    if stored.message_id != message_id:
        differs.append(f"Nats-Msg-Id {stored.message_id!r}")
    if stored.data != payload:
        differs.append(f"payload sha256 {digest(stored.data)}... (this event's: {digest(payload)}...)")
    if not differs:
        return None
    return (
        f"duplicate Nats-Msg-Id {message_id!r}: another message holds this id at {where} ("
        + ", ".join(differs)
        + "); JetStream dropped this event. Callers' ids are shared by every publisher of the stream: "
        "use an id of your own (docs/publishing.md)"
    )


async def fetch(client: Any, stream: str, seq: int, wait_s: float) -> Stored | None:
    """The message at ``seq``, None when the stream no longer has it. Other errors (timeouts, a
    lost connection) propagate: the row stays pending and is tried again."""
    jsm = client.jsm(timeout=wait_s)
    try:
        raw = await jsm.get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return None
    except nats.js.errors.APIError as exc:
        if exc.err_code in (10037, 10059):  # no message found / stream not found
            return None
        raise
    headers = raw.headers or {}
    return Stored(
        subject=str(raw.subject), message_id=headers.get("Nats-Msg-Id"), data=bytes(raw.data or b"")
    )
