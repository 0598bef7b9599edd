"""The local stack behind scripts/run-local (see the README)."""

from __future__ import annotations

import argparse
import asyncio
import os
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


def add_stream(url: str) -> None:
    # Until the sidecar reconciles streams from rule_nats_streams, create it directly.
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(name="WEBHOOKS", subjects=["webhooks.>"])
        await nc.close()

    asyncio.run(go())


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
            env={**os.environ, "DATABASE_URL": url, "WORKER_NAME": "local-1"},
        )
        # A sample event through the transactional outbox: committed here, relayed by the sidecar.
        with psycopg.connect(url, autocommit=True) as conn:
            add_stream(nats_srv.url)
            conn.execute("SELECT rule_webhook_publish_nats(1, '{\"hello\": \"world\"}', 'sample-1')")
            deadline = time.monotonic() + 30
            row = None
            while time.monotonic() < deadline and row is None:
                row = conn.execute(
                    "SELECT subject, stream_name, sequence_number, triggered_by FROM rule_nats_publish_history "
                    "WHERE message_id = 'sample-1' AND success"
                ).fetchone()
                time.sleep(0.1)
        if row is None:
            print("the sample event was not published: see the sidecar's log above")
            sidecar.terminate()
            return 1
        print(
            f"\nSample     : event sample-1 published to {row[0]} (stream {row[1]}, seq {row[2]}, via {row[3]})"
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
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
