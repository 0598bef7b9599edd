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

# section -> (query name in queries.sql, columns shown)
SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "workers": (
        "status_workers",
        (
            "worker_name",
            "status",
            "hostname",
            "pid",
            "heartbeat_age_seconds",
            "in_flight",
            "messages_delivered",
            "messages_failed",
            "consumers",
        ),
    ),
    "streams": (
        "status_streams",
        (
            "stream_name",
            "status",
            "messages",
            "bytes",
            "first_seq",
            "last_seq",
            "consumer_count",
            "age_seconds",
            "last_error",
        ),
    ),
    "consumers": (
        "status_consumers",
        (
            "stream_name",
            "consumer_name",
            "status",
            "lag",
            "num_ack_pending",
            "num_redelivered",
            "workers",
            "per_second_5m",
            "delivered_1h",
            "failed_1h",
            "configured_filter",
            "actual_filter",
            "age_seconds",
            "last_error",
        ),
    ),
    "endpoints": (
        "status_endpoints",
        (
            "webhook_id",
            "webhook_name",
            "status",
            "consecutive_failures",
            "success_rate_1h",
            "attempts_1h",
            "waiting",
            "last_status",
            "last_error",
            "disabled_reason",
        ),
    ),
    "recent_failures": (
        "status_recent_failures",
        (
            "failed_at",
            "source",
            "webhook_name",
            "consumer_name",
            "http_status",
            "attempt",
            "outcome",
            "error_message",
            "message_id",
        ),
    ),
}
MAX_CELL = 60


def collect(url: str, failures: int = 10) -> dict[str, list[dict[str, Any]]]:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            cur = conn.cursor(row_factory=dict_row)
            out: dict[str, list[dict[str, Any]]] = {}
            for name, (query_name, _) in SECTIONS.items():
                cur.execute(query(query_name), {"limit": failures})
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
    return {k: [{c: _json_value(v) for c, v in row.items()} for row in rows] for k, rows in report.items()}


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


def render(report: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    parts = []
    for name, (_, columns) in SECTIONS.items():
        rows = report.get(name, [])
        title = name.replace("_", " ").upper()
        parts.append(f"{title} ({len(rows)})")
        parts.append(table(rows, columns) if rows else "  (none)")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
