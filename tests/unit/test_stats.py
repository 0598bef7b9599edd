"""Which row of rule_nats_consumer_stats a runner reports into, and what it sends (pure)."""

from __future__ import annotations

from sidecar.config import SeedConsumer
from sidecar.stats import StatsKey, Totals, stats_key

SEED = SeedConsumer(
    stream_name="WEBHOOKS", subject="webhooks.>", consumer_name="webhook-workers", batch_size=None
)


def test_a_worker_started_the_original_way_reports_under_its_consumer_name() -> None:
    assert stats_key("WEBHOOKS", "webhook-workers", "webhook-worker-1", SEED) == StatsKey(
        "WEBHOOKS", "webhook-worker-1", ""
    )


def test_dba_configured_consumers_report_per_durable_consumer_and_worker() -> None:
    assert stats_key("ORDERS", "workers", "w1", SEED) == StatsKey("ORDERS", "workers", "w1")
    assert stats_key("WEBHOOKS", "other", "w1", SEED) == StatsKey("WEBHOOKS", "other", "w1")
    assert stats_key("WEBHOOKS", "webhook-workers", "w1", None) == StatsKey(
        "WEBHOOKS", "webhook-workers", "w1"
    )


def test_reports_are_what_happened_since_the_last_one() -> None:
    assert Totals(10, 9, 2, 1).minus(Totals(4, 4, 1, 0)) == Totals(6, 5, 1, 1)
    assert Totals(3, 3, 0, 0).minus(Totals()) == Totals(3, 3, 0, 0)
