"""Resume under faults: damaged checkpoints, a missing RNG state, leftovers of killed writes, killed runs.

Every case runs the real ``train/vtab.py`` on a tiny mini-VTAB folder (as ``tests/test_train.py`` does) and
checks the three things a fault must not break: resume continues from the newest complete checkpoint (and ends
with the uninterrupted run's adapter tensors) or stops with one clear error naming the folder or file; and no
partial checkpoint or staging folder is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from train_scripts import load_train_script

from visadapt import engine
from visadapt.data.procedural import generate_mini_vtab
from visadapt.engine import _choose_resume_checkpoint, checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "vtab.py"
TASK = "orientation"
# 24 training images in batches of 8: 3 steps per epoch, 3 epochs, a checkpoint after every step (9 in all).
COMMON = ("--task", TASK, "--epochs", "3", "--checkpoint-every-steps", "1", "--keep-checkpoints", "100")
FAST = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(out), "--no-progress", "--pretrained", "none",
            "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0", *COMMON, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_mini_vtab(tmp_path_factory.mktemp("minivtab"), seed=0,
                              split_sizes={"train800": 16, "val200": 8, "test": 20})


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted run (in a subprocess, like the killed runs it is compared with): its task folder."""
    out = tmp_path_factory.mktemp("reference")
    subprocess.run([sys.executable, str(SCRIPT), *_args(tiny_data, out)], check=True, env=_env(),
                   capture_output=True)
    return out / TASK


def _checkpoints(task_dir: Path) -> list[Path]:
    return sorted((task_dir / "checkpoints").glob("step_*"))


def _run_with(checkpoints: list[Path], out: Path) -> Path:
    """A run folder holding copies of ``checkpoints`` only, as a run killed after writing them would."""
    root = out / TASK / "checkpoints"
    root.mkdir(parents=True)
    for checkpoint in checkpoints:
        shutil.copytree(checkpoint, root / checkpoint.name)
    return root


def _truncate(file: Path, fraction: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * fraction)])


def _resume(tiny_data: Path, out: Path, *extra: str) -> int:
    """The exit code ``train/vtab.py --resume`` gives (its ``__main__`` runs ``main`` through ``run_script``)."""
    from visadapt.engine import run_script

    return run_script(lambda: load_train_script("vtab").main(_args(tiny_data, out, "--resume", *extra)))


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    resumed = json.loads((out / TASK / "metrics.json").read_text())
    full = json.loads((reference / "metrics.json").read_text())
    assert resumed["history"] == full["history"] and resumed["accuracy_final"] == full["accuracy_final"]
    a, b = load_file(str(out / TASK / "adapter.safetensors")), load_file(str(reference / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_nothing_partial(checkpoint_root: Path) -> None:
    """Every ``step_N`` folder is a complete checkpoint and no staging folder is left."""
    assert not list(checkpoint_root.glob(f"{engine._STAGING_PREFIX}*"))
    for folder in checkpoint_root.glob("step_*"):
        assert checkpoint_problem(folder) is None, folder


# ---------------------------------------------------------------------------------------- choosing a checkpoint


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["progress.json", "trainable.safetensors", "optimizer.bin", "scheduler.bin",
                             "random_states_0.pkl"]),
       fraction=st.floats(min_value=0.0, max_value=0.999))
def test_a_truncated_file_makes_the_checkpoint_skipped_with_a_notice_naming_it(reference, name, fraction):
    """Cut any file of the newest checkpoint at any offset: it is skipped for the one before, and the notice
    names the checkpoint and the file."""
    newest, previous = _checkpoints(reference)[-1], _checkpoints(reference)[-2]
    with tempfile.TemporaryDirectory() as tmp:
        root = _run_with([previous, newest], Path(tmp))
        _truncate(root / newest.name / name, fraction)
        problem = checkpoint_problem(root / newest.name)
        assert problem is not None and name in problem
        chosen, notices = _choose_resume_checkpoint(root, 1, needs_scaler=False)
        assert chosen == root / previous.name
        assert len(notices) == 1 and newest.name in notices[0] and name in notices[0]


