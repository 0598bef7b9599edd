"""Routing by subject (pure): which webhooks a message goes to, its copies' ids, the shared ack."""

from __future__ import annotations

import asyncio

from sidecar.identity import REPLAY_ID_HEADER
from sidecar.registry import Registry, WebhookDef
from sidecar.routing import FanOut, on_subject, replayed_copy, routed_id, targets


def _hook(wid: int, subject: str, **kw: object) -> WebhookDef:
    return WebhookDef(wid, f"h{wid}", f"http://127.0.0.1/{wid}", nats_subject=subject, **kw)  # type: ignore[arg-type]


def test_targets_are_the_enabled_nats_webhooks_on_exactly_that_subject() -> None:
    reg = Registry(
        webhooks={
            3: _hook(3, "webhooks.a"),
            1: _hook(1, "webhooks.a"),
            2: _hook(2, "webhooks.a.b"),
            4: _hook(4, "webhooks.a", enabled=False),  # a DBA disabled it
            5: _hook(5, "webhooks.a", enabled=False, disabled_reason="HTTP 410"),  # held, not dropped
            6: _hook(6, "webhooks.a", nats_enabled=False),
        }
    )
    assert [w.webhook_id for w in targets(reg, "webhooks.a")] == [1, 3, 5]
    assert targets(reg, "webhooks.none") == ()


def test_each_copy_has_its_own_id_within_256_characters_and_a_replay_keeps_it() -> None:
    assert routed_id("order-42", 7) == "order-42@7"
    assert routed_id("order-42@7", 7) == "order-42@7"  # a replayed dead letter of that copy
    long = routed_id("x" * 256, 12)
    assert len(long) == 256 and long.endswith("@12")
    hooks = (_hook(1, "s"), _hook(2, "s"))
    assert replayed_copy({"Nats-Msg-Id": "replay-1", REPLAY_ID_HEADER: "order-42@2"}, hooks) is hooks[1]
    assert replayed_copy({REPLAY_ID_HEADER: "order-42"}, hooks) is None  # not a copy: routed to all
    assert replayed_copy(None, hooks) is None


def test_the_message_is_acknowledged_once_after_every_copy_and_handed_back_if_one_is() -> None:
    class Msg:
        def __init__(self) -> None:
            self.calls: list[str] = []

        async def ack(self) -> None:
            self.calls.append("ack")

        async def nak(self) -> None:
            self.calls.append("nak")

        async def in_progress(self) -> None:
            self.calls.append("wip")

    async def run() -> None:
        ok, settled = Msg(), []
        group = FanOut(ok, 2, settled.append)
        a, b = group.child(), group.child()
        await a.ack()
        await a.ack()  # once per copy
        assert ok.calls == [] and settled == []
        await b.in_progress()
        await b.ack()
        assert ok.calls == ["wip", "ack"] and settled == [True]

        back, settled2 = Msg(), []
        group2 = FanOut(back, 2, settled2.append)
        c, d = group2.child(), group2.child()
        await c.nak()
        step = d.abandon()
        assert step is not None
        await step
        assert d.abandon() is None
        assert back.calls == ["nak"] and settled2 == [False]

    asyncio.run(run())


def test_on_subject_chooses_among_rows_read_from_postgresql_as_targets_does() -> None:
    rows = [
        _hook(3, "orders"),
        _hook(4, "orders", nats_enabled=False),
        _hook(5, "other"),
        _hook(6, "orders", enabled=False),
        _hook(7, "orders", enabled=False, disabled_reason="HTTP 410"),
    ]
    assert [w.webhook_id for w in on_subject(rows, "orders")] == [3, 7]
