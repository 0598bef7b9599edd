"""Operating the sidecar: metrics against the database, status views, status CLI, retention schedule."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import nats.js.errors
import psycopg
import pytest
from nats.js.api import StorageType

from tests.support.publish import add_stream, publish_raw
from tests.support.receiver import Receiver, Response
from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar, applied, get, metrics, started
from tests.support.stack import NatsServer, free_port
from tests.support.waits import wait_for, wait_scalar, wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def delete_stream(url: str, name: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().delete_stream(name)
        except nats.js.errors.NotFoundError:
            pass
        finally:
            await nc.close()

    asyncio.run(go())


def test_metrics_health_and_status_views_match_the_database(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
    worker_database_url: str,
) -> None:
    configure(db, "OPS", "ops", retry_initial_seconds=0.2, retry_max_attempts=2)
    receiver.responder = lambda req: Response(status=404 if b'"bad"' in req.body else 200)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar = sidecar_factory(
        env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "0.5"}, name="ops-1"
    )
    wait_ready(db)
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=20), get(base + "/readyz")
    assert get(base + "/healthz") == (200, "ok\n")
    url = receiver.url + "/o"
    bodies = [json.dumps({"webhook_url": url, "data": {"i": i}}).encode() for i in range(30)]
    bodies += [json.dumps({"webhook_url": url, "data": {"i": "bad"}}).encode() for _ in range(3)]
    publish_raw(nats_server.url, "ops.x", bodies)
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 3, timeout=20)
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 30
        ),
        20,
    )

    # /metrics counters equal what the database recorded
    m = metrics(base)
    assert m[("webhook_deliveries_total", "delivered")] == 30
    assert m[("webhook_deliveries_total", "dead_letter")] == 3
    assert m[("webhook_dead_letters_total", "http_4xx")] == 3
    assert m[("webhook_delivery_duration_seconds_count", "")] == scalar(
        db, "SELECT count(*) FROM rule_nats_delivery_attempts"
    )
    assert m[("webhook_in_flight", "")] == 0

    # status views: the worker is active, the stream and consumer exist with nothing pending
    assert wait_until(lambda: scalar(db, "SELECT status FROM nats_worker_status") == "ACTIVE", timeout=10)
    assert wait_until(
        lambda: (
            db.execute("SELECT status, lag, workers FROM nats_consumer_status").fetchone() == ("ok", 0, 1)
        ),
        10,
    ), db.execute("SELECT * FROM nats_consumer_status").fetchone()
    assert wait_until(lambda: scalar(db, "SELECT messages FROM nats_stream_status") == 33, timeout=10)
    row = db.execute(
        "SELECT total_count, message_count, success_count FROM nats_performance_stats WHERE source = 'delivery'"
    )
    assert row.fetchone() == (33, 30, 30)  # message_count: successful ones, the original's meaning (issue 18)
    assert wait_until(lambda: metrics(base).get(("webhook_consumer_lag", "")) == 0, timeout=10)

    # the CLI reads the same views
    env = {**os.environ, "DATABASE_URL": worker_database_url}
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "status"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "WORKERS (1)" in out and "ops-1" in out and "ACTIVE" in out
    assert "CONSUMERS (1)" in out and "workers" in out
    assert "RECENT FAILURES (3)" in out and "HTTP 404" in out
    report = json.loads(
        subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    assert report["workers"][0]["worker_name"] == "ops-1"
    assert report["consumers"][0]["status"] == "ok"
    assert len(report["recent_failures"]) == 3

    # a stopped worker: STOPPED after SIGTERM
    sidecar.terminate()
    assert sidecar.wait_exit(20) == 0
    assert scalar(db, "SELECT status FROM nats_worker_status") == "STOPPED"


def test_readyz_reports_nats_down_and_a_killed_worker_goes_stale(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    own_nats_server: NatsServer,
) -> None:
    db.execute("UPDATE rule_nats_config SET nats_url = %s", (own_nats_server.url,))
    configure(db, "RDY", "rdy")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar = sidecar_factory(
        env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "0.5"}, name="rdy-1"
    )
    wait_ready(db)
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=20)
    own_nats_server.stop()
    assert wait_until(lambda: get(base + "/readyz")[0] == 503, timeout=20)
    assert "NATS connection 'default' is down" in get(base + "/readyz")[1]
    assert get(base + "/healthz")[0] == 200  # alive, only not ready
    own_nats_server.start()
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=30), get(base + "/readyz")
    # The next heartbeat clears the problems it wrote while NATS was down (DEGRADED meanwhile).
    assert wait_until(
        lambda: scalar(db, "SELECT status FROM nats_worker_status") in ("ACTIVE", "IDLE"), timeout=10
    )
    sidecar.kill()  # SIGKILL: no clean stop
    assert wait_until(lambda: scalar(db, "SELECT status FROM nats_worker_status") == "STALE", timeout=10)


def test_deleted_consumer_shows_as_missing_then_is_recreated(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "DEL", "del")
    sidecar = sidecar_factory(env={"HEARTBEAT_INTERVAL": "0.5"})
    wait_ready(db)
    assert wait_until(lambda: scalar(db, "SELECT consumers FROM nats_worker_status") == ["DEL/workers"], 10)
    started(sidecar)  # or a start-up reload re-creates it at once

    async def delete() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().delete_consumer("DEL", "workers")
        await nc.close()

    asyncio.run(delete())
    assert wait_until(
        lambda: scalar(db, "SELECT status FROM nats_consumer_status") == "missing", timeout=10
    ), (
        db.execute("SELECT * FROM nats_consumer_status").fetchone(),
        sidecar.output()[-3000:],
    )
    assert "deleted?" in str(scalar(db, "SELECT last_error FROM nats_consumer_status"))
    db.execute("UPDATE rule_nats_consumers SET batch_size = 11")  # any change: reload now, not in 30 s
    assert wait_until(lambda: scalar(db, "SELECT status FROM nats_consumer_status") == "ok", timeout=15)
    publish_raw(
        nats_server.url, "del.x", [json.dumps({"webhook_url": receiver.url + "/d", "data": {}}).encode()]
    )
    assert len(receiver.wait_for(1, timeout=15)) == 1


def test_sidecar_runs_the_retention_schedule(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar]
) -> None:
    db.execute(
        "INSERT INTO rule_nats_delivery_attempts (attempted_at, stream_name, consumer_name, attempt, outcome) "
        "SELECT now() - interval '40 days', 'S', 'c', 1, 'delivered' FROM generate_series(1, 12)"
    )
    db.execute(
        "INSERT INTO rule_nats_delivery_attempts (attempted_at, stream_name, consumer_name, attempt, outcome) "
        "VALUES (now(), 'S', 'c', 1, 'delivered')"
    )
    db.execute("UPDATE rule_nats_retention SET batch_size = 100, run_every_seconds = 60")
    sidecar = sidecar_factory(env={"HEARTBEAT_INTERVAL": "0.5"})
    assert wait_until(
        lambda: scalar(db, "SELECT last_run_at FROM rule_nats_retention") is not None, timeout=20
    )
    assert scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts") == 1
    assert scalar(db, "SELECT last_result ->> 'attempts' FROM rule_nats_retention") == "12"
    assert "retention: deleted 12 attempts" in sidecar.output()


def test_logs_are_json_lines_without_per_message_spam(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "LOG", "log", batch_size=32)
    sidecar = sidecar_factory(env={"LOG_LEVEL": "INFO", "LOG_FORMAT": "json", "SUMMARY_INTERVAL": "1"})
    wait_ready(db)
    url = receiver.url + "/l"
    publish_raw(
        nats_server.url,
        "log.x",
        [json.dumps({"webhook_url": url, "data": {"i": i}}).encode() for i in range(300)],
    )
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 300
        ),
        30,
    )

    def summarised() -> int:
        lines = [json.loads(line) for line in sidecar.output().splitlines() if line.strip()]
        return sum(r.get("delivered", 0) for r in lines if r.get("action") == "summary")

    wait_for(summarised, lambda n: n == 300, "summary lines that count the 300 deliveries")
    sidecar.terminate()
    assert sidecar.wait_exit(20) == 0
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg", "action"} <= set(r) for r in lines), lines[:3]
    assert len(lines) < 60, len(lines)  # not one line per message
    summaries = [r for r in lines if r["action"] == "summary"]
    assert summaries and sum(r["delivered"] for r in summaries) == 300
    assert {"worker_started", "consumer_started", "worker_stopped"} <= {r["action"] for r in lines}


def test_sql_opens_pgcli_on_the_configured_database(tmp_path: Path, worker_database_url: str) -> None:
    fake = tmp_path / "pgcli"
    fake.write_text('#!/bin/sh\necho "pgcli called with: $*"\n')
    fake.chmod(0o755)
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "sql"],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DATABASE_URL": worker_database_url},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == f"pgcli called with: {worker_database_url}"


def test_ready_at_start_without_waiting_for_the_first_heartbeat(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar]
) -> None:
    """The registration at start is a successful write to PostgreSQL: readiness does not wait for the
    first heartbeat (30 s here), and never blames PostgreSQL when it is up. Before the fix /readyz
    said "no successful heartbeat to PostgreSQL recently" until the first heartbeat."""
    configure(db, "EARLY", "early")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar_factory(env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "30"}, name="early-1")
    bodies: list[str] = []

    def ready() -> bool:
        try:
            status, body = get(base + "/readyz")
        except OSError:
            return False  # not listening yet
        bodies.append(body)
        return status == 200

    assert wait_until(ready, timeout=15), bodies[-3:]
    assert not any("heartbeat to PostgreSQL" in b for b in bodies), bodies


def test_a_stream_jetstream_refuses_shows_jetstreams_reason(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar], nats_server: NatsServer
) -> None:
    """Subjects overlapping a stream JetStream has and the registry does not (made with the nats CLI,
    say; overlaps between registered streams are refused at INSERT): nats_stream_status keeps
    JetStream's own words through the heartbeats. Before, the next observation replaced them with
    "does not exist (deleted?)"."""
    add_stream(nats_server.url, "OVA", ["ov.>"], storage=StorageType.MEMORY)
    db.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects, storage_type) VALUES ('OVB', '{ov.x}', 'memory')"
    )
    try:
        sidecar_factory(env={"HEARTBEAT_INTERVAL": "0.5"}, name="ov-1")

        def error() -> str:
            return str(
                scalar(
                    db, "SELECT coalesce(last_error, '') FROM nats_stream_status WHERE stream_name = 'OVB'"
                )
            )

        assert wait_until(lambda: "overlap" in error(), timeout=15), error()
        # Two heartbeats (observations) later: the row was written again, still with JetStream's words.
        updated = "SELECT updated_at FROM rule_nats_stream_state WHERE stream_name = 'OVB'"
        first = scalar(db, updated)
        second = wait_scalar(db, updated, until=lambda t: t != first)
        wait_scalar(db, updated, until=lambda t: t != second)
        assert "overlap" in error(), error()
        assert scalar(db, "SELECT status FROM nats_stream_status WHERE stream_name = 'OVB'") == "error"
    finally:
        delete_stream(nats_server.url, "OVA")


def test_the_limits_in_force_are_shown_beside_the_configured_ones(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar]
) -> None:
    configure(db, "LIM", "lim")
    db.execute(
        "UPDATE rule_nats_streams SET max_age_seconds = 3600, max_messages = 1000 WHERE stream_name = 'LIM'"
    )
    sidecar_factory(env={"HEARTBEAT_INTERVAL": "0.5"}, name="lim-1")
    wait_ready(db)
    row = "SELECT configured_max_age_seconds, actual_max_age_seconds, configured_max_messages, actual_max_messages, configured_replicas, actual_replicas FROM nats_stream_status WHERE stream_name = 'LIM'"
    assert wait_until(lambda: db.execute(row).fetchone() == (3600.0, 3600.0, 1000, 1000, 1, 1), timeout=15), (
        db.execute(row).fetchone()
    )
    db.execute("UPDATE rule_nats_streams SET max_age_seconds = 7200 WHERE stream_name = 'LIM'")
    assert wait_until(lambda: (db.execute(row).fetchone() or (0, 0))[1] == 7200.0, timeout=15)


def test_dead_letter_counters_agree_after_a_consumer_restart(
    db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar], nats_server: NatsServer
) -> None:
    """webhook_deliveries_total{outcome="dead_letter"} counted the running runners only, while
    webhook_dead_letters_total counted every runner: after a restart they disagreed (and the first
    went down). Both now equal the dead letters in PostgreSQL."""
    configure(db, "DLC", "dlc")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar = sidecar_factory(
        env={"METRICS_ADDR": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": "0.5"}, name="dlc-1"
    )
    wait_ready(db)
    poison = [json.dumps({"webhook_url": "ftp://x/", "data": {}}).encode()]
    publish_raw(nats_server.url, "dlc.a", poison)
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 1, timeout=15)
    with applied(sidecar):
        db.execute("UPDATE rule_nats_consumers SET enabled = false")
    assert wait_until(
        lambda: get(base + "/readyz")[0] == 200 and "DLC" not in get(base + "/readyz")[1], timeout=15
    )
    with applied(sidecar):
        db.execute("UPDATE rule_nats_consumers SET enabled = true")
    publish_raw(nats_server.url, "dlc.a", poison)
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 2, timeout=15)

    def counts() -> tuple[float, float]:
        m = metrics(base)
        by_reason = sum(v for (name, _), v in m.items() if name == "webhook_dead_letters_total")
        return m.get(("webhook_deliveries_total", "dead_letter"), 0.0), by_reason

    assert wait_until(lambda: counts() == (2.0, 2.0), timeout=10), counts()