def test_an_unreadable_progress_file_is_a_broken_checkpoint_not_a_traceback(reference, tmp_path):
    """``progress.json`` that cannot be read at all (here a folder in its place: ``IsADirectoryError``) makes its
    checkpoint skipped like a corrupt one; before, the ``OSError`` escaped from the choice (a traceback, and under
    a multi-process launch the other ranks were left in the broadcast of the choice)."""
    newest, previous = _checkpoints(reference)[-1], _checkpoints(reference)[-2]
    root = _run_with([previous, newest], tmp_path)
    (root / newest.name / "progress.json").unlink()
    (root / newest.name / "progress.json").mkdir()
    problem = checkpoint_problem(root / newest.name)
    assert problem is not None and problem.startswith("progress.json is unreadable (IsADirectoryError")
    chosen, notices = _choose_resume_checkpoint(root, 1, needs_scaler=False)
    assert chosen == root / previous.name and len(notices) == 1 and newest.name in notices[0]


@pytest.mark.parametrize(("field", "value"), [("loss_sums", "x"), ("loss_sums", [1.0, "2"]),
                                             ("loss_sums", [float("inf")]), ("loss_sum", None),
                                             ("loss_count", -1), ("loss_count", True)])
def test_a_crafted_running_loss_in_progress_json_is_a_broken_checkpoint(tmp_path, field, value):
    """The epoch's running loss of a mid-epoch checkpoint (one sum per process) is checked like every other
    progress field: a wrong type is a problem naming the field, never a raw error when the loop restores it."""
    progress = {"epoch": 1, "batch": 1, "step": 4, "history": [], "best": [-1.0, 0], "loss_sums": [1.5, 2.5],
                "loss_count": 1, field: value}
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    problem = checkpoint_problem(tmp_path)
    assert problem is not None and problem.startswith(f"progress.json field {field!r}")


def test_each_process_restores_its_own_running_loss_or_their_mean_under_another_process_count():
    progress = {"loss_sums": [1.5, 2.5]}
    assert [engine._resumed_loss_sum(progress, rank, 2) for rank in range(2)] == [1.5, 2.5]
    assert [engine._resumed_loss_sum(progress, rank, 4) for rank in range(4)] == [2.0] * 4
    assert engine._resumed_loss_sum({"loss_sums": []}, 1, 2) == 0.0
    assert engine._resumed_loss_sum({"loss_sum": 3.0}, 0, 1) == 3.0  # written before per-process sums


