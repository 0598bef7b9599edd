"""One table of validation cases for subjects, header names and values, message ids and URLs.

The same rules are implemented three times, because they run in three places:
  * SQL: the CHECK constraints and plpgsql functions (``rule_nats_valid_*``, ``rule_nats_subject_reserved``);
  * PL/Python: ``plpython/pgnats.py`` (runs inside PostgreSQL, standard library only);
  * the sidecar: ``sidecar/validation.py``.
``tests/security/test_validation_rules.py`` runs every case against all three, so they cannot
drift apart. The rules (docs/security.md says the same):

subject (publish)   1-1024 characters; dot-separated non-empty tokens; no ``*`` or ``>``
                    anywhere; no character U+0000-U+0020 or U+007F-U+009F anywhere
                    (controls, space, CR, LF, NUL, tab); not reserved.
subject_filter      the same, but a token may be ``*`` and the last token may be ``>``.
reserved            the first token starts with ``$`` ($JS, $KV, $O, $SYS, $MQTT, $NRG, ...)
                    or is ``_INBOX``. Refused as a publish subject and as a filter.
header_name         1-256 characters of the HTTP token set ``!#$%&'*+-.^_`|~0-9A-Za-z``.
header_value        at most 8192 characters; no CR, LF or NUL anywhere.
message_id          1-256 characters; no character U+0000-U+001F or U+007F (so no CR, LF,
                    NUL or tab); no leading or trailing space.
webhook_url         at most 2048 characters; ``http://`` or ``https://`` (any case), a
                    non-empty host part without ``@`` (no user:password@); then nothing or
                    ``/``, ``?`` or ``#`` and the rest; no character U+0000-U+0020 or U+007F
                    anywhere.
caller_message_id   a message id (above) that a caller chose (msg_id, message_id, a Nats-Msg-Id
                    header): not starting with ``outbox-``, ``replay-`` or ``stream-`` in any case,
                    the shapes of the ids the project generates (issue 19).
nats_header_name    a header name (above) that may reach JetStream from SQL, the outbox or a
                    replay: no ``Nats-`` prefix (any case) except ``Nats-Msg-Id``.
nats_url            ``nats://`` or ``tls://``, host[:port], optional trailing ``/``; no userinfo
                    (credentials go in their own columns); no whitespace or controls.

Every rule is a whole-string match: a trailing newline is refused like any other newline.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    kind: str
    value: str
    valid: bool
    why: str = ""


CASES: tuple[Case, ...] = (
    # --- publish subjects
    Case("subject", "webhooks.orders", True),
    Case("subject", "a", True),
    Case("subject", "a.b-c_d.Ü.42", True, "non-ASCII letters are fine"),
    Case("subject", "_inbox.lowercase", True, "only _INBOX is reserved (case-sensitive)"),
    Case("subject", "x$.JS", True, "$ only reserved at the start of the first token"),
    Case("subject", "a." + "b" * 1022, True, "1024 characters"),
    Case("subject", "a." + "b" * 1023, False, "1025 characters"),
    Case("subject", "", False, "empty"),
    Case("subject", "a..b", False, "empty token"),
    Case("subject", ".a", False, "empty first token"),
    Case("subject", "a.", False, "empty last token"),
    Case("subject", "a.*", False, "wildcard"),
    Case("subject", "a.>", False, "wildcard"),
    Case("subject", "a.b*c", False, "* inside a token"),
    Case("subject", "a b", False, "space"),
    Case("subject", "a\tb", False, "tab"),
    Case("subject", "webhooks.orders\n", False, "trailing newline"),
    Case("subject", "webhooks.orders\r\n", False, "trailing CRLF"),
    Case("subject", "webhooks\r\nPUB x 1", False, "protocol injection"),
    Case("subject", "a\x00b", False, "NUL"),
    Case("subject", "a\x7fb", False, "DEL"),
    Case("subject", "a\x85b", False, "C1 control (NEL)"),
    Case("subject", "a\u00a0b", True, "no-break space is not a protocol separator"),
    Case("subject", "$JS.API.STREAM.DELETE.WEBHOOKS", False, "JetStream API"),
    Case("subject", "$JS.API.STREAM.PURGE.WEBHOOKS", False, "JetStream API"),
    Case("subject", "$JS.API.CONSUMER.DELETE.WEBHOOKS.w", False, "JetStream API"),
    Case("subject", "$KV.bucket.key", False, "KV"),
    Case("subject", "$O.bucket.x", False, "object store"),
    Case("subject", "$SYS.REQ.SERVER.PING", False, "system account"),
    Case("subject", "$MQTT.sess.x", False, "MQTT"),
    Case("subject", "$NRG.x", False, "raft"),
    Case("subject", "$G", False, "any $-prefixed first token"),
    Case("subject", "$", False, "bare $"),
    Case("subject", "_INBOX.abc", False, "reply inboxes"),
    Case("subject", "_INBOX", False, "reply inboxes"),
    # --- subject filters (stream subjects, consumer filters)
    Case("subject_filter", "webhooks.>", True),
    Case("subject_filter", "webhooks.*.created", True),
    Case("subject_filter", "*", True),
    Case("subject_filter", "webhooks.orders", True),
    Case("subject_filter", "webhooks.>.x", False, "> only last"),
    Case("subject_filter", "webhooks.a*", False, "* only as a whole token"),
    Case("subject_filter", "webhooks.>\n", False, "trailing newline"),
    Case("subject_filter", "webhooks. >", False, "space"),
    Case("subject_filter", "$JS.>", False, "reserved"),
    Case("subject_filter", "$KV.*.x", False, "reserved"),
    Case("subject_filter", "_INBOX.>", False, "reserved"),
    Case("subject_filter", "", False, "empty"),
    # --- header names
    Case("header_name", "X-Request-Id", True),
    Case("header_name", "Nats-Msg-Id", True),
    Case("header_name", "a!#$%&'*+-.^_`|~9", True, "every token character"),
    Case("header_name", "x" * 256, True, "256 characters"),
    Case("header_name", "x" * 257, False, "257 characters"),
    Case("header_name", "", False, "empty"),
    Case("header_name", "X-Test\n", False, "trailing newline"),
    Case("header_name", "X-Test\r\nNats-Expected-Stream", False, "injection"),
    Case("header_name", "X Test", False, "space"),
    Case("header_name", "X:Test", False, "colon"),
    Case("header_name", "X-Tëst", False, "non-ASCII"),
    Case("header_name", "X-\x00", False, "NUL"),
    # --- header values
    Case("header_value", "Bearer abc", True),
    Case("header_value", "", True, "empty value"),
    Case("header_value", "a\tb", True, "tab is allowed in HTTP field values"),
    Case("header_value", "ünïcode", True),
    Case("header_value", "x" * 8192, True),
    Case("header_value", "x" * 8193, False, "too long"),
    Case("header_value", "v\r\nNats-Expected-Stream: NOPE", False, "injection"),
    Case("header_value", "v\n", False, "trailing newline"),
    Case("header_value", "v\r", False, "CR"),
    Case("header_value", "v\x00", False, "NUL"),
    # --- message ids (Nats-Msg-Id, event_id, webhook-id)
    Case("message_id", "order-42", True),
    Case("message_id", "outbox-app db-17", True, "inner space"),
    Case("message_id", "9b2e6a4e-8d4a-4b8e-9a53-2d3f6f0c7e11", True),
    Case("message_id", "x" * 256, True),
    Case("message_id", "x" * 257, False, "too long"),
    Case("message_id", "", False, "empty"),
    Case("message_id", "id\r\nNats-Expected-Stream: NOPE", False, "injection"),
    Case("message_id", "id\n", False, "trailing newline"),
    Case("message_id", "id\x00", False, "NUL"),
    Case("message_id", "id\tx", False, "tab"),
    Case("message_id", " id", False, "leading space"),
    Case("message_id", "id ", False, "trailing space"),
    # --- message ids a caller chose: not in a generated shape
    Case("caller_message_id", "order-42", True),
    Case("caller_message_id", "outboxes-1", True, "only outbox- itself"),
    Case("caller_message_id", "my-outbox-1", True, "reserved at the start only"),
    Case("caller_message_id", "streams:1", True),
    Case("caller_message_id", "ORDERS:42", True, "the old stream:seq shape is no longer generated"),
    Case("caller_message_id", "outbox-abc-17", False, "generated shape"),
    Case("caller_message_id", "OUTBOX-abc-17", False, "any case"),
    Case("caller_message_id", "replay-abc-1-1", False, "generated shape"),
    Case("caller_message_id", "Replay-x", False, "any case"),
    Case("caller_message_id", "stream-ORDERS-42", False, "the sidecar's id for a message without one"),
    Case("caller_message_id", "outbox-", False, "the prefix alone"),
    Case("caller_message_id", "", False, "empty"),
    Case("caller_message_id", "id\n", False, "still a message id"),
    Case("caller_message_id", "x" * 257, False, "still a message id"),
    # --- header names that may reach JetStream from SQL
    Case("nats_header_name", "Nats-Msg-Id", True, "the one Nats-* header allowed"),
    Case("nats_header_name", "nats-msg-id", True, "any case"),
    Case("nats_header_name", "X-Request-Id", True),
    Case("nats_header_name", "Rule-Nats-Message-Id", True, "not a Nats- prefix"),
    Case("nats_header_name", "X-Nats-Rollup", True, "not a Nats- prefix"),
    Case("nats_header_name", "Nats", True, "no dash"),
    Case("nats_header_name", "NatsRollup", True, "no dash"),
    Case("nats_header_name", "Nats-Rollup", False, "purges a stream that allows roll-ups"),
    Case("nats_header_name", "NATS-ROLLUP", False, "any case"),
    Case("nats_header_name", "Nats-Expected-Stream", False, "control header"),
    Case("nats_header_name", "Nats-Expected-Last-Sequence", False, "control header"),
    Case("nats_header_name", "Nats-Expected-Last-Subject-Sequence", False, "control header"),
    Case("nats_header_name", "Nats-Expected-Last-Msg-Id", False, "control header"),
    Case("nats_header_name", "Nats-TTL", False, "control header"),
    Case("nats_header_name", "Nats-Marker-Reason", False, "control header"),
    Case("nats_header_name", "Nats-Msg-Id-X", False, "not Nats-Msg-Id itself"),
    Case("nats_header_name", "Nats-", False, "the prefix alone"),
    Case("nats_header_name", "bad name", False, "still a header name"),
    # --- webhook URLs
    Case("webhook_url", "https://hooks.example.com/orders", True),
    Case(
        "webhook_url",
        "http://127.0.0.1:8080/hook?token=abc",
        True,
        "a query string is allowed (hidden from the monitor)",
    ),
    Case("webhook_url", "HTTPS://Example.COM", True),
    Case("webhook_url", "https://[::1]:8443/x", True),
    Case("webhook_url", "https://example.com#frag", True),
    Case("webhook_url", "https://example.com/" + "a" * 2028, True, "2048 characters"),
    Case("webhook_url", "https://example.com/" + "a" * 2029, False, "2049 characters"),
    Case("webhook_url", "ftp://example.com/x", False, "scheme"),
    Case("webhook_url", "https://", False, "no host"),
    Case("webhook_url", "https:///path", False, "no host"),
    Case("webhook_url", "https://user:pass@example.com/x", False, "userinfo"),
    Case("webhook_url", "https://example.com/a b", False, "space"),
    Case("webhook_url", "https://example.com/x\n", False, "trailing newline"),
    Case("webhook_url", "https://example.com/x\r\nHost: evil", False, "CRLF"),
    Case("webhook_url", "https://exa\x00mple.com/", False, "NUL"),
    Case("webhook_url", "example.com/x", False, "relative"),
    # --- NATS server URLs
    Case("nats_url", "nats://127.0.0.1:4222", True),
    Case("nats_url", "tls://nats-1.example.com:4222/", True),
    Case("nats_url", "nats://nats", True),
    Case("nats_url", "nats://user:secret@127.0.0.1:4222", False, "userinfo: use nats_user/nats_password"),
    Case("nats_url", "nats://token@127.0.0.1:4222", False, "userinfo: use auth_token"),
    Case("nats_url", "http://127.0.0.1:4222", False, "scheme"),
    Case("nats_url", "nats://127.0.0.1:4222\n", False, "trailing newline"),
    Case("nats_url", "nats://127.0.0.1:422222", False, "port has at most 5 digits"),
    Case("nats_url", "nats://", False, "no host"),
)

KINDS = (
    "subject",
    "subject_filter",
    "header_name",
    "header_value",
    "message_id",
    "caller_message_id",
    "nats_header_name",
    "webhook_url",
    "nats_url",
)
