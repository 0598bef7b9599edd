"""Recording level (sql/0019): a consumer or webhook with recording = 'failures' keeps its failed
attempts as rows and its successes as per-minute counts; the views and counters stay exact."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
import pytest

from tests.e2e.conftest import Sidecar, wait_until
from tests.e2e.test_delivery import configure, wait_ready
from tests.support.receiver import Receiver, Response


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def counters(db: psycopg.Connection) -> tuple[object, ...]:
    row = db.execute(
        "SELECT (SELECT sum(message_count) FROM rule_nats_stats_hourly WHERE source = 'delivery'), "
        "(SELECT sum(success_count) FROM rule_nats_stats_hourly WHERE source = 'delivery'), "
        "(SELECT sum(delivered) FROM rule_nats_stats_minute), (SELECT sum(failed) FROM rule_nats_stats_minute), "
        "(SELECT sum(success_count) FROM nats_performance_stats WHERE source = 'delivery'), "
        "(SELECT sum(failure_count) FROM nats_performance_stats WHERE source = 'delivery')"
    ).fetchone()
    assert row is not None
    return tuple(int(v) if v is not None else None for v in row)


@pytest.mark.parametrize("level_of", ["consumer", "webhook"])
def test_failures_level_keeps_failures_as_rows_and_counts_successes(
    db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar], level_of: str
) -> None:
    receiver.responder = lambda req: Response(status=410) if req.path == "/gone" else Response()
    if level_of == "consumer":
        configure(db, "REC", "rec", recording="failures")
        target: dict[str, object] = {"webhook_url": receiver.url + "/ok"}
    else:
        configure(db, "REC", "rec")
        webhook_id = db.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, recording) "
            "VALUES ('quiet', %s, 'rec.quiet', 'failures') RETURNING webhook_id",
            (receiver.url + "/ok",),
        ).fetchone()
        assert webhook_id is not None
        target = {"webhook_id": webhook_id[0]}
    sidecar = sidecar_factory()
    wait_ready(db)
    for i in range(6):
        db.execute(
            "SELECT rule_nats_publish('rec.a', %s::jsonb)", (json.dumps({**target, "data": {"i": i}}),)
        )
    db.execute(
        "SELECT rule_nats_publish('rec.a', %s::jsonb)",
        (json.dumps({"webhook_url": receiver.url + "/gone", "data": {}}),),
    )
    assert wait_until(lambda: counters(db)[0] == 7, timeout=30), sidecar.output()[-3000:]
    # The failure is a row as before; the six successes are not rows, they are counted.
    rows = db.execute("SELECT outcome, http_status FROM rule_nats_delivery_attempts").fetchall()
    if level_of == "consumer":
        assert rows == [("dead_letter", 410)]
        assert db.execute("SELECT sum(delivered) FROM rule_nats_success_minutes").fetchone() == (6,)
    else:
        # The webhook's own setting: the consumer's other deliveries keep their rows (none here).
        assert rows == [("dead_letter", 410)]
        assert db.execute(
            "SELECT sum(delivered), min(webhook_id) FROM rule_nats_success_minutes"
        ).fetchone() == (6, target["webhook_id"])
    assert counters(db) == (7, 6, 6, 1, 6, 1)
    sidecar.terminate()


def test_all_is_the_default_and_keeps_every_row(
    db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> None:
    configure(db, "REC", "rec")
    assert db.execute("SELECT recording FROM rule_nats_consumers").fetchone() == ("all",)
    sidecar_factory()
    wait_ready(db)
    for i in range(3):
        db.execute(
            "SELECT rule_nats_publish('rec.a', %s::jsonb)",
            (json.dumps({"webhook_url": receiver.url + "/ok", "data": {"i": i}}),),
        )
    assert wait_until(lambda: counters(db)[0] == 3, timeout=30)
    assert db.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (3,)
    assert db.execute("SELECT count(*) FROM rule_nats_success_minutes").fetchone() == (0,)
