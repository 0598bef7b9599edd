"""Credentials are data, not server file paths (issue 19, defect 6).

rule_nats_admin is not a superuser, yet it could name any file of the database server as a .creds
file or a TLS key: PL/Python opened it as the server's OS user, presented it to a NATS server the
admin chose, and its errors told "no such file" from "is a directory" or "permission denied".
Reading server files is pg_read_server_files' right; the admin now stores the credentials
themselves (auth_credentials, tls_*_pem).
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from tests.security.conftest import Logins
from tests.security.test_escalation_sql import stream  # noqa: F401 - fixture

FILE_COLUMNS = ("auth_credentials_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
SERVER_PATHS = ("/nonexistent/user.creds", "/", "/etc/hostname")


def try_publish_error(conn: psycopg.Connection, subject: str) -> str:
    row = conn.execute("SELECT rule_nats_try_publish(%s, '{}')", (subject,)).fetchone()
    assert row is not None and row[0]["ok"] is False, row
    return str(row[0].get("error"))


def test_the_admin_cannot_point_the_server_at_its_own_files(logins: Logins, stream: str) -> None:  # noqa: F811
    subject = stream.lower() + ".creds"
    seen: dict[str, str] = {}
    with logins.connect("admin") as admin:
        for path in SERVER_PATHS:
            for column in FILE_COLUMNS:
                pair = {"tls_cert_file": "tls_key_file", "tls_key_file": "tls_cert_file"}.get(column)
                extra = f", {pair} = %(path)s" if pair else ""
                try:
                    admin.execute(
                        sql.SQL(
                            "UPDATE rule_nats_config SET auth_type = {}, tls_enabled = {}, {} = %(path)s{} WHERE config_name = 'default'"
                        ).format(
                            sql.Literal("credentials" if column == "auth_credentials_file" else "none"),
                            sql.Literal(column != "auth_credentials_file"),
                            sql.Identifier(column),
                            sql.SQL(extra),
                        ),
                        {"path": path},
                    )
                except psycopg.errors.InsufficientPrivilege as exc:
                    assert exc.diag.message_hint and "tls_ca_pem" in exc.diag.message_hint
                    continue
                # Before the fix: the server read the file for the admin.
                seen[f"{column}={path}"] = try_publish_error(admin, subject)
                logins.su.execute(
                    "UPDATE rule_nats_config SET auth_type = 'none', tls_enabled = false, auth_credentials_file = NULL, "
                    "tls_ca_file = NULL, "
                    "tls_cert_file = NULL, tls_key_file = NULL"
                )
        assert seen == {}, seen
        # What it may do instead: store the credentials themselves.
        admin.execute(
            "UPDATE rule_nats_config SET tls_ca_pem = %s WHERE config_name = 'default'",
            ("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",),
        )


def test_file_paths_set_by_a_superuser_keep_working_and_give_one_message(logins: Logins, stream: str) -> None:  # noqa: F811
    """Existing installations keep their paths (a superuser set them); whatever is wrong with the
    file, the error is the same, so it tells nothing about the server's files."""
    subject = stream.lower() + ".creds"
    errors = set()
    for path in SERVER_PATHS:
        logins.su.execute(
            "UPDATE rule_nats_config SET auth_type = 'credentials', auth_credentials_file = %s", (path,)
        )
        with logins.connect("admin") as admin:
            errors.add(try_publish_error(admin, subject))
            # The admin may change the rest of the row, not the path.
            admin.execute("UPDATE rule_nats_config SET description = 'still works'")
    assert len(errors) == 1, errors
    assert "cannot read the credentials file" in errors.pop()


def test_pg_read_server_files_may_set_paths_and_the_monitor_reads_no_credentials(logins: Logins) -> None:
    logins.su.execute(
        sql.SQL("GRANT pg_read_server_files TO {}").format(sql.Identifier(logins.names["admin"]))
    )
    with logins.connect("admin") as admin:
        admin.execute("UPDATE rule_nats_config SET tls_ca_file = '/etc/ssl/certs/ca-certificates.crt'")
    with logins.connect("monitor") as monitor:
        for column in ("auth_credentials", "tls_key_pem"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                monitor.execute(sql.SQL("SELECT {} FROM rule_nats_config").format(sql.Identifier(column)))
