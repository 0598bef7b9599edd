"""The consumer's message path with a fake NATS client, a fake pool and a fake sender (pure units:
no server). Intake (pull requests, keep-alive, held set), the stage driver (prepare, gate, send,
classify, record, ack) and the supervision of every task a consumer runs (issue 22)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.consumer import ConsumerRunner
from sidecar.delivery import Response
from sidecar.registry import ConsumerDef, Registry, WebhookDef

STREAM, CONSUMER = "S", "c"


class FakeSub:
    async def unsubscribe(self) -> None:
        pass


class FakeClient:
    """What the consumer uses of nats.aio.client.Client. ``fail_once``: its first look at
    ``is_closed`` raises, as a bug in the feed loop would."""

    def __init__(self, fail_once: bool = False) -> None:
        self.fail_once = fail_once
        self.is_connected = True
        self.pulls: list[dict[str, Any]] = []
        self.pulled = asyncio.Event()
        self.cb: Any = None

    @property
    def is_closed(self) -> bool:
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("feed loop bug")
        return False

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any = None, **_: Any) -> FakeSub:
        self.cb = cb
        return FakeSub()

    async def publish(self, subject: str, body: bytes, reply: str = "") -> None:
        self.pulls.append(json.loads(body))
        self.pulled.set()


@dataclass
class FakeMsg:
    """A JetStream message: records what the consumer told JetStream about it."""

    data: bytes
    seq: int
    subject: str = "s.x"
    headers: dict[str, str] | None = None
    reply: str = "$JS.ACK.x"
    said: list[str] = field(default_factory=list)
    acked: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(sequence=SimpleNamespace(stream=self.seq), num_delivered=1)

    async def ack(self) -> None:
        self.said.append("ack")
        self.acked.set()

    async def nak(self, *_: Any, **__: Any) -> None:
        self.said.append("nak")

    async def in_progress(self) -> None:
        self.said.append("in_progress")


class FakeCursor:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    async def execute(self, *_: Any, **__: Any) -> None:
        pass

    async def fetchall(self) -> list[Any]:
        return self.rows

    async def fetchone(self) -> Any:
        return None


class FakeConn:
    def cursor(self, **_: Any) -> FakeCursor:
        return FakeCursor([])

    async def execute(self, *_: Any, **__: Any) -> FakeCursor:
        return FakeCursor([])


class FakePool:
    """No due retries, no recorded outcomes."""

    @asynccontextmanager
    async def connection(self, **_: Any) -> AsyncIterator[FakeConn]:
        yield FakeConn()


class FakeRecorder:
    """Commits every outcome at once (``commit=False``: never), keeping what it was given."""

    def __init__(self) -> None:
        self.failing = False
        self.outcomes: list[Any] = []
        self.commit = True

    def submit(self, outcome: Any) -> asyncio.Future[bool]:
        self.outcomes.append(outcome)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.commit:
            fut.set_result(True)
        return fut

    def flush_now(self) -> None:
        pass


class FakeSender:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.sent: list[Any] = []

    async def send(self, req: Any) -> Response:
        self.sent.append(req)
        return Response(status=self.status, latency_ms=1.0)


def runner(
    client: FakeClient,
    recorder: FakeRecorder | None = None,
    sender: FakeSender | None = None,
    webhooks: dict[int, WebhookDef] | None = None,
) -> ConsumerRunner:
    registry = Registry(webhooks=webhooks or {})
    return ConsumerRunner(
        ConsumerDef(1, STREAM, CONSUMER, batch_size=4),
        client,  # type: ignore[arg-type]
        FakePool(),  # type: ignore[arg-type]
        sender or FakeSender(),  # type: ignore[arg-type]
        recorder or FakeRecorder(),  # type: ignore[arg-type]
        lambda: registry,
        "w1",
    )


async def test_a_feed_loop_that_raises_is_logged_restarted_and_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 22, finding 1. Failed on main: the RuntimeError killed the feeder silently (no log
    line, no pull request ever again) while the consumer looked healthy."""
    client = FakeClient(fail_once=True)
    r = runner(client)
    with caplog.at_level(logging.ERROR):
        await r.start()
        try:
            await asyncio.wait_for(client.pulled.wait(), 10)  # the restarted feeder asks for messages
            states = r.task_states()
            assert set(states) == {"feed", "retries", "keepalive"} and all(states.values())
            assert r.task_restarts() == {"feed": 1}
        finally:
            await r.stop(asyncio.get_running_loop().time() + 1)
    assert any(getattr(rec, "action", None) == "task_restarted" for rec in caplog.records)
    assert not any(r.task_states().values())  # stopped: no task runs
