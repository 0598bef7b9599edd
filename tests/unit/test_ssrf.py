"""The SSRF decision function: no test here opens a connection."""

from __future__ import annotations

import pytest

from sidecar.delivery import Refused, check_target
from sidecar.ssrf import BlockedAddress, NetworkPolicy, blocked_reason, check_address, parse_networks

DEFAULT = NetworkPolicy()
LOOPBACK_ALLOWED = NetworkPolicy(parse_networks("127.0.0.0/8,::1/128"))

BLOCKED = {
    # loopback in every spelling
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "::1": "loopback",
    "::ffff:127.0.0.1": "loopback",
    "::ffff:7f00:1": "loopback",
    "::127.0.0.1": "loopback",  # IPv4-compatible (deprecated) form
    "2002:7f00:1::1": "loopback",  # 6to4
    "64:ff9b::7f00:1": "loopback",  # NAT64
    # private
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "fd12:3456::1": "private",
    "fc00::1": "private",
    "::ffff:10.1.2.3": "private",
    "::ffff:192.168.0.1": "private",
    # link-local and cloud metadata
    "169.254.169.254": "cloud metadata",
    "::ffff:169.254.169.254": "cloud metadata",
    "64:ff9b::a9fe:a9fe": "cloud metadata",
    "2002:a9fe:a9fe::": "cloud metadata",
    "169.254.1.1": "link-local",
    "fe80::1": "link-local",
    "fe80::1%2": "link-local",
    # the rest
    "100.64.0.1": "cgnat",
    "100.127.255.255": "cgnat",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "255.255.255.255": "broadcast",
    "240.0.0.1": "reserved",
    "192.0.2.10": "documentation",
    "2001:db8::1": "documentation",
    "198.18.0.1": "benchmarking",
    "64:ff9b:1::1": "nat64 local-use",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
    "fec0::1": "site-local",
}

PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "reason"), sorted(BLOCKED.items()))
def test_blocked_by_default(address: str, reason: str) -> None:
    with pytest.raises(BlockedAddress) as info:
        check_address(address, DEFAULT)
    assert reason in info.value.reason
    assert "WEBHOOK_ALLOW_NETWORKS" in str(info.value)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    check_address(address, DEFAULT)


def test_allow_list_opens_exactly_the_listed_networks() -> None:
    for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        check_address(address, LOOPBACK_ALLOWED)
    for address in ("10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "fe80::1"):
        with pytest.raises(BlockedAddress):
            check_address(address, LOOPBACK_ALLOWED)
    internal = NetworkPolicy(parse_networks("10.20.0.0/16"))
    check_address("10.20.3.4", internal)
    with pytest.raises(BlockedAddress):
        check_address("10.21.0.1", internal)


def test_merge_adds_endpoint_networks_and_https_only() -> None:
    merged = LOOPBACK_ALLOWED.merge(parse_networks("10.0.0.0/8"), https_only=True)
    check_address("10.1.1.1", merged)
    check_address("127.0.0.1", merged)
    assert merged.https_only
    assert LOOPBACK_ALLOWED.merge() is LOOPBACK_ALLOWED
    assert hash(merged) == hash(LOOPBACK_ALLOWED.merge(parse_networks("10.0.0.0/8"), https_only=True))


def test_parse_networks() -> None:
    assert parse_networks("") == frozenset()
    assert parse_networks(None) == frozenset()
    nets = parse_networks(" 127.0.0.0/8, ::1/128  10.0.0.1 ")
    assert {str(n) for n in nets} == {"127.0.0.0/8", "::1/128", "10.0.0.1/32"}
    with pytest.raises(ValueError, match="CIDR"):
        parse_networks("127.0.0.0/8,localhost")


def test_non_addresses_are_refused() -> None:
    with pytest.raises(BlockedAddress, match="not an IP address"):
        check_address("example.com", DEFAULT)


def test_blocked_reason_is_none_for_public() -> None:
    import ipaddress

    assert blocked_reason(ipaddress.ip_address("8.8.4.4")) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]:8080/x",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "https://10.0.0.1/",
        "http://0.0.0.0:80/",
    ],
)
def test_ip_literal_targets_are_refused_before_connecting(url: str) -> None:
    with pytest.raises(Refused) as info:
        check_target(url, DEFAULT)
    assert info.value.reason == "ssrf_blocked"


def test_schemes_and_https_only() -> None:
    check_target("http://example.com/", DEFAULT)
    check_target("https://example.com/", NetworkPolicy(https_only=True))
    with pytest.raises(Refused, match="https_only"):
        check_target("http://example.com/", NetworkPolicy(https_only=True))
    with pytest.raises(Refused, match="scheme"):
        check_target("ftp://example.com/", DEFAULT)
