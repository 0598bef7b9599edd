"""Identity of retries and outbox events (issue 11, defect 7), against a real PostgreSQL.

A retry row exists once per message (a unique key, not a Python check), only the worker holding
a lease may reschedule it, and outbox message ids carry a per-installation part.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from sidecar import migrate
from sidecar.recorder import Outcome, Recorder
from sidecar.rows import RetryRow, RetryUpdate
from tests.support.stack import PostgresCluster


def retry_row(seq: int, error: str = "deferred") -> RetryRow:
    now = dt.datetime.now(dt.UTC)
    return RetryRow("m-1", "S", "c", seq, "s.a", b"{}", None, 0, now, error, now, None)


async def record(url: str, outcomes: list[Outcome], worker: str = "me") -> None:
    async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
        recorder = Recorder(pool, worker_name=worker)
        for o in outcomes:
            await recorder.submit(o)
        await recorder._record(list(recorder._queue))  # one batch, as the run loop would write it


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


async def test_a_message_that_comes_back_does_not_add_a_second_retry_row(
    database_url: str, conn: psycopg.Connection
) -> None:
    # Deferred, its ack lost, redelivered and deferred again: in the same batch and in the next one.
    await record(database_url, [Outcome(retry_insert=retry_row(7)), Outcome(retry_insert=retry_row(7))])
    await record(database_url, [Outcome(retry_insert=retry_row(7, "again"))])
    rows = conn.execute("SELECT stream_seq, last_error FROM rule_nats_retries").fetchall()
    assert rows == [(7, "deferred")]
    # The database refuses a second row whoever writes it.
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO rule_nats_retries (message_id, stream_name, consumer_name, stream_seq, subject, "
            "message_raw, attempts, first_attempt_at, next_attempt_at) "
            "VALUES ('m-1', 'S', 'c', 7, 's.a', '', 0, now(), now())"
        )


async def test_only_the_lease_holder_reschedules_a_retry(database_url: str, conn: psycopg.Connection) -> None:
    await record(database_url, [Outcome(retry_insert=retry_row(1)), Outcome(retry_insert=retry_row(2))])
    conn.execute(
        "UPDATE rule_nats_retries SET leased_by = CASE stream_seq WHEN 1 THEN 'other' ELSE 'me' END, "
        "leased_until = now() + interval '10 minutes'"
    )
    ids = dict(conn.execute("SELECT stream_seq, retry_id FROM rule_nats_retries").fetchall())
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await record(
        database_url,
        [
            Outcome(retry_update=RetryUpdate(ids[1], 3, later, "mine?")),
            Outcome(retry_update=RetryUpdate(ids[2], 3, later, "mine")),
        ],
    )
    rows = conn.execute(
        "SELECT stream_seq, attempts, leased_by, last_error FROM rule_nats_retries ORDER BY stream_seq"
    ).fetchall()
    assert rows == [(1, 0, "other", "deferred"), (2, 3, None, "mine")]


def installation(url: str) -> str:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT installation_id FROM rule_nats_installation").fetchone()
    assert row is not None
    return str(row[0])


def test_outbox_ids_carry_the_installation(
    empty_database_url: str, pg_cluster: PostgresCluster, tmp_path: object
) -> None:
    """Two installations whose databases have the same name (here: two databases migrated apart, the
    cluster cannot hold two of one name) must not produce the same Nats-Msg-Id for their outbox rows."""
    migrate.migrate(empty_database_url)
    other = "identity_other"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(other)))
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(other)))
    try:
        migrate.migrate(pg_cluster.url(other))
        ids = []
        for url in (empty_database_url, pg_cluster.url(other)):
            inst = installation(url)
            assert len(inst) >= 12
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("UPDATE rule_nats_config SET publish_registered_subjects_only = false")
                outbox_id = c.execute(
                    "SELECT rule_nats_publish_on_commit('events.a', '{}'::jsonb)"
                ).fetchone()[0]  # type: ignore[index]
                c.execute("CREATE TABLE t (id int)")
                c.execute("CREATE TRIGGER t_nats AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                          "rule_nats_table_trigger('events.t')")  # fmt: skip
                c.execute("INSERT INTO t VALUES (1)")
                rows = c.execute("SELECT outbox_id, message_id FROM rule_nats_outbox ORDER BY 1").fetchall()
            # outbox-<installation>-<outbox_id>-<128 random bits> (issue 19: no one can guess the next one)
            assert rows[0][0] == outbox_id
            assert re.fullmatch(rf"outbox-{inst}-{outbox_id}-[0-9a-f]{{32}}", rows[0][1])
            assert re.fullmatch(rf"outbox-{inst}-{rows[1][0]}-[0-9a-f]{{32}}", rows[1][1])
            ids.append([r[1] for r in rows])
        assert installation(empty_database_url) != installation(pg_cluster.url(other))
        assert not set(ids[0]) & set(ids[1])
    finally:
        with psycopg.connect(pg_cluster.url(), autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(other)))


def test_replay_keeps_the_message_id_for_the_receiver(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO rule_nats_dead_letters (message_id, stream_name, consumer_name, stream_seq, subject, "
        "message_raw, message_headers, reason, error, attempts) "
        "VALUES ('evt-9', 'S', 'c', 4, 's.a', '{}', '{\"Nats-Msg-Id\": \"evt-9\", \"X-A\": \"1\"}', "
        "'http_4xx', 'HTTP 400', 3)"
    )
    conn.execute("SELECT rule_nats_replay_dead_letter(1)")
    conn.execute("SELECT rule_nats_replay_dead_letter(1)")
    rows = conn.execute("SELECT message_id, headers FROM rule_nats_outbox ORDER BY outbox_id").fetchall()
    inst = installation(conn.info.dsn)
    # A Nats-Msg-Id of its own per replay (JetStream's duplicate window would drop a second copy of the
    # original id); the original id and the attempts made so far travel in headers.
    assert re.fullmatch(rf"replay-{inst}-1-1-[0-9a-f]{{32}}", rows[0][0])
    assert re.fullmatch(rf"replay-{inst}-1-2-[0-9a-f]{{32}}", rows[1][0])
    for _, headers in rows:
        assert headers == {"X-A": "1", "Rule-Nats-Message-Id": "evt-9", "Rule-Nats-Attempts": "3"}, (
            json.dumps(headers)
        )
