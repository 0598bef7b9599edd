"""Runtime SQL lives in ``queries.sql``; this module loads it by name (pure logic)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from sidecar.errors import WorkerError

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of ``-- name: x`` blocks into {name: sql}; duplicate names are an error."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(
            line for line in body.strip().splitlines() if not line.lstrip().startswith("--")
        ).strip()
        if name in queries:
            raise WorkerError(f"query {name!r} is defined twice in queries.sql")
        if not sql:
            raise WorkerError(f"query {name!r} in queries.sql is empty")
        queries[name] = sql
    return queries


@cache
def _all() -> dict[str, str]:
    text = resources.files("sidecar").joinpath("queries.sql").read_text(encoding="utf-8")
    return parse_queries(text)


def query(name: str) -> str:
    """Return the SQL text of the named query."""
    try:
        return _all()[name]
    except KeyError:
        raise WorkerError(f"no query named {name!r} in queries.sql") from None
