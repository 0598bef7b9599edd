"""Webhook delivery: reading the message, building the HTTP request, sending it.

One module per concern; this one keeps the names the rest of the worker imports:

* ``sidecar.envelope``: the message (``parse_envelope``, ``Envelope``, ``Refused``);
* ``sidecar.urls``: where a delivery may go (``check_url``, ``check_target``);
* ``sidecar.request``: the HTTP request (``build_request``, ``sign_request``, ``Request``);
* ``sidecar.resolver``: name resolution under the network policy (``PolicyResolver``);
* ``sidecar.sender``: sending it and reading the answer (``Sender``, ``Response``, ``classify_status``).
"""

from __future__ import annotations

from sidecar.envelope import Envelope, Refused, check_message_id, parse_envelope
from sidecar.request import FORBIDDEN_HEADERS, Request, build_request, sign_request
from sidecar.resolver import PolicyResolver
from sidecar.sender import (
    DNS_CACHE_ENTRIES,
    DNS_TTL,
    RESPONSE_BODY_LIMIT,
    Response,
    Sender,
    _target,
    _targets,
    body_text,
    classify_status,
)
from sidecar.urls import (
    URL_CACHE_BYTES,
    URL_CACHE_ENTRIES,
    URL_CACHE_ITEM,
    _checked_targets,
    _checked_urls,
    check_target,
    check_url,
)

__all__ = [
    "DNS_CACHE_ENTRIES",
    "DNS_TTL",
    "FORBIDDEN_HEADERS",
    "RESPONSE_BODY_LIMIT",
    "URL_CACHE_BYTES",
    "URL_CACHE_ENTRIES",
    "URL_CACHE_ITEM",
    "Envelope",
    "PolicyResolver",
    "Refused",
    "Request",
    "Response",
    "Sender",
    "_checked_targets",
    "_checked_urls",
    "_target",
    "_targets",
    "body_text",
    "build_request",
    "check_message_id",
    "check_target",
    "check_url",
    "classify_status",
    "parse_envelope",
    "sign_request",
]
