"""Bulkhead benchmark: a fast endpoint's delivery time while another endpoint is slow.

    .venv/bin/python bench/bulkhead.py [--scenario answers_in_2s|drips|times_out|all] [--slow 64] [--fast 100]

One sidecar, one consumer (batch_size 16), two registered webhooks on a loopback receiver. Per
scenario, in the same run: first 100 messages for the fast endpoint alone (the baseline), then 64
messages for the slow endpoint followed by 100 for the fast one. Prints, as JSON: the time from
publishing to the last fast delivery, alone and behind the slow endpoint, their ratio (the issue's
bar: within 2x), the fast endpoint's p50/max latency, and for the slow endpoint how many messages
were delivered or are scheduled, lost and duplicated once everything settled.

    answers_in_2s  the slow endpoint answers 200 after 2 s
    drips          it answers 200 at once and sends its 4-byte body at 1 byte/s
    times_out      it never answers within the webhook's timeout_seconds (2 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
import psycopg  # noqa: E402

from sidecar import migrate  # noqa: E402
from tests.support.receiver import Receiver, Response  # noqa: E402
from tests.support.stack import NatsServer, PostgresCluster  # noqa: E402

BATCH = 16
SLOW = {
    "answers_in_2s": (Response(delay=2.0), 10),
    "drips": (Response(body=b"ok!!", drip=1.0), 10),
    "times_out": (Response(delay=10.0), 2),
}


async def publish(url: str, bodies: list[bytes]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    await asyncio.gather(*(js.publish("bulk.x", b) for b in bodies))
    await nc.close()


def body(webhook_id: int, tag: str, i: int) -> bytes:
    return json.dumps(
        {"webhook_id": webhook_id, "event_id": f"{tag}-{i}", "data": {"i": i, "tag": tag}}
    ).encode()


def fast_times(receiver: Receiver, tag: str) -> list[float]:
    return sorted(r.received_at for r in receiver.snapshot() if r.path == "/fast" and tag.encode() in r.body)


def wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def configure(
    conn: psycopg.Connection[Any], nats_url: str, receiver_url: str, timeout: int
) -> tuple[int, int]:
    """One stream, one consumer (batch_size BATCH), the slow and the fast webhook: their ids."""
    conn.execute("UPDATE rule_nats_config SET nats_url = %s WHERE config_name = 'default'", (nats_url,))
    conn.execute("INSERT INTO rule_nats_streams (stream_name, subjects) VALUES ('BULK', '{bulk.>}')")
    conn.execute(
        "INSERT INTO rule_nats_consumers (stream_name, consumer_name, batch_size, retry_initial_seconds, "
        "retry_max_backoff_seconds) VALUES ('BULK', 'workers', %s, 60, 60)",
        (BATCH,),
    )
    slow, fast = (
        conn.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, timeout_seconds) "
            "VALUES (%s, %s, 'bulk.a', %s) RETURNING webhook_id",
            (name_, receiver_url + path, t),
        ).fetchone()[0]  # type: ignore[index]
        for name_, path, t in (("slow", "/slow", timeout), ("fast", "/fast", 10))
    )
    return slow, fast


def start_worker(conn: psycopg.Connection[Any], url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "LOG_LEVEL": "WARNING",
        "WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        "WORKER_NAME": "bench-bulkhead",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "--env-file", "/nonexistent", "run"], env=env
    )
    present = "SELECT count(*) FROM rule_nats_consumer_state WHERE present"
    assert wait(lambda: conn.execute(present).fetchone() == (1,), 60)
    time.sleep(1.0)
    return worker


def fast_alone(conn: psycopg.Connection[Any], ns: NatsServer, receiver: Receiver, fast: int, n: int) -> float:
    """The same-run baseline (it teaches the worker nothing about the slow endpoint)."""
    t0 = time.monotonic()
    asyncio.run(publish(ns.url, [body(fast, "alone", i) for i in range(n)]))
    if not wait(lambda: len(fast_times(receiver, "alone")) >= n, 60):
        raise RuntimeError(
            f"fast alone: {len(fast_times(receiver, 'alone'))} of {n} delivered; dead letters: "
            f"{conn.execute('SELECT reason, error FROM rule_nats_dead_letters LIMIT 3').fetchall()}; "
            f"attempts {conn.execute('SELECT outcome, error FROM rule_nats_delivery_attempts LIMIT 3').fetchall()}; "
            f"retries {conn.execute('SELECT last_error FROM rule_nats_retries LIMIT 3').fetchall()}; "
            f"received {receiver.count}"
        )
    return fast_times(receiver, "alone")[-1] - t0


def settled(conn: psycopg.Connection[Any], name: str, slow: int, n_slow: int) -> bool:
    """Every slow message delivered (or, timing out, held in rule_nats_retries: its next attempt
    scheduled, or deferred while the endpoint's circuit is open)."""
    if name == "times_out":
        sql = "SELECT count(*) FROM rule_nats_retries WHERE webhook_id = %s"
        return wait(lambda: conn.execute(sql, (slow,)).fetchone() == (n_slow,), 120)
    sql = "SELECT count(*) FROM rule_nats_delivery_attempts WHERE webhook_id = %s AND outcome = 'delivered'"
    return wait(lambda: conn.execute(sql, (slow,)).fetchone() == (n_slow,), 300)


def recorded(conn: psycopg.Connection[Any], slow: int) -> int:
    row = conn.execute(
        "SELECT count(DISTINCT message_id) FROM ("
        " SELECT message_id FROM rule_nats_delivery_attempts WHERE webhook_id = %s"
        " UNION ALL SELECT message_id FROM rule_nats_retries WHERE webhook_id = %s) m",
        (slow, slow),
    ).fetchone()
    assert row is not None
    return int(row[0])


def run(name: str, n_slow: int, n_fast: int) -> dict[str, Any]:
    slow_response, timeout = SLOW[name]
    base = Path(tempfile.mkdtemp(prefix=f"bench-bulkhead-{name}-"))
    pg = PostgresCluster(base / "pg", durable=True)
    ns = NatsServer(base / "nats")
    receiver = Receiver()
    receiver.responder = lambda req: slow_response if req.path == "/slow" else Response()
    worker: subprocess.Popen[bytes] | None = None
    try:
        pg.start()
        ns.start()
        receiver.start()
        url = pg.url()
        migrate.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            slow, fast = configure(conn, ns.url, receiver.url, timeout)
            worker = start_worker(conn, url)
            alone = fast_alone(conn, ns, receiver, fast, n_fast)
            time.sleep(0.5)
            # behind the slow endpoint
            t0 = time.monotonic()
            asyncio.run(publish(ns.url, [body(slow, "slow", i) for i in range(n_slow)]))
            t_fast = time.monotonic()
            asyncio.run(publish(ns.url, [body(fast, "behind", i) for i in range(n_fast)]))
            assert wait(lambda: len(fast_times(receiver, "behind")) >= n_fast, 120)
            times = fast_times(receiver, "behind")
            done = settled(conn, name, slow, n_slow)
            slow_done = time.monotonic() - t0
            slow_recorded = recorded(conn, slow)
        return report(
            name, n_slow, n_fast, alone, times, t0, t_fast, receiver, done, slow_done, slow_recorded
        )
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        receiver.stop()
        ns.cleanup()
        pg.cleanup()


def report(
    name: str, n_slow: int, n_fast: int, alone: float, times: list[float], t0: float, t_fast: float,
    receiver: Receiver, done: bool, slow_done: float, slow_recorded: int,
) -> dict[str, Any]:  # fmt: skip
    got = receiver.snapshot()
    per_id = Counter(json.loads(r.body)["i"] for r in got if r.path == "/slow")
    fast_ids = Counter(json.loads(r.body)["i"] for r in got if r.path == "/fast" and b"behind" in r.body)
    behind = times[-1] - t0
    lat = sorted(t - t_fast for t in times)
    return {
        "scenario": name,
        "batch_size": BATCH,
        "slow_messages": n_slow,
        "fast_messages": n_fast,
        "fast_alone_s": round(alone, 3),
        "fast_behind_slow_s": round(behind, 3),
        "ratio": round(behind / alone, 2),
        "fast_first_s": round(lat[0], 3),
        "fast_first_to_last_s": round(lat[-1] - lat[0], 3),
        "fast_p50_s": round(lat[len(lat) // 2], 3),
        "fast_max_s": round(lat[-1], 3),
        "fast_lost": n_fast - len(fast_ids),
        "fast_duplicated": sum(v - 1 for v in fast_ids.values()),
        "slow_settled": done,
        "slow_settled_after_s": round(slow_done, 1),
        "slow_recorded": slow_recorded,
        "slow_lost": n_slow - slow_recorded,
        "slow_duplicated": sum(v - 1 for v in per_id.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="all", choices=[*SLOW, "all"])
    ap.add_argument("--slow", type=int, default=64)
    ap.add_argument("--fast", type=int, default=100)
    args = ap.parse_args()
    for name in list(SLOW) if args.scenario == "all" else [args.scenario]:
        print(json.dumps(run(name, args.slow, args.fast)))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
