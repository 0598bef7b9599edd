"""Configuration as frozen dataclasses (pure logic: parsing and validation, no I/O).

Two sources: the process settings (command line, environment, ``.env``) and the
registry rows in PostgreSQL. Durations are seconds everywhere; they become
nanoseconds only where nats-py talks to JetStream.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError
from sidecar.ssrf import Network, parse_networks
from sidecar.validation import redact_url

# Every environment variable the worker reads (README's table documents each; a test checks).
ENVIRONMENT_VARIABLES = frozenset(
    {
        "DATABASE_URL", "NATS_URL", "NATS_USER", "NATS_PASS", "STREAM_NAME", "SUBJECT", "QUEUE_GROUP",
        "BATCH_SIZE", "CONSUMER_NAME", "METRICS_ADDR_FILE", "WORKER_NAME", "WEBHOOK_ALLOW_NETWORKS", "OUTBOX_BATCH_SIZE",
        "OUTBOX_POLL_INTERVAL", "HEARTBEAT_INTERVAL", "SHUTDOWN_TIMEOUT", "DB_POOL_SIZE", "METRICS_ADDR",
        "SUMMARY_INTERVAL", "LOG_LEVEL", "LOG_FORMAT",
    }
)  # fmt: skip

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_WORKER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


def _int(env: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], key: str, default: float, low: float, high: float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number of seconds, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class SeedConsumer:
    """A consumer described by the original worker's environment variables."""

    stream_name: str
    subject: str
    consumer_name: str
    batch_size: int | None


@dataclass(frozen=True, slots=True)
class NatsOverride:
    """NATS_URL / NATS_USER / NATS_PASS: apply to the 'default' connection of this process only."""

    url: str | None = None
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # NATS_URL may carry user:password@ (as the original worker allowed)
        shown = None if self.url is None else ",".join(redact_url(u) for u in self.url.split(","))
        return f"NatsOverride(url={shown!r}, user={self.user!r}, password={'***' if self.password else None})"


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = field(repr=False)  # may hold a password
    worker_name: str
    seed: SeedConsumer | None = None
    nats_override: NatsOverride = field(default_factory=NatsOverride)
    outbox_batch_size: int = 500
    outbox_poll_interval: float = 1.0
    heartbeat_interval: float = 5.0
    shutdown_timeout: float = 30.0
    db_pool_size: int = 4
    allow_networks: frozenset[Network] = frozenset()
    metrics_addr: str | None = None
    metrics_addr_file: str | None = None
    summary_interval: float = 60.0


_CONTAINER_ID = re.compile(r"/containers/([0-9a-f]{64})/")


def container_id(mountinfo: str) -> str | None:
    """The Docker container this process runs in, from /proc/self/mountinfo (Docker bind-mounts
    /etc/hostname from /var/lib/docker/containers/ID/): None outside a container."""
    match = _CONTAINER_ID.search(mountinfo)
    return match.group(1)[:12] if match else None


def default_worker_name(mountinfo_path: str = "/proc/self/mountinfo") -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:200] or "host"
    try:
        cid = container_id(Path(mountinfo_path).read_text())
    except OSError:
        cid = None
    # Replicas on the host's network share its host name, and each is pid 1 of its container:
    # the container id tells them apart (with a private network the host name is that id already).
    if cid is not None and not host.startswith(cid):
        return f"{host}-{cid}"
    return f"{host}-{os.getpid()}"


DATABASE_URL_SCHEMES = ("postgresql://", "postgres://")


def check_database_url(url: str) -> str:
    """A PostgreSQL URL, or a ConfigError that says what one looks like (psycopg would take anything
    else for a key=value string and fail with a traceback about a missing '=')."""
    if not url.startswith(DATABASE_URL_SCHEMES):
        raise ConfigError(
            f"database URL {redact_url(url)!r} does not start with postgresql://: "
            "use postgresql://HOST:PORT/DATABASE (with USER:PASSWORD@ before HOST)"
        )
    return url


