"""A small, dependency-free reader for ``.env`` files (pure logic).

Supported: ``KEY=value``, ``export KEY=value``, single or double quotes,
``#`` comments on their own line or after an unquoted value, blank lines.
Variables already in the process environment win over the file, as with
docker and python-dotenv.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from sidecar.errors import ConfigError

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def parse_env(text: str, source: str = ".env") -> dict[str, str]:
    """Parse the text of a .env file into a dict; raise ConfigError on a malformed line."""
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(raw)
        if match is None:
            raise ConfigError(f"{source}:{lineno}: expected KEY=value, got {stripped[:40]!r}")
        key, value = match.group(1), match.group(2)
        result[key] = _unquote(value, source, lineno)
    return result


def _unquote(value: str, source: str, lineno: int) -> str:
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        while quote == '"' and end > 0 and value[end - 1] == "\\":
            end = value.find(quote, end + 1)
        if end < 0:
            raise ConfigError(f"{source}:{lineno}: unterminated {quote} quote")
        rest = value[end + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{source}:{lineno}: unexpected text after the closing quote")
        inner = value[1:end]
        if quote == "'":
            return inner
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), inner)
    # An unquoted value ends at " #" (a trailing comment).
    hash_at = value.find(" #")
    return value if hash_at < 0 else value[:hash_at].rstrip()


def load_env(path: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """Merge a .env file under the real environment; a missing default file is fine."""
    merged: dict[str, str] = {}
    if path is not None and path.is_file():
        merged.update(parse_env(path.read_text(encoding="utf-8"), source=str(path)))
    merged.update(environ)
    return merged
