"""Webhook delivery: reading the message, building the HTTP request, sending it.

Pure part: ``parse_envelope``, ``build_request``, ``classify_status``. I/O part: ``Sender``,
over the project's own HTTP/1.1 client (``sidecar.http1``: keep-alive pool per policy, no
redirects, capped response reads), which measured cheaper per request than aiohttp, httpx and
the Rust-backed clients that keep every guarantee (docs/delivery.md, "The HTTP client").
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from sidecar.cache import BoundedMap, BoundedSet
from sidecar.errors import HttpError, InvalidInput
from sidecar.http1 import CONNECT_SECONDS, Connection, Pool, ResponseParser, Target, encode_head
from sidecar.registry import WebhookDef
from sidecar.signing import SIGNATURE_HEADERS, SigningKey, signature_header
from sidecar.ssrf import (
    DEFAULT_POLICY,
    BlockedAddress,
    NetworkPolicy,
    check_address,
    check_scheme,
    host_problem,
)
from sidecar.validation import (
    check_header_name,
    check_header_value,
    check_webhook_url,
)
from sidecar.validation import (
    check_message_id as validate_message_id,
)

RESPONSE_BODY_LIMIT = 4096
# URLs that passed check_url / check_target. Most messages go to a few URLs, and parsing each cost
# 3% of a delivery's CPU; but URLs come from messages, so the caches are bounded by size too.
URL_CACHE_ENTRIES = 4096
URL_CACHE_BYTES = 1 << 20
URL_CACHE_ITEM = 2048  # the longest URL the registry accepts; longer ones are checked every time
_checked_urls = BoundedSet(URL_CACHE_ENTRIES, URL_CACHE_BYTES, URL_CACHE_ITEM)
_checked_targets = BoundedSet(URL_CACHE_ENTRIES, URL_CACHE_BYTES, URL_CACHE_ITEM)
DNS_TTL = 60.0  # seconds an answer is used, like aiohttp's DNS cache before
DNS_CACHE_ENTRIES = 1024
# Headers a message may not set: they belong to the transport, or to us.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
    }
    | SIGNATURE_HEADERS
)
# Lone surrogates cannot be encoded for the wire nor stored as text in PostgreSQL.
_SURROGATE = re.compile("[\ud800-\udfff]")


class Refused(Exception):
    """The message cannot be delivered as it is: dead-letter it at once with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)  # not frozen: built for every message, and a frozen __init__ costs 4x
class Envelope:
    webhook_url: str | None
    webhook_id: int | None
    event_id: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _members(text: str) -> dict[str, tuple[Any, int, int]]:
    """Top-level members of a JSON object: {key: (value, start, end)} with the value's span in text."""
    decoder = _DECODER  # compiled once: building them was a third of this function's time
    ws = _WS
    pos = ws.match(text, 0).end()  # type: ignore[union-attr]
    if pos >= len(text) or text[pos] != "{":
        raise ValueError("not an object")
    pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
    out: dict[str, tuple[Any, int, int]] = {}
    if pos < len(text) and text[pos] == "}":
        end = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
        if end != len(text):
            raise ValueError("extra data after the object")
        return out
    while True:
        key, pos = decoder.raw_decode(text, pos)
        if not isinstance(key, str):
            raise ValueError("object keys must be strings")
        pos = ws.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != ":":
            raise ValueError("expected ':'")
        start = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
        value, end = decoder.raw_decode(text, start)
        out[key] = (value, start, end)
        pos = ws.match(text, end).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
            continue
        if text[pos : pos + 1] == "}":
            tail = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
            if tail != len(text):
                raise ValueError("extra data after the object")
            return out
        raise ValueError("expected ',' or '}'")


