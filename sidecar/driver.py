"""The stage driver: one message's life, top to bottom (see ``sidecar.lifecycle`` for each stage).

``Driver.run`` reads like the life it drives: prepared, gated, sent, classified, recorded and, once
the COMMIT is in, acknowledged. One function per stage; a named type between them (``Prepared``,
``Admitted``, ``Sent``, ``Attempt``). Receiving is ``sidecar.intake``'s; writing is
``sidecar.recorder``'s, whose future says when the outcome is committed, and only then is the
message acknowledged, here, by the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from sidecar import oplog
from sidecar.bulkhead import Bulkhead, LaneKey, lane_key
from sidecar.delivery import Request, Response, Sender, sign_request
from sidecar.endpoints import EndpointGate, EndpointGates
from sidecar.lifecycle import (
    INTERNAL_ERROR,
    AlreadyRecorded,
    Dead,
    Defer,
    Delivered,
    HandBack,
    Job,
    Prepared,
    Retry,
    Verdict,
    classify,
    outcome_of,
    prepare,
)
from sidecar.lookup import Lookups
from sidecar.recorder import Recorder
from sidecar.registry import ConsumerDef, Registry, WebhookDef
from sidecar.routing import ChildMsg, FanOut, no_route_error, replayed_copy, targets
from sidecar.rows import Source

logger = logging.getLogger(__name__)

EndpointEvents = Callable[[int | str, EndpointGate, list[str]], None]


@dataclass(slots=True)
class Counters:
    """What one consumer did: the only place its counts are kept (metrics, stats and the final log
    line read them)."""

    delivered: int = 0
    acked: int = 0
    failed: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    deferred: int = 0
    processing_ms: float = 0.0
    processed: int = 0
    scheduled: int = 0  # failed attempts with another attempt scheduled
    delivered_ms: float = 0.0  # HTTP time of the successful requests (the original's avg_processing_time_ms)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    task_restarts: int = 0  # the consumer's own tasks (feed, retries, keepalive) restarted after a failure

    def count(self, verdict: Verdict) -> None:
        if isinstance(verdict, Delivered):
            self.delivered += 1
            self.delivered_ms += verdict.latency_ms
        elif isinstance(verdict, Defer):
            self.deferred += 1
        elif isinstance(verdict, Retry):
            self.failed += 1
            self.scheduled += 1
        elif isinstance(verdict, Dead):
            self.failed += 1
            self.dead_lettered += 1
            self.dead_letter_reasons[verdict.reason] = self.dead_letter_reasons.get(verdict.reason, 0) + 1

    def add(self, other: Counters) -> None:
        for name in ("delivered", "acked", "failed", "redelivered", "dead_lettered", "deferred", "scheduled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.task_restarts += other.task_restarts
        for reason, n in other.dead_letter_reasons.items():
            self.dead_letter_reasons[reason] = self.dead_letter_reasons.get(reason, 0) + n


@dataclass(slots=True)
class Hooks:
    """What the worker wants to hear about, and the lookups it offers (all optional)."""

    stats_due: asyncio.Event | None = None  # set every 100 messages: the worker then writes the stats
    on_endpoint_event: EndpointEvents | None = None
    observe_latency: Callable[[float], None] | None = None  # seconds of each HTTP attempt (histogram)
    # A webhook_id the registry lacks is read from PostgreSQL before it is dead-lettered (True: it
    # exists and is in the registry now); see sidecar.lookup.
    lookup_webhook: Callable[[int], Awaitable[bool]] | None = None
    # Likewise the webhooks on a subject, before a message naming no endpoint is dead-lettered.
    lookup_subject: Callable[[str], Awaitable[list[WebhookDef]]] | None = None


@dataclass(slots=True)
class Attempt:
    """What one try at a message came to: the verdict, notes for its attempt row, and the time it
    started (every row of its outcome is stamped with it)."""

    verdict: Verdict
    now: float
    notes: str | None = None


@dataclass(slots=True)
class Admitted:
    """gated: the message holds a send slot, its endpoint's turn and its gate's admission."""

    gate: EndpointGate
    lane: LaneKey
    now: float


@dataclass(slots=True)
class Sent:
    request: Request
    response: Response


class SendSlots:
    """``batch_size`` bounds the messages sent and not yet recorded: a slot is taken right before
    the HTTP request and given back once the outcome is committed (or nothing was sent). So a worker
    killed at any moment has sent at most batch_size messages whose outcome JetStream does not
    know, the most a receiver can get twice; messages fetched ahead wait for a slot unsent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._sem = asyncio.Semaphore(size)
        self.taken = 0
        self.closed = False

    @property
    def all_taken(self) -> bool:
        return self.taken >= self.size

    def resize(self, size: int) -> None:
        if size != self.size:
            self.size = size
            self._sem = asyncio.Semaphore(size)  # slots taken give back the old one

    async def take(self, job: Job) -> bool:
        """A slot for ``job``; False once closed (the consumer stops: hand the message back)."""
        sem = self._sem
        await sem.acquire()
        if self.closed:
            sem.release()
            return False
        job.send_slot = sem
        self.taken += 1
        return True

    def give_back(self, job: Job) -> None:
        if job.send_slot is not None:
            job.send_slot.release()
            job.send_slot = None
            self.taken -= 1

    def close(self, waiters: int) -> None:
        """Messages waiting for a slot hand themselves back now, not once a delivery in flight ends
        (when none ended before the deadline they were cancelled unacknowledged and came back only
        after the ack wait): a permit more per waiter, whatever slot it gets, nothing is sent."""
        self.closed = True
        for _ in range(waiters):
            self._sem.release()


