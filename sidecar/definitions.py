"""Repeatable definition files: sql/definitions/NN_area.sql (pure logic; I/O in sidecar/migrate.py).

Each file holds the current definition of some functions, procedures, aggregates and views, with
their owner, grants and comments, written so that running it twice changes nothing. ``migrate``
re-applies a file whose checksum differs from the one recorded in rule_nats_schema_definitions
(or that is not recorded, or was applied by hand with psql), and every file after a numbered
migration was applied in the same run (a migration may have dropped a view to change a table's
column). Files run in file-name order, all in one transaction: the two-digit prefix orders them
so that an object is defined after what its definition needs (docs/schema.md).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sidecar.errors import MigrationError

FOLDER = "definitions"
_FILE = re.compile(r"^\d{2}_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Definition:
    filename: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def record(self) -> str:
        """The statement the file ends with: it records itself, like a numbered migration."""
        return (
            f"INSERT INTO rule_nats_schema_definitions (filename) VALUES ('{self.filename}')\n"
            "    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;"
        )


@dataclass(frozen=True, slots=True)
class AppliedDefinition:
    filename: str
    checksum: str | None


class State(Enum):
    """Where a shipped definition file stands in a database (``migrate --status``)."""

    CURRENT = "current"  # applied with this checksum
    CHANGED = "changed"  # applied, but the file differs now
    NEW = "new"  # never applied here
    BY_HAND = "by hand"  # applied with psql: no checksum, re-applied by the next migrate

    @property
    def pending(self) -> bool:
        return self is not State.CURRENT


def discover(files: dict[str, str]) -> list[Definition]:
    """Turn {filename: text} into definitions in file-name order; other names are errors."""
    wrong = sorted(name for name in files if not _FILE.match(name))
    if wrong:
        raise MigrationError(
            f"sql/{FOLDER}/ holds {', '.join(wrong)}: definition files are named NN_area.sql "
            "(two digits, then lower-case letters, digits and _)"
        )
    return [Definition(name, files[name]) for name in sorted(files)]


def load_dir(migrations_dir: Path) -> list[Definition]:
    """The definition files beside the numbered migrations (none in a release that had none)."""
    folder = migrations_dir / FOLDER
    if not folder.is_dir():
        return []
    return discover({p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.sql")})


def states(available: list[Definition], applied: list[AppliedDefinition]) -> list[tuple[Definition, State]]:
    recorded = {row.filename: row.checksum for row in applied}
    out: list[tuple[Definition, State]] = []
    for definition in available:
        if definition.filename not in recorded:
            state = State.NEW
        elif recorded[definition.filename] is None:
            state = State.BY_HAND
        elif recorded[definition.filename] == definition.checksum:
            state = State.CURRENT
        else:
            state = State.CHANGED
        out.append((definition, state))
    return out


def plan(available: list[Definition], applied: list[AppliedDefinition], migrated: bool) -> list[Definition]:
    """The files to apply, in order: all of them after a numbered migration, else those not current."""
    if migrated:
        return list(available)
    return [d for d, state in states(available, applied) if state.pending]


def gone(available: list[Definition], applied: list[AppliedDefinition]) -> list[str]:
    """Recorded files this version does not ship (merged into another or renamed): their records go;
    the objects they defined stay until a numbered migration drops them."""
    shipped = {d.filename for d in available}
    return sorted(row.filename for row in applied if row.filename not in shipped)
