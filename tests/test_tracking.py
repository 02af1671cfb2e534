"""Trackers through Accelerate (``--report-to``, ``--logging-dir``, ``--log-every``), the metrics.jsonl log
and the training bar, on the real train/vtab.py with the embedded default backbone on a few images.

TensorBoard's own reader (``EventAccumulator``) reads what a run logged and is compared with ``metrics.json``
and ``metrics.jsonl``; one tracked run (module fixture) serves most assertions.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from train_scripts import load_train_script

import visadapt.engine
from visadapt import tracking
from visadapt.data.procedural import generate_mini_vtab
from visadapt.tracking import METRICS_LOG, MetricsLog

TINY_SIZES = {"train800": 16, "val200": 8, "test": 20}  # 24 training images = 3 batches of 8
TASK = "textures"
EPOCHS = 2
JOBS = ("vtab", "vpr", "rank", "dense", "resadapter", "selma", "ppap")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_mini_vtab(tmp_path_factory.mktemp("minivtab"), seed=0, split_sizes=TINY_SIZES)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(out), "--pretrained", "default", "--task", TASK,
            "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0", "--epochs", str(EPOCHS),
            "--checkpoint-every-steps", "1", "--keep-checkpoints", "100", "--log-every", "1",
            "--eval-every", "1", *extra]  # an evaluation per epoch, whatever mini-VTAB's default schedule is


def _run(args: list[str]) -> tuple[int, str, str]:
    """train/vtab.py's main in this process, stdout and stderr captured in (non-terminal) string buffers."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = load_train_script("vtab").main(args)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def tracked_run(tiny_data, tmp_path_factory):
    """One run with --report-to tensorboard and the progress bar on, stderr not a terminal."""
    out = tmp_path_factory.mktemp("tracked")
    code, stdout, stderr = _run(_args(tiny_data, out, "--report-to", "tensorboard"))
    assert code == 0, stderr
    return out / TASK, stdout, stderr


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_reader_sees_loss_lr_and_accuracy_of_metrics_json(tracked_run):
    run, _, _ = tracked_run
    history = json.loads((run / "metrics.json").read_text())["history"]
    records = MetricsLog(run / METRICS_LOG).read()
    scalars = _scalars(run / "logs" / TASK)  # Accelerate's TensorBoard tracker: <logging dir>/<project name>
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps_per_epoch = 3
    assert [r["step"] for r in train] == list(range(1, EPOCHS * steps_per_epoch + 1))  # --log-every 1
    assert [r["step"] for r in epochs] == [steps_per_epoch * (e + 1) for e in range(EPOCHS)]
    # the epoch records are metrics.json's history, entry for entry
    assert [{"epoch": r["epoch"], **r["values"]} for r in epochs] == history
    # TensorBoard holds the same numbers at the same optimiser steps (stored as float32)
    for tag, kind, name in [(f"{TASK}/train/loss", train, "loss"), (f"{TASK}/train/lr", train, "lr"),
                            (f"{TASK}/eval/accuracy", epochs, "accuracy"),
                            (f"{TASK}/epoch/train_loss", epochs, "train_loss")]:
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in kind], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r["values"][name] for r in kind], rel=1e-6), tag
    assert [s for s, _ in scalars[f"{TASK}/train/images_per_s"]] == [r["step"] for r in train]
    assert all(r["values"]["images_per_s"] > 0 for r in train)
    # the per-step losses are the batch losses: their mean per epoch is the epoch's train loss
    for entry in history:
        losses = [r["values"]["loss"] for r in train if r["epoch"] == entry["epoch"]]
        assert sum(losses) / len(losses) == pytest.approx(entry["train_loss"], rel=1e-5)
    # the lr after an epoch's last step is the epoch's lr (cosine, no warm-up: 0 after the last step)
    epoch_ends = [r["values"]["lr"] for r in train if r["step"] % steps_per_epoch == 0]
    assert epoch_ends == [entry["lr"] for entry in history]
    assert history[-1]["lr"] == 0.0 and train[0]["values"]["lr"] < 1e-2


def test_non_terminal_output_has_no_bar_only_one_line_per_epoch(tracked_run):
    """stderr is not a terminal: tqdm's bar stays off (no carriage-return redraws in a log file) and stdout
    has one summary line per epoch with loss, lr and images/s."""
    _, stdout, stderr = tracked_run
    assert "\r" not in stderr and "it/s" not in stderr and "\r" not in stdout
    lines = [line for line in stdout.splitlines() if f"[{TASK}] epoch " in line]
    assert len(lines) == EPOCHS
    assert all(all(word in line for word in ("train loss", " lr ", "imgs/s", "accuracy")) for line in lines)


