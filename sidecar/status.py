"""``webhook-worker status``: workers, consumers, endpoints and recent failures from the database.

``collect`` runs the queries (the nats_* views, so the numbers are the ones a DBA sees in
SQL); ``render`` turns the result into text tables (pure, unit-tested).
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from sidecar.errors import DatabaseError
from sidecar.queries import query

# Sections in the order shown, each read by status_<section> in queries.sql; the columns shown
# are that query's select list.
SECTIONS = ("connections", "workers", "streams", "consumers", "endpoints", "recent_failures")
MAX_CELL = 60
# Free text that must be read whole (an error's HINT comes last, a worker's problems say why it is
# DEGRADED): shown under its table, one line per value, never cut at MAX_CELL.
DETAIL_COLUMNS = ("problems", "last_error", "error_message", "disabled_reason")
# A worker in one of these states is running: no "start a sidecar" step while one is.
RUNNING = ("ACTIVE", "IDLE", "DEGRADED")
# What names a row in its detail lines (default: its first column).
ROW_NAMES = {
    "consumers": ("stream_name", "consumer_name"),
    "endpoints": ("webhook_name",),
    "recent_failures": ("source", "message_id"),
}


def collect(url: str, failures: int = 10) -> dict[str, list[dict[str, Any]]]:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            cur = conn.cursor(row_factory=dict_row)
            out: dict[str, list[dict[str, Any]]] = {}
            for name in SECTIONS:
                cur.execute(query(f"status_{name}"), {"limit": failures})
                out[name] = [dict(r) for r in cur.fetchall()]
            return out
    except psycopg.Error as exc:
        raise DatabaseError(f"reading the status views failed: {exc}") from exc


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def to_json(report: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: [{c: _json_value(v) for c, v in row.items()} for row in rows] for k, rows in report.items()
    }
    steps = next_steps(report)
    if steps:
        out["next_steps"] = steps
    return out


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def next_steps(report: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """What a fresh or half-configured installation still needs, in the order to do it."""
    steps: list[str] = []
    default = next((c for c in report.get("connections", []) if c.get("config_name") == "default"), None)
    if not report.get("streams"):
        where = f" (the sidecar connects to {default['nats_url']})" if default else ""
        steps.append(
            "point the default NATS connection at your server if needed"
            f"{where}: UPDATE rule_nats_config SET nats_url = 'nats://host:4222' WHERE config_name = 'default';"
        )
        steps.append(
            "register a stream: INSERT INTO rule_nats_streams (stream_name, subjects) "
            "VALUES ('WEBHOOKS', '{webhooks.>}');"
        )
    if not report.get("consumers"):
        steps.append(
            "add a durable consumer: INSERT INTO rule_nats_consumers (stream_name, consumer_name) "
            "VALUES ('WEBHOOKS', 'webhook-workers');"
        )
    if not report.get("endpoints"):
        steps.append(
            "register a webhook (or publish envelopes that carry webhook_url): INSERT INTO rule_webhooks "
            "(webhook_name, url, nats_subject) VALUES ('orders', 'https://hooks.example.com/orders', 'webhooks.orders');"
        )
    if not any(w.get("status") in RUNNING for w in report.get("workers", [])):
        steps.append(
            "start a sidecar: webhook-worker run --database-url postgresql://... (it reads the rest from SQL)"
        )
    return steps


def details(section: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    """The DETAIL_COLUMNS of each row in full, named by the row (a worker's problems one per line)."""
    out: list[str] = []
    for row in rows:
        who = "/".join(cell(row.get(c)) for c in ROW_NAMES.get(section, tuple(columns[:1])))
        for c in DETAIL_COLUMNS:
            value = row.get(c)
            if value is None or value == [] or value == "":
                continue
            for text in value if isinstance(value, list | tuple) else [value]:
                out.append(f"  {who}: {c.replace('_', ' ')}: {' '.join(str(text).split())}")
    return out


def render(report: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    parts = []
    for name in SECTIONS:
        rows = report.get(name, [])
        title = name.replace("_", " ").upper()
        parts.append(f"{title} ({len(rows)})")
        if rows:
            columns = list(rows[0])
            parts.append(table(rows, [c for c in columns if c not in DETAIL_COLUMNS]))
            parts += details(name, rows, columns)
        else:
            parts.append("  (none)")
        parts.append("")
    steps = next_steps(report)
    if steps:
        parts.append("NEXT STEPS")
        parts += [f"  {i}. {step}" for i, step in enumerate(steps, start=1)]
    return "\n".join(parts).rstrip() + "\n"
