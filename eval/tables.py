"""Paper-style VTAB-1k / FGVC tables from training outputs: per-task accuracy, group means, both averages.

Two different "averages" circulate in the PETL literature (specs/vtab_fgvc.md 3.5), and they differ by more
than the gaps between methods: Full fine-tuning scores 68.97 as the mean of the Natural / Specialized /
Structured means (VPT, NOAH, FacT, binary adapter) and 65.57 as the plain mean over the 19 tasks (V-PETL
Bench). A table here therefore prints both, each labelled, and FGVC, which has no groups, the plain mean of its
five datasets.

A training run is a directory ``<run_dir>/<task>/metrics.json`` (+ ``adapter.safetensors``), written by
``train/vtab.py``; a run with several seeds (``--seeds 0,1,2``) holds one such directory per seed,
``<run_dir>/seed_<n>/<task>/``. Nothing here evaluates a model: :func:`collect_run` reads metrics files, and
:func:`result_from_evaluation` turns what ``visadapt.engine.evaluate_adapter_file`` returned into the same
record, so a re-evaluated table and a table read from disk are built by the same arithmetic.

Seeds: each task shows the mean ± the sample standard deviation (n - 1) of its per-seed accuracies, and every
average (group means, both overall means) is computed per seed first, then reported as mean ± std over the
seeds, so its spread is that of the average itself. With one seed no ± is shown.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from visadapt.data.tasks import GROUPS, benchmark_tasks, resolve_task

METRICS_FILE = "metrics.json"
ADAPTER_FILE = "adapter.safetensors"

# Where the accuracy of a table comes from. "final" (protocol final) and "val-selected" (protocol tune) are the
# honest ones; "best" was picked on the test set itself and is shown only when asked for.
METRIC_DESCRIPTIONS = {
    "final": "final-epoch accuracy",
    "val-selected": "validation-selected accuracy (test accuracy of the evaluation with the best validation "
                    "accuracy)",
    "best": "best-on-test (optimistic): the best test accuracy of any evaluation during training, as most PETL "
            "papers report",
    "reevaluated": "re-evaluated from adapter files",
}
# The metrics.json key behind each metric.
METRIC_KEYS = {"final": "accuracy_final", "val-selected": "accuracy_val_selected", "best": "accuracy_best"}
# Which metrics each training protocol (train/vtab.py --split) records, its default first.
PROTOCOL_METRICS = {"final": ("final", "best"), "tune": ("val-selected", "final", "best")}

# A seed's directory in a run trained with --seeds.
SEED_DIR = re.compile(r"seed_(\d+)")
STD_DESCRIPTION = ("sample standard deviation (n - 1 denominator) over seeds; every average is computed per seed, "
                   "then mean and std over the seeds; null with one seed")

BENCHMARK_TITLES = {"vtab": "VTAB-1k", "fgvc": "FGVC", "mini-vtab": "mini-VTAB (procedural)"}

MISSING = "—"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One task of one run: its accuracy in percent, parameter counts and adapter size on disk.

    ``adapter_params`` excludes the classifier head (the PETL papers' "Params" column); ``trainable_params``
    includes it. Counts and bytes are ``None`` when the source did not record them.
    """

    task: str
    accuracy: float
    adapter_params: int | None = None
    trainable_params: int | None = None
    head_params: int | None = None
    adapter_bytes: int | None = None
    eval_samples: int | None = None
    protocol: str | None = None
    source: str | None = None
    seed: int | None = None
    accuracy_std: float | None = None
    seeds: tuple[int, ...] = ()
    per_seed: tuple[float, ...] = ()


