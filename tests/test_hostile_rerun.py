"""``eval/bench/hostile_rerun.py``: issue 23's hostile cases rerun as one script.

The quick mode runs a few cases of every category and must come out all clean; the classifier it uses is checked
to tell each kind of failure apart (a raw exception, an error not naming its input, a changed tensor, a write
outside the case's folder, an unpickle), so an all-clean table means something.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "bench" / "hostile_rerun.py"
CATEGORIES = ("header fields", "config fields", "allocation and shapes", "truncation", "crafted heads",
              "diffusers pipeline", "inspect", "pickle", "split files", "images", "cache", "concurrent generation",
              "killed save", "permissions", "resume")


def test_the_quick_rerun_is_all_clean():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env,
                            cwd=ROOT, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.rsplit(maxsplit=6)
        if len(cells) == 7 and cells[1].isdigit():
            rows[cells[0].strip()] = [int(c) for c in cells[1:6]]
    assert set(CATEGORIES) <= set(rows), sorted(rows)
    for category, (cases, clean, raw, silent, security) in rows.items():
        assert cases > 0 and cases == clean and raw == silent == security == 0, (category, result.stdout[-4000:])
    assert rows["total"][0] >= 60


@pytest.fixture()
def rerun(tmp_path, monkeypatch):
    """The script's case runner on a workspace of the test's own."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import hostile_rerun

    work = tmp_path / "work"
    work.mkdir()
    return hostile_rerun.Rerun(work, quick=True)


class _Unpicklable:
    pass


def test_the_classifier_tells_each_kind_of_outcome_apart(rerun, tmp_path):
    run = rerun
    from visadapt.io import AdapterFileError

    model = torch.nn.Linear(2, 2)
    case = run.folder()
    named = str(case / "a.safetensors")

    def raises(err):
        def action():
            raise err
        return action

    def changes_then_refuses():
        with torch.no_grad():
            model.weight.add_(1)
        raise AdapterFileError(f"{named}: header field 'x' is wrong")

    def writes_outside():
        (tmp_path / "outside.txt").write_text("x")  # outside the workspace: seen by the audit hook

    def writes_in_workspace():
        (case / "b.txt").write_text("x")  # inside the workspace, but not where the case may write

    outcomes = {
        "clean": raises(AdapterFileError(f"{named}: header field 'x' is wrong")),
        "unnamed": raises(AdapterFileError("something is wrong")),
        "raw": raises(KeyError("plugin")),
        "changed": changes_then_refuses,
        "accepted": lambda: None,
        "outside": writes_outside,
        "workspace": writes_in_workspace,
        "unpickle": lambda: pickle.loads(pickle.dumps(_Unpicklable())),
    }
    for name, action in outcomes.items():
        run.case("c", name, action, names=(named,), models=model)
    run.case("c", "allowed write", writes_in_workspace, may_write=(case,), accept=lambda _: None)
    run.case("c", "security from a check", lambda: 1, accept=lambda _: "SECURITY: wrote into a frozen weight")
    verdicts = {r.case: r.verdict for r in run.results}
    assert verdicts == {"clean": "clean", "unnamed": "raw", "raw": "raw", "changed": "silent", "accepted": "silent",
                        "outside": "security", "workspace": "security", "unpickle": "security",
                        "allowed write": "clean", "security from a check": "security"}
    table = run.table()
    assert table.splitlines()[-1].split()[:6] == ["total", "10", "2", "2", "2", "4"]  # total clean raw silent sec.
