"""The sidecar as a real subprocess (webhook-worker run), and what it shows from outside: its HTTP
endpoints, its ``/metrics`` counters and its log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.waits import wait_for


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

    def actions(self, action: str) -> int:
        """How many log lines carry this ``action`` (text log: ``... [action]``; JSON: its key)."""
        return _count(self.output(), action)

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


def _count(log: str, action: str) -> int:
    return log.count(f"[{action}]") + log.count(f'"action": "{action}"')


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback test URL
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(base: str) -> dict[tuple[str, str], float]:
    """{(sample name, outcome/reason label): value} summed over the other labels."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(get(base + "/metrics")[1]):
        for s in family.samples:
            key = (s.name, s.labels.get("outcome") or s.labels.get("reason") or "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def counter(base: str, name: str, label: str = "") -> float:
    """One sample of ``/metrics`` (0 when absent), e.g. ``counter(base, "webhook_config_reloads_total")``."""
    return metrics(base).get((name, label), 0.0)


def wait_counter(base: str, name: str, at_least: float, label: str = "", timeout: float = 30.0) -> float:
    """Until the counter reaches ``at_least``; its value then."""
    return wait_for(
        lambda: counter(base, name, label),
        lambda v: v >= at_least,
        f"{name}{{{label}}} >= {at_least:g}",
        timeout,
    )


def _applications(sidecar: Sidecar) -> tuple[int, int]:
    """(applications begun, applications ended) according to the log."""
    return (
        sidecar.actions("config_apply"),
        sidecar.actions("config_loaded") + sidecar.actions("reconcile_failed"),
    )


@contextlib.contextmanager
def applied(sidecar: Sidecar, timeout: float = 30.0) -> Iterator[None]:
    """Around a change of the registry tables: on leaving, wait until the sidecar has begun and
    finished applying a configuration read after the change (runners started, stopped, updated).

    The signal is the log: ``config_apply`` when an application begins, ``config_loaded`` (or
    ``reconcile_failed``) when it ends. The ``webhook_config_applies`` counter alone is not enough:
    it counts applications begun, before the runners change. Entering waits until no application
    is under way, so that one begun from rows read before the change is not taken for it. These
    lines are logged at DEBUG, the level ``Sidecar`` runs at unless a test sets LOG_LEVEL."""
    begun, _ = wait_for(
        lambda: _applications(sidecar), lambda a: a[0] == a[1], "no application under way", timeout
    )
    yield
    wait_for(
        lambda: _applications(sidecar),
        lambda a: a[0] > begun and a[1] >= a[0],
        "the sidecar to apply the changed configuration (applications begun, ended)",
        timeout,
    )


def idle(sidecar: Sidecar, timeout: float = 30.0) -> None:
    """Until the sidecar has finished applying the configuration at least once and no application
    is under way: every reconcile the rows it has read call for has had its chance."""
    wait_for(
        lambda: _applications(sidecar),
        lambda a: a[0] >= 1 and a[1] >= a[0],
        "an application of the configuration, finished (applications begun, ended)",
        timeout,
    )


def _after_first(out: str, action: str) -> str | None:
    """The log after the first line with this action (None: no such line yet)."""
    for mark in (f"[{action}]", f'"action": "{action}"'):
        at = out.find(mark)
        if at >= 0:
            return out[at:]
    return None


def started(sidecar: Sidecar, timeout: float = 30.0) -> None:
    """Until the start-up reloads are over: the first application, then the reload that the
    listener's first connection asks for (``listen``: NOTIFYs missed before it), with no
    application under way. A change made before that may be applied by those reloads at once."""

    def state() -> tuple[bool, int, int]:
        after = _after_first(sidecar.output(), "listen")
        reads = 0 if after is None else _count(after, "config_unchanged") + _count(after, "config_apply")
        begun, ended = _applications(sidecar)
        return reads > 0, begun, ended

    wait_for(
        state,
        lambda s: s[0] and s[2] >= s[1] >= 1,
        "the start-up reloads (reload after listen, applications begun, ended)",
        timeout,
    )
