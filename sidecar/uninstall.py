"""Remove the worker from a database: every object of its schema and the roles no other database
of the cluster uses (sql/0017_isolation.sql: rule_nats_private.uninstall(), which does the work in
one transaction; this module only calls it, under the migrations' advisory lock)."""

from __future__ import annotations

import logging

import psycopg

from sidecar.errors import MigrationError
from sidecar.queries import query

logger = logging.getLogger(__name__)


def uninstall(conninfo: str) -> str:
    """Drop the schema and the unused roles; return what was done (the function's summary)."""
    notes: list[str] = []
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
            conn.execute(query("migration_lock"))
            try:
                row = conn.execute(query("uninstall_present")).fetchone()
                if not row or not row[0]:
                    raise MigrationError(
                        "this database has no webhook-worker schema of version 17 or later: nothing is "
                        "removed (an older schema: run webhook-worker migrate first)"
                    )
                with conn.transaction():
                    done = conn.execute(query("uninstall")).fetchone()
            finally:
                conn.execute(query("migration_unlock"))
    except psycopg.Error as exc:
        raise MigrationError(f"uninstall failed: {exc}") from exc
    for note in notes:
        logger.info("%s", note, extra={"action": "uninstall_notice"})
    return str(done[0]) if done else ""
