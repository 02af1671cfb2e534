"""``visadapt-train COMMAND`` / ``python -m visadapt.train COMMAND`` / ``train/<job>.py``: one dispatcher, and
each job's usage names the way it was invoked. (The installed wheel runs them from outside the checkout in
``tests/test_wheel_install.py``.)"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from visadapt.train import COMMANDS, run
from visadapt.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _exit_code(call) -> int:
    """The code ``call()`` returns, or the one argparse leaves with (``--help``: 0, a bad flag: 2)."""
    try:
        return call()
    except SystemExit as exit_:
        return exit_.code


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: visadapt-train COMMAND")
    for command, (_, summary) in COMMANDS.items():
        assert f"  {command} " in out and summary in out


@pytest.mark.parametrize("command, hint", [
    ("vtba", "did you mean 'vtab'?"),
    ("selma_data", "did you mean 'selma-data'?"),  # the module's spelling
    ("vpr.py", "did you mean 'vpr'?"),  # the thin script's name
    ("xyzzy", None),
])
def test_unknown_command_is_one_error_line_with_a_suggestion(command, hint, capsys):
    assert main([command, "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: unknown command {command!r}")
    assert (hint in errors[0]) if hint else "did you mean" not in errors[0]
    assert "choose from vtab, vpr, rank" in errors[0]


def test_no_command_is_an_error_naming_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: give a command: {', '.join(COMMANDS)}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_job_usage_names_how_it_was_invoked(command, capsys):
    """``visadapt-train vtab --help`` says ``usage: visadapt-train vtab``, not the checkout's script name;
    every job takes the ``prog`` the dispatcher passes."""
    assert _exit_code(lambda: main([command, "--help"])) == 0
    assert capsys.readouterr().out.startswith(f"usage: visadapt-train {command} ")
    assert _exit_code(lambda: main([command, "--help"], prog="python -m visadapt.train")) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m visadapt.train {command} ")


def test_a_bad_flag_names_the_command_as_invoked(capsys):
    assert _exit_code(lambda: main(["vtab", "--no-such-flag"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: visadapt-train vtab ") and "unrecognized arguments: --no-such-flag" in err


def test_thin_script_and_run_keep_the_script_name(monkeypatch, capsys):
    """``train/vtab.py --help`` (what ``accelerate launch`` runs) still says ``usage: train/vtab.py``."""
    assert _exit_code(lambda: run("selma-data", ["--help"])) == 0
    assert capsys.readouterr().out.startswith("usage: train/selma_data.py ")
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train" / "vtab.py"), "--help"])
    assert _exit_code(lambda: runpy.run_path(str(ROOT / "train" / "vtab.py"), run_name="__main__")) == 0
    assert capsys.readouterr().out.startswith("usage: train/vtab.py ")


def test_python_dash_m_spells_itself(monkeypatch, capsys):
    """``python -m visadapt.train vtab --help`` says ``usage: python -m visadapt.train vtab``."""
    monkeypatch.setattr(sys, "argv", ["__main__.py", "vtab", "--help"])
    assert _exit_code(lambda: runpy.run_module("visadapt.train", run_name="__main__", alter_sys=True)) == 0
    assert capsys.readouterr().out.startswith("usage: python -m visadapt.train vtab ")