@dataclasses.dataclass
class RunResult:
    """Every task found for one run (a training output directory or one adapter file), keyed by canonical name.

    ``metric`` says where the accuracies come from: ``final``, ``val-selected``, ``best`` (from metrics.json) or
    ``reevaluated`` (from the adapter files). ``warnings`` holds what was found but not used, so a table can
    print it instead of dropping it. ``seeds`` are the seeds of a ``--seeds`` run (empty for a single run); each
    result's ``accuracy`` is then the mean over them and its ``per_seed`` the values in ``seeds`` order.
    """

    label: str
    benchmark: str
    metric: str
    results: dict[str, TaskResult]
    path: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    seeds: tuple[int, ...] = ()

    @property
    def n_seeds(self) -> int:
        """How many seeds each number is over (1 for a single run)."""
        return max(1, len(self.seeds))

    @property
    def missing(self) -> list[str]:
        """Canonical names of the benchmark's tasks this run has no number for, in column order."""
        return [name for name in benchmark_tasks(self.benchmark) if name not in self.results]


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The numbers of one table row. Means over incomplete sets are over the tasks present.

    ``group_means`` is empty for FGVC (no groups), and ``mean_groups`` is then ``None``. ``adapter_params``,
    ``trainable_params`` and ``adapter_bytes`` are means over the tasks that recorded them. The ``*_std``
    entries are sample standard deviations over seeds (``None`` with one seed); every mean over tasks is
    computed per seed first, then averaged over the seeds.
    """

    label: str
    accuracy: dict[str, float | None]
    group_means: dict[str, float | None]
    incomplete_groups: tuple[str, ...]
    mean_groups: float | None
    mean_tasks: float | None
    missing: tuple[str, ...]
    adapter_params: float | None
    trainable_params: float | None
    adapter_bytes: float | None
    n_seeds: int = 1
    accuracy_std: dict[str, float | None] = dataclasses.field(default_factory=dict)
    group_means_std: dict[str, float | None] = dataclasses.field(default_factory=dict)
    mean_groups_std: float | None = None
    mean_tasks_std: float | None = None


def describe_metric(metric: str) -> str:
    """The words a table uses for ``metric`` (``final``, ``best`` or ``reevaluated``)."""
    if metric not in METRIC_DESCRIPTIONS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_DESCRIPTIONS)}")
    return METRIC_DESCRIPTIONS[metric]


def read_task_files(dirs: dict[str, Path], filename: str, read: Callable[[Path, str], TaskResult],
                    warnings: list[str]) -> dict[str, TaskResult]:
    """``read(<task dir>/filename, task)`` for each task directory; a task whose file is absent (an
    unfinished run) is left out with a warning appended to ``warnings``."""
    results: dict[str, TaskResult] = {}
    for name, task_dir in dirs.items():
        path = task_dir / filename
        if not path.is_file():
            warnings.append(f"{task_dir} has no {filename} (unfinished or failed training?); shown as missing")
            continue
        results[name] = read(path, name)
    return results


def find_task_dirs(
    run_dir: str | Path, benchmark: str, tasks: Iterable[str] | None = None
) -> tuple[dict[str, Path], list[str]]:
    """The task directories of a run, keyed by canonical task name in column order, and warnings.

    A directory may be named by the task's canonical name or any alias (``cifar`` for ``cifar100``). A directory
    that is not a task of ``benchmark`` becomes a warning; hidden directories (``.ipynb_checkpoints``) and plain
    files (logs, configs) are not tasks and are passed over. ``tasks`` (canonical names) keeps only those.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ValueError(f"{run_dir} does not exist; pass a training output directory (one subdirectory per task)")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory; pass a training output directory (one subdirectory per task)")
    if (run_dir / METRICS_FILE).is_file():
        raise ValueError(
            f"{run_dir} is the directory of a single task (it holds {METRICS_FILE}); pass its parent, the run "
            "directory that holds one subdirectory per task"
        )
    wanted = None if tasks is None else set(tasks)
    found: dict[str, Path] = {}
    warnings: list[str] = []
    for entry in sorted(run_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            info = resolve_task(benchmark, entry.name)
        except ValueError:
            warnings.append(f"{entry} is not a task of {benchmark}; left out of the table (wrong --benchmark?)")
            continue
        if wanted is not None and info.name not in wanted:
            continue
        if info.name in found:
            raise ValueError(
                f"{found[info.name]} and {entry} both hold task {info.name!r} of {benchmark}; keep one of them"
            )
        found[info.name] = entry
    if not found:
        names = [info.name for info in benchmark_tasks(benchmark).values()]
        if wanted is not None:
            what = f"the selected tasks ({', '.join(sorted(wanted))})"
        else:
            what = f"any task of {benchmark} (expected subdirectories such as {', '.join(names[:3])})"
        others = [p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        seen = f"; it holds {', '.join(sorted(others))}" if others else "; it is empty"
        raise ValueError(f"{run_dir} has no directory for {what}{seen}; check --benchmark and the path")
    order = list(benchmark_tasks(benchmark))
    return {name: found[name] for name in order if name in found}, warnings


def find_seed_dirs(run_dir: str | Path) -> dict[int, Path]:
    """``{seed: <run_dir>/seed_<seed>}`` for a run trained with ``--seeds``, in seed order; empty for a single run.

    A directory holding both seed directories and task directories is an error: which of them the table should
    show is not knowable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    seeds, others = {}, []
    for entry in run_dir.iterdir():
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        match = SEED_DIR.fullmatch(entry.name)
        if match:
            seeds[int(match.group(1))] = entry
        else:
            others.append(entry.name)
    if seeds and others:
        raise ValueError(f"{run_dir} holds both seed directories ({', '.join(sorted(p.name for p in seeds.values()))}) "
                         f"and other directories ({', '.join(sorted(others))}); a run is either one directory per "
                         "task or one seed_<n> directory per seed; move the extra ones away")
    return dict(sorted(seeds.items()))


def _is_task_dir(path: Path, benchmark: str, wanted: set[str] | None) -> bool:
    """Whether ``path`` is the directory of a task of ``benchmark`` (one of ``wanted``, when given)."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    try:
        name = resolve_task(benchmark, path.name).name
    except ValueError:
        return False
    return wanted is None or name in wanted


def collect_seeds(
    run_dir: str | Path,
    benchmark: str,
    tasks: Iterable[str] | None,
    filename: str,
    read: Callable[[Path, str], TaskResult],
) -> tuple[tuple[int, ...], dict[str, TaskResult], list[str]]:
    """Every task result of a run directory, single (``<task>/``) or with seeds (``seed_<n>/<task>/``).

    Returns ``(seeds, results, warnings)``: ``seeds`` is empty for a single run; with seeds, each task's
    result holds the mean accuracy over the seeds, its sample standard deviation (``None`` for one seed) and
    the per-seed values. A task finished for only some seeds is left out (a warning says which seeds it
    lacks): means over different seed sets are not comparable. A seed directory with no finished task yet is
    not counted as a seed (a warning says so). A record whose own ``seed`` contradicts its directory is an
    error.
    """
    seed_dirs = find_seed_dirs(run_dir)
    if not seed_dirs:
        dirs, warnings = find_task_dirs(run_dir, benchmark, tasks)
        return (), read_task_files(dirs, filename, read, warnings), warnings
    warnings: list[str] = []
    per_seed: dict[int, dict[str, TaskResult]] = {}
    wanted = None if tasks is None else set(tasks)
    for seed, seed_dir in seed_dirs.items():
        if not any(_is_task_dir(p, benchmark, wanted) for p in seed_dir.iterdir()):
            warnings.append(f"{seed_dir} holds no task yet; seed {seed} is not counted")
            continue
        dirs, seed_warnings = find_task_dirs(seed_dir, benchmark, tasks)
        results = read_task_files(dirs, filename, read, seed_warnings)
        warnings += seed_warnings
        for result in results.values():
            if result.seed is not None and result.seed != seed:
                raise ValueError(f"{result.source} records seed {result.seed} but lies in {seed_dir.name}; move it "
                                 f"to seed_{result.seed}")
        if results:
            per_seed[seed] = results
        else:
            warnings.append(f"{seed_dir} holds no finished task yet; seed {seed} is not counted")
    seeds = tuple(per_seed)
    combined: dict[str, TaskResult] = {}
    for name in benchmark_tasks(benchmark):
        have = [seed for seed in seeds if name in per_seed[seed]]
        if not have:
            continue
        if len(have) < len(seeds):
            lacking = [seed for seed in seeds if seed not in have]
            warnings.append(f"task {name} is finished for seed(s) {', '.join(map(str, have))} but not "
                            f"{', '.join(map(str, lacking))}; left out until every seed has it")
            continue
        values = tuple(per_seed[seed][name].accuracy for seed in seeds)
        first = per_seed[seeds[0]][name]
        combined[name] = dataclasses.replace(
            first, accuracy=math.fsum(values) / len(values), seed=None, seeds=seeds, per_seed=values,
            accuracy_std=statistics.stdev(values) if len(values) > 1 else None,
            source="; ".join(str(per_seed[seed][name].source) for seed in seeds))
    return seeds, combined, warnings


def _count(record: Mapping, key: str, where: str) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: {key!r} is {value!r}, expected a non-negative number")
    return int(value)


def _accuracy(record: Mapping, key: str, where: str, fix: str) -> float:
    if key not in record:
        raise ValueError(f"{where} has no {key!r}; {fix}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"{where}: {key!r} is {value!r}, expected an accuracy in percent (0 to 100)")
    return float(value)


def _task_result(
    record: Mapping, benchmark: str, accuracy: float, where: str, task: str | None, protocol: str | None
) -> TaskResult:
    """Checks the record's benchmark and task against what the caller expects; fills the counts."""
    recorded = record.get("benchmark")
    if recorded is not None and recorded != benchmark:
        raise ValueError(
            f"{where} is for benchmark {recorded!r}, not {benchmark!r}; pass --benchmark {recorded}, or leave that "
            "run out"
        )
    name = record.get("task")
    if name is None and task is None:
        raise ValueError(f"{where} does not say which task it is for; it needs a 'task' entry")
    if name is not None:
        try:
            info = resolve_task(benchmark, str(name))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if task is not None and info.name != task:
            raise ValueError(
                f"{where} is for task {name!r} but lies in the directory of task {task!r}; move it to the "
                "directory of its task"
            )
        task = info.name
    adapter = _count(record, "adapter_params", where)
    trainable = _count(record, "trainable_params", where)
    head = _count(record, "head_params", where)
    if adapter is None and trainable is not None and head is not None:
        adapter = trainable - head
    seed = record.get("seed")
    return TaskResult(
        task=task,
        accuracy=accuracy,
        adapter_params=adapter,
        trainable_params=trainable,
        head_params=head,
        adapter_bytes=_count(record, "adapter_bytes", where),
        eval_samples=_count(record, "eval_samples", where),
        protocol=record.get("protocol", protocol),
        source=where,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
    )


def read_run_record(path: str | Path, benchmark: str, script: str) -> dict:
    """The ``metrics.json`` of a ``script`` output directory (or the file itself), checked to hold the ``test``
    figures of ``benchmark`` (the one-table benchmarks: ``vpr``, ``rank``)."""
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} holds no {METRICS_FILE}; pass a {script} output directory (training may still "
                         f"be running)")
    record = json.loads(file.read_text())
    if record.get("benchmark") != benchmark or "test" not in record:
        raise ValueError(f"{file} is not a {script} result (it has no {benchmark} 'test' figures); pass --benchmark "
                         f"{record.get('benchmark', '?')} for it")
    return record


def read_metrics(path: str | Path, benchmark: str, metric: str = "final", task: str | None = None, *,
                 protocol: str | None = None, mixed_protocols: bool = False) -> TaskResult:
    """One task's result from a ``metrics.json``; ``metric`` picks ``accuracy_final``, ``accuracy_val_selected``
    (``val-selected``) or ``accuracy_best``.

    ``task`` (canonical name) is the task its directory stands for; a file recording another task, or another
    benchmark, is an error naming the file. So is a ``--split tune`` record of an older ``train/vtab.py`` whose
    accuracies are on val200, not on test, and, when ``protocol`` is given, a record trained with another
    protocol (unless ``mixed_protocols``).
    """
    if metric not in METRIC_KEYS:
        raise ValueError(f"metric {metric!r} is not in metrics.json; choose one of {', '.join(METRIC_KEYS)}")
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run that task or move its directory away") from None
    if not isinstance(record, dict):
        raise TypeError(f"{path} holds {type(record).__name__}, expected a JSON object written by train/vtab.py")
    recorded = record.get("protocol")
    if protocol is not None and not mixed_protocols and recorded not in (None, protocol):
        raise ValueError(f"{path} was trained with --split {recorded}, not {protocol}; pass --split {recorded} for "
                         f"it, or --mixed-protocols to put both in one table (labelled)")
    if recorded == "tune" and record.get("eval_split", "val200") != "test":
        raise ValueError(f"{path} holds val200 accuracies of an older train/vtab.py --split tune (which never "
                         "measured test); re-run that task to get its validation-selected test accuracy")
    if metric == "val-selected" and recorded == "final":
        fix = ("it was trained with --split final, which has no validation set to select by; show it with --split "
               "final, or train it again with --split tune")
    else:
        fix = "it was written by an older or unfinished training run"
    accuracy = _accuracy(record, METRIC_KEYS[metric], str(path), fix)
    return _task_result(record, benchmark, accuracy, str(path), task, None)


def collect_run(
    run_dir: str | Path,
    benchmark: str,
    metric: str = "final",
    *,
    label: str | None = None,
    tasks: Iterable[str] | None = None,
    protocol: str | None = None,
    mixed_protocols: bool = False,
) -> RunResult:
    """Every ``<run_dir>/<task>/metrics.json`` (or ``<run_dir>/seed_<n>/<task>/metrics.json``) of a training
    output directory, as one table row.

    ``metric``: ``final`` (test accuracy of the last epoch's adapter), ``val-selected`` (test accuracy of the
    evaluation with the best validation accuracy; ``--split tune`` runs) or ``best`` (best test accuracy seen
    during training: optimistic). ``protocol`` (``final`` or ``tune``), when given, is the training protocol
    every record must have: a run trained otherwise is an error naming it, unless ``mixed_protocols`` (then
    the table says which run used which). ``label`` defaults to the directory's name; ``tasks`` (canonical
    names) restricts what is read. A task directory without metrics.json (an unfinished run) becomes a missing
    task plus a warning.
    """
    describe_metric(metric)

    seeds, results, warnings = collect_seeds(
        run_dir, benchmark, tasks, METRICS_FILE,
        lambda path, name: read_metrics(path, benchmark, metric, name, protocol=protocol,
                                        mixed_protocols=mixed_protocols))
    if not results:
        raise ValueError(
            f"no task directory of {run_dir} holds {METRICS_FILE}; wait for training to finish, or pass "
            "--data-root to re-evaluate the adapter files"
        )
    return RunResult(
        label=label or Path(run_dir).resolve().name,
        benchmark=benchmark,
        metric=metric,
        results=results,
        path=str(run_dir),
        warnings=warnings,
        seeds=seeds,
    )


def result_from_evaluation(
    record: Mapping,
    benchmark: str,
    *,
    task: str | None = None,
    source: str | Path | None = None,
    protocol: str | None = None,
) -> TaskResult:
    """A :class:`TaskResult` from the dict ``visadapt.engine.evaluate_adapter_file`` returns.

    The dict holds ``accuracy`` (percent) and the counts; its ``benchmark`` and ``task`` are checked against
    ``benchmark`` and ``task`` (canonical name; ``None`` takes the record's).
    """
    where = f"evaluation of {source}" if source is not None else "evaluation result"
    accuracy = _accuracy(record, "accuracy", where, "the evaluator must return the accuracy in percent")
    return _task_result(record, benchmark, accuracy, where, task, protocol)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def _std(values: Sequence[float | None]) -> float | None:
    """Sample standard deviation (n - 1) of ``values``; ``None`` with fewer than two or any ``None``."""
    if len(values) < 2 or any(v is None for v in values):
        return None
    return statistics.stdev(values)


class _Averages(NamedTuple):
    group_means: dict[str, float | None]
    incomplete_groups: tuple[str, ...]
    mean_groups: float | None
    mean_tasks: float | None


def _averages(tasks: Mapping, accuracy: Mapping[str, float | None]) -> _Averages:
    """The group means (and which groups lack tasks), the mean of the group means and the mean over tasks of one
    set of per-task accuracies (``None`` for a task without a number)."""
    group_means: dict[str, float | None] = {}
    incomplete: list[str] = []
    for group in GROUPS:
        members = [name for name, info in tasks.items() if info.group == group]
        if not members:
            continue
        present = [accuracy[name] for name in members if accuracy[name] is not None]
        group_means[group] = _mean(present)
        if len(present) < len(members):
            incomplete.append(group)
    present_means = [m for m in group_means.values() if m is not None]
    mean_groups = _mean(present_means) if group_means else None
    return _Averages(group_means, tuple(incomplete), mean_groups, _mean(a for a in accuracy.values() if a is not None))


def summarize(run: RunResult) -> RunSummary:
    """Per-task accuracy, group means, mean of the group means, mean over tasks, mean params and bytes.

    With several seeds every average is computed for each seed from that seed's accuracies, then reported as
    the mean and sample standard deviation of those per-seed averages.
    """
    tasks = benchmark_tasks(run.benchmark)
    accuracy = {name: (run.results[name].accuracy if name in run.results else None) for name in tasks}
    group_means, incomplete, mean_groups, mean_tasks = _averages(tasks, accuracy)
    spread: dict = {}
    if run.n_seeds > 1:
        per_seed = [_averages(tasks, {name: (run.results[name].per_seed[i] if name in run.results else None)
                                      for name in tasks}) for i in range(run.n_seeds)]
        group_means = {g: _mean(a.group_means[g] for a in per_seed) if group_means[g] is not None else None
                       for g in group_means}
        mean_groups = _mean(a.mean_groups for a in per_seed) if mean_groups is not None else None
        mean_tasks = _mean(a.mean_tasks for a in per_seed) if mean_tasks is not None else None
        spread = {
            "accuracy_std": {name: (run.results[name].accuracy_std if name in run.results else None)
                             for name in tasks},
            "group_means_std": {g: _std([a.group_means[g] for a in per_seed]) for g in group_means},
            "mean_groups_std": _std([a.mean_groups for a in per_seed]),
            "mean_tasks_std": _std([a.mean_tasks for a in per_seed]),
        }
    results = list(run.results.values())
    return RunSummary(
        label=run.label,
        accuracy=accuracy,
        group_means=group_means,
        incomplete_groups=incomplete,
        mean_groups=mean_groups,
        mean_tasks=mean_tasks,
        missing=tuple(run.missing),
        adapter_params=_mean(r.adapter_params for r in results if r.adapter_params is not None),
        trainable_params=_mean(r.trainable_params for r in results if r.trainable_params is not None),
        adapter_bytes=_mean(r.adapter_bytes for r in results if r.adapter_bytes is not None),
        n_seeds=run.n_seeds,
        **spread,
    )


def _common(runs: Sequence[RunResult]) -> tuple[str, str, str | None]:
    """The benchmark, metric and protocol shared by every run; a table mixing benchmarks or metrics is wrong."""
    if not runs:
        raise ValueError("no run to tabulate; pass at least one run")
    benchmark, metric = runs[0].benchmark, runs[0].metric
    for run in runs[1:]:
        if run.benchmark != benchmark:
            raise ValueError(f"run {run.label!r} is {run.benchmark}, run {runs[0].label!r} is {benchmark}; "
                             "tabulate one benchmark at a time")
        if run.metric != metric:
            raise ValueError(f"run {run.label!r} reports {run.metric} accuracy, run {runs[0].label!r} {metric}; "
                             "one table shows one kind of accuracy")
    protocols = {r.protocol for run in runs for r in run.results.values() if r.protocol is not None}
    return benchmark, metric, protocols.pop() if len(protocols) == 1 else None


def _protocol_warning(runs: Sequence[RunResult]) -> list[str]:
    by_protocol: dict[str, list[str]] = {}
    for run in runs:
        for result in run.results.values():
            if result.protocol is not None:
                by_protocol.setdefault(result.protocol, []).append(f"{run.label}/{result.task}")
    if len(by_protocol) < 2:
        return []
    parts = "; ".join(f"protocol {p}: {', '.join(names)}" for p, names in sorted(by_protocol.items()))
    message = ("the table mixes protocols, whose numbers are not comparable (final: trained on train800val200; tune: "
               "trained on train800 and selected on val200; for re-evaluated files the protocol names the split "
               f"evaluated): {parts}")
    return [message]


def format_millions(count: float | None) -> str:
    """A parameter count in millions with three significant digits, as the "Params (M)" column: 0.0123."""
    if count is None:
        return MISSING
    millions = count / 1e6
    if millions == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(millions)))
    return f"{millions:.{decimals}f}"


