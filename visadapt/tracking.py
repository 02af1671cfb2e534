"""Experiment tracking for every ``train/`` job: ``--report-to``, ``--logging-dir``, ``--log-every`` and the
local JSON lines metrics log.

Trackers are Accelerate's own (``Accelerator(log_with=..., project_config=...)``, ``init_trackers``, ``log``,
``end_training``): :func:`visadapt.engine.make_accelerator` takes :func:`tracking_options` and
:func:`visadapt.engine.fit` logs through them. What is logged, with ``<prefix>`` the name of the training run
(the task, the expert, the skill: :func:`tag_prefix` of ``fit``'s ``log_prefix``), which keeps apart the
runs of a job that trains several models on one accelerator:

* every ``--log-every`` optimiser steps (kind ``train``): ``loss`` (the mean batch loss since the last record,
  averaged over processes), ``lr`` (``lr/group_<i>`` per optimiser parameter group when there are several) and
  ``images_per_s`` (training samples per second over all processes since the last record). TensorBoard tags:
  ``<prefix>/train/loss``, ``<prefix>/train/lr``, ``<prefix>/train/images_per_s``.
* at every epoch end (kind ``epoch``): the epoch's entry of the history that ``metrics.json`` keeps:
  ``train_loss`` and ``lr`` (tags ``<prefix>/epoch/...``) and each evaluated metric (``accuracy``,
  ``test_accuracy``, ``R@5``, ``srcc``, ...; tags ``<prefix>/eval/...``).

The step of every record is the optimiser step (the x axis in TensorBoard), so training and evaluation curves
share one axis. Whatever trackers are chosen, :class:`MetricsLog` writes the same records, one JSON object
a line (``{"step", "epoch", "kind", "values", "time"}``), to ``metrics.jsonl`` in the folder of each training
run, on the main process only: a run without any tracker loses nothing. The default ``--report-to`` is
TensorBoard when it is installed (the ``tensorboard`` extra, part of ``[dev]``), else no tracker; the JSON
lines log either way.

A resumed run rewrites ``metrics.jsonl`` up to its checkpoint's step (:meth:`MetricsLog.restart_at`), so each
step is there once. TensorBoard's own remedy (a ``SessionLog.START`` purge, ``SummaryWriter(purge_step=...)``)
drops every tag's events past a step, which would also hide the curves of the other runs that share a
tracker in SELMA and PPAP; it is not used, and a resumed run's TensorBoard shows the steps between the
checkpoint and the kill twice.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: ``--report-to`` choices; ``all`` is Accelerate's: every tracker it finds installed
REPORT_TO = ("tensorboard", "wandb", "all", "none")
#: per tracker Accelerate can be asked for by name: the package it imports and the command that installs it
TRACKER_INSTALL = {"tensorboard": ("tensorboard", "pip install 'visadapt[tensorboard]'"),
                   "wandb": ("wandb", "pip install wandb")}
#: the JSON lines metrics log each training run writes into its folder
METRICS_LOG = "metrics.jsonl"
#: default folder for tracker files, inside a run's output folder (``--logging-dir`` replaces it)
LOGS_DIR = "logs"
#: default of ``--log-every`` (optimiser steps between ``train`` records)
DEFAULT_LOG_EVERY = 10


class TrackerUnavailableError(ValueError):
    """A tracker was asked for by name (``--report-to tensorboard`` / ``wandb``); its package is missing."""


def tracker_available(name: str) -> bool:
    """Whether Accelerate can start the tracker ``name`` here (its own availability check, which its
    ``filter_trackers`` applies: a tracker it cannot import is otherwise dropped without a word)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def missing_tracker_message(name: str) -> str:
    """Why ``--report-to name`` cannot run here, and the command that fixes it."""
    package, install = TRACKER_INSTALL[name]
    return (f"--report-to {name} needs the {package!r} package, which is not installed; install it with "
            f"`{install}`, or pass --report-to none (metrics.jsonl is written either way)")


def resolve_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """The ``log_with`` list for :class:`accelerate.Accelerator` that ``report_to`` asks for.

    ``"auto"``: ``["tensorboard"]`` when TensorBoard is installed, else ``[]``; ``None`` or ``"none"``:
    ``[]``; ``"all"``: Accelerate's ``"all"`` (every tracker it finds installed); ``"tensorboard"`` /
    ``"wandb"`` (or a list of them): as given, after checking each is installed
    (:class:`TrackerUnavailableError` otherwise).
    """
    if report_to is None or report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if tracker_available("tensorboard") else []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        return ["all"]
    for name in names:
        if name not in TRACKER_INSTALL:
            raise ValueError(f"report_to {name!r} must be one of {', '.join(REPORT_TO)}")
        if not tracker_available(name):
            raise TrackerUnavailableError(missing_tracker_message(name))
    return list(dict.fromkeys(names))


