"""One durable JetStream consumer run by this worker: pull, deliver, record, acknowledge.

Fetching is continuous and bounded: pull requests ask JetStream for exactly as many
messages as there are free delivery slots (``batch_size``), so the next messages arrive
while the current ones are being delivered and nothing is buffered beyond what can start
at once (the original worker buffered more than it could finish within the ack wait and
sent 44% of messages twice). Retries live in PostgreSQL (rule_nats_retries): a failed
attempt is written there and the NATS message is acknowledged, so waiting retries never
hold the consumer's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar.backpressure import (
    keepalive_due,
    keepalive_interval,
    pull_size,
    replay_identity,
    retry_room,
)
from sidecar.delivery import (
    Refused,
    Sender,
    build_request,
    check_message_id,
    classify_status,
    parse_envelope,
    sign_request,
)
from sidecar.endpoints import HELD_SECONDS, EndpointGate, EndpointGates, EndpointLimits
from sidecar.poison import storable
from sidecar.queries import query
from sidecar.recorder import DeadLetter, Outcome, Recorder, Source, utc
from sidecar.registry import ConsumerDef, Registry, RetryPolicy, WebhookDef
from sidecar.retry import decide, parse_retry_after

logger = logging.getLogger(__name__)

PULL_EXPIRES = 5.0  # seconds a pull request waits on the server for messages
RETRY_LEASE = 600.0  # seconds a retry is reserved for the worker attempting it
EndpointEvents = Callable[[int | str, EndpointGate, list[str]], None]


@dataclass(slots=True)
class Job:
    raw: bytes
    nats_headers: dict[str, str] | None
    stream: str
    consumer: str
    seq: int | None
    subject: str
    attempts_done: int = 0
    first_attempt_at: float | None = None
    retry_id: int | None = None
    msg: Msg | None = None
    redelivered: bool = False
    webhook_id: int | None = None
    received: float = field(default_factory=time.perf_counter)
    recorded: bool = False  # its outcome went to the recorder: the catch-all must not add a second
    client: Any = None  # the NATS connection the message arrived on: the one that acknowledges it
    touched: float = field(default_factory=time.monotonic)  # received or last said to be in progress
    attempt_base: int = 0  # attempts made before a replay: attempt numbers go on from there


@dataclass(slots=True)
class Progress:
    """What is known about a message so far: the catch-all's dead letter names what it can."""

    event_id: str | None = None
    webhook: WebhookDef | None = None
    url: str | None = None


