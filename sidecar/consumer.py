"""One durable JetStream consumer run by this worker, as three collaborators:

* ``sidecar.intake.Intake`` receives: subscription, pull requests, due retries claimed from
  PostgreSQL, the set of messages held and their in-progress signals;
* ``sidecar.driver.Driver`` drives each message through its life (prepared, gated, sent,
  classified, recorded, acknowledged after the COMMIT);
* ``sidecar.recorder.Recorder`` (the worker's, shared) commits outcomes and says so by a future.

``ConsumerRunner`` wires them, runs one task per message and three of its own (feed, retries,
keepalive), each supervised (``sidecar.supervise``: logged, restarted, counted, in /readyz through
``task_states``). Retries live in PostgreSQL (rule_nats_retries): a failed attempt is written there
and the NATS message is acknowledged, so waiting retries never hold the consumer's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from psycopg_pool import AsyncConnectionPool

from sidecar.bulkhead import Bulkhead
from sidecar.delivery import Sender
from sidecar.driver import (
    Counters,
    Driver,
    EndpointEvents,
    Hooks,
    abandon,
)
from sidecar.endpoints import EndpointGates
from sidecar.intake import Intake, claim_retries
from sidecar.lifecycle import Job
from sidecar.recorder import Recorder
from sidecar.registry import ConsumerDef, Registry, WebhookDef
from sidecar.supervise import TaskHealth, supervise

__all__ = ["ConsumerRunner", "Counters", "EndpointEvents"]  # Counters: the worker sums them

logger = logging.getLogger(__name__)


class ConsumerRunner:
    """One consumer: what ``intake`` receives, ``driver`` drives, one task per message."""

    def __init__(
        self,
        cdef: ConsumerDef,
        client: NatsClient,
        pool: AsyncConnectionPool[Any],
        sender: Sender,
        recorder: Recorder,
        registry: Callable[[], Registry],
        worker_name: str,
        stats_due: asyncio.Event | None = None,
        gates: EndpointGates | None = None,
        on_endpoint_event: EndpointEvents | None = None,
        observe_latency: Callable[[float], None] | None = None,
        on_closed: Callable[[], None] | None = None,
        lookup_webhook: Callable[[int], Awaitable[bool]] | None = None,
        lookup_subject: Callable[[str], Awaitable[list[WebhookDef]]] | None = None,
    ) -> None:
        self.cdef = cdef
        self.pending = 0  # JetStream's num_pending at the last look (set by the worker)
        claim = functools.partial(self._claim, pool, worker_name)
        self.intake = Intake(cdef, client, recorder, claim, self._spawn, self._parked, on_closed)
        hooks = Hooks(stats_due, on_endpoint_event, observe_latency, lookup_webhook, lookup_subject)
        self.driver = Driver(
            cdef,
            registry,
            sender,
            recorder,
            pool,
            worker_name,
            gates if gates is not None else EndpointGates(),
            hooks,
            release=self.intake.release,
            spawn=self._spawn,
            wake=self.intake.wake.set,
        )
        self._tasks: set[asyncio.Task[None]] = set()  # one per message
        self._own: dict[str, asyncio.Task[None]] = {}  # feed, retries, keepalive
        self._health: dict[str, TaskHealth] = {}
        self._stop = asyncio.Event()

    # -- what the worker reads and calls -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.intake.name

    @property
    def client(self) -> NatsClient:
        return self.intake.client

    @property
    def in_flight(self) -> int:
        """Messages held: from their arrival until their outcome is committed."""
        return self.intake.in_flight

    @property
    def counters(self) -> Counters:
        return self.driver.counters

    @property
    def gates(self) -> EndpointGates:
        return self.driver.gates

    @property
    def bulkhead(self) -> Bulkhead:
        return self.driver.bulkhead

    def clients_in_use(self) -> set[int]:
        return self.intake.clients_in_use()

    def pulls_lost(self) -> None:
        self.intake.pulls_lost()

    async def rebind(self, client: NatsClient) -> None:
        await self.intake.rebind(client)

    def update(self, cdef: ConsumerDef) -> None:
        """New settings (batch size, retry policy) apply to the next deliveries."""
        self.cdef = self.intake.cdef = cdef
        self.driver.update(cdef)
        self.intake.wake.set()

    def task_states(self) -> dict[str, bool]:
        """The consumer's own tasks: alive and well (False: stopped, or failed and not yet seen
        working again since its restart; see supervise.TaskHealth)."""
        now = time.monotonic()
        return {
            name: not task.done() and self._health[name].problem(now) is None
            for name, task in self._own.items()
        }

    def task_restarts(self) -> dict[str, int]:
        """Restarts after a failure, per task that had any."""
        return {name: h.failures for name, h in self._health.items() if h.failures}

    # -- start and stop ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.intake.subscribe()
        intake = self.intake
        self._supervise("feed", intake.feed, lambda: intake.pulls)
        self._supervise("retries", intake.pump_retries, lambda: intake.claims)
        self._supervise("keepalive", intake.keep_alive, lambda: intake.rounds)
        logger.info(
            "consumer %s started (batch_size %d)",
            self.name,
            self.cdef.batch_size,
            extra={"action": "consumer_started"},
        )

    def _supervise(self, name: str, run: Callable[[], Awaitable[None]], progress: Callable[[], int]) -> None:
        health = self._health[name] = TaskHealth(f"{name} {self.name}", progress)

        def failed() -> None:
            self.driver.counters.task_restarts += 1

        health.on_failure = failed
        self._own[name] = asyncio.create_task(supervise(run, health, self._stop), name=f"{name} {self.name}")

    async def stop(self, deadline: float) -> None:
        """Stop fetching, finish in-flight deliveries until the deadline (monotonic), then let go."""
        self.intake.stopping = True
        self.intake.wake.set()
        self._stop.set()
        self.driver.slots.close(len(self._tasks))
        self.driver.bulkhead.close()
        await self._cancel("feed", "retries")
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()  # unrecorded: JetStream redelivers it; the worker releases retry leases at exit
        await self._cancel("keepalive")
        await self.intake.close(deadline)
        c = self.counters
        logger.info(
            "consumer %s stopped: %d delivered, %d failed attempts, %d dead-lettered, %d deferred, %d redelivered",
            self.name,
            c.delivered,
            c.failed,
            c.dead_lettered,
            c.deferred,
            c.redelivered,
            extra={"action": "consumer_stopped"},
        )

    async def _cancel(self, *names: str) -> None:
        for name in names:
            task = self._own.get(name)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- one task per message --------------------------------------------------------------------------

    async def _claim(self, pool: AsyncConnectionPool[Any], worker: str, limit: int) -> list[Job]:
        return await claim_retries(pool, self.cdef, worker, limit)  # the settings of the moment

    def _parked(self) -> int:
        """Held messages that will not be sent from the window (backpressure.pull_size)."""
        return self.driver.deferring

    def _spawn(self, job: Job) -> None:
        # The message is held, and kept alive, from now until its outcome is committed.
        self.intake.keep(job)
        task = asyncio.create_task(self.driver.run(job))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(job, t))

    def _done(self, job: Job, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.intake.let_go(job)
        if not job.recorded:
            self.intake.release(job)  # nothing will acknowledge it: JetStream redelivers it
            step = abandon(job)
            if step is not None:
                self.intake.run_aside(step)
        if not task.cancelled() and task.exception() is not None:
            logger.error("delivery task failed: %r", task.exception(), extra={"action": "delivery_crashed"})
