"""The `pretrain` dispatcher: help, unknown subcommands, pass-through options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import COMMANDS, _find_command, build_parser, main


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_subcommand_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err


def test_two_word_subcommands_match_before_one_word() -> None:
    assert _find_command(["prepare", "text", "a.txt"]) == ("prepare text", ["a.txt"])
    assert _find_command(["inspect", "dir"]) == ("inspect", ["dir"])
    assert _find_command(["prepare"]) is None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_option_has_help(name: str) -> None:
    parser, _ = build_parser(name)
    undocumented = [action.dest for action in parser._actions if not action.help]
    assert not undocumented, f"pretrain {name}: options without help: {undocumented}"


def test_console_help_runs_in_a_fresh_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "demo", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout
