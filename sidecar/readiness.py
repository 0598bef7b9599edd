"""Readiness: each part of the worker, ok or with its problem (/readyz, and the problems the
heartbeat writes to nats_worker_status), and the snapshot /metrics reads at scrape time."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from sidecar.consumer import ConsumerRunner
from sidecar.metrics import Component, Snapshot, with_stopped
from sidecar.worker_state import RunnerKey, WorkerState, counts


class Readiness:
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def problems(self, database: bool = True) -> list[str]:
        """Why the worker is not ready (empty: ready)."""
        return [c.problem or f"{c.name} is not ready" for c in self.components(database) if not c.ok]

    def components(self, database: bool = True) -> list[Component]:
        """Each part of the worker, ok or with its problem (/readyz; the heartbeat writes the
        problems and the NATS connections that are down, without the database's own problem)."""
        out: list[Component] = []
        # Without the database (the heartbeat writes the rest to it) it counts as ok.
        out.append(self._postgresql() if database else Component("postgresql", True))
        nats_ok = self._nats(out)
        now = time.monotonic()
        out.append(self._recording(now))
        out.append(
            Component("configuration", True)
            if self.state.loaded
            else Component("configuration", False, "the registry has not been read yet")
        )
        self._consumers(out, nats_ok)
        for name, health in sorted(self.state.task_health.items()):
            if name != "recorder":
                failed = health.problem(now)
                out.append(Component(f"task:{name}", failed is None, failed))
        return out

    def _postgresql(self) -> Component:
        s = self.state
        since = asyncio.get_running_loop().time() - s.last_db_ok
        if not s.last_db_ok:
            return Component("postgresql", False, "not registered in PostgreSQL yet (starting)")
        if since > 3 * s.settings.heartbeat_interval + 2:
            why = f" (last error: {s.last_db_error})" if s.last_db_error else ""
            return Component(
                "postgresql", False, f"no successful heartbeat to PostgreSQL for {since:.0f} s{why}"
            )
        return Component("postgresql", True)

    def _nats(self, out: list[Component]) -> dict[str, bool]:
        """One component per needed NATS connection; returns which of them are connected."""
        nats_ok: dict[str, bool] = {}
        for name, conn in sorted(self.state.needed_connections().items()):
            st = self.state.io.nats.state(conn)
            nats_ok[name] = st.connected
            out.append(Component(f"nats:{name}", st.connected, st.problem, st.address))
        return nats_ok

    def _recording(self, now: float) -> Component:
        recorder = self.state.io.recorder
        health = self.state.task_health.get("recorder")
        recording = health.problem(now) if health is not None else None
        if recording is None and recorder.failing:
            recording = (
                f"outcomes cannot be committed to PostgreSQL ({recorder.backlog} waiting): "
                f"{recorder.last_error or 'unknown error'}"
            )
        return Component("recording", recording is None, recording)

    def _consumers(self, out: list[Component], nats_ok: dict[str, bool]) -> None:
        """Each wanted or running consumer, then the tasks it runs under it."""
        streams = self.state.registry.streams
        for key in sorted(self.state.wanted | set(self.state.runners)):
            runner = self.state.runners.get(key)
            trouble: str | None = None
            if runner is None:
                config = streams[key[0]].config_name if key[0] in streams else None
                waits = (
                    f" (waits for NATS connection {config!r})"
                    if config and not nats_ok.get(config, True)
                    else ""
                )
                trouble = f"consumer {key[0]}/{key[1]} is not running{waits}"
            elif runner.client.is_closed:
                trouble = f"consumer {runner.name} runs on a closed NATS connection"
            elif not runner.client.is_connected:
                trouble = f"consumer {runner.name} cannot fetch: its NATS connection is down"
            out.append(Component(f"consumer:{key[0]}/{key[1]}", trouble is None, trouble))
            if runner is not None:
                out.extend(consumer_tasks(key, runner))

    def snapshot(self) -> Snapshot:
        s = self.state
        return Snapshot(
            consumers=with_stopped([counts(r) for r in s.runners.values()], s.stopped_by_key),
            dead_letter_reasons=s.totals().dead_letter_reasons,
            retries_waiting=s.backlog.get("retries_waiting"),
            outbox_pending=s.backlog.get("outbox_pending"),
            outbox_failed_rows=s.backlog.get("outbox_failed"),
            outbox_published=s.io.relay.published,
            outbox_failed=s.io.relay.failed,
            circuits=Counter(g.circuit for g in s.io.gates.gates.values()),
            config_reloads=s.config_reloads,
            config_applies=s.config_applies,
            state_refreshes=s.state_refreshes,
            task_restarts=s.totals().task_restarts + sum(h.failures for h in s.task_health.values()),
        )


def consumer_tasks(key: RunnerKey, runner: ConsumerRunner) -> list[Component]:
    """The tasks one consumer runs, listed under it in /readyz, each alive or not (issue 22: a dead
    feeder must not leave its consumer reported healthy)."""
    return [
        Component(
            f"consumer:{key[0]}/{key[1]}:task:{name}",
            alive,
            None if alive else f"task {name} of consumer {key[0]}/{key[1]} is not running",
        )
        for name, alive in sorted(runner.task_states().items())
    ]
