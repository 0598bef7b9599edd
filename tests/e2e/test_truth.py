"""Issue 13, "tell the operator the truth": outbox latency per message, readiness that names each
component, NATS problems reported as NATS problems (in /readyz, the log and SQL), a prompt SIGTERM
with NATS down."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import nats
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar.config import nats_connection_from_row
from sidecar.jetstream import NatsPool
from sidecar.outbox import OutboxRelay
from sidecar.queries import query
from tests.support.publish import add_stream_async
from tests.support.registry import configure, register_stream, scalar, wait_ready
from tests.support.sidecar import Sidecar, get
from tests.support.stack import NatsServer, free_port
from tests.support.waits import wait_until

logger = logging.getLogger(__name__)


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


async def test_outbox_latency_is_measured_per_message(
    nats_db: psycopg.Connection, database_url: str, nats_server: NatsServer
) -> None:
    """Each published row gets its own publish-to-ack time. Before, every row of a relay batch got
    the batch's elapsed time: five events acknowledged at once showed the one second that a sixth,
    never acknowledged, waited for its timeout."""
    await add_stream_async(nats_server.url, "LAT", ["lat.>"])
    register_stream(nats_db, "LAT", ["lat.>"])
    nats_db.execute("UPDATE rule_nats_config SET request_timeout_seconds = 1")
    with nats_db.transaction():
        for i in range(5):
            nats_db.execute(
                "SELECT rule_nats_publish_on_commit('lat.fast', %s::jsonb)", (json.dumps({"i": i}),)
            )
        # A subject someone listens to on plain NATS, without a stream: nobody acknowledges it.
        nats_db.execute(
            "INSERT INTO rule_nats_outbox (subject, payload, message_id) VALUES ('silent.x', '{}', 'silent-1')"
        )
    listener = await nats.connect(nats_server.url)
    await listener.subscribe("silent.>")
    await listener.flush()
    row = nats_db.cursor(row_factory=dict_row).execute(query("nats_config_all")).fetchone()
    assert row is not None
    conn = nats_connection_from_row(row, None)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False)
    nats_pool = NatsPool("latency-test")
    await pool.open(wait=True)
    try:
        relay = OutboxRelay(pool, nats_pool, lambda: {conn.config_name: conn}, batch_size=10)
        assert await relay.relay_once() == 6
    finally:
        await nats_pool.close()
        await pool.close()
        await listener.close()
    rows = nats_db.execute(
        "SELECT success, latency_ms FROM rule_nats_publish_history WHERE triggered_by = 'outbox'"
    ).fetchall()
    acked = [ms for ok, ms in rows if ok]
    timed_out = [ms for ok, ms in rows if not ok]
    assert len(acked) == 5 and len(timed_out) == 1, rows
    assert max(acked) < timed_out[0], rows
    stats = nats_db.execute(
        "SELECT message_count, min_latency_ms, max_latency_ms FROM nats_performance_stats WHERE source = 'outbox'"
    ).fetchall()
    assert len(stats) == 2, stats  # lat.fast and silent.x
    fast = next(s for s in stats if s[0] == 5)
    assert fast[2] < max(s[2] for s in stats), stats


# -- readiness and NATS truth ------------------------------------------------------------------


def readyz(base: str) -> tuple[int, dict[str, Any]]:
    """/readyz's status and body ({} while nothing listens yet)."""
    try:
        status, body = get(base + "/readyz")
    except OSError:
        return 0, {}
    return status, json.loads(body)


def component(body: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in body.get("components", []) if c["name"] == name]
    assert len(found) == 1, body
    return found[0]


def test_readyz_lists_each_component(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar], nats_server: NatsServer
) -> None:
    """NATS, PostgreSQL, recording and each consumer by name, each with ok and its problem. Before,
    /readyz gave one list of problems, and only those."""
    configure(db, "COMP", "comp")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar_factory(env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "30"}, name="comp-1")
    assert wait_until(lambda: readyz(base)[0] == 200, timeout=15), readyz(base)
    body = readyz(base)[1]
    assert body["ready"] is True and body["problems"] == []
    names = [c["name"] for c in body["components"]]
    assert {"postgresql", "nats:default", "recording", "consumer:COMP/workers"} <= set(names), names
    # every task a consumer runs (issue 22)
    assert {f"consumer:COMP/workers:task:{t}" for t in ("feed", "retries", "keepalive")} <= set(names), names
    assert all(c["ok"] and c["problem"] is None for c in body["components"]), body
    assert component(body, "nats:default")["address"] == nats_server.url.removeprefix("nats://")


