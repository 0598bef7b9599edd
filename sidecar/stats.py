"""What the sidecar writes into rule_nats_consumer_stats (pure).

Three rules from the original worker's contract:
  * a worker started the original way (STREAM_NAME, SUBJECT, QUEUE_GROUP, CONSUMER_NAME) reports
    under its CONSUMER_NAME, so the original's documented queries
    (``WHERE consumer_name = 'webhook-worker-1'``) find its row; consumers a DBA registered report
    per durable consumer and worker instance;
  * counters only grow: the sidecar sends what happened since its last report, and the database
    adds it, so a restart (of the process or of one consumer) never makes a figure go down;
  * the counters mean what the original's worker reported (``totals``): messages_delivered the
    messages processed (every attempt, whatever its outcome), messages_acknowledged those delivered
    successfully, avg_processing_time_ms the HTTP time of the successful requests. This project's
    other measures have columns of their own (nats_acks, avg_ack_time_ms).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import SeedConsumer


@dataclass(frozen=True, slots=True)
class StatsKey:
    stream_name: str
    consumer_name: str
    worker_name: str
    queue_group: str | None = None  # the durable consumer the workers share (the original's QUEUE_GROUP)


@dataclass(frozen=True, slots=True)
class Totals:
    delivered: int = 0
    acked: int = 0
    failed: int = 0
    redelivered: int = 0
    nats_acks: int = 0

    def minus(self, earlier: Totals) -> Totals:
        return Totals(
            self.delivered - earlier.delivered,
            self.acked - earlier.acked,
            self.failed - earlier.failed,
            self.redelivered - earlier.redelivered,
            self.nats_acks - earlier.nats_acks,
        )


def totals(delivered: int, failed: int, acked: int, redelivered: int) -> Totals:
    """A runner's counters (successful deliveries, failed attempts, NATS acks, redeliveries) in the
    original's meaning: processed = delivered + failed; acknowledged = delivered successfully."""
    return Totals(delivered + failed, delivered, failed, redelivered, acked)


def stats_key(stream_name: str, consumer_name: str, worker_name: str, seed: SeedConsumer | None) -> StatsKey:
    """The row a runner reports into: one per (stream_name, consumer_name), as in the original, whose
    consumer_name names a worker and queue_group the durable consumer the workers share."""
    if seed is not None and (seed.stream_name, seed.consumer_name) == (stream_name, consumer_name):
        return StatsKey(stream_name, worker_name, "", consumer_name)
    return StatsKey(stream_name, f"{consumer_name}@{worker_name}", worker_name, consumer_name)