def parse_envelope(raw: bytes, routed: bool = False) -> Envelope:
    """Read {"webhook_url", "data", "headers", "webhook_id", "event_id"}; ``data`` keeps its exact bytes.
    ``routed``: the endpoint comes from the registry (sidecar.routing), the message need not name one."""
    try:
        text = raw.decode("utf-8")
        members = _members(text)
    except UnicodeDecodeError:
        raise Refused("invalid_json", "the message is not UTF-8") from None
    except (ValueError, IndexError) as exc:
        raise Refused("invalid_json", f"the message is not a JSON object ({exc})") from None
    except RecursionError:
        # Valid JSON nested deeper than Python's parser goes: this message can never be read.
        raise Refused("invalid_json", "the message is nested too deeply to parse") from None
    url = members.get("webhook_url", (None, 0, 0))[0]
    webhook_id = members.get("webhook_id", (None, 0, 0))[0]
    if webhook_id is not None and (not isinstance(webhook_id, int) or isinstance(webhook_id, bool)):
        raise Refused("invalid_webhook_id", "webhook_id must be an integer")
    if url is None and webhook_id is None and not routed:
        raise Refused("missing_webhook_url", "the message has neither webhook_url nor webhook_id")
    if url is not None and not isinstance(url, str):
        raise Refused("invalid_webhook_url", "webhook_url must be a string")
    raw_headers = members.get("headers", ({}, 0, 0))[0]
    if raw_headers is None:
        raw_headers = {}
    if not isinstance(raw_headers, dict):
        raise Refused("invalid_headers", "headers must be a JSON object")
    headers: list[tuple[str, str]] = []
    for name, value in raw_headers.items():
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise Refused("invalid_headers", f"header {name[:50]!r}: values must be strings")
        headers.append((name, str(value)))
    event = members.get("event_id", (None, 0, 0))[0]
    if event is not None and event != "":
        check_message_id(str(event))
    if "data" in members:
        _, start, end = members["data"]
        body = text[start:end].encode("utf-8")
    else:
        body = raw
    return Envelope(url, webhook_id, None if event is None else str(event), tuple(headers), body)


def check_message_id(message_id: str) -> None:
    """The message id is sent as the ``webhook-id`` header and signed: refuse what a header cannot
    carry (CR, LF, NUL; aiohttp raises on the first two) or what cannot be encoded (lone surrogates)."""
    try:
        validate_message_id(message_id)
    except InvalidInput as exc:
        raise Refused("invalid_header", f"event_id (sent as webhook-id): {exc}") from None
    if _SURROGATE.search(message_id):
        raise Refused(
            "invalid_header", f"event_id {message_id[:50]!r} (sent as webhook-id) has a lone surrogate"
        )


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
    # The host as aiohttp will use it (yarl applies IDNA): a host that cannot be encoded or looked
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


@dataclass(slots=True)  # not frozen: built for every message, and a frozen __init__ costs 4x
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    timeout: float
    dropped_headers: tuple[str, ...] = ()
    policy: NetworkPolicy = DEFAULT_POLICY


def build_request(
    env: Envelope,
    webhook: WebhookDef | None,
    default_timeout: float = 10.0,
    policy: NetworkPolicy = DEFAULT_POLICY,
) -> Request:
    """Merge the message with the endpoint registry: registry URL, method, timeout and headers win."""
    url = webhook.url if webhook is not None else env.webhook_url
    if url is None:
        raise Refused("missing_webhook_url", "no URL in the message or the webhook registry")
    check_url(url)
    if webhook is not None:
        policy = policy.merge(webhook.allow_networks, webhook.https_only)
    check_target(url, policy)
    headers: dict[str, str] = {}
    lower: dict[str, str] = {}
    dropped: list[str] = []

    def put(name: str, value: str, source: str) -> None:
        try:
            check_header_name(name)
            check_header_value(value)
        except InvalidInput as exc:
            raise Refused("invalid_header", f"{source} header {name[:50]!r}: {exc}") from None
        if _SURROGATE.search(value):
            raise Refused("invalid_header", f"{source} header {name[:50]!r} has a lone surrogate")
        key = name.lower()
        if key in FORBIDDEN_HEADERS:
            dropped.append(name)
            return
        if key in lower:
            del headers[lower[key]]
        lower[key] = name
        headers[name] = value

    for name, value in env.headers:
        put(name, value, "message")
    if webhook is not None:
        for name, value in webhook.headers:
            put(name, value, "registry")
    if "content-type" not in lower:
        headers["Content-Type"] = "application/json"
    return Request(
        method=webhook.method if webhook is not None else "POST",
        url=url,
        headers=headers,
        body=env.body,
        timeout=webhook.timeout_seconds if webhook is not None else default_timeout,
        dropped_headers=tuple(dropped),
        policy=policy,
    )