def _report_to_choice(value: str) -> str:
    """``--report-to`` as argparse reads it: a known choice whose package is installed. Checked while parsing,
    so a missing package ends the run with one ``error:`` line before any model or output folder exists."""
    if value not in REPORT_TO:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(REPORT_TO)})")
    try:
        resolve_report_to(value)
    except TrackerUnavailableError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number of optimiser steps")
    return number


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    """``--report-to``, ``--logging-dir`` and ``--log-every``: the first two go to
    :func:`visadapt.engine.make_accelerator` through :func:`tracking_options`, ``--log-every`` to
    ``TrainConfig.log_every`` through :func:`visadapt.engine.run_options`."""
    group = parser.add_argument_group("tracking")
    group.add_argument("--report-to", type=_report_to_choice, default=None,
                       metavar="{" + ",".join(REPORT_TO) + "}",
                       help="experiment tracker (Accelerate's): tensorboard, wandb, all (every tracker "
                            "installed) or none. Default: tensorboard when it is installed (pip install "
                            "'visadapt[tensorboard]'), else none. Every run also writes metrics.jsonl (one "
                            "JSON record per line) into its output folder, whatever is chosen")
    group.add_argument("--logging-dir", default=None, metavar="DIR",
                       help=f"where trackers write (TensorBoard: DIR/<run name>/). Default: {LOGS_DIR}/ "
                            "inside the run's output folder (per task where a job writes per-task folders)")
    group.add_argument("--log-every", type=_positive_int, default=DEFAULT_LOG_EVERY, metavar="N",
                       help="log training loss, learning rate and images/s every N optimiser steps; "
                            "evaluations are logged at every epoch end")


def tracking_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`visadapt.engine.make_accelerator` arguments that :func:`add_tracking_flags` set:
    ``make_accelerator(out, ..., **tracking_options(args))``."""
    return {"log_with": args.report_to or "auto", "logging_dir": args.logging_dir}


def tracker_config(values: Mapping[str, Any]) -> dict[str, bool | int | float | str | None]:
    """``values`` as hyperparameters every tracker accepts (TensorBoard's ``add_hparams`` takes bool, int,
    float, str and None only): other values (lists, dicts, paths, callables) become their JSON text or
    ``str``."""
    def scalar(value: Any) -> bool | int | float | str | None:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        try:
            return json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            return str(value)
    return {str(key): scalar(value) for key, value in values.items()}


def tag_prefix(log_prefix: str) -> str:
    """A tracker tag prefix from :func:`~visadapt.engine.fit`'s ``log_prefix``: ``"[textures] "`` ->
    ``"textures"``, ``"[expert 0 t in [0, 500)] "`` -> ``"expert_0_t_in_0_500"``, ``""`` -> ``""``."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", log_prefix.strip()).strip("_")


def tracker_values(prefix: str, kind: str, values: Mapping[str, float]) -> dict[str, float]:
    """The tags a record goes to the trackers under (see the module docstring): ``train`` records as
    ``<prefix>/train/<name>``; ``epoch`` records as ``<prefix>/epoch/<name>`` for ``train_loss`` and ``lr``
    (``lr/group_<i>``), ``<prefix>/eval/<name>`` for every evaluated metric."""
    head = f"{prefix}/" if prefix else ""
    tagged = {}
    for name, value in values.items():
        section = kind if kind == "train" or name == "train_loss" or name.startswith("lr") else "eval"
        tagged[f"{head}{section}/{name}"] = value
    return tagged


def learning_rates(optimizer) -> dict[str, float]:
    """``{"lr": x}`` for one parameter group, ``{"lr/group_0": x0, "lr/group_1": x1, ...}`` for several: the
    rate each group's next step uses (read from the optimiser, so any scheduler is seen the same way)."""
    rates = [float(group["lr"]) for group in optimizer.param_groups]
    if len(rates) == 1:
        return {"lr": rates[0]}
    return {f"lr/group_{index}": rate for index, rate in enumerate(rates)}


