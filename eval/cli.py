"""``visadapt-eval``: VTAB-1k / FGVC tables the way the PETL papers print them, from training outputs.

    visadapt-eval --benchmark vtab --adapters runs/lora runs/mosa
    visadapt-eval --benchmark vtab --adapters runs/lora --data-root /data/vtab-1k --csv lora.csv --plot lora.png
    visadapt-eval --benchmark vtab --adapters runs/lora runs/mosa --plot bars.png --plot curves curves.png
    visadapt-eval --benchmark vpr --adapters runs/vpr-mini-places-selavpr      # Recall@1/5/10, global and re-ranked
    visadapt-eval --benchmark rank --adapters runs/rank-mini-counting-v1-seed0   # PLCC / SRCC / MAE / pair accuracy
    visadapt-eval --benchmark dense --adapters runs/dense-scenes-lite --reference runs/dense-scenes-full-single  # Δm

    visadapt-eval --benchmark vtab --adapters runs/lora-seeds                  # seed_0/ seed_1/ ...: mean ± std
    visadapt-eval --benchmark vtab --adapters runs/lora-tune --split tune      # validation-selected test accuracy

Without --data-root the accuracies are read from each task's metrics.json. Which number is shown follows the
training protocol: --split final (default) shows the final-epoch test accuracy of runs trained with --split
final; --split tune shows the validation-selected test accuracy of runs trained with --split tune. --metric best
shows the best test accuracy seen during training instead, labelled best-on-test (optimistic). A table refuses
runs of the other protocol unless --mixed-protocols is given. A run trained with --seeds (one seed_<n>
directory per seed) shows mean ± sample standard deviation per task and in every average (each average is
computed per seed first). With --data-root every adapter file is evaluated again on the data.
--plot FILE draws the table as bars (value labels, ± std error bars over seeds, missing tasks marked n/a);
--plot curves FILE draws train loss and test accuracy per epoch from each task's metrics.json history (one
line per run and seed); --plot may be given more than once.
The table goes to stdout; progress, and where --csv / --json / --plot were written, go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from visadapt.cli import plain_help
from visadapt.data.tasks import BENCHMARKS, resolve_task, resolve_tasks
from visadapt.progress import Progress, add_no_progress_flag, apply_no_progress_flag

# Relative, because eval/ is mapped to visadapt.eval by pyproject's package-dir: import sorters do not see it as
# part of visadapt and would split it from the other visadapt imports.
from .tables import (
    ADAPTER_FILE,
    PROTOCOL_METRICS,
    RunResult,
    TaskResult,
    collect_run,
    collect_seeds,
    find_seed_dirs,
    find_task_dirs,
    result_from_evaluation,
    to_csv,
    to_json,
    to_markdown,
)

# The signature of visadapt.engine.evaluate_adapter_file; tests pass a fake with the same one.
Evaluator = Callable[..., Mapping]


def _engine_evaluator() -> Evaluator:
    """visadapt.engine.evaluate_adapter_file, imported only when re-evaluating: it pulls in the model stack."""
    try:
        from visadapt.engine import evaluate_adapter_file
    except ImportError as err:
        raise ImportError(
            f"re-evaluating adapter files needs visadapt.engine.evaluate_adapter_file, which does not import "
            f"({err}); update visadapt, or drop --data-root to read the numbers from metrics.json"
        ) from err
    return evaluate_adapter_file


def _recorded_benchmark(path: Path) -> str | None:
    """The benchmark an adapter file says it was trained on, read from the header alone (no tensors).

    Checked before evaluating because task names overlap between benchmarks (``oxford_flowers102`` is a VTAB
    task and an FGVC alias): an FGVC run passed as ``--benchmark vtab`` would otherwise be evaluated, wrongly,
    on VTAB's Flowers102 data. A file this cannot read is left to the evaluator, which explains what is wrong.
    """
    try:
        from visadapt.io import TrainingRun, read_safetensors_metadata

        return TrainingRun(path, read_safetensors_metadata(path)).text("benchmark")
    except Exception:  # noqa: BLE001 - any unreadable header means "not known here", never a failure
        return None


def _evaluate_one(evaluate: Evaluator, adapter: Path, data_root, benchmark: str, task: str | None,
                  files: Progress | None = None, **kwargs) -> TaskResult:
    """One adapter file through ``evaluate``, refused first if its header records another benchmark; counted on
    ``files`` (the progress over every file of the command) once done."""
    recorded = _recorded_benchmark(adapter)
    if recorded is not None and recorded != benchmark:
        raise ValueError(f"{adapter} was trained on {recorded}, not {benchmark}; pass --benchmark {recorded}, or "
                         "leave it out")
    message = f"visadapt-eval: evaluating {adapter}"
    if files is not None:
        files.write(message)  # above the bar on a terminal
    else:
        print(message, file=sys.stderr)
    try:
        record = evaluate(adapter, data_root, benchmark=benchmark, task=task, **kwargs)
    except (ValueError, KeyError, TypeError) as err:  # the evaluator's message lacks which file it was about
        raise ValueError(f"evaluating {adapter}: {err}") from err
    if files is not None:
        files.update(1)
    return result_from_evaluation(record, benchmark, task=task, source=adapter, protocol=kwargs.get("protocol"))


def count_adapter_files(path: str | Path, benchmark: str, tasks: list[str] | None = None) -> int:
    """How many adapter files :func:`reevaluate_run` evaluates for ``path`` (found as it finds them), so that
    progress can show ``3/21 files`` from the start."""
    path = Path(path)
    if path.is_file():
        return 1
    folders = list(find_seed_dirs(path).values()) or [path]
    return sum((task_dir / ADAPTER_FILE).is_file() for folder in folders
               for task_dir in find_task_dirs(folder, benchmark, tasks)[0].values())


def _file_label(path: Path, benchmark: str) -> str:
    """``runs/lora/cifar100/adapter.safetensors`` is labelled ``lora`` (the task is its column); others by stem."""
    if path.stem == Path(ADAPTER_FILE).stem:
        try:
            resolve_task(benchmark, path.parent.name)
        except ValueError:
            return path.stem
        return path.resolve().parent.parent.name
    return path.stem


def reevaluate_run(
    path: str | Path,
    benchmark: str,
    evaluate: Evaluator,
    data_root: str | Path,
    *,
    protocol: str = "final",
    batch_size: int = 128,
    tasks: list[str] | None = None,
    label: str | None = None,
    files: Progress | None = None,
) -> RunResult:
    """Evaluates a training output directory (each ``<task>/adapter.safetensors``, or each
    ``seed_<n>/<task>/adapter.safetensors`` of a run with seeds) or one adapter file again.

    ``evaluate`` is called like ``visadapt.engine.evaluate_adapter_file(file, data_root, benchmark=..., task=...,
    protocol=..., batch_size=...)`` and returns its dict. A bare file's task comes from its own metadata.
    ``files``: a :class:`visadapt.progress.Progress` that counts each file evaluated (see :func:`count_adapter_files`).
    """
    path = Path(path)
    kwargs = {"protocol": protocol, "batch_size": batch_size, "files": files}
    if path.is_file():
        result = _evaluate_one(evaluate, path, data_root, benchmark, None, **kwargs)
        if tasks is not None and result.task not in tasks:
            raise ValueError(f"{path} holds task {result.task!r}, which --tasks leaves out; add it to --tasks or "
                             "leave the file out")
        return RunResult(label or _file_label(path, benchmark), benchmark, "reevaluated", {result.task: result},
                         path=str(path))
    seeds, results, warnings = collect_seeds(
        path, benchmark, tasks, ADAPTER_FILE,
        lambda adapter, name: _evaluate_one(evaluate, adapter, data_root, benchmark, name, **kwargs))
    if not results:
        raise ValueError(f"no task directory of {path} holds {ADAPTER_FILE}; check the path, or wait for training "
                         "to finish")
    return RunResult(label or path.resolve().name, benchmark, "reevaluated", results, path=str(path),
                     warnings=warnings, seeds=seeds)


def _unique_labels(runs: list[RunResult]) -> None:
    """Runs from different places with the same directory name (a/lora, b/lora) get their paths as labels."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1 and run.path is not None:
            run.label = run.path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``--plot [curves] FILE``: argparse has no nargs for "one or two values", so --plot takes ``+`` (checked
    by :func:`visadapt.eval.plot.parse_plot_request`) and its usage is written out here."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.dest == "plot":
            return "[curves] FILE"
        return super()._format_args(action, default_metavar)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visadapt-eval", description=plain_help(__doc__), formatter_class=_HelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=[*BENCHMARKS, "vpr", "rank", "dense"],
                        help="which table; vpr: place recognition runs of train/vpr.py; rank: text-driven "
                             "ranking runs of train/rank.py; dense: multi-task dense runs of train/dense.py")
    parser.add_argument("--adapters", required=True, nargs="+", metavar="PATH",
                        help="training output directories (one subdirectory per task) or adapter .safetensors "
                             "files (those need --data-root); one table row each")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="row labels, one per --adapters path (default: the directory name)")
    parser.add_argument("--split", choices=["final", "tune", "train", "val", "test"],
                        help="VTAB-1k / FGVC tables: which training protocol's number to show: final (default; "
                             "final-epoch test accuracy of runs trained with --split final) or tune (test accuracy "
                             "at the best validation accuracy, runs trained with --split tune). vpr with "
                             "--data-root: the split of the dataset folder to retrieve on (train, val, test; "
                             "default test)")
    parser.add_argument("--metric", choices=["final", "val-selected", "best"],
                        help="override the number --split shows: final (final-epoch test accuracy), val-selected "
                             "(tune runs only) or best (best test accuracy seen during training: best-on-test, "
                             "optimistic; what most PETL papers report)")
    parser.add_argument("--mixed-protocols", action="store_true",
                        help="allow runs trained with the other --split in the same table (a warning lists which "
                             "run used which); without it such a run is an error")
    parser.add_argument("--data-root", metavar="ROOT",
                        help="re-evaluate every adapter file on the benchmark data under ROOT instead of reading "
                             "metrics.json")
    parser.add_argument("--protocol", choices=["final", "tune"],
                        help="with --data-root: final = test split (default), tune = val200")
    parser.add_argument("--batch-size", type=int, metavar="N", help="with --data-root: evaluation batch size (128)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="only these tasks (names or aliases, comma- or space-separated); the rest show as "
                             "missing")
    parser.add_argument("--rerank-k", type=int, metavar="K",
                        help="vpr with --data-root: candidates re-ranked per query (default: the training recipe's)")
    parser.add_argument("--reference", metavar="RUN",
                        help="dense: the single-task reference of Δm, a train/dense.py --single-task output "
                             "directory, or 'pascal' (published single-task Swin-T numbers)")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    parser.add_argument("--json", metavar="FILE", help="also write everything as JSON")
    parser.add_argument("--plot", nargs="+", action="append",
                        help="also draw a picture (needs matplotlib): --plot FILE the per-task bars of the table, "
                             "--plot curves FILE train loss and test accuracy per epoch (metrics.json history); "
                             "repeatable")
    add_no_progress_flag(parser)
    return parser


