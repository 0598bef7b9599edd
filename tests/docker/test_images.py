"""The Docker images, built from docker/ unchanged and run as operators run them.

A private dockerd (tests/docker/harness.py) builds the base images (stand-ins when the official ones
cannot be had), then both project images; every container runs on the host's network with every
server bound to 127.0.0.1 on a free port, so nothing leaves the machine. One stack per module,
started with `docker run`; the compose test starts its own through docker-compose 1.29.

Slow (minutes from an empty image store, about a minute with a kept one): marked `docker`;
DOCKER_TESTS=0 skips it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker import harness
from tests.docker.harness import POSTGRES_IMAGE, REPO, SIDECAR_IMAGE, sh
from tests.support.stack import free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DOCKER_TESTS") == "0", reason="DOCKER_TESTS=0"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starts its own dockerd: needs root"),
    # the first test also waits for the images (minutes from nothing); every docker call has its own timeout
    pytest.mark.timeout(1500),
]
MIGRATIONS = sorted((REPO / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql"))
DEFINITIONS = sorted((REPO / "sql" / "definitions").glob("[0-9][0-9]_*.sql"))
LABEL = "webhook-worker-test"


def wait(what: str, check: Callable[[], object], timeout: float = 60.0, every: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout}s (last: {last!r})")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    harness.install_tools()
    with harness.dockerd():
        harness.base_images()
        harness.project_images()
        yield


@dataclass
class Stack:
    name: str
    pg_port: int
    nats_port: int
    receiver_port: int
    containers: list[str]

    def psql(self, sql: str, *args: str, user: str = "postgres", check: bool = True) -> str:
        return sh(
            "docker", "exec", f"{self.name}-pg", "psql", "-U", user, "-d", "postgres", "-v", "ON_ERROR_STOP=1",
            "-qtAX", *args, "-c", sql, check=check, timeout=60,
        ).stdout.strip()  # fmt: skip

    def worker(self, n: int, *extra: str, metrics: str, name: str | None = None) -> str:
        cid = sh(
            "docker", "run", "-d", "--name", f"{self.name}-worker-{n}", "--label", LABEL, "--network", "host",
            "--add-host", "receiver:127.0.0.1", "--stop-timeout", "40", *extra,
            *(("-e", f"WORKER_NAME={name}") if name else ()),
            "-e", f"DATABASE_URL=postgresql://webhook_worker:worker@127.0.0.1:{self.pg_port}/postgres",
            "-e", f"NATS_URL=nats://127.0.0.1:{self.nats_port}", "-e", "STREAM_NAME=WEBHOOKS",
            "-e", "SUBJECT=webhooks.>", "-e", "QUEUE_GROUP=webhook-workers", "-e", "BATCH_SIZE=64",
            "-e", "WEBHOOK_ALLOW_NETWORKS=127.0.0.0/8", "-e", f"METRICS_ADDR={metrics}", SIDECAR_IMAGE,
        ).stdout.strip()  # fmt: skip
        self.containers.append(cid)
        return cid

    def logs(self, container: str) -> str:
        out = sh("docker", "logs", container, check=False, timeout=30)
        return out.stdout + out.stderr


@pytest.fixture(scope="module")
def stack(images: None) -> Iterator[Stack]:
    name = f"wwtest-{os.getpid()}"
    s = Stack(name, free_port(), free_port(), free_port(), [])
    nats_http = free_port()
    volumes = [f"{name}-pgdata", f"{name}-natsdata"]
    try:
        s.containers.append(sh(
            "docker", "run", "-d", "--name", f"{name}-pg", "--label", LABEL, "--network", "host",
            "-e", "POSTGRES_PASSWORD=postgres", "-e", "WEBHOOK_WORKER_PASSWORD=worker",
            "-e", f"NATS_URL=nats://127.0.0.1:{s.nats_port}", "-e", f"PGPORT={s.pg_port}",
            "-v", f"{name}-pgdata:/var/lib/postgresql/data",
            "-v", f"{REPO}/docker/demo.sql:/webhook-worker/demo.sql:ro",
            POSTGRES_IMAGE, "postgres", "-c", "listen_addresses=127.0.0.1",
        ).stdout.strip())  # fmt: skip
        s.containers.append(sh(
            "docker", "run", "-d", "--name", f"{name}-nats", "--label", LABEL, "--network", "host",
            "-v", f"{name}-natsdata:/data", "nats:2.10-alpine", "--jetstream", "--store_dir", "/data",
            "--http_port", str(nats_http), "-a", "127.0.0.1", "-p", str(s.nats_port),
        ).stdout.strip())  # fmt: skip
        s.containers.append(sh(
            "docker", "run", "-d", "--name", f"{name}-receiver", "--label", LABEL, "--network", "host",
            "-v", f"{REPO}/docker/demo-receiver.py:/app/receiver.py:ro", "python:3.11-slim-bookworm",
            "python", "/app/receiver.py", str(s.receiver_port), "127.0.0.1",
        ).stdout.strip())  # fmt: skip
        wait("postgres initialised", lambda: "init process complete" in s.logs(f"{name}-pg"), timeout=120)
        wait("postgres ready", lambda: s.psql("SELECT 1", check=False) == "1", timeout=60)
        wait(
            "nats ready",
            lambda: http_get(f"http://127.0.0.1:{nats_http}/healthz?js-enabled-only=true")[0] == 200,
        )
        yield s
    finally:
        if s.containers:
            sh("docker", "rm", "-f", "-v", *s.containers, check=False, timeout=120)
        sh("docker", "volume", "rm", *volumes, check=False, timeout=60)


@pytest.fixture(scope="module")
def worker1(stack: Stack) -> tuple[str, int]:
    """worker-1 with metrics on a port that is not the image's default 9464, and the image's own
    HEALTHCHECK command probed every second."""
    port = free_port()
    cid = stack.worker(1, "--health-interval", "1s", "--health-start-period", "1s", metrics=f"127.0.0.1:{port}",
                       name="worker-1")  # fmt: skip
    wait("worker-1 /healthz", lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=60)
    return cid, port


def test_init_script_applies_every_migration(stack: Stack) -> None:
    applied = [
        line for line in stack.logs(f"{stack.name}-pg").splitlines() if "webhook-worker: applying" in line
    ]
    assert len(applied) == len(MIGRATIONS) + len(DEFINITIONS), applied
    assert stack.psql("SELECT max(version) FROM rule_nats_schema_migrations") == str(len(MIGRATIONS))
    assert stack.psql("SELECT pg_has_role('webhook_worker', 'rule_nats_worker', 'MEMBER')") == "t"


def test_migrate_job_applies_migrations_to_an_empty_database(stack: Stack) -> None:
    stack.psql("CREATE DATABASE migrate_job")
    url = f"postgresql://postgres:postgres@127.0.0.1:{stack.pg_port}/migrate_job"
    job = (
        "docker",
        "run",
        "--rm",
        "--label",
        LABEL,
        "--network",
        "host",
        "-e",
        f"DATABASE_URL={url}",
        SIDECAR_IMAGE,
    )
    out = sh(*job, "migrate", timeout=180).stdout
    assert out.count("applied") == len(MIGRATIONS) + len(DEFINITIONS), out
    assert sh(*job, "migrate", timeout=120).stdout.strip() == "schema is up to date"
    # the image the init script used and the job agree: nothing pending on the init script's database
    status = sh(*job[:-1], "-e", f"DATABASE_URL={url.replace('/migrate_job', '/postgres')}", SIDECAR_IMAGE,
                "migrate", "--status", timeout=120).stdout  # fmt: skip
    assert status.count("applied") == len(MIGRATIONS) and "pending" not in status, status


def test_image_labels_name_version_and_source(images: None) -> None:
    labels = json.loads(
        sh("docker", "image", "inspect", "--format", "{{json .Config.Labels}}", SIDECAR_IMAGE).stdout
    )
    from sidecar import __version__

    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.source"]


def test_healthz_and_readyz(stack: Stack, worker1: tuple[str, int]) -> None:
    _, port = worker1
    assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    _status, body = wait(
        "/readyz 200", lambda: (r := http_get(f"http://127.0.0.1:{port}/readyz"))[0] == 200 and r
    )  # type: ignore[misc]
    assert json.loads(body)["ready"] is True


def test_healthcheck_honours_metrics_addr(stack: Stack, worker1: tuple[str, int]) -> None:
    """The image's HEALTHCHECK probes the port the worker serves, not 9464 (failed before: unhealthy)."""
    cid, _ = worker1

    def health() -> str:
        return sh("docker", "inspect", "--format", "{{.State.Health.Status}}", cid).stdout.strip()

    assert wait("docker health verdict", lambda: (h := health()) != "starting" and h, timeout=30) == "healthy"


