"""Any login may NOTIFY any channel (PostgreSQL has no channel permissions): a flood of
``NOTIFY rule_nats_config_changed`` / ``rule_nats_refresh`` from a login without a single grant
must cost the sidecar a bounded number of reads and no JetStream work, and must not delay a real
configuration change."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.registry import configure, scalar, wait_ready
from tests.support.sidecar import Sidecar, metrics, started, wait_counter
from tests.support.stack import free_port
from tests.support.waits import wait_for, wait_until

FLOOD_SECONDS = 3.0
# The sidecar reloads at most twice a second; one more for a reload in flight when the window
# opens, one for the clock.
MAX_PER_SECOND = 2.0
SLACK = 2


@pytest.fixture
def flood_url(database_url: str) -> Iterator[str]:
    """A login with no grants at all: it may connect (PUBLIC has CONNECT) and NOTIFY, nothing else."""
    name = "flood_" + database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as su:
        su.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        try:
            yield database_url.replace("postgresql://postgres@", f"postgresql://{name}@")
        finally:
            su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def flood(url: str, until: Callable[[], bool]) -> int:
    """NOTIFY both channels as fast as one connection can, until told to stop; how many were sent."""
    sent = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while not until():
            conn.execute("NOTIFY rule_nats_config_changed")
            conn.execute("NOTIFY rule_nats_refresh")
            sent += 1
    return sent


def counters(base: str) -> tuple[float, float, float]:
    m = metrics(base)
    return (
        m[("webhook_config_reloads_total", "")],
        m[("webhook_config_applies_total", "")],
        m[("webhook_state_refreshes_total", "")],
    )


def test_a_notify_flood_costs_bounded_reads_and_no_reconcile(
    nats_db: psycopg.Connection,
    flood_url: str,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    db = nats_db
    configure(db, "FLOOD", "flood")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sidecar = sidecar_factory(env={"METRICS_ADDR": f"127.0.0.1:{port}"})
    wait_ready(db)
    assert wait_until(lambda: metrics(base) != {}, timeout=10), sidecar.output()[-3000:]
    started(sidecar)  # past the start-up reloads (the listener's first connect triggers one)

    reloads0, applies0, refreshes0 = counters(base)
    start = time.monotonic()
    sent = flood(flood_url, lambda: time.monotonic() - start > FLOOD_SECONDS)
    reloads1, applies1, refreshes1 = counters(base)
    elapsed = time.monotonic() - start
    bound = MAX_PER_SECOND * elapsed + SLACK
    log_reloads = sidecar.output().count("[config_loaded]")
    assert sent > 100, sent
    assert 1 <= reloads1 - reloads0 <= bound, (reloads1 - reloads0, bound, sent, log_reloads)
    assert applies1 - applies0 == 0, (applies1 - applies0, sent)
    assert 1 <= refreshes1 - refreshes0 <= bound + 1, (refreshes1 - refreshes0, bound, sent)  # + a heartbeat

    # A real change still applies promptly, even while the flood goes on.
    stop = threading.Event()
    flooder = threading.Thread(target=flood, args=(flood_url, stop.is_set), daemon=True)
    flooder.start()
    try:
        db.execute(
            "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size) VALUES ('FLOOD', 'second', 5)"
        )
        # Applied while the flood goes on (the bound of this wait is generous: a starved reload
        # would never come).
        assert wait_until(
            lambda: scalar(db, "SELECT count(*) FROM rule_nats_consumer_state WHERE present") == 2, timeout=10
        ), sidecar.output()[-3000:]
    finally:
        stop.set()
        flooder.join(10)
    wait_counter(base, "webhook_config_applies_total", applies1 + 1)  # the change, applied
    assert sidecar.terminate() == 0


def outbox_scans(db: psycopg.Connection) -> int:
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'rule_nats_outbox'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc (for the figure the test prints)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood_outbox(url: str, until: Callable[[], bool]) -> int:
    sent = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while not until():
            conn.execute("NOTIFY rule_nats_outbox")
            sent += 1
    return sent


def test_an_outbox_notify_flood_costs_a_bounded_number_of_claims(
    nats_db: psycopg.Connection,
    flood_url: str,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """Issue 19, defect 9: NOTIFY rule_nats_outbox from a login with no grants caused about 800
    outbox claims a second. The relay's two tasks now start at most 10 passes a second each."""
    db = nats_db
    configure(db, "OBXFLOOD", "obxflood")
    before = outbox_scans(db)
    started = time.monotonic()
    # A long poll interval: what is counted is what the NOTIFYs cause.
    sidecar = sidecar_factory(env={"OUTBOX_POLL_INTERVAL": "5"})
    wait_ready(db)
    cpu0 = cpu_seconds(sidecar.proc.pid)
    start = time.monotonic()
    sent = flood_outbox(flood_url, lambda: time.monotonic() - start > FLOOD_SECONDS)
    cpu = (cpu_seconds(sidecar.proc.pid) - cpu0) / (time.monotonic() - start)
    # A real event is still relayed promptly during a flood.
    stop = threading.Event()
    flooder = threading.Thread(target=flood_outbox, args=(flood_url, stop.is_set), daemon=True)
    flooder.start()
    try:
        db.execute("SELECT rule_nats_publish_on_commit('obxflood.real', '{}')")
        queued = time.monotonic()
        # Generous bound: a relay starved by the flood would never relay it.
        assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_outbox") == 0, timeout=10), (
            sidecar.output()[-3000:]
        )
        took = time.monotonic() - queued  # reported, not asserted
    finally:
        stop.set()
        flooder.join(10)
    assert sidecar.terminate() == 0
    lifetime = time.monotonic() - started
    # The statistics of a backend reach pg_stat_user_tables when it ends at the latest.
    others = "SELECT usename, application_name FROM pg_stat_activity WHERE datname = current_database() AND usename NOT IN (%s, 'postgres')"
    flooder_name = flood_url.split("//", 1)[1].split("@", 1)[0]
    assert wait_until(lambda: db.execute(others, (flooder_name,)).fetchall() == [], timeout=10), db.execute(
        others, (flooder_name,)
    ).fetchall()
    # A sentinel session scans the outbox once after them all: once its scan is counted, theirs are.
    counted = outbox_scans(db)
    with psycopg.connect(db.info.dsn) as sentinel:
        sentinel.execute("SELECT count(*) FROM rule_nats_outbox")
    wait_for(lambda: outbox_scans(db), lambda n: n > counted, "the sentinel's scan counted", 10)
    claims = outbox_scans(db) - before - 1  # minus the sentinel's
    # Two relay tasks: 10 passes a second each while woken, one per poll interval otherwise, plus
    # the heartbeats' backlog counts and the passes right after start.
    bound = 2 * (10 * (lifetime - 1) + lifetime / 5) + 20
    assert sent > 100, sent
    print(
        f"outbox claims {claims} (bound {bound:.0f}), {sent} NOTIFYs, sidecar {cpu:.2f} of a core, took {took:.2f} s"
    )
    assert claims <= bound, (claims, bound, sent)
