"""Logins an attacker would have, for the security tests: one per project role, and one with no
grants at all (the ``logins`` fixture of tests/security/conftest.py makes and drops them)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

ROLES = {
    "publisher": "rule_nats_publisher",
    "monitor": "rule_nats_monitor",
    "worker": "rule_nats_worker",
    "admin": "rule_nats_admin",
    "nobody": None,
}


@dataclass(frozen=True)
class Logins:
    """Login role names and URLs for one test database, plus a superuser connection."""

    database_url: str
    names: dict[str, str]
    su: psycopg.Connection

    def url(self, kind: str) -> str:
        return self.database_url.replace("postgresql://postgres@", f"postgresql://{self.names[kind]}@")

    def connect(self, kind: str) -> psycopg.Connection:
        return psycopg.connect(self.url(kind), autocommit=True)

    def is_superuser(self, kind: str) -> bool:
        row = self.su.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (self.names[kind],)
        ).fetchone()
        return bool(row and row[0])
