"""received: how a consumer's messages reach it, from JetStream and from the retry table.

Fetching is continuous and bounded: pull requests keep at most two windows of ``batch_size`` held
(``sidecar.backpressure.pull_size``): one sent and waiting for the COMMIT, one fetched ahead and
unsent, so a send slot given back is used at once, and nothing is held that could not be sent
within the ack wait (the original worker buffered more than it could finish and sent 44% of
messages twice). Due retries are claimed from PostgreSQL into the same window. Every message held
is told to JetStream to be in progress until its outcome is committed. What happens to a
message once received is ``sidecar.driver``'s (see ``sidecar.lifecycle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from sidecar.backpressure import keepalive_due, keepalive_interval, pull_size, retry_room
from sidecar.lifecycle import Job
from sidecar.queries import query
from sidecar.recorder import Recorder
from sidecar.registry import ConsumerDef

logger = logging.getLogger(__name__)

PULL_EXPIRES = 5.0  # seconds a pull request waits on the server for messages
RETRY_LEASE = 600.0  # seconds a retry is reserved for the worker attempting it


class Intake:
    """The receiving side of one consumer: its subscription, pull requests, retry claims, the set of
    messages it holds and their in-progress signals. Each message received goes to ``take`` (the
    consumer's); ``parked`` says how many held messages will not be sent from the window."""

    def __init__(
        self,
        cdef: ConsumerDef,
        client: NatsClient,
        recorder: Recorder,
        claim: Callable[[int], Awaitable[list[Job]]],
        take: Callable[[Job], None],
        parked: Callable[[], int],
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.cdef = cdef
        self.client = client
        self.recorder = recorder
        self.claim = claim  # up to n due retries from PostgreSQL (claim_retries)
        self.take = take
        self.parked = parked
        self.on_closed = on_closed  # our client is closed: the worker moves us to a new one
        self.outstanding = 0  # messages requested from JetStream and not yet received
        # Progress of each loop (pull requests, retry claims, keep-alive rounds), for supervision.
        self.pulls = self.claims = self.rounds = 0
        self._last_pull_activity = time.monotonic()
        self.wake = asyncio.Event()  # something changed: fetch now if there is room
        self.stopping = False
        self._sub: Any = None
        self._inbox = ""
        self._closed_noted = False
        # Messages not yet acknowledged (nor handed back), per id() of the connection they came on.
        self._held_by_client: dict[int, int] = {}
        # Subscriptions of connections replaced by rebind(), kept until their pull requests expire.
        self._old_subs: list[tuple[NatsClient, Any]] = []
        self.aux: set[asyncio.Future[None]] = set()  # short steps run on their own (unsubscribe, nak)
        # Messages held (received, not yet committed and acknowledged), kept alive in JetStream.
        self.held: dict[int, Job] = {}

    @property
    def in_flight(self) -> int:
        """Messages held: from their arrival until their outcome is committed."""
        return len(self.held)

    @property
    def name(self) -> str:
        return f"{self.cdef.stream_name}/{self.cdef.consumer_name}"

    def keep(self, job: Job) -> None:
        """Hold the message, and keep it alive in JetStream, until ``let_go``."""
        self.held[id(job)] = job

    def let_go(self, job: Job) -> None:
        self.held.pop(id(job), None)
        self.wake.set()

    def run_aside(self, step: Awaitable[None]) -> None:
        """A short step that must not hold up its caller (handing a message back); cancelled at stop."""
        task = asyncio.ensure_future(step)
        self.aux.add(task)
        task.add_done_callback(self.aux.discard)

    async def subscribe(self) -> None:
        self._inbox, self._sub = await self._subscribe(self.client)

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

    def pulls_lost(self) -> None:
        """Our NATS connection is back after a disconnect: the pull requests open before it may have
        gone with the server (a restart forgets them). Ask again now rather than after
        PULL_EXPIRES + 2 s of silence (a 7 s gap after a NATS restart). Should they still be alive,
        at most one more window is fetched ahead, held unsent and kept alive like the rest."""
        self.outstanding = 0
        self._last_pull_activity = time.monotonic()
        self.wake.set()

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
            self.run_aside(self._unsubscribe_later(old_client, old_sub))
        self.wake.set()
        logger.info(
            "consumer %s moved to the new NATS connection (%d deliveries finish on the old one)",
            self.name,
            self._held_by_client.get(id(old_client), 0),
            extra={"action": "consumer_rebound"},
        )

    async def close(self, deadline: float) -> None:
        """Let go of the subscriptions. Messages still arriving for our pull requests are handed
        back at once (see _on_message): wait briefly for them so they are not left to the ack wait
        (not while NATS is unreachable: nothing can arrive then, and SIGTERM would wait for nothing)."""
        until = min(deadline, time.monotonic() + 1.0)
        while self.outstanding > 0 and self.client.is_connected and time.monotonic() < until:  # noqa: ASYNC110 - polled counter, no event
            await asyncio.sleep(0.05)
        for task in list(self.aux):
            task.cancel()
        for _, sub in [*self._old_subs, (self.client, self._sub)]:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._old_subs.clear()

    async def _unsubscribe_later(self, client: NatsClient, sub: Any) -> None:
        try:
            await asyncio.sleep(PULL_EXPIRES + 1.0)  # the old pull requests have expired by then
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        finally:
            with contextlib.suppress(ValueError):
                self._old_subs.remove((client, sub))

    def hold(self, job: Job) -> None:
        """The message came on ``job.client``: that connection stays open until ``release``."""
        self._held_by_client[id(job.client)] = self._held_by_client.get(id(job.client), 0) + 1

    def release(self, job: Job) -> None:
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

    # -- fetching ------------------------------------------------------------------

    async def feed(self) -> None:
        """Ask JetStream for messages whenever the window has room (see backpressure.pull_size)."""
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.cdef.stream_name}.{self.cdef.consumer_name}"
        paused = False
        while not self.stopping:
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
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)
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
            free = pull_size(self.cdef.batch_size, self.in_flight, self.outstanding, failing, self.parked())
            if free > 0:
                body = json.dumps({"batch": free, "expires": int(PULL_EXPIRES * 1e9)}).encode()
                client, inbox = self.client, self._inbox
                try:
                    await client.publish(subject, body, reply=inbox)
                    if client is self.client:  # not rebound meanwhile
                        self.outstanding += free
                    self.pulls += 1
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
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)

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
            self.wake.set()
            return
        self.outstanding = max(0, self.outstanding - 1)
        if self.stopping:
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
        self.hold(job)
        self.take(job)

    async def pump_retries(self) -> None:
        """Feed due retries from PostgreSQL into the same delivery slots."""
        while not self.stopping:
            # Pull requests waiting on the server hold the fetch window even when the stream is idle,
            # so retries count only messages actually held; the send slots keep the bound on what is sent.
            free = retry_room(self.cdef.batch_size, self.in_flight, self.recorder.failing)
            jobs: list[Job] = []
            if free > 0:
                try:
                    jobs = await self.claim(free)
                except Exception as exc:
                    logger.warning(
                        "reading due retries failed: %s", exc, extra={"action": "retry_claim_failed"}
                    )
            self.claims += 1
            for job in jobs:
                self.take(job)
            if len(jobs) < free or free <= 0:
                await asyncio.sleep(0.25)

    async def keep_alive(self) -> None:
        """Tell JetStream that every held message is in progress, well within its ack wait, from the
        moment it arrives until its outcome is committed: waiting for an endpoint's rate limit or
        concurrency gate, for a slow response or for PostgreSQL must not hand it to a second worker."""
        while True:
            interval = keepalive_interval(self.cdef.ack_wait_seconds)
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            self.rounds += 1
            for job in list(self.held.values()):
                if job.msg is None or not keepalive_due(job.touched, now, interval):
                    continue
                job.touched = now
                try:
                    await job.msg.in_progress()
                except Exception as exc:  # acknowledged meanwhile, or NATS away: JetStream decides
                    logger.debug("in-progress signal failed: %s", exc)


async def claim_retries(
    pool: AsyncConnectionPool[Any], cdef: ConsumerDef, worker: str, limit: int
) -> list[Job]:
    """Up to ``limit`` due retries of the consumer, leased to ``worker`` for RETRY_LEASE seconds."""
    params = {
        "lease": RETRY_LEASE,
        "worker": worker,
        "stream": cdef.stream_name,
        "consumer": cdef.consumer_name,
        "limit": limit,
    }
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(query("retries_claim"), params)
        rows = await cur.fetchall()
    return [
        Job(
            raw=bytes(r["message_raw"]),
            nats_headers=r["message_headers"],
            stream=cdef.stream_name,
            consumer=cdef.consumer_name,
            seq=r["stream_seq"],
            subject=r["subject"],
            attempts_done=int(r["attempts"]),
            first_attempt_at=float(r["first_attempt_at"]),
            retry_id=int(r["retry_id"]),
            webhook_id=r["webhook_id"],
        )
        for r in rows
    ]
