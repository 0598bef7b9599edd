"""Escalation routes from the publisher, monitor and worker logins, tried as an attacker would.

Each test is one numbered defect of the security review (issue 10) and logs in with the role
an attacker would hold; each failed on the main branch before the fix (0006_security.sql).
"""

from __future__ import annotations

import socket
import threading

import psycopg
import pytest

from tests.support.logins import Logins
from tests.support.publish import add_stream, stream_messages
from tests.support.stack import NatsServer

# --- 1. superuser through a user-defined cast evaluated by a SECURITY DEFINER trigger -------------


def test_cast_in_a_triggered_row_does_not_run_as_the_definer(logins: Logins, stream: str) -> None:
    pub = logins.names["publisher"]
    with logins.connect("publisher") as c:
        c.execute("CREATE TYPE attacker.t AS ENUM ('a')")
        c.execute(
            "CREATE FUNCTION attacker.evil(attacker.t) RETURNS json LANGUAGE plpgsql AS $$ BEGIN "
            f"EXECUTE 'ALTER ROLE {pub} SUPERUSER'; RETURN '{{}}'::json; END $$"
        )
        c.execute("CREATE CAST (attacker.t AS json) WITH FUNCTION attacker.evil(attacker.t)")
        c.execute("CREATE TABLE attacker.orders (id int, v attacker.t)")
        c.execute(
            "CREATE TRIGGER to_nats AFTER INSERT ON attacker.orders FOR EACH ROW "
            f"EXECUTE FUNCTION rule_nats_table_trigger('{stream.lower()}.orders')"
        )
        # The cast runs as the publisher itself now, which may not ALTER ROLE: the insert fails.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO attacker.orders VALUES (1, 'a')")
    assert not logins.is_superuser("publisher")


def test_trigger_still_publishes_ordinary_rows_through_the_outbox(logins: Logins, stream: str) -> None:
    with logins.connect("publisher") as c:
        c.execute("CREATE TABLE attacker.plain (id int, note text)")
        c.execute(
            "CREATE TRIGGER to_nats AFTER INSERT ON attacker.plain FOR EACH ROW "
            f"EXECUTE FUNCTION rule_nats_table_trigger('{stream.lower()}.plain')"
        )
        c.execute("INSERT INTO attacker.plain VALUES (7, 'x')")
    row = logins.su.execute("SELECT subject, payload -> 'new' ->> 'id' FROM rule_nats_outbox").fetchone()
    assert row == (f"{stream.lower()}.plain", "7")


def test_the_enqueue_function_refuses_a_caller_without_the_publisher_role(
    logins: Logins, stream: str
) -> None:
    with logins.connect("nobody") as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(
            "SELECT rule_nats_enqueue_row_event(%s, NULL, '{}'::jsonb)",
            (f"{stream.lower()}.forged",),
        )


# --- 2. superuser (and outbound connections) through a session setting -----------------------------