def _collect(args: argparse.Namespace, evaluate: Evaluator | None) -> list[RunResult]:
    """One RunResult per --adapters path, after checking every input before any slow work starts."""
    benchmark = args.benchmark
    tasks = [info.name for info in resolve_tasks(benchmark, args.tasks)] if args.tasks else None
    paths = [Path(p) for p in args.adapters]
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path} does not exist; pass a training output directory (one subdirectory per "
                             "task) or an adapter .safetensors file")
        if path.is_file() and path.suffix != ".safetensors":
            raise ValueError(f"{path} is neither a directory nor a .safetensors adapter file; pass a training "
                             "output directory (one subdirectory per task) or an adapter file")
    if args.labels is not None:
        if len(args.labels) != len(paths):
            raise ValueError(f"--labels gives {len(args.labels)} labels for {len(paths)} --adapters paths; give one "
                             "label per path, in the same order")
        if len(set(args.labels)) != len(args.labels):
            raise ValueError(f"--labels repeats a label ({' '.join(args.labels)}); give each row its own")
    labels = args.labels or [None] * len(paths)
    if args.split is not None and args.split not in PROTOCOL_METRICS:
        raise ValueError(f"--split {args.split} is a dataset split of --benchmark vpr; the {benchmark} tables take "
                         f"--split {' or '.join(PROTOCOL_METRICS)} (the training protocol)")
    if args.data_root is None:
        for option, value in (("--protocol", args.protocol), ("--batch-size", args.batch_size)):
            if value is not None:
                raise ValueError(f"{option} only applies when re-evaluating; add --data-root ROOT, or drop "
                                 f"{option} to read metrics.json")
        for path in paths:
            if path.is_file():
                raise ValueError(f"{path} is an adapter file, and only metrics.json can be read without data; add "
                                 f"--data-root ROOT (the folder holding the {benchmark} tasks) to evaluate it, or "
                                 "pass its training output directory")
        split = args.split or "final"
        metric = args.metric or PROTOCOL_METRICS[split][0]
        if metric not in PROTOCOL_METRICS[split]:
            raise ValueError(f"--metric {metric} does not exist under --split {split} (training on train800val200 "
                             f"leaves no validation set to select by); use --split tune, or --metric "
                             f"{' or '.join(PROTOCOL_METRICS[split])}")
        return [collect_run(path, benchmark, metric, label=label, tasks=tasks, protocol=split,
                            mixed_protocols=args.mixed_protocols)
                for path, label in zip(paths, labels)]
    for option, value in (("--metric", args.metric), ("--split", args.split),
                          ("--mixed-protocols", args.mixed_protocols or None)):
        if value is not None:
            raise ValueError(f"{option} picks a number from metrics.json, but --data-root evaluates the adapter files "
                             "again (--protocol chooses the split they are evaluated on); drop one of the two")
    if not Path(args.data_root).is_dir():
        raise ValueError(f"--data-root {args.data_root} is not a directory; pass the folder holding the "
                         f"{benchmark} tasks")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    evaluate = evaluate or _engine_evaluator()
    total = sum(count_adapter_files(path, benchmark, tasks) for path in paths)
    with Progress(total=total, desc="visadapt-eval", unit="files") as files:
        return [
            reevaluate_run(path, benchmark, evaluate, args.data_root, protocol=args.protocol or "final",
                           batch_size=args.batch_size or 128, tasks=tasks, label=label, files=files)
            for path, label in zip(paths, labels)
        ]


