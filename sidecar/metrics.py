"""Health and Prometheus metrics over HTTP (``--metrics-addr``): /healthz, /readyz, /metrics.

Counters are not incremented on the delivery path: a collector reads the consumers' own
counters when Prometheus scrapes, so the only per-message cost is one histogram observation.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
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
        dead = CounterMetricFamily(
            "webhook_dead_letters", "Messages dead-lettered, by reason", labels=["reason"]
        )
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
            "Reloads that applied the registry to JetStream and the consumers (rows changed, or healing)",
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


class HealthServer:
    """/healthz: the process and its event loop answer. /readyz: each component by name with ok and
    its problem (503 when any is not ok): PostgreSQL, each NATS connection, recording, each wanted
    consumer, the configuration and the background tasks. /metrics: Prometheus text."""

    def __init__(
        self,
        addr: str,
        metrics: Metrics,
        readiness: Callable[[], list[Component]],
        addr_file: str | None = None,
    ) -> None:
        self.host, self.ports = parse_addr_range(addr)
        self.port = self.ports[0]
        self.metrics = metrics
        self.readiness = readiness
        # where the bound address is written (METRICS_ADDR_FILE): the image's HEALTHCHECK reads it
        self.addr_file = addr_file
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for i, port in enumerate(self.ports):
            try:
                await web.TCPSite(self._runner, self.host, port).start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or i == len(self.ports) - 1:
                    raise
                continue
            self.port = port
            break
        self._write_addr_file(bound=True)
        logger.info(
            "health and metrics on http://%s:%d (/healthz /readyz /metrics)",
            self.host,
            self.port,
            extra={"action": "metrics_listening"},
        )

    def _write_addr_file(self, bound: bool) -> None:
        """The address bound (a few bytes, written once): a port range makes it unknowable outside."""
        if not self.addr_file:
            return
        if bound:
            host = f"[{self.host}]" if ":" in self.host else self.host
            Path(self.addr_file).write_text(f"{host}:{self.port}\n")
        else:
            Path(self.addr_file).unlink(missing_ok=True)

    async def stop(self) -> None:
        self._write_addr_file(bound=False)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        components = self.readiness()
        problems = [c.problem or f"{c.name} is not ready" for c in components if not c.ok]
        body: dict[str, Any] = {
            "ready": not problems,
            "problems": problems,
            "components": [c.as_json() for c in components],
        }
        return web.Response(
            status=200 if not problems else 503, text=json.dumps(body) + "\n", content_type="application/json"
        )

    async def _metrics(self, _request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp
