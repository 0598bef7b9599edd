"""Which row of rule_nats_consumer_stats a runner reports into, and what it sends (pure)."""

from __future__ import annotations

from sidecar.config import SeedConsumer
from sidecar.stats import StatsKey, Totals, stats_key, totals

SEED = SeedConsumer(
    stream_name="WEBHOOKS", subject="webhooks.>", consumer_name="webhook-workers", batch_size=None
)


def test_a_worker_started_the_original_way_reports_under_its_consumer_name() -> None:
    assert stats_key("WEBHOOKS", "webhook-workers", "webhook-worker-1", SEED) == StatsKey(
        "WEBHOOKS", "webhook-worker-1", "", "webhook-workers"
    )


def test_dba_configured_consumers_report_per_worker_with_the_durable_consumer_as_queue_group() -> None:
    # One row per (stream_name, consumer_name), as the original's unique key (its examples'
    # ON CONFLICT (stream_name, consumer_name) needs it): consumer_name names the worker.
    assert stats_key("ORDERS", "workers", "w1", SEED) == StatsKey("ORDERS", "workers@w1", "w1", "workers")
    assert stats_key("WEBHOOKS", "other", "w1", SEED) == StatsKey("WEBHOOKS", "other@w1", "w1", "other")
    assert stats_key("WEBHOOKS", "webhook-workers", "w1", None) == StatsKey(
        "WEBHOOKS", "webhook-workers@w1", "w1", "webhook-workers"
    )


def test_reports_are_what_happened_since_the_last_one() -> None:
    assert Totals(10, 9, 2, 1).minus(Totals(4, 4, 1, 0)) == Totals(6, 5, 1, 1)


def test_counters_mean_what_the_original_worker_reported() -> None:
    # 8 delivered, 4 failed attempts, 12 NATS acks: processed 12, acknowledged (successful) 8.
    assert totals(delivered=8, failed=4, acked=12, redelivered=0) == Totals(12, 8, 4, 0, 12)
    assert Totals(3, 3, 0, 0).minus(Totals()) == Totals(3, 3, 0, 0)