class Driver:
    """Drives each message of one consumer through its stages (``run``)."""

    def __init__(
        self,
        cdef: ConsumerDef,
        registry: Callable[[], Registry],
        sender: Sender,
        recorder: Recorder,
        pool: AsyncConnectionPool[Any],
        worker_name: str,
        gates: EndpointGates,
        hooks: Hooks,
        release: Callable[[Job], None],
        spawn: Callable[[Job], None],
        wake: Callable[[], None],
    ) -> None:
        self.cdef = cdef
        self.registry = registry
        self.sender = sender
        self.recorder = recorder
        self.pool = pool
        self.worker_name = worker_name
        self.gates = gates
        self.hooks = hooks
        self.lookups = Lookups(pool, hooks.lookup_webhook, hooks.lookup_subject)
        self.release = release  # the message is acknowledged or handed back: its connection may go
        self.spawn = spawn  # a routed copy of a message, driven on its own
        self.wake = wake  # the fetch window changed
        self.counters = Counters()
        self.slots = SendSlots(cdef.batch_size)
        self.bulkhead = Bulkhead(cdef.batch_size)
        self.deferring = 0  # outcomes being deferred, not yet committed (the feeder fetches past them)
        self._rand = random.Random()  # noqa: S311 - jitter, not cryptography

    def update(self, cdef: ConsumerDef) -> None:
        self.slots.resize(cdef.batch_size)
        self.bulkhead.slots = cdef.batch_size
        self.cdef = cdef

    # -- the life of one message -------------------------------------------------------------------

    async def run(self, job: Job) -> None:
        """prepared, gated, sent, classified, recorded, acknowledged. Whatever goes wrong ends as an
        outcome: an exception nobody foresaw becomes an ``internal_error`` dead letter (recorded,
        then acknowledged) instead of a dead task and a message redelivered until JetStream drops
        it. The send slot is given back only at the very end, after the COMMIT (see SendSlots)."""
        try:
            try:
                attempt = await self.attempt(job)
                if await self.routed(job, attempt):
                    return  # its copies settle it
                if isinstance(attempt.verdict, HandBack):
                    await self.hand_back(job)
                elif isinstance(attempt.verdict, AlreadyRecorded) or await self.record(job, attempt):
                    await self.ack(job)  # only once PostgreSQL has its outcome
            except Exception as exc:
                if job.recorded:
                    raise  # its outcome is already on the way: logged by the runner, nothing to add
                if await self.record(job, internal_error(job, exc)):
                    await self.ack(job)
        finally:
            self.slots.give_back(job)
            if job.lane is not None:  # took its endpoint's turn and sent nothing
                self.bulkhead.leave(job.lane)
                job.lane = None

    async def attempt(self, job: Job) -> Attempt:
        """received -> classified."""
        now = time.time()
        prepared = await self.prepare(job)
        if not isinstance(prepared, Prepared):
            return Attempt(prepared, now)
        admitted = await self.gate(job, prepared)
        if isinstance(admitted, Attempt):
            return admitted
        sent = await self.send(job, prepared, admitted)
        return self.classify(job, prepared, admitted, sent)

    # -- the stages ----------------------------------------------------------------------------------

    async def prepare(self, job: Job) -> Prepared | Verdict:
        """received -> prepared (``lifecycle.prepare``), reading PostgreSQL for a webhook the
        registry in memory lacks; a redelivered message whose outcome is recorded is not sent again."""
        if job.redelivered and job.msg is not None:
            self.counters.redelivered += 1
        prepared = prepare(job, self.registry(), self.cdef.retry)
        if isinstance(prepared, Dead) and prepared.unknown_webhook is not None:
            verdict = await self.lookups.webhook(job, prepared)
            prepared = verdict or prepare(job, self.registry(), self.cdef.retry)  # None: it is there now
        if not isinstance(prepared, Prepared):
            return prepared
        if prepared.webhook is not None:
            self.gates.enabled_again(prepared.webhook.webhook_id)
        if (
            job.redelivered
            and job.msg is not None
            and job.retry_id is None
            and await self.lookups.recorded_before(job)
        ):
            return AlreadyRecorded()
        return prepared

    async def gate(self, job: Job, prepared: Prepared) -> Admitted | Attempt:
        """prepared -> gated: the endpoint's share of the send slots (``sidecar.bulkhead``), then a
        send slot, then the endpoint's rate limit, concurrency and circuit (``sidecar.endpoints``).
        A slot first: a message waiting for one must not hold the endpoint's rate tokens or
        concurrency, nor be sent on an admission that went stale."""
        now = time.time()
        lane = lane_key(prepared.gate_key, prepared.request.url, prepared.webhook is not None)
        turn = self.bulkhead.enter(lane)
        if turn.wait:
            turn = await self.bulkhead.wait_turn(lane)
        if not turn.go:
            return Attempt(Defer(turn.delay, turn.why) if turn.why else HandBack(), now)
        job.lane = lane  # given back at the response, or (nothing sent) at the end of run
        if not await self.slots.take(job):
            return Attempt(HandBack(), now)  # fetched ahead, unsent, and the worker stops
        now = time.time()
        gate = self.gates.get(prepared.gate_key, prepared.limits)
        admission = gate.admit(now, self.cdef.batch_size)
        if not admission.go:
            return Attempt(Defer(max(0.0, admission.until - now), admission.why), now)
        try:
            if admission.wait > 0:
                await asyncio.sleep(admission.wait)
            await gate.acquire()
        except BaseException:
            gate.cancel()
            raise
        closed = gate.recheck(time.time(), admission.probe)
        if closed is not None:
            await gate.release()
            return Attempt(Defer(max(0.0, closed.until - now), closed.why), now)
        return Admitted(gate, lane, now)

    async def send(self, job: Job, prepared: Prepared, admitted: Admitted) -> Sent:
        """gated -> sent: one signed HTTP attempt. The endpoint's turn and its gate end with the
        response; the send slot is held until the outcome's COMMIT."""
        resp: Response | None = None
        try:
            keys = job.webhook.keys if job.webhook is not None else ()
            req = sign_request(prepared.request, job.message_id, keys, time.time())
            self.bulkhead.started(admitted.lane, id(job), time.monotonic())
            resp = await self.sender.send(req)
        finally:
            job.lane = None
            self.bulkhead.finished(admitted.lane, id(job), None if resp is None else resp.latency_ms / 1000.0)
            await admitted.gate.release()
        return Sent(req, resp)

    def classify(self, job: Job, prepared: Prepared, admitted: Admitted, sent: Sent) -> Attempt:
        """sent -> classified (``lifecycle.classify``); the endpoint's gate learns from the answer."""
        resp = sent.response
        if self.hooks.observe_latency is not None and resp.blocked is None:
            self.hooks.observe_latency(resp.latency_ms / 1000.0)
        result = classify(resp, job, prepared, admitted.now, self._rand)
        notes = None
        if resp.blocked is None and sent.request.dropped_headers:
            notes = f"dropped headers: {', '.join(sent.request.dropped_headers)}"
        if result.gate is not None:
            gate = admitted.gate
            events = gate.record(
                time.time(), result.gate, resp.status, result.error, result.retry_after, job.message_id
            )
            if events:
                oplog.log_circuit(job, events, result.error, resp.status)
                if self.hooks.on_endpoint_event is not None:
                    self.hooks.on_endpoint_event(prepared.gate_key, gate, events)
        return Attempt(result.verdict, admitted.now, notes)

    async def record(self, job: Job, attempt: Attempt) -> bool:
        """classified -> recorded: True once the outcome is committed, False when the recorder gave
        up on it (the message stays unacknowledged: JetStream redelivers it)."""
        verdict = attempt.verdict
        self.counters.count(verdict)
        oplog.log_outcome(job, verdict, attempt.now)
        # Built before job.recorded is set: should building it fail, run's catch-all still records an
        # internal_error (a failure here once left a POSTed message with no attempt row).
        outcome = outcome_of(
            job, verdict, attempt.now, self.worker_name, attempt.notes, source=source_of(job)
        )
        job.recorded = True
        committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        outcome.committed = committed
        key = (job.seq, job.webhook_id) if job.msg is not None and job.seq is not None else None
        if key is not None:
            self.lookups.uncommitted[key] = committed
        parked = isinstance(verdict, Defer)
        if parked:
            self.deferring += 1
            self.wake()  # the feeder fetches past it (backpressure.pull_size)
        try:
            await self.recorder.submit(outcome)
            if self.slots.all_taken:
                # Nothing more is sent until a COMMIT gives a slot back: waiting for more outcomes to
                # share the transaction would only stall the consumer. Otherwise outcomes wait a few
                # milliseconds (one COMMIT per message cost a third more CPU per message).
                self.recorder.flush_now()
            # Not shielded (a shield cost 1-2% of the CPU per message): a task cancelled at shutdown
            # cancels this future, which settle() and recorded_before's shield tolerate.
            ok = await committed
        finally:
            if parked:
                self.deferring -= 1
            if key is not None and self.lookups.uncommitted.get(key) is committed:
                del self.lookups.uncommitted[key]
        if ok:
            self._processed(job)
        return ok

    async def ack(self, job: Job) -> None:
        """recorded -> acknowledged (or a message from the retry table: nothing to tell NATS)."""
        job.recorded = True
        if job.msg is None:
            return
        try:
            await job.msg.ack()
        except Exception as exc:  # redelivered, found recorded and acknowledged again: harmless
            logger.debug("ack failed: %s", exc)
            return
        finally:
            self.release(job)
        self.counters.acked += 1

    async def hand_back(self, job: Job) -> None:
        """Not sent, the worker stops: JetStream gives it to another worker at once (a retry-table
        row's lease is released when the worker exits)."""
        if job.msg is not None:
            with contextlib.suppress(Exception):  # unacknowledged anyway: back after the ack wait
                await job.msg.nak()

    def _processed(self, job: Job) -> None:
        c = self.counters
        c.processed += 1
        c.processing_ms += (time.perf_counter() - job.received) * 1000.0
        if self.hooks.stats_due is not None and c.processed % 100 == 0:
            self.hooks.stats_due.set()

    async def routed(self, job: Job, attempt: Attempt) -> bool:
        """A message that names no endpoint, on the subject of registered webhooks: one copy per
        webhook (``sidecar.routing``), each driven and recorded on its own; the message is
        acknowledged once all are. False (and a dead letter that names the subject): none there."""
        verdict = attempt.verdict
        if not isinstance(verdict, Dead) or verdict.reason != "missing_webhook_url" or job.routed:
            return False
        if job.msg is not None:
            found = targets(self.registry(), job.subject) or await self.lookups.on_subject(job)
            replayed = replayed_copy(job.nats_headers, found)
            if replayed is not None:
                found = (replayed,)
            if found:
                self.fan_out(job, found)
                return True
        verdict.error = no_route_error(job.subject)
        return False

    def fan_out(self, job: Job, found: tuple[WebhookDef, ...]) -> None:
        assert job.msg is not None

        group = FanOut(job.msg, len(found), lambda _acked: self.release(job))
        job.recorded = True  # handed to its copies: the runner must not let it go
        for webhook in found:
            child = Job(
                raw=job.raw,
                nats_headers=job.nats_headers,
                stream=job.stream,
                consumer=job.consumer,
                seq=job.seq,
                subject=job.subject,
                msg=group.child(),  # type: ignore[arg-type]  # acknowledges its share of job.msg
                redelivered=job.redelivered,
                webhook_id=webhook.webhook_id,
                webhook=webhook,  # read from PostgreSQL, perhaps: the registry may lack it
                routed=True,
                received=job.received,
            )
            self.spawn(child)


def internal_error(job: Job, exc: Exception) -> Attempt:
    """An exception nobody foresaw, as a dead letter (logged with its traceback)."""
    logger.error(
        "delivering message %s/%s failed unexpectedly; dead-lettered as %s",
        job.stream,
        job.seq,
        INTERNAL_ERROR,
        exc_info=exc,
        extra={"action": "delivery_internal_error"},
    )
    return Attempt(Dead(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:2000], attempted=False), time.time())


def source_of(job: Job) -> Source:
    """The message, as a quarantined dead letter keeps it should its outcome's rows be refused."""
    return Source(
        message_id=job.message_id,
        stream=job.stream,
        consumer=job.consumer,
        seq=job.seq,
        subject=job.subject,
        raw=job.raw,
        headers=job.nats_headers,
        webhook_id=job.webhook_id,
        url=job.url,
    )


def abandon(job: Job) -> Awaitable[None] | None:
    """A task that ended without an outcome for ``job``: a routed copy hands its message back (the
    step to run), anything else is simply left unacknowledged for JetStream to redeliver."""
    msg: Any = job.msg
    return msg.abandon() if isinstance(msg, ChildMsg) else None
