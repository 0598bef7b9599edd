"""`webhook-worker status --watch` in a real terminal (tmux): a live view of a running sidecar,
refreshed every second, that follows what happens (deliveries flowing, an endpoint's circuit opening)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.support.publish import publish_raw
from tests.support.receiver import Receiver, Response
from tests.support.registry import add_webhook, configure, envelope, wait_ready
from tests.support.sidecar import Sidecar
from tests.support.stack import REPO, NatsServer
from tests.support.waits import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (scripts/setup installs it)"
)


class Terminal:
    """A detached tmux session on a private server socket, 200x50."""

    def __init__(self, command: str) -> None:
        self.socket = f"wwtest-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux("new-session", "-d", "-s", "watch", "-x", "200", "-y", "50", command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "watch")

    def alive(self) -> bool:
        return (
            subprocess.run(
                ["tmux", "-L", self.socket, "has-session", "-t", "watch"], capture_output=True
            ).returncode
            == 0
        )

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal() -> Iterator[Callable[[str], Terminal]]:
    opened: list[Terminal] = []

    def open_(command: str) -> Terminal:
        t = Terminal(command)
        opened.append(t)
        return t

    yield open_
    for t in opened:
        t.close()


def row(screen: str, start: str) -> list[str]:
    line = next((x for x in screen.splitlines() if x.startswith(start)), "")
    return line.split()


@pytest.mark.slow
def test_watch_shows_a_live_view_of_a_running_sidecar(
    nats_db: psycopg.Connection,
    database_url: str,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
    terminal: Callable[[str], Terminal],
) -> None:
    db = nats_db
    configure(
        db, "LIVE", "live", retry_initial_seconds=0.5, retry_max_backoff_seconds=1, retry_max_attempts=50
    )
    hook = add_webhook(
        db, "shop", receiver.url + "/s", "live.a", circuit_failure_threshold=3, circuit_open_seconds=30
    )
    broken = {"on": False}
    receiver.responder = lambda req: Response(status=500 if broken["on"] else 204)
    sidecar_factory()
    wait_ready(db)

    stop = threading.Event()

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            publish_raw(nats_server.url, "live.a", [envelope(hook, {"i": i + k}) for k in range(20)])
            i += 20
            stop.wait(0.2)

    feeder = threading.Thread(target=publisher, daemon=True)
    feeder.start()
    try:
        cli = [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "status", "--watch",
               "--database-url", database_url]  # fmt: skip
        term = terminal(f"cd {shlex.quote(str(REPO))} && {shlex.join(cli)}")

        def consumer_rate() -> float:
            cells = row(term.screen(), "LIVE ")
            return float(cells[3]) if len(cells) > 3 and re.fullmatch(r"[0-9.]+", cells[3]) else 0.0

        assert wait_until(lambda: consumer_rate() > 10, timeout=20), term.screen()
        screen = term.screen()
        assert row(screen, "LIVE ")[:3] == ["LIVE", "workers", "ok"], screen
        endpoint = row(screen, f"{hook} ")
        assert endpoint[1:4] == ["shop", "healthy", "closed"], screen
        assert re.fullmatch(r"[0-9.]+", endpoint[4]), screen  # p50 latency in ms
        assert row(screen, "w1 ")[:2] in (["w1", "ACTIVE"], ["w1", "IDLE"]), screen
        # it refreshes every second: the clock in the header moves
        stamp = re.search(r"\d\d:\d\d:\d\d UTC", screen)
        assert stamp and wait_until(lambda: stamp.group(0) not in term.screen(), timeout=3)

        # the endpoint starts failing: the view shows the circuit open and retries waiting
        broken["on"] = True
        assert wait_until(lambda: row(term.screen(), f"{hook} ")[2:4] == ["open", "open"], timeout=20), (
            term.screen()
        )
        assert wait_until(lambda: row(term.screen(), "LIVE ")[7] not in ("0", "-"), timeout=10), term.screen()
        assert "endpoint shop open: HTTP 500" in term.screen() or "shop" in term.screen().split("PROBLEMS")[1]
    finally:
        stop.set()
        feeder.join(5)
    term.tmux("send-keys", "-t", "watch", "C-c")
    assert wait_until(lambda: not term.alive(), timeout=5), term.screen()
