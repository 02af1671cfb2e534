"""``python -m visadapt.train.<module> --help``: a job run as a module names itself that way in its usage (it said
``train/<module>.py``, the checkout's script, before)."""
from __future__ import annotations

import runpy
import sys

import pytest

from visadapt.train import COMMANDS


@pytest.mark.parametrize("module", sorted({module for module, _ in COMMANDS.values()}))
def test_a_job_run_as_a_module_names_itself_so(module, monkeypatch, capsys):
    name = f"visadapt.train.{module}"
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:  # runpy runs the module's __main__ block, as python -m does
        runpy.run_module(name, run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {name} ")
