"""Which connection errors end the command at once, and the wait for the others (no servers)."""

from __future__ import annotations

import psycopg
import pytest

from sidecar import preflight
from sidecar.errors import SetupError

PERMANENT = [
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "x" does not exist',
    'connection to server at "h" failed: FATAL:  role "nouser" does not exist',
    'connection to server at "h" failed: FATAL:  password authentication failed for user "u"',
    'connection to server at "h" failed: FATAL:  no pg_hba.conf entry for host "1.2.3.4", user "u"',
    'connection to server at "h" failed: FATAL:  role "u" is not permitted to log in',
    'connection to server at "h" failed: FATAL:  permission denied for database "d"',
]
TRANSIENT = [
    'connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs the server running',
    'connection to server at "h" failed: FATAL:  the database system is starting up',
    'connection to server at "h" failed: FATAL:  the database system is shutting down',
    'connection to server at "h" failed: FATAL:  sorry, too many clients already',
    "connection timeout expired",
]


@pytest.mark.parametrize("message", PERMANENT)
def test_permanent(message: str) -> None:
    assert preflight.is_permanent(message)


@pytest.mark.parametrize("message", TRANSIENT)
def test_transient(message: str) -> None:
    assert not preflight.is_permanent(message)


def test_a_permanent_error_ends_at_once_with_the_servers_words() -> None:
    calls: list[str] = []

    def connect(url: str) -> None:
        calls.append(url)
        raise psycopg.OperationalError(PERMANENT[0])

    with pytest.raises(SetupError, match='database "x" does not exist') as info:
        preflight.wait_for_database("postgresql://u:pw@h/x", connect=connect, sleep=lambda s: None)
    assert len(calls) == 1
    assert "connection failed:" not in str(info.value)


def test_a_transient_error_is_retried_with_the_cause_logged(caplog: pytest.LogCaptureFixture) -> None:
    attempts = iter([psycopg.OperationalError(TRANSIENT[0]), psycopg.OperationalError(TRANSIENT[1]), None])
    slept: list[float] = []

    def connect(url: str) -> None:
        exc = next(attempts)
        if exc is not None:
            raise exc

    with caplog.at_level("WARNING"):
        preflight.wait_for_database("postgresql://h/x", connect=connect, sleep=slept.append)
    assert slept == [0.5, 1.0]
    logged = [r.getMessage() for r in caplog.records]
    assert "Connection refused" in logged[0] and "starting up" in logged[1]


def test_status_does_not_wait() -> None:
    def connect(url: str) -> None:
        raise psycopg.OperationalError(TRANSIENT[0])

    with pytest.raises(SetupError, match=r"cannot reach PostgreSQL: .*Connection refused"):
        preflight.wait_for_database("postgresql://h/x", connect=connect, sleep=lambda s: None, max_wait=0)
