"""Masking a webhook's own secrets in what its endpoint answered (pure, no I/O).

An endpoint that echoes the request (``{"error": "bad token", "got": "Bearer abc..."}``) would
put the webhook's Authorization value into rule_nats_delivery_attempts.response_body and the
dead letter, where the monitor reads them (issue 19, defect 8). Before a response's body or
error text is recorded, every secret value the request carried is replaced by ``***``: the
values of the webhook's static headers (rule_webhooks.headers, set by the admin and never
shown to the monitor) and of every header whose name looks secret (Authorization, Cookie,
*token*, *secret*, *key*, *signature*, ...), each whole and, for ``<scheme> <credentials>``
values such as ``Bearer abc``, the credentials alone. Values shorter than MIN_SECRET characters
are left alone: masking ``1`` or ``yes`` everywhere would destroy the body and hide nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MIN_SECRET = 6
MASK = "***"
_SENSITIVE = re.compile(r"auth|cookie|token|secret|passw|api[-_]?key|signature|session|credential", re.I)


def secret_values(sent: Mapping[str, str], static: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The strings to mask, longest first (so that a value is masked before a part of it)."""
    values = {value for _, value in static}
    values.update(value for name, value in sent.items() if _SENSITIVE.search(name))
    found: set[str] = set()
    for value in values:
        value = value.strip()
        if len(value) >= MIN_SECRET:
            found.add(value)
        parts = value.split()
        for part in parts[1:]:  # "Bearer abc", "Basic dXNlcjpwdw==": the credentials without the scheme
            if len(part) >= MIN_SECRET:
                found.add(part)
    return tuple(sorted(found, key=len, reverse=True))


def mask(text: str | None, secrets: tuple[str, ...]) -> str | None:
    if not text or not secrets:
        return text
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
