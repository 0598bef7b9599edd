"""`run` and `status` against a database that cannot serve them: one line, exit code 2, no traceback.

Each failed before sidecar/preflight.py: a 25-line traceback (UndefinedTable, UndefinedColumn), or
30 s of retries ending in "pool initialization incomplete" without the cause.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from sidecar import migrate
from sidecar.app import RECONNECT_SECONDS, Worker
from sidecar.config import Settings
from tests.support.stack import PostgresCluster

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, url: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", *args, "--database-url", url],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_database_without_the_schema(empty_database_url: str, command: str) -> None:
    res = cli(command, url=empty_database_url)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "no webhook-worker schema" in res.stderr and "webhook-worker migrate" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_half_migrated_database_names_what_is_missing(
    empty_database_url: str, tmp_path: Path, command: str
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for f in sorted(migrate.sql_dir().glob("000[123]_*.sql")):
        (old / f.name).write_text(f.read_text())
    migrate.migrate(empty_database_url, old)
    res = cli(command, url=empty_database_url)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "0004_safety.sql" in res.stderr and "0006_security.sql" in res.stderr
    assert "webhook-worker migrate" in res.stderr


def test_a_missing_database_fails_at_once_with_the_cause(pg_cluster: PostgresCluster) -> None:
    # A generous bound: the retries it made before took 30 s and ended without the cause.
    res = cli("run", url=pg_cluster.url("no_such_database"), timeout=20)
    assert res.returncode == 2, res.stderr
    assert "pool initialization incomplete" not in res.stderr
    assert 'database "no_such_database" does not exist' in res.stderr
    assert "Traceback" not in res.stderr


def test_a_refused_password_fails_at_once_without_showing_it(pg_cluster: PostgresCluster) -> None:
    url = pg_cluster.url().replace(
        "postgresql://postgres@", "postgresql://rule_nats_failure_writer:wrong-pw@"
    )
    res = cli("status", url=url)
    assert res.returncode == 2, res.stderr
    assert "password authentication failed" in res.stderr and "wrong-pw" not in res.stderr


def test_a_migrated_database_passes(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM rule_nats_schema_migrations").fetchone()
    res = cli("status", url=database_url)
    assert res.returncode == 0, res.stderr


def test_status_on_a_fresh_install_shows_the_nats_url_and_what_to_do(database_url: str) -> None:
    res = cli("status", url=database_url)
    assert res.returncode == 0, res.stderr
    assert "nats://localhost:4222" in res.stdout
    assert "NEXT STEPS" in res.stdout and "INSERT INTO rule_nats_streams" in res.stdout


async def test_the_pool_opens_when_postgresql_is_back_within_the_start_up_wait() -> None:
    """PostgreSQL gone between the login check and the pool's opening (a restart), back after
    RECONNECT_SECONDS: the worker waits up to 30 s for its first connections. The pool's attempts
    gave up after RECONNECT_SECONDS, and while it opens nobody uses it to start another one: it
    stayed empty and the start failed at 30 s although PostgreSQL had been back for 18."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-pgopen-")))
    worker = Worker(Settings(database_url=cluster.url(), worker_name="open-1"))
    try:
        cluster.start()
        cluster.stop()
        opening = asyncio.create_task(worker._open_pool())
        await asyncio.sleep(RECONNECT_SECONDS + 4)
        await asyncio.to_thread(cluster.start)
        await opening  # it failed at 30 s before, although PostgreSQL had been back for 18
        async with worker.pool.connection() as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    finally:
        await worker.pool.close()
        cluster.cleanup()