def test_nats_down_at_start_is_named_in_readyz_the_log_and_sql(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar], own_nats_server: NatsServer
) -> None:
    """NATS down: /readyz names NATS with its address and the OS error and does not blame
    PostgreSQL; the worker is DEGRADED at its first heartbeat with the connection in nats_down; its
    stream is 'unknown' with the cause; a pending outbox row is summarised as pending. Once NATS is
    up the consumer starts without waiting for the 30 s configuration heal. Before: 503 "no
    successful heartbeat to PostgreSQL recently", the worker IDLE, last_error "...: TimeoutError",
    "0 outbox rows pending"."""
    db.execute("UPDATE rule_nats_config SET nats_url = %s", (own_nats_server.url,))
    configure(db, "NDOWN", "ndown")
    own_nats_server.stop()
    db.execute("SELECT rule_nats_publish_on_commit('ndown.x', '{}'::jsonb)")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    address = own_nats_server.url.removeprefix("nats://")
    sidecar = sidecar_factory(
        env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "1", "SUMMARY_INTERVAL": "1"},
        name="ndown-1",
    )

    def nats_named() -> bool:
        status, body = readyz(base)
        return status == 503 and any(
            c["name"] == "nats:default" and "Connection refused" in (c["problem"] or "")
            for c in body["components"]
        )

    assert wait_until(nats_named, timeout=15), readyz(base)
    body = readyz(base)[1]
    nats_problem = component(body, "nats:default")["problem"]
    assert address in nats_problem and "Connection refused" in nats_problem, nats_problem
    assert component(body, "postgresql")["ok"], body
    assert not any("PostgreSQL" in p for p in body["problems"]), body
    assert not component(body, "consumer:NDOWN/workers")["ok"], body

    worker = "SELECT status, nats_down, problems FROM nats_worker_status"
    assert wait_until(lambda: scalar(db, "SELECT status FROM nats_worker_status") == "DEGRADED", timeout=10)
    status_, nats_down, problems = db.execute(worker).fetchone() or (None, None, None)
    assert nats_down == ["default"] and any(address in p for p in problems), (status_, nats_down, problems)
    stream = "SELECT status, coalesce(last_error, '') FROM nats_stream_status WHERE stream_name = 'NDOWN'"
    assert wait_until(lambda: address in str((db.execute(stream).fetchone() or ("", ""))[1]), timeout=15)
    status_, last_error = db.execute(stream).fetchone() or ("", "")
    assert status_ == "unknown" and "Connection refused" in last_error, (status_, last_error)
    assert wait_until(lambda: "1 outbox rows pending" in sidecar.output(), timeout=10), sidecar.output()[
        -2000:
    ]
    assert f"NATS default ({own_nats_server.url}): [Errno 111] Connection refused" in sidecar.output()

    own_nats_server.start()
    assert wait_until(lambda: readyz(base)[0] == 200, timeout=15), readyz(base)
    assert wait_until(
        lambda: (
            db.execute("SELECT status FROM nats_stream_status WHERE stream_name = 'NDOWN'").fetchone()
            == ("ok",)
        ),
        timeout=10,
    )
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_outbox") == 0, timeout=15), (
        db.execute("SELECT * FROM rule_nats_outbox").fetchall(),
        sidecar.output()[-4000:],
    )


