"""The original worker's documented monitoring queries, verbatim, against a worker started its way.

Failed before sidecar/stats.py and 0008: the first query returned no row (the sidecar reported
under the durable consumer's name), and messages_delivered went down after a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg

from tests.support.publish import publish_raw
from tests.support.receiver import Receiver
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until

ORIGINAL_ENV = {
    "STREAM_NAME": "WEBHOOKS",
    "SUBJECT": "webhooks.>",
    "QUEUE_GROUP": "webhook-workers",
    "CONSUMER_NAME": "webhook-worker-1",
    "BATCH_SIZE": "10",
    "HEARTBEAT_INTERVAL": "1",
}
QUERY_1 = "SELECT * FROM rule_nats_consumer_stats WHERE consumer_name = 'webhook-worker-1';"
QUERY_2 = """SELECT consumer_name, messages_delivered, messages_acknowledged, avg_processing_time_ms, last_active_at
  FROM rule_nats_consumer_stats WHERE stream_name = 'WEBHOOKS' AND active = true;"""


def _publish(url: str, receiver: Receiver, first: int, n: int) -> None:
    publish_raw(
        url,
        "webhooks.orders",
        [
            json.dumps({"webhook_url": receiver.url + "/o", "data": {"id": i}}).encode()
            for i in range(first, first + n)
        ],
    )


def _delivered(db: psycopg.Connection) -> int:
    row = db.execute(
        "SELECT messages_delivered FROM rule_nats_consumer_stats WHERE consumer_name = 'webhook-worker-1'"
    ).fetchone()
    return int(row[0]) if row else -1


def test_the_original_queries_find_the_worker_with_figures_that_only_grow(
    nats_db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    db = nats_db
    env = {**ORIGINAL_ENV, "NATS_URL": nats_server.url}
    first = sidecar_factory(env, name="webhook-worker-1")
    assert wait_until(
        lambda: db.execute("SELECT count(*) FROM rule_nats_consumer_state WHERE present").fetchone() == (1,),
        timeout=20,
    )
    _publish(nats_server.url, receiver, 0, 30)
    assert wait_until(lambda: _delivered(db) == 30, timeout=20), _delivered(db)
    row = db.execute(QUERY_1).fetchone()
    assert row is not None
    rows = db.execute(QUERY_2).fetchall()
    assert len(rows) == 1
    name, delivered, acked, avg_ms, last_active = rows[0]
    assert (name, delivered, acked) == ("webhook-worker-1", 30, 30)
    assert avg_ms is not None and avg_ms > 0 and last_active is not None

    # A restart: the figures go on from where they were.
    assert first.terminate() == 0
    second = sidecar_factory(env, name="webhook-worker-1")
    _publish(nats_server.url, receiver, 30, 20)
    assert wait_until(lambda: _delivered(db) == 50, timeout=20), _delivered(db)
    assert db.execute(QUERY_2).fetchall()[0][:3] == ("webhook-worker-1", 50, 50)
    assert second.terminate() == 0
    assert db.execute("SELECT messages_delivered, active FROM rule_nats_consumer_stats").fetchall() == [
        (50, False)
    ]
