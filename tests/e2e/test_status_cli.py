"""`webhook-worker status` as an operator runs it, against a running sidecar: why a worker is
DEGRADED, no "start a sidecar" while one runs, errors shown whole, a blocked endpoint not called
healthy; and one line (exit code 2) for a database URL that is not one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support.publish import publish_raw
from tests.support.receiver import Receiver
from tests.support.registry import add_webhook, configure, envelope, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer, free_port
from tests.support.waits import wait_until

CLI = [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent"]


def status(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "status", "--database-url", url, *args], capture_output=True, text=True, timeout=60
    )


def status_json(url: str) -> dict[str, Any]:
    out = status(url, "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_a_degraded_worker_shows_its_problems_and_no_start_a_sidecar_step(
    database_url: str, sidecar_factory: Callable[..., Sidecar]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        # NATS is not there: the worker runs, heartbeats, and says why it is not ready
        db.execute("UPDATE rule_nats_config SET nats_url = %s", (f"nats://127.0.0.1:{free_port()}",))
        sidecar_factory()
        assert wait_until(
            lambda: (
                scalar(db, "SELECT status FROM nats_worker_status WHERE worker_name = 'w1'") == "DEGRADED"
            ),
            timeout=30,
        )
        problems = db.execute("SELECT problems FROM nats_worker_status WHERE worker_name = 'w1'").fetchone()[
            0
        ]  # type: ignore[index]
    assert problems and max(len(p) for p in problems) > 60  # longer than a table cell
    text = status(database_url)
    assert text.returncode == 0, text.stderr
    for problem in problems:
        assert f"  w1: problems: {' '.join(problem.split())}" in text.stdout.splitlines(), text.stdout
    assert "start a sidecar" not in text.stdout
    report = status_json(database_url)
    (worker,) = report["workers"]
    assert (worker["status"], worker["problems"]) == ("DEGRADED", problems)
    assert not any("start a sidecar" in step for step in report.get("next_steps", []))


def test_errors_are_shown_whole_and_a_blocked_endpoint_is_not_healthy(
    nats_db: psycopg.Connection,
    database_url: str,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    db = nats_db
    configure(db, "ST", "st")
    hook = add_webhook(db, "local", receiver.url + "/x", "st.a")
    # deliveries may not reach loopback here: every message for this endpoint is refused unsent
    sidecar_factory({"WEBHOOK_ALLOW_NETWORKS": ""})
    wait_ready(db)
    publish_raw(nats_server.url, "st.a", [envelope(hook, {"i": i}) for i in range(3)])
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 3, timeout=20)
    assert scalar(db, "SELECT DISTINCT reason FROM rule_nats_dead_letters") == "ssrf_blocked"
    assert receiver.snapshot() == []
    # the view as well (it said healthy: no request, so no failure in the endpoint's state)
    view = db.execute("SELECT status, last_error FROM nats_endpoint_health").fetchone()
    assert view is not None and view[0] == "blocked" and "127.0.0.1" in (view[1] or ""), view
    (endpoint,) = status_json(database_url)["endpoints"]
    assert endpoint["status"] == "blocked" and "127.0.0.1" in (endpoint["last_error"] or ""), endpoint
    text = status(database_url).stdout
    row = next(line for line in text.splitlines() if line.startswith(f"{hook} "))
    assert " blocked " in f"{row} " and "healthy" not in row, text

    # a failed publish: its error and hint, whole
    with pytest.raises(psycopg.Error):
        db.execute("SELECT rule_nats_publish('nowhere.at.all', '{}')")
    error = scalar(db, "SELECT error_message FROM nats_recent_failures WHERE source = 'publish'")
    assert isinstance(error, str) and len(error) > 60
    assert " ".join(error.split()) in text or " ".join(error.split()) in status(database_url).stdout


@pytest.mark.parametrize("command", ["status", "migrate", "run", "sql"])
def test_a_database_url_without_a_scheme_is_one_line_and_exit_code_2(command: str) -> None:
    out = subprocess.run(
        [*CLI, command, "--database-url", "localhost:5432/app"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.splitlines()
    assert "postgresql://" in line and "localhost:5432/app" in line


@pytest.mark.parametrize("command", ["status", "migrate"])
def test_an_unreachable_database_is_exit_code_2_for_every_subcommand(command: str) -> None:
    out = subprocess.run(
        [*CLI, command, "--database-url", f"postgresql://127.0.0.1:{free_port()}/x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert "cannot reach PostgreSQL" in out.stderr and "Traceback" not in out.stderr
