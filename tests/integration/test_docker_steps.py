"""The steps the Docker images run, run here without Docker (quick; tests/docker builds and runs the images).

postgres image: docker/postgres/initdb.sh against a fresh server. Sidecar image: build the
wheel, install it apart from the source tree, migrate and run from the installed package, then
run the Dockerfile's own HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.stack import NatsServer, PostgresCluster, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted((REPO / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql"))
DEFINITIONS = sorted((REPO / "sql" / "definitions").glob("[0-9][0-9]_*.sql"))


def run_initdb(pg: PostgresCluster, db: str, **env: str) -> str:
    full = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": db,
        "MIGRATIONS_DIR": str(REPO / "sql"),
        **env,
    }
    out = subprocess.run(
        ["bash", str(REPO / "docker/postgres/initdb.sh")],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_postgres_init_script_applies_migrations_and_creates_the_worker_login(
    pg_cluster: PostgresCluster,
) -> None:
    with psycopg.connect(pg_cluster.url("postgres"), autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS docker_init")
        c.execute("CREATE DATABASE docker_init")
    first = run_initdb(
        pg_cluster, "docker_init", WEBHOOK_WORKER_PASSWORD="s3cret", NATS_URL="nats://nats:4222"
    )
    assert first.count("applying") == len(MIGRATIONS) + len(DEFINITIONS)
    again = run_initdb(pg_cluster, "docker_init", WEBHOOK_WORKER_PASSWORD="s3cret")
    assert "applying" not in again  # a second run changes nothing
    with psycopg.connect(pg_cluster.url("docker_init"), autocommit=True) as c:
        assert c.execute("SELECT max(version) FROM rule_nats_schema_migrations").fetchone() == (
            len(MIGRATIONS),
        )
        assert c.execute(
            "SELECT nats_url FROM rule_nats_config WHERE config_name = 'default'"
        ).fetchone() == ("nats://nats:4222",)
        # This cluster's first installation is the tests' template: docker_init has roles of its own.
        assert c.execute(
            "SELECT pg_has_role('webhook_worker', rule_nats_role('worker'), 'MEMBER')"
        ).fetchone() == (True,)
    # the migrate tool agrees with what psql applied (it fills in the checksums)
    status = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "migrate", "--status",
         "--database-url", pg_cluster.url("docker_init")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert status.count("applied") == len(MIGRATIONS) and "pending" not in status
    assert status.count("current  definitions/") == len(DEFINITIONS)  # psql recorded their checksums


def healthcheck_command() -> list[str]:
    text = (REPO / "docker/sidecar.Dockerfile").read_text()
    match = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
    assert match, "HEALTHCHECK ... CMD [...] not found in docker/sidecar.Dockerfile"
    argv: list[str] = json.loads(match.group(1))
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def image_env() -> dict[str, str]:
    """The ENV of the final stage of docker/sidecar.Dockerfile."""
    text = (REPO / "docker/sidecar.Dockerfile").read_text()
    block = text.rsplit("\nENV ", 1)[1].split("\nEXPOSE", 1)[0]
    return dict(re.findall(r"([A-Z_]+)=(\S+)", block))


@pytest.mark.timeout(600)
def test_sidecar_image_steps_outside_docker(
    tmp_path: Path, pg_cluster: PostgresCluster, nats_server: NatsServer
) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    assert sorted(p.name for p in (site / "sidecar/_sql").glob("[0-9]*.sql")) == [p.name for p in MIGRATIONS]
    assert sorted(p.name for p in (site / "sidecar/_sql/definitions").glob("*.sql")) == [
        p.name for p in DEFINITIONS
    ]
    entry = next(site.glob("*.dist-info")) / "entry_points.txt"
    assert "webhook-worker = sidecar.cli:main" in entry.read_text()
    # dependencies from the test environment, the package from the wheel only
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(site)), where
    with psycopg.connect(pg_cluster.url("postgres"), autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS docker_image")
        c.execute("CREATE DATABASE docker_image")
    url = pg_cluster.url("docker_image")
    cli = [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent"]
    out = subprocess.run([*cli, "migrate", "--database-url", url], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    assert out.count("applied") == len(MIGRATIONS) + len(DEFINITIONS)
    port = free_port()
    proc = subprocess.Popen(
        [*cli, "run"],
        env={**env, "DATABASE_URL": url, "NATS_URL": nats_server.url, "METRICS_ADDR": f"127.0.0.1:{port}",
             "LOG_FORMAT": "json"},
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=30)
        # the image's HEALTHCHECK, with the image's ENV and this worker's METRICS_ADDR: it probes the
        # port the worker serves (it probed 9464 whatever METRICS_ADDR said, and failed here)
        check = healthcheck_command()
        env_check = {**os.environ, **image_env(), "METRICS_ADDR": f"127.0.0.1:{port}"}
        env_check["METRICS_ADDR_FILE"] = str(tmp_path / "no-such-file")
        result = subprocess.run(check, capture_output=True, text=True, timeout=10, env=env_check)
        assert result.returncode == 0, (shlex.join(check), result.stderr)
    finally:
        proc.terminate()
        logs = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(r.get("action") == "worker_started" for r in lines), logs[-2000:]


def test_replicas_on_one_network_take_their_own_port_and_name(
    tmp_path: Path, database_url: str, nats_server: NatsServer
) -> None:
    """Workers sharing the host's network (compose --scale with compose.host.yaml): each takes the next
    free port of METRICS_ADDR's range, writes it to METRICS_ADDR_FILE, and the image's HEALTHCHECK
    reads it from there."""
    first = free_port()
    cli = [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"]
    procs, files = [], []
    try:
        for n in range(2):
            files.append(tmp_path / f"addr-{n}")
            env = {**os.environ, "DATABASE_URL": database_url, "NATS_URL": nats_server.url, "WORKER_NAME": f"r{n}",
                   "METRICS_ADDR": f"127.0.0.1:{first}-{first + 5}", "METRICS_ADDR_FILE": str(files[-1])}  # fmt: skip
            procs.append(subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 30
            while not files[-1].exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        addrs = [f.read_text().strip() for f in files]
        assert len(set(addrs)) == 2 and all(a.startswith("127.0.0.1:") for a in addrs), addrs
        for f in files:
            env = {**os.environ, **image_env(), "METRICS_ADDR": "0.0.0.0:9", "METRICS_ADDR_FILE": str(f)}
            result = subprocess.run(
                healthcheck_command(), capture_output=True, text=True, timeout=10, env=env
            )
            assert result.returncode == 0, result.stderr
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
    assert not any(f.exists() for f in files)  # removed at a clean stop


def test_the_image_labels_carry_the_package_version() -> None:
    from sidecar import __version__

    text = (REPO / "docker/sidecar.Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{__version__}"' in text
    assert re.search(r'version = "([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1) == __version__  # type: ignore[union-attr]
