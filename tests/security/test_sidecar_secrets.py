"""A password in NATS_URL (the original worker allowed ``nats://user:pass@host``) is used, never shown:
not in the sidecar's log, not in any table it writes."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from tests.support.registry import scalar
from tests.support.sidecar import Sidecar
from tests.support.stack import free_port
from tests.support.waits import wait_until

SECRET = "s3cretpw"


def tables_containing(db: psycopg.Connection, needle: str) -> list[str]:
    """Every table of the public schema with a row whose text form contains the needle."""
    found = []
    for (table,) in db.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"
    ).fetchall():
        query = sql.SQL("SELECT count(*) FROM {} t WHERE t::text LIKE %s").format(sql.Identifier(table))
        if scalar(db, query.as_string(db), (f"%{needle}%",)):
            found.append(table)
    return found


def test_nats_url_password_is_in_no_log_line_and_no_table(
    database_url: str,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('SEC', '{sec.>}')")
        db.execute("INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('SEC', 'workers')")
        db.execute("SELECT rule_nats_publish_on_commit('sec.x', '{}')")  # the relay tries NATS too
        port = free_port()  # nothing listens there: every connect fails and says why
        sidecar = sidecar_factory(
            env={
                "NATS_URL": f"nats://user:{SECRET}@127.0.0.1:{port}",
                "HEARTBEAT_INTERVAL": "0.5",
                "SHUTDOWN_TIMEOUT": "1",  # a reload waiting for NATS does not hold the stop up
            }
        )
        assert wait_until(
            lambda: (
                scalar(db, "SELECT last_error FROM rule_nats_stream_state WHERE stream_name = 'SEC'")
                is not None
            ),
            timeout=20,
        ), sidecar.output()[-3000:]
        assert wait_until(lambda: "outbox relay paused" in sidecar.output(), timeout=20), sidecar.output()[
            -3000:
        ]
        error = str(scalar(db, "SELECT last_error FROM rule_nats_stream_state WHERE stream_name = 'SEC'"))
        assert f"127.0.0.1:{port}" in error  # still says where it tried
        assert sidecar.terminate() == 0
        log = sidecar.output()
        assert f"127.0.0.1:{port}" in log
        assert SECRET not in log, [line for line in log.splitlines() if SECRET in line][:5]
        assert tables_containing(db, SECRET) == []
