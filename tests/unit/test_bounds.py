"""Memory bounds: the URL caches by size, idle endpoint gates dropped; permanent host errors."""

from __future__ import annotations

import pytest

from sidecar import delivery
from sidecar.cache import BoundedMap, BoundedSet
from sidecar.delivery import Refused, check_target, check_url
from sidecar.endpoints import GATE_IDLE_SECONDS, PRUNE_EVERY_SECONDS, EndpointGates, EndpointLimits
from sidecar.ssrf import DEFAULT_POLICY, host_problem


def test_bounded_set_evicts_by_total_size_and_count() -> None:
    seen = BoundedSet(max_entries=3, max_bytes=100, max_item=60)
    seen.add("a", 40)
    seen.add("b", 40)
    assert "a" in seen  # a is now the most recently used
    seen.add("c", 40)  # 120 bytes > 100: the least recently used (b) goes
    assert "b" not in seen and "a" in seen and "c" in seen and seen.size == 80
    seen.add("d", 1)
    seen.add("e", 1)  # 4 entries > 3
    assert len(seen) == 3 and seen.size <= 100
    seen.add("huge", 61)  # bigger than max_item: never kept
    assert "huge" not in seen


def test_bounded_map_evicts_by_total_size_and_count() -> None:
    m = BoundedMap[str, int](max_entries=3, max_bytes=100, max_item=60)
    m.put("a", 1, 40)
    m.put("b", 2, 40)
    assert m.get("a") == 1  # a is now the most recently used
    m.put("c", 3, 40)  # 120 bytes > 100: the least recently used (b) goes
    assert m.get("b") is None and m.get("a") == 1 and m.get("c") == 3 and m.size == 80
    m.put("c", 4, 10)  # replaced: its old size is given back
    assert m.get("c") == 4 and m.size == 50
    m.put("d", 5, 1)
    m.put("e", 6, 1)  # 4 entries > 3
    assert len(m) == 3 and m.size <= 100
    m.put("huge", 7, 61)  # bigger than max_item: never kept
    assert m.get("huge") is None


def test_the_senders_url_cache_holds_no_huge_urls() -> None:
    delivery._targets.clear()
    for i in range(50):
        delivery._target("https://example.com/" + "a" * 400_000 + str(i))
    assert delivery._targets.size == 0
    for i in range(10_000):
        delivery._target(f"https://example.com/{i}/" + "b" * 1000)
    assert len(delivery._targets) <= delivery.URL_CACHE_ENTRIES
    assert delivery._targets.size <= delivery.URL_CACHE_BYTES


def test_url_caches_hold_no_huge_urls() -> None:
    delivery._checked_urls.clear()
    delivery._checked_targets.clear()
    url = "https://example.com/" + "a" * 400_000
    for i in range(50):
        with pytest.raises(delivery.Refused, match="longer than 2048"):
            check_url(url + str(i))
        check_target(url + str(i), DEFAULT_POLICY)
    assert delivery._checked_urls.size == 0 and delivery._checked_targets.size == 0
    for i in range(10_000):
        u = f"https://example.com/{i}/" + "b" * 1000
        check_url(u)
        check_target(u, DEFAULT_POLICY)
    assert len(delivery._checked_urls) <= delivery.URL_CACHE_ENTRIES
    assert delivery._checked_urls.size <= delivery.URL_CACHE_BYTES
    assert delivery._checked_targets.size <= delivery.URL_CACHE_BYTES


def test_idle_gates_are_dropped_and_busy_or_failing_ones_kept() -> None:
    gates = EndpointGates()
    t0 = 1000.0
    for host in ("a:80", "busy:80", "open:80", "disabled:80"):
        gates.get(host, EndpointLimits(), now=t0)
    gates.gates["busy:80"].active = 1
    gates.gates["open:80"].circuit = "open"
    gates.gates["disabled:80"].disabled = "HTTP 410 Gone"
    for g in gates.gates.values():
        g.dirty = False
    assert gates.prune(t0 + GATE_IDLE_SECONDS - 1, wall=0.0) == 0  # not idle long enough
    assert gates.prune(t0 + GATE_IDLE_SECONDS, wall=0.0) == 1
    assert set(gates.gates) == {"busy:80", "open:80", "disabled:80"}


def test_gates_prune_themselves_on_get() -> None:
    gates = EndpointGates()
    t0 = 5000.0
    gates._pruned_at = t0
    for i in range(1000):
        gates.get(f"host-{i}:443", EndpointLimits(), now=t0)
    for g in gates.gates.values():
        g.dirty = False
    gates.get("fresh:443", EndpointLimits(), now=t0 + GATE_IDLE_SECONDS + PRUNE_EVERY_SECONDS)
    assert list(gates.gates) == ["fresh:443"]