def sign_request(req: Request, msg_id: str, keys: tuple[SigningKey, ...], now: float) -> Request:
    """Add the Standard Webhooks headers: webhook-id (stable across retries), webhook-timestamp
    and, when the endpoint has active secrets, webhook-signature over the exact body sent."""
    ts = int(now)
    headers = dict(req.headers)
    headers["webhook-id"] = msg_id
    headers["webhook-timestamp"] = str(ts)
    signature = signature_header(keys, msg_id, ts, req.body)
    if signature is not None:
        headers["webhook-signature"] = signature
    # Built directly: dataclasses.replace costs more than the rest of this function, every message.
    return Request(req.method, req.url, headers, req.body, req.timeout, req.dropped_headers, req.policy)


def classify_status(status: int) -> str:
    """delivered | retry | permanent for an HTTP status."""
    if 200 <= status < 300:
        return "delivered"
    if status >= 500 or status in (408, 429):
        return "retry"
    return "permanent"


@dataclass(slots=True)  # not frozen: built for every message, and a frozen __init__ costs 4x
class Response:
    status: int | None
    latency_ms: float
    error: str | None = None
    body: str | None = None
    retry_after: str | None = None
    blocked: str | None = None  # the SSRF policy refused the address: a permanent failure


class PolicyResolver(AbstractResolver):
    """Resolves with the system resolver and keeps only the addresses the policy allows.

    The connection is then opened to exactly these addresses (one lookup, no second one to
    rebind), and ``http1.Pool`` checks each address once more right before its connect.
    """

    def __init__(self, policy: NetworkPolicy, base: AbstractResolver) -> None:
        self.policy = policy
        self.base = base

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.base.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        first: BlockedAddress | None = None
        for r in results:
            try:
                check_address(r["host"], self.policy)
            except BlockedAddress as exc:
                first = first or exc
                continue
            allowed.append(r)
        if not allowed:
            if first is not None:
                raise BlockedAddress(f"{host} ({first.address})", first.reason)
            raise OSError(f"{host} did not resolve")
        return allowed

    async def close(self) -> None:
        await self.base.close()


def body_text(chunk: bytes, encoding: str | None) -> str:
    """The start of a response body as text to store. A compressed body (sent although we asked for
    identity) is inflated up to the same limit; a truncated stream yields what inflates."""
    coding = (encoding or "identity").strip().lower()
    if coding in ("gzip", "x-gzip", "deflate"):
        # wbits 47: gzip or zlib header, detected; raw deflate as a fallback for broken servers.
        for wbits in (47, -15):
            try:
                inflated = zlib.decompressobj(wbits).decompress(chunk, RESPONSE_BODY_LIMIT)
            except zlib.error:
                continue
            return inflated.decode("utf-8", "replace")
        return f"<{len(chunk)}+ bytes of {coding}-encoded body that does not inflate>"
    if coding != "identity":
        return f"<{len(chunk)}+ bytes of {coding}-encoded body, not decoded>"
    return chunk.decode("utf-8", "replace")


