"""Schema migrations: numbered plain SQL files, applied in order, each in a transaction; then the
repeatable definition files of sql/definitions/ (sidecar/definitions.py) that changed.

Pure part: discovering the files and planning what to apply. I/O part: applying
the plan under a PostgreSQL advisory lock so two processes cannot race.
Every migration file records itself in ``rule_nats_schema_migrations`` as its last
statement, so files applied by hand with psql and files applied here agree; this
module also stores each file's checksum and refuses to run when a released file
was edited afterwards. Definition files record themselves in ``rule_nats_schema_definitions``
the same way; they may change in every release, and a changed one is applied again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from sidecar import definitions
from sidecar.definitions import AppliedDefinition, Definition, State
from sidecar.errors import MigrationError
from sidecar.queries import query

logger = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    filename: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str | None


def sql_dir() -> Path:
    """The migrations folder: the repository's ``sql/`` or the copy inside the wheel."""
    repo = Path(__file__).resolve().parent.parent / "sql"
    if repo.is_dir():
        return repo
    packaged = Path(str(resources.files("sidecar").joinpath("_sql")))
    if packaged.is_dir():
        return packaged
    raise MigrationError("cannot find the sql/ migrations folder")


def discover(files: dict[str, str]) -> list[Migration]:
    """Turn {filename: text} into migrations sorted by version; gaps and duplicates are errors."""
    migrations: list[Migration] = []
    for filename, text in files.items():
        match = _FILE.match(filename)
        if match is None:
            continue
        migrations.append(Migration(int(match.group(1)), match.group(2), filename, text))
    migrations.sort(key=lambda m: m.version)
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration numbers must run 0001, 0002, ... without gaps or repeats; "
                f"found {migration.filename} where {expected:04d} was expected"
            )
    return migrations


def load_dir(directory: Path) -> list[Migration]:
    files = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.sql")}
    return discover(files)


def plan(available: list[Migration], applied: list[AppliedMigration]) -> list[Migration]:
    """Return the migrations still to apply, after checking the database against the files."""
    by_version = {m.version: m for m in available}
    for row in applied:
        migration = by_version.get(row.version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {row.version:04d} ({row.name}) that this version "
                f"of webhook-worker does not know: upgrade webhook-worker"
            )
        if row.checksum is not None and row.checksum != migration.checksum:
            raise MigrationError(
                f"{migration.filename} was changed after it was applied (checksum mismatch); "
                f"released migrations must not be edited: put the change in a new migration"
            )
    done = {row.version for row in applied}
    return [m for m in available if m.version not in done]


def _applied(conn: psycopg.Connection[tuple[object, ...]]) -> list[AppliedMigration]:
    present = conn.execute(query("migrations_table_exists")).fetchone()
    if not present or not present[0]:
        return []
    rows = conn.execute(query("applied_migrations")).fetchall()
    return [AppliedMigration(int(str(v)), str(n), None if c is None else str(c)) for v, n, c in rows]


def _applied_definitions(conn: psycopg.Connection[tuple[object, ...]]) -> list[AppliedDefinition]:
    present = conn.execute(query("definitions_table_exists")).fetchone()
    if not present or not present[0]:
        return []  # a release before the definition files: every file is new
    rows = conn.execute(query("applied_definitions")).fetchall()
    return [AppliedDefinition(str(f), None if c is None else str(c)) for f, c in rows]


@dataclass(frozen=True, slots=True)
class Status:
    """What ``migrate --status`` shows: numbered migrations applied and pending, and where each
    definition file stands."""

    applied: list[AppliedMigration]
    pending: list[Migration]
    definitions: list[tuple[Definition, State]]

    @property
    def stale_definitions(self) -> list[Definition]:
        """Files this version ships that the database lacks or holds in another version (a file
        applied by hand counts as applied, like a numbered migration)."""
        return [d for d, state in self.definitions if state in (State.NEW, State.CHANGED)]

    def lines(self) -> list[str]:
        out = [f"applied  {row.version:04d}_{row.name}" for row in self.applied]
        out += [f"pending  {m.filename}" for m in self.pending]
        for d, state in self.definitions:
            where = f"{definitions.FOLDER}/{d.filename}"
            out.append(f"current  {where}" if state is State.CURRENT else f"pending  {where} ({state.value})")
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``migrate`` run applied."""

    migrations: list[Migration]
    definitions: list[Definition]

    def lines(self) -> list[str]:
        out = [f"applied {m.filename}" for m in self.migrations]
        out += [f"applied {definitions.FOLDER}/{d.filename}" for d in self.definitions]
        return out or ["schema is up to date"]


def report(conninfo: str, directory: Path | None = None) -> Status:
    """Where the database stands against this version's files, without changing anything."""
    folder = directory or sql_dir()
    available = load_dir(folder)
    shipped = definitions.load_dir(folder)
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            applied = _applied(conn)
            recorded = _applied_definitions(conn)
    except psycopg.Error as exc:
        raise MigrationError(f"cannot read the migration state: {exc}") from exc
    return Status(applied, plan(available, applied), definitions.states(shipped, recorded))


def status(conninfo: str, directory: Path | None = None) -> tuple[list[AppliedMigration], list[Migration]]:
    """Return (applied, pending) numbered migrations without changing anything."""
    state = report(conninfo, directory)
    return state.applied, state.pending


def migrate(conninfo: str, directory: Path | None = None) -> list[Migration]:
    """Apply every pending migration and changed definition; return the migrations applied."""
    return run(conninfo, directory).migrations


