"""Waiting on signals instead of sleeping: poll a value until it holds, with a clear failure.

Three kinds of signal, best first:

- a row (``wait_rows``, ``wait_scalar``): what the worker recorded in PostgreSQL;
- a counter on the sidecar's ``/metrics`` (``tests.support.sidecar.wait_counter``, ``applied``);
- a sentinel (``nothing_before``): to show that something did NOT happen, send something that
  must happen after it on the same path, wait for that, then look for the first.

A timeout is a bound on how long to wait for a signal, never an assertion on how long things took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

T = TypeVar("T")


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """True as soon as ``predicate()`` holds; after ``timeout`` seconds, its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_for(
    fetch: Callable[[], T],
    done: Callable[[T], bool],
    what: str = "the condition",
    timeout: float = 30.0,
    interval: float = 0.05,
) -> T:
    """The first value of ``fetch()`` for which ``done`` holds; AssertionError naming ``what`` and
    showing the last value when none did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            shown = repr(value)
            if len(shown) > 3000:  # a whole log, say: its end
                shown = "..." + shown[-3000:]
            raise AssertionError(f"waited {timeout:g} s for {what}; last value: {shown}")
        time.sleep(interval)


def wait_rows(
    db: psycopg.Connection,
    query: str,
    params: tuple[object, ...] = (),
    until: Callable[[list[tuple[object, ...]]], bool] = bool,
    timeout: float = 30.0,
) -> list[tuple[object, ...]]:
    """The rows of ``query`` once ``until(rows)`` holds (by default: once there is a row)."""
    return wait_for(
        lambda: db.execute(query, params).fetchall(),
        until,
        f"rows of {query!r} {params or ''}",
        timeout,
    )


def wait_scalar(
    db: psycopg.Connection,
    query: str,
    params: tuple[object, ...] = (),
    until: Callable[[object], bool] = bool,
    timeout: float = 30.0,
) -> object:
    """The first column of the first row of ``query`` (None without a row) once ``until`` holds."""

    def fetch() -> object:
        row = db.execute(query, params).fetchone()
        return None if row is None else row[0]

    return wait_for(fetch, until, f"the value of {query!r} {params or ''}", timeout)


def nothing_before(
    send_sentinel: Callable[[], None],
    sentinel_seen: Callable[[], bool],
    happened: Callable[[], T],
    what: str,
    timeout: float = 30.0,
) -> None:
    """Show that something did not happen without sleeping: send a sentinel that travels the same
    ordered path after it (same subject, same consumer, same endpoint), wait until the sentinel
    arrived, then assert that ``happened()`` is still falsy."""
    send_sentinel()
    wait_for(sentinel_seen, bool, f"the sentinel sent after {what}", timeout)
    found = happened()
    assert not found, f"{what}: {found!r}"
