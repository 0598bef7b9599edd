"""Identities no one can claim and secrets no one reads, end to end (issue 19, defects 2, 7, 8):
PostgreSQL, the sidecar, a real nats-server and a receiver on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import nats
import psycopg
import pytest

from tests.support.receiver import Receiver, Request, Response
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until

SECRET = "s3cr3t-token-value-42"


@pytest.fixture
def db(nats_db: psycopg.Connection, receiver: Receiver) -> psycopg.Connection:
    """A stream of its own per test (the nats-server is the session's): IDE_<database>, ide_<database>.>."""
    name = nats_db.info.dbname
    configure(nats_db, f"IDE_{name}", f"ide_{name}")
    nats_db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, headers) VALUES ('w', %s, %s, %s)",
        (receiver.url + "/hook", f"ide_{name}.w", json.dumps({"Authorization": f"Bearer {SECRET}"})),
    )
    return nats_db


def subject(db: psycopg.Connection) -> str:
    return f"ide_{db.info.dbname}.w"


def stream(db: psycopg.Connection) -> str:
    return f"IDE_{db.info.dbname}"


def publish(url: str, subject: str, items: list[tuple[bytes, dict[str, str]]]) -> list[int]:
    """Publish as another application would, straight to JetStream; the sequence of each."""

    async def go() -> list[int]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            return [(await js.publish(subject, body, headers=headers)).seq for body, headers in items]
        finally:
            await nc.close()

    return asyncio.run(go())


def envelope(event: str) -> bytes:
    return json.dumps({"webhook_id": 1, "data": {"id": event}}).encode()


def received(receiver: Receiver) -> list[tuple[str, dict[str, str]]]:
    out = []
    for r in receiver.snapshot():
        out.append((json.loads(r.body)["id"], {k.lower(): v for k, v in r.headers.items()}))
    return out


