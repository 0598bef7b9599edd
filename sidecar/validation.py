"""Whole-string validation of subjects, header names and values, message ids and URLs (pure, no I/O).

The rules are the ones in the docstring of ``tests/security/cases.py`` (and docs/security.md);
SQL and the PL/Python code inside PostgreSQL implement the same rules, and one table of cases
runs against all three. Each ``check_*`` returns the value unchanged or raises ``InvalidInput``.

Every pattern is applied with ``re.fullmatch``: ``$`` also matches before a trailing newline,
which is exactly the byte that turns a subject or a header into a second protocol line.

``redact_url`` and ``redact_urls_in`` are for what the sidecar logs or writes to PostgreSQL:
NATS URLs may carry ``user:password@`` (``NATS_URL`` from the environment) and webhook URLs
may carry tokens in their query string.
"""

from __future__ import annotations

import re

from sidecar.errors import InvalidInput

SUBJECT_MAX = 1024
HEADER_NAME_MAX = 256
HEADER_VALUE_MAX = 8192
MESSAGE_ID_MAX = 256
WEBHOOK_URL_MAX = 2048

# A subject token: anything but the separator, the wildcards, controls (C0, DEL, C1) and space.
_SUBJECT_PART = r"[^.*>\x00-\x20\x7f-\x9f]+"
_SUBJECT = re.compile(rf"{_SUBJECT_PART}(?:\.{_SUBJECT_PART})*")
_FILTER = re.compile(rf"(?:(?:{_SUBJECT_PART}|\*)\.)*(?:{_SUBJECT_PART}|\*|>)")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1," + str(HEADER_NAME_MAX) + "}")
_HEADER_VALUE = re.compile(r"[^\r\n\x00]{0," + str(HEADER_VALUE_MAX) + "}")
_MESSAGE_ID = re.compile(r"(?! )[^\x00-\x1f\x7f]{1," + str(MESSAGE_ID_MAX) + r"}(?<! )")
# Host part: up to the first / ? or #, never empty, never with userinfo.
_WEBHOOK_URL = re.compile(r"(?i:https?)://[^/?#@\x00-\x20\x7f]+(?:[/?#][^\x00-\x20\x7f]*)?")
_NATS_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[^\[\]/?#@:\s\x00-\x20\x7f-\x9f]+)"
_NATS_URL = re.compile(rf"(?:nats|tls)://{_NATS_HOST}(?::[0-9]{{1,5}})?/?")

# scheme://[userinfo@]rest, as found inside free text (error messages from drivers).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,]+")


def _show(value: str) -> str:
    """The start of a refused value, quoted so that controls are visible in the message."""
    return repr(value[:80]) + ("..." if len(value) > 80 else "")


def is_reserved_subject(subject: str) -> bool:
    """True when the first token starts with ``$`` (JetStream API, KV, system account, ...) or is
    ``_INBOX`` (reply inboxes): publishing there reaches the server's own machinery."""
    first = subject.split(".", 1)[0]
    return first.startswith("$") or first == "_INBOX"


def subject_matches(subject_filter: str, subject: str) -> bool:
    """True when the filter captures the subject: ``*`` is one token, ``>`` one or more trailing
    tokens (SQL: rule_nats_subject_matches)."""
    parts = subject.split(".")
    wanted = subject_filter.split(".")
    for i, part in enumerate(wanted):
        if part == ">":
            return len(parts) > i
        if i >= len(parts) or part not in ("*", parts[i]):
            return False
    return len(wanted) == len(parts)


def check_subject(subject: str) -> str:
    """A subject to publish to: tokens without wildcards, whitespace or controls; not reserved."""
    if not 1 <= len(subject) <= SUBJECT_MAX:
        raise InvalidInput(f"subject must have 1-{SUBJECT_MAX} characters, got {len(subject)}")
    if not _SUBJECT.fullmatch(subject):
        raise InvalidInput(
            f"subject {_show(subject)}: use dot-separated non-empty tokens without wildcards, "
            "spaces or control characters"
        )
    if is_reserved_subject(subject):
        raise InvalidInput(f"subject {_show(subject)} is reserved ($-prefixed first token or _INBOX)")
    return subject


def check_subject_filter(subject: str) -> str:
    """A stream subject or consumer filter: like a subject, but a token may be ``*`` and the last ``>``."""
    if not 1 <= len(subject) <= SUBJECT_MAX:
        raise InvalidInput(f"subject filter must have 1-{SUBJECT_MAX} characters, got {len(subject)}")
    if not _FILTER.fullmatch(subject):
        raise InvalidInput(
            f"subject filter {_show(subject)}: use dot-separated non-empty tokens, * as a whole token, "
            "> only as the last token, no spaces or control characters"
        )
    if is_reserved_subject(subject):
        raise InvalidInput(f"subject filter {_show(subject)} is reserved ($-prefixed first token or _INBOX)")
    return subject


def check_header_name(name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise InvalidInput(
            f"header name {_show(name)}: use 1-{HEADER_NAME_MAX} of A-Z a-z 0-9 ! # $ % & ' * + - . ^ _ ` | ~"
        )
    return name


def check_header_value(value: str) -> str:
    if not _HEADER_VALUE.fullmatch(value):
        raise InvalidInput(
            f"header value {_show(value)}: at most {HEADER_VALUE_MAX} characters, no CR, LF or NUL"
        )
    return value


def check_message_id(message_id: str) -> str:
    if not _MESSAGE_ID.fullmatch(message_id):
        raise InvalidInput(
            f"message id {_show(message_id)}: 1-{MESSAGE_ID_MAX} characters, no control characters, "
            "no leading or trailing space"
        )
    return message_id


# The shapes of the ids this project generates (outbox-..., replay-..., stream-...): a caller's id in
# one of them could claim a generated message's identity (JetStream de-duplicates by Nats-Msg-Id,
# receivers by webhook-id), so callers' ids may not take them (SQL: rule_nats_message_id_reserved).
_RESERVED_MESSAGE_ID = re.compile(r"(?i:outbox|replay|stream)-")
FALLBACK_ID_PREFIX = "stream-"


def is_reserved_message_id(message_id: str) -> bool:
    return _RESERVED_MESSAGE_ID.match(message_id) is not None


def check_caller_message_id(message_id: str) -> str:
    """A message id a caller chose: a valid message id, not in a generated shape."""
    check_message_id(message_id)
    if is_reserved_message_id(message_id):
        raise InvalidInput(
            f"message id {_show(message_id)} has the shape of a generated id (outbox-, replay- or stream-)"
        )
    return message_id


def check_nats_header_name(name: str) -> str:
    """A header name that may reach JetStream from SQL, the outbox or a replay: a valid name, and
    no Nats-* header but Nats-Msg-Id (Nats-Rollup purges a stream, Nats-Expected-*, Nats-TTL, ...
    are instructions to the server). SQL: rule_nats_nats_header_allowed."""
    check_header_name(name)
    lower = name.lower()
    if lower.startswith("nats-") and lower != "nats-msg-id":
        raise InvalidInput(f"header {_show(name)} is a NATS control header (only Nats-Msg-Id may be sent)")
    return name


def fallback_message_id(stream: str, seq: int | None) -> str:
    """The identity of a message that has no valid one of its own: from its place in the stream."""
    return f"{FALLBACK_ID_PREFIX}{stream}-{seq}"


def own_message_id(candidate: str | None, stream: str, seq: int | None, replayed: bool = False) -> str:
    """The message id a delivered message is sent (webhook-id) and recorded under: ``candidate``
    (event id, replayed original id or Nats-Msg-Id) when it obeys the message-id rules and is not a
    stream-... id of another message, else stream-<stream>-<seq>. A NUL, a control character or
    8,000 characters from a NATS header never reach a receiver, and what is stored is what was sent.
    ``replayed``: the candidate is the original id of a replayed dead letter, which may be the
    stream-... id of the message that was dead-lettered (the replay is that message again)."""
    fallback = fallback_message_id(stream, seq)
    if not candidate or candidate == fallback:
        return fallback
    if not _MESSAGE_ID.fullmatch(candidate):
        return fallback
    if not replayed and candidate[:7].lower() == FALLBACK_ID_PREFIX:
        return fallback
    return candidate


def check_webhook_url(url: str) -> str:
    if len(url) > WEBHOOK_URL_MAX:
        raise InvalidInput(f"webhook URL longer than {WEBHOOK_URL_MAX} characters ({len(url)})")
    if not _WEBHOOK_URL.fullmatch(url):
        raise InvalidInput(
            f"webhook URL {_show(redact_url(url))}: use http(s)://host[/path][?query], no user:password@, "
            "no spaces or control characters"
        )
    return url


def check_nats_url(url: str) -> str:
    if not _NATS_URL.fullmatch(url):
        raise InvalidInput(
            f"NATS URL {_show(redact_url(url))}: use nats://host[:port] or tls://host[:port]; "
            "credentials go in their own columns, not in the URL"
        )
    return url


def redact_url(url: str) -> str:
    """The URL without a password or token in its userinfo and without its query string.

    ``nats://user:pw@h:4222`` -> ``nats://user:***@h:4222``; ``nats://token@h`` -> ``nats://***@h``;
    ``https://h/p?token=x`` -> ``https://h/p?...``. Never raises: anything may reach a log line.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority_end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1:
            authority_end = min(authority_end, i)
    authority, tail = rest[:authority_end], rest[authority_end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _secret = userinfo.partition(":")
        # A lone name is a token (nats://token@host): nothing of it may show.
        authority = f"{user}:***@{host}" if colon else f"***@{host}"
    query = tail.find("?")
    if query != -1:
        tail = tail[:query] + "?..."
    return f"{scheme}://{authority}{tail}"


def redact_urls_in(text: str) -> str:
    """Every URL inside free text (a driver's error message, a log line) passed through redact_url."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
