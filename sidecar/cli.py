"""The ``webhook-worker`` command line.

Exit codes, the same for every subcommand (README, "Exit codes"):
  0    done (run: stopped by SIGTERM/SIGINT after a clean shutdown)
  1    failed while working (the database refused a statement, a migration failed, ...)
  2    cannot start: a bad command line, setting or database URL, PostgreSQL unreachable or
       refusing the login, a schema that does not fit (the cause in one line on stderr)
  130  interrupted (Ctrl-C) before a clean shutdown
``sql`` replaces itself with psql or pgcli once the URL is checked: from then on the codes are theirs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from sidecar import __version__, logs
from sidecar.config import check_database_url
from sidecar.envfile import load_env
from sidecar.errors import ConfigError, SetupError, WorkerError
from sidecar.validation import redact_urls_in

logger = logging.getLogger(__name__)


EXIT_OK, EXIT_FAILED, EXIT_CANNOT_START, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_HELP = (
    "exit codes (every subcommand): 0 done; 1 failed while working; 2 cannot start (command line, "
    "settings, database URL, PostgreSQL unreachable or refusing, schema); 130 interrupted"
)


def _database_url(args: argparse.Namespace, env: dict[str, str]) -> str:
    url: str | None = args.database_url or env.get("DATABASE_URL")
    if not url:
        raise ConfigError(
            "no database: pass --database-url postgresql://... or set DATABASE_URL "
            "(in the environment or in .env)"
        )
    return check_database_url(url)


def cmd_migrate(args: argparse.Namespace, env: dict[str, str]) -> int:
    from sidecar import migrate, preflight

    url = _database_url(args, env)
    # unreachable or refusing: exit code 2 like every other subcommand, not a failed migration (1)
    preflight.wait_for_database(url, max_wait=0)
    lines = migrate.report(url).lines() if args.status else migrate.run(url).lines()
    for line in lines:
        print(line)
    return 0


def cmd_uninstall(args: argparse.Namespace, env: dict[str, str]) -> int:
    from sidecar import uninstall

    url = _database_url(args, env)
    if not args.yes:
        print(
            "webhook-worker: uninstall drops every table of the worker in this database (history, dead "
            "letters, the outbox, webhooks and their secrets), the rule_nats_table_trigger triggers on your "
            "tables, and the roles no other database uses; pass --yes to do it",
            file=sys.stderr,
        )
        return 2
    print(uninstall.uninstall(url))
    return 0


def cmd_run(args: argparse.Namespace, env: dict[str, str]) -> int:
    from sidecar import app, preflight
    from sidecar.config import settings_from_env

    if getattr(args, "metrics_addr", None):
        env = {**env, "METRICS_ADDR": args.metrics_addr}
    settings = settings_from_env(env, getattr(args, "database_url", None))
    if settings.metrics_addr:
        from sidecar.metrics import parse_addr

        try:
            parse_addr(settings.metrics_addr)
        except ValueError as exc:
            raise ConfigError(f"--metrics-addr / METRICS_ADDR: {exc}") from None
    preflight.wait_for_database(settings.database_url)
    preflight.check_schema(settings.database_url)
    return app.run(settings)


def cmd_status(args: argparse.Namespace, env: dict[str, str]) -> int:
    import json

    from sidecar import preflight, status

    url = _database_url(args, env)
    preflight.wait_for_database(url, max_wait=0)
    preflight.check_schema(url)
    if args.watch:
        from sidecar import watch

        return watch.watch(url, interval=args.interval)
    report = status.collect(url, failures=args.failures)
    if args.json:
        print(json.dumps(status.to_json(report), indent=2))
    else:
        print(status.render(report), end="")
    return 0


def sql_client(url: str, which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The interactive client to open: pgcli when installed (the ``pgcli`` extra), else psql."""
    for program in ("pgcli", "psql"):
        path = which(program)
        if path is not None:
            return [path, url]
    raise ConfigError(
        "neither pgcli nor psql is installed: pip install 'pg-nats-webhook-worker[pgcli]' (or install psql)"
    )


def cmd_sql(args: argparse.Namespace, env: dict[str, str]) -> NoReturn:
    argv = sql_client(_database_url(args, env))
    if not argv[0].endswith("pgcli"):
        print("webhook-worker: pgcli is not installed, opening psql", file=sys.stderr)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # noqa: S606 - replaces this process with the SQL client


# What `run --help` says of each environment variable (a test checks that every variable the
# worker reads is here).
ENVIRONMENT_HELP = {
    "DATABASE_URL": "PostgreSQL URL; the login needs rule_nats_worker (or --database-url)",
    "NATS_URL": "override the 'default' NATS connection of rule_nats_config (comma-separated URLs)",
    "NATS_USER": "user name for NATS_URL",
    "NATS_PASS": "password for NATS_URL",
    "STREAM_NAME": "with SUBJECT: register this stream and a durable consumer, as the original worker did",
    "SUBJECT": "the subject (filter) of STREAM_NAME",
    "QUEUE_GROUP": "the durable consumer the workers share (default webhook-worker)",
    "BATCH_SIZE": "messages sent and not yet recorded (requests in flight) for the registered consumer (default 10)",
    "CONSUMER_NAME": "the name of this worker instance (default host-pid; in a container host-containerid)",
    "WORKER_NAME": "the same, taking precedence over CONSUMER_NAME",
    "WEBHOOK_ALLOW_NETWORKS": "CIDRs this process may deliver to although blocked by default, e.g. 127.0.0.0/8",
    "OUTBOX_BATCH_SIZE": "outbox rows per relay pass (500)",
    "OUTBOX_POLL_INTERVAL": "seconds between outbox polls when no NOTIFY arrives (1)",
    "HEARTBEAT_INTERVAL": "seconds between heartbeats (5)",
    "SHUTDOWN_TIMEOUT": "seconds SIGTERM waits for deliveries in flight (30)",
    "DB_POOL_SIZE": "PostgreSQL connections of the process (4)",
    "METRICS_ADDR": "serve /healthz, /readyz and /metrics on HOST:PORT or the first free port of HOST:FIRST-LAST (or --metrics-addr)",
    "METRICS_ADDR_FILE": "write the address bound for METRICS_ADDR to this file (the image's HEALTHCHECK reads it)",
    "SUMMARY_INTERVAL": "seconds between summary log lines (60; 0: none)",
    "LOG_LEVEL": "DEBUG, INFO, WARNING or ERROR (or --log-level)",
    "LOG_FORMAT": "text or json (or --log-format)",
}


