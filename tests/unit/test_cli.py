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
    assert cli.main(["migrate"]) == 2  # cannot start: the same code for every subcommand
    assert "--database-url" in capsys.readouterr().err


def test_global_options_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--log-level", "DEBUG", "--env-file", "a.env", "status"])
    after = parser.parse_args(["status", "--log-level", "DEBUG", "--env-file", "a.env"])
    for args in (before, after):
        assert (args.log_level, str(args.env_file), args.command) == ("DEBUG", "a.env", "status")
    plain = parser.parse_args(["run"])
    assert (plain.log_level, str(plain.env_file), plain.log_format) == (None, ".env", None)


def test_every_command_is_described(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("migrate", "run", "status", "sql"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        description = out.split("\n\n")[1]
        assert not description.startswith(("options", "positional")), command


def test_run_help_lists_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.config import ENVIRONMENT_VARIABLES

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert set(cli.ENVIRONMENT_HELP) == ENVIRONMENT_VARIABLES
    for name in ENVIRONMENT_VARIABLES:
        assert f"  {name} " in out, name
