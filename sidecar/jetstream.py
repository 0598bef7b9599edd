"""NATS connections for the sidecar: one nats-py client per rule_nats_config row."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg

from sidecar.config import NatsConnection
from sidecar.errors import WorkerError
from sidecar.validation import redact_url, redact_urls_in

logger = logging.getLogger(__name__)


class NatsUnavailable(WorkerError):
    """No connection to NATS could be made (the caller retries later)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # the cause alone (e.g. "[Errno 111] Connection refused")


@dataclass(frozen=True, slots=True)
class NatsState:
    """One configured connection as readiness reports it: the server (without credentials) and,
    when it is not connected, why, in NATS's or the operating system's words."""

    config_name: str
    address: str
    connected: bool
    problem: str | None = None


def servers_text(conn: NatsConnection) -> str:
    """The configured servers, without credentials (logs, last_error and /readyz show it)."""
    return ", ".join(redact_url(s) for s in conn.servers)


def connect_options(conn: NatsConnection, name: str) -> dict[str, Any]:
    """Keyword arguments for nats.connect() (pure; no secret is logged from here)."""
    opts: dict[str, Any] = {
        "servers": list(conn.servers),
        "name": name,
        "connect_timeout": conn.connect_timeout,
        "reconnect_time_wait": conn.reconnect_wait,
        "max_reconnect_attempts": conn.max_reconnect_attempts,
        "allow_reconnect": True,
        # Do not shuffle: rule_nats_config lists the primary server first on purpose.
        "dont_randomize": True,
    }
    if conn.auth_type == "user_password":
        opts["user"], opts["password"] = conn.user, conn.password
    elif conn.auth_type == "token":
        opts["token"] = conn.token
    elif conn.auth_type == "credentials":
        opts["user_credentials"] = (
            RawCredentials(conn.credentials) if conn.credentials else conn.credentials_file
        )
    elif conn.auth_type == "nkey":
        opts["nkeys_seed_str"] = conn.nkey_seed
    if conn.tls or any(s.startswith("tls://") for s in conn.servers):
        opts["tls"] = tls_context(conn)
    return opts


