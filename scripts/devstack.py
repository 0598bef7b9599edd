"""The local stack behind scripts/run-local (see the README)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
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
            conn.execute(
                "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('WEBHOOKS', '{webhooks.>}')"
            )
            conn.execute(
                "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size) "
                "VALUES ('WEBHOOKS', 'webhook-workers', 64)"
            )
            conn.execute(
                "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('demo', %s, 'webhooks.demo')",
                (rcv.url + "/demo",),
            )
        print()
        print(f"PostgreSQL : psql '{url}'")
        print(f"NATS       : {nats_srv.url} (JetStream, store in {nats_srv.store_dir})")
        print(f"Receiver   : {rcv.url}/demo")
        print("Configured : stream WEBHOOKS, consumer webhook-workers, webhook 'demo'")
        if args.once:
            return 0
        print("\nUp. Ctrl-C stops everything and removes the files.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        rcv.stop()
        nats_srv.cleanup()
        pg.cleanup()
        time.sleep(0.1)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
