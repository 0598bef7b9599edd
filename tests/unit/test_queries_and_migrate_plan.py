from __future__ import annotations

import re

import pytest

from sidecar import migrate
from sidecar.errors import MigrationError, WorkerError
from sidecar.migrate import AppliedMigration, Migration, discover, plan
from sidecar.queries import parse_queries, query


def test_parse_queries() -> None:
    text = "-- header\n\n-- name: a\n-- a comment\nSELECT 1;\n\n-- name: b_2\nSELECT %(x)s\n  FROM t;\n"
    assert parse_queries(text) == {"a": "SELECT 1;", "b_2": "SELECT %(x)s\n  FROM t;"}
    with pytest.raises(WorkerError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(WorkerError, match="empty"):
        parse_queries("-- name: a\n-- nothing\n")


def test_packaged_queries_load() -> None:
    assert "pg_advisory_lock" in query("migration_lock")
    with pytest.raises(WorkerError, match="no query named"):
        query("nope")


def test_discover_orders_and_rejects_gaps() -> None:
    found = discover({"0002_b.sql": "B", "0001_a.sql": "A", "README.md": "", "notes.sql": ""})
    assert [(m.version, m.name) for m in found] == [(1, "a"), (2, "b")]
    with pytest.raises(MigrationError, match="0002 was expected"):
        discover({"0001_a.sql": "A", "0003_c.sql": "C"})
    with pytest.raises(MigrationError, match="without gaps or repeats"):
        discover({"0001_a.sql": "A", "0001_b.sql": "B"})


def test_plan() -> None:
    a, b = Migration(1, "a", "0001_a.sql", "A"), Migration(2, "b", "0002_b.sql", "B")
    assert plan([a, b], []) == [a, b]
    assert plan([a, b], [AppliedMigration(1, "a", a.checksum)]) == [b]
    assert plan([a, b], [AppliedMigration(1, "a", None)]) == [b]  # applied by hand with psql
    with pytest.raises(MigrationError, match="changed after it was applied"):
        plan([a, b], [AppliedMigration(1, "a", "0" * 64)])
    with pytest.raises(MigrationError, match="upgrade webhook-worker"):
        plan([a], [AppliedMigration(1, "a", None), AppliedMigration(2, "b", None)])


def test_shipped_migrations_are_well_formed() -> None:
    """Each file records its own version last; constraint names fit PostgreSQL's 63 bytes."""
    for m in migrate.load_dir(migrate.sql_dir()):
        last = [ln for ln in m.sql.strip().splitlines() if ln.strip() and not ln.startswith("--")][-1]
        assert re.fullmatch(
            rf"INSERT INTO rule_nats_schema_migrations \(version, name\) VALUES \({m.version}, '{m.name}'\);",
            last,
        ), f"{m.filename} must end by recording itself, got {last!r}"
        for name in re.findall(r'CONSTRAINT "([^"]+)"', m.sql):
            assert len(name.encode()) <= 63, f"{m.filename}: constraint name over 63 bytes: {name}"
        code = re.sub(r"--[^\n]*", "", m.sql)
        assert not re.search(r"\bGRANT\b[^;]*\bTO\s+PUBLIC\b", code, re.IGNORECASE), (
            f"{m.filename} grants to PUBLIC"
        )
