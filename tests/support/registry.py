"""Rows a test writes to configure the worker in SQL, and the few it reads back."""

from __future__ import annotations

import json

import psycopg
from psycopg import sql

from tests.support.waits import wait_scalar


def scalar(db: psycopg.Connection, query: str, params: tuple[object, ...] = ()) -> object:
    """The first column of the first row (None when there is no row)."""
    row = db.execute(query, params).fetchone()
    return None if row is None else row[0]


def configure(
    db: psycopg.Connection,
    stream: str,
    subject_root: str,
    batch_size: int = 10,
    storage: str = "memory",
    **consumer: object,
) -> None:
    """A stream on ``subject_root.>`` and its consumer 'workers' (extra consumer columns by name)."""
    db.execute(
        "INSERT INTO rule_nats_streams (stream_name, subjects, storage_type) VALUES (%s, %s, %s)",
        (stream, [f"{subject_root}.>"], storage),
    )
    cols = ["stream_name", "consumer_name", "batch_size", *consumer]
    db.execute(
        sql.SQL("INSERT INTO rule_nats_consumers ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(cols))
        ),
        (stream, "workers", batch_size, *consumer.values()),
    )


def wait_ready(db: psycopg.Connection, n: int = 1, timeout: float = 20) -> None:
    """Until the sidecar has created the configured consumers in JetStream."""
    wait_scalar(
        db,
        "SELECT count(*) FROM rule_nats_consumer_state WHERE present",
        until=lambda v: v == n,
        timeout=timeout,
    )


def outcomes(db: psycopg.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT outcome, count(*) FROM rule_nats_delivery_attempts GROUP BY 1").fetchall())


def add_webhook(db: psycopg.Connection, name: str, url: str, subject: str, **cols: object) -> int:
    names = ["webhook_name", "url", "nats_subject", *cols]
    row = db.execute(
        sql.SQL("INSERT INTO rule_webhooks ({}) VALUES ({}) RETURNING webhook_id").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), sql.SQL(", ").join(sql.Placeholder() * len(names))
        ),
        (name, url, subject, *cols.values()),
    ).fetchone()
    assert row is not None
    return int(row[0])


def envelope(webhook_id: int, data: object, event_id: str | None = None, **extra: object) -> bytes:
    msg: dict[str, object] = {"webhook_id": webhook_id, "data": data, **extra}
    if event_id is not None:
        msg["event_id"] = event_id
    return json.dumps(msg).encode()


def register_stream(conn: psycopg.Connection, name: str, subjects: list[str]) -> None:
    """The registry row of a stream the test made itself: SQL publishes only reach registered streams."""
    conn.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES (%s, %s)", (name, subjects))


def allow_any_subject(conn: psycopg.Connection) -> None:
    """What an admin does to let SQL publish to subjects no registered stream captures."""
    conn.execute("UPDATE rule_nats_config SET publish_registered_subjects_only = false")