class Sender:
    """All deliveries of the process, over ``sidecar.http1``: keep-alive connections per network
    policy, scheme, host and port (a connection is only reused under the policy that allowed its
    address), no redirects, no proxies (the environment's proxy variables are never read: a proxy
    would connect on our behalf to addresses the policy never saw), capped response reads.

    A name is resolved once (answers kept 60 s), the answer filtered by the policy
    (``PolicyResolver``) and connected to as it is: no second lookup can change where the request
    goes, and each address is checked again right before its connect. TLS verifies the name.
    ``resolver`` replaces the system resolver (tests map names to addresses with it).
    """

    def __init__(self, resolver: AbstractResolver | None = None) -> None:
        self._resolver = resolver
        self._base: AbstractResolver | None = None
        self._policies: dict[NetworkPolicy, PolicyResolver] = {}
        self._answers = BoundedMap[tuple[NetworkPolicy, str, int], tuple[float, list[str]]](
            DNS_CACHE_ENTRIES, DNS_CACHE_ENTRIES * 300, 300
        )
        self._pool: Pool | None = None

    async def start(self) -> None:
        self._base = self._resolver or DefaultResolver()
        self._pool = Pool(self._resolve)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._answers.clear()

    async def _resolve(self, host: str, port: int, policy: NetworkPolicy) -> list[str]:
        """The addresses of ``host`` the policy allows (BlockedAddress when it allows none)."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]  # an address: checked right before connect
        key = (policy, host, port)
        loop = asyncio.get_running_loop()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        resolver = self._policies.get(policy)
        if resolver is None:
            assert self._base is not None, "Sender.start() first"
            resolver = self._policies[policy] = PolicyResolver(policy, self._base)
        results = await resolver.resolve(host, port, socket.AF_UNSPEC)
        addresses = [r["host"] for r in results]
        self._answers.put(key, (loop.time() + DNS_TTL, addresses), len(host))
        return addresses

    async def send(self, req: Request) -> Response:
        pool = self._pool
        assert pool is not None, "Sender.start() first"
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout
        conn: Connection | None = None
        parser: ResponseParser | None = None

        def failed(error: str, blocked: str | None = None) -> Response:
            return Response(None, (time.perf_counter() - start) * 1000.0, error, blocked=blocked)

        try:
            target = _target(req.url)
            key = (req.policy, target.tls, target.host, target.port)
            connect = min(req.timeout, CONNECT_SECONDS)
            try:
                conn = await pool.connect(key, connect)
            except TimeoutError:
                return failed(f"connect timeout after {connect:g} s")
            parser = ResponseParser(RESPONSE_BODY_LIMIT, head_only=req.method == "HEAD")
            waiter = conn.exchange(
                encode_head(req.method, target, req.headers, len(req.body)), req.body, parser
            )
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
            if parser.keep_alive:
                pool.give_back(key, conn)
            else:
                conn.close()
            conn = None
            return _response(parser, start)
        except (TimeoutError, HttpError) as exc:
            if parser is not None and parser.status:
                return _response(parser, start)  # the head is in: the body stalled or broke off
            if isinstance(exc, TimeoutError):
                return failed(f"timeout after {req.timeout:g} s")
            return failed(f"{type(exc).__name__}: {exc}")
        except BlockedAddress as exc:
            return failed(str(exc), blocked=exc.reason)
        except (OSError, ValueError) as exc:
            # Raised by resolving or connecting (nothing was sent): errno texts, no URL.
            return failed(f"connection failed: {exc}")
        finally:
            if conn is not None:
                conn.close()  # the exchange did not finish: the connection's state is unknown


def _response(parser: ResponseParser, start: float) -> Response:
    """The response as far as it was read. Once the head is in, its status is the endpoint's answer
    even if the body then stalls, breaks off or is malformed (the connection is dropped then): a 200
    whose body never ends was delivered, and sending it again would repeat it; an error keeps the
    part of its body that came."""
    status = parser.status
    headers = parser.headers
    return Response(
        status=status,
        latency_ms=(time.perf_counter() - start) * 1000.0,
        body=None if 200 <= status < 300 else body_text(bytes(parser.body), headers.get("content-encoding")),
        retry_after=headers.get("retry-after"),
    )


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


_targets = BoundedMap[str, Target](URL_CACHE_ENTRIES, URL_CACHE_BYTES, URL_CACHE_ITEM)


def _target(url: str) -> Target:
    target = _targets.get(url)
    if target is None:
        target = Target.parse(url)
        _targets.put(url, target, len(url))
    return target
