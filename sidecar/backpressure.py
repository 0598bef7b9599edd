"""Back-pressure from PostgreSQL and ack deadlines: the decisions, without I/O.

A message is held by the consumer from the moment it arrives until its outcome is committed (not
merely queued for the recorder): it counts against the fetch window, and JetStream is told it is in
progress all that time, so that neither a slow endpoint, a queue at an endpoint's gate, nor a PostgreSQL
outage lets its ack wait run out and JetStream hand it out a second time. While outcomes cannot
be committed, no new messages are taken.
"""

from __future__ import annotations

MIN_KEEPALIVE = 0.2  # seconds: JetStream's ack wait is at least 1 s in practice; never spin faster


def keepalive_interval(ack_wait: float) -> float:
    """Seconds between in-progress signals for a held message: a third of the ack wait, so that a
    signal checked every half interval arrives by half the ack wait at the latest, leaving room for
    a busy event loop or one lost signal."""
    return max(MIN_KEEPALIVE, ack_wait / 3.0)


def keepalive_due(touched: float, now: float, interval: float) -> bool:
    """Is it time to tell JetStream again that the message received (or last signalled) at
    ``touched`` is in progress?"""
    return now - touched >= interval


PARKED_WINDOWS = 4  # windows of parked messages (see pull_size) fetched past at most


def pull_size(batch_size: int, held: int, outstanding: int, recording_failing: bool, parked: int = 0) -> int:
    """How many messages to ask JetStream for now (0: none).

    ``held`` counts every message of the consumer from its arrival until its outcome is committed.
    Two windows are held at most: ``batch_size`` sent (or being sent) and waiting for their COMMIT,
    which is what bounds the repeats after a crash (the consumer's send slots, taken right before
    the request and given back after the COMMIT), and up to ``batch_size`` more fetched ahead,
    not sent, so that a slot given back is filled at once rather than after a pull request's round
    trip. Nothing while recording fails: every message taken then would be delivered with no way to
    record it. Requests go in chunks of a quarter of the window, or for whatever is free when no
    pull request is open (so the last few slots are filled too).

    ``parked``: held messages that will not be sent from the window (being deferred, their retry
    row not yet committed; not those waiting for their endpoint's turn: counted out, they let one
    endpoint's backlog be fetched past its waiting room and deferred en masse). Up to
    PARKED_WINDOWS windows of them are fetched past: behind 64 messages for a slow endpoint, the
    window reached the next endpoint's messages only after each round of deferrals committed."""
    if recording_failing:
        return 0
    free = 2 * batch_size - outstanding - (held - min(parked, PARKED_WINDOWS * batch_size))
    if free >= max(1, batch_size // 4) or (free > 0 and outstanding == 0):
        return free
    return 0


def retry_room(batch_size: int, held: int, recording_failing: bool) -> int:
    """How many due retries to claim from PostgreSQL now: what the two windows of held messages
    leave (see pull_size; pull requests waiting on the server are not counted, so retries are not
    shut out by an idle stream), none while recording fails (the claim would be a write that cannot
    be followed by its outcome). The send slots bound what is sent, whichever way it came."""
    if recording_failing:
        return 0
    return max(0, 2 * batch_size - held)
