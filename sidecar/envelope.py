"""Reading a webhook message: the JSON envelope ({"webhook_url", "data", "headers", "webhook_id",
"event_id"}) with ``data`` kept as its exact bytes, and the refusal of what cannot be delivered (pure)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sidecar.errors import InvalidInput
from sidecar.validation import check_message_id as validate_message_id

# Lone surrogates cannot be encoded for the wire nor stored as text in PostgreSQL.
SURROGATE = re.compile("[\ud800-\udfff]")


class Refused(Exception):
    """The message cannot be delivered as it is: dead-letter it at once with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)  # not frozen: see outcome.py
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
    if SURROGATE.search(message_id):
        raise Refused(
            "invalid_header", f"event_id {message_id[:50]!r} (sent as webhook-id) has a lone surrogate"
        )