def tls_context(conn: NatsConnection) -> ssl.SSLContext:
    """The client's TLS settings: PEM text from rule_nats_config, or files on the sidecar's host."""
    ctx = ssl.create_default_context(cafile=conn.tls_ca_file, cadata=conn.tls_ca_pem)
    if conn.tls_cert_file:
        ctx.load_cert_chain(conn.tls_cert_file, conn.tls_key_file)
    elif conn.tls_cert_pem:
        # ssl loads a certificate chain from a file only: a private directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="webhook-worker-") as folder:
            path = os.path.join(folder, "client.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(conn.tls_cert_pem.rstrip("\n") + "\n" + (conn.tls_key_pem or ""))
            ctx.load_cert_chain(path)
    return ctx


# Longest a replaced connection is kept open for the messages that arrived on it: by then JetStream
# has redelivered whatever it carried that was not acknowledged (ack waits are seconds to minutes).
RETIRE_LIMIT = 120.0
RETIRE_POLL = 0.2
# After a failed connect, get() answers with that failure at once for this long (at least; or the
# configuration's reconnect_wait): a reload does not wait for the connect timeout once per stream
# and consumer, and neither does SIGTERM. The worker's probe tries again every second.
RETRY_AFTER = 1.0
# Draining a client at exit: a server that does not answer must not hold up the shutdown.
CLOSE_DRAIN_SECONDS = 1.0


def _nobody() -> set[int]:
    return set()


class NatsPool:
    """Keeps one connected client per configuration; replaces it when the configuration changes.

    A replaced client is not closed at once: messages that arrived on it are acknowledged on it
    (an acknowledgement is a publish to the message's reply subject, which means something only on
    the server and account the message came from; the new configuration may name others). It is
    retired: closed once ``in_use`` no longer names it (``id()`` of the clients the consumer runners
    still hold messages or subscriptions of), or after RETIRE_LIMIT.
    """

    def __init__(
        self,
        client_name: str,
        in_use: Callable[[], set[int]] = _nobody,
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.client_name = client_name
        self.in_use = in_use
        # Told (config name, connected) when a connection comes up, comes back or is lost.
        self.on_change = on_change
        self._clients: dict[str, tuple[NatsConnection, NatsClient]] = {}
        self._retired: set[NatsClient] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}  # one connect at a time per configuration
        self._failures: dict[str, tuple[NatsConnection, str, float]] = {}  # the last failed connect
        self._last_error: dict[str, str] = {}  # the last error nats-py reported, per configuration
        self._closing = False

    def known(self) -> set[str]:
        """Configurations this pool has a client of, or failed to connect."""
        return {*self._clients, *self._failures}

    def state(self, conn: NatsConnection) -> NatsState:
        """Is this configuration connected now? If not, why (readiness, nats_worker_status)."""
        name, servers = conn.config_name, servers_text(conn)
        down = f"NATS connection {name!r} is down ({servers})"
        cached = self._clients.get(name)
        if cached is not None and cached[0] == conn and not cached[1].is_closed:
            client = cached[1]
            if client.is_connected:
                url = client.connected_url
                address = url.netloc.rpartition("@")[2] if url is not None else servers
                return NatsState(name, address, True)
            return NatsState(name, servers, False, f"{down}: {self._last_error.get(name) or 'reconnecting'}")
        failure = self._failures.get(name)
        if failure is not None and failure[0] == conn:
            return NatsState(name, servers, False, f"{down}: {failure[1]}")
        if name in self._last_error:  # the first connect is still trying
            return NatsState(name, servers, False, f"{down}: {self._last_error[name]}")
        return NatsState(name, servers, False, f"NATS connection {name!r} is not connected yet ({servers})")

    def connected(self, conn: NatsConnection) -> NatsClient:
        """The client of this configuration if it is connected right now, else NatsUnavailable at
        once: for requests that would only wait for their timeout (stream info, the relay)."""
        cached = self._clients.get(conn.config_name)
        if cached is not None and cached[0] == conn and cached[1].is_connected:
            return cached[1]
        state = self.state(conn)
        raise NatsUnavailable(state.problem or f"NATS connection {conn.config_name!r} is not connected")

    async def get(self, conn: NatsConnection) -> NatsClient:
        lock = self._locks.setdefault(conn.config_name, asyncio.Lock())
        async with lock:
            cached = self._clients.get(conn.config_name)
            if cached is not None and cached[0] == conn and not cached[1].is_closed:
                return cached[1]
            failure = self._failures.get(conn.config_name)
            if (
                failure is not None
                and failure[0] == conn
                and time.monotonic() - failure[2] < max(RETRY_AFTER, conn.reconnect_wait)
            ):
                raise NatsUnavailable(
                    f"cannot connect to NATS ({conn.config_name}: {servers_text(conn)}): {failure[1]}"
                )
            # Connect first: when the new configuration cannot connect (a wrong new password), the
            # old client goes on serving what runs on it, and the error is reported by the caller.
            try:
                client = await self._connect(conn)
            except NatsUnavailable as exc:
                self._failures[conn.config_name] = (conn, exc.reason, time.monotonic())
                raise
            was_down = self._failures.pop(conn.config_name, None) is not None
            if cached is not None:
                self._retire(conn.config_name, cached[1])
            self._clients[conn.config_name] = (conn, client)
            if was_down:
                self._changed(conn.config_name, True)
            return client

    def _changed(self, config_name: str, connected: bool) -> None:
        if self.on_change is not None and not self._closing:
            self.on_change(config_name, connected)

    def _retire(self, config_name: str, client: NatsClient) -> None:
        if client.is_closed:
            return
        self._retired.add(client)
        task = asyncio.create_task(
            self._close_when_unused(config_name, client), name=f"retire NATS {config_name}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_unused(self, config_name: str, client: NatsClient) -> None:
        deadline = time.monotonic() + RETIRE_LIMIT
        while id(client) in self.in_use() and not client.is_closed and time.monotonic() < deadline:  # noqa: ASYNC110 - polled set, no event
            await asyncio.sleep(RETIRE_POLL)
        logger.info(
            "NATS %s: closing the connection the configuration change replaced",
            config_name,
            extra={"action": "nats_retired"},
        )
        self._retired.discard(client)
        await _close(client)

    async def _connect(self, conn: NatsConnection) -> NatsClient:
        name, servers = conn.config_name, servers_text(conn)
        self._last_error.pop(name, None)
        # The client this attempt makes, once it has connected (its callbacks report on it only then).
        made: list[NatsClient] = []

        def current() -> bool:
            cached = self._clients.get(name)
            return bool(made) and cached is not None and cached[1] is made[0]

        async def on_error(exc: Exception) -> None:
            why = redact_urls_in(str(exc)) or type(exc).__name__
            if not made or current():
                self._last_error[name] = why
            logger.warning("NATS %s (%s): %s", name, servers, why, extra={"action": "nats_error"})

        async def on_disconnect() -> None:
            level = logging.DEBUG if self._closing else logging.WARNING
            logger.log(
                level, "NATS %s (%s): disconnected", name, servers, extra={"action": "nats_disconnected"}
            )
            if current():
                self._changed(name, False)

        async def on_reconnect() -> None:
            logger.info("NATS %s (%s): reconnected", name, servers, extra={"action": "nats_reconnected"})
            if current():
                self._last_error.pop(name, None)
                self._changed(name, True)

        opts = connect_options(conn, self.client_name)
        # Bound the initial connect ourselves: nats-py retries servers on its own schedule.
        budget = (conn.connect_timeout + conn.reconnect_wait + 0.5) * max(1, len(conn.servers))
        try:
            client = await asyncio.wait_for(
                nats.connect(
                    **opts, error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect
                ),
                timeout=budget,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # Written to rule_nats_stream_state.last_error and logged: servers may carry user:password@.
            # A timeout is our own bound: the reason is what the attempts ran into (e.g. ECONNREFUSED).
            why = self._last_error.get(name) or redact_urls_in(str(exc)) or type(exc).__name__
            raise NatsUnavailable(f"cannot connect to NATS ({name}: {servers}): {why}", reason=why) from exc
        made.append(client)
        self._last_error.pop(name, None)
        logger.info(
            "connected to NATS %s at %s",
            conn.config_name,
            client.connected_url.netloc.rpartition("@")[2] if client.connected_url else "?",
            extra={"action": "nats_connected"},
        )
        return client

    async def close(self) -> None:
        self._closing = True
        for task in list(self._retiring):
            task.cancel()
        async with self._lock:
            for client in [*(c for _, c in self._clients.values()), *self._retired]:
                await _close(client, CLOSE_DRAIN_SECONDS)
            self._clients.clear()
            self._retired.clear()


async def _close(client: NatsClient, drain_seconds: float = 5.0) -> None:
    if not client.is_connected:  # nothing to drain: a reconnecting client refuses to
        with contextlib.suppress(Exception):
            await client.close()
        return
    try:
        await asyncio.wait_for(client.drain(), timeout=drain_seconds)
    except Exception:  # a client that is already gone has nothing to drain
        logger.debug("NATS drain failed; closing", exc_info=True)
        try:
            await client.close()
        except Exception:
            logger.debug("NATS close failed", exc_info=True)


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    seq: int
    duplicate: bool


def _settle(fut: asyncio.Future[Ack], msg: Msg) -> None:
    """A PubAck (or JetStream's refusal) for the message this future waits for."""
    status = (msg.headers or {}).get("Status")
    if status == "503":
        fut.set_exception(nats.js.errors.NoStreamResponseError())
        return
    try:
        body = json.loads(msg.data)
    except ValueError:
        fut.set_exception(nats.js.errors.APIError(description=f"unreadable PubAck {msg.data[:100]!r}"))
        return
    err = body.get("error")
    if err:
        fut.set_exception(
            nats.js.errors.APIError(
                code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
            )
        )
        return
    fut.set_result(Ack(str(body.get("stream")), int(body.get("seq", 0)), bool(body.get("duplicate", False))))


async def publish_batch(
    client: NatsClient, items: list[tuple[str, bytes, dict[str, str]]], ack_wait_s: float
) -> list[tuple[Ack | BaseException, float]]:
    """Publish many messages to JetStream at once and collect each PubAck (or its error), with
    each message's own latency in ms: from its publish to its answer (or to the end of the wait).

    One reply subscription serves the whole batch; nats-py's js.publish makes a request
    (a future, an inbox entry) per message, which capped the outbox relay at about half
    of what this reaches. Results are in the order of ``items``.
    """
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Ack]] = [loop.create_future() for _ in items]
    sent = [0.0] * len(items)
    answered = [0.0] * len(items)
    prefix = client.new_inbox()

    async def on_reply(msg: Msg) -> None:
        try:
            i = int(msg.subject.rsplit(".", 1)[1])
            fut = futures[i]
        except (ValueError, IndexError):
            return
        if fut.done():
            return
        answered[i] = time.perf_counter()
        _settle(fut, msg)

    sub = await client.subscribe(prefix + ".*", cb=on_reply, pending_msgs_limit=max(65536, len(items) * 2))
    try:
        for i, (subject, payload, headers) in enumerate(items):
            sent[i] = time.perf_counter()
            try:
                await client.publish(subject, payload, reply=f"{prefix}.{i}", headers=headers)
            except Exception as exc:  # e.g. MaxPayloadError: that message only
                answered[i] = time.perf_counter()
                futures[i].set_exception(exc)
        await asyncio.wait(futures, timeout=ack_wait_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    ended = time.perf_counter()
    results: list[tuple[Ack | BaseException, float]] = []
    for i, fut in enumerate(futures):
        latency_ms = ((answered[i] or ended) - sent[i]) * 1000.0
        if not fut.done():
            fut.cancel()
            results.append((nats.errors.TimeoutError(), latency_ms))
        elif fut.exception() is not None:
            results.append((fut.exception(), latency_ms))  # type: ignore[arg-type]
        else:
            results.append((fut.result(), latency_ms))
    return results
