"""A demo webhook receiver for docker/compose.yaml: verifies Standard Webhooks signatures when
WEBHOOK_SECRET is set, prints each delivery, answers 204. Standard library only.

    python demo-receiver.py [PORT [HOST]]     # default 8080 on all addresses (a container's port)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("WEBHOOK_SECRET", "")


def verified(headers: dict[str, str], body: bytes) -> bool | None:
    """True/False when a secret is configured, None otherwise."""
    if not SECRET:
        return None
    key = base64.b64decode(SECRET.removeprefix("whsec_") + "==")
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "0")
    if abs(time.time() - int(stamp or 0)) > 300:
        return False
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    return any(hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split())


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        ok = verified(headers, body)
        print(json.dumps({"path": self.path, "webhook_id": headers.get("webhook-id"), "signature_ok": ok,
                          "body": body.decode("utf-8", "replace")[:500]}), flush=True)  # fmt: skip
        self.send_response(401 if ok is False else 204)
        self.end_headers()

    do_PUT = do_PATCH = do_POST

    def log_message(self, format: str, *args: object) -> None:  # a quiet access log
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    host = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"  # noqa: S104 - a container's port
    print(f"demo receiver on {host}:{port}", flush=True)
    ThreadingHTTPServer((host, port), Handler).serve_forever()
