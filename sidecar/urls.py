"""Which URLs a delivery may go to, checked before any connection (pure, with bounded caches):
an absolute http(s) URL with a host that can exist and no credentials, and what the network policy
refuses of it before resolution (the scheme, hosts written as addresses)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import yarl

from sidecar.cache import BoundedSet
from sidecar.envelope import Refused
from sidecar.errors import InvalidInput
from sidecar.ssrf import BlockedAddress, NetworkPolicy, check_address, check_scheme, host_problem
from sidecar.validation import check_webhook_url

# URLs that passed check_url / check_target. Most messages go to a few URLs, and parsing each cost
# 3% of a delivery's CPU; but URLs come from messages, so the caches are bounded by size too.
URL_CACHE_ENTRIES = 4096
URL_CACHE_BYTES = 1 << 20
URL_CACHE_ITEM = 2048  # the longest URL the registry accepts; longer ones are checked every time
_checked_urls = BoundedSet(URL_CACHE_ENTRIES, URL_CACHE_BYTES, URL_CACHE_ITEM)
_checked_targets = BoundedSet(URL_CACHE_ENTRIES, URL_CACHE_BYTES, URL_CACHE_ITEM)


def check_url(url: str) -> str:
    """Absolute http(s) URL with a host that can exist and no user:password@; the reason otherwise."""
    if url not in _checked_urls:
        _check_url(url)
        _checked_urls.add(url, len(url))
    return url


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise Refused("invalid_webhook_url", f"unparseable URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("invalid_webhook_url", f"scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise Refused("invalid_webhook_url", "the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("invalid_webhook_url", "credentials in the URL (user:password@) are refused")
    if any(c in url for c in "\r\n\t "):
        raise Refused("invalid_webhook_url", "the URL contains whitespace")
    try:
        check_webhook_url(url)  # the rule SQL and PL/Python apply too: controls, length
    except InvalidInput as exc:
        raise Refused("invalid_webhook_url", str(exc)) from None
    # The host as http1.Target will use it (yarl applies IDNA): a host that cannot be encoded or looked
    # up is a permanent problem, not a connection error to retry.
    try:
        parsed = yarl.URL(url)
        host = parsed.raw_host or ""
        _ = parsed.host  # decodes xn-- labels: invalid punycode raises here
    except (ValueError, UnicodeError) as exc:
        raise Refused("invalid_webhook_url", f"invalid host ({exc})") from None
    why = host_problem(host)
    if why is not None:
        raise Refused("invalid_webhook_url", why)


def check_target(url: str, policy: NetworkPolicy) -> None:
    """Refuse (ssrf_blocked) what the policy forbids before any connection: the scheme, and hosts
    written as IP addresses. Names are checked after resolution, on the address connected to."""
    if (url, policy) in _checked_targets:
        return
    _check_target(url, policy)
    _checked_targets.add((url, policy), len(url))


def _check_target(url: str, policy: NetworkPolicy) -> None:
    parts = urlsplit(url)
    why = check_scheme(parts.scheme, policy)
    if why is not None:
        raise Refused("ssrf_blocked", why)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return
    try:
        check_address(host, policy)
    except BlockedAddress as exc:
        raise Refused("ssrf_blocked", str(exc)) from None
