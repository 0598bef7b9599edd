"""Pure parts of issue 21: the watch frame, METRICS_ADDR ranges, the container-derived worker name."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sidecar import watch
from sidecar.config import container_id, default_worker_name
from sidecar.metrics import parse_addr, parse_addr_range

MOUNTINFO = (
    "1 0 0:1 / / rw - overlay overlay rw\n"
    "2 1 8:1 /var/lib/docker/containers/" + "ab" * 32 + "/hostname /etc/hostname rw - ext4 /dev/vda rw\n"
)


def test_container_id_from_mountinfo() -> None:
    assert container_id(MOUNTINFO) == "ab" * 6
    assert container_id("1 0 0:1 / / rw - ext4 /dev/vda rw\n") is None


def test_default_name_in_a_container_on_the_host_network(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    assert default_worker_name(str(path)).endswith("-" + "ab" * 6)
    assert default_worker_name("/nonexistent").rsplit("-", 1)[1].isdigit()


def test_metrics_addr_ranges() -> None:
    assert parse_addr_range("127.0.0.1:9464-9466") == ("127.0.0.1", range(9464, 9467))
    assert parse_addr_range(":9464") == ("0.0.0.0", range(9464, 9465))
    assert parse_addr("127.0.0.1:9464-9466") == ("127.0.0.1", 9464)
    for bad in ("h:9466-9464", "h:1-x", "h:-5", "h:0-3"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_addr_range(bad)


def test_watch_frame_has_every_part_and_fits_the_terminal() -> None:
    data = {
        "consumers": [{"stream_name": "S", "consumer_name": "c", "status": "ok", "delivered_per_s": 12.5,
                       "failed_10s": 0, "lag": 3, "in_flight": 2, "retries": 1, "workers": 2}],
        "endpoints": [{"webhook_id": 1, "webhook_name": "shop", "status": "open", "circuit": "open", "p50_ms": 4.2,
                       "p95_ms": 9.0, "requests_5m": 10, "consecutive_failures": 5, "waiting": 1,
                       "last_error": "HTTP 500 " + "y" * 300}],
        "workers": [{"worker_name": "w1", "status": "DEGRADED", "problems": ["nats:default: cannot connect"]}],
    }  # fmt: skip
    text = watch.frame(data, dt.datetime(2026, 1, 1, 12, 0, 1, tzinfo=dt.UTC), width=100)
    assert "2026-01-01 12:00:01 UTC" in text and "delivered/s: 12.5" in text and "workers running: 1" in text
    assert "  w1 DEGRADED: nats:default: cannot connect" in text
    assert "  endpoint shop open: HTTP 500 yyy" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("STREAM_NAME"))
    row = next(line for line in lines if line.startswith("S "))
    assert header.index("DELIVERED_PER_S") == row.index("12.5")
