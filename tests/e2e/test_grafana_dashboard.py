"""docker/grafana/webhook-worker.json queries only what the sidecar exports: every metric and every
label its PromQL names, checked against the /metrics of a running sidecar that has delivered,
retried and dead-lettered messages (Grafana itself is not installable on these machines)."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.publish import publish_raw
from tests.support.receiver import Receiver, Response
from tests.support.registry import add_webhook, configure, envelope, scalar, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsServer, free_port
from tests.support.waits import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "docker/grafana/webhook-worker.json"
METRIC = re.compile(r"\b(webhook_[a-z_]+)\b")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=|!=|=~|!~)\s*\"")


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def used(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names one PromQL expression uses."""
    labels = {x.strip() for group in BY.findall(expr) for x in group.split(",") if x.strip()}
    labels |= set(MATCHER.findall(expr))
    return set(METRIC.findall(expr)), labels


def test_the_dashboard_covers_what_the_issue_lists() -> None:
    names = {m for e in expressions() for m in used(e)[0]}
    for needed in ("webhook_deliveries_total", "webhook_delivery_duration_seconds_bucket", "webhook_consumer_lag",
                   "webhook_retries_waiting", "webhook_endpoint_circuits", "webhook_dead_letters_total",
                   "webhook_outbox_published_total"):  # fmt: skip
        assert needed in names


@pytest.mark.slow
def test_every_metric_and_label_the_dashboard_queries_is_exported(
    nats_db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    db = nats_db
    configure(
        db, "GRAF", "graf", retry_initial_seconds=0.2, retry_max_backoff_seconds=0.5, retry_max_attempts=2
    )
    ok = add_webhook(db, "ok", receiver.url + "/ok", "graf.ok")
    bad = add_webhook(db, "bad", receiver.url + "/bad", "graf.bad")
    receiver.responder = lambda req: Response(status=500 if req.path == "/bad" else 204)
    port = free_port()
    sidecar_factory({"METRICS_ADDR": f"127.0.0.1:{port}"})
    wait_ready(db)
    publish_raw(
        nats_server.url, "graf.x", [envelope(ok, {"i": i}) for i in range(5)] + [envelope(bad, {"i": 9})]
    )
    assert wait_until(lambda: scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 1, timeout=20)
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 5
        )
    )

    def scrape() -> dict[str, set[str]]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        out: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
        return out

    # the counters reach /metrics at the worker's next stats pass
    assert wait_until(lambda: "webhook_dead_letters_total" in scrape(), timeout=15)
    exported = scrape()
    for expr in expressions():
        metrics, labels = used(expr)
        assert metrics, expr
        for metric in metrics:
            assert metric in exported, (metric, expr, sorted(exported))
        have = set().union(*(exported[m] for m in metrics))
        assert labels <= have, (expr, labels - have)
