from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.envfile import load_env, parse_env
from sidecar.errors import ConfigError


def test_parse_forms() -> None:
    text = """
# comment
NATS_URL=nats://localhost:4222
export STREAM_NAME=WEBHOOKS
NATS_PASS='p@ss word # not a comment'
DATABASE_URL="postgresql://u:p@h/db?x=1"
ESCAPED="a\\"b\\nc"
BATCH_SIZE=10 # trailing comment
EMPTY=
"""
    env = parse_env(text)
    assert env == {
        "NATS_URL": "nats://localhost:4222",
        "STREAM_NAME": "WEBHOOKS",
        "NATS_PASS": "p@ss word # not a comment",
        "DATABASE_URL": "postgresql://u:p@h/db?x=1",
        "ESCAPED": 'a"b\nc',
        "BATCH_SIZE": "10",
        "EMPTY": "",
    }


@pytest.mark.parametrize("line", ["JUSTAWORD", "1BAD=x", "A='unterminated", 'B="x" trailing'])
def test_malformed_lines_name_the_line(line: str) -> None:
    with pytest.raises(ConfigError, match=r"\.env:2"):
        parse_env("OK=1\n" + line)


def test_environment_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / ".env"
    f.write_text("A=file\nB=file\n")
    assert load_env(f, {"A": "env"}) == {"A": "env", "B": "file"}
    assert load_env(tmp_path / "missing", {"A": "env"}) == {"A": "env"}
