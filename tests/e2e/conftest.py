"""The sidecar as a real subprocess (webhook-worker run), stopped with SIGTERM or SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest


class Sidecar:
    def __init__(self, database_url: str, env: dict[str, str] | None = None, name: str = "w1") -> None:
        self.log = Path(tempfile.mkstemp(prefix=f"sidecar-{name}-", suffix=".log")[1])
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "STREAM_", "QUEUE_"))}
        full_env.update({"DATABASE_URL": database_url, "WORKER_NAME": name, "LOG_LEVEL": "DEBUG"})
        # The receivers run on loopback, which the SSRF policy blocks by default.
        full_env["WEBHOOK_ALLOW_NETWORKS"] = "127.0.0.0/8,::1/128"
        full_env.update(env or {})
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def worker_database_url(database_url: str) -> str:
    """The database URL for a login role that has rule_nats_worker and nothing else."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ww_sidecar') "
            "THEN CREATE ROLE ww_sidecar LOGIN IN ROLE rule_nats_worker; END IF; END $$"
        )
    return database_url.replace("postgresql://postgres@", "postgresql://ww_sidecar@")


@pytest.fixture
def sidecar_factory(worker_database_url: str) -> Iterator[Callable[..., Sidecar]]:
    """Starts sidecars that log in with the least-privilege worker role, as in production."""
    started: list[Sidecar] = []

    def start(env: dict[str, str] | None = None, name: str = "w1", url: str | None = None) -> Sidecar:
        s = Sidecar(url or worker_database_url, env, name)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()
        if s.proc.returncode not in (0, -9):
            sys.stderr.write(f"--- sidecar {s.log} exited {s.proc.returncode} ---\n{s.output()[-4000:]}\n")


def scalar(db: psycopg.Connection, sql: str, params: tuple[object, ...] = ()) -> object:
    """The first column of the first row (None when there is no row)."""
    row = db.execute(sql, params).fetchone()  # type: ignore[call-overload]
    return None if row is None else row[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