class MetricsLog:
    """The JSON lines metrics log of one training run (``<run folder>/metrics.jsonl``): one record a line,
    ``{"step": int, "epoch": int, "kind": "train" | "epoch", "values": {name: number}, "time": unix s}``.

    Written here, not as an Accelerate tracker: Accelerate's trackers each need a package of their own, and
    this log is per training run (SELMA's skills, PPAP's experts share one accelerator) and cut back on
    resume, which no tracker interface offers.

    Written by the main process only, one ``open``/``write``/``close`` per record so that a killed run leaves
    every record before its last line whole. :meth:`restart_at` is called when a run (re)starts: a resumed run
    continues from its checkpoint's step, so records a killed run wrote after that checkpoint (and a torn last
    line) are dropped and the steps that run again are written once, not twice.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every whole record, in file order (a torn or unreadable line is skipped)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
        return records

    def restart_at(self, step: int) -> int:
        """Keep the records up to optimiser step ``step`` (0: a fresh run keeps none); returns how many were
        dropped. The kept ones are written to a temporary file that replaces the log in one rename."""
        if not self.path.exists():
            return 0
        records = self.read()
        kept = [record for record in records if record["step"] <= step]
        staging = self.path.with_name(f".tmp-{self.path.name}")
        staging.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        os.replace(staging, self.path)
        return len(records) - len(kept)

    def write(self, kind: str, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Append one record (non-finite numbers as ``null``: JSON has no NaN)."""
        clean = {name: float(value) if math.isfinite(float(value)) else None
                 for name, value in values.items()}
        line = json.dumps({"step": step, "epoch": epoch, "kind": kind, "values": clean,
                           "time": round(time.time(), 3)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


class TrainingLog:
    """What :func:`visadapt.engine.fit` logs while it trains, on one accelerator: ``train`` records every
    ``log_every`` optimiser steps, ``epoch`` records at each epoch end, each to the trackers
    (``accelerator.log``) and to the :class:`MetricsLog` (main process only), and the training bar's postfix.

    Batch losses are summed on the device and read (``.item()``) only when a record is due or the bar redraws,
    so the loop does not wait for the device at every step.
    """

    def __init__(self, accelerator, metrics_log: MetricsLog | None, *, log_every: int, prefix: str = ""):
        import torch

        self.accelerator = accelerator
        self.metrics_log = metrics_log if accelerator.is_main_process else None
        self.log_every = log_every
        self.prefix = prefix
        self._window_loss = torch.zeros((), device=accelerator.device)
        self._window_batches = 0
        self._window_images = 0
        self._window_start = time.perf_counter()
        self._epoch_images = 0
        self._epoch_start = self._window_start
        self._postfix_at = 0.0

    def start_epoch(self) -> None:
        """Restart the throughput clocks (time spent evaluating or checkpointing is not training time)."""
        self._window_start = self._epoch_start = time.perf_counter()
        self._window_loss.zero_()
        self._window_batches = self._window_images = self._epoch_images = 0

    def add_batch(self, loss, batch) -> None:
        """Count one training batch: its loss (a 0-dim tensor) and its samples (``batch``: this process's
        images, a tensor or a nested list/dict of them; every process takes an equal share of the global
        batch)."""
        from accelerate.utils import ignorant_find_batch_size

        self._window_loss += loss.detach()
        self._window_batches += 1
        images = (ignorant_find_batch_size(batch) or 0) * self.accelerator.num_processes
        self._window_images += images
        self._epoch_images += images

    def epoch_images_per_s(self) -> float:
        """Training samples per second of the current epoch so far, over all processes."""
        return self._epoch_images / max(time.perf_counter() - self._epoch_start, 1e-9)

    def after_step(self, step: int, epoch: int, optimizer) -> None:
        """Called on every process after optimiser step ``step`` (1-based) of epoch ``epoch`` (1-based):
        writes a ``train`` record when ``step`` is a multiple of ``log_every``. The loss is averaged over
        processes (a collective: every process reaches the same steps)."""
        if step % self.log_every or not self._window_batches:
            return
        loss = self.accelerator.reduce(self._window_loss, reduction="mean").item() / self._window_batches
        now = time.perf_counter()
        values = {"loss": loss, **learning_rates(optimizer),
                  "images_per_s": self._window_images / max(now - self._window_start, 1e-9)}
        self._record("train", step, epoch, values)
        self._window_loss.zero_()
        self._window_batches = self._window_images = 0
        self._window_start = now

    def end_epoch(self, step: int, entry: Mapping[str, float]) -> None:
        """Write the ``epoch`` record: the history entry ``entry`` (``epoch``, ``train_loss``, ``lr``,
        metrics)."""
        self._record("epoch", step, int(entry["epoch"]), {k: v for k, v in entry.items() if k != "epoch"})

    def _record(self, kind: str, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.accelerator.log(tracker_values(self.prefix, kind, values), step=step)
        if self.metrics_log is not None:
            self.metrics_log.write(kind, step, epoch, values)

    def update_bar(self, bar, loss_sum, loss_count: int, optimizer) -> None:
        """Show the epoch's running mean loss, the learning rate and images/s in ``bar``'s postfix, at most as
        often as the bar redraws (``mininterval``), and never on a disabled bar (no device read then)."""
        if bar is None or bar.disable or not loss_count:
            return
        now = time.perf_counter()
        if now - self._postfix_at < bar.mininterval:
            return
        self._postfix_at = now
        lr = float(optimizer.param_groups[0]["lr"])
        bar.set_postfix({"loss": f"{loss_sum.item() / loss_count:.4f}", "lr": f"{lr:.3g}",
                         "imgs/s": f"{self.epoch_images_per_s():.1f}"}, refresh=False)
