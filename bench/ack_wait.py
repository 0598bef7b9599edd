"""A/B: polling for the PubAck before sleeping in recv() (pgnats.SPIN_SECONDS), same run.

    .venv/bin/python bench/ack_wait.py [--messages 3000] [--rounds 4]

Drives the standard-library client of plpython/pgnats.py from plain Python against a
private nats-server (file storage), alternating the poll budget per round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.stack import NatsServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("pgnats_ab", REPO / "plpython" / "pgnats.py")
    assert spec and spec.loader
    pg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pg)
    ns = NatsServer(Path(tempfile.mkdtemp(prefix="bench-ack-")))
    ns.start()
    try:
        client = pg.Client([ns.url])
        client.connect()
        client.js_api("STREAM.CREATE.AB", json.dumps({"name": "AB", "subjects": ["ab.>"]}).encode())
        body = json.dumps({"pad": "x" * 180}).encode()
        results: dict[float, list[float]] = {}
        for _ in range(args.rounds):
            for spin in (0.0, 0.0003, 0.0005, 0.001):
                pg.SPIN_SECONDS = spin
                start = time.perf_counter()
                for _ in range(args.messages):
                    client.publish("ab.x", body)
                results.setdefault(spin, []).append(args.messages / (time.perf_counter() - start))
        base = statistics.median(results[0.0])
        for spin, rates in results.items():
            med = statistics.median(rates)
            print(
                f"poll {spin * 1e6:6.0f} us: median {med:7.0f} publishes/s ({med / base:.2f}x no polling); "
                f"rounds {[round(r) for r in rates]}"
            )
        return 0
    finally:
        ns.cleanup()


if __name__ == "__main__":
    sys.exit(main())
