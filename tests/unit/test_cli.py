from __future__ import annotations

import pytest

from sidecar import cli


def test_help_lists_migrate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "migrate" in capsys.readouterr().out


def test_missing_database_url_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(str(tmp_path))
    assert cli.main(["migrate"]) == 1
    assert "--database-url" in capsys.readouterr().err