class _Listener:
    """A TCP listener on loopback that counts the connections it is offered."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_a_session_setting_cannot_choose_where_failures_are_written(logins: Logins, stream: str) -> None:
    listener = _Listener()
    try:
        with logins.connect("publisher") as c:
            c.execute(
                "SELECT set_config('rule_nats.autonomous_conninfo', %s, false)",
                (f"host=127.0.0.1 port={listener.port} dbname=postgres connect_timeout=2",),
            )
            for _ in range(3):
                with pytest.raises(psycopg.Error):
                    c.execute("SELECT rule_nats_publish(%s, '{}')", (f"{stream.lower()}..bad",))
                with pytest.raises(psycopg.Error):
                    c.execute("SELECT rule_nats_publish('nowhere.captured', '{}')")
    finally:
        listener.close()
    assert listener.accepted == 0
    assert not logins.is_superuser("publisher")


# --- 3. JetStream administration through the publish functions ------------------------------------

ADMIN_SUBJECTS = [
    "$JS.API.STREAM.DELETE.{stream}",
    "$JS.API.STREAM.PURGE.{stream}",
    "$JS.API.CONSUMER.DELETE.{stream}.x",
    "$KV.bucket.key",
    "$SYS.REQ.SERVER.PING",
    "_INBOX.abc",
]


@pytest.mark.parametrize("template", ADMIN_SUBJECTS)
@pytest.mark.parametrize(
    "function", ["rule_nats_publish", "rule_nats_try_publish", "rule_nats_publish_on_commit"]
)
def test_reserved_subjects_are_refused(
    logins: Logins, stream: str, nats_server: NatsServer, template: str, function: str
) -> None:
    subject = template.format(stream=stream)
    with logins.connect("publisher") as c, pytest.raises(psycopg.Error) as info:
        c.execute(f"SELECT {function}(%s, '{{}}')", (subject,))
    assert info.value.sqlstate == "22023"
    assert "reserved" in str(info.value)
    assert info.value.diag.message_hint
    assert stream_messages(nats_server.url, stream) == 1
    assert logins.su.execute("SELECT count(*) FROM rule_nats_outbox").fetchone() == (0,)


def test_reserved_subjects_refused_in_the_registry_and_the_trigger(logins: Logins, stream: str) -> None:
    with logins.connect("admin") as c:
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute(
                "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) "
                f"VALUES ('w', 'https://e.example/', '$JS.API.STREAM.DELETE.{stream}')"
            )
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('X', '{$JS.API.>}')")
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('Y', '{_INBOX.>}')")
    with logins.connect("publisher") as c:
        c.execute("CREATE TABLE attacker.t2 (id int)")
        c.execute(
            "CREATE TRIGGER t AFTER INSERT ON attacker.t2 FOR EACH ROW "
            f"EXECUTE FUNCTION rule_nats_table_trigger('$JS.API.STREAM.DELETE.{stream}')"
        )
        with pytest.raises(psycopg.Error) as info:
            c.execute("INSERT INTO attacker.t2 VALUES (1)")
        assert info.value.sqlstate == "22023"
    assert logins.su.execute("SELECT count(*) FROM rule_nats_outbox").fetchone() == (0,)


def test_publishes_are_limited_to_registered_streams_by_default(
    logins: Logins, stream: str, nats_server: NatsServer
) -> None:
    # A stream that exists in NATS but not in the registry: not a target for SQL publishes.
    add_stream(nats_server.url, stream + "_X", [stream.lower() + "x.>"])
    subject = stream.lower() + "x.a"
    with logins.connect("publisher") as c:
        for function in ("rule_nats_publish", "rule_nats_publish_on_commit"):
            with pytest.raises(psycopg.Error) as info:
                c.execute(f"SELECT {function}(%s, '{{}}')", (subject,))
            assert info.value.sqlstate == "22023"
            assert "registered stream" in str(info.value)
        # The publisher cannot lift the restriction ...
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE rule_nats_config SET publish_registered_subjects_only = false")
    # ... an admin can.
    with logins.connect("admin") as c:
        c.execute("UPDATE rule_nats_config SET publish_registered_subjects_only = false")
    with logins.connect("publisher") as c:
        ack = c.execute("SELECT rule_nats_publish(%s, '{}')", (subject,)).fetchone()
        assert ack is not None and ack[0]["stream"] == stream + "_X"
    assert stream_messages(nats_server.url, stream + "_X") == 1


# --- 4. header injection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("rule_nats_publish(%s, '{}', msg_id => %s)", ("{p}.a", "id\r\nNats-Expected-Stream: NOPE")),
        ("rule_nats_publish(%s, '{}', msg_id => %s)", ("{p}.a", "id\n")),
        ("rule_nats_try_publish(%s, '{}', msg_id => %s)", ("{p}.a", "id\r\nX: y")),
        ("rule_nats_publish_on_commit(%s, '{}', msg_id => %s)", ("{p}.a", "id\r\nX: y")),
        ("rule_nats_publish(%s, '{}')", ("{p}.a\n",)),
        ("rule_nats_publish(%s, '{}', %s::jsonb)", ("{p}.a", '{"X-Bad\\n": "v"}')),
        ("rule_nats_publish_on_commit(%s, '{}', %s::jsonb)", ("{p}.a", '{"X-Bad\\n": "v"}')),
        ("rule_nats_publish_on_commit(%s, '{}', %s::jsonb)", ("{p}.a", '{"X-Ok": "v\\r\\nNats-Msg-Id: 1"}')),
        ("rule_nats_publish_on_commit(%s, '{}', %s::jsonb)", ("{p}.a", '{"X-Ok": {"nested": 1}}')),
    ],
)
def test_header_injection_is_refused(
    logins: Logins, stream: str, nats_server: NatsServer, call: str, args: tuple[str, ...]
) -> None:
    params = tuple(a.replace("{p}", stream.lower()) for a in args)
    with logins.connect("publisher") as c, pytest.raises(psycopg.Error) as info:
        c.execute("SELECT " + call, params)
    assert info.value.sqlstate == "22023", str(info.value)
    assert stream_messages(nats_server.url, stream) == 1
    assert logins.su.execute("SELECT count(*) FROM rule_nats_outbox").fetchone() == (0,)


def test_webhook_publish_refuses_an_injected_message_id(logins: Logins, stream: str) -> None:
    logins.su.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, publish_mode) "
        "VALUES ('w', 'https://e.example/', %s, 'outbox')",
        (stream.lower() + ".w",),
    )
    with logins.connect("publisher") as c, pytest.raises(psycopg.Error) as info:
        c.execute("SELECT rule_webhook_publish_nats(1, '{}', E'id\\r\\nX: y')")
    assert info.value.sqlstate == "22023"


# --- 5. secrets readable by the monitor ---------------------------------------------------------


def test_monitor_reads_no_payloads_query_strings_or_url_passwords(logins: Logins, stream: str) -> None:
    su = logins.su
    su.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) "
        "VALUES ('w', 'https://e.example/hook?token=s3cret', %s)",
        (stream.lower() + ".w",),
    )
    su.execute(
        "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, attempt, outcome, url) "
        "VALUES ('S', 'c', 1, 'delivered', 'https://e.example/hook?token=s3cret')"
    )
    su.execute(
        "SELECT rule_nats_publish(%s, %s)",
        (
            stream.lower() + ".env",
            '{"webhook_url": "https://x/", "data": {}, "headers": {"Authorization": "Bearer s3cret"}}',
        ),
    )
    with logins.connect("monitor") as c:
        for statement in (
            "SELECT payload FROM rule_nats_publish_history",
            "SELECT * FROM rule_nats_publish_history",
            "SELECT url FROM rule_webhooks",
            "SELECT url FROM rule_nats_delivery_attempts",
            "SELECT * FROM rule_nats_delivery_attempts",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
        seen = []
        for statement in (
            "SELECT publish_id, subject, headers, message_id, success FROM rule_nats_publish_history",
            "SELECT * FROM nats_webhooks",
            "SELECT * FROM nats_delivery_attempts",
            "SELECT * FROM nats_recent_failures",
            "SELECT * FROM nats_endpoint_health",
        ):
            seen.append(repr(c.execute(statement).fetchall()))
    text = "\n".join(seen)
    assert "s3cret" not in text
    assert "'https://e.example'" in text  # the endpoint's origin is shown (issue 19: not its path)
    assert "e.example/hook" not in text


def test_nats_url_refuses_credentials(logins: Logins) -> None:
    with logins.connect("admin") as c, pytest.raises(psycopg.errors.CheckViolation) as info:
        c.execute("UPDATE rule_nats_config SET nats_url = 'nats://user:secret@127.0.0.1:4222'")
    assert "nats_user" in str(info.value) or "credentials" in str(info.value)
    with logins.connect("admin") as c, pytest.raises(psycopg.errors.CheckViolation):
        c.execute("UPDATE rule_nats_config SET nats_cluster_urls = '{nats://tok@127.0.0.1:4223}'")


# --- 6. the worker does only the sidecar's work ---------------------------------------------------


def test_worker_cannot_choose_the_purge_age(logins: Logins) -> None:
    su = logins.su
    su.execute(
        "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, attempt, outcome, attempted_at) "
        "VALUES ('S', 'c', 1, 'delivered', now() - interval '40 days'), ('S', 'c', 1, 'delivered', now())"
    )
    with logins.connect("worker") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT rule_nats_purge_batch('attempts', interval '1 second')")
        # The configured retention (30 days) applies: the recent row stays.
        assert c.execute("SELECT rule_nats_purge_due('attempts')").fetchone() == (1,)
        assert c.execute("SELECT rule_nats_purge_due('attempts')").fetchone() == (0,)
    assert su.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (1,)


def test_worker_seed_may_insert_missing_rows_but_never_change_existing_ones(logins: Logins) -> None:
    su = logins.su
    su.execute("INSERT INTO rule_nats_streams (stream_name, subjects, replicas) VALUES ('S', '{s.>}', 3)")
    su.execute(
        "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size) VALUES ('S', 'c', 64)"
    )
    with logins.connect("worker") as c:
        c.execute("SELECT rule_nats_register_consumer('S', 'other.>', 'c', 1)")
        c.execute("SELECT rule_nats_register_consumer('S2', 's2.>', 'c2', 5)")
        for statement in (
            "UPDATE rule_nats_consumers SET batch_size = 1",
            "DELETE FROM rule_nats_streams",
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name) VALUES ('S', 'x')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
    assert su.execute(
        "SELECT batch_size, filter_subject FROM rule_nats_consumers WHERE consumer_name = 'c'"
    ).fetchone() == (64, None)
    assert su.execute(
        "SELECT subjects, replicas FROM rule_nats_streams WHERE stream_name = 'S'"
    ).fetchone() == (["s.>"], 3)
    assert su.execute("SELECT batch_size FROM rule_nats_consumers WHERE consumer_name = 'c2'").fetchone() == (
        5,
    )


# --- 8. disabled means disabled -------------------------------------------------------------------


def test_trigger_refuses_a_webhook_a_dba_disabled_like_the_publish_function(
    logins: Logins, stream: str
) -> None:
    logins.su.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, enabled) "
        "VALUES ('off', 'https://e.example/', %s, false)",
        (stream.lower() + ".off",),
    )
    with logins.connect("publisher") as c:
        with pytest.raises(psycopg.Error) as direct:
            c.execute("SELECT rule_webhook_publish_nats(1, '{}')")
        c.execute("CREATE TABLE attacker.t3 (id int)")
        c.execute(
            "CREATE TRIGGER t AFTER INSERT ON attacker.t3 FOR EACH ROW "
            "EXECUTE FUNCTION rule_nats_table_trigger(NULL, 'off')"
        )
        with pytest.raises(psycopg.Error) as via_trigger:
            c.execute("INSERT INTO attacker.t3 VALUES (1)")
    assert direct.value.sqlstate == via_trigger.value.sqlstate == "55000"
    assert via_trigger.value.diag.message_hint
    assert logins.su.execute("SELECT count(*) FROM rule_nats_outbox").fetchone() == (0,)


def test_failed_publish_is_recorded_through_the_failure_log_despite_the_rollback(
    logins: Logins, stream: str
) -> None:
    with logins.connect("publisher") as c, pytest.raises(psycopg.Error), c.transaction():
        c.execute("SELECT rule_nats_publish(%s, '{}', msg_id => 'lost-1')", (stream.lower() + "..bad",))
    row = logins.su.execute(
        "SELECT success, message_id, error_message FROM rule_nats_publish_history WHERE message_id = 'lost-1'"
    ).fetchone()
    assert row is not None and row[0] is False and "invalid subject" in row[2]


def test_the_failure_log_login_may_only_insert_failure_rows(logins: Logins) -> None:
    from tests.conftest import FAILURE_LOG_PASSWORD

    url = logins.database_url.replace(
        "postgresql://postgres@", f"postgresql://rule_nats_failure_writer:{FAILURE_LOG_PASSWORD}@"
    )
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT rule_nats__insert_failure('default', NULL, 'a.b', NULL, NULL, 'm', 'e', 1.0)")
        for statement in (
            "INSERT INTO rule_nats_publish_history (subject, success) VALUES ('a.b', true)",
            "SELECT nats_password FROM rule_nats_config",
            "SELECT * FROM rule_nats_private.failure_log",
            "SELECT rule_nats_publish('a.b', '{}')",
            "DELETE FROM rule_nats_publish_history",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
    rows = logins.su.execute("SELECT success, triggered_by FROM rule_nats_publish_history").fetchall()
    assert rows == [(False, "sql")]


def test_only_a_superuser_configures_the_failure_log(logins: Logins) -> None:
    for kind in ("admin", "publisher", "worker", "monitor"):
        with logins.connect(kind) as c:
            for statement in (
                "UPDATE rule_nats_private.failure_log SET conninfo = 'host=127.0.0.1 port=1'",
                "SELECT rule_nats_private.enable_failure_log('x')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(statement)


def test_worker_adoption_inserts_missing_rows_only(logins: Logins) -> None:
    """rule_nats_adopt_consumer copies what JetStream has into rows that are missing; a row that
    exists keeps every value the DBA gave it, whatever the worker passes."""
    su = logins.su
    su.execute("INSERT INTO rule_nats_streams (stream_name, subjects, replicas) VALUES ('S', '{s.>}', 3)")
    su.execute(
        "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size) VALUES ('S', 'c', 64)"
    )
    shrink = '{"subjects": ["x.>"], "replicas": 1, "storage_type": "memory", "retention_policy": "limits"}'
    adopted = (
        '{"subjects": ["a.>"], "storage_type": "file", "retention_policy": "workqueue", "max_messages": 5, '
        '"max_bytes": -1, "max_age_seconds": 60, "max_message_size": -1, "discard_policy": "new", "replicas": 3, '
        '"duplicate_window_seconds": 30, "description": "made by hand"}'
    )
    consumer = (
        '{"filter_subject": "a.b", "max_deliver": 4, "ack_wait_seconds": 5, "max_ack_pending": 7, '
        '"deliver_policy": "new"}'
    )
    with logins.connect("worker") as c:
        c.execute("SELECT rule_nats_adopt_consumer('S', 'x.>', 'c', 1, 'default', %s, NULL)", (shrink,))
        c.execute(
            "SELECT rule_nats_adopt_consumer('S', 'x.>', 'c9', 1, 'default', %s, %s)", (shrink, consumer)
        )
        c.execute(
            "SELECT rule_nats_adopt_consumer('A', 'a.>', 'ac', 2, 'default', %s, %s)", (adopted, consumer)
        )
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            c.execute("SELECT rule_nats_adopt_consumer('B', 'b.>', 'bc', 2, 'default', '[1]', NULL)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE rule_nats_streams SET adopted_config = NULL")
    assert su.execute(
        "SELECT subjects, replicas, storage_type, adopted_config FROM rule_nats_streams WHERE stream_name = 'S'"
    ).fetchone() == (["s.>"], 3, "file", None)
    assert su.execute("SELECT batch_size FROM rule_nats_consumers WHERE consumer_name = 'c'").fetchone() == (
        64,
    )
    assert su.execute(
        "SELECT subjects, storage_type, retention_policy, max_messages, max_age_seconds, discard_policy, replicas, "
        "duplicate_window_seconds, description, adopted_config ->> 'description' FROM rule_nats_streams "
        "WHERE stream_name = 'A'"
    ).fetchone() == (["a.>"], "file", "workqueue", 5, 60, "new", 3, 30, "made by hand", "made by hand")
    assert su.execute(
        "SELECT filter_subject, max_deliver, ack_wait_seconds, max_ack_pending, deliver_policy, batch_size, "
        "adopted_config IS NOT NULL FROM rule_nats_consumers WHERE consumer_name = 'ac'"
    ).fetchone() == ("a.b", 4, 5, 7, "new", 2, True)
    with logins.connect("publisher") as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("SELECT rule_nats_adopt_consumer('P', 'p.>', 'pc', 1, 'default', NULL, NULL)")
