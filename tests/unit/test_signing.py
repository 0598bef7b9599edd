"""Signatures checked with the Standard Webhooks reference library, not with our own code."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from sidecar.delivery import Envelope, build_request, sign_request
from sidecar.registry import WebhookDef
from sidecar.signing import SignatureError, SigningKey, decode_secret, signature_header, verify

SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(bytes(range(48))).decode()


def key(secret: str, secret_id: int = 1, expires_at: float | None = None) -> SigningKey:
    return SigningKey(secret_id, decode_secret(secret), expires_at)


def test_reference_library_accepts_our_signature() -> None:
    body = '{"order": 42, "name": "Zoë \\"quoted\\""}'.encode()
    now = int(time.time())
    header = signature_header([key(SECRET_A)], "msg_123", now, body)
    assert header is not None
    headers = {"webhook-id": "msg_123", "webhook-timestamp": str(now), "webhook-signature": header}
    assert Webhook(SECRET_A).verify(body, headers) == {"order": 42, "name": 'Zoë "quoted"'}
    # and the library's own signature is byte-identical to ours
    assert Webhook(SECRET_A).sign("msg_123", datetime.fromtimestamp(now, UTC), body.decode()) == header


def test_rotation_window_carries_both_signatures() -> None:
    body = b'{"x":1}'
    now = int(time.time())
    header = signature_header([key(SECRET_A, 1, now + 60), key(SECRET_B, 2)], "m1", now, body)
    assert header is not None and len(header.split(" ")) == 2
    headers = {"webhook-id": "m1", "webhook-timestamp": str(now), "webhook-signature": header}
    Webhook(SECRET_A).verify(body, headers)
    Webhook(SECRET_B).verify(body, headers)
    # after the old secret expired, only the new one signs
    later = now + 61
    header = signature_header([key(SECRET_A, 1, now + 60), key(SECRET_B, 2)], "m1", later, body)
    assert header is not None and len(header.split(" ")) == 1
    headers = {"webhook-id": "m1", "webhook-timestamp": str(later), "webhook-signature": header}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body, headers)


def test_no_secret_no_signature() -> None:
    assert signature_header([], "m", 1, b"{}") is None
    assert signature_header([key(SECRET_A, 1, 10.0)], "m", 11, b"{}") is None


def test_tampered_body_fails_reference_verification() -> None:
    now = int(time.time())
    header = signature_header([key(SECRET_A)], "m", now, b'{"amount": 1}')
    assert header is not None
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(
            b'{"amount": 100}',
            {"webhook-id": "m", "webhook-timestamp": str(now), "webhook-signature": header},
        )


def test_our_verify_helper_matches_the_reference() -> None:
    now = int(time.time())
    wh = Webhook(SECRET_B)
    sig = wh.sign("evt_1", datetime.fromtimestamp(now, UTC), '{"a":1}')
    headers = {"Webhook-Id": "evt_1", "Webhook-Timestamp": str(now), "Webhook-Signature": "v1,AAAA " + sig}
    verify(SECRET_B, headers, b'{"a":1}')
    with pytest.raises(SignatureError, match="no signature"):
        verify(SECRET_A, headers, b'{"a":1}')
    with pytest.raises(SignatureError, match="tolerance"):
        verify(SECRET_B, headers, b'{"a":1}', now=now + 600)
    with pytest.raises(SignatureError, match="missing"):
        verify(SECRET_B, {}, b"{}")


def test_decode_secret_rules() -> None:
    assert len(decode_secret(SECRET_A)) == 32
    with pytest.raises(ValueError, match="whsec_"):
        decode_secret("abc")
    with pytest.raises(ValueError, match="24 to 64"):
        decode_secret("whsec_" + base64.b64encode(b"short").decode())


def test_signing_key_repr_hides_key_material() -> None:
    k = key(SECRET_A)
    assert "aaaa" not in repr(k).lower() and SECRET_A not in repr(k)
    w = WebhookDef(1, "w", "https://example.com/", headers=(("Authorization", "Bearer s3cr3t"),), keys=(k,))
    assert "s3cr3t" not in repr(w) and "SigningKey" not in repr(w)


def test_signed_request_headers_and_exact_body() -> None:
    env = Envelope(None, 7, "evt-9", (("webhook-signature", "v1,forged"), ("X-A", "1")), b'{"k": "v"}')
    hook = WebhookDef(7, "orders", "https://example.com/hook", keys=(key(SECRET_A),))
    req = build_request(env, hook)
    assert "webhook-signature" in req.dropped_headers
    signed = sign_request(req, "evt-9", hook.keys, time.time())
    assert signed.headers["webhook-id"] == "evt-9"
    assert signed.headers["webhook-signature"] != "v1,forged"
    assert signed.body == b'{"k": "v"}'
    Webhook(SECRET_A).verify(signed.body, signed.headers)
