"""What the three parts of the worker (configuration, heartbeat, readiness) share: the connections
to PostgreSQL and NATS, the running consumers, the registry in memory and the few facts one part
learns and another reports. app.Worker builds it and hands it to each part; no part owns another."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from sidecar.config import NatsConnection, Settings
from sidecar.consumer import ConsumerRunner, Counters
from sidecar.delivery import Sender
from sidecar.endpoints import EndpointGates
from sidecar.jetstream import NatsPool
from sidecar.metrics import ConsumerSnapshot, Metrics, with_stopped
from sidecar.outbox import OutboxRelay
from sidecar.recorder import Recorder
from sidecar.registry import Registry
from sidecar.supervise import TaskHealth

RunnerKey = tuple[str, str]  # (stream, consumer)
# The connection STREAM_NAME/SUBJECT register their stream on (NATS_URL etc. override it).
SEED_CONFIG = "default"


@dataclass(eq=False)
class Events:
    """Wake-ups between the parts (and from LISTEN): each is set by one side and waited on by another."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)  # SIGTERM/SIGINT
    config_changed: asyncio.Event = field(default_factory=asyncio.Event)  # a reload is due
    refresh_due: asyncio.Event = field(default_factory=asyncio.Event)  # read JetStream's state now
    outbox_wake: asyncio.Event = field(default_factory=asyncio.Event)  # rows in the outbox
    stats_due: asyncio.Event = field(default_factory=asyncio.Event)  # a runner counted 100 messages
    endpoint_due: asyncio.Event = field(default_factory=asyncio.Event)  # endpoint health changed
    recorder_stop: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class Io:
    """The worker's connections and the objects every consumer shares."""

    pool: AsyncConnectionPool[Any]
    nats: NatsPool
    sender: Sender
    recorder: Recorder
    relay: OutboxRelay
    gates: EndpointGates
    metrics: Metrics


@dataclass(eq=False)
class WorkerState:
    settings: Settings
    events: Events
    io: Io
    task_health: dict[str, TaskHealth] = field(default_factory=dict)
    # Configuration writes these, heartbeat and readiness read them.
    registry: Registry = field(default_factory=Registry)
    connections: Mapping[str, NatsConnection] = field(default_factory=dict)
    runners: dict[RunnerKey, ConsumerRunner] = field(default_factory=dict)
    wanted: set[RunnerKey] = field(default_factory=set)
    loaded: bool = False  # the registry has been read (readiness: "configuration")
    # Heartbeat writes these; configuration (a reload heals what is missing) and readiness read them.
    missing_consumers: set[RunnerKey] = field(default_factory=set)
    missing_streams: set[str] = field(default_factory=set)
    heal_due: bool = False  # the next reload applies even unchanged rows
    last_db_ok: float = 0.0  # loop time of the last successful heartbeat
    last_db_error: str | None = None  # why the last heartbeat failed, until one succeeds
    backlog: dict[str, int] = field(default_factory=dict)
    # Webhooks the endpoint gates disabled (configuration queues them, heartbeat writes them).
    disable_queue: dict[int, str] = field(default_factory=dict)
    # Registry reads, applications to JetStream and JetStream state reads (metrics, tests).
    config_reloads: int = 0
    config_applies: int = 0
    state_refreshes: int = 0
    started_at: float = 0.0
    stopped_totals: Counters = field(default_factory=Counters)  # of runners already stopped
    # The same per consumer: a restarted runner's metrics go on from its predecessors'.
    stopped_by_key: dict[RunnerKey, ConsumerSnapshot] = field(default_factory=dict)

    def totals(self) -> Counters:
        """The counters of every runner this worker ran."""
        total = Counters()
        total.add(self.stopped_totals)
        for r in self.runners.values():
            total.add(r.counters)
        return total

    def needed_connections(self) -> dict[str, NatsConnection]:
        """The NATS connections this worker must reach (readiness, the probe): those of the enabled
        streams; 'default' when NATS_URL names its server or no stream is configured yet (a
        wrong NATS_URL shows before the first stream does); any other one it has used (the outbox
        relay publishes for every configuration its rows name)."""
        names = {s.config_name for s in self.registry.streams.values() if s.enabled}
        if self.settings.nats_override.url or not names:
            names.add(SEED_CONFIG)
        names |= self.io.nats.known()
        return {n: c for n, c in self.connections.items() if n in names}

    def forget_runner(self, key: RunnerKey) -> None:
        """A stopped runner leaves the running set; its counters stay in the totals."""
        gone = self.runners.pop(key, None)
        if gone is not None:
            self.stopped_totals.add(gone.counters)
            prior = self.stopped_by_key.get(key)
            self.stopped_by_key[key] = with_stopped([counts(gone)], {} if prior is None else {key: prior})[0]


def counts(r: ConsumerRunner) -> ConsumerSnapshot:
    c = r.counters
    return ConsumerSnapshot(
        r.cdef.stream_name, r.cdef.consumer_name, c.delivered, c.scheduled, c.dead_lettered, c.deferred,
        c.redelivered, r.in_flight, r.pending,
    )  # fmt: skip
