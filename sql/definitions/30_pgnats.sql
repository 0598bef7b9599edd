-- sql/definitions/30_pgnats.sql: the current definition of these objects (docs/schema.md).
--
-- The pgnats PL/Python module (plpython/pgnats.py), as the text the PL/Python functions load
-- (rule_nats__load, 40_publish.sql). scripts/embed-plpython writes the block below from
-- plpython/pgnats.py; tests/unit/test_pgnats.py fails while the two differ.
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

-- BEGIN EMBEDDED plpython/pgnats.py (scripts/embed-plpython writes this block)
CREATE OR REPLACE FUNCTION rule_nats__pgnats_source()
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $pgnats_fn$SELECT $pgnats$"""pgnats: a small NATS JetStream publisher that runs inside PostgreSQL (PL/Python).

Standard library only: PL/Python runs the server's own Python, not the project's
virtualenv. sql/definitions/30_pgnats.sql embeds this file (scripts/embed-plpython), and
``webhook-worker migrate`` applies it again when it changes; ``rule_nats_publish`` and friends load
it once per database session into PL/Python's ``GD`` and keep one connection per
NATS configuration open for the session.

Layers, from pure to I/O:
  * validation, protocol encoding and parsing, envelope building, header redaction,
    nkey/ed25519 signing: pure functions, unit-tested without servers;
  * ``Client``: a blocking socket client with bounded timeouts (publish with PubAck,
    JetStream API requests, PING round trip), reconnecting on the next call after the
    server went away;
  * ``Publisher``: the glue used by the SQL functions (configuration rows, history rows).
"""

import base64
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import socket
import ssl
import tempfile
import time
import uuid

VERSION = "0.1.0"

# Seconds a session trusts its copy of a rule_nats_config row before reading it again.
CONFIG_TTL = 1.0

# How long a request polls for its reply before sleeping in recv().
SPIN_SECONDS = 0.0005

# --------------------------------------------------------------------------------------
# Errors: each carries a stable reason code and a hint for the SQL error.
# --------------------------------------------------------------------------------------


class NatsError(Exception):
    reason = "nats_error"
    hint = None

    def __init__(self, message, hint=None):
        Exception.__init__(self, message)
        if hint is not None:
            self.hint = hint


class InvalidSubject(NatsError):
    reason = "invalid_subject"
    hint = "Subjects are dot-separated tokens without spaces, e.g. webhooks.orders.created; no * or > when publishing."


class InvalidHeader(NatsError):
    reason = "invalid_header"
    hint = "Header names are HTTP tokens; names and values must not contain CR or LF."


class InvalidPayload(NatsError):
    reason = "invalid_payload"


class ConnectFailed(NatsError):
    reason = "nats_unreachable"
    hint = "Check rule_nats_config.nats_url and that nats-server is running; SELECT rule_nats_health_check() tells more."


class AuthFailed(NatsError):
    reason = "nats_auth"
    hint = "Check auth_type and the credentials in rule_nats_config."


class RequestTimeout(NatsError):
    reason = "timeout"
    hint = "JetStream did not answer in time: check the server, or raise rule_nats_config.request_timeout_seconds."


class NoStream(NatsError):
    reason = "no_stream"
    hint = "No JetStream stream captures this subject: add one to rule_nats_streams (the sidecar creates it) or check the subject."


class PayloadTooLarge(NatsError):
    reason = "payload_too_large"
    hint = "Send a smaller payload (e.g. an id the receiver can look up), or raise max_payload on the NATS server."


class ServerError(NatsError):
    reason = "server_error"


class ConfigMissing(NatsError):
    reason = "no_config"
    hint = "Create it: INSERT INTO rule_nats_config (config_name, nats_url) VALUES (...)."


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


class InvalidMessageId(NatsError):
    reason = "invalid_message_id"
    hint = "Message ids are 1-256 characters without control characters (CR, LF, NUL, tab) or surrounding spaces."


class ReservedSubject(NatsError):
    reason = "reserved_subject"
    hint = (
        "Subjects starting with $ ($JS, $KV, $O, $SYS, ...) or _INBOX belong to NATS itself and cannot be "
        "published to from SQL."
    )


class UnregisteredSubject(NatsError):
    reason = "unregistered_subject"
    hint = (
        "Register a stream that captures the subject (INSERT INTO rule_nats_streams ...), or an admin allows "
        "any subject: UPDATE rule_nats_config SET publish_registered_subjects_only = false."
    )


class InvalidUrl(NatsError):
    reason = "invalid_url"
    hint = "Webhook URLs are absolute http(s) URLs without spaces or user:password@ (put credentials in headers)."


# The rules are the ones of tests/security/cases.py, which runs the same table against this
# module, the SQL functions and the sidecar. Every pattern is matched against the whole string
# (fullmatch): "$" would also match before a trailing newline.
_FORBIDDEN_SUBJECT_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f]")
_SUBJ_PART = r"[^.*>]+"
_SUBJECT = re.compile(r"(?:%s\.)*%s" % (_SUBJ_PART, _SUBJ_PART))
_SUBJECT_WILD = re.compile(r"(?:(?:%s|\*)\.)*(?:%s|\*|>)" % (_SUBJ_PART, _SUBJ_PART))
_RESERVED = re.compile(r"\$|_INBOX(?:\.|\Z)")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")
_MESSAGE_ID_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_WEBHOOK_URL = re.compile(r"[hH][tT][tT][pP][sS]?://[^/?#@]+(?:[/?#].*)?", re.S)
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_SERVER_URL = re.compile(r"(?:nats|tls)://(?:\[[0-9A-Fa-f:.]+\]|[^/@:\[\]]+)(?::[0-9]{1,5})?/?")


def is_reserved_subject(subject):
    return bool(_RESERVED.match(subject))


def validate_subject(subject, wildcards=False):
    if not isinstance(subject, str) or not subject:
        raise InvalidSubject("invalid subject: it is empty")
    if len(subject) > 1024:
        raise InvalidSubject("invalid subject: longer than 1024 characters")
    if _FORBIDDEN_SUBJECT_CHARS.search(subject):
        raise InvalidSubject(
            "invalid subject %r: spaces and control characters are not allowed" % (subject[:200],)
        )
    pattern = _SUBJECT_WILD if wildcards else _SUBJECT
    if not pattern.fullmatch(subject):
        raise InvalidSubject("invalid subject %r" % (subject[:200],))
    if is_reserved_subject(subject):
        raise ReservedSubject("subject %r is reserved for NATS itself" % (subject[:200],))
    return subject


def subject_matches(pattern, subject):
    """True when the subject filter ``pattern`` (with * and >) captures ``subject``."""
    f, s = pattern.split("."), subject.split(".")
    for i, part in enumerate(f):
        if part == ">":
            return len(s) > i
        if i >= len(s) or (part != "*" and part != s[i]):
            return False
    return len(s) == len(f)


def validate_header_name(name):
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise InvalidHeader("invalid header name %r" % (str(name)[:100],))
    return name


def validate_header_value(value, name="header"):
    if len(value) > 8192:
        raise InvalidHeader("header %s: value longer than 8192 characters" % name)
    if _HEADER_VALUE_FORBIDDEN.search(value):
        raise InvalidHeader("header %s: value contains CR, LF or NUL" % name)
    return value


def validate_message_id(msg_id):
    if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= 256:
        raise InvalidMessageId("invalid message id: it must be 1-256 characters")
    if _MESSAGE_ID_FORBIDDEN.search(msg_id):
        raise InvalidMessageId("invalid message id %r: control characters are not allowed" % (msg_id[:100],))
    if msg_id[0] == " " or msg_id[-1] == " ":
        raise InvalidMessageId("invalid message id %r: leading or trailing space" % (msg_id[:100],))
    return msg_id


def validate_webhook_url(url):
    if (
        not isinstance(url, str)
        or len(url) > 2048
        or _URL_FORBIDDEN.search(url)
        or not _WEBHOOK_URL.fullmatch(url)
    ):
        raise InvalidUrl("invalid webhook URL %r" % (str(url)[:200],))
    return url


def validate_server_url(url):
    if not isinstance(url, str) or _URL_FORBIDDEN.search(url) or not _SERVER_URL.fullmatch(url):
        raise NatsError(
            "invalid NATS server URL", hint="nats://host[:port] or tls://host[:port], no user:password@"
        )
    return url


