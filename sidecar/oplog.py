"""The log lines an operator reads instead of SQL: every dead letter, every retry scheduled and every
circuit change of an endpoint, each with the message id, the endpoint and the reason.

Dead letters and circuit changes are WARNING (something an operator may have to act on); a retry
scheduled is INFO (the worker handles it). In JSON logs the same facts are fields too:
``message_id``, ``endpoint``, ``reason`` (and ``action``: dead_letter, retry_scheduled,
circuit_opened, circuit_closed).
"""

from __future__ import annotations

import logging
import time

from sidecar.lifecycle import Dead, Job, Retry, Verdict
from sidecar.validation import redact_url

logger = logging.getLogger(__name__)

CIRCUIT_EVENTS = {"opened": "circuit_opened", "closed": "circuit_closed"}


def endpoint_of(job: Job) -> str:
    """The webhook's name when it is registered, else the URL (no credentials, no query)."""
    if job.webhook is not None:
        return job.webhook.webhook_name
    if job.url:
        return redact_url(job.url)
    return "-"


def retry_reason(verdict: Retry) -> str:
    if verdict.error:
        return verdict.error
    return f"HTTP {verdict.status}" if verdict.status is not None else "failed"


def log_outcome(job: Job, verdict: Verdict, now: float | None = None) -> None:
    """One line for a dead letter (WARNING) or a retry scheduled (INFO); nothing for a delivery."""
    endpoint = endpoint_of(job)
    mid = job.message_id or "-"
    if isinstance(verdict, Dead):
        logger.warning(
            "dead letter: message %s for %s: %s (%s)",
            mid,
            endpoint,
            verdict.reason,
            verdict.error,
            extra={
                "action": "dead_letter",
                "message_id": mid,
                "endpoint": endpoint,
                "reason": verdict.reason,
            },
        )
    elif isinstance(verdict, Retry):
        reason = retry_reason(verdict)
        wait = max(0.0, verdict.next_ts - (time.time() if now is None else now))
        logger.info(
            "retry scheduled: message %s for %s in %.1f s: %s",
            mid,
            endpoint,
            wait,
            reason,
            extra={"action": "retry_scheduled", "message_id": mid, "endpoint": endpoint, "reason": reason},
        )


def log_circuit(job: Job, events: list[str], error: str | None, status: int | None) -> None:
    """A WARNING per circuit change the attempt for ``job`` caused (opened or closed)."""
    endpoint = endpoint_of(job)
    mid = job.message_id or "-"
    for event in events:
        action = CIRCUIT_EVENTS.get(event)
        if action is None:
            continue
        if event == "opened":
            reason = error or (f"HTTP {status}" if status is not None else "failures")
        else:
            reason = f"a request succeeded (HTTP {status})" if status is not None else "a request succeeded"
        logger.warning(
            "circuit %s for %s (message %s): %s",
            event,
            endpoint,
            mid,
            reason,
            extra={"action": action, "message_id": mid, "endpoint": endpoint, "reason": reason},
        )
