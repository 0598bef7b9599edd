"""The life of one message, and every decision in it, without I/O.

    received -> prepared -> gated -> sent -> classified -> recorded -> acknowledged

* **received** (``sidecar.intake``): a JetStream message or a due retry-table row becomes a ``Job``.
* **prepared** (``prepare`` here): its envelope parsed and checked, its endpoint looked up, its
  request built; or a verdict at once (a dead letter for what can never be delivered, a deferral
  for a disabled endpoint).
* **gated** (``sidecar.endpoints``): the endpoint's rate limit, concurrency and circuit admit it,
  or it is deferred.
* **sent** (``sidecar.delivery.Sender``): one HTTP attempt.
* **classified** (``classify`` here): delivered, retried later, held, or dead-lettered.
* **recorded** (``outcome_of`` here builds the rows, ``sidecar.recorder`` commits them) and
  **acknowledged** to NATS only after that COMMIT.

``sidecar.driver.Driver.run`` performs the steps in this order, one function per stage. A
message whose handling raises anything unforeseen ends as an ``internal_error`` dead letter.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar.delivery import (
    Refused,
    Request,
    Response,
    build_request,
    check_message_id,
    classify_status,
    parse_envelope,
)
from sidecar.endpoints import HELD_SECONDS, EndpointLimits
from sidecar.identity import replay_identity
from sidecar.masking import mask, secret_values
from sidecar.outcome import Outcome, utc
from sidecar.poison import storable
from sidecar.registry import Registry, RetryPolicy, WebhookDef
from sidecar.retry import decide, parse_retry_after
from sidecar.routing import routed_id
from sidecar.rows import AttemptRow, DeadLetter, RetryRow, RetryUpdate, Source
from sidecar.validation import own_message_id

if TYPE_CHECKING:
    from nats.aio.msg import Msg

INTERNAL_ERROR = "internal_error"
GONE_ERROR = "HTTP 410 Gone: endpoint disabled"


@dataclass(slots=True)
class Job:
    """One message on its way: from JetStream (``msg`` set) or from the retry table (``retry_id``)."""

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
    # Its outcome went to the recorder (or, routed by subject, to its copies): the catch-all must
    # not record a second one, and a task that ends before it lets the message go unacknowledged.
    recorded: bool = False
    client: Any = None  # the NATS connection the message arrived on: the one that acknowledges it
    touched: float = field(default_factory=time.monotonic)  # received or last said to be in progress
    attempt_base: int = 0  # attempts made before a replay: attempt numbers go on from there
    send_slot: asyncio.Semaphore | None = None  # held from just before the send until the COMMIT
    lane: int | str | None = None  # its endpoint's turn in the bulkhead, held until the response
    # What is known so far: the catch-all's dead letter names what it can.
    event_id: str | None = None
    webhook: WebhookDef | None = None
    url: str | None = None
    routed: bool = False  # one webhook's copy of a message routed by subject (sidecar.routing)

    @property
    def message_id(self) -> str:
        """The message's identity (the webhook-id receivers see, the message_id it is recorded
        under): the publisher's event id, else the original id of a replayed dead letter, else the
        Nats-Msg-Id, else the stream and sequence (stream-<stream>-<seq>), which also replaces an id
        that breaks the message-id rules (validation.own_message_id); a routed copy's adds its
        webhook (routing.routed_id)."""
        if self.routed:
            return routed_id(self._base_id(), self.webhook_id)
        return self._base_id()

    def _base_id(self) -> str:
        if self.event_id:
            return own_message_id(self.event_id, self.stream, self.seq)
        if self.nats_headers:
            original, _ = replay_identity(self.nats_headers)
            if original:
                return own_message_id(original, self.stream, self.seq, replayed=True)
            return own_message_id(self.nats_headers.get("Nats-Msg-Id"), self.stream, self.seq)
        return own_message_id(None, self.stream, self.seq)


# -- verdicts: what becomes of the message -------------------------------------------------------


@dataclass(slots=True)
class Delivered:
    status: int
    latency_ms: float


@dataclass(slots=True)
class Retry:
    """A failed attempt; the next one at ``next_ts`` (from the retry table)."""

    next_ts: float
    error: str | None
    status: int | None
    latency_ms: float | None
    body: str | None


@dataclass(slots=True)
class Defer:
    """Not attempted now (endpoint disabled, rate limit, open circuit): wait without using an attempt."""

    delay: float
    why: str


@dataclass(slots=True)
class Dead:
    """Dead-lettered: never deliverable as it is, or out of attempts."""

    reason: str
    error: str
    attempted: bool  # an HTTP attempt was made (it counts, and its response is kept)
    status: int | None = None
    latency_ms: float | None = None
    body: str | None = None
    unknown_webhook: int | None = None  # reason unknown_webhook: the webhook_id the registry lacked


@dataclass(frozen=True, slots=True)
class AlreadyRecorded:
    """A redelivered message whose outcome PostgreSQL has: acknowledge it, do not send it again."""


@dataclass(frozen=True, slots=True)
class HandBack:
    """The worker is stopping and has not sent the message: hand it back to JetStream (nak), which
    gives it to another worker at once. Nothing is recorded: nothing happened to it."""


Verdict = Delivered | Retry | Defer | Dead | AlreadyRecorded | HandBack


@dataclass(slots=True)
class Prepared:
    request: Request
    webhook: WebhookDef | None
    policy: RetryPolicy
    gate_key: int | str  # the endpoint: its registry id, or the host of a bare URL
    limits: EndpointLimits


def prepare(job: Job, registry: Registry, default_policy: RetryPolicy) -> Prepared | Dead | Defer:
    """received -> prepared: the message checked and its request built, or a verdict at once.
    Fills in ``job.event_id``, ``job.webhook``, ``job.webhook_id`` and ``job.url`` as it learns them."""
    _, job.attempt_base = replay_identity(job.nats_headers)
    try:
        limit = registry.delivery.max_payload_bytes
        if len(job.raw) > limit:
            raise Refused("payload_too_large", f"{len(job.raw)} bytes, max_payload_bytes is {limit}")
        # A routed copy, or its retry from the retry table (webhook_id kept there): its endpoint is
        # the registry's, the message names none.
        routed = job.routed or (job.retry_id is not None and job.webhook_id is not None)
        env = parse_envelope(job.raw, routed)
        if routed and env.webhook_url is None and env.webhook_id is None:
            job.routed = True
            env.webhook_id = job.webhook_id
        job.event_id = env.event_id
        if env.event_id is not None:
            check_message_id(env.event_id)
        webhook: WebhookDef | None = None
        policy = default_policy
        if env.webhook_id is not None:
            webhook = registry.webhooks.get(env.webhook_id)
            if webhook is None and job.webhook is not None and job.webhook.webhook_id == env.webhook_id:
                webhook = job.webhook  # a routed copy for a webhook read from PostgreSQL (routing)
            job.webhook = webhook
            if webhook is None:
                detail = f"webhook_id {env.webhook_id} is not in rule_webhooks"
                return Dead("unknown_webhook", detail, attempted=False, unknown_webhook=env.webhook_id)
            job.webhook_id = webhook.webhook_id
            policy = webhook.policy(default_policy)
            if not webhook.enabled:
                why = "webhook disabled" + (f": {webhook.disabled_reason}" if webhook.disabled_reason else "")
                return Defer(HELD_SECONDS, why)
        req = build_request(env, webhook, policy=registry.delivery.policy)
    except Refused as refused:
        return Dead(refused.reason, refused.detail, attempted=False)
    job.url = req.url
    if webhook is not None:
        return Prepared(req, webhook, policy, webhook.webhook_id, webhook.limits)
    return Prepared(req, None, policy, req.url.split("/", 3)[2], EndpointLimits())


@dataclass(slots=True)
class Classified:
    verdict: Delivered | Retry | Dead
    gate: str | None  # what the endpoint's gate records (ok | fail | gone | neutral); None: nothing
    error: str | None  # the attempt's error, for the gate and the logs
    retry_after: float | None  # the endpoint asked for this pause (Retry-After), in seconds


def classify(
    resp: Response,
    job: Job,
    prepared: Prepared,
    now: float,
    rand: random.Random | None = None,
) -> Classified:
    """sent -> classified: what the response means for the message and for its endpoint."""
    if resp.body or resp.error:
        # The endpoint may echo the request: the webhook's secrets are not recorded (masking.py).
        secrets = secret_values(
            prepared.request.headers, prepared.webhook.headers if prepared.webhook else ()
        )
        resp.body, resp.error = mask(resp.body, secrets), mask(resp.error, secrets)
    if resp.blocked is not None:
        # The policy refused the address the name resolved to: permanent, and nothing was sent.
        return Classified(Dead("ssrf_blocked", resp.error or resp.blocked, attempted=False), None, None, None)
    kind = classify_status(resp.status) if resp.status is not None else "retry"
    error = resp.error or (None if kind == "delivered" else f"HTTP {resp.status}")
    retry_after = parse_retry_after(resp.retry_after, now)
    if kind == "delivered":
        assert resp.status is not None
        return Classified(Delivered(resp.status, resp.latency_ms), "ok", None, retry_after)
    if resp.status == 410 and prepared.webhook is not None:
        # The receiver says the endpoint is gone for good: the endpoint is disabled and the message
        # held with it, to be delivered if someone enables the endpoint again. (A bare URL has no
        # registry row to disable: a 410 there is a permanent 4xx.)
        held = Retry(now + HELD_SECONDS, GONE_ERROR, resp.status, resp.latency_ms, resp.body)
        return Classified(held, "gone", error, retry_after)
    if kind == "permanent":
        assert resp.status is not None
        reason = "http_3xx_redirect" if resp.status < 400 else "http_4xx"
        dead = Dead(
            reason,
            error or "",
            attempted=True,
            status=resp.status,
            latency_ms=resp.latency_ms,
            body=resp.body,
        )
        return Classified(dead, "neutral", error, retry_after)
    first = job.first_attempt_at if job.first_attempt_at is not None else now
    decision = decide(job.attempts_done + 1, first, now, prepared.policy, retry_after, rand)
    if not decision.retry:
        dead = Dead(
            "retries_exhausted",
            f"{error}; {decision.reason}",
            attempted=True,
            status=resp.status,
            latency_ms=resp.latency_ms,
            body=resp.body,
        )
        return Classified(dead, "fail", error, retry_after)
    return Classified(
        Retry(now + decision.delay, error, resp.status, resp.latency_ms, resp.body),
        "fail",
        error,
        retry_after,
    )


# -- classified -> recorded: the rows of an outcome ------------------------------------------------


def outcome_of(
    job: Job,
    verdict: Verdict,
    now: float,
    worker: str,
    notes: str | None = None,
    *,
    source: Source | None = None,
) -> Outcome:
    """The rows that record ``verdict`` for ``job`` (attempt, retry-table change, dead letter); the
    recorder writes them in one transaction. Nothing for an outcome recorded already. (One Outcome
    per message, built once: this runs for each.)"""
    message_id = job.message_id
    webhook_id = job.webhook.webhook_id if job.webhook is not None else None
    attempt_no = job.attempts_done + 1  # counted against the retry policy; rows add attempt_base
    first = job.first_attempt_at if job.first_attempt_at is not None else now

    def attempt(n: int, kind: str, status: int | None, latency: float | None, error: str | None,
                body: str | None, next_ts: float | None) -> AttemptRow:  # fmt: skip
        return AttemptRow(
            attempted_at=utc(now),
            message_id=message_id,
            stream_name=job.stream,
            consumer_name=job.consumer,
            stream_seq=job.seq,
            subject=job.subject,
            webhook_id=webhook_id,
            url=job.url,
            attempt=job.attempt_base + n,
            outcome=kind,
            http_status=status,
            latency_ms=latency,
            error=error,
            response_body=body,
            next_attempt_at=None if next_ts is None else utc(next_ts),
            worker_name=worker,
            notes=notes,
        )

    if isinstance(verdict, Delivered):
        row = attempt(attempt_no, "delivered", verdict.status, verdict.latency_ms, None, None, None)
        return Outcome(attempt=row, retry_delete=job.retry_id, source=source)
    if isinstance(verdict, Retry):
        row = attempt(attempt_no, "retry", verdict.status, verdict.latency_ms, verdict.error, verdict.body,
                      verdict.next_ts)  # fmt: skip
        change = _retry_change(job, message_id, first, attempt_no, verdict.error, verdict.next_ts)
        return _rescheduled(change, row, source)
    if isinstance(verdict, Defer):
        why = None if job.retry_id is not None else f"deferred: {verdict.why}"
        change = _retry_change(job, message_id, first, job.attempts_done, why, now + verdict.delay)
        return _rescheduled(change, None, source)
    if isinstance(verdict, Dead):
        attempts = job.attempts_done + (1 if verdict.attempted else 0)
        row = attempt(
            max(1, attempts), "dead_letter", verdict.status, verdict.latency_ms,
            f"{verdict.reason}: {verdict.error}", verdict.body, None,
        )  # fmt: skip
        dead = _dead_letter(job, verdict, message_id, webhook_id, job.attempt_base + attempts, first, now)
        return Outcome(attempt=row, dead_letter=dead, retry_delete=job.retry_id, source=source)
    return Outcome(source=source)


def _retry_change(
    job: Job, message_id: str, first: float, attempts: int, error: str | None, next_ts: float
) -> RetryRow | RetryUpdate:
    """A new schedule for the retry-table row the job came from, or the row it gets."""
    if job.retry_id is not None:
        return RetryUpdate(job.retry_id, attempts, utc(next_ts), error)
    # storable first: json.dumps would write NUL or a lone surrogate as an escape jsonb refuses.
    headers = None if job.nats_headers is None else json.dumps(storable(job.nats_headers))
    return RetryRow(
        message_id, job.stream, job.consumer, job.seq, job.subject, job.raw, headers, attempts,
        utc(first), error, utc(next_ts), job.webhook_id,
    )  # fmt: skip


def _rescheduled(change: RetryRow | RetryUpdate, row: AttemptRow | None, source: Source | None) -> Outcome:
    if isinstance(change, RetryUpdate):
        return Outcome(attempt=row, retry_update=change, source=source)
    return Outcome(attempt=row, retry_insert=change, source=source)


def _dead_letter(
    job: Job, verdict: Dead, message_id: str, webhook_id: int | None, attempts: int, first: float, now: float
) -> DeadLetter:
    return DeadLetter(
        message_id=message_id,
        stream_name=job.stream,
        consumer_name=job.consumer,
        stream_seq=job.seq,
        subject=job.subject,
        webhook_id=webhook_id,
        url=job.url,
        message_raw=job.raw,
        message_headers=job.nats_headers,
        reason=verdict.reason,
        error=verdict.error,
        attempts=attempts,
        first_attempt_at=utc(first) if verdict.attempted or job.first_attempt_at else None,
        last_attempt_at=utc(now) if verdict.attempted else None,
    )
