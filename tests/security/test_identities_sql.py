"""Identities no one can claim, no NATS control header from SQL, a monitor that sees origins only
(issue 19, defects 2, 3 and 8), against a real PostgreSQL and nats-server."""

from __future__ import annotations

import json
import re

import psycopg
import pytest
from psycopg import sql

from tests.security.cases import CASES
from tests.support.logins import Logins
from tests.support.publish import add_stream, read_stream, stream_messages
from tests.support.registry import register_stream
from tests.support.stack import NatsServer

GENERATED = ("outbox-x-1", "OUTBOX-0123456789abcdef-5", "replay-x-1-1", "stream-IDS-1")


@pytest.fixture
def db(nats_db: psycopg.Connection, nats_server: NatsServer) -> psycopg.Connection:
    # A stream that allows roll-ups: a Nats-Rollup header would purge it.
    add_stream(nats_server.url, "IDS", ["ids.>"], allow_rollup_hdrs=True)
    register_stream(nats_db, "IDS", ["ids.>"])
    return nats_db


def stream_count(server: NatsServer) -> int:
    n = stream_messages(server.url, "IDS")
    assert n is not None
    return n


# --- defect 3: NATS control headers ------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    ["Nats-Rollup", "nats-rollup", "Nats-Expected-Last-Sequence", "Nats-TTL", "Nats-Expected-Stream"],
)
def test_no_nats_control_header_from_sql(
    db: psycopg.Connection, nats_server: NatsServer, header: str
) -> None:
    for i in range(3):
        db.execute("SELECT rule_nats_publish('ids.a', %s::jsonb)", (json.dumps({"i": i}),))
    value = {"Nats-Rollup": "all", "nats-rollup": "sub", "Nats-TTL": "1s"}.get(header, "1")
    headers = json.dumps({header: value})
    for call in (
        "SELECT rule_nats_publish('ids.a', '{}'::jsonb, %s::jsonb)",
        "SELECT rule_nats_try_publish('ids.a', '{}'::jsonb, %s::jsonb)",
        "SELECT rule_nats_publish_on_commit('ids.a', '{}'::jsonb, %s::jsonb)",
    ):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
            db.execute(call, (headers,))
        assert "control header" in str(info.value), call
        assert info.value.diag.message_hint and "Nats-Msg-Id" in info.value.diag.message_hint, call
    assert stream_count(nats_server) == 3  # nothing purged, nothing added
    assert db.execute("SELECT count(*) FROM rule_nats_outbox").fetchone() == (0,)


def test_nats_msg_id_header_and_own_headers_pass(db: psycopg.Connection, nats_server: NatsServer) -> None:
    r = db.execute(
        'SELECT rule_nats_publish(\'ids.a\', \'{}\'::jsonb, \'{"Nats-Msg-Id": "mine-1", "X-Nats-Rollup": "x"}\')'
    ).fetchone()
    assert r is not None and r[0]["seq"] == 1
    _, headers = read_stream(nats_server.url, "IDS", 1)
    assert headers["Nats-Msg-Id"] == "mine-1" and headers["X-Nats-Rollup"] == "x"


def test_the_outbox_refuses_a_nats_control_header(db: psycopg.Connection) -> None:
    """A row written directly (an admin, a superuser) meets a CHECK; the relay refuses old rows."""
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO rule_nats_outbox (subject, payload, headers, message_id) "
            "VALUES ('ids.a', '{}', '{\"Nats-Rollup\": \"all\"}', 'm-1')"
        )


def test_a_replay_sends_no_nats_header_of_the_dead_letter(db: psycopg.Connection) -> None:
    db.execute(
        "INSERT INTO rule_nats_dead_letters (message_id, stream_name, consumer_name, stream_seq, subject, "
        "message_raw, message_headers, reason, error, attempts) "
        "VALUES ('evt-1', 'IDS', 'c', 4, 'ids.a', '{}', %s, 'http_4xx', 'HTTP 400', 1)",
        (json.dumps({"Nats-Rollup": "all", "NATS-TTL": "1s", "Nats-Expected-Last-Msg-Id": "x", "X-A": "1"}),),
    )
    db.execute("SELECT rule_nats_replay_dead_letter(1)")
    row = db.execute("SELECT headers FROM rule_nats_outbox").fetchone()
    assert row is not None
    assert sorted(row[0]) == ["Rule-Nats-Attempts", "Rule-Nats-Message-Id", "X-A"]


