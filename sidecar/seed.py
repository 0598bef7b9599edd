"""STREAM_NAME/SUBJECT/QUEUE_GROUP: the stream and consumer the environment names, registered in
the registry tables at the first reload that can ask JetStream about them."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import nats.errors
import nats.js.errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from sidecar.config import NatsConnection, nats_connection_from_row
from sidecar.jetstream import NatsUnavailable
from sidecar.queries import query
from sidecar.reconcile import adopted_consumer, adopted_stream
from sidecar.worker_state import SEED_CONFIG, WorkerState

logger = logging.getLogger(__name__)


class Seed:
    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.pending = False  # rows not registered yet (set at registration; NATS did not answer)

    async def run(self) -> None:
        """STREAM_NAME/SUBJECT/QUEUE_GROUP: register the stream and consumer when the registry lacks
        them, adopting what JetStream already has as it is (rule_nats_adopt_consumer).

        The original worker never changed a stream: one created by an operator with three replicas
        must not become a row with the defaults, which the reconcile would then apply. So the rows are
        written only once JetStream has answered whether the stream exists; until then (NATS down)
        each reload tries again, and nothing is registered or reconciled for them meanwhile.
        """
        seed = self.state.settings.seed
        if seed is None or not self.pending:
            return
        async with self.state.io.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query("nats_config_all"))
            rows = {r["config_name"]: r for r in await cur.fetchall()}
        if SEED_CONFIG not in rows:
            logger.warning(
                "no NATS configuration %r to seed with", SEED_CONFIG, extra={"action": "seed_waiting"}
            )
            return
        nats_conn = nats_connection_from_row(rows[SEED_CONFIG], self.state.settings.nats_override)
        try:
            stream, consumer = await self._seed_adopts(nats_conn)
        except (NatsUnavailable, nats.errors.Error, TimeoutError) as exc:
            logger.warning(
                "cannot ask JetStream about stream %s yet (%s); registering it later",
                seed.stream_name,
                exc,
                extra={"action": "seed_waiting"},
            )
            return
        await self._seed_write(stream, consumer)

    async def _seed_adopts(
        self, nats_conn: NatsConnection
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The seed's stream and consumer as JetStream has them (None: it has none)."""
        seed = self.state.settings.seed
        assert seed is not None
        client = await self.state.io.nats.get(nats_conn)
        js = client.jetstream(timeout=nats_conn.request_timeout)
        stream: dict[str, Any] | None = None
        consumer: dict[str, Any] | None = None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            stream = adopted_stream((await js.stream_info(seed.stream_name)).config)
        if stream is not None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                consumer = adopted_consumer(
                    (await js.consumer_info(seed.stream_name, seed.consumer_name)).config
                )
        return stream, consumer

    async def _seed_write(self, stream: dict[str, Any] | None, consumer: dict[str, Any] | None) -> None:
        seed = self.state.settings.seed
        assert seed is not None
        async with self.state.io.pool.connection() as conn:
            await conn.execute(
                query("adopt_consumer"),
                {
                    "stream_name": seed.stream_name,
                    "subject": seed.subject,
                    "consumer_name": seed.consumer_name,
                    "batch_size": seed.batch_size,
                    "config_name": SEED_CONFIG,
                    "stream": None if stream is None else Jsonb(stream),
                    "consumer": None if consumer is None else Jsonb(consumer),
                },
            )
        self.pending = False
        logger.info(
            "registered consumer %s on stream %s (subject %s) from the environment%s",
            seed.consumer_name,
            seed.stream_name,
            seed.subject,
            "" if stream is None else " (rows that were missing copy the stream as JetStream has it)",
            extra={"action": "seed_registered", "adopted": stream is not None},
        )
