"""The pure decisions of back-pressure and identity: keepalive timing, when to fetch, replay ids."""

from __future__ import annotations

import pytest

from sidecar.backpressure import (
    MIN_KEEPALIVE,
    keepalive_due,
    keepalive_interval,
    pull_size,
    retry_room,
)
from sidecar.identity import MAX_ATTEMPT_BASE, REPLAY_ATTEMPTS_HEADER, REPLAY_ID_HEADER, replay_identity
from sidecar.lifecycle import Job


@pytest.mark.parametrize("ack_wait", [1.0, 2.0, 3.0, 30.0, 3600.0])
def test_keepalive_reaches_jetstream_well_within_the_ack_wait(ack_wait: float) -> None:
    interval = keepalive_interval(ack_wait)
    # Checked every half interval: the signal goes out at most 1.5 intervals after the last one.
    assert 1.5 * interval <= ack_wait / 2
    assert interval >= MIN_KEEPALIVE


def test_keepalive_interval_never_spins() -> None:
    assert keepalive_interval(0.01) == MIN_KEEPALIVE


def test_keepalive_due_counts_from_receipt_or_the_last_signal() -> None:
    assert not keepalive_due(touched=100.0, now=100.5, interval=1.0)
    assert keepalive_due(touched=100.0, now=101.0, interval=1.0)


def test_pull_size_fetches_past_parked_messages_up_to_four_windows() -> None:
    # 32 held, 16 of them being deferred or waiting for their endpoint: 16 more fetched
    assert pull_size(16, held=32, outstanding=0, recording_failing=False, parked=16) == 16
    # parked beyond four windows count again
    assert pull_size(16, held=100, outstanding=0, recording_failing=False, parked=100) == 0
    assert pull_size(16, held=80, outstanding=0, recording_failing=False, parked=80) == 16
    assert pull_size(16, held=32, outstanding=0, recording_failing=True, parked=32) == 0


def test_pull_size_asks_for_free_slots_in_chunks() -> None:
    assert pull_size(32, held=0, outstanding=0, recording_failing=False) == 64
    assert pull_size(32, held=60, outstanding=0, recording_failing=False) == 4  # fill up
    assert pull_size(32, held=40, outstanding=17, recording_failing=False) == 0  # < a quarter
    assert pull_size(32, held=40, outstanding=8, recording_failing=False) == 16
    assert pull_size(1, held=0, outstanding=0, recording_failing=False) == 2


def test_two_windows_are_held_at_most() -> None:
    # One window sent and waiting for the COMMIT (the send slots bound what a crash repeats), one
    # fetched ahead and not sent.
    assert pull_size(10, held=20, outstanding=0, recording_failing=False) == 0
    assert pull_size(10, held=15, outstanding=0, recording_failing=False) == 5
    assert pull_size(10, held=25, outstanding=0, recording_failing=False) == 0  # batch_size lowered
    # PostgreSQL slow or away: none is taken while recording fails.
    assert pull_size(10, held=0, outstanding=0, recording_failing=True) == 0


def test_retries_are_claimed_for_free_slots_only_while_recording_works() -> None:
    assert retry_room(10, held=3, recording_failing=False) == 17
    assert retry_room(10, held=3, recording_failing=True) == 0
    assert retry_room(10, held=15, recording_failing=False) == 5  # a stream backlog leaves retries room
    assert retry_room(10, held=22, recording_failing=False) == 0  # batch_size lowered meanwhile


def test_replay_identity() -> None:
    assert replay_identity(None) == (None, 0)
    assert replay_identity({"Nats-Msg-Id": "x"}) == (None, 0)
    assert replay_identity({REPLAY_ID_HEADER: "evt-1", REPLAY_ATTEMPTS_HEADER: "3"}) == ("evt-1", 3)
    # Anyone publishing can write these headers: a number that is not one counts as none.
    for bad in ("-1", "3.5", "x", "", "١٢", "99999999"):
        assert replay_identity({REPLAY_ID_HEADER: "e", REPLAY_ATTEMPTS_HEADER: bad}) == ("e", 0), bad
    assert replay_identity({REPLAY_ATTEMPTS_HEADER: "9999999"}) == (None, min(9999999, MAX_ATTEMPT_BASE))


def job(headers: dict[str, str] | None) -> Job:
    return Job(raw=b"{}", nats_headers=headers, stream="S", consumer="c", seq=7, subject="s.a")


def test_message_id_prefers_event_id_then_the_replayed_original_then_nats_msg_id() -> None:
    replayed = {REPLAY_ID_HEADER: "orig", "Nats-Msg-Id": "replay-abc-1-1"}
    with_event = job(replayed)
    with_event.event_id = "evt"
    assert with_event.message_id == "evt"
    assert job(replayed).message_id == "orig"
    assert job({"Nats-Msg-Id": "m"}).message_id == "m"
    assert job(None).message_id == "stream-S-7"


def test_message_id_that_breaks_the_rules_is_replaced_by_the_stream_and_sequence() -> None:
    """issue 19, defect 7: ids from NATS headers obey the message-id rules before they become the
    webhook-id, or stream-<stream>-<seq> replaces them; another message's stream-... id is no id."""
    for bad in ("a\x00b", "a\x01b", "x" * 8000, " lead", "trail ", ""):
        assert job({"Nats-Msg-Id": bad}).message_id == "stream-S-7", repr(bad[:20])
        assert job({REPLAY_ID_HEADER: bad}).message_id == "stream-S-7", repr(bad[:20])
    for claim in ("stream-S-8", "STREAM-S-7x"):
        assert job({"Nats-Msg-Id": claim}).message_id == "stream-S-7", claim
    # A replayed dead letter is the dead-lettered message again: its stream-... id stays.
    assert job({REPLAY_ID_HEADER: "stream-S-2"}).message_id == "stream-S-2"
    assert job({"Nats-Msg-Id": "stream-S-7"}).message_id == "stream-S-7"
    assert job({"Nats-Msg-Id": "x" * 256}).message_id == "x" * 256