# --- defect 2: identities ----------------------------------------------------------------------


@pytest.mark.parametrize("msg_id", GENERATED)
def test_callers_cannot_use_a_generated_id(db: psycopg.Connection, msg_id: str) -> None:
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('w', 'http://127.0.0.1:9/', 'ids.w')"
    )
    for call, args in (
        ("SELECT rule_nats_publish('ids.a', '{}'::jsonb, NULL, %s)", (msg_id,)),
        ("SELECT rule_nats_try_publish('ids.a', '{}'::jsonb, NULL, %s)", (msg_id,)),
        ("SELECT rule_nats_publish_on_commit('ids.a', '{}'::jsonb, NULL, %s)", (msg_id,)),
        ("SELECT rule_webhook_publish_nats(1, '{}'::jsonb, %s)", (msg_id,)),
        ("SELECT rule_nats_publish('ids.a', '{}'::jsonb, %s::jsonb)", (json.dumps({"Nats-Msg-Id": msg_id}),)),
        (
            "SELECT rule_nats_publish_on_commit('ids.a', '{}'::jsonb, %s::jsonb)",
            (json.dumps({"nats-msg-id": msg_id}),),
        ),
    ):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
            db.execute(call, args)
        hint = info.value.diag.message_hint or ""
        assert "outbox-, replay- or stream-" in hint, (call, str(info.value), hint)
    assert db.execute("SELECT count(*) FROM rule_nats_outbox").fetchone() == (0,)


def test_generated_ids_carry_128_random_bits(db: psycopg.Connection) -> None:
    inst = db.execute("SELECT installation_id FROM rule_nats_installation").fetchone()
    assert inst is not None
    for _ in range(3):
        db.execute("SELECT rule_nats_publish_on_commit('ids.a', '{}'::jsonb)")
    ids = [r[0] for r in db.execute("SELECT message_id FROM rule_nats_outbox ORDER BY outbox_id")]
    randoms = []
    for outbox_id, message_id in enumerate(ids, start=1):
        m = re.fullmatch(rf"outbox-{inst[0]}-{outbox_id}-([0-9a-f]{{32}})", message_id)
        assert m, message_id
        randoms.append(m.group(1))
    assert len(set(randoms)) == 3


# --- defect 8: the monitor sees origins -------------------------------------------------------

SLACK = "https://hooks.slack.example:8443/services/T000/B000/XXXXsecretXXXX?x=1#f"


def test_the_monitor_sees_scheme_host_and_port_only(logins: Logins) -> None:
    su = logins.su
    su.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('slack', %s, 'ids.slack')",
        (SLACK,),
    )
    su.execute(
        "INSERT INTO rule_nats_delivery_attempts (stream_name, consumer_name, webhook_id, attempt, outcome, url) "
        "VALUES ('S', 'c', 1, 1, 'retry', %s), ('S', 'c', NULL, 1, 'retry', %s)",
        (SLACK, "http://user:pw@discord.example/api/webhooks/1/tok3n"),
    )
    su.execute("INSERT INTO rule_nats_endpoint_state (webhook_id, last_error) VALUES (1, 'HTTP 500')")
    seen = []
    with logins.connect("monitor") as c:
        views = [
            r[0]
            for r in c.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'v' AND has_table_privilege(c.oid, 'SELECT') "
                "ORDER BY 1"
            )
        ]
        assert {
            "nats_webhooks",
            "nats_endpoint_health",
            "nats_delivery_attempts",
            "nats_recent_failures",
        } <= set(views)
        for view in views:
            seen.append(
                repr(c.execute(sql.SQL("SELECT * FROM public.{}").format(sql.Identifier(view))).fetchall())
            )
    text = "\n".join(seen)
    for secret in ("services", "XXXXsecretXXXX", "x=1", "tok3n", "user", "pw@", "/api"):
        assert secret not in text, secret
    assert "'https://hooks.slack.example:8443'" in text
    assert "'http://discord.example'" in text


