"""The registry read from PostgreSQL, as frozen dataclasses (pure: rows in, objects out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.config import NatsConnection


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    initial_seconds: float = 1.0
    max_backoff_seconds: float = 3600.0
    max_age_seconds: float = 86400.0


@dataclass(frozen=True, slots=True)
class StreamDef:
    stream_name: str
    config_name: str
    subjects: tuple[str, ...]
    storage_type: str = "file"
    retention_policy: str = "limits"
    max_messages: int = -1
    max_bytes: int = -1
    max_age_seconds: float = 0.0
    max_message_size: int = -1
    discard_policy: str = "old"
    replicas: int = 1
    duplicate_window_seconds: float = 120.0
    description: str | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class ConsumerDef:
    consumer_id: int
    stream_name: str
    consumer_name: str
    filter_subject: str | None = None
    batch_size: int = 10
    max_deliver: int = 20
    ack_wait_seconds: float = 30.0
    max_ack_pending: int = 1000
    deliver_policy: str = "all"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    enabled: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.stream_name, self.consumer_name)


@dataclass(frozen=True, slots=True)
class WebhookDef:
    webhook_id: int
    webhook_name: str
    url: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_seconds: float = 10.0
    retry_max_attempts: int | None = None
    retry_initial_seconds: float | None = None
    retry_max_backoff_seconds: float | None = None
    retry_max_age_seconds: float | None = None
    enabled: bool = True

    def __repr__(self) -> str:  # static headers may hold Authorization values
        return f"WebhookDef({self.webhook_id}, {self.webhook_name!r}, {self.url!r})"

    def policy(self, base: RetryPolicy) -> RetryPolicy:
        """The consumer's retry policy with this endpoint's overrides applied."""
        return RetryPolicy(
            max_attempts=self.retry_max_attempts or base.max_attempts,
            initial_seconds=self.retry_initial_seconds or base.initial_seconds,
            max_backoff_seconds=self.retry_max_backoff_seconds or base.max_backoff_seconds,
            max_age_seconds=self.retry_max_age_seconds or base.max_age_seconds,
        )


@dataclass(frozen=True, slots=True)
class Registry:
    connections: Mapping[str, NatsConnection] = field(default_factory=dict)
    streams: Mapping[str, StreamDef] = field(default_factory=dict)
    consumers: Mapping[tuple[str, str], ConsumerDef] = field(default_factory=dict)
    webhooks: Mapping[int, WebhookDef] = field(default_factory=dict)


def _f(value: Any, default: float) -> float:
    return default if value is None else float(value)


def stream_from_row(row: Mapping[str, Any]) -> StreamDef:
    return StreamDef(
        stream_name=row["stream_name"],
        config_name=row["config_name"],
        subjects=tuple(row["subjects"]),
        storage_type=row["storage_type"],
        retention_policy=row["retention_policy"],
        max_messages=int(row["max_messages"]),
        max_bytes=int(row["max_bytes"]),
        max_age_seconds=_f(row["max_age_seconds"], 0.0),
        max_message_size=int(row["max_message_size"]),
        discard_policy=row["discard_policy"],
        replicas=int(row["replicas"]),
        duplicate_window_seconds=_f(row["duplicate_window_seconds"], 120.0),
        description=row.get("description"),
        enabled=bool(row["enabled"]),
    )


def consumer_from_row(row: Mapping[str, Any]) -> ConsumerDef:
    return ConsumerDef(
        consumer_id=int(row["consumer_id"]),
        stream_name=row["stream_name"],
        consumer_name=row["consumer_name"],
        filter_subject=row.get("filter_subject"),
        batch_size=int(row["batch_size"]),
        max_deliver=int(row["max_deliver"]),
        ack_wait_seconds=_f(row["ack_wait_seconds"], 30.0),
        max_ack_pending=int(row["max_ack_pending"]),
        deliver_policy=row["deliver_policy"],
        retry=RetryPolicy(
            max_attempts=int(row["retry_max_attempts"]),
            initial_seconds=_f(row["retry_initial_seconds"], 1.0),
            max_backoff_seconds=_f(row["retry_max_backoff_seconds"], 3600.0),
            max_age_seconds=_f(row["retry_max_age_seconds"], 86400.0),
        ),
        enabled=bool(row["enabled"]),
    )


def webhook_from_row(row: Mapping[str, Any]) -> WebhookDef:
    headers = row.get("headers") or {}
    return WebhookDef(
        webhook_id=int(row["webhook_id"]),
        webhook_name=row["webhook_name"],
        url=row["url"],
        method=row["method"],
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
        timeout_seconds=_f(row["timeout_seconds"], 10.0),
        retry_max_attempts=row.get("retry_max_attempts"),
        retry_initial_seconds=None
        if row.get("retry_initial_seconds") is None
        else float(row["retry_initial_seconds"]),
        retry_max_backoff_seconds=None
        if row.get("retry_max_backoff_seconds") is None
        else float(row["retry_max_backoff_seconds"]),
        retry_max_age_seconds=None
        if row.get("retry_max_age_seconds") is None
        else float(row["retry_max_age_seconds"]),
        enabled=bool(row["enabled"]),
    )
