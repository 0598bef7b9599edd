"""The local stack behind scripts/run-local (see the README)."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.receiver import Receiver  # noqa: E402
from tests.support.stack import NatsServer, PostgresCluster  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the sample delivery")
    parser.add_argument(
        "--dir", type=Path, default=REPO / ".stack", help="where the services keep their files"
    )
    args = parser.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    pg = PostgresCluster(args.dir / "postgres")
    nats_srv = NatsServer(args.dir / "nats")
    rcv = Receiver().start()
    try:
        pg.start()
        nats_srv.start()
        url = pg.url()
        for m in migrate.migrate(url):
            print(f"migrated {m.filename}")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_srv.url,)
            )
            # Failed rule_nats_publish() calls are recorded despite the caller's rollback
            # (docs/security.md); the cluster asks this one login for a password.
            conn.execute("SELECT rule_nats_private.enable_failure_log(%s)", (secrets.token_urlsafe(24),))
            conn.execute(
                "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('WEBHOOKS', '{webhooks.>}')"
            )
            conn.execute(
                "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size) "
                "VALUES ('WEBHOOKS', 'webhook-workers', 64)"
            )
            conn.execute(
                "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, publish_mode) "
                "VALUES ('demo', %s, 'webhooks.demo', 'outbox')",
                (rcv.url + "/demo",),
            )
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"],
            # The sample receiver listens on loopback, which deliveries may not reach by default.
            env={
                **os.environ,
                "DATABASE_URL": url,
                "WORKER_NAME": "local-1",
                "WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
            },
        )
        # A sample event: published from SQL through the transactional outbox, relayed by the
        # sidecar into the stream it created from rule_nats_streams, delivered to the receiver.
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and conn.execute(
                "SELECT count(*) FROM rule_nats_consumer_state WHERE present"
            ).fetchone() != (1,):
                time.sleep(0.1)
            conn.execute("SELECT rule_webhook_publish_nats(1, '{\"hello\": \"world\"}', 'sample-1')")
            row = None
            while time.monotonic() < deadline and row is None:
                row = conn.execute(
                    "SELECT attempt, outcome, http_status, round(latency_ms::numeric, 1) "
                    "FROM rule_nats_delivery_attempts WHERE message_id = 'sample-1'"
                ).fetchone()
                time.sleep(0.1)
        if row is None or not rcv.snapshot():
            print("the sample webhook was not delivered: see the sidecar's log above")
            sidecar.terminate()
            return 1
        got = rcv.snapshot()[0]
        print(f"\nSample     : event sample-1 delivered to {rcv.url}{got.path}: body {got.body.decode()}")
        print(
            f"             rule_nats_delivery_attempts: attempt {row[0]}, {row[1]}, HTTP {row[2]}, {row[3]} ms"
        )
        print()
        print(f"PostgreSQL : psql '{url}'")
        print(f"NATS       : {nats_srv.url} (JetStream, store in {nats_srv.store_dir})")
        print(f"Receiver   : {rcv.url}/demo")
        print("Configured : stream WEBHOOKS, consumer webhook-workers, webhook 'demo'")
        try:
            if args.once:
                return 0
            print("\nUp. Ctrl-C stops everything and removes the files.")
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
            return 0
        finally:
            sidecar.terminate()
            sidecar.wait(30)
    finally:
        rcv.stop()
        nats_srv.cleanup()
        pg.cleanup()
        shutil.rmtree(args.dir, ignore_errors=True)  # nothing of the throwaway stack is left behind
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