def test_valid_nats_headers_agrees_with_the_rules_it_repeats(database_url: str) -> None:
    """rule_nats_valid_nats_headers repeats the header and message-id rules in one body (speed):
    for every header name, header value and caller id of the table of cases, it says what the
    separate rule functions say together."""
    probes: list[dict[str, object]] = []
    for case in CASES:
        if "\x00" in case.value:
            continue
        if case.kind in ("header_name", "nats_header_name"):
            probes.append({case.value: "v"})
        elif case.kind == "header_value":
            probes += [{"X-A": case.value}, {"X-A": [case.value, "b"]}]
        elif case.kind in ("message_id", "caller_message_id"):
            probes += [{"Nats-Msg-Id": case.value}, {"nats-msg-id": case.value}]
    probes += [{"X-A": 1}, {"X-A": True}, {"X-A": None}, {"X-A": {"b": 1}}, {}, {"Nats-Msg-Id": 7}]
    wrong = []
    conn = psycopg.connect(database_url, autocommit=True)
    for probe in probes:
        row = conn.execute(
            """
            SELECT public.rule_nats_valid_nats_headers(h),
                   public.rule_nats_valid_headers(h)
                   AND coalesce((SELECT bool_and(public.rule_nats_nats_header_allowed(k)
                                                 AND (lower(k) <> 'nats-msg-id'
                                                      OR (jsonb_typeof(h -> k) = 'string'
                                                          AND public.rule_nats_valid_message_id(h ->> k)
                                                          AND NOT public.rule_nats_message_id_reserved(h ->> k))))
                                   FROM jsonb_object_keys(h) AS k), true)
              FROM (SELECT %s::jsonb AS h) x
            """,
            (json.dumps(probe),),
        ).fetchone()
        assert row is not None
        if row[0] is not row[1]:
            wrong.append((probe, row))
    conn.close()
    assert len(probes) > 100
    assert wrong == []


def test_the_fast_publish_check_agrees_with_the_rules_it_repeats(database_url: str) -> None:
    """rule_nats__publish_args_valid (one body, for speed) says what the rule functions say."""
    probes: list[tuple[str, str | None, str | None, str]] = []
    for case in CASES:
        if "\x00" in case.value:
            continue
        if case.kind == "subject":
            expected = "public.rule_nats_valid_subject(s, false) AND NOT public.rule_nats_subject_reserved(s)"
            probes.append((case.value, None, None, expected))
        elif case.kind in ("message_id", "caller_message_id"):
            expected = "public.rule_nats_valid_message_id(m) AND NOT public.rule_nats_message_id_reserved(m)"
            probes.append(("a.b", None, case.value, expected))
        elif case.kind in ("header_name", "nats_header_name"):
            probes.append(
                ("a.b", json.dumps({case.value: "v"}), None, "public.rule_nats_valid_nats_headers(h)")
            )
        elif case.kind == "header_value":
            probes.append(
                ("a.b", json.dumps({"X-A": case.value}), None, "public.rule_nats_valid_nats_headers(h)")
            )
            probes.append(
                (
                    "a.b",
                    json.dumps({"Nats-Msg-Id": case.value}),
                    None,
                    "public.rule_nats_valid_nats_headers(h)",
                )
            )
    wrong = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for subject, headers, msg_id, expected in probes:
            row = conn.execute(
                sql.SQL(
                    "SELECT public.rule_nats__publish_args_valid(s, h, m), {} FROM (SELECT %s AS s, %s::jsonb AS h, %s AS m) x"
                ).format(sql.SQL(expected)),
                (subject, headers, msg_id),
            ).fetchone()
            assert row is not None
            if row[0] is not row[1]:
                wrong.append((subject[:40], headers and headers[:60], msg_id and msg_id[:40], row))
    assert len(probes) > 100
    assert wrong == []
