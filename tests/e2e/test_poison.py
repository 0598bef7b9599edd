"""Issue 11, "nothing lost, nothing silent": one bad message never stops recording or kills a task.

Every message ends recorded (attempt row) or dead-lettered, and acknowledged, whatever its bytes;
the sidecar is a real subprocess, the receivers are on loopback, messages are published raw with
nats-py so that the bytes are exactly the ones under test.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
from collections.abc import Callable

import nats
import psycopg
import pytest

from tests.support.receiver import Receiver, Request, Response
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


@pytest.fixture
def other_receiver() -> Receiver:
    rcv = Receiver().start()
    yield rcv  # type: ignore[misc]
    rcv.stop()


def publish(url: str, subject: str, bodies: list[bytes], headers: dict[str, str] | None = None) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for body in bodies:  # one by one: the stream order is the list order
            await js.publish(subject, body, headers=headers)
        await nc.close()

    asyncio.run(go())


def ack_pending(url: str, stream: str) -> int:
    """Messages JetStream handed to a worker and that were not acknowledged (yet)."""

    async def go() -> int:
        nc = await nats.connect(url)
        info = await nc.jetstream().consumer_info(stream, "workers")
        await nc.close()
        return int(info.num_ack_pending) + int(info.num_pending)

    return asyncio.run(go())


def raw_message(url: str, event_id_json: str, data: str = '{"n": 1}', extra: str = "") -> bytes:
    """A message whose event_id is given as JSON source text (so escapes like \\u0000 reach the parser)."""
    return (f'{{"webhook_url": "{url}", "event_id": {event_id_json}, "data": {data}{extra}}}').encode()


def recorded_seqs(db: psycopg.Connection) -> set[int]:
    rows = db.execute(
        "SELECT stream_seq FROM rule_nats_delivery_attempts UNION SELECT stream_seq FROM rule_nats_dead_letters"
    ).fetchall()
    return {int(r[0]) for r in rows}


def test_nul_and_lone_surrogate_event_ids_do_not_stop_recording(
    db: psycopg.Connection,
    receiver: Receiver,
    other_receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "PNUL", "pnul", batch_size=20)
    sidecar = sidecar_factory()
    wait_ready(db)
    a, b = receiver.url + "/a", other_receiver.url + "/b"
    bodies = [
        raw_message(a, '"ok-1"'),
        raw_message(a, '"a\\u0000b"'),
        raw_message(b, '"ok-2"'),
        raw_message(a, '"\\ud800"'),
        raw_message(a, '"ok-3"'),
        raw_message(b, '"ok-4"'),
    ]
    publish(nats_server.url, "pnul.x", bodies)
    # Every message ends with a row (attempt or dead letter), and the normal ones are delivered.
    assert wait_until(lambda: recorded_seqs(db) >= set(range(1, 7)), timeout=30), (
        recorded_seqs(db),
        sidecar.output()[-4000:],
    )
    delivered = {
        r[0]
        for r in db.execute(
            "SELECT message_id FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'"
        ).fetchall()
    }
    assert {"ok-1", "ok-2", "ok-3", "ok-4"} <= delivered
    # The poison ones cannot be a webhook-id header (the shared rule for message ids): dead letters
    # with that reason and the original bytes, recorded like any other outcome.
    poison = db.execute(
        "SELECT stream_seq, reason, message_raw FROM rule_nats_dead_letters WHERE stream_seq IN (2, 4) ORDER BY 1"
    ).fetchall()
    assert [(p[0], p[1]) for p in poison] == [(2, "invalid_header"), (4, "invalid_header")], poison
    assert bytes(poison[0][2]) == bodies[1] and bytes(poison[1][2]) == bodies[3]
    # Nothing left unacknowledged (no endless redelivery), and the worker is still there and healthy.
    assert wait_until(lambda: ack_pending(nats_server.url, "PNUL") == 0, timeout=20)
    assert sidecar.proc.poll() is None
    # And it keeps recording afterwards.
    publish(nats_server.url, "pnul.x", [raw_message(b, '"ok-5"')])
    assert wait_until(
        lambda: scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE message_id = 'ok-5'") == 1
    ), sidecar.output()[-4000:]


def test_messages_that_crash_delivery_become_dead_letters(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "PCRASH", "pcrash", batch_size=10)
    sidecar = sidecar_factory()
    wait_ready(db)
    url = receiver.url + "/c"
    nested = "[" * 100000 + "]" * 100000
    bodies = [
        raw_message(url, '"id\\r\\nX-Injected: 1"'),  # 1: CR/LF in the event id (it becomes webhook-id)
        raw_message(url, '"hdr-1"', extra=', "headers": {"X-Test\\n": "v"}'),  # 2: header name ending in \n
        raw_message(url, '"deep-1"', data=nested),  # 3: RecursionError while reading
        raw_message(url, '"fine-1"'),  # 4
    ]
    publish(nats_server.url, "pcrash.x", bodies)
    assert wait_until(lambda: recorded_seqs(db) >= {1, 2, 3, 4}, timeout=30), (
        recorded_seqs(db),
        sidecar.output()[-4000:],
    )
    reasons = dict(db.execute("SELECT stream_seq, reason FROM rule_nats_dead_letters").fetchall())
    assert reasons[1] == "invalid_header"
    assert reasons[2] == "invalid_header"
    assert reasons[3] in ("internal_error", "invalid_json")
    error = scalar(db, "SELECT error FROM rule_nats_dead_letters WHERE stream_seq = 3")
    assert "Recursion" in str(error) or "nested" in str(error)
    raw = scalar(db, "SELECT message_raw FROM rule_nats_dead_letters WHERE stream_seq = 3")
    assert bytes(raw) == bodies[2]  # type: ignore[arg-type]
    assert (
        scalar(db, "SELECT outcome FROM rule_nats_delivery_attempts WHERE message_id = 'fine-1'")
        == "delivered"
    )
    assert [r.path for r in receiver.snapshot()] == ["/c"]  # nothing bad was sent
    assert wait_until(lambda: ack_pending(nats_server.url, "PCRASH") == 0, timeout=20)
    assert sidecar.proc.poll() is None


def test_gzipped_error_body_is_stored_readable(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "PGZ", "pgz", retry_max_attempts=1)
    seen: list[Request] = []

    def respond(req: Request) -> Response:
        seen.append(req)
        if req.path == "/gz":
            body = gzip.compress(b"upstream exploded \x00 badly" + bytes(range(256)))
            return Response(status=500, body=body, headers={"Content-Encoding": "gzip"})
        return Response()

    receiver.responder = respond
    sidecar = sidecar_factory()
    wait_ready(db)
    publish(
        nats_server.url,
        "pgz.x",
        [raw_message(receiver.url + "/gz", '"gz-1"'), raw_message(receiver.url + "/ok", '"gz-ok"')],
    )
    assert wait_until(lambda: recorded_seqs(db) >= {1, 2}, timeout=30), sidecar.output()[-4000:]
    body = scalar(
        db,
        "SELECT response_body FROM rule_nats_delivery_attempts WHERE message_id = 'gz-1' ORDER BY attempt_id",
    )
    assert str(body).startswith("upstream exploded"), body
    assert (
        scalar(db, "SELECT reason FROM rule_nats_dead_letters WHERE message_id = 'gz-1'")
        == "retries_exhausted"
    )
    assert (
        scalar(db, "SELECT outcome FROM rule_nats_delivery_attempts WHERE message_id = 'gz-ok'")
        == "delivered"
    )
    assert seen[0].headers.get("Accept-Encoding") == "identity"
    assert wait_until(lambda: ack_pending(nats_server.url, "PGZ") == 0, timeout=20)


def test_dead_letter_recorded_after_a_retried_batch_replays(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "PREPLAY", "preplay")
    sidecar = sidecar_factory()
    wait_ready(db)
    # Recording fails for a while (the worker may not write attempts): the batch is put back and retried.
    db.execute("REVOKE INSERT ON rule_nats_dead_letters FROM rule_nats_worker")
    body = json.dumps({"webhook_url": "ftp://example.com/x", "event_id": "replay-1", "data": {}}).encode()
    publish(nats_server.url, "preplay.x", [body], headers={"X-Trace": "t-1"})
    assert wait_until(lambda: "record_failed" in sidecar.output() or "recording" in sidecar.output(), 30)
    db.execute("GRANT INSERT ON rule_nats_dead_letters TO rule_nats_worker")
    assert wait_until(
        lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters WHERE message_id = 'replay-1'") == 1,
        timeout=30,
    ), sidecar.output()[-4000:]
    assert scalar(db, "SELECT jsonb_typeof(message_headers) FROM rule_nats_dead_letters") == "object"
    assert scalar(db, "SELECT message_headers ->> 'X-Trace' FROM rule_nats_dead_letters") == "t-1"
    assert scalar(db, "SELECT rule_nats_replay_dead_letters()") == 1


def test_a_row_postgresql_refuses_is_isolated_and_the_rest_of_the_batch_recorded(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """A subject too big for the index of the hourly rollup (not fixable by escaping): its batch is
    split until the row stands alone; it becomes an 'unrecordable' dead letter with the original bytes."""
    configure(db, "PBIG", "pbig", batch_size=20)
    receiver.responder = lambda req: Response(status=400 if req.path == "/big" else 200)
    sidecar = sidecar_factory()
    wait_ready(db)
    # Incompressible and over btree's 2704-byte limit, but under NATS's 4 KB control line.
    big_subject = "pbig." + base64.b64encode(os.urandom(2700)).decode().replace("/", "_").replace("+", "-")
    bodies = [raw_message(receiver.url + "/ok", f'"big-ok-{i}"') for i in range(8)]
    bodies.insert(3, raw_message(receiver.url + "/big", json.dumps("big-id")))
    publish(nats_server.url, "pbig.x", bodies[:3])
    publish(nats_server.url, big_subject, bodies[3:4])
    publish(nats_server.url, "pbig.x", bodies[4:])
    assert wait_until(lambda: recorded_seqs(db) >= set(range(1, 10)), timeout=30), (
        recorded_seqs(db),
        sidecar.output()[-4000:],
    )
    delivered = scalar(
        db,
        "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered' AND left(message_id, 7) = 'big-ok-'",
    )
    assert delivered == 8
    row = db.execute("SELECT reason, message_raw, length(message_id) FROM rule_nats_dead_letters").fetchone()
    assert row is not None
    assert row[0] == "unrecordable" and bytes(row[1]) == bodies[3] and row[2] <= 200
    assert wait_until(lambda: ack_pending(nats_server.url, "PBIG") == 0, timeout=20)
    assert "record_quarantined" in sidecar.output() or "cannot be recorded" in sidecar.output()


def test_hosts_that_can_never_resolve_are_dead_lettered_at_once(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    """Non-canonical IPv4 forms and invalid host names are permanent: no attempt, no retry, no DNS."""
    configure(db, "PHOST", "phost")
    sidecar = sidecar_factory()
    wait_ready(db)
    bodies = [
        raw_message(f"http://127.1:{receiver.port}/x", '"h-1"'),
        raw_message(f"http://2130706433:{receiver.port}/x", '"h-2"'),
        raw_message(f"http://a..b:{receiver.port}/x", '"h-3"'),
    ]
    publish(nats_server.url, "phost.x", bodies)
    assert wait_until(lambda: recorded_seqs(db) >= {1, 2, 3}, timeout=30), sidecar.output()[-4000:]
    rows = db.execute("SELECT message_id, reason, attempts FROM rule_nats_dead_letters ORDER BY 1").fetchall()
    assert rows == [
        ("h-1", "invalid_webhook_url", 0),
        ("h-2", "invalid_webhook_url", 0),
        ("h-3", "invalid_webhook_url", 0),
    ]
    assert receiver.snapshot() == []
    assert scalar(db, "SELECT count(*) FROM rule_nats_retries") == 0
