"""The bulkhead per endpoint (sidecar.bulkhead) and a circuit for the endpoint, not for one event
(sidecar.endpoints): pure decisions on a fake clock."""

from __future__ import annotations

import asyncio
import random

from sidecar import bounds
from sidecar.bulkhead import SLOW_SECONDS, Bulkhead, lane_key
from sidecar.endpoints import EndpointGate, EndpointLimits
from sidecar.registry import RetryPolicy
from sidecar.retry import backoff, decide


def bulkhead(slots: int) -> Bulkhead:
    return Bulkhead(slots, rand=random.Random(1))


def test_an_endpoint_holds_a_quarter_of_the_slots_then_waits_while_its_speed_is_unknown() -> None:
    b = bulkhead(16)
    b.lane(2, 0.0)  # another endpoint seen on the consumer
    lane = b.lane(1, 0.0)
    turns = [b.turn(lane, 0.0) for _ in range(4)]
    assert all(t.go for t in turns) and lane.busy == 4
    assert not b.turn(lane, 0.0).go  # not heard from yet: a quarter (it may be slow)
    for token in range(4):
        b.started(1, token, 0.0)
    # not heard from yet, its requests just sent: waits (a fast endpoint answers within milliseconds)
    lane.waiting = 30
    assert b.turn(lane, 0.01).wait
    # no answer after PROBE_SECONDS: waits while the endpoint holds at most half a batch (a
    # quarter of the window), else deferred briefly
    lane.waiting = 3
    assert b.turn(lane, 0.1).wait
    lane.waiting = 4
    t = b.turn(lane, 0.1)
    assert not t.go and not t.wait and 0.5 <= t.delay <= 1.0 and "share" in t.why
    # another endpoint still has its turn at once
    assert b.turn(b.lane(2, 0.1), 0.1).go
    # heard from, and fast: every slot
    b.finished(1, 0, 0.01)
    assert b.share(lane, 0.1) == 16


def test_slowness_counts_before_the_first_answer_and_after() -> None:
    b = bulkhead(16)
    lane = b.lane(1, 0.0)
    for token in range(4):
        assert b.turn(lane, 0.0).go
        b.started(1, token, 0.0)
    assert b.turn(lane, 0.5).wait  # not slow yet
    # the oldest request has been running longer than SLOW_SECONDS: a quarter of the slots, deferred
    t = b.turn(lane, SLOW_SECONDS + 0.1)
    assert not t.go and not t.wait and "slow" in t.why
    assert b.share(lane, SLOW_SECONDS + 0.1) == 4
    for token in range(4):
        b.finished(1, token, 2.0)  # the response ends the message's turn
    assert lane.busy == 0 and lane.latency is not None and lane.latency > SLOW_SECONDS
    assert [b.turn(lane, 10.0).go for _ in range(5)] == [True] * 4 + [False]
    # answering fast again brings the share back
    for token in range(40):
        b.turn(lane, 10.0)
        b.started(1, 100 + token, 10.0)
        b.finished(1, 100 + token, 0.01)
    assert b.share(lane, 10.0) == 16  # known fast: every slot


def test_a_known_fast_endpoint_uses_every_slot_and_waits_in_the_process() -> None:
    b = bulkhead(64)
    lane = b.lane("http://a:1", 0.0)
    assert b.turn(lane, 0.0).go
    b.started("http://a:1", 1, 0.0)
    b.finished("http://a:1", 1, 0.3)  # 0.3 s: under FAST_SECONDS
    for _ in range(64):
        assert b.turn(lane, 0.0).go
    lane.waiting = 40  # 41 / 64 x 0.3 s is under MAX_LOCAL_WAIT
    assert b.turn(lane, 0.0).wait


def test_an_endpoint_alone_on_its_consumer_is_not_deferred_while_not_slow() -> None:
    b = bulkhead(16)
    lane = b.lane(1, 0.0)
    for token in range(4):
        assert b.turn(lane, 0.0).go
        b.started(1, token, 0.0)
    lane.waiting = 23
    assert b.turn(lane, 0.5).wait  # no answer yet, but nobody else to keep room for
    assert not b.turn(lane, SLOW_SECONDS + 0.1).wait  # slow: deferred all the same


def test_no_bulkhead_below_four_slots() -> None:
    b = bulkhead(2)
    lane = b.lane(1, 0.0)
    assert all(b.turn(lane, 0.0).go for _ in range(10))


def test_lane_keys_are_the_webhook_or_the_origin() -> None:
    assert lane_key(7, "https://x.example/a/b", registered=True) == 7
    assert lane_key("x.example", "HTTPS://X.example:8443/a?b", registered=False) == "https://x.example:8443"
    assert lane_key("h", "http://h", registered=False) == "http://h"


def test_waiters_get_their_turn_when_one_leaves_and_go_home_when_closed() -> None:
    async def go() -> None:
        b = bulkhead(8)  # share 2 while its speed is unknown
        for _ in range(2):
            assert b.enter(1).go
        assert b.enter(1).wait
        waiter = asyncio.create_task(b.wait_turn(1))
        await asyncio.sleep(0.01)
        assert not waiter.done() and b.lanes[1].waiting == 1
        b.leave(1)
        turn = await asyncio.wait_for(waiter, 1.0)
        assert turn.go and b.lanes[1].waiting == 0 and b.lanes[1].busy == 2
        waiter = asyncio.create_task(b.wait_turn(1))
        await asyncio.sleep(0.01)
        b.close()
        turn = await asyncio.wait_for(waiter, 1.0)
        assert not turn.go and not turn.why  # hand the message back

    asyncio.run(go())