def _vpr(args: argparse.Namespace) -> int:
    """``--benchmark vpr``: the Recall@K table of place recognition runs (options of the task tables refused)."""
    from .vpr import vpr_main

    for option, value in (("--metric", args.metric), ("--protocol", args.protocol), ("--tasks", args.tasks),
                          ("--csv", args.csv), ("--plot", args.plot), ("--mixed-protocols", args.mixed_protocols or None)):
        if value is not None:
            raise ValueError(f"{option} belongs to the classification tables; --benchmark vpr does not take it")
    if args.split in PROTOCOL_METRICS:
        raise ValueError(f"--split {args.split} is a training protocol of the classification tables; --benchmark vpr "
                         "takes --split train, val or test (the dataset split to retrieve on, with --data-root)")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise ValueError(f"--data-root {args.data_root} is not a directory; pass the dataset folder holding "
                         f"images/<split>/database and images/<split>/queries")
    if args.labels is not None and len(args.labels) != len(args.adapters):
        raise ValueError(f"--labels gives {len(args.labels)} labels for {len(args.adapters)} --adapters paths")
    table, records = vpr_main(args.adapters, args.labels, args.data_root, args.split or "test", args.rerank_k,
                              args.batch_size)
    print(table, end="")
    if args.json:
        _write(args.json, json.dumps(records, indent=1), "JSON")
    return 0