def normalize_headers(headers):
    """Turn a dict (values: str, numbers or lists of them) into a list of (name, value) pairs."""
    if headers is None:
        return []
    if not isinstance(headers, dict):
        raise InvalidHeader("headers must be a JSON object, got %s" % type(headers).__name__)
    items = []
    for name, value in headers.items():
        validate_header_name(name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                raise InvalidHeader("header %s: values must be strings or numbers" % name)
            items.append((name, validate_header_value(str(v), name)))
    return items


# Callers' message ids must not have the shape of the ids this project generates (outbox-...,
# replay-..., stream-...), and no Nats-* header but Nats-Msg-Id may come from SQL: the others
# (Nats-Rollup, Nats-Expected-*, Nats-TTL, ...) are instructions to JetStream (issue 19).
_RESERVED_MESSAGE_ID = re.compile(r"(?:outbox|replay|stream)-", re.I)
RESERVED_ID_HINT = (
    "Ids starting with outbox-, replay- or stream- (any case) are the ones this project generates; leave the id "
    "out to get one, or use an id of your own, e.g. order-42-created."
)
NATS_HEADER_HINT = (
    "Nats-* headers other than Nats-Msg-Id (Nats-Rollup, Nats-Expected-*, Nats-TTL, ...) are instructions to "
    "JetStream and cannot be sent from SQL; use a name of your own, e.g. X-..."
)


def validate_caller_message_id(msg_id):
    """A message id a caller chose: a valid message id, not in a generated shape."""
    validate_message_id(msg_id)
    if _RESERVED_MESSAGE_ID.match(msg_id):
        raise InvalidMessageId(
            "message id %r has the shape of a generated id" % (msg_id[:100],), hint=RESERVED_ID_HINT
        )
    return msg_id


def validate_nats_header_name(name):
    """A header name SQL may send to NATS: a valid name, and no Nats-* but Nats-Msg-Id."""
    validate_header_name(name)
    lower = name.lower()
    if lower.startswith("nats-") and lower != "nats-msg-id":
        raise InvalidHeader("header %r is a NATS control header" % (name[:100],), hint=NATS_HEADER_HINT)
    return name


def check_sql_publish(headers, msg_id):
    """What a publish from SQL may not carry: a Nats-* header other than Nats-Msg-Id, or a message
    id (argument or Nats-Msg-Id header) in a generated shape. Raises InvalidHeader/InvalidMessageId."""
    if msg_id:
        validate_caller_message_id(str(msg_id))
    if isinstance(headers, dict):
        for name, value in headers.items():
            validate_nats_header_name(name)
            if name.lower() == "nats-msg-id":
                if not isinstance(value, str):
                    raise InvalidHeader("header Nats-Msg-Id: the value must be a string")
                validate_caller_message_id(value)


_SENSITIVE = re.compile(r"(authorization|cookie|token|secret|password|passwd|api[-_]?key|signature)", re.I)


def redact_headers(headers):
    """Copy of a header dict with secret-looking values masked, for history rows and logs."""
    if not headers:
        return headers
    return {k: ("***" if _SENSITIVE.search(k) else v) for k, v in headers.items()}


# --------------------------------------------------------------------------------------
# Protocol encoding and parsing
# --------------------------------------------------------------------------------------

CRLF = b"\r\n"


def encode_headers(items):
    out = [b"NATS/1.0\r\n"]
    for name, value in items:
        out.append(("%s: %s\r\n" % (name, value)).encode("utf-8"))
    out.append(CRLF)
    return b"".join(out)


def encode_pub(subject, reply, payload, header_items=None):
    """PUB or HPUB frame for one message."""
    reply_part = (" " + reply) if reply else ""
    if header_items:
        hdr = encode_headers(header_items)
        head = "HPUB %s%s %d %d\r\n" % (subject, reply_part, len(hdr), len(hdr) + len(payload))
        return b"".join((head.encode("utf-8"), hdr, payload, CRLF))
    head = "PUB %s%s %d\r\n" % (subject, reply_part, len(payload))
    return b"".join((head.encode("utf-8"), payload, CRLF))


def encode_connect(options):
    return ("CONNECT %s\r\n" % json.dumps(options, separators=(",", ":"))).encode("utf-8")


class ProtocolError(NatsError):
    reason = "protocol_error"


class Parser:
    """Incremental parser of server-to-client operations."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        ops = []
        while True:
            end = self.buf.find(CRLF)
            if end < 0:
                return ops
            line = bytes(self.buf[:end])
            upper = line[:5].upper()
            if upper.startswith(b"MSG ") or upper.startswith(b"HMSG "):
                parts = line.split()
                has_headers = upper.startswith(b"HMSG")
                try:
                    if has_headers:
                        if len(parts) == 6:
                            _, subj, sid, reply, hlen, tlen = parts
                        else:
                            _, subj, sid, hlen, tlen = parts
                            reply = b""
                        hlen, tlen = int(hlen), int(tlen)
                    else:
                        if len(parts) == 5:
                            _, subj, sid, reply, tlen = parts
                        else:
                            _, subj, sid, tlen = parts
                            reply = b""
                        hlen, tlen = 0, int(tlen)
                except ValueError as exc:
                    raise ProtocolError("malformed message line from server: %r" % line[:200]) from exc
                start = end + 2
                if len(self.buf) < start + tlen + 2:
                    return ops  # wait for the whole message
                body = bytes(self.buf[start : start + tlen])
                del self.buf[: start + tlen + 2]
                headers = body[:hlen] if has_headers else None
                ops.append(("MSG", subj.decode(), sid.decode(), reply.decode(), headers, body[hlen:]))
                continue
            del self.buf[: end + 2]
            if upper.startswith(b"PING"):
                ops.append(("PING",))
            elif upper.startswith(b"PONG"):
                ops.append(("PONG",))
            elif upper.startswith(b"+OK"):
                continue
            elif upper.startswith(b"-ERR"):
                ops.append(("ERR", line[4:].strip().strip(b"'").decode("utf-8", "replace")))
            elif upper.startswith(b"INFO"):
                ops.append(("INFO", json.loads(line[5:].decode("utf-8"))))
            elif line:
                raise ProtocolError("unexpected line from server: %r" % line[:200])


def parse_header_block(block):
    """Return (status_code or None, description, {name: value}) of an HMSG header block."""
    if not block:
        return None, "", {}
    lines = block.decode("utf-8", "replace").split("\r\n")
    first = lines[0]
    status, desc = None, ""
    rest = first[len("NATS/1.0") :].strip()
    if rest:
        code, _, desc = rest.partition(" ")
        if code.isdigit():
            status = int(code)
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return status, desc.strip(), headers


def parse_pub_ack(header_block, payload, subject):
    """Turn a JetStream reply into {"stream", "seq", "duplicate"} or raise a NatsError."""
    status, desc, _ = parse_header_block(header_block)
    if status == 503:
        raise NoStream("no JetStream stream captures subject %r (no responders)" % subject)
    if status is not None and status >= 400:
        raise ServerError("NATS answered %d %s for subject %r" % (status, desc, subject))
    try:
        ack = json.loads(payload.decode("utf-8"))
    except ValueError as exc:
        raise ServerError("unreadable JetStream acknowledgement: %r" % payload[:200]) from exc
    err = ack.get("error")
    if err:
        description = err.get("description", "unknown error")
        code = err.get("err_code")
        if "maximum" in description and ("payload" in description or "message size" in description):
            raise PayloadTooLarge("JetStream refused the message: %s" % description)
        raise ServerError("JetStream refused the message: %s (err_code %s)" % (description, code))
    return {
        "stream": ack.get("stream"),
        "seq": ack.get("seq"),
        "duplicate": bool(ack.get("duplicate", False)),
    }


# --------------------------------------------------------------------------------------
# Envelopes: the message format the worker consumes.
# --------------------------------------------------------------------------------------


def new_event_id():
    return str(uuid.uuid4())


def build_envelope(webhook_url, data_json, webhook_id=None, event_id=None, timestamp=None, headers=None):
    """JSON text of {"webhook_url", "data", "headers", "webhook_id", "event_id", "timestamp"}.

    ``data_json`` is JSON text and is spliced in as it is (not decoded and re-encoded), so
    big numbers and key order reach the receiver unchanged. Secrets (signing keys,
    Authorization values) are never put here: the worker looks them up by webhook_id.
    """
    json.loads(data_json)  # refuse non-JSON early, with a clear error
    parts = [
        '{"webhook_url":' + json.dumps(webhook_url),
        '"data":' + data_json,
        '"headers":' + json.dumps(headers or {}, separators=(",", ":")),
        '"webhook_id":' + json.dumps(webhook_id),
        '"event_id":' + json.dumps(event_id or new_event_id()),
        '"timestamp":' + json.dumps(int(timestamp if timestamp is not None else time.time())),
    ]
    return ",".join(parts) + "}"


# --------------------------------------------------------------------------------------
# nkeys and ed25519 (RFC 8032), for auth_type nkey and credentials.
# --------------------------------------------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y, sign):
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 == 0:
        return 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if x & 1 != sign:
        x = _P - x
    return x


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _compress(p):
    zinv = pow(p[2], _P - 2, _P)
    x, y = p[0] * zinv % _P, p[1] * zinv % _P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _expand(seed):
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def ed25519_public_key(seed):
    a, _ = _expand(seed)
    return _compress(_mul(a, _G))


def ed25519_sign(seed, message):
    a, prefix = _expand(seed)
    public = _compress(_mul(a, _G))
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % _L
    big_r = _compress(_mul(r, _G))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % _L
    s = (r + k * a) % _L
    return big_r + int.to_bytes(s, 32, "little")


_PREFIX_SEED = 18 << 3
_PREFIX_USER = 20 << 3


def _crc16(data):
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _b32decode(text):
    return base64.b32decode(text + "=" * (-len(text) % 8))


def _b32encode(raw):
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def decode_user_seed(seed):
    """Return the 32-byte ed25519 seed of an 'SU...' nkey seed, checking prefix and CRC."""
    try:
        raw = _b32decode(seed.strip())
    except (ValueError, TypeError) as exc:
        raise AuthFailed("the nkey seed is not valid base32") from exc
    if len(raw) != 36:
        raise AuthFailed("the nkey seed has the wrong length")
    data, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if _crc16(data) != crc:
        raise AuthFailed("the nkey seed fails its checksum")
    b1, b2 = data[0], data[1]
    if b1 & 0xF8 != _PREFIX_SEED or (((b1 & 7) << 5) | ((b2 & 0xF8) >> 3)) != _PREFIX_USER:
        raise AuthFailed("the nkey seed is not a user seed (SU...)")
    return bytes(data[2:34])


def encode_user_seed(seed32):
    """'SU...' seed text for 32 bytes of key material (used by tests and tooling)."""
    b1 = _PREFIX_SEED | (_PREFIX_USER >> 5)
    b2 = (_PREFIX_USER & 31) << 3
    data = bytes([b1, b2]) + seed32
    return _b32encode(data + _crc16(data).to_bytes(2, "little"))


def user_public_key(seed32):
    data = bytes([_PREFIX_USER]) + ed25519_public_key(seed32)
    return _b32encode(data + _crc16(data).to_bytes(2, "little"))


def sign_nonce(seed_text, nonce):
    """(public 'U...' key, base64url signature of the server nonce)."""
    seed32 = decode_user_seed(seed_text)
    sig = ed25519_sign(seed32, nonce.encode("utf-8"))
    return user_public_key(seed32), base64.urlsafe_b64encode(sig).decode("ascii").rstrip("=")


_CREDS = re.compile(r"-{3,}[^\n]*BEGIN ([A-Z ]+)-{3,}\s*\n(.*?)\n\s*-{3,}[^\n]*END", re.S)


def parse_creds(text):
    """(jwt, seed) from the text of a NATS .creds file."""
    found = {}
    for kind, body in _CREDS.findall(text):
        found.setdefault("jwt" if "JWT" in kind else "seed", body.strip())
    if "jwt" not in found or "seed" not in found:
        raise AuthFailed("the credentials file has no user JWT and nkey seed")
    return found["jwt"], found["seed"]


# --------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------


def parse_server_url(url):
    """(scheme, host, port) of nats://host:port or tls://host:port."""
    m = re.match(r"^(nats|tls)://(?:[^@/]*@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?/?$", url or "")
    if not m:
        raise ConnectFailed("invalid NATS server URL %r" % (url,))
    host = m.group(2).strip("[]")
    return m.group(1), host, int(m.group(3) or 4222)


class Client:
    """A blocking NATS client: one socket, one reply subscription, bounded timeouts."""

    def __init__(
        self,
        servers,
        user=None,
        password=None,
        token=None,
        creds_file=None,
        nkey_seed=None,
        tls=False,
        tls_ca_file=None,
        tls_cert_file=None,
        tls_key_file=None,
        connect_timeout=2.0,
        name="pgnats",
        creds=None,
        tls_ca_pem=None,
        tls_cert_pem=None,
        tls_key_pem=None,
    ):
        self.servers = list(servers)
        self.user, self.password, self.token = user, password, token
        self.creds_file, self.nkey_seed, self.creds = creds_file, nkey_seed, creds
        self.tls, self.tls_ca_file = tls, tls_ca_file
        self.tls_cert_file, self.tls_key_file = tls_cert_file, tls_key_file
        self.tls_ca_pem, self.tls_cert_pem, self.tls_key_pem = tls_ca_pem, tls_cert_pem, tls_key_pem
        self.connect_timeout = connect_timeout
        self.name = name
        self.sock = None
        self.info = {}
        self.parser = None
        self.inbox = None
        self.counter = 0
        self.connected_url = None

    # -- connection ----------------------------------------------------------------

    def connect(self):
        errors = []
        for url in self.servers:
            try:
                self._connect_one(url)
                self.connected_url = url
                return
            except AuthFailed:
                self.close()
                raise
            except (OSError, NatsError) as exc:
                self.close()
                errors.append("%s: %s" % (url, exc))
        raise ConnectFailed("cannot connect to NATS (%s)" % "; ".join(errors))

    def _connect_one(self, url):
        scheme, host, port = parse_server_url(url)
        deadline = time.monotonic() + self.connect_timeout
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.parser = Parser()
        info = None
        while info is None:
            for op in self._read_ops(deadline):
                if op[0] == "INFO":
                    info = op[1]
        self.info = info
        if scheme == "tls" or self.tls or info.get("tls_required"):
            ctx = tls_context(
                self.tls_ca_file,
                self.tls_cert_file,
                self.tls_key_file,
                self.tls_ca_pem,
                self.tls_cert_pem,
                self.tls_key_pem,
            )
            self.sock = ctx.wrap_socket(self.sock, server_hostname=host)
        options = {
            "verbose": False,
            "pedantic": False,
            "lang": "python-plpython",
            "version": VERSION,
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "name": self.name,
            "tls_required": bool(scheme == "tls" or self.tls),
        }
        if self.user is not None:
            options["user"], options["pass"] = self.user, self.password or ""
        if self.token is not None:
            options["auth_token"] = self.token
        nonce = info.get("nonce")
        if self.creds or self.creds_file:
            if self.creds:
                jwt, seed = parse_creds(self.creds)
            else:
                try:
                    with open(self.creds_file, encoding="utf-8") as fh:
                        jwt, seed = parse_creds(fh.read())
                except (OSError, ValueError, AuthFailed):
                    # One message whatever the reason: "missing", "permission denied" and "not a
                    # .creds file" apart would tell what exists on the database server.
                    raise AuthFailed(
                        "cannot read the credentials file of this configuration (missing, unreadable or not a "
                        ".creds file)"
                    ) from None
            options["jwt"] = jwt
            if nonce:
                options["sig"] = sign_nonce(seed, nonce)[1]
        elif self.nkey_seed:
            if not nonce:
                raise AuthFailed("the server sent no nonce: it is not configured for nkey authentication")
            options["nkey"], options["sig"] = sign_nonce(self.nkey_seed, nonce)
        self.inbox = "_INBOX." + uuid.uuid4().hex
        self.sock.sendall(encode_connect(options) + ("SUB %s.* 1\r\n" % self.inbox).encode() + b"PING\r\n")
        while True:
            for op in self._read_ops(deadline):
                if op[0] == "PONG":
                    return
                if op[0] == "ERR":
                    msg = op[1]
                    if "authorization" in msg.lower() or "authentication" in msg.lower():
                        raise AuthFailed("NATS refused the credentials: %s" % msg)
                    raise ServerError("NATS refused the connection: %s" % msg)

    def close(self):
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.parser = None

    def _read_ops(self, deadline, spin=0.0):
        data = None
        if spin > 0 and not isinstance(self.sock, ssl.SSLSocket):
            # A JetStream ack usually arrives within a few hundred microseconds; polling for it
            # costs less than putting this backend to sleep and waking it up again.
            self.sock.setblocking(False)
            until = time.perf_counter() + spin
            while data is None:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    if time.perf_counter() > until:
                        break
        if data is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("timed out waiting for NATS")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout as exc:
                raise RequestTimeout("timed out waiting for NATS") from exc
        if not data:
            raise ConnectFailed("NATS closed the connection")
        ops = self.parser.feed(data)
        out = []
        for op in ops:
            if op[0] == "PING":
                self.sock.sendall(b"PONG\r\n")
            else:
                out.append(op)
        return out

    def _drain_idle(self):
        """Handle what arrived while idle (PINGs, -ERR, EOF) so a dead connection is noticed before use."""
        while self.sock is not None:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                return
            try:
                self._read_ops(time.monotonic() + 1.0)
            except NatsError:
                self.close()
                return
            except OSError:
                self.close()
                return

    def ensure_connected(self):
        if self.sock is not None:
            self._drain_idle()
        if self.sock is None:
            self.connect()

    # -- requests ------------------------------------------------------------------

    def request(self, subject, payload, header_items=None, timeout=5.0):
        """Publish with a reply subject and return (header_block, payload) of the reply."""
        self.ensure_connected()
        max_payload = self.info.get("max_payload")
        size = len(payload) + (len(encode_headers(header_items)) if header_items else 0)
        if max_payload and size > max_payload:
            raise PayloadTooLarge(
                "message of %d bytes exceeds the server's max_payload of %d bytes" % (size, max_payload)
            )
        self.counter += 1
        reply = "%s.%d" % (self.inbox, self.counter)
        deadline = time.monotonic() + timeout
        try:
            self.sock.sendall(encode_pub(subject, reply, payload, header_items))
            while True:
                for op in self._read_ops(deadline, SPIN_SECONDS):
                    if op[0] == "MSG" and op[1] == reply:
                        return op[4], op[5]
                    if op[0] == "ERR":
                        raise ServerError("NATS error: %s" % op[1])
        except RequestTimeout:
            # A late reply would be mistaken for the next one's; start clean.
            self.close()
            raise
        except (OSError, ConnectFailed) as exc:
            self.close()
            raise ConnectFailed("lost the connection to NATS during the request: %s" % exc) from exc
        except ProtocolError:
            self.close()
            raise

    def publish(self, subject, payload, headers=None, msg_id=None, timeout=5.0):
        """Publish to JetStream and wait for the PubAck: {"stream", "seq", "duplicate"}."""
        validate_subject(subject)
        items = normalize_headers(headers)
        if msg_id:
            msg_id = validate_message_id(str(msg_id))
            items = [(k, v) for k, v in items if k.lower() != "nats-msg-id"] + [("Nats-Msg-Id", msg_id)]
        hdr, body = self.request(subject, payload, items, timeout)
        return parse_pub_ack(hdr, body, subject)

    def js_api(self, api, body=b"", timeout=5.0):
        hdr, reply = self.request("$JS.API." + api, body, None, timeout)
        status, _desc, _ = parse_header_block(hdr)
        if status == 503:
            raise ServerError("JetStream is not enabled for this account (no responders on $JS.API)")
        return json.loads(reply.decode("utf-8"))

    def rtt(self, timeout=5.0):
        self.ensure_connected()
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        self.sock.sendall(b"PING\r\n")
        while True:
            for op in self._read_ops(deadline):
                if op[0] == "PONG":
                    return (time.perf_counter() - start) * 1000.0


# --------------------------------------------------------------------------------------
# Glue for the SQL functions
# --------------------------------------------------------------------------------------

_CONFIG_SQL = """
SELECT config_name, nats_url, nats_cluster_urls, auth_type, nats_user, nats_password, auth_token,
       auth_credentials_file, auth_nkey_seed, tls_enabled, tls_ca_file, tls_cert_file, tls_key_file,
       auth_credentials, tls_ca_pem, tls_cert_pem, tls_key_pem,
       connect_timeout_seconds::float8 AS connect_timeout, request_timeout_seconds::float8 AS request_timeout,
       publish_registered_subjects_only AS registered_only, updated_at::text AS version
  FROM public.rule_nats_config WHERE config_name = $1
"""

# The subject filters that SQL publishes may target (publish_registered_subjects_only).
_STREAM_SUBJECTS_SQL = """
SELECT coalesce(array_agg(f), '{}') AS filters
  FROM public.rule_nats_streams s, unnest(s.subjects) AS f
 WHERE s.enabled AND s.config_name = $1
"""

# History rows are collected per transaction and written in one statement when it commits
# (a deferred constraint trigger calls Publisher.flush_history): one INSERT per publish
# cost as much as the JetStream round trip itself.
_HISTORY_SQL = """
INSERT INTO public.rule_nats_publish_history
    (published_at, config_name, webhook_id, subject, payload, headers, message_id, stream_name,
     sequence_number, duplicate, success, error_message, latency_ms, triggered_by)
SELECT to_timestamp(r.at), r.config_name, r.webhook_id, r.subject, r.payload::jsonb, r.headers::jsonb,
       r.message_id, r.stream_name, r.seq, coalesce(r.duplicate, false), r.success, r.error, r.latency_ms,
       r.triggered_by
  FROM unnest($1::float8[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::text[],
              $8::text[], $9::int8[], $10::bool[], $11::bool[], $12::text[], $13::float8[], $14::text[])
       AS r(at, config_name, webhook_id, subject, payload, headers, message_id, stream_name, seq, duplicate,
            success, error, latency_ms, triggered_by)
"""
_FAILURE_SQL = "SELECT public.rule_nats__record_failure_autonomously($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8) AS recorded"


def sqlstate_of(err):
    """The SQLSTATE a failed publish is raised with by the SQL functions (PostgreSQL's classes)."""
    return SQLSTATES.get(err.reason, "58000")


def error_info(err, latency_ms=None):
    """What the SQL wrappers raise (or rule_nats_try_publish returns) for a failed publish."""
    out = {
        "ok": False,
        "error": str(err),
        "reason": err.reason,
        "hint": err.hint,
        "sqlstate": sqlstate_of(err),
    }
    if latency_ms is not None:
        out["latency_ms"] = round(latency_ms, 3)
    return out


# Errors in the caller's arguments: SQLSTATE 22023 (invalid_parameter_value), not a NATS error.
INVALID_ARGUMENT_REASONS = frozenset(
    (
        "invalid_subject",
        "invalid_header",
        "invalid_payload",
        "invalid_message_id",
        "invalid_url",
        "reserved_subject",
        "unregistered_subject",
    )
)

# One SQLSTATE per reason, from PostgreSQL's own classes, so that callers can tell a bad argument
# (22...) from a missing object (42704) from a connection problem (08...) without parsing text.
SQLSTATES = {
    "invalid_subject": "22023",
    "invalid_header": "22023",
    "invalid_payload": "22P02",
    "invalid_message_id": "22023",
    "invalid_url": "22023",
    "reserved_subject": "22023",
    "unregistered_subject": "22023",
    "no_config": "42704",
    "no_stream": "42704",
    "nats_unreachable": "08001",
    "nats_auth": "08004",
    "timeout": "08006",
    "protocol_error": "08P01",
    "payload_too_large": "54000",
    "server_error": "58000",
    "nats_error": "58000",
}
_TXID_SQL = "SELECT txid_current() AS t"
_MARK_SQL = "INSERT INTO rule_nats_private.history_flush (txid) VALUES ($1)"
_UNMARK_SQL = "DELETE FROM rule_nats_private.history_flush WHERE txid = $1"


def tls_context(ca_file=None, cert_file=None, key_file=None, ca_pem=None, cert_pem=None, key_pem=None):
    """An SSL context from PEM text (rule_nats_config.tls_*_pem) or, set by a superuser, files.

    Any failure gives one message: which file is missing or unreadable is not for the caller to
    learn (the files are the database server's).
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file, cadata=ca_pem)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
        elif cert_pem:
            _load_cert_chain_pem(ctx, cert_pem, key_pem)
    except (OSError, ValueError):
        raise ConnectFailed(
            "the TLS settings of this configuration cannot be used (a CA, certificate or key that is "
            "missing, unreadable or invalid)"
        ) from None
    return ctx


def _load_cert_chain_pem(ctx, cert_pem, key_pem):
    # ssl loads a certificate chain from a file only: a private directory, removed at once.
    folder = tempfile.mkdtemp(prefix="pgnats-")
    try:
        path = os.path.join(folder, "client.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(cert_pem.rstrip("\n") + "\n" + (key_pem or ""))
        ctx.load_cert_chain(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def client_from_config(row):
    auth = row["auth_type"]
    servers = [row["nats_url"], *(row["nats_cluster_urls"] or [])]
    return Client(
        servers,
        user=row["nats_user"] if auth == "user_password" else None,
        password=row["nats_password"] if auth == "user_password" else None,
        token=row["auth_token"] if auth == "token" else None,
        creds_file=row["auth_credentials_file"] if auth == "credentials" else None,
        nkey_seed=row["auth_nkey_seed"] if auth == "nkey" else None,
        tls=row["tls_enabled"],
        tls_ca_file=row["tls_ca_file"],
        tls_cert_file=row["tls_cert_file"],
        tls_key_file=row["tls_key_file"],
        connect_timeout=row["connect_timeout"],
        name="postgres pid %d" % os.getpid(),
        creds=row.get("auth_credentials") if auth == "credentials" else None,
        tls_ca_pem=row.get("tls_ca_pem"),
        tls_cert_pem=row.get("tls_cert_pem"),
        tls_key_pem=row.get("tls_key_pem"),
    )


class Publisher:
    """Per-session state kept in GD: prepared plans and one client per configuration."""

    def __init__(self, plpy):
        self.plpy = plpy
        self.config_plan = plpy.prepare(_CONFIG_SQL, ["text"])
        self.history_plan = plpy.prepare(
            _HISTORY_SQL,
            [
                "float8[]",
                "text[]",
                "int4[]",
                "text[]",
                "text[]",
                "text[]",
                "text[]",
                "text[]",
                "int8[]",
                "bool[]",
                "bool[]",
                "text[]",
                "float8[]",
                "text[]",
            ],
        )
        self.txid_plan = plpy.prepare(_TXID_SQL)
        self.streams_plan = plpy.prepare(_STREAM_SUBJECTS_SQL, ["text"])
        self.filters = {}  # config_name -> (filters, checked_at)
        self.warned_unrecorded = False
        self.failure_plan = plpy.prepare(
            _FAILURE_SQL, ["text", "int4", "text", "text", "text", "text", "text", "float8"]
        )
        self.mark_plan = plpy.prepare(_MARK_SQL, ["int8"])
        self.unmark_plan = plpy.prepare(_UNMARK_SQL, ["int8"])
        self.pending = []  # history rows of the current transaction, written at commit
        self.pending_txid = None
        self.clients = {}  # config_name -> (version, Client, request_timeout, checked_at, registered_only)

    def client(self, config_name):
        """The client for a configuration, re-reading the row at most every CONFIG_TTL seconds.

        Reading rule_nats_config on every call cost as much as the rest of the call; a
        change made in this session applies at once (the table's trigger calls
        invalidate()), one made elsewhere within CONFIG_TTL seconds.
        """
        now = time.monotonic()
        cached = self.clients.get(config_name)
        if cached is not None and now - cached[3] < CONFIG_TTL:
            return cached[1], cached[2]
        rows = self.plpy.execute(self.config_plan, [config_name])
        if not rows:
            raise ConfigMissing("no NATS configuration named %r in rule_nats_config" % (config_name,))
        row = rows[0]
        if cached is not None and cached[0] == row["version"]:
            self.clients[config_name] = (cached[0], cached[1], cached[2], now, cached[4])
            return cached[1], cached[2]
        if cached is not None:
            cached[1].close()
        client = client_from_config(row)
        self.clients[config_name] = (
            row["version"],
            client,
            row["request_timeout"],
            now,
            row["registered_only"],
        )
        return client, row["request_timeout"]

    def check_registered(self, config_name, subject):
        """Refuse a subject no enabled registered stream of the configuration captures (unless allowed).

        Read with the configuration (at most every CONFIG_TTL seconds): a publisher may only
        reach the streams a DBA registered, not every stream its NATS account can see.
        """
        if not self.clients[config_name][4]:
            return
        now = time.monotonic()
        cached = self.filters.get(config_name)
        if cached is None or now - cached[1] >= CONFIG_TTL:
            cached = (self.plpy.execute(self.streams_plan, [config_name])[0]["filters"], now)
            self.filters[config_name] = cached
        for pattern in cached[0]:
            if subject_matches(pattern, subject):
                return
        raise UnregisteredSubject(
            "subject %r is not captured by a registered stream of configuration %r"
            % (subject[:200], config_name)
        )

    def invalidate(self):
        """Forget when configurations were last read, so the next call re-reads them."""
        for name, cached in list(self.clients.items()):
            self.clients[name] = (cached[0], cached[1], cached[2], float("-inf"), cached[4])
        self.filters.clear()

    def record(
        self,
        config_name,
        webhook_id,
        subject,
        payload,
        headers,
        msg_id,
        result,
        error,
        latency_ms,
        triggered_by="sql",
    ):
        """Queue a history row; it is written when the transaction commits."""
        txid = self.plpy.execute(self.txid_plan)[0]["t"]
        if txid != self.pending_txid:
            if self.pending:
                # Left over from a transaction that rolled back: its publishes did happen.
                self._write(self.pending)
            self.pending = []
            self.pending_txid = txid
            self.plpy.execute(self.mark_plan, [txid])
        self.pending.append(
            (
                time.time(),
                config_name,
                webhook_id,
                subject,
                payload,
                json.dumps(redact_headers(headers)) if headers else None,
                msg_id,
                result.get("stream") if result else None,
                result.get("seq") if result else None,
                result.get("duplicate") if result else None,
                error is None,
                error,
                latency_ms,
                triggered_by,
            )
        )

    def record_failure(self, config_name, webhook_id, subject, payload, headers, msg_id, err, latency_ms):
        """Record a failed publish in its own transaction: the caller is about to get an error."""
        hdr = json.dumps(redact_headers(headers)) if headers else None
        recorded = False
        try:
            with self.plpy.subtransaction():
                recorded = self.plpy.execute(
                    self.failure_plan,
                    [config_name, webhook_id, subject, payload, hdr, msg_id, str(err), latency_ms],
                )[0]["recorded"]
        except self.plpy.SPIError as exc:
            self.plpy.warning("rule_nats: failure not recorded: %s" % exc)
            recorded = None
        if recorded is None:
            # NULL: the failure log is enabled but could not record this one (the WARNING before
            # this one says why); saying "not enabled" would send the reader the wrong way.
            self.plpy.warning(
                "rule_nats: this failed publish is not recorded in rule_nats_publish_history: the failure log is "
                "enabled but could not be reached (SELECT rule_nats_failure_log_check(); docs/security.md)"
            )
        elif not recorded and not self.warned_unrecorded:
            # Once per session: the failure row of a raising publish dies with the caller's
            # transaction unless a superuser enabled the failure log (docs/security.md).
            self.warned_unrecorded = True
            self.plpy.warning(
                "rule_nats: failed publishes are not recorded in rule_nats_publish_history in this database "
                "(the failure log is not enabled); see docs/security.md"
            )

    def flush_history(self):
        """Write the queued rows (called at commit by the deferred trigger)."""
        rows, self.pending = self.pending, []
        if rows:
            self._write(rows)
        if self.pending_txid is not None:
            self.plpy.execute(self.unmark_plan, [self.pending_txid])

    def _write(self, rows):
        self.plpy.execute(self.history_plan, [list(col) for col in zip(*rows, strict=True)])

    def publish(
        self, subject, payload, headers_json=None, msg_id=None, config_name="default", webhook_id=None
    ):
        """Publish JSON text ``payload``; return (result dict, error NatsError or None, latency_ms, headers)."""
        headers = None
        start = time.perf_counter()
        try:
            if headers_json is not None:
                headers = json.loads(headers_json)
            validate_subject(subject)
            check_sql_publish(headers, msg_id)
            client, timeout = self.client(config_name)
            self.check_registered(config_name, subject)
            result = client.publish(subject, payload.encode("utf-8"), headers, msg_id, timeout)
            return result, None, (time.perf_counter() - start) * 1000.0, headers
        except NatsError as exc:
            return None, exc, (time.perf_counter() - start) * 1000.0, headers

    def health(self, config_name):
        out = {"config_name": config_name}
        try:
            client, timeout = self.client(config_name)
            client.ensure_connected()
            out["connected_url"] = client.connected_url
            out["server_version"] = client.info.get("version")
            out["server_name"] = client.info.get("server_name")
            out["max_payload"] = client.info.get("max_payload")
            out["jetstream"] = bool(client.info.get("jetstream"))
            out["rtt_ms"] = round(client.rtt(timeout), 3)
            account = client.js_api("INFO", b"", timeout)
            if "error" in account:
                out["jetstream_error"] = account["error"].get("description")
            else:
                out["jetstream_account"] = {
                    k: account.get(k) for k in ("memory", "storage", "streams", "consumers", "limits", "api")
                }
            out["ok"] = True
        except NatsError as exc:
            out["ok"] = False
            out["error"] = str(exc)
            out["reason"] = exc.reason
        return out
$pgnats$::text$pgnats_fn$;
COMMENT ON FUNCTION rule_nats__pgnats_source() IS 'Internal: source of the pgnats PL/Python module (plpython/pgnats.py).';
-- END EMBEDDED plpython/pgnats.py
REVOKE ALL ON FUNCTION rule_nats__pgnats_source() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__pgnats_source() TO rule_nats_definer;

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('30_pgnats.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
