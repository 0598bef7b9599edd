"""Which addresses the worker may deliver to (pure logic; the I/O hooks are in delivery.py).

A webhook URL is chosen by whoever writes a message or a registry row; without a check it
would let them make the worker call the cloud metadata service, the database's own host or
anything else on the internal network. The check is made on the IP address a connection is
actually opened to (after DNS resolution, see delivery.py), so a name that resolves to
127.0.0.1 or that changes its answer between two lookups gains nothing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # noqa: UP007 - used at runtime
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007

# Reason per range; the first match wins, so more specific ranges come first.
_BLOCKED: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("169.254.169.254/32", "cloud metadata"),
        ("169.254.0.0/16", "link-local"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("198.18.0.0/15", "benchmarking"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
        ("2001:db8::/32", "documentation"),
        ("100::/64", "discard"),
        ("64:ff9b:1::/48", "nat64 local-use"),
        ("2001::/23", "reserved"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


class BlockedAddress(OSError):
    """Raised where a connection would be opened to an address the policy refuses."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"{address} is {reason}; add it to WEBHOOK_ALLOW_NETWORKS or allow_networks to deliver there"
        )
        self.address = address
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Networks opened despite the block list, and whether plain http is refused. Hashable: one
    connection pool per distinct policy, so a connection opened under a wider policy is never
    reused under a narrower one."""

    allow: frozenset[Network] = frozenset()
    https_only: bool = False

    def merge(
        self, allow: frozenset[Network] | tuple[Network, ...] = (), https_only: bool = False
    ) -> NetworkPolicy:
        if not allow and not https_only:
            return self
        return NetworkPolicy(self.allow | frozenset(allow), self.https_only or https_only)

    def allows(self, ip: Address) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)


DEFAULT_POLICY = NetworkPolicy()


def parse_networks(text: str | None) -> frozenset[Network]:
    """Comma- or space-separated CIDRs (a bare address means just that address)."""
    if not text:
        return frozenset()
    out: set[Network] = set()
    for item in text.replace(",", " ").split():
        try:
            out.add(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a network in CIDR notation (e.g. 127.0.0.0/8)") from exc
    return frozenset(out)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 address leads to."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: Address) -> str | None:
    """Why an address is refused by default (None: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link-local (scoped)"
        inner = embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            return None if reason is None else f"{reason} ({inner} embedded in an IPv6 address)"
        if ip.teredo is not None:
            return "a Teredo tunnel address"
    for net, reason in _BLOCKED:
        if ip.version == net.version and ip in net:
            return reason
    if not ip.is_global:
        return "not globally routable"
    return None


def check_address(address: str, policy: NetworkPolicy) -> None:
    """Raise BlockedAddress unless the policy lets the worker connect to this IP address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise BlockedAddress(address, "not an IP address") from None
    if policy.allows(ip):
        return
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None and policy.allows(inner):
            return
    reason = blocked_reason(ip)
    if reason is not None:
        raise BlockedAddress(str(ip), reason)


def check_scheme(scheme: str, policy: NetworkPolicy) -> str | None:
    """Why a URL scheme is refused under the policy (None: allowed)."""
    if scheme == "https":
        return None
    if scheme == "http":
        return "plain http is refused (https_only)" if policy.https_only else None
    return f"scheme {scheme!r} is not http or https"


_HEX_OR_DIGITS = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]*)")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def host_problem(host: str) -> str | None:
    """Why a URL's host (in its ASCII form, IDNA applied, brackets removed) can never be a valid
    target, so that the message is dead-lettered at once rather than retried; None when it may be.

    Pure syntax, no DNS. A host whose last label is a number is an IPv4 address by the URL standard
    (WHATWG): ``127.1``, ``2130706433``, ``0x7f.1`` or ``0177.0.0.1`` are read as 127.0.0.1 by
    inet_aton and most resolvers, and as something else (or nothing) by others; only the canonical
    dotted-quad form is accepted, and it is checked like any address.
    """
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name may end with a dot
    labels = name.split(".")
    if _HEX_OR_DIGITS.fullmatch(labels[-1]):
        return f"{host[:100]!r} is not a canonical IPv4 address (write it as four decimal numbers a.b.c.d)"
    if not name or len(name) > 253:
        return "the host name is empty or longer than 253 characters"
    for label in labels:
        if not _LABEL.fullmatch(label.lower()):
            return (
                f"the host name {host[:100]!r} has an empty label, a label over 63 characters "
                "or a character other than letters, digits, '-' and '_'"
            )
    return None
