"""A replayed dead letter's identity: the message id receivers saw and the attempts made before.

``rule_nats_replay_dead_letter`` publishes the dead letter again under a Nats-Msg-Id of its own (to
pass JetStream's duplicate window) and says in two headers what it was; the consumer reads them
here, for the message id (``lifecycle.Job.message_id``), attempt numbers and routing by subject.
"""

from __future__ import annotations

from collections.abc import Mapping

REPLAY_ID_HEADER = "Rule-Nats-Message-Id"  # set by rule_nats_replay_dead_letter: the original message id
REPLAY_ATTEMPTS_HEADER = "Rule-Nats-Attempts"  # and the attempts made before the replay
MAX_ATTEMPT_BASE = 1_000_000  # a header is text anyone publishing may write: keep the number sane


def replay_identity(headers: Mapping[str, str] | None) -> tuple[str | None, int]:
    """The original message id and the attempts made before, for a replayed dead letter (None, 0
    for any other message). Replays publish under a Nats-Msg-Id of their own, to pass JetStream's
    duplicate window; receivers see the original id and attempt numbers go on from the old ones."""
    if not headers:
        return None, 0
    original = headers.get(REPLAY_ID_HEADER) or None
    raw = headers.get(REPLAY_ATTEMPTS_HEADER, "")
    base = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 7 else 0
    return original, min(base, MAX_ATTEMPT_BASE)
