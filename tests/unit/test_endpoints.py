"""Per-endpoint gate: limits, backoff and the circuit breaker, on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from sidecar.endpoints import HELD_SECONDS, EndpointGate, EndpointGates, EndpointLimits, share_of


def gate(**limits: object) -> EndpointGate:
    return EndpointGate(EndpointLimits(**limits), rand=random.Random(1))  # type: ignore[arg-type]


def go(g: EndpointGate, now: float, slots: int = 100) -> bool:
    adm = g.admit(now, slots)
    if adm.go:
        g.waiting -= 1  # as if acquired and released at once
    return adm.go


def test_circuit_opens_after_threshold_probes_and_closes() -> None:
    g = gate(failure_threshold=3, open_seconds=10.0)
    for i in range(2):
        assert go(g, 100.0 + i)
        assert g.record(100.0 + i, "fail", 500, "HTTP 500") == []
    assert go(g, 102.0)
    assert g.record(102.0, "fail", 500, "HTTP 500") == ["opened"]
    adm = g.admit(105.0, 100)
    assert not adm.go and adm.why == "circuit open" and adm.until >= 112.0
    # half-open: exactly one probe, the others wait
    probe = g.admit(112.5, 100)
    assert probe.go and probe.probe and g.circuit == "half_open"
    assert not g.admit(112.6, 100).go
    # failed probe: open again for twice as long
    assert g.record(113.0, "fail", None, "timeout") == ["opened"]
    assert g.open_until == pytest.approx(133.0)
    assert g.admit(133.5, 100).probe
    assert g.record(134.0, "ok", 200, None) == ["closed"]
    assert g.circuit == "closed" and g.failures == 0 and go(g, 134.1)


def test_client_errors_do_not_open_the_circuit() -> None:
    g = gate(failure_threshold=2)
    for t in range(5):
        g.record(float(t), "neutral", 400, "HTTP 400")
    assert g.circuit == "closed" and g.failures == 0


def test_gone_disables_and_holds() -> None:
    g = gate()
    assert g.record(1.0, "gone", 410, "HTTP 410") == ["disable"]
    adm = g.admit(2.0, 10)
    assert not adm.go and adm.until == 2.0 + HELD_SECONDS and "410" in adm.why
    gates = EndpointGates()
    gates.gates[7] = g
    gates.enabled_again(7)
    assert g.disabled is None and go(g, 3.0)


def test_continuous_failure_disables_after_the_configured_time() -> None:
    g = gate(failure_threshold=1000, disable_after_seconds=60.0)
    g.record(0.0, "fail", 500, "x")
    assert g.record(59.0, "fail", 500, "x") == []
    assert g.record(61.0, "fail", 500, "x") == ["disable"]
    # a success in between restarts the clock
    h = gate(failure_threshold=1000, disable_after_seconds=60.0)
    h.record(0.0, "fail", 500, "x")
    h.record(30.0, "ok", 200, None)
    h.record(40.0, "fail", 500, "x")
    assert h.record(90.0, "fail", 500, "x") == []


def test_429_and_503_back_off_the_whole_endpoint() -> None:
    g = gate()
    assert g.record(10.0, "fail", 429, "HTTP 429", retry_after=30.0) == ["backoff"]
    adm = g.admit(20.0, 100)
    assert not adm.go and adm.until >= 40.0 and "429" in adm.why
    assert go(g, 40.5)
    # without Retry-After: exponential from 1 s; absurd values are capped at an hour
    h = gate()
    h.record(0.0, "fail", 503, "HTTP 503")
    assert h.backoff_until == pytest.approx(1.0)
    h.record(2.0, "fail", 503, "HTTP 503", retry_after=10**9)
    assert h.backoff_until == pytest.approx(3602.0)


def test_rate_limit_spaces_requests_and_defers_beyond_a_second() -> None:
    g = gate(rate_per_second=10.0)
    waits = []
    for _ in range(5):
        adm = g.admit(0.0, 100)
        assert adm.go
        waits.append(adm.wait)
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # only a quarter of the consumer's slots may wait in the process
    small = gate(rate_per_second=10.0)
    assert small.admit(0.0, 8).go and small.admit(0.0, 8).go
    adm = small.admit(0.0, 8)
    assert not adm.go and adm.why == "rate limit" and adm.until >= 0.2  # 2 = 8 // 4 waiting
    # more than a second ahead: deferred, without reserving a token
    slow = gate(rate_per_second=1.0)
    assert slow.admit(0.0, 100).go and slow.admit(0.0, 100).go
    tat = slow.tat
    assert not slow.admit(0.0, 100).go and slow.tat == tat


def test_failing_endpoint_gets_a_quarter_of_the_slots() -> None:
    g = gate(failure_threshold=100)
    for t in range(3):
        g.record(float(t), "fail", 500, "x")
    assert g.admit(5.0, 20).go
    g.waiting, g.active = 0, 5
    adm = g.admit(5.0, 20)
    assert not adm.go and adm.why == "endpoint failing"


async def test_concurrency_limit_waits_for_a_slot() -> None:
    g = gate(max_concurrency=2)
    running = 0
    peak = 0

    async def one() -> None:
        nonlocal running, peak
        adm = g.admit(0.0, 40)
        assert adm.go
        await g.acquire()
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        await g.release()

    await asyncio.gather(*(one() for _ in range(10)))
    assert peak == 2 and g.active == 0 and g.waiting == 0
    # beyond limit + a quarter of the slots waiting: deferred
    g.active, g.waiting = 2, 10
    assert g.admit(0.0, 40).why == "concurrency limit"


def test_gates_update_limits_and_report_dirty_once() -> None:
    gates = EndpointGates()
    a = gates.get(1, EndpointLimits())
    assert gates.get(1, EndpointLimits(rate_per_second=5.0)) is a and a.limits.rate_per_second == 5.0
    a.record(1.0, "ok", 200, None)
    assert [k for k, _ in gates.dirty()] == [1]
    assert gates.dirty() == []


def test_recheck_after_waiting_sees_a_backoff_that_began_meanwhile() -> None:
    g = gate(max_concurrency=1)
    adm = g.admit(0.0, 10)
    assert adm.go and g.recheck(0.0, adm.probe) is None
    g.record(0.5, "fail", 429, "HTTP 429", retry_after=2.0)
    again = g.recheck(0.6, False)
    assert again is not None and not again.go and again.until >= 2.5
    g.record(3.0, "gone", 410, "HTTP 410")
    assert g.recheck(3.1, False) is not None


def test_limits_are_shared_among_live_sidecars() -> None:
    limits = EndpointLimits(max_concurrency=5, rate_per_second=10.0)
    assert share_of(limits, 1) is limits
    two = share_of(limits, 2)
    assert (two.rate_per_second, two.max_concurrency) == (5.0, 3)
    assert share_of(limits, 10).max_concurrency == 1
    assert share_of(EndpointLimits(), 3) == EndpointLimits()
    gates = EndpointGates()
    gates.workers = 4
    assert gates.get(1, limits).limits.rate_per_second == 2.5


def test_a_burst_of_concurrent_503s_is_one_backoff_round() -> None:
    """Twenty requests in flight when the endpoint starts answering 503 fail within a moment: that is
    one failed round (1 s of backoff), not twenty (it was 2^6 = 64 s: an 8 s outage then held the
    endpoint's messages for a minute). Rounds that fail after a backoff has ended double it."""
    g = gate(failure_threshold=1000)
    for i in range(20):
        g.record(0.0 + i * 0.01, "fail", 503, "HTTP 503")
    assert g.backoff_until == pytest.approx(1.0)
    g.record(1.5, "fail", 503, "HTTP 503")  # the next round, after the backoff: doubled
    assert g.backoff_until == pytest.approx(3.5)
    g.record(1.6, "fail", 503, "HTTP 503")  # same round
    assert g.backoff_until == pytest.approx(3.5)
    g.record(4.0, "fail", 429, "HTTP 429")
    assert g.backoff_until == pytest.approx(8.0)
    g.record(8.5, "ok", 200, None)  # a success ends the rounds
    g.record(9.0, "fail", 503, "HTTP 503")
    assert g.backoff_until == pytest.approx(10.0)
    g.record(9.1, "fail", 503, "HTTP 503", retry_after=30.0)  # the endpoint's own word wins
    assert g.backoff_until == pytest.approx(39.1)