def run(conninfo: str, directory: Path | None = None) -> Outcome:
    """Apply every pending migration, then the definition files that changed (all of them when a
    migration was applied); return what was applied (nothing when up to date)."""
    folder = directory or sql_dir()
    available = load_dir(folder)
    shipped = definitions.load_dir(folder)
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(query("migration_lock"))
            try:
                # Read the state only once the lock is held: another process may just have migrated.
                done, by_hand = _migrate_numbered(conn, available)
                # A migration may have dropped a view or function (to change a column it reads):
                # after one, every definition file is applied again.
                todo = _apply_definitions(conn, shipped, migrated=bool(done) or by_hand)
            finally:
                conn.execute(query("migration_unlock"))
    except psycopg.Error as exc:
        raise MigrationError(f"migration failed: {exc}") from exc
    return Outcome(done, todo)


def _migrate_numbered(
    conn: psycopg.Connection[tuple[object, ...]], available: list[Migration]
) -> tuple[list[Migration], bool]:
    """Apply the pending numbered migrations; return them, and whether any file was applied by
    hand with psql since the last run (its checksum is filled in here)."""
    done: list[Migration] = []
    for migration in plan(available, _applied(conn)):
        _apply_one(conn, migration)
        done.append(migration)
    # Each migration was isolated in its own transaction; this catches what a file
    # applied by hand with psql granted to the public names.
    _isolate(conn)
    by_hand = [row for row in _applied(conn) if row.checksum is None]
    for row in by_hand:
        conn.execute(
            query("migration_set_checksum"),
            {"version": row.version, "checksum": available[row.version - 1].checksum},
        )
    return done, bool(by_hand)


def _apply_definitions(
    conn: psycopg.Connection[tuple[object, ...]], shipped: list[Definition], migrated: bool
) -> list[Definition]:
    """Apply the definition files that need it, all in one transaction (a view of one file may
    need a function of another); forget the records of files no longer shipped."""
    recorded = _applied_definitions(conn)
    todo = definitions.plan(shipped, recorded, migrated)
    forget = definitions.gone(shipped, recorded)
    if not todo and not forget:
        return []
    with conn.transaction(), _public_names(conn):
        conn.execute("SET LOCAL search_path = public")
        for definition in todo:
            _apply_definition(conn, definition)
        if forget:
            logger.info(
                "forgetting definition files this version does not ship: %s",
                ", ".join(forget),
                extra={"action": "definition_forget"},
            )
            conn.execute(query("definitions_forget"), {"filenames": forget})
        # As for a migration: what the files granted to the public rule_nats_* names moves to
        # this database's own roles before the transaction commits.
        _isolate(conn)
    return todo


@contextmanager
def _public_names(conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
    """Inside a transaction whose statements grant to the public rule_nats_* names: the names that
    do not exist any more (the cluster's first installation was uninstalled) stand in for this
    installation's roles, NOLOGIN, until isolate() has moved the grants; then they go again."""
    present = conn.execute(query("isolation_present")).fetchone()
    missing = (
        []
        if not present or not present[0]
        else [str(r[0]) for r in conn.execute(query("public_roles_missing"))]
    )
    for name in missing:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
    yield
    for name in missing:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _apply_definition(conn: psycopg.Connection[tuple[object, ...]], definition: Definition) -> None:
    where = f"{definitions.FOLDER}/{definition.filename}"
    logger.info("applying %s", where, extra={"action": "definition_apply", "definition": definition.filename})
    try:
        conn.execute(definition.sql.encode("utf-8"))
        row = conn.execute(query("definition_recorded"), {"filename": definition.filename}).fetchone()
    except psycopg.Error as exc:
        diag = exc.diag
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        raise MigrationError(f"{where}: {exc}{detail}") from exc
    if not row or row[0] != 1:
        raise MigrationError(f"{where} did not record itself in rule_nats_schema_definitions")
    conn.execute(
        query("definition_set_checksum"), {"filename": definition.filename, "checksum": definition.checksum}
    )


def _isolate(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Move what a migration granted to the public rule_nats_* roles to this installation's own
    roles when it has some (sql/0017_isolation.sql): a later migration need not know about them."""
    present = conn.execute(query("isolation_present")).fetchone()
    if not present or not present[0]:
        return
    moved = conn.execute(query("isolation_apply")).fetchone()
    if moved and moved[0]:
        logger.info(
            "moved %s grants to this database's own roles",
            moved[0],
            extra={"action": "migration_isolate"},
        )


def _apply_one(conn: psycopg.Connection[tuple[object, ...]], migration: Migration) -> None:
    logger.info(
        "applying migration %s",
        migration.filename,
        extra={"action": "migration_apply", "version": migration.version},
    )
    try:
        with conn.transaction(), _public_names(conn):
            conn.execute("SET LOCAL search_path = public")
            conn.execute(migration.sql.encode("utf-8"))
            row = conn.execute(query("migration_recorded"), {"version": migration.version}).fetchone()
            if not row or row[0] != 1:
                raise MigrationError(
                    f"{migration.filename} did not record itself in rule_nats_schema_migrations"
                )
            conn.execute(
                query("migration_set_checksum"),
                {"version": migration.version, "checksum": migration.checksum},
            )
            # In the migration's own transaction: when a later migration fails, what this one
            # granted to the public rule_nats_* names has already moved to this database's roles.
            _isolate(conn)
    except psycopg.Error as exc:
        diag = exc.diag
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        raise MigrationError(f"{migration.filename}: {exc}{detail}") from exc
