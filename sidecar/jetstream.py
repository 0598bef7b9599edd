"""NATS connections for the sidecar: one nats-py client per rule_nats_config row."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sidecar.config import NatsConnection
from sidecar.errors import WorkerError
from sidecar.validation import redact_url, redact_urls_in

logger = logging.getLogger(__name__)


class NatsUnavailable(WorkerError):
    """No connection to NATS could be made (the caller retries later)."""


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
        opts["user_credentials"] = conn.credentials_file
    elif conn.auth_type == "nkey":
        opts["nkeys_seed_str"] = conn.nkey_seed
    if conn.tls or any(s.startswith("tls://") for s in conn.servers):
        ctx = ssl.create_default_context(cafile=conn.tls_ca_file)
        if conn.tls_cert_file:
            ctx.load_cert_chain(conn.tls_cert_file, conn.tls_key_file)
        opts["tls"] = ctx
    return opts


# Longest a replaced connection is kept open for the messages that arrived on it: by then JetStream
# has redelivered whatever it carried that was not acknowledged (ack waits are seconds to minutes).
RETIRE_LIMIT = 120.0
RETIRE_POLL = 0.2


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

    def __init__(self, client_name: str, in_use: Callable[[], set[int]] = _nobody) -> None:
        self.client_name = client_name
        self.in_use = in_use
        self._clients: dict[str, tuple[NatsConnection, NatsClient]] = {}
        self._retired: set[NatsClient] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._closing = False

    def disconnected(self) -> list[str]:
        """Names of the connections that are not connected right now (reconnecting or closed)."""
        return [name for name, (_, client) in self._clients.items() if not client.is_connected]

    async def get(self, conn: NatsConnection) -> NatsClient:
        async with self._lock:
            cached = self._clients.get(conn.config_name)
            if cached is not None and cached[0] == conn and not cached[1].is_closed:
                return cached[1]
            # Connect first: when the new configuration cannot connect (a wrong new password), the
            # old client goes on serving what runs on it, and the error is reported by the caller.
            client = await self._connect(conn)
            if cached is not None:
                self._retire(conn.config_name, cached[1])
            self._clients[conn.config_name] = (conn, client)
            return client

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
        async def on_error(exc: Exception) -> None:
            logger.warning(
                "NATS %s: %s", conn.config_name, redact_urls_in(str(exc)), extra={"action": "nats_error"}
            )

        async def on_disconnect() -> None:
            level = logging.DEBUG if self._closing else logging.WARNING
            logger.log(
                level, "NATS %s: disconnected", conn.config_name, extra={"action": "nats_disconnected"}
            )

        async def on_reconnect() -> None:
            logger.info("NATS %s: reconnected", conn.config_name, extra={"action": "nats_reconnected"})

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
            servers = ", ".join(redact_url(s) for s in conn.servers)
            why = redact_urls_in(str(exc)) or type(exc).__name__
            raise NatsUnavailable(f"cannot connect to NATS ({conn.config_name}: {servers}): {why}") from exc
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
                await _close(client)
            self._clients.clear()
            self._retired.clear()


async def _close(client: NatsClient) -> None:
    try:
        await asyncio.wait_for(client.drain(), timeout=5)
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
        fut.set_result(
            Ack(str(body.get("stream")), int(body.get("seq", 0)), bool(body.get("duplicate", False)))
        )

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