def test_demo_is_delivered(stack: Stack, worker1: tuple[str, int]) -> None:
    out = sh(
        "docker", "exec", f"{stack.name}-pg", "psql", "-U", "postgres", "-v",
        f"receiver_url=http://receiver:{stack.receiver_port}/demo", "-f", "/webhook-worker/demo.sql", timeout=120,
    ).stdout  # fmt: skip
    assert re.search(r"\|\s*delivered\s*\|", out), out
    wait("receiver got /demo", lambda: '"path": "/demo"' in stack.logs(f"{stack.name}-receiver"), timeout=15)


def test_failed_publish_is_recorded_through_the_failure_log(stack: Stack) -> None:
    """A non-superuser's failed rule_nats_publish leaves a history row despite the rollback (the
    failure log's own connection) and the check says the log works."""
    stack.psql("CREATE ROLE app_user LOGIN PASSWORD 'app' IN ROLE rule_nats_publisher")
    failed = stack.psql("SELECT rule_nats_publish('nostream.docker', '{}')", user="app_user", check=False)
    assert failed == ""  # an error (the subject is not captured): nothing printed
    rows = stack.psql(
        "SELECT count(*) FROM rule_nats_publish_history WHERE subject = 'nostream.docker' AND NOT success"
    )
    check = stack.psql("SELECT coalesce(rule_nats_failure_log_check(), 'works')")
    assert (rows, check) == ("1", "works")


