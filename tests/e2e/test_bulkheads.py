"""Endpoints that cannot hurt each other (issue 19): a bulkhead per endpoint, a circuit for the
endpoint and not for one event, unknown webhooks looked up before dead-lettering, bounds that hold.

The sidecar runs as a subprocess logged in as rule_nats_worker; every receiver is on loopback.
Timing figures are recorded with record_property (``pytest --junitxml``); the assertions are on
counts and ordering, with bounds generous enough for a loaded machine.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import psycopg
import pytest

from tests.e2e.conftest import Sidecar, scalar, wait_until
from tests.e2e.test_delivery import configure, wait_ready
from tests.e2e.test_delivery_ops import publish_raw
from tests.e2e.test_safety import add_webhook, envelope
from tests.support.receiver import Receiver, Request, Response
from tests.support.stack import NatsServer


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def ids(requests: list[Request], path: str) -> list[int]:
    return [int(json.loads(r.body)["i"]) for r in requests if r.path == path]


SLOW = {
    # the other endpoint: answers in 2 s | drips its 3-byte body at 1 byte/s | never answers in time
    "answers_in_2s": Response(delay=2.0),
    "drips": Response(body=b"ok!", drip=1.0),
    "times_out": Response(delay=5.0),
}


@pytest.mark.parametrize("behaviour", list(SLOW))
def test_a_slow_endpoint_does_not_hold_back_another(
    behaviour: str,
    record_property: Callable[[str, object], None],
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """Defect 1: with batch_size 8, ten messages for a slow endpoint took every send slot and 50 for
    another endpoint waited until the slow answers came (>= 2 s). Now the slow endpoint holds its
    share and the others are sent at once: all 50 arrive before the slow endpoint's first answer."""
    configure(db, "BULK", "bulk", batch_size=8, retry_initial_seconds=60, retry_max_backoff_seconds=60)
    timeout = 2 if behaviour == "times_out" else 10
    slow = add_webhook(db, "slow", receiver.url + "/slow", "bulk.a", timeout_seconds=timeout)
    fast = add_webhook(db, "fast", receiver.url + "/fast", "bulk.b")
    receiver.responder = lambda req: SLOW[behaviour] if req.path == "/slow" else Response()
    sidecar_factory()
    wait_ready(db)
    n_slow, n_fast = 10, 50
    publish_raw(nats_server.url, "bulk.x", [envelope(slow, {"i": i}) for i in range(n_slow)])
    publish_raw(nats_server.url, "bulk.x", [envelope(fast, {"i": i}) for i in range(n_fast)])
    assert wait_until(lambda: len(ids(receiver.snapshot(), "/fast")) >= n_fast, timeout=30)
    got = receiver.snapshot()
    first_slow = min(r.received_at for r in got if r.path == "/slow")
    fast_times = sorted(r.received_at for r in got if r.path == "/fast")
    record_property("fast_done_after_first_slow_s", round(fast_times[-1] - first_slow, 3))
    # The slow endpoint answers (or gives up) 2 s after its first request at the earliest: every
    # message for the other one was sent before that, none of them waited for a slow answer.
    assert fast_times[-1] - first_slow < 1.9, fast_times[-1] - first_slow
    if behaviour == "times_out":
        # Each slow message: one attempt, a timeout, the next attempt scheduled; or deferred unsent.
        assert wait_until(
            lambda: (
                scalar(db, "SELECT count(*) FROM rule_nats_retries WHERE webhook_id = %s", (slow,)) == n_slow
            ),
            timeout=30,
        )
        per_message = db.execute(
            "SELECT message_id, count(*) FROM rule_nats_delivery_attempts WHERE webhook_id = %s GROUP BY 1",
            (slow,),
        ).fetchall()
        assert all(n == 1 for _, n in per_message), per_message
    else:
        assert wait_until(lambda: len(ids(receiver.snapshot(), "/slow")) >= n_slow, timeout=60)
        assert wait_until(
            lambda: (
                scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'")
                == n_slow + n_fast
            ),
            timeout=30,
        )
    got = receiver.snapshot()
    # nothing lost, nothing twice
    assert sorted(ids(got, "/fast")) == list(range(n_fast))
    slow_ids = Counter(ids(got, "/slow"))
    assert all(n == 1 for n in slow_ids.values()), slow_ids
    assert scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 0