def test_prune_forgets_idle_lanes_only() -> None:
    b = bulkhead(8)
    b.turn(b.lane(1, 0.0), 0.0)
    b.lane(2, 0.0)
    b.prune(1000.0)
    assert list(b.lanes) == [1]


# -- a circuit for the endpoint, not for one event -------------------------------------------------


def test_the_same_message_failing_again_does_not_open_the_circuit() -> None:
    g = EndpointGate(EndpointLimits(failure_threshold=3, open_seconds=60.0), rand=random.Random(1))
    for i in range(20):
        assert g.record(100.0 + i, "fail", 500, "HTTP 500", message_id="bad") == []
    assert g.circuit == "closed" and g.failures == 1
    assert g.admit(130.0, 16).go
    # distinct messages failing in a row are an outage
    g.waiting -= 1
    assert g.record(131.0, "fail", 500, "HTTP 500", message_id="b") == []
    assert g.record(132.0, "fail", 500, "HTTP 500", message_id="c") == ["opened"]


def test_a_repeat_counts_as_a_failed_probe_and_a_success_forgets_the_run() -> None:
    g = EndpointGate(EndpointLimits(failure_threshold=2, open_seconds=10.0), rand=random.Random(1))
    g.record(0.0, "fail", 500, "x", message_id="a")
    assert g.record(1.0, "fail", 500, "x", message_id="b") == ["opened"]
    assert g.admit(12.0, 16).probe
    assert g.record(12.5, "fail", 500, "x", message_id="a") == ["opened"]  # a probe is a probe
    g.record(40.0, "ok", 200, None, message_id="c")
    assert g.failed_ids == set() and g.circuit == "closed"
    assert g.record(41.0, "fail", 500, "x", message_id="a") == [] and g.failures == 1


def test_a_repeat_503_pauses_the_endpoint_only_when_it_asks_with_retry_after() -> None:
    g = EndpointGate(EndpointLimits(failure_threshold=5), rand=random.Random(1))
    assert g.record(0.0, "fail", 503, "x", message_id="a") == ["backoff"]
    g.record(5.0, "ok", 200, None, message_id="b")
    g.record(6.0, "fail", 503, "x", message_id="a")
    assert g.record(8.0, "fail", 503, "x", message_id="a") == []  # the same event again: no new round
    assert g.record(9.0, "fail", 503, "x", retry_after=30.0, message_id="a") == ["backoff"]
    assert g.backoff_until == 39.0


def test_a_repeat_does_not_make_the_endpoint_disabled() -> None:
    g = EndpointGate(EndpointLimits(failure_threshold=1000, disable_after_seconds=60.0))
    g.record(0.0, "fail", 500, "x", message_id="a")
    assert g.record(100.0, "fail", 500, "x", message_id="a") == [] and g.disabled is None


# -- bounds ----------------------------------------------------------------------------------------


def test_computed_times_are_clamped() -> None:
    absurd = RetryPolicy(
        max_attempts=1000, initial_seconds=1e300, max_backoff_seconds=1e308, max_age_seconds=1e308
    )
    assert backoff(999, absurd, random.Random(1)) == bounds.MAX_DELAY
    d = decide(3, 0.0, 1.0, absurd, retry_after=float("inf"))
    assert d.retry and d.delay == bounds.MAX_DELAY
    assert bounds.delay(float("nan")) == 0.0 and bounds.delay(-5.0) == 0.0
    assert bounds.clamp(float("nan"), bounds.RATE) == bounds.RATE[0]
    assert bounds.clamp(1e-300, bounds.RATE) == 0.001


def test_the_registry_clamps_what_it_reads() -> None:
    from sidecar.registry import consumer_from_row, webhook_from_row

    hook = webhook_from_row(
        {
            "webhook_id": 1, "webhook_name": "w", "url": "https://x/", "method": "POST", "headers": {},
            "timeout_seconds": 1e-9, "retry_max_attempts": 10**9, "retry_initial_seconds": 1e300,
            "retry_max_backoff_seconds": None, "retry_max_age_seconds": 1e300, "enabled": True,
            "rate_limit_per_second": 1e-300, "max_concurrency": 0, "circuit_failure_threshold": 5,
            "circuit_open_seconds": 1e9, "disable_after_seconds": 1.0,
        }
    )  # fmt: skip
    assert (hook.timeout_seconds, hook.retry_max_attempts, hook.retry_initial_seconds) == (0.1, 1000, 86400.0)
    assert (hook.rate_limit_per_second, hook.max_concurrency, hook.circuit_open_seconds) == (0.001, 1, 3600.0)
    assert hook.disable_after_seconds == 60.0 and hook.retry_max_backoff_seconds is None
    consumer = consumer_from_row(
        {
            "consumer_id": 1, "stream_name": "S", "consumer_name": "c", "batch_size": 10, "max_deliver": 5,
            "ack_wait_seconds": 1e-9, "max_ack_pending": 100, "deliver_policy": "all",
            "retry_max_attempts": 8, "retry_initial_seconds": 1e300, "retry_max_backoff_seconds": 1e300,
            "retry_max_age_seconds": 1e300, "enabled": True,
        }
    )  # fmt: skip
    assert consumer.ack_wait_seconds == 1.0
    assert consumer.retry == RetryPolicy(8, 86400.0, 604800.0, 2592000.0)
