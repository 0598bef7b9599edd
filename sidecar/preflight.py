"""Checks before ``run`` and ``status`` start: can we log in, and is the schema the one we need?

A database that does not exist, a role or password the server refuses, or a schema without
this version's migrations will not fix itself: they end the command at once with one line that
says what to do (exit code 2). A server that is not up yet is waited for, with the cause in
every log line.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import psycopg

from sidecar import migrate
from sidecar.errors import MigrationError, SetupError
from sidecar.validation import redact_urls_in

logger = logging.getLogger(__name__)

# What the server answers (FATAL) when retrying cannot help; "starting up", "shutting down" and
# "too many clients" are FATAL too, and pass.
_PERMANENT = re.compile(
    r"FATAL:.*(does not exist|authentication failed|no pg_hba\.conf entry|permission denied|"
    r"password|not permitted to log in)",
    re.S,
)


def is_permanent(message: str) -> bool:
    """True when a connection error is one that retrying cannot fix."""
    return bool(_PERMANENT.search(message))


def connect_error_text(exc: BaseException) -> str:
    """One line with the server's own words, without the URL's password."""
    text = " ".join(str(exc).split())
    return redact_urls_in(text.removeprefix("connection failed: "))


def wait_for_database(
    url: str,
    connect: Callable[[str], object] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_wait: float | None = None,
) -> None:
    """Return once PostgreSQL accepts us; raise SetupError at once for a permanent refusal."""
    opener = connect or (lambda u: psycopg.connect(u, connect_timeout=5).close())
    delay, waited = 0.5, 0.0
    while True:
        try:
            opener(url)
            return
        except psycopg.OperationalError as exc:
            text = connect_error_text(exc)
            if is_permanent(str(exc)):
                raise SetupError(f"cannot use the database: {text}") from exc
            if max_wait is not None and waited >= max_wait:
                raise SetupError(f"cannot reach PostgreSQL: {text}") from exc
            logger.warning(
                "PostgreSQL is not reachable yet (%s); trying again in %.1f s",
                text,
                delay,
                extra={"action": "database_waiting"},
            )
            sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)


def check_schema(url: str) -> None:
    """Raise SetupError naming the missing migrations (or the unknown ones) and the command to run."""
    try:
        state = migrate.report(url)
    except MigrationError as exc:
        raise SetupError(f"the database schema does not fit this webhook-worker: {exc}") from exc
    applied, pending = state.applied, state.pending
    if not applied:
        raise SetupError(
            "the database has no webhook-worker schema: run `webhook-worker migrate --database-url ...` "
            "as a role that may create roles (and, for PL/Python, a superuser)"
        )
    if pending:
        names = ", ".join(m.filename for m in pending)
        raise SetupError(
            f"the database misses {len(pending)} migration(s): {names}; "
            "run `webhook-worker migrate --database-url ...` first"
        )
    stale = state.stale_definitions
    if stale:
        names = ", ".join(f"sql/definitions/{d.filename}" for d in stale)
        raise SetupError(
            f"the database's functions and views differ from this webhook-worker's ({names}): "
            "run `webhook-worker migrate --database-url ...` with this version first"
        )
