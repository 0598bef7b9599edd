"""Credentials are data, not server file paths (issue 19, defect 6).

rule_nats_admin is not a superuser, yet it could name any file of the database server as a .creds
file or a TLS key: PL/Python opened it as the server's OS user, presented it to a NATS server the
admin chose, and its errors told "no such file" from "is a directory" or "permission denied".
Reading server files is pg_read_server_files' right; the admin now stores the credentials
themselves (auth_credentials, tls_*_pem).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.logins import Logins
from tests.support.pgnats import pgnats as pg

FILE_COLUMNS = ("auth_credentials_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
SERVER_PATHS = ("/nonexistent/user.creds", "/", "/etc/hostname")


def try_publish_error(conn: psycopg.Connection, subject: str) -> str:
    row = conn.execute("SELECT rule_nats_try_publish(%s, '{}')", (subject,)).fetchone()
    assert row is not None and row[0]["ok"] is False, row
    return str(row[0].get("error"))


def test_the_admin_cannot_point_the_server_at_its_own_files(logins: Logins, stream: str) -> None:
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


def test_file_paths_set_by_a_superuser_keep_working_and_give_one_message(logins: Logins, stream: str) -> None:
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


class ConnectRecorder:
    """A loopback listener that plays a NATS server far enough to read the CONNECT line a client
    sends (the .creds JWT and the nonce signature are in it), and records it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(3)
                info = {
                    "server_id": "recorder",
                    "version": "2.10.0",
                    "max_payload": 1048576,
                    "headers": True,
                    "jetstream": True,
                    "nonce": "bm9uY2Utb2YtdGhlLXJlY29yZGVy",
                }
                try:
                    conn.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
                    data = b""
                    while b"\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.lines.append(data.decode(errors="replace"))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_the_admin_cannot_send_a_server_approved_creds_file_to_its_own_server(
    logins: Logins,
    stream: str,
) -> None:
    """Review F3: on a row whose .creds file a superuser approved, the admin changed nats_url (or
    the cluster URLs, TLS settings, auth_type) and PL/Python presented the server's JWT and
    nonce signature to a server of the admin's choosing."""
    seed = pg.encode_user_seed(os.urandom(32))
    # Readable by the database server's OS user (not only by the one running the tests).
    folder = Path(tempfile.mkdtemp(prefix="wwtest-f3-"))
    folder.chmod(0o755)
    creds = folder / "server.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n"
        "------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    creds.chmod(0o644)
    logins.su.execute(
        "UPDATE rule_nats_config SET auth_type = 'credentials', auth_credentials_file = %s", (str(creds),)
    )
    recorder = ConnectRecorder()
    try:
        with logins.connect("admin") as admin:
            refused = []
            for change in (
                f"nats_url = 'nats://127.0.0.1:{recorder.port}'",
                f"nats_cluster_urls = ARRAY['nats://127.0.0.1:{recorder.port}']",
                "tls_enabled = true",
                "auth_type = 'none'",
            ):
                try:
                    admin.execute(f"UPDATE rule_nats_config SET {change} WHERE config_name = 'default'")  # type: ignore[arg-type]
                except psycopg.errors.InsufficientPrivilege as exc:
                    assert exc.diag.message_hint and "auth_credentials" in exc.diag.message_hint
                    refused.append(change)
                    continue
                if change.startswith("nats_url"):
                    admin.execute("SELECT rule_nats_try_publish(%s, '{}')", (stream.lower() + ".f3",))
            assert [line for line in recorder.lines if "jwt" in line] == []
            assert len(refused) == 4, refused
            # What is not about where the file goes stays the admin's.
            admin.execute("UPDATE rule_nats_config SET description = 'still the admin''s'")
        # Without a file on the row, the servers are the admin's again.
        logins.su.execute("UPDATE rule_nats_config SET auth_type = 'none', auth_credentials_file = NULL")
        with logins.connect("admin") as admin:
            admin.execute(f"UPDATE rule_nats_config SET nats_url = 'nats://127.0.0.1:{recorder.port}'")  # type: ignore[arg-type]
    finally:
        recorder.close()
        shutil.rmtree(folder)
