"""``webhook-worker status --watch``: a live view refreshed every second, like ``top``.

Per consumer the delivery rate, lag, in flight and retries waiting; per endpoint its health, circuit
and latency; the workers and their problems. Everything comes from the database (the queries named
watch_* and status_* in queries.sql), so it shows every worker of the installation, not one process.
``frame`` is pure (unit-tested); ``watch`` loops until Ctrl-C or ``iterations`` frames.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import psycopg
from psycopg.rows import dict_row

from sidecar.errors import DatabaseError
from sidecar.queries import query
from sidecar.status import cell, table

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
Rows = list[dict[str, Any]]
CONSUMER_COLUMNS = ("stream_name", "consumer_name", "status", "delivered_per_s", "failed_10s", "lag", "in_flight",
                    "retries", "workers")  # fmt: skip
ENDPOINT_COLUMNS = ("webhook_id", "webhook_name", "status", "circuit", "p50_ms", "p95_ms", "requests_5m",
                    "consecutive_failures", "waiting")  # fmt: skip
WORKER_COLUMNS = ("worker_name", "status", "hostname", "heartbeat_age_seconds", "in_flight", "messages_delivered",
                  "messages_failed")  # fmt: skip


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, Rows]:
    """One frame's data: consumers, endpoints (health, circuit, latency) and workers."""
    try:
        cur = conn.cursor(row_factory=dict_row)
        out: dict[str, Rows] = {}
        cur.execute(query("watch_consumers"))
        out["consumers"] = [dict(r) for r in cur.fetchall()]
        cur.execute(query("status_endpoints"))
        endpoints = [dict(r) for r in cur.fetchall()]
        cur.execute(query("watch_latency"))
        latency = {r["webhook_id"]: r for r in cur.fetchall()}
        cur.execute(query("watch_circuits"))
        circuits = {r["webhook_id"]: r["circuit"] for r in cur.fetchall()}
        for e in endpoints:
            e["circuit"] = circuits.get(e["webhook_id"])
            e.update({k: v for k, v in latency.get(e["webhook_id"], {}).items() if k != "webhook_id"})
        out["endpoints"] = endpoints
        cur.execute(query("status_workers"))
        out["workers"] = [dict(r) for r in cur.fetchall()]
        return out
    except psycopg.Error as exc:
        raise DatabaseError(f"reading the status views failed: {exc}") from exc


def _section(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    if not rows:
        return [f"{title} (0)", "  (none)", ""]
    return [f"{title} ({len(rows)})", table(rows, columns), ""]


def frame(data: Mapping[str, Sequence[Mapping[str, Any]]], now: dt.datetime, width: int = 160) -> str:
    """The screen for one refresh: a header line, three tables, the workers' problems in full."""
    workers = data.get("workers", [])
    running = sum(1 for w in workers if w.get("status") in ("ACTIVE", "IDLE", "DEGRADED"))
    rate = sum(float(c.get("delivered_per_s") or 0) for c in data.get("consumers", []))
    lines = [
        f"webhook-worker status --watch   {now.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC   "
        f"workers running: {running}   delivered/s: {rate:.1f}   (Ctrl-C to quit)",
        "",
    ]
    lines += _section("CONSUMERS", data.get("consumers", []), CONSUMER_COLUMNS)
    lines += _section("ENDPOINTS", data.get("endpoints", []), ENDPOINT_COLUMNS)
    lines += _section("WORKERS", workers, WORKER_COLUMNS)
    problems = [
        f"  {w['worker_name']} {w.get('status')}: {' '.join(str(p).split())}"
        for w in workers
        for p in (w.get("problems") or [])
    ]
    errors = [
        f"  endpoint {cell(e.get('webhook_name'))} {e.get('status')}: {' '.join(str(e['last_error']).split())}"
        for e in data.get("endpoints", [])
        if e.get("last_error") and e.get("status") not in ("healthy", None)
    ]
    lines += ["PROBLEMS", *(problems + errors or ["  (none)"])]
    # a terminal narrower than a line would wrap it and scroll the view: cut there instead
    lines = "\n".join(lines).splitlines()
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in lines) + "\n"


def terminal_width(out: TextIO) -> int:
    """The terminal's own width (as top asks it), else $COLUMNS, else 160."""
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size((160, 50)).columns


def watch(
    url: str,
    interval: float = 1.0,
    iterations: int | None = None,
    out: TextIO = sys.stdout,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> int:
    """Redraw every ``interval`` seconds until Ctrl-C (exit 0) or ``iterations`` frames. A lost
    connection shows as a line on the screen and is opened again at the next refresh."""
    conn: psycopg.Connection[Any] | None = None
    shown = 0
    try:
        while iterations is None or shown < iterations:
            started = time.monotonic()
            width = terminal_width(out)
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
                text = frame(snapshot(conn), clock(), width)
            except (psycopg.Error, DatabaseError) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                text = f"webhook-worker status --watch: cannot read the database ({exc}); trying again\n"
            out.write(CLEAR + text)
            out.flush()
            shown += 1
            if iterations is None or shown < iterations:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        out.write("\n")
    finally:
        if conn is not None:
            conn.close()
    return 0