def test_a_publisher_cannot_silence_a_trigger_event_by_using_its_next_id(
    db: psycopg.Connection,
    receiver: Receiver,
    nats_server: NatsServer,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """The next outbox id was outbox-<installation>-<n+1>, n visible to anyone: published first by
    another application, JetStream dropped the trigger's event as a duplicate and the relay marked
    it published. The attacker tries every shape the id could have had."""
    worker = sidecar_factory()
    wait_ready(db)
    inst = scalar(db, "SELECT installation_id FROM rule_nats_installation")
    nxt = scalar(
        db, "SELECT last_value + CASE WHEN is_called THEN 1 ELSE 0 END FROM rule_nats_outbox_outbox_id_seq"
    )
    guesses = [f"outbox-{inst}-{nxt}", f"outbox-{db.info.dbname}-{nxt}"]
    publish(
        nats_server.url,
        subject(db),
        [(envelope(f"attacker-{i}"), {"Nats-Msg-Id": g}) for i, g in enumerate(guesses)],
    )
    outbox_id = scalar(
        db, "SELECT rule_nats_publish_on_commit(%s, %s::jsonb)", (subject(db), envelope("victim").decode())
    )
    assert outbox_id == nxt
    assert wait_until(lambda: "victim" in [e for e, _ in received(receiver)], timeout=20), (
        received(receiver),
        db.execute("SELECT * FROM rule_nats_publish_history").fetchall(),
        worker.output()[-3000:],
    )
    # Written with the relay's COMMIT, which may come after the delivery.
    query = "SELECT duplicate, success FROM rule_nats_publish_history WHERE triggered_by = 'outbox'"
    assert wait_until(lambda: db.execute(query).fetchall() == [(False, True)])


def test_a_duplicate_puback_is_verified_against_the_stored_message(
    db: psycopg.Connection,
    receiver: Receiver,
    nats_server: NatsServer,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """A caller's own id is shared by every publisher of the stream: when another message holds it,
    the outbox row fails with that reason instead of being marked published. The same message
    published twice (a relay that died before its COMMIT) still counts as published."""
    worker = sidecar_factory()
    wait_ready(db)
    victim = envelope("victim").decode()
    same = db.execute("SELECT %s::jsonb::text", (envelope("same").decode(),)).fetchone()
    assert same is not None
    seqs = publish(
        nats_server.url,
        subject(db),
        [
            (envelope("attacker"), {"Nats-Msg-Id": "order-1"}),
            (same[0].encode(), {"Nats-Msg-Id": "order-2"}),  # the bytes the relay will send for it
        ],
    )
    db.execute("SELECT rule_nats_publish_on_commit(%s, %s::jsonb, NULL, 'order-1')", (subject(db), victim))
    db.execute("SELECT rule_nats_publish_on_commit(%s, %s::jsonb, NULL, 'order-2')", (subject(db), same[0]))
    assert wait_until(
        lambda: scalar(db, "SELECT count(*) FROM rule_nats_outbox WHERE status = 'pending'") == 0
    ), worker.output()[-3000:]
    failed = db.execute("SELECT message_id, status, error_message FROM rule_nats_outbox").fetchall()
    assert [(m, s) for m, s, _ in failed] == [("order-1", "failed")], failed
    assert "another message holds this id" in failed[0][2] and f"sequence {seqs[0]}" in failed[0][2]
    hist = db.execute(
        "SELECT message_id, success, duplicate, sequence_number FROM rule_nats_publish_history "
        "WHERE triggered_by = 'outbox' ORDER BY message_id"
    ).fetchall()
    assert ("order-2", True, True, seqs[1]) in hist, hist
    assert ("order-1", True, True, seqs[0]) not in hist, hist


def test_webhook_id_obeys_the_message_id_rules(
    db: psycopg.Connection,
    receiver: Receiver,
    nats_server: NatsServer,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """Ids from NATS headers that break the rules (controls, 8,000 characters, another message's
    stream-... id) never reach a receiver: it gets stream-<stream>-<seq>, and that is what is stored."""
    sidecar_factory()
    wait_ready(db)
    ids = {
        "ctl": "a\x01b",
        "tab": "a\tb",
        "long": "x" * 8000,
        "claim": f"stream-{stream(db)}-999",
        "ok": "order-7",
    }
    seqs = publish(nats_server.url, subject(db), [(envelope(k), {"Nats-Msg-Id": v}) for k, v in ids.items()])
    assert wait_until(lambda: len(received(receiver)) == len(ids), timeout=20), received(receiver)
    sent = {event: headers["webhook-id"] for event, headers in received(receiver)}
    expected = {k: f"stream-{stream(db)}-{seq}" for k, seq in zip(ids, seqs, strict=True)}
    expected["ok"] = "order-7"
    assert sent == expected
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts") == len(ids))
    stored = {r[0] for r in db.execute("SELECT message_id FROM rule_nats_delivery_attempts")}
    assert stored == set(expected.values())


def test_the_webhooks_secret_headers_are_masked_in_what_its_endpoint_answered(
    db: psycopg.Connection,
    receiver: Receiver,
    nats_server: NatsServer,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """An endpoint that echoes the request's Authorization in its error body: the attempt rows and
    the dead letter the monitor reads do not show it."""

    def echo(req: Request) -> Response:
        auth = {k.lower(): v for k, v in req.headers.items()}.get("authorization", "")
        token = auth.split()[-1] if auth else ""
        return Response(status=400, body=json.dumps({"got": auth, "token": token}).encode())

    receiver.responder = echo
    sidecar_factory()
    wait_ready(db)
    publish(nats_server.url, subject(db), [(envelope("e1"), {})])
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 1, timeout=20)
    assert SECRET in received(receiver)[0][1]["authorization"]  # it was sent, and echoed
    text = repr(db.execute("SELECT * FROM rule_nats_delivery_attempts").fetchall())
    text += repr(db.execute("SELECT * FROM rule_nats_dead_letters").fetchall())
    text += repr(db.execute("SELECT * FROM nats_recent_failures").fetchall())
    assert "got" in text and "***" in text  # the body is recorded, masked
    assert SECRET not in text