def _run_record_table(args: argparse.Namespace, build: Callable[[], tuple[str, dict]]) -> int:
    """The one-table benchmarks that read each run's metrics.json (rank, dense): options of the other tables are
    refused, then ``build()`` gives the table and the records for --json."""
    for option, value in (("--metric", args.metric), ("--protocol", args.protocol), ("--tasks", args.tasks),
                          ("--csv", args.csv), ("--plot", args.plot), ("--data-root", args.data_root),
                          ("--rerank-k", args.rerank_k), ("--split", args.split),
                          ("--mixed-protocols", args.mixed_protocols or None)):
        if value is not None:
            raise ValueError(f"{option} does not apply to --benchmark {args.benchmark}, which reads each run's "
                             f"metrics.json")
    if args.labels is not None and len(args.labels) != len(args.adapters):
        raise ValueError(f"--labels gives {len(args.labels)} labels for {len(args.adapters)} --adapters paths")
    table, records = build()
    print(table, end="")
    if args.json:
        _write(args.json, json.dumps(records, indent=1), "JSON")
    return 0


def _rank(args: argparse.Namespace) -> int:
    """``--benchmark rank``: the ranking table of train/rank.py runs, read from their metrics.json."""
    from .ranking import rank_main

    return _run_record_table(args, lambda: rank_main(args.adapters, args.labels))


