"""The registry read from PostgreSQL, as frozen dataclasses (pure: rows in, objects out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sidecar import bounds as b
from sidecar.config import NatsConnection
from sidecar.endpoints import EndpointLimits
from sidecar.signing import SigningKey, decode_secret
from sidecar.ssrf import DEFAULT_POLICY, Network, NetworkPolicy


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
    # Columns that still hold what the worker adopted from JetStream (rule_nats_streams.adopted_config):
    # JetStream keeps its own value for them; only what a DBA changed is applied.
    adopted_unchanged: frozenset[str] = frozenset()


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
    adopted_unchanged: frozenset[str] = frozenset()  # as StreamDef.adopted_unchanged

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
    allow_networks: frozenset[Network] = frozenset()
    https_only: bool = False
    max_concurrency: int | None = None
    rate_limit_per_second: float | None = None
    circuit_failure_threshold: int = 5
    circuit_open_seconds: float = 30.0
    disable_after_seconds: float | None = 432000.0
    disabled_reason: str | None = None
    keys: tuple[SigningKey, ...] = ()
    # Routing by subject (sidecar.routing): a message without webhook_url or webhook_id published
    # on nats_subject goes to every enabled, NATS-enabled webhook registered on it.
    nats_subject: str | None = None
    nats_enabled: bool = True

    def __repr__(self) -> str:  # static headers may hold Authorization values, keys are secrets
        return f"WebhookDef({self.webhook_id}, {self.webhook_name!r}, {self.url!r})"

    @property
    def limits(self) -> EndpointLimits:
        return EndpointLimits(
            max_concurrency=self.max_concurrency,
            rate_per_second=self.rate_limit_per_second,
            failure_threshold=self.circuit_failure_threshold,
            open_seconds=self.circuit_open_seconds,
            disable_after_seconds=self.disable_after_seconds,
        )

    def policy(self, base: RetryPolicy) -> RetryPolicy:
        """The consumer's retry policy with this endpoint's overrides applied."""
        return RetryPolicy(
            max_attempts=self.retry_max_attempts or base.max_attempts,
            initial_seconds=self.retry_initial_seconds or base.initial_seconds,
            max_backoff_seconds=self.retry_max_backoff_seconds or base.max_backoff_seconds,
            max_age_seconds=self.retry_max_age_seconds or base.max_age_seconds,
        )


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """rule_nats_delivery_settings, with WEBHOOK_ALLOW_NETWORKS folded into the policy."""

    policy: NetworkPolicy = DEFAULT_POLICY
    max_payload_bytes: int = 1048576


@dataclass(frozen=True, slots=True)
class Registry:
    connections: Mapping[str, NatsConnection] = field(default_factory=dict)
    streams: Mapping[str, StreamDef] = field(default_factory=dict)
    consumers: Mapping[tuple[str, str], ConsumerDef] = field(default_factory=dict)
    webhooks: Mapping[int, WebhookDef] = field(default_factory=dict)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)


def _f(value: Any, default: float) -> float:
    return default if value is None else float(value)


# The columns adopted_config holds (0010_adopt.sql), by table.
STREAM_ADOPTED_COLUMNS = (
    "subjects",
    "storage_type",
    "retention_policy",
    "max_messages",
    "max_bytes",
    "max_age_seconds",
    "max_message_size",
    "discard_policy",
    "replicas",
    "duplicate_window_seconds",
    "description",
)
CONSUMER_ADOPTED_COLUMNS = (
    "filter_subject",
    "max_deliver",
    "ack_wait_seconds",
    "max_ack_pending",
    "deliver_policy",
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return sorted(a or ()) == sorted(b or ())
    numbers = (int, float, Decimal)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return round(float(a), 3) == round(float(b), 3)
    return bool(a == b)


def unchanged_since_adoption(row: Mapping[str, Any], columns: tuple[str, ...]) -> frozenset[str]:
    """The columns whose value is still the one adopted from JetStream (empty for rows a DBA wrote)."""
    adopted = row.get("adopted_config")
    if not isinstance(adopted, Mapping):
        return frozenset()
    return frozenset(c for c in columns if c in adopted and _same(row.get(c), adopted[c]))


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
        adopted_unchanged=unchanged_since_adoption(row, STREAM_ADOPTED_COLUMNS),
    )


def consumer_from_row(row: Mapping[str, Any]) -> ConsumerDef:
    return ConsumerDef(
        consumer_id=int(row["consumer_id"]),
        stream_name=row["stream_name"],
        consumer_name=row["consumer_name"],
        filter_subject=row.get("filter_subject"),
        batch_size=int(row["batch_size"]),
        max_deliver=int(row["max_deliver"]),
        ack_wait_seconds=b.clamp(_f(row["ack_wait_seconds"], 30.0), b.ACK_WAIT),
        max_ack_pending=int(row["max_ack_pending"]),
        deliver_policy=row["deliver_policy"],
        retry=RetryPolicy(
            max_attempts=b.clamp_int(row["retry_max_attempts"], b.RETRY_ATTEMPTS),
            initial_seconds=b.clamp(_f(row["retry_initial_seconds"], 1.0), b.RETRY_INITIAL),
            max_backoff_seconds=b.clamp(_f(row["retry_max_backoff_seconds"], 3600.0), b.RETRY_BACKOFF),
            max_age_seconds=b.clamp(_f(row["retry_max_age_seconds"], 86400.0), b.RETRY_AGE),
        ),
        enabled=bool(row["enabled"]),
        adopted_unchanged=unchanged_since_adoption(row, CONSUMER_ADOPTED_COLUMNS),
    )


def _opt_f(value: Any) -> float | None:
    return None if value is None else float(value)


def settings_from_row(row: Mapping[str, Any] | None, env_allow: frozenset[Network]) -> DeliverySettings:
    if row is None:
        return DeliverySettings(policy=NetworkPolicy(env_allow))
    return DeliverySettings(
        policy=NetworkPolicy(env_allow | frozenset(row["allow_networks"] or ()), bool(row["https_only"])),
        max_payload_bytes=int(row["max_payload_bytes"]),
    )


def keys_from_rows(rows: list[Mapping[str, Any]]) -> dict[int, tuple[SigningKey, ...]]:
    """Signing keys by webhook_id; a malformed secret is skipped (the table's CHECK makes it rare)."""
    out: dict[int, list[SigningKey]] = {}
    for r in rows:
        try:
            key = decode_secret(r["secret"])
        except ValueError:
            continue
        out.setdefault(int(r["webhook_id"]), []).append(
            SigningKey(int(r["secret_id"]), key, _opt_f(r["expires_at"]))
        )
    return {k: tuple(v) for k, v in out.items()}


def webhook_from_row(row: Mapping[str, Any], keys: tuple[SigningKey, ...] = ()) -> WebhookDef:
    headers = row.get("headers") or {}
    return WebhookDef(
        webhook_id=int(row["webhook_id"]),
        webhook_name=row["webhook_name"],
        url=row["url"],
        method=row["method"],
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
        timeout_seconds=b.clamp(_f(row["timeout_seconds"], 10.0), b.TIMEOUT),
        retry_max_attempts=None
        if row.get("retry_max_attempts") is None
        else b.clamp_int(row["retry_max_attempts"], b.RETRY_ATTEMPTS),
        retry_initial_seconds=b.clamp_opt(_opt_f(row.get("retry_initial_seconds")), b.RETRY_INITIAL),
        retry_max_backoff_seconds=b.clamp_opt(_opt_f(row.get("retry_max_backoff_seconds")), b.RETRY_BACKOFF),
        retry_max_age_seconds=b.clamp_opt(_opt_f(row.get("retry_max_age_seconds")), b.RETRY_AGE),
        enabled=bool(row["enabled"]),
        allow_networks=frozenset(row.get("allow_networks") or ()),
        https_only=bool(row.get("https_only", False)),
        max_concurrency=None
        if row.get("max_concurrency") is None
        else b.clamp_int(row["max_concurrency"], b.CONCURRENCY),
        rate_limit_per_second=b.clamp_opt(_opt_f(row.get("rate_limit_per_second")), b.RATE),
        circuit_failure_threshold=b.clamp_int(row.get("circuit_failure_threshold") or 5, b.FAILURE_THRESHOLD),
        circuit_open_seconds=b.clamp(_f(row.get("circuit_open_seconds"), 30.0), b.OPEN_SECONDS),
        disable_after_seconds=b.clamp_opt(
            _opt_f(row.get("disable_after_seconds", 432000.0)), b.DISABLE_AFTER
        ),
        disabled_reason=row.get("disabled_reason"),
        keys=keys,
        nats_subject=row.get("nats_subject"),
        nats_enabled=bool(row.get("nats_enabled", True)),
    )
