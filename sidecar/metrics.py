"""Health and Prometheus metrics over HTTP (``--metrics-addr``): /healthz, /readyz, /metrics.

Counters are not incremented on the delivery path: a collector reads the consumers' own
counters when Prometheus scrapes, so the only per-message cost is one histogram observation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class ConsumerSnapshot:
    stream: str
    consumer: str
    delivered: int
    retried: int
    dead_lettered: int
    deferred: int
    redelivered: int
    in_flight: int
    lag: int


def with_stopped(
    running: Sequence[ConsumerSnapshot], stopped: Mapping[tuple[str, str], ConsumerSnapshot]
) -> list[ConsumerSnapshot]:
    """Per consumer, the counts of its running runner plus those of the runners it had before (a
    reload or a new NATS connection restarts runners): Prometheus counters never go down, and the
    per-consumer dead letters add up to the per-reason ones, which count every runner."""
    out: dict[tuple[str, str], ConsumerSnapshot] = {}
    for c in running:
        out[(c.stream, c.consumer)] = ConsumerSnapshot(
            c.stream, c.consumer, c.delivered, c.retried, c.dead_lettered, c.deferred, c.redelivered,
            c.in_flight, c.lag,
        )  # fmt: skip
    for key, old in stopped.items():
        now = out.get(key)
        if now is None:
            out[key] = ConsumerSnapshot(
                old.stream, old.consumer, old.delivered, old.retried, old.dead_lettered, old.deferred,
                old.redelivered, 0, 0,
            )  # fmt: skip
        else:
            now.delivered += old.delivered
            now.retried += old.retried
            now.dead_lettered += old.dead_lettered
            now.deferred += old.deferred
            now.redelivered += old.redelivered
    return [out[k] for k in sorted(out)]


@dataclass
class Snapshot:
    """What the worker reports at scrape time (built by app.Worker.snapshot)."""

    consumers: list[ConsumerSnapshot] = field(default_factory=list)
    dead_letter_reasons: Mapping[str, int] = field(default_factory=dict)
    retries_waiting: int | None = None
    outbox_pending: int | None = None
    outbox_failed_rows: int | None = None
    outbox_published: int = 0
    outbox_failed: int = 0
    circuits: Mapping[str, int] = field(default_factory=dict)  # circuit state -> endpoints in it
    config_reloads: int = 0
    config_applies: int = 0
    state_refreshes: int = 0
    task_restarts: int = 0  # supervised tasks (the worker's and each consumer's) restarted after a failure


CIRCUIT_STATES = ("closed", "open", "half_open")


class WorkerCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot()
        yield from _per_consumer(s)
        yield from _dead_letters_and_circuits(s)
        yield from _backlog_and_counts(s)


def _per_consumer(s: Snapshot) -> Iterable[Metric]:
    labels = ["stream", "consumer"]
    deliveries = CounterMetricFamily(
        "webhook_deliveries",
        "HTTP delivery attempts by outcome (delivered, retry, dead_letter)",
        labels=[*labels, "outcome"],
    )
    deferred = CounterMetricFamily(
        "webhook_deferred",
        "Messages that waited for their endpoint without using an attempt",
        labels=labels,
    )
    redelivered = CounterMetricFamily(
        "webhook_redelivered", "Messages JetStream delivered again", labels=labels
    )
    in_flight = GaugeMetricFamily("webhook_in_flight", "Deliveries in progress", labels=labels)
    lag = GaugeMetricFamily(
        "webhook_consumer_lag",
        "Messages in the stream not yet delivered to a worker (num_pending)",
        labels=labels,
    )
    for c in s.consumers:
        key = [c.stream, c.consumer]
        deliveries.add_metric([*key, "delivered"], c.delivered)
        deliveries.add_metric([*key, "retry"], c.retried)
        deliveries.add_metric([*key, "dead_letter"], c.dead_lettered)
        deferred.add_metric(key, c.deferred)
        redelivered.add_metric(key, c.redelivered)
        in_flight.add_metric(key, c.in_flight)
        lag.add_metric(key, c.lag)
    yield from (deliveries, deferred, redelivered, in_flight, lag)


def _dead_letters_and_circuits(s: Snapshot) -> Iterable[Metric]:
    dead = CounterMetricFamily("webhook_dead_letters", "Messages dead-lettered, by reason", labels=["reason"])
    for reason, n in sorted(s.dead_letter_reasons.items()):
        dead.add_metric([reason], n)
    yield dead
    circuits = GaugeMetricFamily(
        "webhook_endpoint_circuits",
        "Endpoints this worker delivers to, by the state of their circuit breaker",
        labels=["state"],
    )
    for state in CIRCUIT_STATES:
        circuits.add_metric([state], s.circuits.get(state, 0))
    yield circuits


def _backlog_and_counts(s: Snapshot) -> Iterable[Metric]:
    if s.retries_waiting is not None:
        yield GaugeMetricFamily(
            "webhook_retries_waiting", "Deliveries waiting in rule_nats_retries", value=s.retries_waiting
        )
    if s.outbox_pending is not None:
        yield GaugeMetricFamily(
            "webhook_outbox_backlog", "Outbox rows waiting to be published", value=s.outbox_pending
        )
    if s.outbox_failed_rows is not None:
        yield GaugeMetricFamily(
            "webhook_outbox_failed_rows", "Outbox rows marked failed", value=s.outbox_failed_rows
        )
    yield CounterMetricFamily(
        "webhook_outbox_published", "Outbox rows published by this worker", value=s.outbox_published
    )
    yield CounterMetricFamily(
        "webhook_outbox_failures", "Outbox rows this worker could not publish", value=s.outbox_failed
    )
    yield CounterMetricFamily(
        "webhook_config_reloads",
        "Reads of the registry tables (NOTIFY rule_nats_config_changed, coalesced; and every 30 s)",
        value=s.config_reloads,
    )
    yield CounterMetricFamily(
        "webhook_config_applies",
        "Applications of the registry to JetStream and the consumers that have ended (rows changed, or healing)",
        value=s.config_applies,
    )
    yield CounterMetricFamily(
        "webhook_task_restarts",
        "Background tasks (the worker's and each consumer's) that failed and were restarted",
        value=s.task_restarts,
    )
    yield CounterMetricFamily(
        "webhook_state_refreshes",
        "Reads of stream and consumer state from JetStream (heartbeat and NOTIFY rule_nats_refresh)",
        value=s.state_refreshes,
    )


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "webhook_delivery_duration_seconds",
            "Duration of HTTP delivery attempts",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(WorkerCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_addr(text: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port``; a range ``host:first-last`` gives its first port."""
    host, ports = parse_addr_range(text)
    return host, ports[0]


def parse_addr_range(text: str) -> tuple[str, range]:
    """``host:port`` or ``host:first-last``: the ports to try in order. A range lets replicas that share
    the host's network (``--scale worker=3`` with host networking) each take the next free port."""
    host, sep, port = text.rpartition(":")
    first, dash, last = port.partition("-")
    if not dash:
        last = first
    if not sep or not first.isdigit() or not last.isdigit() or not 0 < int(first) <= int(last) < 65536:
        raise ValueError(
            f"{text!r}: expected HOST:PORT or HOST:FIRST-LAST, e.g. 127.0.0.1:9464 or :9464-9473"
        )
    return host.strip("[]") or "0.0.0.0", range(int(first), int(last) + 1)  # noqa: S104 - operator's choice


@dataclass(frozen=True, slots=True)
class Component:
    """One part of the worker as /readyz reports it: PostgreSQL, a NATS connection, recording, a
    consumer, the configuration or a background task."""

    name: str  # postgresql | nats:CONFIG | recording | configuration | consumer:STREAM/NAME | task:NAME
    ok: bool
    problem: str | None = None
    address: str | None = None  # NATS: the server (connected) or the configured ones, no credentials

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok, "problem": self.problem}
        if self.address is not None:
            out["address"] = self.address
        return out