def test_a_wrong_nats_url_is_noticed_without_any_stream(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar]
) -> None:
    """No stream configured, nothing to connect for: the worker still checks the connection it
    would use, and says so, with the address but not the password NATS_URL carries. Before,
    /readyz said ready and nats_worker_status IDLE."""
    address = f"127.0.0.1:{free_port()}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar = sidecar_factory(
        env={
            "METRICS_ADDR": f"127.0.0.1:{port}",
            "HEARTBEAT_INTERVAL": "1",
            "NATS_URL": f"nats://ww:s3cret-pw@{address}",
        },
        name="wrong-1",
    )

    def refused() -> bool:
        status, body = readyz(base)
        return status == 503 and any("Connection refused" in (c["problem"] or "") for c in body["components"])

    assert wait_until(refused, timeout=15), readyz(base)
    problem = component(readyz(base)[1], "nats:default")["problem"]
    assert f"nats://ww:***@{address}" in problem and "Connection refused" in problem, problem
    assert wait_until(
        lambda: (
            db.execute("SELECT status, nats_down FROM nats_worker_status").fetchone()
            == ("DEGRADED", ["default"])
        ),
        timeout=10,
    ), db.execute("SELECT * FROM nats_worker_status").fetchone()
    problems = str(scalar(db, "SELECT problems FROM nats_worker_status"))
    assert address in problems, problems
    assert "s3cret-pw" not in json.dumps(readyz(base)[1]) + problems + sidecar.output()


def test_a_worker_that_loses_nats_shows_it_in_sql_within_a_heartbeat(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar], own_nats_server: NatsServer
) -> None:
    """Before, the worker stayed ACTIVE/IDLE and its stream and consumer 'ok' for two minutes."""
    db.execute("UPDATE rule_nats_config SET nats_url = %s", (own_nats_server.url,))
    configure(db, "NLOST", "nlost")
    sidecar_factory(env={"HEARTBEAT_INTERVAL": "1"}, name="nlost-1")
    wait_ready(db)
    statuses = (
        "SELECT (SELECT replace(status, 'ACTIVE', 'IDLE') FROM nats_worker_status), "
        "(SELECT status FROM nats_stream_status), (SELECT status FROM nats_consumer_status)"
    )
    assert wait_until(lambda: db.execute(statuses).fetchone() == ("IDLE", "ok", "ok"), timeout=10), (
        db.execute(statuses).fetchone()
    )
    own_nats_server.stop()
    assert wait_until(
        lambda: db.execute(statuses).fetchone() == ("DEGRADED", "unknown", "unknown"), timeout=10
    ), db.execute(statuses).fetchone()
    assert scalar(db, "SELECT nats_down FROM nats_worker_status") == ["default"]
    own_nats_server.start()
    assert wait_until(lambda: db.execute(statuses).fetchone() == ("IDLE", "ok", "ok"), timeout=20), (
        db.execute(statuses).fetchone()
    )


@pytest.mark.parametrize("when", ["down at start", "lost while running"])
def test_sigterm_with_nats_down_is_prompt(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar], own_nats_server: NatsServer, when: str
) -> None:
    """Nothing waits for a NATS that does not answer: not the start-up reload, the relay, the
    heartbeat's observation, nor the consumers' pull requests. Before: 6 s (down at start) and 3 s
    (lost), up to 11 s, with SHUTDOWN_TIMEOUT at its default of 30 s."""
    db.execute("UPDATE rule_nats_config SET nats_url = %s", (own_nats_server.url,))
    configure(db, "NTERM", "nterm")
    db.execute("SELECT rule_nats_publish_on_commit('nterm.x', '{}'::jsonb)")
    if when == "down at start":
        own_nats_server.stop()
    sidecar = sidecar_factory(env={"HEARTBEAT_INTERVAL": "1"}, name="nterm-1")
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_workers") == 1, timeout=15)
    if when == "lost while running":
        wait_ready(db)
        own_nats_server.stop()
    # The heartbeat has found NATS down (the relay and the reloads are trying it too by now).
    assert wait_until(
        lambda: scalar(db, "SELECT status FROM nats_worker_status") == "DEGRADED", timeout=15
    ), scalar(db, "SELECT status FROM nats_worker_status")
    started = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    code = sidecar.proc.wait(60)
    took = time.monotonic() - started
    logger.warning("SIGTERM with NATS %s took %.1f s", when, took)
    assert code == 0, sidecar.output()[-3000:]
    assert took < 2.5, f"SIGTERM took {took:.1f} s\n{sidecar.output()[-3000:]}"
