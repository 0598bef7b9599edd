"""Repeatable definition files: planning, and the shape of the shipped files (no database)."""

from __future__ import annotations

import hashlib
import re

import pytest

from sidecar import definitions, migrate
from sidecar.definitions import AppliedDefinition, Definition, State
from sidecar.errors import MigrationError
from sidecar.migrate import AppliedMigration, Migration, Outcome, Status

# The released migrations as they are on main at the release of 0018: never edited again (a
# change goes into a new migration or a definition file). Add a line when a release ships.
RELEASED = {
    "0001_schema.sql": "f4e01a99b10906ea40148f4095ae31a8d5b6725dfce313f507306a8a007aecc4",
    "0002_publish.sql": "ccb0d244c0aa870e3f5ca226c832b0d7c913f3e0555fbe5886d5dc473356625f",
    "0003_delivery.sql": "46eb9d04faa5f6d334d68d24d44b694d9a32422180e8879423abe5ad7ec9c6b3",
    "0004_safety.sql": "5a3e721a423ba3a793e796d6e12e57b9f3a900b049b2f507819be00178007deb",
    "0005_operations.sql": "9a96d12ab17d4ac3e291ce59502312f15764a07186d4c519cf080565614faa6d",
    "0006_security.sql": "99e9602cfa37baef3bd47a0d167e6a70f5625cce3a32f125e72162699b0d6b7a",
    "0007_native_errors.sql": "244626aa9dddffb80df30a722b51e0089b2fce8e696952dddc639ff381839f4e",
    "0008_consumer_stats.sql": "8ad40200534f744f0cfea55c44eba6147ac68cf40bd2a5e106c9db2b8afd8ed3",
    "0009_counters.sql": "e7e2787729cc3b1dc0ebb74eca3ffc0c46c4e9093ffcedf8ef74f6f5091aa8c0",
    "0010_adopt.sql": "b5c56ac7cd684f8b9d6b9b4e25398cb82cad346e66302c32098e50e1695b7921",
    "0011_identity.sql": "ac6c98847e81d4ce2ca14aca030285386df2790e7c08a035e4b24fdf7f1ca09e",
    "0012_stream_settings.sql": "05ff9de6b702cf804da5d03c48918305c07220445886dc559824381a696f470b",
    "0013_truth.sql": "c1323b03379e43614be54ace2fe111020ba321b9858508edabe73666777909f3",
    "0014_compat.sql": "94df024af181b0907e57a42ee7322d1df3e26389347ab83f579017d99a4b3560",
    "0015_bulkheads.sql": "b23a066ebe430dbbe5f2892f266f4cabd0e63976d568acc027a3715a6cba9d5b",
    "0016_identities.sql": "ec0e71ffb50a3e9442acced62b77925ce524f054421c17dcf0d4d13f592ae943",
    "0017_isolation.sql": "302db9a9901212f0c6534a3b13e384d16de0dbd5ce8dbe14b7b9cfbb9460c653",
    "0018_endpoint_blocked.sql": "2ae47eb24358914f4c153494084559679886a8b4abb5940ab6c6538da4158b11",
}


def test_released_migrations_are_unchanged() -> None:
    folder = migrate.sql_dir()
    for name, digest in RELEASED.items():
        got = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert got == digest, f"sql/{name} was edited after its release: revert it; put the change elsewhere"


def test_discover_orders_by_name_and_rejects_other_names() -> None:
    found = definitions.discover({"20_b.sql": "B", "10_a.sql": "A"})
    assert [d.filename for d in found] == ["10_a.sql", "20_b.sql"]
    with pytest.raises(MigrationError, match=r"NN_area\.sql"):
        definitions.discover({"10_a.sql": "A", "views.sql": "V"})


def test_plan_applies_what_changed_and_everything_after_a_migration() -> None:
    a, b, c = Definition("10_a.sql", "A"), Definition("20_b.sql", "B"), Definition("30_c.sql", "C")
    current = [AppliedDefinition("10_a.sql", a.checksum), AppliedDefinition("20_b.sql", b.checksum)]
    assert definitions.plan([a, b], current, migrated=False) == []
    assert definitions.plan([a, b], current, migrated=True) == [a, b]
    edited = Definition("20_b.sql", "B, edited")
    assert definitions.plan([a, edited], current, migrated=False) == [edited]
    assert definitions.plan([a, b, c], current, migrated=False) == [c]  # new file
    by_hand = [AppliedDefinition("10_a.sql", None), AppliedDefinition("20_b.sql", b.checksum)]
    assert definitions.plan([a, b], by_hand, migrated=False) == [a]
    assert definitions.plan([a, b], [], migrated=False) == [a, b]  # a release before the table
    assert definitions.gone([a], current) == ["20_b.sql"]