def _common_options(main: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name. Only the main parser has defaults:
    a subcommand's default would overwrite what was given before the subcommand's name."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return value if main else argparse.SUPPRESS

    common.add_argument(
        "--env-file",
        type=Path,
        default=default(Path(".env")),
        help="file of KEY=value settings read under the environment (default: ./.env)",
    )
    common.add_argument(
        "--log-level", default=default(None), help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    common.add_argument(
        "--log-format", choices=["text", "json"], default=default(None), help="log line format"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(main=False)
    parser = argparse.ArgumentParser(
        prog="webhook-worker",
        description="PostgreSQL-native webhook worker for NATS JetStream. Without a command it runs the worker.",
        epilog=EXIT_CODES_HELP,
        parents=[_common_options(main=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_migrate_and_run(sub, common)
    _add_status(sub, common)
    _add_uninstall_and_sql(sub, common)
    return parser


Subparsers = argparse._SubParsersAction  # type of add_subparsers(): argparse has no public name for it


def _add_migrate_and_run(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "migrate",
        parents=[common],
        epilog=EXIT_CODES_HELP,
        help="apply pending SQL migrations to the database",
        description="Applies the pending migrations of sql/, each in its own transaction, under an advisory "
        "lock; refuses to run when a released migration was edited. Then applies again the definition files "
        "of sql/definitions/ (functions and views) that changed, in one transaction. Needs a role that may "
        "create roles (and, for PL/Python, a superuser).",
    )
    p.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    p.add_argument(
        "--status",
        action="store_true",
        help="list applied and pending migrations and definition files, change nothing",
    )
    p.set_defaults(func=cmd_migrate)

    env_lines = "\n".join(f"  {k:<24} {v}" for k, v in ENVIRONMENT_HELP.items())
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run the worker (the default command): reconcile NATS from the registry, relay the outbox, deliver",
        description="Runs the sidecar until SIGTERM/SIGINT. It checks the login and the schema first (exit "
        "code 2 with the cause when they cannot work), then reads everything else from the database.",
        epilog="environment (also read from the --env-file; the environment wins):\n"
        + env_lines
        + "\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics (Prometheus) here, e.g. 127.0.0.1:9464 (default: $METRICS_ADDR, off)",
    )
    p.set_defaults(func=cmd_run)


def _add_status(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        epilog=EXIT_CODES_HELP,
        help="workers, streams, consumers (lag), endpoints (health) and recent failures, from the database",
        description="Reads the nats_* views (the figures a DBA sees in SQL) and, on a fresh install, says what "
        "to do next.",
    )
    p.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    p.add_argument(
        "--watch",
        action="store_true",
        help="a live view refreshed every second, like top: per consumer rate, lag, in flight and retries; "
        "per endpoint health, circuit and latency; workers and their problems (Ctrl-C quits)",
    )
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes of --watch (default 1)"
    )
    p.add_argument("--failures", type=int, default=10, help="how many recent failures to show (default 10)")
    p.set_defaults(func=cmd_status)


def _add_uninstall_and_sql(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "uninstall",
        parents=[common],
        help="remove the worker's schema from the database, and the roles no other database uses",
        description="Drops every object of the worker in this database in one transaction (its tables with "
        "their history, the table triggers, the private schema), then the rule_nats_* roles that no other "
        "database of the cluster uses. Needs a superuser. The same as SELECT rule_nats_private.uninstall();",
    )
    p.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    p.add_argument("--yes", action="store_true", help="really do it (nothing happens without it)")
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser(
        "sql",
        parents=[common],
        epilog=EXIT_CODES_HELP,
        help="open pgcli (or psql) on the configured database",
        description="Replaces this process with pgcli (the pgcli extra) or psql, connected to DATABASE_URL.",
    )
    p.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    p.set_defaults(func=cmd_sql)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = load_env(args.env_file, os.environ)
    logs.setup(
        args.log_level or env.get("LOG_LEVEL", "INFO"), args.log_format or env.get("LOG_FORMAT", "text")
    )
    # Without a subcommand, run the worker, as the original ./webhook-worker binary did.
    func: Callable[[argparse.Namespace, dict[str, str]], int] = getattr(args, "func", cmd_run)
    try:
        return func(args, env)
    except (SetupError, ConfigError) as exc:
        print(f"webhook-worker: {redact_urls_in(str(exc))}", file=sys.stderr)
        return EXIT_CANNOT_START
    except WorkerError as exc:
        print(f"webhook-worker: error: {redact_urls_in(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