def settings_from_env(env: Mapping[str, str], database_url: str | None = None) -> Settings:
    """Build Settings from the environment (and .env) with clear errors for bad values."""
    url = database_url or env.get("DATABASE_URL", "").strip()
    if not url:
        raise ConfigError("DATABASE_URL is not set: pass --database-url or set it in the environment or .env")
    check_database_url(url)
    # CONSUMER_NAME names this worker instance; QUEUE_GROUP names the shared durable consumer
    # (so three workers with distinct CONSUMER_NAME and one QUEUE_GROUP share the work).
    worker = (
        env.get("WORKER_NAME", "").strip() or env.get("CONSUMER_NAME", "").strip() or default_worker_name()
    )
    if not _WORKER_NAME.match(worker):
        raise ConfigError(f"worker name {worker!r}: use 1-255 of A-Z a-z 0-9 _ . -")

    stream = env.get("STREAM_NAME", "").strip()
    subject = env.get("SUBJECT", "").strip()
    group = env.get("QUEUE_GROUP", "").strip()
    batch_raw = env.get("BATCH_SIZE", "").strip()
    seed: SeedConsumer | None = None
    if stream or subject or group:
        if not (stream and subject):
            raise ConfigError("STREAM_NAME and SUBJECT go together (QUEUE_GROUP and BATCH_SIZE are optional)")
        if not _NAME.match(stream):
            raise ConfigError(f"STREAM_NAME {stream!r}: use 1-255 of A-Z a-z 0-9 _ -")
        durable = group or env.get("CONSUMER_NAME", "").strip() or "webhook-worker"
        if not _NAME.match(durable):
            raise ConfigError(f"QUEUE_GROUP {durable!r}: use 1-255 of A-Z a-z 0-9 _ - (no dots)")
        seed = SeedConsumer(
            stream_name=stream,
            subject=subject,
            consumer_name=durable,
            batch_size=_int(env, "BATCH_SIZE", 10, 1, 10000) if batch_raw else None,
        )
    override = NatsOverride(
        url=env.get("NATS_URL", "").strip() or None,
        user=env.get("NATS_USER", "").strip() or None,
        password=env.get("NATS_PASS") or None,
    )
    try:
        allow = parse_networks(env.get("WEBHOOK_ALLOW_NETWORKS"))
    except ValueError as exc:
        raise ConfigError(f"WEBHOOK_ALLOW_NETWORKS: {exc}") from None
    return Settings(
        database_url=url,
        worker_name=worker,
        seed=seed,
        nats_override=override,
        outbox_batch_size=_int(env, "OUTBOX_BATCH_SIZE", 500, 1, 10000),
        outbox_poll_interval=_float(env, "OUTBOX_POLL_INTERVAL", 1.0, 0.05, 60.0),
        heartbeat_interval=_float(env, "HEARTBEAT_INTERVAL", 5.0, 0.2, 300.0),
        shutdown_timeout=_float(env, "SHUTDOWN_TIMEOUT", 30.0, 0.0, 3600.0),
        db_pool_size=_int(env, "DB_POOL_SIZE", 4, 2, 100),
        allow_networks=allow,
        metrics_addr=env.get("METRICS_ADDR", "").strip() or None,
        metrics_addr_file=env.get("METRICS_ADDR_FILE", "").strip() or None,
        summary_interval=_float(env, "SUMMARY_INTERVAL", 60.0, 0.0, 86400.0),
    )


@dataclass(frozen=True, slots=True)
class NatsConnection:
    """One row of rule_nats_config (with the process override applied to 'default')."""

    config_name: str
    servers: tuple[str, ...]
    auth_type: str = "none"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    credentials_file: str | None = None
    nkey_seed: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    credentials: str | None = None  # the text of a .creds file (auth_credentials)
    tls_ca_pem: str | None = None
    tls_cert_pem: str | None = None
    tls_key_pem: str | None = None
    connect_timeout: float = 2.0
    request_timeout: float = 5.0
    reconnect_wait: float = 2.0
    max_reconnect_attempts: int = -1

    def __repr__(self) -> str:  # never print secrets
        return f"NatsConnection({self.config_name!r}, servers={self.servers!r}, auth={self.auth_type})"


def nats_connection_from_row(row: Mapping[str, Any], override: NatsOverride | None = None) -> NatsConnection:
    conn = NatsConnection(
        config_name=row["config_name"],
        servers=(row["nats_url"], *(row.get("nats_cluster_urls") or ())),
        auth_type=row["auth_type"],
        user=row.get("nats_user"),
        password=row.get("nats_password"),
        token=row.get("auth_token"),
        credentials_file=row.get("auth_credentials_file"),
        nkey_seed=row.get("auth_nkey_seed"),
        tls=bool(row.get("tls_enabled")),
        tls_ca_file=row.get("tls_ca_file"),
        tls_cert_file=row.get("tls_cert_file"),
        tls_key_file=row.get("tls_key_file"),
        credentials=row.get("auth_credentials"),
        tls_ca_pem=row.get("tls_ca_pem"),
        tls_cert_pem=row.get("tls_cert_pem"),
        tls_key_pem=row.get("tls_key_pem"),
        connect_timeout=float(row.get("connect_timeout_seconds") or 2),
        request_timeout=float(row.get("request_timeout_seconds") or 5),
        reconnect_wait=float(row.get("reconnect_wait_seconds") or 0),
        max_reconnect_attempts=int(row.get("max_reconnect_attempts", -1)),
    )
    if override is not None and conn.config_name == "default":
        if override.url:
            conn = replace(conn, servers=tuple(u.strip() for u in override.url.split(",") if u.strip()))
        if override.user:
            conn = replace(
                conn, auth_type="user_password", user=override.user, password=override.password or ""
            )
    return conn
