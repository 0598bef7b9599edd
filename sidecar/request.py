"""The HTTP request of a delivery: the message merged with the endpoint registry (URL, method,
timeout and headers: the registry wins), then signed with the Standard Webhooks headers (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.envelope import SURROGATE, Envelope, Refused
from sidecar.errors import InvalidInput
from sidecar.registry import WebhookDef
from sidecar.signing import SIGNATURE_HEADERS, SigningKey, signature_header
from sidecar.ssrf import DEFAULT_POLICY, NetworkPolicy
from sidecar.urls import check_target, check_url
from sidecar.validation import check_header_name, check_header_value

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


@dataclass(slots=True)  # not frozen: see outcome.py
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
        if SURROGATE.search(value):
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
