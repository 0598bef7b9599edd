"""One durable JetStream consumer run by this worker: each message it receives goes through its life
(``sidecar.lifecycle``) in ``ConsumerRunner._process``: prepared, gated, sent, classified, recorded,
acknowledged after the COMMIT. Receiving (pull requests, retry claims, in-progress signals) is
``sidecar.intake``. Retries live in PostgreSQL (rule_nats_retries): a failed attempt is written
there and the NATS message is acknowledged, so waiting retries never hold the consumer's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from psycopg_pool import AsyncConnectionPool

from sidecar import oplog
from sidecar.bulkhead import Bulkhead, lane_key
from sidecar.delivery import Response, Sender, sign_request
from sidecar.endpoints import EndpointGate, EndpointGates
from sidecar.intake import Intake
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
    Stage,
    Verdict,
    classify,
    outcome_of,
    prepare,
)
from sidecar.lookup import read_webhooks_on_subject
from sidecar.queries import query
from sidecar.recorder import Recorder
from sidecar.registry import ConsumerDef, Registry, WebhookDef
from sidecar.routing import ChildMsg, FanOut, no_route_error, on_subject, replayed_copy, targets
from sidecar.rows import Source

logger = logging.getLogger(__name__)

LOOKUP_RETRY_SECONDS = 5.0  # an unknown webhook that PostgreSQL could not be asked about
# An unknown webhook that PostgreSQL does not show either is asked about once more after this: the
# webhook may be inserted in the very transaction that published the message (an immediate publish
# reaches NATS before that COMMIT), as the original's examples do.
UNKNOWN_WEBHOOK_WAIT = 2.0
EndpointEvents = Callable[[int | str, EndpointGate, list[str]], None]


@dataclass(slots=True)
class Counters:
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
        for reason, n in other.dead_letter_reasons.items():
            self.dead_letter_reasons[reason] = self.dead_letter_reasons.get(reason, 0) + n


class ConsumerRunner(Intake):
    """One consumer: what it receives (``Intake``) goes through the life in ``_process``."""

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
        super().__init__(cdef, client, pool, recorder, worker_name, on_closed)
        self.sender = sender
        self.registry = registry
        self.stats_due = stats_due  # set every 100 messages: the worker then writes the stats
        self.counters = Counters()
        self.gates = gates if gates is not None else EndpointGates()
        self.on_endpoint_event = on_endpoint_event
        self.observe_latency = observe_latency  # seconds of each HTTP attempt, for the metrics histogram
        # A webhook_id the registry lacks is read from PostgreSQL before it is dead-lettered (True:
        # it exists and is in the registry now); see sidecar.lookup.
        self.lookup_webhook = lookup_webhook
        # Likewise the webhooks on a subject, before a message naming no endpoint is dead-lettered.
        self.lookup_subject = lookup_subject or functools.partial(read_webhooks_on_subject, pool)
        self.pending = 0  # JetStream's num_pending at the last look
        self._tasks: set[asyncio.Task[None]] = set()
        self._feeder: asyncio.Task[None] | None = None
        self._retry_pump: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        # Outcomes waiting for their COMMIT, by stream sequence: a copy JetStream redelivers meanwhile
        # waits for it instead of being sent again.
        self._uncommitted: dict[tuple[int, int | None], asyncio.Future[bool]] = {}
        self._rand = random.Random()  # noqa: S311 - jitter, not cryptography
        # batch_size bounds the messages sent and not yet recorded: a slot is taken right before the
        # HTTP request and given back once the outcome is committed (or nothing was sent). So a worker
        # killed at any moment has sent at most batch_size messages whose outcome JetStream does not
        # know, the most a receiver can get twice; messages fetched ahead wait for a slot unsent.
        self._sending = asyncio.Semaphore(cdef.batch_size)
        self.bulkhead = Bulkhead(cdef.batch_size)
        self._slots_taken = 0  # send slots taken: sent or being sent, outcome not yet committed

    def update(self, cdef: ConsumerDef) -> None:
        """New settings (batch size, retry policy) apply to the next deliveries."""
        if cdef.batch_size != self.cdef.batch_size:
            self._sending = asyncio.Semaphore(cdef.batch_size)  # slots taken give back the old one
            self.bulkhead.slots = cdef.batch_size
        self.cdef = cdef
        self._wake.set()

    async def start(self) -> None:
        self._inbox, self._sub = await self._subscribe(self.client)
        self._feeder = asyncio.create_task(self._feed(), name=f"feed {self.name}")
        self._retry_pump = asyncio.create_task(self._pump_retries(), name=f"retries {self.name}")
        self._keepalive = asyncio.create_task(self._keep_alive(), name=f"keepalive {self.name}")
        logger.info(
            "consumer %s started (batch_size %d)",
            self.name,
            self.cdef.batch_size,
            extra={"action": "consumer_started"},
        )

    async def stop(self, deadline: float) -> None:
        """Stop fetching, finish in-flight deliveries until the deadline (monotonic), then let go."""
        self._stopping = True
        self._wake.set()
        # Messages waiting for a send slot hand themselves back now (_deliver), not once a delivery in
        # flight ends: when none ends before the deadline they were cancelled unacknowledged and came
        # back only after the ack wait. A permit more per task: nothing is sent any more, whatever
        # slot it gets.
        for _ in range(len(self._tasks)):
            self._sending.release()
        self.bulkhead.close()
        for task in (self._feeder, self._retry_pump):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()  # unrecorded: JetStream redelivers it; the worker releases retry leases at exit
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        # Messages still arriving for our pull requests are handed back at once (see _on_message);
        # wait briefly so they are not left to the ack wait.
        # (Not while NATS is unreachable: nothing can arrive then, and SIGTERM would wait for nothing.)
        until = min(deadline, time.monotonic() + 1.0)
        while self.outstanding > 0 and self.client.is_connected and time.monotonic() < until:  # noqa: ASYNC110 - polled counter, no event
            await asyncio.sleep(0.05)
        for task in list(self._aux):
            task.cancel()
        for _, sub in [*self._old_subs, (self.client, self._sub)]:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._old_subs.clear()
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

    def _parked(self) -> int:
        return self.deferring + self.bulkhead.waiting

    def _spawn(self, job: Job) -> None:
        # The message is held, and kept alive, from now until its outcome is committed.
        self._held[id(job)] = job
        task = asyncio.create_task(self._process(job))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(job, t))

    def _done(self, job: Job, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._held.pop(id(job), None)
        if not job.recorded:
            self._release(job)  # nothing will acknowledge it: JetStream redelivers it
            msg: Any = job.msg  # a Msg, or a routed copy's share of one
            if isinstance(msg, ChildMsg):
                step = msg.abandon()  # a routed copy without an outcome: the message goes back
                if step is not None:
                    back = asyncio.ensure_future(step)
                    self._aux.add(back)
                    back.add_done_callback(self._aux.discard)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("delivery task failed: %r", task.exception(), extra={"action": "delivery_crashed"})

    # -- delivering ----------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        """The life of one message, start to end (see sidecar.lifecycle): prepared, gated, sent,
        classified, recorded and, once committed, acknowledged. Whatever goes wrong ends as an
        outcome: an exception nobody foresaw becomes an ``internal_error`` dead letter (recorded,
        then acknowledged) instead of a dead task, a message redelivered until JetStream drops it,
        and no trace in PostgreSQL. A send slot taken is given back only at the very end, after
        the COMMIT of whichever outcome it got (see ``_sending``)."""
        try:
            try:
                verdict, notes, now = await self._deliver(job)
                if isinstance(verdict, Dead) and verdict.reason == "missing_webhook_url" and not job.routed:
                    if await self._fan_out(job):
                        return  # its copies settle it
                    verdict.error = no_route_error(job.subject)
                await self._settle(job, verdict, notes, now)
            except Exception as exc:
                if job.recorded:
                    raise  # its outcome is already on the way: logged by _done, nothing to add
                logger.exception(
                    "delivering message %s/%s failed unexpectedly; dead-lettered as %s",
                    job.stream,
                    job.seq,
                    INTERNAL_ERROR,
                    extra={"action": "delivery_internal_error"},
                )
                dead = Dead(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:2000], attempted=False)
                await self._settle(job, dead, None, time.time())
        finally:
            self._give_back_slot(job)

    async def _fan_out(self, job: Job) -> bool:
        """A message that names no endpoint, on the subject of registered webhooks: one copy per
        webhook (sidecar.routing), each delivered and recorded on its own; the message is
        acknowledged once all are. False: no webhook is registered on its subject."""
        if job.msg is None:
            return False
        found = targets(self.registry(), job.subject) or await self._subject_from_db(job)
        replayed = replayed_copy(job.nats_headers, found)
        if replayed is not None:
            found = (replayed,)
        if not found:
            return False
        parent = job

        def settled(acked: bool) -> None:
            self._release(parent)
            if acked:
                parent.stage = Stage.ACKNOWLEDGED

        group = FanOut(job.msg, len(found), settled)
        job.stage = Stage.RECORDED  # handed to its copies: _done must not let it go
        for webhook in found:
            self._spawn(
                Job(
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
            )
        return True

    async def _subject_from_db(self, job: Job) -> tuple[WebhookDef, ...]:
        """No webhook on the message's subject in the registry in memory, which may be older than a
        webhook just registered (reloads are coalesced): PostgreSQL's answer, and when it has none
        either, its answer UNKNOWN_WEBHOOK_WAIT later (the publishing transaction may be the one
        inserting the webhook). Asked until PostgreSQL answers ("cannot tell" is not "none"); the
        message is held and kept alive meanwhile, holding no send slot."""
        looks, delay = 0, 0.5
        while True:
            try:
                found = on_subject(await self.lookup_subject(job.subject), job.subject)
            except Exception as exc:
                logger.warning(
                    "cannot look up the webhooks on subject %r: %s; message %s/%s waits %.1f s",
                    job.subject,
                    exc,
                    job.stream,
                    job.seq,
                    delay,
                    extra={"action": "webhook_lookup_failed"},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LOOKUP_RETRY_SECONDS)
                continue
            looks += 1
            if found or looks > 1:
                return found
            await asyncio.sleep(UNKNOWN_WEBHOOK_WAIT)

    def _give_back_slot(self, job: Job) -> None:
        if job.lane is not None:
            self.bulkhead.leave(job.lane)
            job.lane = None
        if job.send_slot is not None:
            job.send_slot.release()
            job.send_slot = None
            self._slots_taken -= 1

    async def _deliver(self, job: Job) -> tuple[Verdict, str | None, float]:
        """received -> classified: the verdict, notes for the attempt row, and the time the attempt
        started (every row of the outcome is stamped with it)."""
        if job.redelivered and job.msg is not None:
            self.counters.redelivered += 1
        now = time.time()
        prepared = prepare(job, self.registry(), self.cdef.retry)
        if isinstance(prepared, Dead) and prepared.unknown_webhook is not None:
            prepared = await self._look_up(job, prepared)
        if not isinstance(prepared, Prepared):
            return prepared, None, now
        if prepared.webhook is not None:
            self.gates.enabled_again(prepared.webhook.webhook_id)
        if (
            job.redelivered
            and job.msg is not None
            and job.retry_id is None
            and await self._recorded_before(job, job.message_id)
        ):
            return AlreadyRecorded(), None, now
        # The endpoint's share of the send slots (sidecar.bulkhead): over it, the message waits only
        # if its turn comes soon, else it is deferred and the window holds what others can send.
        lane = lane_key(prepared.gate_key, prepared.request.url, prepared.webhook is not None)
        turn = self.bulkhead.enter(lane)
        if turn.wait:
            turn = await self.bulkhead.wait_turn(lane)
        if not turn.go:
            if not turn.why:
                return HandBack(), None, now
            return Defer(turn.delay, turn.why), None, now
        job.lane = lane  # given back at the response, or (nothing sent) with the send slot
        # A send slot first, then the endpoint's gate: a message waiting for a slot must not hold
        # the endpoint's rate tokens or concurrency, nor be sent on an admission that went stale.
        # Fetched ahead and still unsent when the worker stops: handed back, not sent (the stop
        # waits only for what is being sent; another worker takes the rest at once).
        slot = self._sending
        await slot.acquire()
        if self._stopping:
            slot.release()
            return HandBack(), None, now
        job.send_slot = slot
        self._slots_taken += 1
        # gated: the endpoint's rate limit, concurrency and circuit
        now = time.time()
        gate = self.gates.get(prepared.gate_key, prepared.limits)
        admission = gate.admit(now, self.cdef.batch_size)
        if not admission.go:
            return Defer(max(0.0, admission.until - now), admission.why), None, now
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
            return Defer(max(0.0, closed.until - now), closed.why), None, now
        job.stage = Stage.GATED
        # sent
        resp: Response | None = None
        try:
            req = sign_request(
                prepared.request,
                job.message_id,
                job.webhook.keys if job.webhook is not None else (),
                time.time(),
            )
            self.bulkhead.started(lane, id(job), time.monotonic())
            resp = await self.sender.send(req)
        finally:
            job.lane = None  # its turn ends with the response (finished), not at the COMMIT
            self.bulkhead.finished(lane, id(job), None if resp is None else resp.latency_ms / 1000.0)
            await gate.release()
        job.stage = Stage.SENT
        # classified
        if self.observe_latency is not None and resp.blocked is None:
            self.observe_latency(resp.latency_ms / 1000.0)
        result = classify(resp, job, prepared, now, self._rand)
        job.stage = Stage.CLASSIFIED
        notes = None
        if resp.blocked is None and req.dropped_headers:
            notes = f"dropped headers: {', '.join(req.dropped_headers)}"
        if result.gate is not None:
            events = gate.record(
                time.time(), result.gate, resp.status, result.error, result.retry_after, job.message_id
            )
            if events:
                oplog.log_circuit(job, events, result.error, resp.status)
            if events and self.on_endpoint_event is not None:
                self.on_endpoint_event(prepared.gate_key, gate, events)
        return result.verdict, notes, now

    async def _look_up(self, job: Job, unknown: Dead) -> Prepared | Dead | Defer:
        """An unknown webhook_id: the registry in memory may be older than the webhook (reloads are
        coalesced). Dead-lettered only once PostgreSQL says there is no such webhook; when it cannot
        say, the message waits in the retry table and is looked at again. Not there either: asked
        about once more after UNKNOWN_WEBHOOK_WAIT, since the transaction inserting it may not have
        committed yet."""
        if self.lookup_webhook is None or unknown.unknown_webhook is None:
            return unknown
        try:
            found = await self.lookup_webhook(unknown.unknown_webhook)
        except Exception as exc:
            logger.warning(
                "cannot look webhook %s up: %s; message %s/%s waits",
                unknown.unknown_webhook,
                exc,
                job.stream,
                job.seq,
                extra={"action": "webhook_lookup_failed"},
            )
            return Defer(LOOKUP_RETRY_SECONDS, f"webhook {unknown.unknown_webhook} could not be looked up")
        if not found:
            if job.retry_id is None:
                return Defer(UNKNOWN_WEBHOOK_WAIT, f"{unknown.error}: asked again once")
            return unknown
        return prepare(job, self.registry(), self.cdef.retry)

    async def _settle(self, job: Job, verdict: Verdict, notes: str | None, now: float) -> None:
        """classified -> recorded -> acknowledged."""
        if isinstance(verdict, AlreadyRecorded):
            await self._ack_only(job)
            return
        if isinstance(verdict, HandBack):
            if job.msg is not None:
                with contextlib.suppress(Exception):  # unacknowledged anyway: back after the ack wait
                    await job.msg.nak()
            return  # a retry-table row: its lease is released when the worker exits
        self.counters.count(verdict)
        oplog.log_outcome(job, verdict, now)
        if not isinstance(verdict, Defer):
            await self._record(job, verdict, now, notes)
            return
        self.deferring += 1
        self._wake.set()  # the feeder fetches past it (see Intake._feed)
        try:
            await self._record(job, verdict, now, notes)
        finally:
            self.deferring -= 1

    async def _recorded_before(self, job: Job, message_id: str) -> bool:
        """Has this redelivered message an outcome already? Asked until PostgreSQL answers: "cannot
        tell" is not "no" (answering "no" during an outage sent a message nine times). The message
        stays held and alive meanwhile, and is not sent."""
        pending = self._uncommitted.get((job.seq, job.webhook_id)) if job.seq is not None else None
        if pending is not None:
            try:
                if await asyncio.shield(pending):
                    return True  # this worker's own outcome for it was waiting for its COMMIT
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this task is cancelled, not the one waiting for the COMMIT
                # That one was cancelled (shutdown): PostgreSQL says whether its outcome got in.
        delay = 0.5
        while True:
            answer = await self._already_recorded(job, message_id)
            if answer is not None:
                return answer
            logger.warning(
                "cannot tell whether message %s/%s was delivered; holding it, asking again in %.1f s",
                job.stream,
                job.seq,
                delay,
                extra={"action": "recorded_unknown"},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _already_recorded(self, job: Job, message_id: str) -> bool | None:
        """True or False as PostgreSQL says; None when it cannot be asked."""
        try:
            async with self.pool.connection(timeout=5.0) as conn:
                cur = await conn.execute(
                    query("outcome_recorded"),
                    {
                        "stream": job.stream,
                        "consumer": job.consumer,
                        "seq": job.seq,
                        "message_id": message_id,
                    },
                )
                row = await cur.fetchone()
                return bool(row and row[0])
        except Exception as exc:
            logger.debug("outcome check failed: %s", exc)
            return None

    async def _ack_only(self, job: Job) -> None:
        msg = job.msg
        assert msg is not None
        job.stage = Stage.RECORDED  # the outcome is in PostgreSQL already
        try:
            await msg.ack()
        except Exception as exc:  # redelivered and acknowledged again: harmless
            logger.debug("ack failed: %s", exc)
            return
        finally:
            self._release(job)
        job.stage = Stage.ACKNOWLEDGED
        self.counters.acked += 1

    async def _record(self, job: Job, verdict: Verdict, now: float, notes: str | None) -> None:
        started = job.received
        msg = job.msg

        async def after_commit() -> None:
            if msg is not None:
                try:
                    await msg.ack()
                finally:
                    self._release(job)
                job.stage = Stage.ACKNOWLEDGED
                self.counters.acked += 1
            self.counters.processed += 1
            self.counters.processing_ms += (time.perf_counter() - started) * 1000.0
            if self.stats_due is not None and self.counters.processed % 100 == 0:
                self.stats_due.set()

        source = Source(
            job.message_id, job.stream, job.consumer, job.seq, job.subject, job.raw, job.nats_headers,
            job.webhook_id, job.url,
        )  # fmt: skip
        committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settled(ok: bool) -> None:
            if not committed.done():
                committed.set_result(ok)

        # Built before the stage says RECORDED: should building it fail, _process's catch-all still
        # records an internal_error (a failure here once left a POSTed message with no attempt row,
        # redelivered and POSTed again until max_deliver).
        outcome = outcome_of(
            job,
            verdict,
            now,
            self.worker_name,
            notes,
            after_commit=after_commit,
            source=source,
            settled=settled,
        )
        job.stage = Stage.RECORDED
        key = (job.seq, job.webhook_id) if msg is not None and job.seq is not None else None
        if key is not None:
            self._uncommitted[key] = committed
        try:
            await self.recorder.submit(outcome)
            if self._slots_taken >= self.cdef.batch_size:
                # Every send slot is taken: nothing more is sent until a COMMIT gives one back, so
                # waiting for more outcomes would only stall the consumer. Otherwise outcomes wait a
                # few milliseconds to share a transaction (one COMMIT per message at 500 messages/s
                # cost a third more CPU per message).
                self.recorder.flush_now()
            # The send slot stays taken (no other message is sent in its place) and the message
            # alive until the outcome is committed: while PostgreSQL is away the worker holds what
            # it has and takes nothing more.
            # Not shielded (a shield cost 1-2% of the CPU per message): a task cancelled at shutdown
            # cancels this future, which settled() and _recorded_before's shield tolerate.
            await committed
        finally:
            if key is not None and self._uncommitted.get(key) is committed:
                del self._uncommitted[key]
