"""The outbox relay refuses, before publishing, rows that would reach NATS's own machinery.

SQL refuses such rows at INSERT; these tests drop those CHECKs (as the superuser, in the test's
own database) to prove the sidecar holds the line on its own: a row written before the CHECK
existed, or by a superuser, must not delete a stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import nats
import nats.js.errors
import psycopg
import pytest
from psycopg import sql

from tests.support.publish import add_stream
from tests.support.registry import scalar
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until


def drop_outbox_checks(db: psycopg.Connection) -> None:
    """Drop every CHECK of rule_nats_outbox on subject, headers or message_id (superuser, this database)."""
    names = db.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'rule_nats_outbox'::regclass AND contype = 'c' "
        "AND pg_get_constraintdef(oid) ~ '(subject|headers|message_id)'"
    ).fetchall()
    for (name,) in names:
        db.execute(sql.SQL("ALTER TABLE rule_nats_outbox DROP CONSTRAINT {}").format(sql.Identifier(name)))


async def _stream_exists(url: str, name: str) -> bool:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().stream_info(name)
        return True
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()


def stream_exists(url: str, name: str) -> bool:
    return asyncio.run(_stream_exists(url, name))


BAD_ROWS = [
    # (subject, headers, message_id, fragment of error_message)
    ("$JS.API.STREAM.DELETE.VICTIM", None, "evil-delete", "reserved"),
    ("$JS.API.STREAM.PURGE.VICTIM", None, "evil-purge", "reserved"),
    ("_INBOX.steal", None, "evil-inbox", "reserved"),
    ("victim.x\r\nPUB victim.y 1", None, "evil-crlf-subject", "subject"),
    ("victim.h", {"X-A\r\nNats-Expected-Stream": "x"}, "evil-header-name", "header name"),
    ("victim.h", {"X-A": "v\r\nNats-Expected-Stream: NOPE"}, "evil-header-value", "header value"),
    ("victim.m", None, "id\r\nNats-Expected-Stream: NOPE", "message id"),
]


@pytest.fixture
def db(nats_db: psycopg.Connection, nats_server: NatsServer) -> psycopg.Connection:
    add_stream(nats_server.url, "VICTIM", ["victim.>"])
    drop_outbox_checks(nats_db)
    return nats_db


def test_reserved_and_malformed_rows_are_failed_not_published(
    db: psycopg.Connection,
    nats_server: NatsServer,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    with db.transaction():
        for subject, headers, message_id, _ in BAD_ROWS:
            db.execute(
                "INSERT INTO rule_nats_outbox (subject, payload, headers, message_id) VALUES (%s, '{}', %s, %s)",
                (subject, None if headers is None else json.dumps(headers), message_id),
            )
        db.execute(
            "INSERT INTO rule_nats_outbox (subject, payload, message_id) VALUES ('victim.ok', '{}', 'good-1')"
        )
    sidecar = sidecar_factory()

    def settled() -> bool:
        return scalar(db, "SELECT count(*) FROM rule_nats_outbox WHERE status = 'pending'") == 0

    done = wait_until(settled, timeout=20)
    assert stream_exists(nats_server.url, "VICTIM"), "the relay published to the JetStream API"
    assert done, sidecar.output()[-3000:]
    rows = {
        r[0]: r[1:]
        for r in db.execute("SELECT message_id, status, attempts, error_message FROM rule_nats_outbox")
    }
    assert set(rows) == {m for _, _, m, _ in BAD_ROWS}, rows  # the good row was published and left
    for _, _, message_id, fragment in BAD_ROWS:
        status, attempts, error = rows[message_id]
        assert (status, attempts) == ("failed", 1), (message_id, rows[message_id])
        assert fragment in error and "refused before publishing" in error, (message_id, error)
    # nothing was sent for the refused rows, so they have no history row; the good one has
    assert db.execute("SELECT message_id, success FROM rule_nats_publish_history").fetchall() == [
        ("good-1", True)
    ]
    # refused rows were never published: only the good one reached the stream
    assert wait_until(lambda: stream_messages(nats_server.url, "VICTIM") == 1, timeout=5)
    assert sidecar.terminate() == 0


async def _stream_messages(url: str, name: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(name)).state.messages)
    finally:
        await nc.close()


def stream_messages(url: str, name: str) -> int:
    return asyncio.run(_stream_messages(url, name))
