"""Resume under a two-process launch (two CPU processes, gloo): what ``tests/test_resume_faults.py`` checks for
one process, with the parts only several ranks can break.

* a refused resume prints its ``error:`` line once (the main process) and every rank exits with 2, none left
  waiting in a collective;
* a run SIGKILLed after its first checkpoint, resumed with two processes, ends with the uninterrupted two-process
  run's adapter file (byte for byte) and metrics;
* a damaged newest checkpoint is skipped with ONE notice for the whole launch;
* a checkpoint lacking only rank 1's ``random_states_1.pkl`` is refused in one line, and ``--allow-rng-reset``
  reseeds every rank (rank 0's surviving file included), so the ranks keep drawing alike.

Two launchers are used. ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true`` is
the user's command (Accelerate 1.x starts ONE process for ``--cpu --num_processes 2``); it stops the other
workers as soon as one exits, so it cannot show each rank's own exit code. :func:`_launch_ranks` starts the two
ranks itself with the environment torchrun gives them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), which shows
each rank's exit code and output and lets a test SIGKILL both ranks at one moment.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume_faults import TASK, _checkpoints, _run_with  # the single-process file's run-folder helpers

from visadapt import engine
from visadapt.data.procedural import generate_mini_vtab
from visadapt.engine import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "vtab.py"
# 24 training images in global batches of 8 (4 per rank): 3 steps per epoch, 2 epochs, a checkpoint every step.
COMMON = ("--task", TASK, "--epochs", "2", "--checkpoint-every-steps", "1", "--keep-checkpoints", "100")
# No test here waits longer than this for a launch; a rank left in a collective fails the test instead of CI.
LAUNCH_TIMEOUT_S = 180
ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", "0")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(SCRIPT), "--data-root", str(data), "--output-dir", str(out), "--no-progress", "--pretrained", "none",
            "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0", *COMMON, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", ACCELERATE_USE_CPU="true")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def _accelerate_launch(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*ACCELERATE_LAUNCH, *args], env=_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ranks(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Both ranks of a two-process launch, started as torchrun starts them (its environment variables), each
    writing ``rank<r>.out`` / ``rank<r>.err`` under ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        with open(log_dir / f"rank{rank}.out", "w") as out, open(log_dir / f"rank{rank}.err", "w") as err:
            ranks.append(subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err))
    return ranks


def _launch_ranks(args: list[str], log_dir: Path) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each rank; a rank still running after ``LAUNCH_TIMEOUT_S`` (waiting
    in a collective for a peer that left) is killed and fails the test."""
    ranks = _start_ranks(args, log_dir)
    deadline = time.time() + LAUNCH_TIMEOUT_S
    try:
        for proc in ranks:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for proc in ranks:
            proc.kill()
            proc.wait()
        pytest.fail(f"a rank was still running {LAUNCH_TIMEOUT_S} s after the launch (exit codes "
                    f"{[proc.returncode for proc in ranks]}): it waits in a collective for a rank that left")
    return [(proc.returncode, (log_dir / f"rank{r}.out").read_text(), (log_dir / f"rank{r}.err").read_text())
            for r, proc in enumerate(ranks)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_mini_vtab(tmp_path_factory.mktemp("minivtab"), seed=0,
                              split_sizes={"train800": 16, "val200": 8, "test": 20})


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted two-process run, started with ``accelerate launch``: its task folder."""
    out = tmp_path_factory.mktemp("reference")
    result = _accelerate_launch(_args(tiny_data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / TASK / "metrics.json").read_text())["num_processes"] == 2
    return out / TASK


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    """The resumed run's adapter file has the reference's bytes (tensors and header) and its metrics agree."""
    resumed = json.loads((out / TASK / "metrics.json").read_text())
    full = json.loads((reference / "metrics.json").read_text())
    assert resumed["num_processes"] == 2 and resumed["resumed_from"] is not None
    for key in ("history", "accuracy_final", "accuracy_best", "best_epoch", "eval_samples"):
        assert resumed[key] == full[key], key
    assert (out / TASK / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()


def _assert_nothing_partial(checkpoint_root: Path) -> None:
    assert not list(checkpoint_root.glob(f"{engine._STAGING_PREFIX}*"))
    for folder in checkpoint_root.glob("step_*"):
        assert checkpoint_problem(folder, 2) is None, folder


def _lines(text: str, marker: str) -> list[str]:
    return [line for line in text.splitlines() if marker in line]


# ------------------------------------------------------------------------------------------- refused resumes


def test_no_complete_checkpoint_is_one_error_line_and_exit_2_on_every_rank(tiny_data, reference, tmp_path):
    """Every checkpoint broken (the newest one's progress.json is not even a file, the other is half-written):
    the main process prints one ``error:`` line naming both, and each rank exits with 2 (none waits in a
    collective for a peer that left with a traceback)."""
    newest, older = _checkpoints(reference)[4], _checkpoints(reference)[3]
    root = _run_with([older, newest], tmp_path)
    (root / older.name / "progress.json").write_text('{"epoch": 1, "bat')
    (root / newest.name / "progress.json").unlink()
    (root / newest.name / "progress.json").mkdir()  # reading it raises IsADirectoryError, not a JSON error
    ranks = _launch_ranks(_args(tiny_data, tmp_path, "--resume"), tmp_path / "logs")
    assert [code for code, _, _ in ranks] == [2, 2], [err[-2000:] for _, _, err in ranks]
    stderr = "".join(err for _, _, err in ranks)
    errors = _lines(stderr, "error:")
    assert len(errors) == 1 and errors[0] in ranks[0][2], stderr[-3000:]  # printed by the main process
    assert f"no complete checkpoint to resume in {root}" in errors[0]
    assert f"{newest.name}: progress.json is unreadable" in errors[0] and "not valid JSON" in errors[0]
    assert "Traceback" not in stderr and not (tmp_path / TASK / "metrics.json").exists()


def test_a_missing_rank_1_rng_state_is_refused_in_one_line_by_accelerate_launch(tiny_data, reference, tmp_path):
    """``random_states_1.pkl`` missing, ``random_states_0.pkl`` present: the launch is refused with one
    ``error:`` line naming rank 1's file and the flag; the failed rank exits with 2 (not an abort at exit)."""
    root = _run_with([_checkpoints(reference)[3]], tmp_path)
    (root / _checkpoints(reference)[3].name / "random_states_1.pkl").unlink()
    result = _accelerate_launch(_args(tiny_data, tmp_path, "--resume"))
    assert result.returncode != 0
    errors = _lines(result.stderr, "error:")
    assert len(errors) == 1, result.stderr[-3000:]
    assert "random_states_1.pkl" in errors[0] and "random_states_0.pkl" not in errors[0]
    assert "--allow-rng-reset" in errors[0]
    # torchrun's summary: the first rank to leave did so with 2; a rank that aborted would show SIGABRT (-6)
    assert "exitcode: 2)" in result.stderr and "SIGABRT" not in result.stderr and "terminate called" not in \
        result.stderr, result.stderr[-3000:]
    assert not (tmp_path / TASK / "metrics.json").exists()


def test_allow_rng_reset_reseeds_every_rank_alike(tiny_data, reference, tmp_path):
    """With ``--allow-rng-reset`` a checkpoint lacking only rank 1's RNG state resumes with one warning naming
    that file, and ends exactly as one lacking both files: every rank is reseeded from (seed, step), rank 0's
    surviving state included, so the ranks keep identical random streams as ``seed_everything`` gave them. The
    adapter then differs from the uninterrupted run's (dropout 0.1 draws other masks), as the warning says."""
    checkpoint = _checkpoints(reference)[3]
    results = {}
    for missing in (("random_states_1.pkl",), ("random_states_0.pkl", "random_states_1.pkl")):
        out = tmp_path / str(len(missing))
        root = _run_with([checkpoint], out)
        for name in missing:
            (root / checkpoint.name / name).unlink()
        ranks = _launch_ranks(_args(tiny_data, out, "--resume", "--allow-rng-reset"), out / "logs")
        assert [code for code, _, _ in ranks] == [0, 0], [err[-2000:] for _, _, err in ranks]
        warnings = _lines("".join(stdout for _, stdout, _ in ranks), "warning:")
        assert len(warnings) == 1 and all(name in warnings[0] for name in missing)
        assert f"step {checkpoint.name.split('_')[1].lstrip('0')}" in warnings[0]
        results[missing] = (out / TASK / "adapter.safetensors").read_bytes()
        _assert_nothing_partial(root)
    only_rank_1, both = results.values()
    assert only_rank_1 == both
    assert only_rank_1 != (reference / "adapter.safetensors").read_bytes()


# ------------------------------------------------------------------------------------- resumes that continue


def test_a_damaged_newest_checkpoint_is_skipped_with_one_notice_for_the_launch(tiny_data, reference, tmp_path):
    """The newest checkpoint's trainable.safetensors cut in half: both ranks resume from the one before, the
    launch prints one notice (not one per rank), and the run ends with the uninterrupted run's bytes (each rank
    gets its own running loss of the epoch back from the checkpoint it falls back to)."""
    previous, newest = _checkpoints(reference)[3], _checkpoints(reference)[4]  # mid-epoch 2: batch 1, batch 2
    root = _run_with([previous, newest], tmp_path)
    damaged = root / newest.name / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    ranks = _launch_ranks(_args(tiny_data, tmp_path, "--resume"), tmp_path / "logs")
    assert [code for code, _, _ in ranks] == [0, 0], [err[-2000:] for _, _, err in ranks]
    notices = _lines("".join(stdout + err for _, stdout, err in ranks), "skipping broken checkpoint")
    assert len(notices) == 1 and newest.name in notices[0] and "trainable.safetensors" in notices[0]
    assert json.loads((tmp_path / TASK / "metrics.json").read_text())["resumed_from"].endswith(previous.name)
    _assert_same_as_reference(tmp_path, reference)
    _assert_nothing_partial(root)


def test_sigkill_after_the_first_checkpoint_then_a_two_process_resume_ends_as_the_uninterrupted_run(
        tiny_data, reference, tmp_path):
    """Both ranks SIGKILLed as soon as the first checkpoint is complete (``step_00000001`` appears only by the
    rename that publishes a whole checkpoint), then ``accelerate launch ... --resume``: the adapter file has the
    uninterrupted run's bytes and the metrics agree (mid-epoch resume: each rank skips its shard of the batches
    already seen and restores its own RNG state)."""
    ranks = _start_ranks(_args(tiny_data, tmp_path), tmp_path / "logs")
    first = tmp_path / TASK / "checkpoints" / "step_00000001"
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while time.time() < deadline and all(proc.poll() is None for proc in ranks) and not first.is_dir():
        time.sleep(0.001)
    for proc in ranks:
        proc.send_signal(signal.SIGKILL)
    assert [proc.wait() for proc in ranks] == [-signal.SIGKILL] * 2, "a rank ended before it could be killed"
    assert first.is_dir() and not (tmp_path / TASK / "metrics.json").exists()
    root = tmp_path / TASK / "checkpoints"
    assert all(checkpoint_problem(folder, 2) is None for folder in root.glob("step_*"))
    result = _accelerate_launch(_args(tiny_data, tmp_path, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_lines(result.stdout, "resuming from")) == 1
    _assert_same_as_reference(tmp_path, reference)
    _assert_nothing_partial(root)
