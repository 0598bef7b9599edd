"""Keeping one bad row from stopping the recording of all others (pure logic, no I/O).

PostgreSQL refuses some text Python holds happily: NUL characters (text and jsonb cannot store
them) and lone UTF-16 surrogates (not encodable as UTF-8). Such text arrives in event ids,
headers and response bodies, i.e. from whoever writes messages or runs an endpoint, so it is
escaped before it is written (``storable``). The original bytes stay where the schema keeps them
(``message_raw`` of dead letters and retries). For anything else a row may trip over (a value out
of range, an index row too large, a constraint), a batch that fails for a data error is split in
halves until the row is found (``bisect_write``); the others are recorded as usual.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# SQLSTATE classes that depend on the values written, not on the database's state: data exception
# (22: e.g. NUL, out of range), integrity constraint violation (23), program limit exceeded (54:
# e.g. an index row too large). Any other server error (connection, permissions, a missing table)
# hits every row alike, so splitting would not help: the batch waits and is tried again whole.
_DATA_ERROR_CLASSES = frozenset({"22", "23", "54"})


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def storable_text(text: str) -> str:
    """The text with NUL and lone surrogates written as the literal escapes ``\\u0000``, ``\\ud800``.

    Called for every text value recorded, so the common case (ASCII without NUL) is two C-level
    scans and returns the same object.
    """
    if text.isascii():
        return text if "\x00" not in text else text.replace("\x00", "\\u0000")
    return _UNSTORABLE.sub(_escape, text)


def storable(value: Any) -> Any:
    """A copy of the value that PostgreSQL accepts as text or jsonb (strings in dicts and lists too)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, Mapping):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(storable(v) for v in value)
    return value


def storable_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row with its text values storable; the row itself in the common case (every value of it
    is written for every delivery, so that case is one C-level scan of the texts joined)."""
    joined = "".join([v for v in row if type(v) is str])
    if joined.isascii() and "\x00" not in joined:
        return row
    return tuple(storable_text(v) if isinstance(v, str) else v for v in row)


def clip(text: str | None, limit: int) -> str | None:
    """At most ``limit`` characters, marked when cut (for fields that are indexed or displayed)."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[: limit - 20]}... ({len(text)} chars)"


def is_data_error(exc: BaseException) -> bool:
    """Did writing fail because of the values in the batch (split it), or because of the database
    (keep the batch and try again later)?"""
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is not None:  # the server's verdict (54000 is an OperationalError in DB-API terms)
            return state[:2] in _DATA_ERROR_CLASSES
        # No SQLSTATE: a lost connection or an exhausted pool, or else psycopg refused a value on
        # the client side (e.g. NUL in text).
        return not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    # Raised while adapting a value (UnicodeEncodeError for a lone surrogate, OverflowError, ...).
    return isinstance(exc, ValueError | TypeError | ArithmeticError)


async def bisect_write(
    items: Sequence[T],
    write: Callable[[Sequence[T]], Awaitable[None]],
    on_poison: Callable[[T, Exception], Awaitable[None]],
    data_error: Callable[[BaseException], bool] = is_data_error,
) -> None:
    """Write ``items`` with ``write`` (one transaction per call); when a call fails for a data error,
    split that part in halves and write each, until the failing items stand alone: those go to
    ``on_poison``. Parts are written in order. Any other error propagates at once; ``write`` has
    committed exactly the parts it returned from, so the caller knows what is left."""
    stack: list[Sequence[T]] = [items]
    while stack:
        part = stack.pop()
        if not part:
            continue
        try:
            await write(part)
        except Exception as exc:
            if not data_error(exc):
                raise
            if len(part) == 1:
                await on_poison(part[0], exc)
                continue
            mid = len(part) // 2
            stack.append(part[mid:])
            stack.append(part[:mid])  # popped first: the order of the batch is kept