def test_report_to_none_writes_the_jsonl_log_and_the_bar_shows_loss_lr_throughput(tiny_data, tmp_path,
                                                                                 monkeypatch):
    """Without any tracker the JSON lines log is written all the same; on a terminal the bar's postfix shows
    the running loss, the learning rate and images/s."""
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    # redraw at every batch, however fast the batches are (tqdm reads its TQDM_MININTERVAL at import, so the
    # environment cannot do it here)
    monkeypatch.setattr(visadapt.engine, "BAR_MININTERVAL_S", 0.0)
    terminal = Terminal()
    with contextlib.redirect_stderr(terminal), contextlib.redirect_stdout(io.StringIO()):
        args = _args(tiny_data, tmp_path, "--report-to", "none", "--epochs", "1", "--log-every", "2")
        assert load_train_script("vtab").main(args) == 0
    run = tmp_path / TASK
    assert not (run / "logs").exists()
    records = MetricsLog(run / METRICS_LOG).read()
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("epoch", 3)]
    assert set(records[0]["values"]) == {"loss", "lr", "images_per_s"}
    drawn = terminal.getvalue()
    assert "loss=" in drawn and "lr=" in drawn and "imgs/s=" in drawn


def test_resume_continues_the_log_without_duplicate_steps(tracked_run, tiny_data, tmp_path):
    """A run killed after its step-4 checkpoint had logged up to step 9 (and a torn line); resumed, its
    metrics.jsonl holds every step once, with the uninterrupted run's numbers."""
    run, _, _ = tracked_run
    full = MetricsLog(run / METRICS_LOG).read()
    resumed = tmp_path / TASK
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    log = resumed / METRICS_LOG
    log.write_text((run / METRICS_LOG).read_text() + '{"step": 10, "epo')  # the killed run wrote past step 4
    code, _, stderr = _run(_args(tiny_data, tmp_path, "--report-to", "none", "--resume", "--no-progress"))
    assert code == 0, stderr
    again = MetricsLog(log).read()
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in full]
    for before, after in zip(full, again):
        timing = {"images_per_s"}
        assert {k: v for k, v in after["values"].items() if k not in timing} == \
            {k: v for k, v in before["values"].items() if k not in timing}
    assert all(line.startswith("{") and line.endswith("}") for line in log.read_text().splitlines())


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_one_error_line_before_any_work(tiny_data, tmp_path, monkeypatch, capsys,
                                                                   tracker):
    monkeypatch.setattr(tracking, "tracker_available", lambda name: False)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        load_train_script("vtab").main(_args(tiny_data, out, "--report-to", tracker))
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    package, install = tracking.TRACKER_INSTALL[tracker]
    assert len(errors) == 1 and package in errors[0] and install in errors[0]
    assert not out.exists()


def test_auto_uses_tensorboard_only_when_installed(tmp_path, monkeypatch):
    from accelerate.tracking import get_available_trackers

    from visadapt.engine import make_accelerator

    assert [str(t) for t in make_accelerator(tmp_path, log_with="auto").log_with] == ["tensorboard"]
    assert make_accelerator(tmp_path, log_with="none").log_with == []
    # "all" is Accelerate's own: every tracker it finds installed
    assert make_accelerator(tmp_path, log_with="all").log_with == get_available_trackers()
    accelerator = make_accelerator(tmp_path, log_with="tensorboard", logging_dir=tmp_path / "elsewhere")
    assert Path(accelerator.logging_dir) == tmp_path / "elsewhere"
    assert Path(make_accelerator(tmp_path).logging_dir) == tmp_path / tracking.LOGS_DIR
    monkeypatch.setattr(tracking, "tracker_available", lambda name: False)
    assert make_accelerator(tmp_path, log_with="auto").log_with == []
    with pytest.raises(tracking.TrackerUnavailableError, match="pip install wandb"):
        make_accelerator(tmp_path, log_with="wandb")


@pytest.mark.parametrize("job", JOBS)
def test_every_train_job_has_the_tracking_flags(job, monkeypatch, capsys):
    """Each job's parser takes --report-to, --logging-dir and --log-every and checks them at parse time."""
    monkeypatch.setattr(tracking, "tracker_available", lambda name: False)
    main = load_train_script(job).main
    # The unknown flag last: were a value not checked while parsing, argparse would stop there (another
    # message) instead of the job starting its default run.
    stop = "--no-such-flag-here"
    with pytest.raises(SystemExit) as exit_:
        main(["--report-to", "wandb", "--logging-dir", "somewhere", "--log-every", "5", stop])
    assert exit_.value.code == 2 and "pip install wandb" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--log-every", "0", stop])
    assert "--log-every: '0' is not a positive whole number" in capsys.readouterr().err


def test_metrics_log_restart_keeps_whole_records_up_to_the_step(tmp_path):
    log = MetricsLog(tmp_path / METRICS_LOG)
    for step in (1, 2, 3):
        log.write("train", step, 1, {"loss": 1.0 / step, "lr": float("nan")})
    assert log.read()[0]["values"] == {"loss": 1.0, "lr": None}  # JSON has no NaN
    with open(log.path, "a") as handle:
        handle.write('{"step": 4, "ki')
    assert log.restart_at(2) == 1 and [r["step"] for r in log.read()] == [1, 2]
    assert log.path.read_text().endswith("}\n")
    assert log.restart_at(0) == 2 and log.read() == []