def format_bytes(size: float | None) -> str:
    """A size on disk in decimal units (1 KB = 1000 bytes, as file managers and papers print them)."""
    if size is None:
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def _percent(value: float | None, incomplete: bool = False, std: float | None = None) -> str:
    """``76.0``, ``76.0 ± 0.5`` with a spread over seeds, ``*`` appended for a mean over an incomplete set."""
    if value is None:
        return MISSING
    return f"{value:.1f}" + (f" ± {std:.1f}" if std is not None else "") + ("*" if incomplete else "")


def to_markdown(runs: Sequence[RunResult]) -> str:
    """The paper-style markdown table: one row per run, one column per task in canonical order, then means.

    The line above the table says which accuracy it shows. A mean over an incomplete set carries ``*`` and the
    note below says which tasks each run lacks; warnings (directories not used) follow.
    """
    benchmark, metric, protocol = _common(runs)
    tasks = benchmark_tasks(benchmark)
    summaries = [summarize(run) for run in runs]
    groups = list(summaries[0].group_means)
    header = ["Run", *(info.title for info in tasks.values())]
    header += [*groups, "Mean (groups)", "Mean (tasks)"] if groups else ["Mean"]
    header += ["Params (M)", "Trainable (M)", "Size"]
    caption = f"{BENCHMARK_TITLES.get(benchmark, benchmark)}: top-1 accuracy (%), {describe_metric(metric)}"
    if protocol is not None:
        caption += f"; protocol {protocol}"
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for summary in summaries:
        partial = bool(summary.missing)
        cells = [summary.label.replace("|", "\\|")]
        cells += [_percent(summary.accuracy[name], std=summary.accuracy_std.get(name)) for name in tasks]
        cells += [_percent(summary.group_means[g], g in summary.incomplete_groups, summary.group_means_std.get(g))
                  for g in groups]
        if groups:
            cells.append(_percent(summary.mean_groups, partial, summary.mean_groups_std))
        cells.append(_percent(summary.mean_tasks, partial, summary.mean_tasks_std))
        star = "*" if partial else ""
        cells += [
            format_millions(summary.adapter_params) + star * (summary.adapter_params is not None),
            format_millions(summary.trainable_params) + star * (summary.trainable_params is not None),
            format_bytes(summary.adapter_bytes) + star * (summary.adapter_bytes is not None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if groups:
        lines.append(
            f"Mean (groups) = mean of the {' / '.join(groups)} means (VPT, NOAH, FacT convention); "
            f"Mean (tasks) = plain mean over the {len(tasks)} tasks (V-PETL Bench convention)."
        )
    else:
        lines.append(f"Mean = plain mean over the {len(tasks)} datasets (VPT convention).")
    lines.append(
        "Params (M) = adapter parameters without the classifier head, mean over tasks; Trainable (M) includes the "
        "head; Size = adapter file on disk, mean over tasks (1 KB = 1000 bytes)."
    )
    if any(s.n_seeds > 1 for s in summaries):
        counts = "; ".join(f"{run.label}: {run.n_seeds} seed{'s' * (run.n_seeds > 1)}"
                           + (f" ({', '.join(map(str, run.seeds))})" if run.seeds else "") for run in runs)
        lines.append(
            "± = sample standard deviation over seeds (n - 1 in the denominator); every average is computed per seed, "
            f"then its mean ± std over the seeds is shown. A run of one seed shows no ±. Seeds: {counts}."
        )
    incomplete = [(s, run) for s, run in zip(summaries, runs) if s.missing]
    if incomplete:
        parts = "; ".join(
            f"{s.label}: {', '.join(tasks[name].title for name in s.missing)} ({len(s.missing)} of {len(tasks)})"
            for s, _ in incomplete
        )
        lines.append(f"Values marked * are over the tasks present only. Missing tasks: {parts}.")
    for message in [w for run in runs for w in run.warnings] + _protocol_warning(runs):
        lines.append(f"Warning: {message}")
    return "\n".join(lines) + "\n"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def to_dict(runs: Sequence[RunResult]) -> dict:
    """Everything the table shows, unrounded for display (4 decimals), plus each task's raw record."""
    benchmark, metric, protocol = _common(runs)
    tasks = benchmark_tasks(benchmark)
    rows = []
    for run, summary in zip(runs, map(summarize, runs)):
        rows.append({
            "label": run.label,
            "path": run.path,
            "accuracy": {name: _round(value) for name, value in summary.accuracy.items()},
            "group_means": {g: _round(value) for g, value in summary.group_means.items()},
            "incomplete_groups": list(summary.incomplete_groups),
            "mean_groups": _round(summary.mean_groups),
            "mean_tasks": _round(summary.mean_tasks),
            "missing": list(summary.missing),
            "adapter_params": _round(summary.adapter_params, 1),
            "trainable_params": _round(summary.trainable_params, 1),
            "adapter_bytes": _round(summary.adapter_bytes, 1),
            "n_seeds": summary.n_seeds,
            "seeds": list(run.seeds),
            "accuracy_std": {name: _round(summary.accuracy_std.get(name)) for name in summary.accuracy},
            "group_means_std": {g: _round(summary.group_means_std.get(g)) for g in summary.group_means},
            "mean_groups_std": _round(summary.mean_groups_std),
            "mean_tasks_std": _round(summary.mean_tasks_std),
            "per_task": {name: dataclasses.asdict(result) for name, result in run.results.items()},
            "warnings": list(run.warnings),
        })
    return {
        "benchmark": benchmark,
        "metric": metric,
        "metric_description": describe_metric(metric),
        "protocol": protocol,
        "tasks": [{"name": info.name, "title": info.title, "group": info.group} for info in tasks.values()],
        "averages": {
            "mean_groups": "mean of the group means (VPT, NOAH, FacT); null for FGVC, which has no groups",
            "mean_tasks": "plain mean over the tasks (V-PETL Bench; the FGVC mean)",
            "incomplete": "a mean over a run with missing tasks is over the tasks present (see 'missing')",
            "std": STD_DESCRIPTION,
        },
        "units": {"accuracy": "percent", "adapter_params": "parameters without the classifier head, mean over "
                  "tasks", "trainable_params": "including the head, mean over tasks",
                  "adapter_bytes": "bytes on disk, mean over tasks"},
        "runs": rows,
        "warnings": _protocol_warning(runs),
    }


def to_json(runs: Sequence[RunResult]) -> str:
    """:func:`to_dict` as indented JSON text."""
    return json.dumps(to_dict(runs), indent=2, ensure_ascii=False) + "\n"


def to_csv(runs: Sequence[RunResult]) -> str:
    """One row per run: label, metric, per-task accuracy by canonical name, group means, both means, params,
    bytes and the missing tasks (``;``-separated), then the number of seeds (``n_seeds``), the seeds, and the
    standard deviation over seeds of every accuracy column (``<column>_std``; empty with one seed). Missing
    numbers are empty cells."""
    table = to_dict(runs)
    tasks = [t["name"] for t in table["tasks"]]
    groups = list(table["runs"][0]["group_means"])
    header = ["label", "path", "metric", *tasks, *groups]
    header += ["mean_groups", "mean_tasks"] if groups else ["mean_tasks"]
    header += ["adapter_params", "trainable_params", "adapter_bytes", "missing"]
    means = ["mean_groups", "mean_tasks"] if groups else ["mean_tasks"]
    header += ["n_seeds", "seeds", *(f"{name}_std" for name in [*tasks, *groups, *means])]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in table["runs"]:
        values = [row["label"], row["path"], table["metric"], *(row["accuracy"][t] for t in tasks)]
        values += [row["group_means"][g] for g in groups]
        values += [row["mean_groups"], row["mean_tasks"]] if groups else [row["mean_tasks"]]
        values += [row["adapter_params"], row["trainable_params"], row["adapter_bytes"], ";".join(row["missing"])]
        values += [row["n_seeds"], ";".join(map(str, row["seeds"]))]
        values += [row["accuracy_std"][t] for t in tasks] + [row["group_means_std"][g] for g in groups]
        values += [row[f"{m}_std"] for m in means]
        writer.writerow(["" if v is None else v for v in values])
    return out.getvalue()
