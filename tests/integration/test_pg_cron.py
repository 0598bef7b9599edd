"""Scheduled retention with pg_cron (docs/operations.md, "Retention"): the recipe, run by pg_cron in a
cluster of this test's own (pg_cron must be in shared_preload_libraries, which the session cluster
does not load). Debian's postgresql-15-cron; scripts/setup installs it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sidecar import migrate
from tests.support.stack import PostgresCluster, pg_bindir
from tests.support.waits import wait_until

CRON_DB = "cron_app"
pytestmark = pytest.mark.skipif(
    not (pg_bindir().parent / "lib/pg_cron.so").exists(), reason="pg_cron is not installed (scripts/setup)"
)


class CronCluster(PostgresCluster):
    def options(self) -> str:
        # jobs run as background workers: no connection (and no password) needed
        return (
            f"{super().options()} -c shared_preload_libraries=pg_cron -c cron.database_name={CRON_DB} "
            "-c cron.use_background_workers=on -c max_worker_processes=16 -c cron.timezone=UTC"
        )


@pytest.fixture(scope="module")
def cron_url() -> Iterator[str]:
    cluster = CronCluster(Path(tempfile.mkdtemp(prefix="wwtest-cron-")))
    # the database pg_cron runs in must exist before the launcher looks for it: create it, restart
    cluster.start()
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {CRON_DB}")
        cluster.stop()
        cluster.start()
        migrate.migrate(cluster.url(CRON_DB))
        yield cluster.url(CRON_DB)
    finally:
        cluster.cleanup()


RECIPE = """
CREATE EXTENSION IF NOT EXISTS pg_cron;
UPDATE rule_nats_retention SET run_every_seconds = NULL;        -- the sidecars stop purging
SELECT cron.schedule('nats-purge', '{schedule}', 'CALL rule_nats_purge()');
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_pg_cron_runs_the_retention_purge(cron_url: str) -> None:
    with psycopg.connect(cron_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO rule_nats_delivery_attempts (attempted_at, stream_name, consumer_name, attempt, outcome) "
            "SELECT now() - make_interval(days => d), 'S', 'c', 1, 'delivered' FROM generate_series(1, 60) d"
        )
        db.execute("UPDATE rule_nats_retention SET attempts_days = 30")
        # the recipe of docs/operations.md, every minute instead of hourly (pg_cron 1.4 counts in minutes)
        for statement in RECIPE.format(schedule="* * * * *").strip().split(";\n"):
            db.execute(statement)
        assert db.execute("SELECT count(*) FROM cron.job WHERE jobname = 'nats-purge'").fetchone() == (1,)

        def ran() -> bool:
            row = db.execute("SELECT last_run_at IS NOT NULL FROM rule_nats_retention").fetchone()
            return bool(row and row[0])

        assert wait_until(ran, timeout=75, interval=1.0), db.execute(
            "SELECT status, return_message FROM cron.job_run_details"
        ).fetchall()
        (result,) = db.execute("SELECT last_result FROM rule_nats_retention").fetchone() or (None,)
        assert result and result["attempts"] == 31, result  # 31..60 days old: older than 30 days
        assert db.execute("SELECT max(attempted_at) < now() - interval '29 days', count(*) "
                          "FROM rule_nats_delivery_attempts").fetchone() == (False, 29)  # fmt: skip
        details = db.execute("SELECT status FROM cron.job_run_details").fetchall()
        assert ("succeeded",) in details, details
