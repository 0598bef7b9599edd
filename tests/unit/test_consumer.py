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
from sidecar.outcome import Outcome
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
    """Commits every outcome at once, or (``commit=False``) when the test says (``settle``)."""

    def __init__(self, commit: bool = True) -> None:
        self.failing = False
        self.outcomes: list[Outcome] = []
        self.commit = commit
        self.submitted = asyncio.Event()

    async def submit(self, outcome: Outcome) -> asyncio.Future[bool]:
        self.outcomes.append(outcome)
        if outcome.committed is None:
            outcome.committed = asyncio.get_running_loop().create_future()
        if self.commit:
            outcome.committed.set_result(True)
        self.submitted.set()
        return outcome.committed

    def settle(self, ok: bool) -> None:
        for o in self.outcomes:
            assert o.committed is not None
            if not o.committed.done():
                o.committed.set_result(ok)

    def flush_now(self) -> None:
        pass


class FakeSender:
    """Answers ``status``, or raises ``boom`` (a bug below the driver)."""

    def __init__(self, status: int = 200, boom: Exception | None = None) -> None:
        self.status = status
        self.boom = boom
        self.sent: list[Any] = []

    async def send(self, req: Any) -> Response:
        self.sent.append(req)
        if self.boom is not None:
            raise self.boom
        return Response(status=self.status, latency_ms=1.0)


HOOK = WebhookDef(7, "hook", "https://hooks.example/in")


def runner(
    client: FakeClient,
    recorder: FakeRecorder | None = None,
    sender: FakeSender | None = None,
    ack_wait: float = 30.0,
) -> ConsumerRunner:
    registry = Registry(webhooks={HOOK.webhook_id: HOOK})
    return ConsumerRunner(
        ConsumerDef(1, STREAM, CONSUMER, batch_size=4, ack_wait_seconds=ack_wait),
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


def message(seq: int, **body: Any) -> FakeMsg:
    return FakeMsg(json.dumps({"webhook_id": HOOK.webhook_id, "event_id": f"e-{seq}", **body}).encode(), seq)


async def started(client: FakeClient, **kw: Any) -> ConsumerRunner:
    r = runner(client, **kw)
    await r.start()
    await asyncio.wait_for(client.pulled.wait(), 10)
    return r


async def stopped(r: ConsumerRunner) -> None:
    r.client.is_connected = False  # type: ignore[misc]  # nothing more can arrive for the open pull requests: no wait for them
    await r.stop(asyncio.get_running_loop().time() + 2)


# -- intake ------------------------------------------------------------------------------------------


async def test_intake_asks_for_two_windows_and_holds_each_message_until_its_outcome_commits() -> None:
    client, recorder = FakeClient(), FakeRecorder(commit=False)
    r = await started(client, recorder=recorder)
    try:
        assert client.pulls[0]["batch"] == 8  # two windows of batch_size 4: one sent, one ahead
        msg = message(1)
        await client.cb(msg)
        await asyncio.wait_for(recorder.submitted.wait(), 10)
        assert r.in_flight == 1 and msg.said == []  # sent, recorded, not committed: held, no ack
        recorder.settle(True)
        await asyncio.wait_for(msg.acked.wait(), 10)
        assert msg.said == ["ack"]
        assert r.in_flight == 0 and r.counters.acked == 1 and r.counters.delivered == 1
    finally:
        await stopped(r)


async def test_intake_keeps_a_held_message_alive_while_its_outcome_waits_for_postgresql() -> None:
    client, recorder = FakeClient(), FakeRecorder(commit=False)
    r = await started(client, recorder=recorder, ack_wait=0.6)
    try:
        msg = message(1)
        await client.cb(msg)
        await asyncio.wait_for(recorder.submitted.wait(), 10)
        while "in_progress" not in msg.said:  # noqa: ASYNC110 - the signal under test
            await asyncio.sleep(0.05)
        assert "ack" not in msg.said
    finally:
        recorder.settle(False)
        await stopped(r)


async def test_intake_hands_back_what_arrives_once_stopping() -> None:
    client = FakeClient()
    r = await started(client)
    await stopped(r)
    msg = message(1)
    await client.cb(msg)
    assert msg.said == ["nak"] and r.in_flight == 0


# -- the stage driver ----------------------------------------------------------------------------------


async def test_driver_acknowledges_only_after_the_commit_and_never_when_it_is_refused() -> None:
    client, recorder = FakeClient(), FakeRecorder(commit=False)
    r = await started(client, recorder=recorder)
    try:
        msg = message(1)
        await client.cb(msg)
        await asyncio.wait_for(recorder.submitted.wait(), 10)
        recorder.settle(False)  # the recorder gave up on it: JetStream redelivers it
        while r.in_flight:  # noqa: ASYNC110 - the task ends, letting it go
            await asyncio.sleep(0.01)
        assert msg.said == [] and r.counters.acked == 0
        assert len(recorder.outcomes) == 1  # not recorded a second time by the catch-all
    finally:
        await stopped(r)


async def test_driver_records_a_failed_attempt_as_a_retry_then_acknowledges() -> None:
    client, recorder, sender = FakeClient(), FakeRecorder(), FakeSender(status=500)
    r = await started(client, recorder=recorder, sender=sender)
    try:
        msg = message(1)
        await client.cb(msg)
        await asyncio.wait_for(msg.acked.wait(), 10)
        (outcome,) = recorder.outcomes
        assert outcome.attempt is not None and outcome.attempt.outcome == "retry"
        assert outcome.attempt.http_status == 500 and outcome.attempt.message_id == "e-1"
        assert outcome.retry_insert is not None and outcome.retry_insert.stream_seq == 1
        assert len(sender.sent) == 1 and r.counters.scheduled == 1
    finally:
        await stopped(r)


async def test_driver_turns_an_unforeseen_exception_into_a_recorded_internal_error() -> None:
    client, recorder = FakeClient(), FakeRecorder()
    r = await started(client, recorder=recorder, sender=FakeSender(boom=ZeroDivisionError("bug")))
    try:
        msg = message(1)
        await client.cb(msg)
        await asyncio.wait_for(msg.acked.wait(), 10)
        (outcome,) = recorder.outcomes
        assert outcome.dead_letter is not None and outcome.dead_letter.reason == "internal_error"
        assert "ZeroDivisionError: bug" in outcome.dead_letter.error
    finally:
        await stopped(r)


async def test_driver_dead_letters_what_can_never_be_delivered_without_sending() -> None:
    client, recorder, sender = FakeClient(), FakeRecorder(), FakeSender()
    r = await started(client, recorder=recorder, sender=sender)
    try:
        msg = FakeMsg(b"not json", 3)
        await client.cb(msg)
        await asyncio.wait_for(msg.acked.wait(), 10)
        (outcome,) = recorder.outcomes
        assert outcome.dead_letter is not None and sender.sent == []
    finally:
        await stopped(r)
