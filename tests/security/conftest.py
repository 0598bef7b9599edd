"""Logins an attacker would have: one per project role, and one with no grants at all.

Roles are cluster-wide, so each test gets logins named after its own database and drops them
afterwards (with whatever they created), so that nothing one test did to a role, e.g. a
successful escalation, can leak into another.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from tests.support import publish
from tests.support.logins import ROLES, Logins
from tests.support.stack import NatsServer


@pytest.fixture
def logins(database_url: str) -> Iterator[Logins]:
    dbname = database_url.rsplit("/", 1)[1]
    names = {kind: f"sec_{kind}_{dbname}" for kind in ROLES}
    with psycopg.connect(database_url, autocommit=True) as su:
        for kind, group in ROLES.items():
            su.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(names[kind])))
            if group:
                su.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(names[kind]))
                )
        # An attacker with a schema of their own: the usual situation of an application login.
        su.execute(
            sql.SQL("CREATE SCHEMA attacker AUTHORIZATION {}").format(sql.Identifier(names["publisher"]))
        )
        yield Logins(database_url, names, su)
        su.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
            (list(names.values()),),
        )
        for name in names.values():
            su.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
            su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def stream(logins: Logins, nats_server: NatsServer) -> str:
    """A registered stream with one message in it, on the test's NATS server."""
    name = "SEC_" + logins.names["nobody"].rsplit("_", 1)[1].upper()
    prefix = name.lower()
    publish.add_stream(nats_server.url, name, [f"{prefix}.>"])
    su = logins.su
    su.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_server.url,))
    su.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES (%s, %s)", (name, [f"{prefix}.>"])
    )
    su.execute("SELECT rule_nats_publish(%s, '{}')", (f"{prefix}.first",))
    assert publish.stream_messages(nats_server.url, name) == 1
    return name


# The names test modules imported from here before tests/support/ had them (kept for any that still do).
__all__ = ["Logins", "add_stream", "stream_messages"]


def add_stream(server: NatsServer, name: str, subjects: list[str]) -> None:
    publish.add_stream(server.url, name, subjects)


def stream_messages(server: NatsServer, name: str) -> int | None:
    return publish.stream_messages(server.url, name)