INTERNAL_ERROR = "internal_error"


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
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        for name in ("delivered", "acked", "failed", "redelivered", "dead_lettered", "deferred", "scheduled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.dead_letter_reasons.items():
            self.dead_letter_reasons[reason] = self.dead_letter_reasons.get(reason, 0) + n


def message_id_of(job: Job, event_id: str | None) -> str:
    """The message's identity (the webhook-id receivers see, the message_id it is recorded under):
    the publisher's event id, else the original id of a replayed dead letter, else the Nats-Msg-Id,
    else the stream and sequence."""
    if event_id:
        return event_id
    if job.nats_headers:
        original, _ = replay_identity(job.nats_headers)
        if original:
            return original
        if job.nats_headers.get("Nats-Msg-Id"):
            return job.nats_headers["Nats-Msg-Id"]
    return f"{job.stream}:{job.seq}"


class ConsumerRunner:
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
    ) -> None:
        self.cdef = cdef
        self.client = client
        self.pool = pool
        self.sender = sender
        self.recorder = recorder
        self.registry = registry
        self.worker_name = worker_name
        self.stats_due = stats_due  # set every 100 messages: the worker then writes the stats
        self.counters = Counters()
        self.gates = gates if gates is not None else EndpointGates()
        self.on_endpoint_event = on_endpoint_event
        self.observe_latency = observe_latency  # seconds of each HTTP attempt, for the metrics histogram
        self.in_flight = 0
        self.pending = 0  # JetStream's num_pending at the last look
        self.outstanding = 0  # messages requested from JetStream and not yet received
        self._last_pull_activity = time.monotonic()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._inbox = ""
        self.on_closed = on_closed  # our client is closed: the worker moves us to a new one
        self._closed_noted = False
        # Messages not yet acknowledged (nor handed back), per id() of the connection they came on.
        self._held_by_client: dict[int, int] = {}
        # Subscriptions of connections replaced by rebind(), kept until their pull requests expire.
        self._old_subs: list[tuple[NatsClient, Any]] = []
        self._aux: set[asyncio.Task[None]] = set()
        self._feeder: asyncio.Task[None] | None = None
        self._retry_pump: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        # Messages held in a slot (received, not yet committed and acknowledged), kept alive in JetStream.
        self._held: dict[int, Job] = {}
        # Outcomes waiting for their COMMIT, by stream sequence: a copy JetStream redelivers meanwhile
        # waits for it instead of being sent again.
        self._uncommitted: dict[int, asyncio.Future[bool]] = {}
        self._committing = 0  # held slots whose outcome is queued for the recorder
        self._rand = random.Random()  # noqa: S311 - jitter, not cryptography
        self._http = asyncio.Semaphore(cdef.batch_size)  # batch_size is the bound on requests in flight

    @property
    def name(self) -> str:
        return f"{self.cdef.stream_name}/{self.cdef.consumer_name}"

    def update(self, cdef: ConsumerDef) -> None:
        """New settings (batch size, retry policy) apply to the next deliveries."""
        if cdef.batch_size != self.cdef.batch_size:
            self._http = asyncio.Semaphore(cdef.batch_size)  # running requests finish on the old one
        self.cdef = cdef
        self._wake.set()

    def clients_in_use(self) -> set[int]:
        """id() of the NATS clients this runner still needs: its own, those that carried messages it
        has not acknowledged yet, those whose pull requests may still answer."""
        return {
            id(self.client),
            *(k for k, n in self._held_by_client.items() if n > 0),
            *(id(c) for c, _ in self._old_subs),
        }

    async def _subscribe(self, client: NatsClient) -> tuple[str, Any]:
        inbox = client.new_inbox()

        async def on_message(msg: Msg) -> None:
            await self._on_message(msg, client)

        sub = await client.subscribe(inbox, cb=on_message, pending_msgs_limit=-1, pending_bytes_limit=-1)
        return inbox, sub

    async def rebind(self, client: NatsClient) -> None:
        """Fetch through a new connection (the configuration changed, or ours was closed).

        Deliveries in progress finish and are acknowledged on the connection their message came on,
        which the pool keeps open until they are (NatsPool); if it is gone by then, JetStream
        redelivers the message and the redelivery finds the outcome recorded and is only
        acknowledged, not sent again. Messages still arriving for pull requests made on the old
        connection are handed back at once (nak), to come again through the new one.
        """
        if client is self.client:
            return
        old_client, old_sub = self.client, self._sub
        self._inbox, self._sub = await self._subscribe(client)
        self.client = client
        self.outstanding = 0  # the old requests answer on the old inbox
        self._closed_noted = False
        if old_sub is not None:
            self._old_subs.append((old_client, old_sub))
            task = asyncio.create_task(
                self._unsubscribe_later(old_client, old_sub), name=f"unsub {self.name}"
            )
            self._aux.add(task)
            task.add_done_callback(self._aux.discard)
        self._wake.set()
        logger.info(
            "consumer %s moved to the new NATS connection (%d deliveries finish on the old one)",
            self.name,
            self._held_by_client.get(id(old_client), 0),
            extra={"action": "consumer_rebound"},
        )

    async def _unsubscribe_later(self, client: NatsClient, sub: Any) -> None:
        try:
            await asyncio.sleep(PULL_EXPIRES + 1.0)  # the old pull requests have expired by then
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        finally:
            with contextlib.suppress(ValueError):
                self._old_subs.remove((client, sub))

    def _hold(self, job: Job) -> None:
        self._held_by_client[id(job.client)] = self._held_by_client.get(id(job.client), 0) + 1

    def _release(self, job: Job) -> None:
        """The message was acknowledged, handed back or abandoned: its connection may go."""
        if job.client is None:
            return
        key = id(job.client)
        left = self._held_by_client.get(key, 0) - 1
        if left > 0:
            self._held_by_client[key] = left
        else:
            self._held_by_client.pop(key, None)
        job.client = None

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

    # -- fetching ------------------------------------------------------------------

    async def _feed(self) -> None:
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.cdef.stream_name}.{self.cdef.consumer_name}"
        paused = False
        while not self._stopping:
            if self.client.is_closed:
                # Pulling through it would fail every second forever: say so once, ask the worker for
                # a new connection (rebind), and wait for it. Readiness fails meanwhile.
                if not self._closed_noted:
                    self._closed_noted = True
                    logger.warning(
                        "consumer %s: its NATS connection is closed; waiting for a new one",
                        self.name,
                        extra={"action": "consumer_connection_closed"},
                    )
                    if self.on_closed is not None:
                        self.on_closed()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            failing = self.recorder.failing
            if failing != paused:
                paused = failing
                logger.warning(
                    "consumer %s %s",
                    self.name,
                    "pauses fetching: outcomes cannot be committed" if paused else "resumes fetching",
                    extra={"action": "fetch_paused" if paused else "fetch_resumed"},
                )
            free = pull_size(
                self.cdef.batch_size, self.in_flight, self._committing, self.outstanding, failing
            )
            if free > 0:
                body = json.dumps({"batch": free, "expires": int(PULL_EXPIRES * 1e9)}).encode()
                client, inbox = self.client, self._inbox
                try:
                    await client.publish(subject, body, reply=inbox)
                    if client is self.client:  # not rebound meanwhile
                        self.outstanding += free
                    self._last_pull_activity = time.monotonic()
                except Exception as exc:
                    if client.is_closed:
                        continue
                    logger.warning(
                        "pull request for %s failed: %s", self.name, exc, extra={"action": "pull_failed"}
                    )
                    await asyncio.sleep(1.0)
                continue
            if self.outstanding > 0 and time.monotonic() - self._last_pull_activity > PULL_EXPIRES + 2.0:
                # A pull request lost with a reconnect never reports back: forget it.
                self.outstanding = 0
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def _on_message(self, msg: Msg, client: NatsClient | None = None) -> None:
        status = (msg.headers or {}).get("Status") if msg.headers else None
        if client is not None and client is not self.client:
            # For a pull request made before rebind(): hand it back on the connection it came on,
            # it comes again through the current one.
            if not (status is not None and not msg.data and msg.reply == ""):
                with contextlib.suppress(Exception):
                    await msg.nak()
            return
        self._last_pull_activity = time.monotonic()
        if status is not None and not msg.data and msg.reply == "":
            if status == "100":
                return  # idle heartbeat
            pending = (msg.headers or {}).get("Nats-Pending-Messages")
            if pending is not None and pending.isdigit():
                self.outstanding = max(0, self.outstanding - int(pending))
            elif status in ("408", "409", "404"):
                self.outstanding = 0
            if status == "409" and "Deleted" in (msg.headers or {}).get("Description", ""):
                logger.warning(
                    "consumer %s was deleted in JetStream; it is re-created on the next reload",
                    self.name,
                    extra={"action": "consumer_deleted"},
                )
            self._wake.set()
            return
        self.outstanding = max(0, self.outstanding - 1)
        if self._stopping:
            with contextlib.suppress(Exception):
                await msg.nak()  # hand it straight back to the other workers
            return
        meta = msg.metadata
        job = Job(
            raw=msg.data,
            nats_headers=dict(msg.headers) if msg.headers else None,
            stream=self.cdef.stream_name,
            consumer=self.cdef.consumer_name,
            seq=meta.sequence.stream,
            subject=msg.subject,
            msg=msg,
            redelivered=meta.num_delivered > 1,
            client=client if client is not None else self.client,
        )
        self._hold(job)
        self._spawn(job)

    def _spawn(self, job: Job) -> None:
        # The slot is held, and the message kept alive, from now until its outcome is committed.
        self.in_flight += 1
        self._held[id(job)] = job
        task = asyncio.create_task(self._process(job))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(job, t))

    def _done(self, job: Job, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._held.pop(id(job), None)
        if not job.recorded:
            self._release(job)  # nothing will acknowledge it: JetStream redelivers it
        self.in_flight -= 1
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("delivery task failed: %r", task.exception(), extra={"action": "delivery_crashed"})

    async def _pump_retries(self) -> None:
        """Feed due retries from PostgreSQL into the same delivery slots."""
        while not self._stopping:
            # Pull requests waiting on the server hold the fetch window even when the stream is idle,
            # so retries count only deliveries actually running; the HTTP semaphore keeps the bound.
            free = retry_room(self.cdef.batch_size, self.in_flight, self.recorder.failing)
            rows: list[dict[str, Any]] = []
            if free > 0:
                try:
                    async with self.pool.connection() as conn:
                        cur = conn.cursor(row_factory=dict_row)
                        await cur.execute(
                            query("retries_claim"),
                            {
                                "lease": RETRY_LEASE,
                                "worker": self.worker_name,
                                "stream": self.cdef.stream_name,
                                "consumer": self.cdef.consumer_name,
                                "limit": free,
                            },
                        )
                        rows = await cur.fetchall()
                except Exception as exc:
                    logger.warning(
                        "reading due retries failed: %s", exc, extra={"action": "retry_claim_failed"}
                    )
            for r in rows:
                self._spawn(
                    Job(
                        raw=bytes(r["message_raw"]),
                        nats_headers=r["message_headers"],
                        stream=self.cdef.stream_name,
                        consumer=self.cdef.consumer_name,
                        seq=r["stream_seq"],
                        subject=r["subject"],
                        attempts_done=int(r["attempts"]),
                        first_attempt_at=float(r["first_attempt_at"]),
                        retry_id=int(r["retry_id"]),
                        webhook_id=r["webhook_id"],
                    )
                )
            if len(rows) < free or free <= 0:
                await asyncio.sleep(0.25)

    async def _keep_alive(self) -> None:
        """Tell JetStream that every held message is in progress, well within its ack wait, from the
        moment it arrives until its outcome is committed: waiting for an endpoint's rate limit or
        concurrency gate, for a slow response or for PostgreSQL must not hand it to a second worker."""
        while True:
            interval = keepalive_interval(self.cdef.ack_wait_seconds)
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for job in list(self._held.values()):
                if job.msg is None or not keepalive_due(job.touched, now, interval):
                    continue
                job.touched = now
                try:
                    await job.msg.in_progress()
                except Exception as exc:  # acknowledged meanwhile, or NATS away: JetStream decides
                    logger.debug("in-progress signal failed: %s", exc)

    # -- delivering ----------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        """One message, start to end. Whatever goes wrong ends as an outcome: an exception nobody
        foresaw becomes an ``internal_error`` dead letter (recorded, then acknowledged) instead of a
        dead task, a message redelivered until JetStream drops it, and no trace in PostgreSQL."""
        progress = Progress()
        try:
            await self._deliver(job, progress)
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
            await self._dead_letter(
                job,
                message_id_of(job, progress.event_id),
                progress.webhook,
                progress.url,
                INTERNAL_ERROR,
                f"{type(exc).__name__}: {exc}"[:2000],
                time.time(),
                status=None,
                latency=None,
                body=None,
                attempted=False,
            )

    async def _deliver(self, job: Job, progress: Progress) -> None:
        if job.redelivered and job.msg is not None:
            self.counters.redelivered += 1
        _, job.attempt_base = replay_identity(job.nats_headers)
        now = time.time()
        registry = self.registry()
        event_id: str | None = None
        webhook: WebhookDef | None = None
        url: str | None = None
        policy: RetryPolicy = self.cdef.retry
        try:
            limit = registry.delivery.max_payload_bytes
            if len(job.raw) > limit:
                raise Refused("payload_too_large", f"{len(job.raw)} bytes, max_payload_bytes is {limit}")
            env = parse_envelope(job.raw)
            event_id = progress.event_id = env.event_id
            if event_id is not None:
                check_message_id(event_id)
            if env.webhook_id is not None:
                webhook = progress.webhook = registry.webhooks.get(env.webhook_id)
                if webhook is None:
                    raise Refused("unknown_webhook", f"webhook_id {env.webhook_id} is not in rule_webhooks")
                job.webhook_id = webhook.webhook_id
                policy = webhook.policy(self.cdef.retry)
                if not webhook.enabled:
                    why = "webhook disabled" + (
                        f": {webhook.disabled_reason}" if webhook.disabled_reason else ""
                    )
                    await self._defer(job, message_id_of(job, event_id), HELD_SECONDS, why)
                    return
                self.gates.enabled_again(webhook.webhook_id)
            req = build_request(env, webhook, policy=registry.delivery.policy)
            url = progress.url = req.url
        except Refused as refused:
            await self._dead_letter(
                job,
                message_id_of(job, event_id),
                webhook,
                url,
                refused.reason,
                refused.detail,
                now,
                status=None,
                latency=None,
                body=None,
                attempted=False,
            )
            return
        message_id = message_id_of(job, event_id)
        if (
            job.redelivered
            and job.msg is not None
            and job.retry_id is None
            and await self._recorded_before(job, message_id)
        ):
            await self._ack_only(job)
            return
        key: int | str = webhook.webhook_id if webhook is not None else req.url.split("/", 3)[2]
        gate = self.gates.get(key, webhook.limits if webhook is not None else EndpointLimits())
        admission = gate.admit(now, self.cdef.batch_size)
        if not admission.go:
            await self._defer(job, message_id, max(0.0, admission.until - now), admission.why)
            return
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
            await self._defer(job, message_id, max(0.0, closed.until - time.time()), closed.why)
            return
        try:
            sent_at = time.time()
            req = sign_request(req, message_id, webhook.keys if webhook is not None else (), sent_at)
            async with self._http:
                resp = await self.sender.send(req)
        finally:
            await gate.release()
        notes = f"dropped headers: {', '.join(req.dropped_headers)}" if req.dropped_headers else None
        if self.observe_latency is not None and resp.blocked is None:
            self.observe_latency(resp.latency_ms / 1000.0)
        if resp.blocked is not None:
            await self._dead_letter(
                job, message_id, webhook, url, "ssrf_blocked", resp.error or resp.blocked, now,
                status=None, latency=None, body=None, attempted=False,
            )  # fmt: skip
            return
        kind = classify_status(resp.status) if resp.status is not None else "retry"
        attempt_no = job.attempts_done + 1  # counted against the retry policy; rows add attempt_base
        first = job.first_attempt_at if job.first_attempt_at is not None else now
        error = resp.error or (None if kind == "delivered" else f"HTTP {resp.status}")
        retry_after = parse_retry_after(resp.retry_after, now)
        gone = resp.status == 410 and webhook is not None  # a bare URL has no registry row to disable
        gate_kind = (
            "ok" if kind == "delivered" else "gone" if gone else "fail" if kind == "retry" else "neutral"
        )
        events = gate.record(time.time(), gate_kind, resp.status, error, retry_after)
        if events and self.on_endpoint_event is not None:
            self.on_endpoint_event(key, gate, events)
        if kind == "delivered":
            self.counters.delivered += 1
            await self._record(
                job,
                Outcome(
                    attempt=self._attempt_row(
                        job, message_id, webhook, url, attempt_no, "delivered", resp.status, resp.latency_ms,
                        None, None, None, now, notes,
                    ),
                    retry_delete=job.retry_id,
                ),
                message_id,
                url,
            )  # fmt: skip
            return
        self.counters.failed += 1
        if gone:
            # The receiver says the endpoint is gone for good: the endpoint is disabled and the
            # message held with it, to be delivered if someone enables the endpoint again.
            await self._schedule(
                job, message_id, webhook, url, attempt_no, first, resp, "HTTP 410 Gone: endpoint disabled",
                now, now + HELD_SECONDS, notes,
            )  # fmt: skip
            return
        if kind == "permanent":
            reason = "http_3xx_redirect" if resp.status and resp.status < 400 else "http_4xx"
            await self._dead_letter(
                job,
                message_id,
                webhook,
                url,
                reason,
                error or "",
                now,
                status=resp.status,
                latency=resp.latency_ms,
                body=resp.body,
                attempted=True,
                first=first,
                notes=notes,
            )
            return
        decision = decide(attempt_no, first, now, policy, retry_after, self._rand)
        if not decision.retry:
            await self._dead_letter(
                job,
                message_id,
                webhook,
                url,
                "retries_exhausted",
                f"{error}; {decision.reason}",
                now,
                status=resp.status,
                latency=resp.latency_ms,
                body=resp.body,
                attempted=True,
                first=first,
                notes=notes,
            )
            return
        await self._schedule(
            job, message_id, webhook, url, attempt_no, first, resp, error, now, now + decision.delay, notes
        )

    async def _schedule(
        self,
        job: Job,
        message_id: str,
        webhook: WebhookDef | None,
        url: str | None,
        attempt_no: int,
        first: float,
        resp: Any,
        error: str | None,
        now: float,
        next_ts: float,
        notes: str | None,
    ) -> None:
        """Record a failed attempt and schedule the next one in rule_nats_retries."""
        self.counters.scheduled += 1
        next_at = utc(next_ts)
        attempt = self._attempt_row(
            job,
            message_id,
            webhook,
            url,
            attempt_no,
            "retry",
            resp.status,
            resp.latency_ms,
            error,
            resp.body,
            next_at,
            now,
            notes,
        )
        if job.retry_id is not None:
            outcome = Outcome(attempt=attempt, retry_update=(job.retry_id, attempt_no, next_at, error))
        else:
            outcome = Outcome(
                attempt=attempt,
                retry_insert=self._retry_row(job, message_id, attempt_no, first, error, next_at),
            )
        await self._record(job, outcome, message_id, url)

    async def _recorded_before(self, job: Job, message_id: str) -> bool:
        """Has this redelivered message an outcome already? Asked until PostgreSQL answers: "cannot
        tell" is not "no" (answering "no" during an outage sent a message nine times). The message
        stays held and alive meanwhile, and is not sent."""
        pending = self._uncommitted.get(job.seq) if job.seq is not None else None
        if pending is not None and await asyncio.shield(pending):
            return True  # this worker's own outcome for it was waiting for its COMMIT
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

    def _attempt_row(
        self,
        job: Job,
        message_id: str,
        webhook: WebhookDef | None,
        url: str | None,
        attempt: int,
        outcome: str,
        status: int | None,
        latency: float | None,
        error: str | None,
        body: str | None,
        next_at: Any,
        now: float,
        notes: str | None = None,
    ) -> tuple[Any, ...]:
        return (
            utc(now),
            message_id,
            job.stream,
            job.consumer,
            job.seq,
            job.subject,
            webhook.webhook_id if webhook is not None else None,
            url,
            job.attempt_base + attempt,
            outcome,
            status,
            latency,
            error,
            body,
            next_at,
            self.worker_name,
            notes,
        )

    def _retry_row(
        self, job: Job, message_id: str, attempts: int, first: float, error: str | None, next_at: Any
    ) -> tuple[Any, ...]:
        # storable first: json.dumps would write NUL or a lone surrogate as an escape jsonb refuses.
        headers = None if job.nats_headers is None else json.dumps(storable(job.nats_headers))
        return (
            message_id,
            job.stream,
            job.consumer,
            job.seq,
            job.subject,
            job.raw,
            headers,
            attempts,
            utc(first),
            error,
            next_at,
            job.webhook_id,
        )

    async def _defer(self, job: Job, message_id: str, delay: float, why: str) -> None:
        """Wait without burning an attempt: the message goes to (or stays in) the retry table."""
        self.counters.deferred += 1
        next_at = utc(time.time() + delay)
        if job.retry_id is not None:
            outcome = Outcome(retry_update=(job.retry_id, job.attempts_done, next_at, None))
        else:
            first = job.first_attempt_at if job.first_attempt_at is not None else time.time()
            outcome = Outcome(
                retry_insert=self._retry_row(
                    job, message_id, job.attempts_done, first, f"deferred: {why}", next_at
                )
            )
        await self._record(job, outcome, message_id)

    async def _dead_letter(
        self,
        job: Job,
        message_id: str,
        webhook: WebhookDef | None,
        url: str | None,
        reason: str,
        error: str,
        now: float,
        *,
        status: int | None,
        latency: float | None,
        body: str | None,
        attempted: bool,
        first: float | None = None,
        notes: str | None = None,
    ) -> None:
        self.counters.dead_lettered += 1
        self.counters.dead_letter_reasons[reason] = self.counters.dead_letter_reasons.get(reason, 0) + 1
        if not attempted:
            self.counters.failed += 1
        attempts = job.attempts_done + (1 if attempted else 0)
        first_at = first if first is not None else (job.first_attempt_at or now)
        logger.debug("dead letter %s: %s %s", message_id, reason, error, extra={"action": "dead_letter"})
        await self._record(
            job,
            Outcome(
                attempt=self._attempt_row(
                    job,
                    message_id,
                    webhook,
                    url,
                    max(1, attempts),
                    "dead_letter",
                    status,
                    latency,
                    f"{reason}: {error}",
                    body,
                    None,
                    now,
                    notes,
                ),
                dead_letter=DeadLetter(
                    message_id=message_id,
                    stream_name=job.stream,
                    consumer_name=job.consumer,
                    stream_seq=job.seq,
                    subject=job.subject,
                    webhook_id=webhook.webhook_id if webhook is not None else None,
                    url=url,
                    message_raw=job.raw,
                    message_headers=job.nats_headers,
                    reason=reason,
                    error=error,
                    attempts=job.attempt_base + attempts,
                    first_attempt_at=utc(first_at) if attempted or job.first_attempt_at else None,
                    last_attempt_at=utc(now) if attempted else None,
                ),
                retry_delete=job.retry_id,
            ),
            message_id,
            url,
        )

    async def _ack_only(self, job: Job) -> None:
        msg = job.msg
        assert msg is not None
        job.recorded = True  # the outcome is in PostgreSQL already
        try:
            await msg.ack()
        except Exception as exc:  # redelivered and acknowledged again: harmless
            logger.debug("ack failed: %s", exc)
            return
        finally:
            self._release(job)
        self.counters.acked += 1

    async def _record(self, job: Job, outcome: Outcome, message_id: str, url: str | None = None) -> None:
        started = job.received
        msg = job.msg

        async def after_commit() -> None:
            if msg is not None:
                try:
                    await msg.ack()
                finally:
                    self._release(job)
                self.counters.acked += 1
            self.counters.processed += 1
            self.counters.processing_ms += (time.perf_counter() - started) * 1000.0
            if self.stats_due is not None and self.counters.processed % 100 == 0:
                self.stats_due.set()

        source = Source(
            message_id, job.stream, job.consumer, job.seq, job.subject, job.raw, job.nats_headers,
            job.webhook_id, url,
        )  # fmt: skip
        committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settled(ok: bool) -> None:
            if not committed.done():
                committed.set_result(ok)

        job.recorded = True
        key = job.seq if msg is not None else None
        if key is not None:
            self._uncommitted[key] = committed
        self._committing += 1
        self._wake.set()  # its delivery slot is free for the next message (see pull_size)
        try:
            await self.recorder.submit(
                # Built directly, not with dataclasses.replace (3 us a call): this runs for every message.
                Outcome(
                    attempt=outcome.attempt,
                    dead_letter=outcome.dead_letter,
                    retry_insert=outcome.retry_insert,
                    retry_update=outcome.retry_update,
                    retry_delete=outcome.retry_delete,
                    release_webhooks=outcome.release_webhooks,
                    after_commit=after_commit,
                    source=source,
                    settled=settled,
                )
            )
            if self._committing >= self.in_flight:
                self.recorder.flush_now()  # every slot waits for the COMMIT: nothing more is coming
            # The slot stays taken (no new message is fetched for it) and the message alive until the
            # outcome is committed: while PostgreSQL is away the worker holds what it has and takes
            # nothing more.
            await asyncio.shield(committed)
        finally:
            self._committing -= 1
            if key is not None and self._uncommitted.get(key) is committed:
                del self._uncommitted[key]
