"""Pure parts of the operations features: status tables, metrics address, SQL client choice, settings."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import status
from sidecar.cli import sql_client
from sidecar.config import settings_from_env
from sidecar.errors import ConfigError
from sidecar.metrics import ConsumerSnapshot, Metrics, Snapshot, parse_addr


def test_render_has_every_section_and_aligned_columns() -> None:
    report = {
        "workers": [
            {
                "worker_name": "w1",
                "status": "ACTIVE",
                "hostname": "h",
                "pid": 7,
                "heartbeat_age_seconds": decimal.Decimal("0.4"),
                "in_flight": 3,
                "messages_delivered": 120,
                "messages_failed": 2,
                "consumers": ["S/c"],
            },
        ],
        "consumers": [
            {"stream_name": "S", "consumer_name": "c", "status": "ok", "lag": 5, "last_error": None},
            {
                "stream_name": "S",
                "consumer_name": "long",
                "status": "missing",
                "lag": None,
                "last_error": "x" * 100,
            },
        ],
    }
    text = status.render(report)
    for title in ("WORKERS (1)", "STREAMS (0)", "CONSUMERS (2)", "ENDPOINTS (0)", "RECENT FAILURES (0)"):
        assert title in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("STREAM_NAME  CONSUMER_NAME"))
    row = next(line for line in lines if line.startswith("S            c "))
    assert header.index("STATUS") == row.index("ok")
    # free text is not cut: it follows the table, named by the row
    assert "  S/long: last error: " + "x" * 100 in text.splitlines()
    assert "S/c" in text and any(line.endswith(" -") for line in lines)  # lists joined, None as -


def test_json_report_is_serialisable() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    out = status.to_json(
        {"recent_failures": [{"failed_at": when, "attempt": 2, "rate": decimal.Decimal("99.5")}]}
    )
    assert out["recent_failures"] == [{"failed_at": "2026-01-02T03:04:05+00:00", "attempt": 2, "rate": 99.5}]
    assert "next_steps" in out  # nothing is configured in that report


def test_next_steps_on_a_fresh_install_name_the_nats_url_and_the_sql() -> None:
    fresh = {"connections": [{"config_name": "default", "nats_url": "nats://localhost:4222"}]}
    steps = status.next_steps(fresh)
    assert len(steps) == 5
    assert "nats://localhost:4222" in steps[0] and "UPDATE rule_nats_config" in steps[0]
    assert "INSERT INTO rule_nats_streams" in steps[1] and "INSERT INTO rule_nats_consumers" in steps[2]
    assert "webhook-worker run" in steps[-1]
    assert "NEXT STEPS" in status.render(fresh)


def test_no_next_steps_once_everything_runs() -> None:
    done = {
        "connections": [{"config_name": "default", "nats_url": "nats://n:4222"}],
        "streams": [{"stream_name": "S"}],
        "consumers": [{"consumer_name": "c"}],
        "endpoints": [{"webhook_id": 1}],
        "workers": [{"worker_name": "w", "status": "IDLE"}],
    }
    assert status.next_steps(done) == []
    assert "NEXT STEPS" not in status.render(done)
    assert "next_steps" not in status.to_json(done)


def test_cell_formats() -> None:
    assert status.cell(None) == "-"
    assert status.cell([]) == "-"
    assert status.cell("a\nb") == "a b"
    assert status.cell(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) == "2026-01-01 00:00:00"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9464", ("0.0.0.0", 9464)), ("[::1]:80", ("::1", 80))],
)
def test_parse_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:x", "h:70000"])
def test_parse_addr_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_addr(text)


def test_sql_client_prefers_pgcli_then_psql() -> None:
    assert sql_client("postgresql://x", lambda p: f"/usr/bin/{p}") == ["/usr/bin/pgcli", "postgresql://x"]
    assert sql_client("u", lambda p: "/usr/bin/psql" if p == "psql" else None) == ["/usr/bin/psql", "u"]
    with pytest.raises(ConfigError, match="pgcli"):
        sql_client("u", lambda p: None)


def test_metrics_text_from_a_snapshot() -> None:
    snap = Snapshot(
        consumers=[
            ConsumerSnapshot(
                "S",
                "c",
                delivered=10,
                retried=3,
                dead_lettered=1,
                deferred=2,
                redelivered=0,
                in_flight=4,
                lag=99,
            )
        ],
        dead_letter_reasons={"http_4xx": 1},
        retries_waiting=3,
        outbox_pending=0,
        outbox_published=5,
    )
    m = Metrics(lambda: snap)
    m.latency.observe(0.003)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    deliveries = {s.labels["outcome"]: s.value for s in families["webhook_deliveries"].samples}
    assert deliveries == {"delivered": 10, "retry": 3, "dead_letter": 1}
    assert families["webhook_consumer_lag"].samples[0].value == 99
    assert families["webhook_dead_letters"].samples[0].labels == {"reason": "http_4xx"}
    count = [s for s in families["webhook_delivery_duration_seconds"].samples if s.name.endswith("_count")]
    assert count[0].value == 1


def test_settings_metrics_and_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from_env(
        {"DATABASE_URL": "postgresql://x", "METRICS_ADDR": ":9464", "SUMMARY_INTERVAL": "0"}
    )
    assert s.metrics_addr == ":9464" and s.summary_interval == 0.0
    with pytest.raises(ConfigError, match="WEBHOOK_ALLOW_NETWORKS"):
        settings_from_env({"DATABASE_URL": "postgresql://x", "WEBHOOK_ALLOW_NETWORKS": "10.0.0.0/8,nope"})


def test_per_consumer_metrics_go_on_across_runner_restarts() -> None:
    from sidecar.metrics import ConsumerSnapshot, with_stopped

    running = [ConsumerSnapshot("S", "c", 3, 1, 1, 0, 0, in_flight=2, lag=7)]
    stopped = {
        ("S", "c"): ConsumerSnapshot("S", "c", 10, 2, 5, 1, 4, in_flight=9, lag=9),
        ("S", "gone"): ConsumerSnapshot("S", "gone", 1, 0, 0, 0, 0, in_flight=3, lag=3),
    }
    out = with_stopped(running, stopped)
    assert out == [
        ConsumerSnapshot("S", "c", 13, 3, 6, 1, 4, in_flight=2, lag=7),
        ConsumerSnapshot("S", "gone", 1, 0, 0, 0, 0, in_flight=0, lag=0),
    ]
    assert running[0].delivered == 3  # the inputs are not changed
