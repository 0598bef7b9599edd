"""How plpython/pgnats.py is embedded in SQL (pure logic, used by scripts and tests).

Its one current copy is the block of sql/definitions/30_pgnats.sql, which `webhook-worker migrate`
applies again whenever it changes; the copies in migrations 0016 and 0017 are history.
"""

from __future__ import annotations

import re
from pathlib import Path

BEGIN = "-- BEGIN EMBEDDED plpython/pgnats.py (scripts/embed-plpython writes this block)"
END = "-- END EMBEDDED plpython/pgnats.py"
TAG = "$pgnats$"
OUTER = "$pgnats_fn$"


def embed(migration_sql: str, source: str) -> str:
    """Return the migration text with the block between BEGIN and END holding ``source``."""
    if TAG in source or OUTER in source:
        raise ValueError(f"the module source must not contain {TAG} or {OUTER}")
    start, end = migration_sql.index(BEGIN), migration_sql.index(END)
    block = (
        f"{BEGIN}\n"
        "CREATE OR REPLACE FUNCTION rule_nats__pgnats_source()\n"
        "RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE\n"
        # CREATE OR REPLACE resets SET clauses: a later migration that embeds the module again
        # keeps the pinned search_path only if the block says so (tests/security/test_search_path_catalog.py).
        "SET search_path = pg_catalog, pg_temp\n"
        f"AS {OUTER}SELECT {TAG}{source}{TAG}::text{OUTER};\n"
        "COMMENT ON FUNCTION rule_nats__pgnats_source() IS "
        "'Internal: source of the pgnats PL/Python module (plpython/pgnats.py).';\n"
    )
    return migration_sql[:start] + block + migration_sql[end:]


def extract(migration_sql: str) -> str | None:
    """The module source embedded in a migration, or None when it embeds none."""
    m = re.search(
        re.escape(f"{OUTER}SELECT {TAG}") + r"(.*?)" + re.escape(f"{TAG}::text{OUTER}"), migration_sql, re.S
    )
    return m.group(1) if m else None


def embedding_target(sql_dir: Path) -> Path:
    """The one definition file (sql/definitions/) that holds the EMBEDDED block."""
    candidates = [p for p in sorted((sql_dir / "definitions").glob("*.sql")) if BEGIN in p.read_text()]
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"exactly one file of {sql_dir / 'definitions'} must hold the EMBEDDED plpython block, "
            f"found {len(candidates)}"
        )
    return candidates[0]