@pytest.mark.parametrize("name", ["progress.json", "trainable.safetensors"])
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_as_the_uninterrupted_run(tiny_data, reference, tmp_path,
                                                                                   capsys, name):
    """The issue's two faults (a half-written progress.json, a truncated trainable.safetensors in the newest
    checkpoint): resume uses the checkpoint before it, says so in one line, and ends bit-identical; the broken
    folder is replaced by the first new checkpoint."""
    checkpoints = _checkpoints(reference)
    previous, newest = checkpoints[3], checkpoints[4]  # mid-epoch 2, after its second batch
    root = _run_with([previous, newest], tmp_path)
    _truncate(root / newest.name / name, 0.5)
    assert _resume(tiny_data, tmp_path) == 0
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "skipping broken checkpoint" in line]
    assert len(notices) == 1 and newest.name in notices[0] and name in notices[0]
    metrics = json.loads((tmp_path / TASK / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith(previous.name)
    _assert_same_as_reference(tmp_path, reference)
    assert checkpoint_problem(root / newest.name) is None  # rewritten whole at its step
    _assert_nothing_partial(root)


def test_no_complete_checkpoint_is_one_clear_error_naming_the_folder(tiny_data, reference, tmp_path, capsys):
    root = _run_with(_checkpoints(reference)[:1], tmp_path)
    only = next(root.iterdir())
    (only / "progress.json").write_text('{"epoch": 0, "bat')
    assert _resume(tiny_data, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"no complete checkpoint to resume in {root}" in err and "progress.json is not valid JSON" in err
    assert "Traceback" not in err and not (tmp_path / TASK / "metrics.json").exists()
    assert only.is_dir()  # a checkpoint is evidence: a refused resume deletes nothing


# -------------------------------------------------------------------------------------------------- RNG state


def test_a_missing_rng_state_is_refused_unless_allowed_then_reseeded_with_a_warning(tiny_data, reference, tmp_path,
                                                                                 capsys):
    newest = _checkpoints(reference)[4]
    root = _run_with([newest], tmp_path)
    (root / newest.name / "random_states_0.pkl").unlink()
    assert _resume(tiny_data, tmp_path) == 2
    err = capsys.readouterr().err
    assert "random_states_0.pkl" in err and "--allow-rng-reset" in err and str(root / newest.name) in err
    assert not (tmp_path / TASK / "metrics.json").exists()

    assert _resume(tiny_data, tmp_path, "--allow-rng-reset") == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "random_states_0.pkl" in warning[0]
    assert "dropout masks" in warning[0] and "data order" in warning[0] and "step 5" in warning[0]
    assert json.loads((tmp_path / TASK / "metrics.json").read_text())["resumed_from"].endswith(newest.name)
    _assert_nothing_partial(root)


def test_the_rng_file_accelerate_loads_is_refused_when_it_carries_code(reference, tmp_path):
    """A crafted ``random_states_0.pkl`` whose pickle calls a function is an unreadable checkpoint (Accelerate's
    ``load`` is ``weights_only``), never executed."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    newest = _checkpoints(reference)[-1]
    root = _run_with([newest], tmp_path)
    (root / newest.name / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    problem = checkpoint_problem(root / newest.name)
    assert problem is not None and "random_states_0.pkl" in problem
    assert not (tmp_path / "pwned").exists()


# -------------------------------------------------------------------------------------- killed writes and runs


def test_leftover_staging_folders_are_removed_and_ignored(tiny_data, reference, tmp_path):
    """Folders a killed checkpoint write left (``.tmp-...``) are never resumed from and are gone after resume."""
    checkpoints = _checkpoints(reference)
    root = _run_with([checkpoints[3]], tmp_path)
    # a later checkpoint caught mid-write, and a replaced one caught between its two renames
    shutil.copytree(checkpoints[4], root / f"{engine._STAGING_PREFIX}{checkpoints[4].name}")
    (root / f"{engine._STAGING_PREFIX}{checkpoints[4].name}" / "progress.json").unlink()
    (root / f"{engine._STAGING_PREFIX}replaced-step_00000009").mkdir()
    assert _resume(tiny_data, tmp_path) == 0
    assert json.loads((tmp_path / TASK / "metrics.json").read_text())["resumed_from"].endswith(checkpoints[3].name)
    _assert_same_as_reference(tmp_path, reference)
    _assert_nothing_partial(root)


class _Crash(BaseException):
    """Stands for the process dying: a BaseException, so no ``except Exception`` on the way catches it."""


@FAST
@given(crash_at=st.integers(min_value=1, max_value=60))
def test_a_crash_anywhere_in_a_checkpoint_write_leaves_only_complete_checkpoints(tiny_data, reference, monkeypatch,
                                                                                  crash_at):
    """Kill the writer at the ``crash_at``-th file operation of the checkpoint writes (each fsync of a file or a
    folder, each rename): the checkpoint names hold complete checkpoints only, and resume ends as the
    uninterrupted run did."""
    calls = {"n": 0}

    def dying(real):
        def operation(*args):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise _Crash
            return real(*args)
        return operation

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with monkeypatch.context() as patched:
            patched.setattr(engine, "_fsync", dying(engine._fsync))
            patched.setattr(engine.os, "replace", dying(os.replace))
            with pytest.raises(_Crash):
                load_train_script("vtab").main(_args(tiny_data, out))
        root = out / TASK / "checkpoints"
        assert all(checkpoint_problem(folder) is None for folder in root.glob("step_*"))
        assert _resume(tiny_data, out) == 0
        _assert_same_as_reference(out, reference)
        _assert_nothing_partial(root)


def test_sigkill_at_a_random_moment_leaves_complete_checkpoints_and_resumes_to_the_same_adapter(tiny_data,
                                                                                                  reference, tmp_path):
    """A real process killed with SIGKILL while it trains and writes checkpoints (the moment: as soon as a
    checkpoint folder, staging or final, of step 2..8 appears, drawn at random): every checkpoint name holds a
    complete checkpoint and the resumed run ends with the uninterrupted run's adapter."""
    import random

    target_step = random.Random().randint(2, 8)  # any step is a valid case; the assertions hold for each
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *_args(tiny_data, tmp_path)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / TASK / "checkpoints"
    deadline = time.time() + 120
    names = (f"step_{target_step:08d}", f"{engine._STAGING_PREFIX}step_{target_step:08d}")
    while time.time() < deadline and proc.poll() is None:
        if any((root / name).exists() for name in names):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before step {target_step} could be killed"
    assert all(checkpoint_problem(folder) is None for folder in root.glob("step_*"))
    subprocess.run([sys.executable, str(SCRIPT), *_args(tiny_data, tmp_path, "--resume")], check=True, env=_env(),
                   capture_output=True)
    _assert_same_as_reference(tmp_path, reference)
    _assert_nothing_partial(root)