def test_a_gate_with_state_to_write_is_kept() -> None:
    gates = EndpointGates()
    gates.get(7, EndpointLimits(), now=0.0).record(0.0, "fail", 503, "HTTP 503")  # dirty, backing off
    assert gates.prune(GATE_IDLE_SECONDS * 2, wall=0.0) == 0


@pytest.mark.parametrize(
    "host",
    [
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "0x7f000001",
        "0177.0.0.1",
        "1.2.3.04",
        "1.2.3.4.5",
        "example.123",
        "a..b",
        ".",
        "a" * 64 + ".com",
        ("a" * 60 + ".") * 5 + "com",
        "ex!ample.com",
    ],
)
def test_hosts_that_can_never_work_are_named(host: str) -> None:
    assert host_problem(host) is not None


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "::1",
        "example.com",
        "example.com.",
        "a-b.c_d.example",
        "xn--n3h.com",
        "localhost",
        "EXAMPLE.COM",
    ],
)
def test_ordinary_hosts_pass(host: str) -> None:
    assert host_problem(host) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1:8080/x",
        "http://2130706433/x",
        "http://0x7f.1/",
        "https://xn--zz.example/",
        "https://xn--a.example/",
        "https://a..b/",
        "https://" + "a" * 64 + ".com/",
        "https://exa\u200dmple.com/",
        "https://exa\x00mple.com/",
    ],
)
def test_invalid_hosts_are_permanent_url_errors(url: str) -> None:
    with pytest.raises(Refused) as info:
        check_url(url)
    assert info.value.reason == "invalid_webhook_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://ünïcode.example/x",
        "https://☃.com/",
        "https://faß.de/",
        "http://[::1]:8080/",
        "http://127.0.0.1:1/",
    ],
)
def test_valid_international_and_literal_hosts_pass(url: str) -> None:
    assert check_url(url) == url


# -- input that used to crash a delivery task (issue 11, defect 2) and compressed bodies (defect 1)


@pytest.mark.parametrize("name", ["X-Test\n", "X-Test\r\n", "X\x00", "X Test", ""])
def test_header_names_with_a_trailing_newline_or_other_junk_are_refused(name: str) -> None:
    env = delivery.Envelope("https://example.com/h", None, None, ((name, "v"),), b"{}")
    with pytest.raises(Refused) as info:
        delivery.build_request(env, None)
    assert info.value.reason == "invalid_header"


@pytest.mark.parametrize("value", ["v\n", "a\rb", "a\x00", "\ud800"])
def test_header_values_that_cannot_be_sent_are_refused(value: str) -> None:
    env = delivery.Envelope("https://example.com/h", None, None, (("X-A", value),), b"{}")
    with pytest.raises(Refused) as info:
        delivery.build_request(env, None)
    assert info.value.reason == "invalid_header"


# A tab is a control character too: the shared rule for message ids (tests/security/cases.py).
@pytest.mark.parametrize("event_id", ["id\r\nX-Injected: 1", "id\n", "a\x00b", "a\tb", "\ud800", "x\udfff"])
def test_event_ids_that_cannot_be_a_header_are_refused(event_id: str) -> None:
    with pytest.raises(Refused) as info:
        delivery.check_message_id(event_id)
    assert info.value.reason == "invalid_header"


@pytest.mark.parametrize("event_id", ["order-42", "outbox-app db-17", "ünïcode"])
def test_ordinary_event_ids_pass(event_id: str) -> None:
    delivery.check_message_id(event_id)


def test_data_nested_too_deeply_is_refused_not_raised() -> None:
    raw = b'{"webhook_url": "https://e.com/x", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Refused) as info:
        delivery.parse_envelope(raw)
    assert info.value.reason == "invalid_json"


def test_compressed_error_bodies_are_stored_as_text() -> None:
    import gzip
    import zlib

    text = b"upstream exploded"
    assert delivery.body_text(gzip.compress(text), "gzip") == "upstream exploded"
    assert delivery.body_text(zlib.compress(text), "deflate") == "upstream exploded"
    raw_deflate = zlib.compressobj(wbits=-15)
    assert (
        delivery.body_text(raw_deflate.compress(text) + raw_deflate.flush(), "deflate") == "upstream exploded"
    )
    assert "upstream exploded".startswith(
        delivery.body_text(gzip.compress(text)[:-9], "gzip")
    )  # cut: a prefix
    assert delivery.body_text(b"\x00\x01 not gzip", "gzip").startswith("<")
    assert delivery.body_text(b"\x8b\x00", "br") == "<2+ bytes of br-encoded body, not decoded>"
    assert delivery.body_text(b"plain", None) == "plain"
    bomb = gzip.compress(b"a" * 10_000_000)
    assert len(delivery.body_text(bomb, "gzip")) == delivery.RESPONSE_BODY_LIMIT