def test_status_and_outcome_lines() -> None:
    a, b, c = Definition("10_a.sql", "A"), Definition("20_b.sql", "B"), Definition("30_c.sql", "C")
    status = Status(
        [AppliedMigration(1, "schema", "x")],
        [Migration(2, "more", "0002_more.sql", "")],
        [(a, State.CURRENT), (b, State.CHANGED), (c, State.BY_HAND)],
    )
    assert status.lines() == [
        "applied  0001_schema",
        "pending  0002_more.sql",
        "current  definitions/10_a.sql",
        "pending  definitions/20_b.sql (changed)",
        "pending  definitions/30_c.sql (by hand)",
    ]
    assert status.stale_definitions == [b]  # applied by hand counts as applied, like a migration
    assert Outcome([], []).lines() == ["schema is up to date"]
    assert Outcome([Migration(2, "more", "0002_more.sql", "")], [a]).lines() == [
        "applied 0002_more.sql",
        "applied definitions/10_a.sql",
    ]


def _statements(sql: str) -> list[str]:
    """The statements of a file, without comments (dollar quotes and strings kept whole)."""
    out, start, i = [], 0, 0
    token = re.compile(r"--[^\n]*|'(?:[^']|'')*'|\"[^\"]*\"|\$([A-Za-z_]\w*)?\$|;")
    while (m := token.search(sql, i)) is not None:
        if m.group(0).startswith("$"):
            end = sql.index(m.group(0), m.end())
            i = end + len(m.group(0))
            continue
        if m.group(0) == ";":
            out.append(sql[start : m.end()])
            start = m.end()
        i = m.end()
    return [re.sub(r"--[^\n]*", "", s).strip() for s in out if re.sub(r"--[^\n]*", "", s).strip()]


def test_statements_splitter() -> None:
    text = "-- a; b\nSELECT 'x;y';\nCREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;\n"
    assert _statements(text) == [
        "SELECT 'x;y';",
        "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;",
    ]


# What a definition file may hold: statements that leave the same result when run twice.
SAFE = re.compile(
    r"CREATE OR REPLACE (FUNCTION|PROCEDURE|VIEW|AGGREGATE) "
    r"|COMMENT ON (FUNCTION|PROCEDURE|VIEW|AGGREGATE|COLUMN) "
    r"|(GRANT|REVOKE) "
    r"|ALTER (FUNCTION|PROCEDURE|AGGREGATE) [^;]* OWNER TO rule_nats_definer;$"
    r"|DROP (FUNCTION|PROCEDURE|VIEW|AGGREGATE) IF EXISTS ",
    re.S,
)


def test_shipped_definition_files_are_safe_to_run_twice() -> None:
    shipped = definitions.load_dir(migrate.sql_dir())
    assert shipped, "sql/definitions/ is empty"
    for d in shipped:
        *body, last = _statements(d.sql)
        assert last == re.sub(r"--[^\n]*", "", d.record).strip(), f"{d.filename} must end by recording itself"
        for stmt in body:
            assert SAFE.match(stmt), f"{d.filename}: not a repeatable statement: {stmt[:120]!r}"
            assert not (stmt.startswith("GRANT") and re.search(r"\bTO\s+PUBLIC\b", stmt, re.I)), (
                f"{d.filename} grants to PUBLIC: {stmt[:120]!r}"
            )


# Since sql/definitions/ exists, a numbered migration changes tables and data; the current definition
# of a function or view is in its definition file, applied after the migrations. A migration may
# create one that it needs itself (it calls it, or its tables, triggers and the writers running
# while it commits need it: sql/0019's INSTEAD OF trigger and the roll-ups that skip moved rows)
# only when a definition file defines the same object, whose text replaces the migration's at the
# end of the same migrate run; a helper it needs only while it runs goes in pg_temp (0015 does).
# Same name here; the same signature is checked by tests/integration/test_definition_files.py
# (test_the_files_alone_recreate_every_function_and_view: a function only a migration defines is
# missing from the files alone).
CREATES = re.compile(
    r"^CREATE (?:OR REPLACE )?(?:FUNCTION|PROCEDURE|VIEW|AGGREGATE) (?!pg_temp\.)([\w.]+)", re.I
)


def _qualified(name: str) -> str:
    return name.lower() if "." in name else f"public.{name.lower()}"


def _defined_in_files() -> set[str]:
    return {
        _qualified(found.group(1))
        for d in definitions.load_dir(migrate.sql_dir())
        for stmt in _statements(d.sql)
        if (found := CREATES.match(stmt))
    }


def test_migrations_after_the_definitions_define_only_what_a_file_defines() -> None:
    in_files = _defined_in_files()
    assert "public.rule_nats_rollup_attempts" in in_files
    for m in migrate.load_dir(migrate.sql_dir()):
        if m.filename in RELEASED:
            continue
        for stmt in _statements(m.sql):
            found = CREATES.match(stmt)
            if found and _qualified(found.group(1)) not in in_files:
                pytest.fail(
                    f"{m.filename} defines {found.group(1)}, which no file of sql/definitions/ defines: put its "
                    "definition there (docs/schema.md, 'Adding or changing a function or view'); a migration "
                    "keeps tables, data and DROPs, and creates only what it needs itself, also defined in a file"
                )


def test_the_guard_sees_a_function_only_a_migration_defines() -> None:
    stmt = _statements("CREATE FUNCTION rule_nats_only_here() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;")[0]
    found = CREATES.match(stmt)
    assert found and _qualified(found.group(1)) not in _defined_in_files()
    temp = _statements("CREATE FUNCTION pg_temp.helper() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;")[0]
    assert CREATES.match(temp) is None
