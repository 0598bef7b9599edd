"""Standard Webhooks v1 signatures (https://www.standardwebhooks.com), pure logic.

Each delivery carries ``webhook-id`` (the message id, the same on every retry),
``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``: one
``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`` per active secret, separated by spaces,
so during a rotation receivers holding either secret accept the request.

``verify`` is the receiver's side, for Python receivers that do not want a dependency.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PREFIX = "whsec_"
TOLERANCE_SECONDS = 300
SIGNATURE_HEADERS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})


class SignatureError(ValueError):
    """The request's signature headers are missing, stale or match no secret."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    secret_id: int
    key: bytes
    expires_at: float | None = None  # unix seconds; None: no expiry

    def __repr__(self) -> str:  # never show key material
        return f"SigningKey({self.secret_id}, expires_at={self.expires_at})"

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


def decode_secret(secret: str) -> bytes:
    """Key bytes of ``whsec_<base64>`` (24 to 64 bytes)."""
    if not secret.startswith(PREFIX):
        raise ValueError("a signing secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(PREFIX) :] + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a signing secret is whsec_ followed by base64") from exc
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a signing secret holds 24 to 64 bytes, not {len(key)}")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode("utf-8"), timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signature_header(keys: Iterable[SigningKey], msg_id: str, timestamp: int, body: bytes) -> str | None:
    """All active keys' signatures for one request, or None when the endpoint has no secret."""
    sigs = [sign(k.key, msg_id, timestamp, body) for k in keys if k.active(timestamp)]
    return " ".join(sigs) if sigs else None


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a received request; raise SignatureError when it was not signed with ``secret``.

    Usage in a receiver: ``verify(os.environ["WEBHOOK_SECRET"], request.headers, await request.read())``.
    """
    key = decode_secret(secret) if isinstance(secret, str) else secret
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id")
    stamp = lower.get("webhook-timestamp")
    sigs = lower.get("webhook-signature")
    if not (msg_id and stamp and sigs):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(stamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs((time.time() if now is None else now) - ts) > tolerance:
        raise SignatureError("webhook-timestamp is outside the tolerance (replayed or clock skew)")
    expected = sign(key, msg_id, ts, body).encode("ascii")
    for candidate in sigs.split(" "):
        if hmac.compare_digest(candidate.encode("ascii", "replace"), expected):
            return
    raise SignatureError("no signature matches the secret")
