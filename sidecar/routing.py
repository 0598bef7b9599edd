"""Routing by subject: a message that names no endpoint goes to the webhooks registered on its subject.

rule-engine-postgres users publish plain payloads to a webhook's ``nats_subject``
(``rule_nats_publish('webhooks.orders', ...)``, ``rule_nats_publish_on_commit``, a subject-only
``rule_nats_table_trigger``). Such a message has neither ``webhook_url`` nor ``webhook_id``: it is
delivered to every enabled, NATS-enabled webhook whose ``nats_subject`` is the message's subject,
one copy per webhook, each with its own attempt rows, retries, dead letter, signature and
``webhook-id`` (``routed_id``). The NATS message is acknowledged once every copy's outcome is
committed (``FanOut``); should one copy be handed back or abandoned, the message is handed back
(nak) once the others are settled, and its redelivery sends only the copies without an outcome.

Messages that name their endpoint (the common case) never get here: the consumer fans out only a
message whose preparation found no endpoint, so they pay nothing for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sidecar.identity import replay_identity
from sidecar.registry import Registry, WebhookDef

logger = logging.getLogger(__name__)

MAX_ID = 256  # message ids (webhook-id) are 1-256 characters


def targets(registry: Registry, subject: str) -> tuple[WebhookDef, ...]:
    """The webhooks a message on ``subject`` goes to, by webhook_id. A webhook the worker disabled
    (HTTP 410, days of failures) is included: its copy is held like its other messages; one a DBA
    disabled is not."""
    return on_subject((w for _, w in sorted(registry.webhooks.items())), subject)


def on_subject(webhooks: Iterable[WebhookDef], subject: str) -> tuple[WebhookDef, ...]:
    """``targets`` among ``webhooks`` (in the order given): also for rows read from PostgreSQL
    when the registry in memory has none on the subject (``sidecar.lookup``)."""
    return tuple(
        w
        for w in webhooks
        if w.nats_subject == subject and w.nats_enabled and (w.enabled or w.disabled_reason is not None)
    )


def routed_id(base: str, webhook_id: int | None) -> str:
    """The message id of one webhook's copy: ``<id>@<webhook_id>`` (its webhook-id and the
    message_id its rows are recorded under), within the 256 characters a message id may have."""
    suffix = f"@{webhook_id}"
    if base.endswith(suffix):
        return base  # a replayed dead letter of this copy: the same message to the receiver
    return base[: MAX_ID - len(suffix)] + suffix


def replayed_copy(headers: dict[str, str] | None, candidates: tuple[WebhookDef, ...]) -> WebhookDef | None:
    """A replayed dead letter of one webhook's copy goes to that webhook only, not to all again."""
    original, _ = replay_identity(headers)
    if not original or "@" not in original:
        return None
    tail = original.rsplit("@", 1)[1]
    return next((w for w in candidates if str(w.webhook_id) == tail), None)


def no_route_error(subject: str) -> str:
    return (
        f"no enabled webhook has nats_subject {subject!r}, and the message has neither webhook_url nor "
        "webhook_id (register one: INSERT INTO rule_webhooks (webhook_name, url, nats_subject) ...)"
    )


class FanOut:
    """One NATS message delivered as several copies: acknowledged once all are settled."""

    def __init__(self, msg: Any, copies: int, on_settled: Callable[[bool], None]) -> None:
        self.msg = msg
        self.left = copies
        self.all_acked = True
        self.on_settled = on_settled  # called once, with whether the message was acknowledged

    def child(self) -> ChildMsg:
        return ChildMsg(self)

    async def _settle(self, acked: bool) -> None:
        self.all_acked = self.all_acked and acked
        self.left -= 1
        if self.left > 0:
            return
        try:
            if self.all_acked:
                await self.msg.ack()
            else:
                with contextlib.suppress(Exception):  # unacknowledged anyway: back after the ack wait
                    await self.msg.nak()
        finally:
            self.on_settled(self.all_acked)


class ChildMsg:
    """What one copy acknowledges: its share of the NATS message (once; later calls do nothing)."""

    __slots__ = ("group", "settled")

    def __init__(self, group: FanOut) -> None:
        self.group = group
        self.settled = False

    def _once(self, acked: bool) -> Awaitable[None] | None:
        if self.settled:
            return None
        self.settled = True
        return self.group._settle(acked)

    async def ack(self) -> None:
        step = self._once(True)
        if step is not None:
            await step

    async def nak(self, *_: Any, **__: Any) -> None:
        step = self._once(False)
        if step is not None:
            await step

    async def in_progress(self) -> None:
        await self.group.msg.in_progress()

    def abandon(self) -> Awaitable[None] | None:
        """The copy's task ended without an outcome (cancelled at shutdown): hand the message back."""
        return self._once(False)
