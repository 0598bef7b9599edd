"""docker/ checked by reading it, without Docker (tests/docker builds and runs the images, slower;
the steps themselves run in tests/integration/test_docker_steps.py)."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import ENVIRONMENT_VARIABLES

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def test_compose_services_reference_what_exists() -> None:
    services = compose()["services"]
    assert {"postgres", "nats", "migrate", "worker", "receiver"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, source)
            else:
                assert source in compose()["volumes"], (name, source)
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["nats"]
    assert "--jetstream" in services["nats"]["command"] and any(
        "/data" in v for v in services["nats"]["volumes"]
    )


def test_worker_environment_uses_only_known_variables() -> None:
    env = compose()["services"]["worker"]["environment"]
    assert set(env) <= ENVIRONMENT_VARIABLES, set(env) - ENVIRONMENT_VARIABLES
    assert "rule_nats_worker" not in env["DATABASE_URL"] and "webhook_worker" in env["DATABASE_URL"]
    assert "CONSUMER_NAME" not in env  # replicas must get distinct names (host-pid)


def test_every_environment_variable_is_read_and_documented() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "sidecar").glob("*.py"))
    read = set(re.findall(r'(?:env\.get|_int|_float)\((?:env, )?"([A-Z_]+)"', source))
    assert read == ENVIRONMENT_VARIABLES
    readme = (REPO / "README.md").read_text()
    assert [v for v in sorted(ENVIRONMENT_VARIABLES) if f"`{v}`" not in readme] == []


def test_sidecar_image_is_small_non_root_and_checks_health() -> None:
    text = (DOCKER / "sidecar.Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["webhook-worker"]' in text
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (REPO / src).exists(), src


def test_postgres_image_has_plpython_and_the_init_script() -> None:
    text = (DOCKER / "postgres/Dockerfile").read_text()
    major = re.search(r"^FROM postgres:(\d+)", text, re.M)
    assert major and f"postgresql-plpython3-{major.group(1)}" in text
    assert "/docker-entrypoint-initdb.d/" in text
    script = DOCKER / "postgres/initdb.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / src).exists(), src


def test_compose_works_with_docker_compose_1_29_and_builds_one_sidecar_image() -> None:
    data = compose()
    assert "name" not in data  # docker-compose 1.29 (Debian bookworm's) refuses a top-level name:
    services = data["services"]
    assert services["migrate"]["image"] == services["worker"]["image"]
    assert "build" in services["migrate"] and "build" not in services["worker"]  # built once


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".env", ".stack", ".git", ".venv"} <= ignored


def test_the_image_installs_pinned_dependencies() -> None:
    text = (DOCKER / "sidecar.Dockerfile").read_text()
    assert "-c constraints.txt" in text
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", p) for p in pins), pins
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    for dep in ("psycopg", "nats-py", "yarl", "prometheus-client", "httpx", "httptools", "uvloop", "nkeys"):
        assert dep in names, dep
    assert "-c constraints.txt" in (REPO / "scripts/setup").read_text()  # CI tests the same versions