def test_sigterm_stops_a_worker_cleanly(stack: Stack) -> None:
    port = free_port()
    cid = stack.worker(9, metrics=f"127.0.0.1:{port}", name="worker-stop")
    wait("worker-stop /healthz", lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=60)
    started = time.monotonic()
    sh("docker", "stop", "--time", "40", cid, timeout=60)  # SIGTERM, then SIGKILL after 40 s
    took = time.monotonic() - started
    state = json.loads(sh("docker", "inspect", "--format", "{{json .State}}", cid).stdout)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, stack.logs(cid)[-3000:])
    assert took < 35, f"SIGTERM took {took:.1f}s"
    lines = [json.loads(x) for x in stack.logs(cid).splitlines() if x.startswith("{")]
    assert any(r.get("action") == "worker_stopped" for r in lines), [r.get("action") for r in lines][-10:]


def test_three_workers_share_one_consumer_through_compose(images: None, tmp_path: Path) -> None:
    """docker-compose 1.29 accepts compose.yaml (+ compose.host.yaml) and `--scale worker=3` on the
    host's network gives three workers with their own metrics ports and names, one consumer."""
    ports = {"PG_PORT": free_port(), "NATS_PORT": free_port(), "NATS_HTTP_PORT": free_port(),
             "RECEIVER_PORT": free_port()}  # fmt: skip
    first = free_port()
    # The workers' metrics ports must not take the receiver's (or another service's) port: a worker
    # there answered the demo's POST with 404 and the sample delivery was dead-lettered.
    while any(first <= port < first + 10 for port in ports.values()):
        first = free_port()
    project = f"wwtest{os.getpid()}"
    env = {**harness.env(), **{k: str(v) for k, v in ports.items()},
           "WORKER_METRICS_PORTS": f"{first}-{first + 9}", "WEBHOOK_WORKER_TAG": "compose-test"}  # fmt: skip
    base = ["docker-compose", "-p", project, "-f", "docker/compose.yaml", "-f", "docker/compose.host.yaml"]

    def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        up = compose("up", "-d", "--build", "--scale", "worker=3", timeout=600)
        assert up.returncode == 0, up.stderr[-3000:]
        built = [line for line in up.stderr.splitlines() if line.startswith("Building")]
        assert built.count("Building migrate") == 1 and "Building worker" not in built, built
        pg = compose("ps", "-q", "postgres").stdout.strip()

        def psql(sql: str) -> str:
            return sh(
                "docker", "exec", pg, "psql", "-U", "postgres", "-qtAX", "-c", sql, timeout=60
            ).stdout.strip()

        wait("three workers running", lambda: psql(
            "SELECT count(DISTINCT worker_name) FROM nats_worker_status WHERE status IN ('ACTIVE', 'IDLE')") == "3",
            timeout=120)  # fmt: skip
        receiver = f"receiver_url=http://receiver:{ports['RECEIVER_PORT']}/demo"
        out = sh("docker", "exec", pg, "psql", "-U", "postgres", "-v", receiver, "-f", "/webhook-worker/demo.sql",
                 timeout=120).stdout  # fmt: skip
        # On failure, say who answered: the receiver's log and each worker's metrics port.
        assert re.search(r"\|\s*delivered\s*\|", out), (
            out,
            ports,
            first,
            compose("logs", "--tail", "40").stdout[-4000:],
        )
        for _ in range(3):  # three rounds: each worker pulls its share while the others are busy
            psql("SELECT count(rule_webhook_publish_nats((SELECT webhook_id FROM rule_webhooks WHERE webhook_name "
                 "= 'demo'), jsonb_build_object('n', g))) FROM generate_series(1, 100) g")  # fmt: skip
        wait("300 more delivered", lambda: int(psql(
            "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'")) >= 301, timeout=90)  # fmt: skip
        # every message once, through one durable consumer, by more than one of the three workers
        assert psql("SELECT count(*) = count(DISTINCT message_id) FROM rule_nats_delivery_attempts "
                    "WHERE outcome = 'delivered'") == "t"  # fmt: skip
        assert psql("SELECT count(DISTINCT consumer_name) FROM rule_nats_delivery_attempts") == "1"
        assert int(psql("SELECT count(DISTINCT worker_name) FROM rule_nats_delivery_attempts")) >= 2
        for n in range(3):
            assert http_get(f"http://127.0.0.1:{first + n}/healthz")[0] == 200
    finally:
        down = compose("down", "-v", "--remove-orphans", "--rmi", "local", timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]
