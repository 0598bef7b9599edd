"""The definition files of sql/definitions/ against a real PostgreSQL: applied when they change
(and only then), all again after a migration, all or nothing, and complete on their own."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sidecar import migrate, preflight, schema_dump
from sidecar.errors import MigrationError, SetupError
from tests.support.stack import PostgresCluster

REPO_SQL = Path(__file__).resolve().parents[2] / "sql"


def copy_sql(target: Path) -> Path:
    """The shipped migrations and definition files in a folder of their own, to edit."""
    shutil.copytree(REPO_SQL, target, ignore=shutil.ignore_patterns("schema.sql"))
    return target


def edit(folder: Path, filename: str, extra: str) -> None:
    """Add statements to a definition file just before the statement that records it."""
    path = folder / "definitions" / filename
    text = path.read_text()
    at = text.index("INSERT INTO rule_nats_schema_definitions")
    path.write_text(text[:at] + extra + "\n" + text[at:])


def comment_of(url: str, function: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT obj_description(%s::regprocedure, 'pg_proc')", (function,)).fetchone()
    return None if row is None else row[0]


def test_a_changed_file_is_applied_alone_and_an_unchanged_one_not_at_all(
    empty_database_url: str, tmp_path: Path
) -> None:
    folder = copy_sql(tmp_path / "sql")
    first = migrate.run(empty_database_url, folder)
    assert [d.filename for d in first.definitions] == sorted(
        p.name for p in (folder / "definitions").iterdir()
    )
    assert migrate.run(empty_database_url, folder).lines() == ["schema is up to date"]

    edit(
        folder,
        "60_operations.sql",
        "COMMENT ON FUNCTION rule_nats_latency_bucket(double precision) IS 'edited';",
    )
    assert [line.split()[0] for line in migrate.report(empty_database_url, folder).lines()].count(
        "pending"
    ) == 1
    again = migrate.run(empty_database_url, folder)
    assert again.migrations == [] and [d.filename for d in again.definitions] == ["60_operations.sql"]
    assert comment_of(empty_database_url, "rule_nats_latency_bucket(double precision)") == "edited"
    assert migrate.run(empty_database_url, folder).definitions == []
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute(
            "SELECT filename, checksum FROM rule_nats_schema_definitions ORDER BY 1"
        ).fetchall()
    shipped = {d.filename: d.checksum for d in migrate.definitions.load_dir(folder)}
    assert dict(rows) == shipped


def test_after_a_migration_every_file_is_applied_again(empty_database_url: str, tmp_path: Path) -> None:
    """A migration that drops views (to change a column they read) gets them back from their file,
    with their grants, on this installation's own roles."""
    folder = copy_sql(tmp_path / "sql")
    migrate.run(empty_database_url, folder)
    newest = max(int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    (folder / f"{newest + 1:04d}_drop_view.sql").write_text(
        "DROP VIEW nats_worker_status CASCADE;\n"  # nats_consumer_status goes with it
        f"INSERT INTO rule_nats_schema_migrations (version, name) VALUES ({newest + 1}, 'drop_view');\n"
    )
    done = migrate.run(empty_database_url, folder)
    assert [m.version for m in done.migrations] == [newest + 1]
    assert len(done.definitions) == len(list((folder / "definitions").iterdir()))
    with psycopg.connect(empty_database_url) as conn:
        grantees = conn.execute(
            "SELECT array_agg(a.grantee::regrole::text ORDER BY a.grantee::regrole::text) "
            "FROM pg_class c, aclexplode(c.relacl) a "
            "WHERE c.oid = 'nats_worker_status'::regclass AND a.grantee <> c.relowner"
        ).fetchone()
        assert conn.execute("SELECT to_regclass('nats_consumer_status') IS NOT NULL").fetchone() == (True,)
        own = conn.execute(
            "SELECT rule_nats_role('admin'), rule_nats_role('monitor'), rule_nats_role('worker')"
        )
        expected = sorted(str(r) for r in (own.fetchone() or ()))
    assert grantees == (expected,)
    assert not any(g in ("rule_nats_admin", "rule_nats_monitor", "rule_nats_worker") for g in expected)


def test_a_failing_file_applies_none_of_them(empty_database_url: str, tmp_path: Path) -> None:
    folder = copy_sql(tmp_path / "sql")
    migrate.run(empty_database_url, folder)
    edit(folder, "10_rules.sql", "COMMENT ON FUNCTION rule_nats_valid_name(text) IS 'edited';")
    edit(folder, "90_uninstall.sql", "SELECT no_such_function();")
    with pytest.raises(MigrationError, match=r"definitions/90_uninstall\.sql: .*no_such_function"):
        migrate.run(empty_database_url, folder)
    assert comment_of(empty_database_url, "rule_nats_valid_name(text)") != "edited"
    pending = [ln for ln in migrate.report(empty_database_url, folder).lines() if ln.startswith("pending")]
    assert pending == [
        "pending  definitions/10_rules.sql (changed)",
        "pending  definitions/90_uninstall.sql (changed)",
    ]


def test_a_file_applied_with_psql_counts_as_applied_and_is_applied_again(database_url: str) -> None:
    target = migrate.definitions.load_dir(migrate.sql_dir())[0]
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(target.sql.encode())
    lines = migrate.report(database_url).lines()
    assert f"pending  definitions/{target.filename} (by hand)" in lines
    preflight.check_schema(database_url)  # like a migration applied with psql: the worker starts
    assert [d.filename for d in migrate.run(database_url).definitions] == [target.filename]
    assert f"current  definitions/{target.filename}" in migrate.report(database_url).lines()


def test_the_worker_refuses_to_start_on_definitions_of_another_version(database_url: str) -> None:
    """As with a missing migration: functions and views older (or newer) than the worker's."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_nats_schema_definitions SET checksum = 'old' WHERE filename = '40_publish.sql'"
        )
        conn.execute(
            sql.SQL("CREATE ROLE defs_worker LOGIN IN ROLE {}").format(
                sql.Identifier(str(conn.execute("SELECT rule_nats_role('worker')").fetchone()[0]))  # type: ignore[index]
            )
        )
    worker_url = database_url.replace("postgresql://postgres@", "postgresql://defs_worker@")
    try:
        with pytest.raises(SetupError, match=r"sql/definitions/40_publish\.sql.*webhook-worker migrate"):
            preflight.check_schema(worker_url)
        migrate.run(database_url)
        preflight.check_schema(worker_url)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DROP OWNED BY defs_worker")
            conn.execute("DROP ROLE defs_worker")


def test_an_installation_that_outlived_the_clusters_first_one_still_migrates(tmp_path: Path) -> None:
    """Uninstalling the cluster's first installation drops the public role names (no database
    uses them any more); the files grant to those names, as the migrations do. The next release
    of another database of the cluster failed with 'role "rule_nats_admin" does not exist'."""
    cluster = PostgresCluster(tmp_path / "pg")
    cluster.start()
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE first")
            conn.execute("CREATE DATABASE second")
        migrate.migrate(cluster.url("first"))
        migrate.migrate(cluster.url("second"))  # roles of its own
        with psycopg.connect(cluster.url("first"), autocommit=True) as conn:
            conn.execute("SELECT rule_nats_private.uninstall()")
        public = (
            "SELECT count(*) FROM pg_roles WHERE rolname ~ '^rule_nats_(admin|monitor|worker|publisher)$'"
        )
        with psycopg.connect(cluster.url("second"), autocommit=True) as conn:
            assert conn.execute(public).fetchone() == (0,)
            conn.execute(
                "UPDATE rule_nats_schema_definitions SET checksum = 'old' WHERE filename = '70_views.sql'"
            )
        done = migrate.run(cluster.url("second"))
        assert [d.filename for d in done.definitions] == ["70_views.sql"]
        with psycopg.connect(cluster.url("second"), autocommit=True) as conn:
            assert conn.execute(public).fetchone() == (0,)  # they stood in for the transaction only
            grants = conn.execute(
                "SELECT has_table_privilege(rule_nats_role('monitor'), 'nats_worker_status', 'SELECT')"
            ).fetchone()
            assert grants == (True,)
    finally:
        cluster.cleanup()


# -- The files are complete: owners, grants, search_path pins, comments and views come back from
# -- them alone, in an order that works when none of the objects exists.

_ENTRY = re.compile(
    r"^--\n-- Name: (?P<name>.*); Type: (?P<type>[A-Z ]+); Schema: [^;]*; Owner: .*\n--\n", re.M
)
_KINDS = ("FUNCTION", "PROCEDURE", "AGGREGATE", "VIEW")


def definition_entries(conninfo: str) -> dict[str, str]:
    """pg_dump's entries for functions, procedures, aggregates and views, with their comments and
    grants, normalised (sidecar/schema_dump.py)."""
    with psycopg.connect(conninfo) as conn:
        suffix = conn.execute("SELECT role_suffix FROM rule_nats_installation_roles").fetchone()
        views = {r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relkind = 'v'").fetchall()}
        version = conn.info.server_version
    raw = schema_dump.run_pg_dump(schema_dump.pg_dump_binary(version), conninfo)
    parts = _ENTRY.split(raw)
    out: dict[str, str] = {}
    for name, kind, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        target = name.split(" ", 1)[1] if kind in ("COMMENT", "ACL") and " " in name else name
        ours = kind in _KINDS or (
            kind in ("COMMENT", "ACL")
            and (name.split(" ", 1)[0] in _KINDS or target.split("(")[0].split(".")[0] in views)
        )
        if ours:
            out[f"{kind} {name}"] = schema_dump.normalise(body, suffix[0] if suffix else None)
    return out


def test_the_files_alone_recreate_every_function_and_view(
    empty_database_url: str, database_url: str, tmp_path: Path
) -> None:
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for f in REPO_SQL.glob("[0-9][0-9][0-9][0-9]_*.sql"):
        shutil.copy(f, numbered / f.name)
    migrate.run(empty_database_url, numbered)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            """
            DO $$
            DECLARE
                -- Names first: a view or aggregate dropped by an earlier CASCADE has no name left.
                v_views text[] := ARRAY(SELECT c.oid::regclass::text FROM pg_class c
                                         WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace);
                v_procs text[] := ARRAY(
                    SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE ' WHEN 'a' THEN 'AGGREGATE ' ELSE 'FUNCTION ' END
                           || p.oid::regprocedure::text
                      FROM pg_proc p
                     WHERE p.pronamespace IN ('public'::regnamespace, 'rule_nats_private'::regnamespace)
                       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e'));
                v text;
            BEGIN
                FOREACH v IN ARRAY v_views LOOP
                    EXECUTE format('DROP VIEW IF EXISTS %s CASCADE', v);
                END LOOP;
                FOREACH v IN ARRAY v_procs LOOP
                    EXECUTE format('DROP %s IF EXISTS %s CASCADE', split_part(v, ' ', 1), substr(v, strpos(v, ' ') + 1));
                END LOOP;
            END
            $$
            """
        )
        left = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND proname LIKE 'rule\\_%'"
        ).fetchone()
        assert left == (0,)
    assert migrate.run(empty_database_url).definitions  # from the files alone
    rebuilt, reference = definition_entries(empty_database_url), definition_entries(database_url)
    assert len(reference) > 200
    missing, extra = sorted(set(reference) - set(rebuilt)), sorted(set(rebuilt) - set(reference))
    assert not missing and not extra, (
        f"missing from the files: {missing}; not in a migrated database: {extra}"
    )
    for key, text in reference.items():
        assert rebuilt[key] == text, key