def test_one_event_the_endpoint_refuses_does_not_close_it_for_the_others(
    record_property: Callable[[str, object], None],
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """Defect 12: an event the endpoint always answers 500 failed again and again, opened the
    circuit after circuit_failure_threshold of its own retries, and a healthy event to the same
    endpoint then waited out circuit_open_seconds (78 s). Only distinct messages count now."""
    configure(
        db, "EVT", "evt", retry_initial_seconds=0.2, retry_max_backoff_seconds=0.3, retry_max_attempts=100
    )
    hook = add_webhook(
        db, "picky", receiver.url + "/p", "evt.a", circuit_failure_threshold=3, circuit_open_seconds=60
    )
    receiver.responder = lambda req: Response(status=500) if b'"bad"' in req.body else Response()
    sidecar_factory()
    wait_ready(db)
    publish_raw(nats_server.url, "evt.x", [envelope(hook, "bad", event_id="evt-bad")])
    # The bad event has failed as often as the threshold (its own retries, nothing in between).
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE message_id = 'evt-bad'") >= 3
        ),
        timeout=30,
    )
    published = time.monotonic()
    publish_raw(nats_server.url, "evt.x", [envelope(hook, "good", event_id="evt-good")])
    assert wait_until(
        lambda: (
            scalar(
                db,
                "SELECT count(*) FROM rule_nats_delivery_attempts "
                "WHERE message_id = 'evt-good' AND outcome = 'delivered'",
            )
            == 1
        ),
        timeout=15,  # a circuit opened by the bad event holds the good one for 60 s
    )
    record_property("good_event_delivered_after_s", round(time.monotonic() - published, 3))
    status = scalar(db, "SELECT status FROM nats_endpoint_health WHERE webhook_id = %s", (hook,))
    assert status != "open", status


def test_a_webhook_inserted_and_published_to_at_once_is_delivered(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """Defect 4: registry reloads are coalesced (at most two a second); a webhook inserted and
    published to right after another registry change was dead-lettered unknown_webhook from the
    sidecar's stale cache. Now it is looked up in PostgreSQL first; an id that really does not
    exist is still dead-lettered."""
    configure(db, "NEW", "new")
    add_webhook(db, "first", receiver.url + "/first", "new.a")
    sidecar_factory()
    wait_ready(db)
    time.sleep(1.0)  # the start's reloads are over

    def settled(n: int) -> bool:
        return (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == n
            or scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") != 0
        )

    for round_ in range(3):
        # A registry change (reload now), then a webhook inserted and used within the coalescing gap.
        db.execute("UPDATE rule_webhooks SET timeout_seconds = timeout_seconds WHERE webhook_name = 'first'")
        hook = add_webhook(db, f"new{round_}", receiver.url + f"/new{round_}", "new.a")
        publish_raw(nats_server.url, "new.x", [envelope(hook, {"round": round_})])
        assert wait_until(lambda n=round_ + 1: settled(n), timeout=15)
        assert db.execute("SELECT reason, error FROM rule_nats_dead_letters").fetchall() == []
    assert sorted(r.path for r in receiver.snapshot()) == ["/new0", "/new1", "/new2"]
    publish_raw(nats_server.url, "new.x", [envelope(987654, {"nobody": True})])
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 1, timeout=15)
    assert scalar(db, "SELECT reason FROM rule_nats_dead_letters") == "unknown_webhook"


def _drop_range_checks(db: psycopg.Connection) -> None:
    """As on a database whose rows predate the bounds (or whose constraints someone dropped): no
    CHECK on the numeric settings the test writes absurd values into."""
    rows = db.execute(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'c' "
        "AND conrelid IN ('rule_webhooks'::regclass, 'rule_nats_consumers'::regclass) "
        "AND (pg_get_constraintdef(oid) ~ '(ack_wait|retry_|rate_limit)')"
    ).fetchall()
    for table, name in rows:
        db.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')  # catalog names


def test_absurd_settings_end_in_recorded_outcomes_not_repeated_posts(
    record_property: Callable[[str, object], None],
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """Defect 5, the sidecar's side: retry_initial_seconds = 1e300 raised OverflowError inside
    delivery, after the POST and before its attempt row, and the message was POSTed again at every
    redelivery; an ack wait of 1e-9 s sent every message many times. The sidecar clamps what it
    reads (the CHECKs of migration 0015 refuse such values; tests/security/test_bounds.py)."""
    _drop_range_checks(db)
    configure(db, "ABS", "abs", ack_wait_seconds=1e-9, max_deliver=11)
    hook = add_webhook(
        db,
        "absurd",
        receiver.url + "/a",
        "abs.a",
        retry_initial_seconds=1e300,
        retry_max_backoff_seconds=1e300,
        retry_max_age_seconds=1e300,
        rate_limit_per_second=1e-300,
    )
    receiver.responder = lambda req: Response(status=500, delay=0.3)
    sidecar_factory()
    wait_ready(db)
    publish_raw(nats_server.url, "abs.x", [envelope(hook, {"i": 1}, event_id="abs-1")])
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE message_id = 'abs-1'") >= 1
        ),
        timeout=20,
    )
    time.sleep(3.0)  # redeliveries, had the message not been recorded and acknowledged, come within this
    posts = len(receiver.snapshot())
    record_property("posts", posts)
    assert posts == 1, posts
    rows = db.execute(
        "SELECT outcome, next_attempt_at > now() + interval '1 hour' FROM rule_nats_delivery_attempts "
        "WHERE message_id = 'abs-1'"
    ).fetchall()
    assert rows == [("retry", True)], rows  # scheduled far ahead, within the clamped bounds