def _dense(args: argparse.Namespace) -> int:
    """``--benchmark dense``: the multi-task table of train/dense.py runs with Δm, read from their metrics.json."""
    from .dense import dense_main

    return _run_record_table(args, lambda: dense_main(args.adapters, args.labels, args.reference))


def _write(path: str, text: str, what: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"visadapt-eval: wrote {what} to {target}", file=sys.stderr)


def main(argv: list[str] | None = None, *, evaluate: Evaluator | None = None) -> int:
    """Runs ``visadapt-eval`` and returns the exit status: 0, or 2 for bad input (message on stderr).

    ``evaluate`` replaces ``visadapt.engine.evaluate_adapter_file`` for --data-root (tests pass a fake).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed usage and the bad argument; return, as for other errors
        return exit_.code if isinstance(exit_.code, int) else 2
    apply_no_progress_flag(args)
    try:
        plots = []
        if args.plot:  # fail before a long re-evaluation, not after it
            from .plot import parse_plot_request, require_matplotlib

            plots = [parse_plot_request(values) for values in args.plot]
            require_matplotlib()
        if args.benchmark == "vpr":
            return _vpr(args)
        if args.benchmark == "rank":
            return _rank(args)
        if args.benchmark == "dense":
            return _dense(args)
        if args.reference is not None:
            raise ValueError("--reference belongs to --benchmark dense")
        runs = _collect(args, evaluate)
        if args.labels is None:
            _unique_labels(runs)
        curves = None
        if any(kind == "curves" for kind, _ in plots):  # a run without any history is refused before any output
            from .plot import collect_curves

            curves = collect_curves(runs, args.benchmark)
        print(to_markdown(runs), end="")
        sys.stdout.flush()
        if args.csv:
            _write(args.csv, to_csv(runs), "CSV")
        if args.json:
            _write(args.json, to_json(runs), "JSON")
        for kind, file in plots:
            from .plot import draw_curves, plot_runs, save_figure

            if kind == "curves":
                for note in curves[1]:
                    print(f"visadapt-eval: note: {note}", file=sys.stderr)
                target = save_figure(draw_curves(curves[0], args.benchmark), file)
                print(f"visadapt-eval: wrote curves to {target}", file=sys.stderr)
            else:
                target = plot_runs(runs, args.benchmark, file)
                print(f"visadapt-eval: wrote plot to {target}", file=sys.stderr)
        return 0
    except BrokenPipeError:  # `visadapt-eval ... | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0
    except (ValueError, KeyError, TypeError, OSError, ImportError) as err:
        print(f"visadapt-eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
