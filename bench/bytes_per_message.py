"""Bytes of delivery history per delivered message: heap and each index, after N real deliveries.

    .venv/bin/python bench/bytes_per_message.py [--messages 20000] [--repo /work/main]

Starts a private PostgreSQL and nats-server and a receiver, publishes N messages of the `fast`
scenario of bench/deliver.py (no webhook registered: the URL comes with the message), runs the
sidecar of --repo (default: this checkout, with that checkout's .venv) until every delivery is
recorded, stops it, runs VACUUM ANALYZE (the visibility map and free space map exist on a table of
any age) and prints, per relation that holds delivery history (the partitions of a partitioned
table summed up), its bytes and bytes per delivered message. Three totals:

* `added_per_message`: what the deliveries added, the bytes of every history relation after
  them minus before (measured once the partitions the sidecar makes at start exist and were
  vacuumed): the cost of a delivered message;
* `in_use_per_message`: the relations that hold rows, whole;
* `total_per_message`: every relation, including the fixed first pages of the empty partitions
  made ahead and of the DEFAULT partition (about 72 KB each: 3.6 bytes a message each at
  20,000 messages; tomorrow's exists once today has less than 12 hours left).

Issue 20's bar is at most 160 bytes per delivered message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402

from bench.deliver import get_stats, publish  # noqa: E402
from tests.support.stack import NatsServer, PostgresCluster, free_port, wait_for_port  # noqa: E402

# Every relation (table, index, TOAST) under the history tables, partitions included, by the
# table it belongs to.
SIZES = """
WITH t AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class c
     WHERE c.relnamespace IN ('public'::regnamespace, 'rule_nats_private'::regnamespace) AND c.relkind IN ('r', 'p')
       AND c.relname IN ('rule_nats_delivery_attempts', 'rule_nats_attempt_log',
                         'rule_nats_delivery_attempts_legacy')
), parts AS (
    SELECT t.relname AS root, p.relid FROM t, pg_partition_tree(t.oid) p WHERE p.isleaf
    UNION ALL
    SELECT t.relname, t.oid FROM t WHERE t.relkind = 'r'  -- pg_partition_tree lists no plain table
), rels AS (
    SELECT root, 'heap' AS what, pg_relation_size(relid) + coalesce(pg_total_relation_size(
               nullif((SELECT reltoastrelid FROM pg_class WHERE oid = relid), 0)), 0)
               + pg_relation_size(relid, 'fsm') + pg_relation_size(relid, 'vm') AS bytes
      FROM parts
    UNION ALL
    SELECT root, coalesce((SELECT i2.relname FROM pg_inherits h JOIN pg_class i2 ON i2.oid = h.inhparent
                            WHERE h.inhrelid = i.indexrelid), ic.relname), pg_total_relation_size(i.indexrelid)
      FROM parts JOIN pg_index i ON i.indrelid = parts.relid JOIN pg_class ic ON ic.oid = i.indexrelid
)
SELECT root, what, sum(bytes)::bigint FROM rels GROUP BY 1, 2 ORDER BY 1, 2
"""

LEAVES = """
WITH t AS (
    SELECT c.oid, c.relkind FROM pg_class c
     WHERE c.relnamespace IN ('public'::regnamespace, 'rule_nats_private'::regnamespace) AND c.relkind IN ('r', 'p')
       AND c.relname IN ('rule_nats_delivery_attempts', 'rule_nats_attempt_log', 'rule_nats_delivery_attempts_legacy')
), leaf AS (
    SELECT p.relid FROM t, pg_partition_tree(t.oid) p WHERE p.isleaf
    UNION ALL SELECT t.oid FROM t WHERE t.relkind = 'r'
)
SELECT l.relid::regclass::text, c.reltuples::bigint, pg_table_size(l.relid),
       coalesce((SELECT jsonb_object_agg(i.indexrelid::regclass::text, pg_relation_size(i.indexrelid))
                   FROM pg_index i WHERE i.indrelid = l.relid), '{}')
  FROM leaf l JOIN pg_class c ON c.oid = l.relid ORDER BY 1
"""


def run(repo: Path, n: int) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="bench-bytes-"))
    pg = PostgresCluster(base / "pg", durable=True)
    ns = NatsServer(base / "nats")
    rport = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(HERE / "bench" / "receiver_proc.py"), str(rport), "0", "0"]
    )
    worker: subprocess.Popen[bytes] | None = None
    python = str(repo / ".venv" / "bin" / "python")
    try:
        pg.start()
        ns.start()
        wait_for_port(rport)
        url = pg.url()
        # The migrations of the checkout under test, by its own code.
        subprocess.run(
            [python, "-c", f"from sidecar import migrate; migrate.migrate({url!r})"], cwd=repo, check=True
        )
        hook = f"http://127.0.0.1:{rport}/hook"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (ns.url,))
            conn.execute(
                "INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('DELIVER', '{bench.>}')"
            )
            conn.execute(
                "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size, max_ack_pending) "
                "VALUES ('DELIVER', 'workers', 64, 10000)"
            )
            import asyncio

            import nats
            from nats.js.api import StreamConfig

            async def make_stream() -> None:
                nc = await nats.connect(ns.url)
                await nc.jetstream().add_stream(StreamConfig(name="DELIVER", subjects=["bench.>"]))
                await nc.close()

            asyncio.run(make_stream())
            # The partitions the sidecar makes at start, made now, so that "before" has them too.
            if conn.execute("SELECT to_regproc('rule_nats_history_partitions')").fetchone() != (None,):
                conn.execute("SELECT rule_nats_history_partitions()")
            conn.execute("VACUUM ANALYZE")
            before = sum(b for _, _, b in conn.execute(SIZES).fetchall())
            asyncio.run(publish(ns.url, n, hook))
            env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
                   "WORKER_NAME": "bench-0"}  # fmt: skip
            worker = subprocess.Popen(
                [python, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"], env=env, cwd=repo
            )
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                got = conn.execute(
                    "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'"
                ).fetchone()
                if got and got[0] >= n:
                    break
                time.sleep(0.2)
            worker.terminate()
            worker.wait(30)
            delivered = conn.execute(
                "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'"
            ).fetchone()[0]  # type: ignore[index]
            conn.execute("VACUUM ANALYZE")
            rows = conn.execute(SIZES).fetchall()
            leaves = conn.execute(LEAVES).fetchall()
        per = {f"{root}.{what}": round(b / delivered, 1) for root, what, b in rows}
        return {
            "repo": str(repo),
            "delivered": delivered,
            "receiver_unique": get_stats(rport).get("unique"),
            "per_message": per,
            # Each partition (or plain table): rows, heap bytes, bytes of its indexes by name.
            "relations": {name: {"rows": n, "heap": heap, **idx} for name, n, heap, idx in leaves},
            # Only the relations that hold rows: the figure at scale, without the fixed size of
            # the empty partitions made ahead (an index's first pages).
            "in_use_per_message": round(
                sum(heap + sum(idx.values()) for _, n, heap, idx in leaves if n) / delivered, 1
            ),
            "added_per_message": round((sum(b for _, _, b in rows) - before) / delivered, 1),
            "total_per_message": round(sum(b for _, _, b in rows) / delivered, 1),
        }
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        receiver.terminate()
        receiver.wait(10)
        ns.cleanup()
        pg.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--repo", type=Path, default=HERE, help="checkout whose migrations and sidecar run")
    args = ap.parse_args()
    print(json.dumps(run(args.repo.resolve(), args.messages), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
