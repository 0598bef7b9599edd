"""What an operator sees in the sidecar's log without SQL: every dead letter, retry scheduled and
circuit change is one line with the message id, the endpoint and the reason (WARNING for dead
letters and circuits)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support.publish import publish_raw
from tests.support.receiver import Receiver, Response
from tests.support.registry import add_webhook, configure, envelope, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer
from tests.support.waits import wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def lines(sidecar: Sidecar, action: str) -> list[dict[str, Any]]:
    out = []
    for line in sidecar.output().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("action") == action:
                out.append(record)
    return out


@pytest.mark.slow
def test_dead_letters_retries_and_circuit_changes_are_log_lines(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(
        db, "OPS", "ops", retry_initial_seconds=0.2, retry_max_backoff_seconds=0.5, retry_max_attempts=50
    )
    hook = add_webhook(
        db, "flaky", receiver.url + "/f", "ops.a", circuit_failure_threshold=2, circuit_open_seconds=1
    )
    broken = {"on": True}
    receiver.responder = lambda req: Response(status=500 if broken["on"] else 200)
    sidecar = sidecar_factory({"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"})
    wait_ready(db)
    publish_raw(
        nats_server.url,
        "ops.x",
        [
            # two events: one event failing again does not count against its endpoint (issue 19 #12)
            envelope(hook, {"i": 1}, event_id="evt-flaky-1"),
            envelope(hook, {"i": 3}, event_id="evt-flaky-2"),
            envelope(424242, {"i": 2}, event_id="evt-nobody"),
        ],
    )
    assert wait_until(lambda: lines(sidecar, "circuit_opened"), timeout=20), sidecar.output()[-3000:]
    broken["on"] = False
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 2
        ),
        timeout=30,
    )
    assert wait_until(lambda: lines(sidecar, "circuit_closed"), timeout=10), sidecar.output()[-3000:]

    # an unknown webhook is asked about once more 2 s later before it is dead-lettered
    assert wait_until(lambda: lines(sidecar, "dead_letter"), timeout=10), sidecar.output()[-3000:]
    (dead,) = lines(sidecar, "dead_letter")
    assert dead["level"] == "warning"
    assert (dead["message_id"], dead["reason"]) == ("evt-nobody", "unknown_webhook")
    assert dead["endpoint"] and "evt-nobody" in dead["msg"] and "unknown_webhook" in dead["msg"]

    retries = lines(sidecar, "retry_scheduled")
    assert retries, sidecar.output()[-3000:]
    assert {r["message_id"] for r in retries} == {"evt-flaky-1", "evt-flaky-2"}
    assert all(r["endpoint"] == "flaky" and "500" in r["reason"] and r["level"] == "info" for r in retries)
    # one line per retry row the worker wrote, no more, no less
    assert len(retries) == scalar(
        db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'retry'"
    )

    for action in ("circuit_opened", "circuit_closed"):
        (line, *_) = lines(sidecar, action)
        assert line["level"] == "warning" and line["endpoint"] == "flaky", line
        assert line["message_id"] in ("evt-flaky-1", "evt-flaky-2") and line["reason"], line
    assert "500" in lines(sidecar, "circuit_opened")[0]["reason"]
