"""Fixtures: a private PostgreSQL cluster and nats-server per test session, a fresh database per test."""

from __future__ import annotations

import itertools
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sidecar import migrate
from tests.support.receiver import Receiver
from tests.support.sidecar import Sidecar
from tests.support.stack import NatsCluster, NatsServer, PostgresCluster

TEMPLATE_DB = "rule_nats_template"
FAILURE_LOG_PASSWORD = "failure-log-test-password"
_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    base = Path(tempfile.mkdtemp(prefix="wwtest-pg-"))
    cluster = PostgresCluster(base)
    cluster.start()
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
        migrate.migrate(cluster.url(TEMPLATE_DB))
        with psycopg.connect(cluster.url(TEMPLATE_DB), autocommit=True) as conn:
            conn.execute("SELECT rule_nats_private.enable_failure_log(%s)", (FAILURE_LOG_PASSWORD,))
        yield cluster
    finally:
        cluster.cleanup()


def _create_db(cluster: PostgresCluster, template: str) -> str:
    name = f"t_{next(_db_counter)}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        )
    return name


def _drop_db(cluster: PostgresCluster, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh database with every migration applied (copied from a template: fast)."""
    name = _create_db(pg_cluster, TEMPLATE_DB)
    # The failure log's role (rule_nats_failure_writer, the template's: the cluster's first
    # installation) is shared by every copy of the template: a test that gives it another
    # password must not break the next test's failure log.
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE rule_nats_failure_writer PASSWORD {}").format(
                sql.Literal(FAILURE_LOG_PASSWORD)
            )
        )
    yield pg_cluster.url(name)
    _drop_db(pg_cluster, name)


@pytest.fixture
def empty_database_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh database with no migrations applied."""
    name = _create_db(pg_cluster, "template0")
    yield pg_cluster.url(name)
    _drop_db(pg_cluster, name)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer(Path(tempfile.mkdtemp(prefix="wwtest-nats-")))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def own_nats_server() -> Iterator[NatsServer]:
    """A nats-server for this test alone, which the test may stop, kill and restart."""
    server = NatsServer(Path(tempfile.mkdtemp(prefix="wwtest-nats-")))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three nats-servers with JetStream in one cluster, for this test alone (it may kill them)."""
    cluster = NatsCluster(Path(tempfile.mkdtemp(prefix="wwtest-natsc-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rcv = Receiver().start()
    yield rcv
    rcv.stop()


@pytest.fixture
def nats_db(database_url: str, nats_server: NatsServer) -> Iterator[psycopg.Connection]:
    """An autocommit connection to a fresh database whose 'default' NATS connection is the test server."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_server.url,)
        )
        yield conn


@pytest.fixture
def worker_database_url(database_url: str) -> str:
    """The database URL for a login role that has rule_nats_worker and nothing else."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ww_sidecar') "
            "THEN CREATE ROLE ww_sidecar LOGIN IN ROLE rule_nats_worker; END IF; END $$"
        )
    return database_url.replace("postgresql://postgres@", "postgresql://ww_sidecar@")


@pytest.fixture
def sidecar_factory(worker_database_url: str) -> Iterator[Callable[..., Sidecar]]:
    """Starts sidecars that log in with the least-privilege worker role, as in production."""
    started: list[Sidecar] = []

    def start(env: dict[str, str] | None = None, name: str = "w1", url: str | None = None) -> Sidecar:
        s = Sidecar(url or worker_database_url, env, name)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()
        if s.proc.returncode not in (0, -9):
            sys.stderr.write(f"--- sidecar {s.log} exited {s.proc.returncode} ---\n{s.output()[-4000:]}\n")
