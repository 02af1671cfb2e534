"""Pictures of ``visadapt-eval`` results: per-task bars (``--plot FILE``) and training curves (``--plot curves FILE``).

matplotlib is an optional dependency (the ``plot`` extra), imported only here and only when a plot is drawn.
The figure is drawn on an explicit Agg canvas rather than through ``pyplot``, so plotting neither needs a
display nor changes the backend of a notebook or script that imported visadapt.

The bars show what the table shows, from the same arithmetic (:func:`visadapt.eval.tables.summarize`): the value,
and with seeds an error bar of the same sample standard deviation the table prints after ``±``. A task a run
lacks is drawn as a short hatched outline marked ``n/a``, never as a 0 % bar.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from visadapt.data.tasks import benchmark_tasks

from .tables import (
    BENCHMARK_TITLES,
    METRICS_FILE,
    RunResult,
    describe_metric,
    find_seed_dirs,
    find_task_dirs,
    summarize,
)

# Empty slots between two groups, so Natural / Specialized / Structured read as three blocks.
GROUP_GAP = 1.0
# Height (percentage points) of the hatched outline that marks a missing task: visible, and far from any real bar.
MISSING_HEIGHT = 6.0
MISSING_GID = "missing"
# Short names of the metrics for a title (the table's caption carries the long description).
METRIC_TITLES = {
    "final": "final-epoch test accuracy",
    "val-selected": "validation-selected test accuracy",
    "best": "best-on-test accuracy (optimistic)",
    "reevaluated": "accuracy re-evaluated from adapter files",
}
# Plot kinds of --plot: the first one is what a bare `--plot FILE` draws.
PLOT_KINDS = ("bars", "curves")
NO_HISTORY = ("no run records a per-epoch history in its metrics.json (runs of an older train/vtab.py record none); "
              "--plot curves needs runs trained by train/vtab.py")
# Seeds of one run share its colour and differ by line style.
SEED_STYLES = ("-", "--", ":", "-.")


def require_matplotlib():
    """The matplotlib module, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f'plotting needs matplotlib ({err}); install it with: pip install "visadapt[plot]"') from err
    return matplotlib


def parse_plot_request(values: Sequence[str]) -> tuple[str, Path]:
    """One ``--plot`` occurrence -> ``(kind, file)``: ``[FILE]`` is ``("bars", FILE)``, ``[KIND, FILE]`` names the
    kind (``bars`` or ``curves``). Raises ``ValueError`` naming the fix."""
    if len(values) == 1:
        if values[0] in PLOT_KINDS:
            raise ValueError(f"--plot {values[0]} needs the file to write too, e.g. --plot {values[0]} "
                             f"{values[0]}.png")
        return PLOT_KINDS[0], Path(values[0])
    if len(values) == 2 and values[0] in PLOT_KINDS:
        return values[0], Path(values[1])
    raise ValueError(f"--plot {' '.join(values)}: expected --plot FILE (per-task bars) or --plot KIND FILE with KIND "
                     f"one of {', '.join(PLOT_KINDS)}, e.g. --plot curves curves.png")


def _figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend change)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Writes ``fig`` to ``path`` in the format of its extension (PNG when it has none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=None if path.suffix else "png", dpi=100, bbox_inches="tight")
    return path


def _check_benchmark(results: Sequence[RunResult], benchmark: str) -> None:
    if not results:
        raise ValueError("no run to plot; pass at least one run")
    for run in results:
        if run.benchmark != benchmark:
            raise ValueError(f"run {run.label!r} is {run.benchmark}, not {benchmark}; plot one benchmark at a time")


def _layout(benchmark: str) -> tuple[dict[str, float], list[tuple[str | None, float, float]]]:
    """The x position of every task and average column, and each block's (name, first x, last x) in order.

    The blocks are the benchmark's groups (one unnamed block for FGVC), then "Average": the mean of the group
    means and the mean over tasks (FGVC: the mean), as the table's last accuracy columns.
    """
    positions: dict[str, float] = {}
    spans: list[tuple[str | None, float, float]] = []
    x = 0.0
    columns = [(name, info.group) for name, info in benchmark_tasks(benchmark).items()]
    grouped = any(group is not None for _, group in columns)
    columns += [(key, "Average") for key in (("mean_groups", "mean_tasks") if grouped else ("mean_tasks",))]
    for name, group in columns:
        if not spans or group != spans[-1][0]:
            if spans:
                x += GROUP_GAP
            spans.append((group, x, x))
        spans[-1] = (group, spans[-1][1], x)
        positions[name] = x
        x += 1.0
    return positions, spans


def _bar_values(run: RunResult) -> tuple[dict[str, float | None], dict[str, float | None], set[str]]:
    """``(value, std, partial)`` per column of :func:`_layout`, from the table's own :func:`summarize`: the values
    and seed standard deviations the table prints, and which averages are over incomplete sets (``*``)."""
    summary = summarize(run)
    values: dict[str, float | None] = dict(summary.accuracy)
    stds: dict[str, float | None] = {name: summary.accuracy_std.get(name) for name in summary.accuracy}
    partial = {"mean_groups", "mean_tasks"} if summary.missing else set()
    if summary.group_means:
        values["mean_groups"], stds["mean_groups"] = summary.mean_groups, summary.mean_groups_std
    values["mean_tasks"], stds["mean_tasks"] = summary.mean_tasks, summary.mean_tasks_std
    return values, stds, partial


def draw_runs(results: Sequence[RunResult], benchmark: str):
    """The per-task bar chart of ``results`` as a matplotlib Figure (one Axes; see :func:`plot_runs`).

    Each run's bars are one ``BarContainer`` labelled with the run (its ``errorbar`` holds the seed spreads);
    missing tasks are patches whose gid is :data:`MISSING_GID`, each with an ``n/a`` text.
    """
    _check_benchmark(results, benchmark)
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    tasks = benchmark_tasks(benchmark)
    positions, spans = _layout(benchmark)
    slots = max(positions.values()) + 1
    width = 0.8 / len(results)
    fig = _figure(min(40.0, 2.5 + slots * (0.32 + 0.16 * len(results))), 5.2)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(results))]
    any_missing = False
    for i, run in enumerate(results):
        offset = (i - (len(results) - 1) / 2) * width
        values, stds, partial = _bar_values(run)
        present = [name for name in positions if values.get(name) is not None]
        heights = [values[name] for name in present]
        spread = [stds[name] for name in present]
        has_spread = run.n_seeds > 1 and all(s is not None for s in spread)
        label = run.label + (f" ({run.n_seeds} seeds, ± std)" if run.n_seeds > 1 else "")
        bars = ax.bar([positions[n] + offset for n in present], heights, width=width, color=colors[i], label=label,
                      yerr=spread if has_spread else None, capsize=min(3.0, 12 * width),
                      error_kw={"elinewidth": 1.0, "ecolor": "0.15"})
        ax.bar_label(bars, labels=[f"{v:.1f}" + ("*" if n in partial else "") for n, v in zip(present, heights)],
                     rotation=90, padding=2, fontsize=7)
        for name in tasks:
            if name in present:
                continue
            any_missing = True
            x = positions[name] + offset
            ax.bar([x], [MISSING_HEIGHT], width=width, fill=False, hatch="////", edgecolor=colors[i],
                   linewidth=0.8, gid=MISSING_GID)
            ax.text(x, MISSING_HEIGHT + 1.5, "n/a", rotation=90, ha="center", va="bottom", fontsize=7,
                    color="0.3", gid=MISSING_GID)
    titles = {name: info.title for name, info in tasks.items()}
    titles |= {"mean_groups": "Mean (groups)", "mean_tasks": "Mean (tasks)" if len(positions) > len(tasks) + 1
               else "Mean"}
    ax.set_xticks(list(positions.values()))
    ax.set_xticklabels([titles[name] for name in positions], rotation=45, ha="right")
    ax.set_xlim(-0.6, slots - 0.4)
    ax.set_ylim(0, 112)  # room above 100 % for the value labels
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlabel("task")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    above = blended_transform_factory(ax.transData, ax.transAxes)
    for k, (group, first, last) in enumerate(spans):
        if group is not None:
            ax.text((first + last) / 2, 1.01, group, transform=above, ha="center", va="bottom", fontweight="bold")
        if k:
            ax.axvline(first - (GROUP_GAP + 1) / 2, color="0.5", linestyle="--", linewidth=0.8)
    seeds = sorted({run.n_seeds for run in results if run.n_seeds > 1})
    metric = results[0].metric
    title = f"{BENCHMARK_TITLES.get(benchmark, benchmark)}: {METRIC_TITLES.get(metric, describe_metric(metric))}"
    if seeds:
        title += f", mean ± std over {'/'.join(map(str, seeds))} seeds"
    ax.set_title(title, pad=22)
    handles, _ = ax.get_legend_handles_labels()
    if any_missing:
        handles.append(Patch(fill=False, hatch="////", edgecolor="0.3", label="n/a: no result for this task"))
    if any(_bar_values(run)[2] for run in results):
        handles.append(Patch(visible=False, label="*: mean over the tasks present"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def plot_runs(results: Sequence[RunResult], benchmark: str, path: str | Path) -> Path:
    """Draws per-task accuracy of every run as grouped bars and writes the figure to ``path``.

    Tasks are in canonical column order, with a gap, a dashed separator and the group name between the
    Natural / Specialized / Structured blocks (FGVC has no groups), then the averages of the table. Each run is
    one colour, named in the legend; every bar carries its value, and with seeds an error bar of ± the sample
    standard deviation over seeds (the table's ±). A task a run lacks is a hatched ``n/a`` outline. The format
    follows the file's extension, PNG when it has none.
    """
    return save_figure(draw_runs(results, benchmark), path)


# ------------------------------------------------------------------------------------------ training curves


def _history(path: Path) -> list[dict[str, float]] | None:
    """The per-epoch ``history`` of one ``metrics.json``: ``[{"epoch", "train_loss"?, "accuracy"?}, ...]``, or
    ``None`` when the file records none. A malformed history is an error naming the file and the entry."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run that task or move its directory away") from None
    history = record.get("history") if isinstance(record, dict) else None
    if not history:
        return None
    if not isinstance(history, list):
        raise TypeError(f"{path}: 'history' is {type(history).__name__}, expected a list of per-epoch entries")
    entries = []
    for k, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise TypeError(f"{path}: history entry {k} is {type(entry).__name__}, expected an object")
        kept = {}
        for key in ("epoch", "train_loss", "accuracy"):
            value = entry.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{path}: history entry {k} has {key}={value!r}, expected a finite number")
            kept[key] = float(value)
        if "epoch" not in kept:
            raise ValueError(f"{path}: history entry {k} has no 'epoch'; it was not written by train/vtab.py")
        entries.append(kept)
    return entries


def read_histories(run: RunResult) -> tuple[dict[str, dict[int | None, list[dict[str, float]]]], list[str]]:
    """``({task: {seed: history}}, notes)`` for the tasks of ``run`` (those its table row shows), read from the
    ``metrics.json`` next to each result: ``<run>/<task>/``, ``<run>/seed_<n>/<task>/``, or beside an adapter file.
    A single run's seed key is ``None``. A task without a recorded history is left out with a note."""
    histories: dict[str, dict[int | None, list[dict[str, float]]]] = {}
    notes: list[str] = []
    if run.path is None:
        return histories, [f"{run.label}: no run directory to read a history from"]
    root = Path(run.path)
    wanted = list(run.results)
    if root.is_file():  # one adapter file re-evaluated: its metrics.json, if any, lies beside it
        places = {None: {task: root.parent for task in wanted}}
    else:
        seed_dirs = find_seed_dirs(root) if run.seeds else {}
        places = {}
        for seed, folder in (seed_dirs.items() if seed_dirs else [(None, root)]):
            if run.seeds and seed not in run.seeds:
                continue
            places[seed] = find_task_dirs(folder, run.benchmark, wanted)[0]
    for seed, dirs in places.items():
        for task, folder in dirs.items():
            file = folder / METRICS_FILE
            history = _history(file) if file.is_file() else None
            if history is None:
                notes.append(f"{file} records no per-epoch history; {run.label} {task}"
                             + (f" seed {seed}" if seed is not None else "") + " has no curve")
                continue
            histories.setdefault(task, {})[seed] = history
    return histories, notes


def draw_curves(runs: Sequence[tuple[str, Mapping[str, Mapping[int | None, list[dict[str, float]]]]]],
                benchmark: str):
    """Training loss and accuracy per epoch as a matplotlib Figure: per task a loss Axes above an accuracy Axes,
    tasks in canonical order, up to four per row.

    ``runs``: ``(label, {task: {seed: history}})`` per run (:func:`read_histories`). Each run is one colour; each
    seed of it one line (line style per seed) labelled ``"<label>"`` or ``"<label>, seed <n>"``, whose points are
    the history's ``(epoch, train_loss)`` or ``(epoch, accuracy)``.
    """
    from matplotlib.ticker import MaxNLocator

    tasks = benchmark_tasks(benchmark)
    shown = [name for name in tasks if any(name in histories for _, histories in runs)]
    if not shown:
        raise ValueError(NO_HISTORY)
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    labels = [label if seed is None else f"{label}, seed {seed}"
              for label, histories in runs for seed in sorted({s for h in histories.values() for s in h},
                                                              key=lambda s: -1 if s is None else s)]
    legend_rows = math.ceil(len(labels) / 4)
    header = 0.8 + 0.25 * legend_rows  # inches above the plots: the title, the legend, the first task titles
    height = header + 4.2 * rows
    fig = _figure(1.0 + 3.4 * columns, height)
    fig.subplots_adjust(top=1 - header / height, bottom=0.5 / height, hspace=0.28, wspace=0.3)
    outer = fig.add_gridspec(rows, columns)
    for k, task in enumerate(shown):
        row, col = divmod(k, columns)
        pair = outer[row, col].subgridspec(2, 1, hspace=0.08)
        loss_ax = fig.add_subplot(pair[0])
        acc_ax = fig.add_subplot(pair[1], sharex=loss_ax)
        loss_ax.set_title(tasks[task].title, fontsize=10, fontweight="bold")
        loss_ax.tick_params(labelbottom=False)
        loss_ax.set_gid(f"loss:{task}")
        acc_ax.set_gid(f"accuracy:{task}")
        for i, (label, histories) in enumerate(runs):
            for j, (seed, history) in enumerate(sorted(histories.get(task, {}).items(),
                                                       key=lambda item: -1 if item[0] is None else item[0])):
                name = label if seed is None else f"{label}, seed {seed}"
                style = {"color": f"C{i % 10}", "linestyle": SEED_STYLES[j % len(SEED_STYLES)], "label": name,
                         "marker": "o", "markersize": 3, "linewidth": 1.4}
                for ax, key in ((loss_ax, "train_loss"), (acc_ax, "accuracy")):
                    points = [(entry["epoch"], entry[key]) for entry in history if key in entry]
                    if points:
                        ax.plot(*zip(*points), **style)
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "no history", transform=ax.transAxes, ha="center", va="center", color="0.4")
        acc_ax.set_xlabel("epoch")
        acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if col == 0:
            loss_ax.set_ylabel("train loss")
            acc_ax.set_ylabel("test accuracy (%)")
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.suptitle(f"{BENCHMARK_TITLES.get(benchmark, benchmark)}: training curves (metrics.json history)",
                 y=1 - 0.12 / height, va="top", fontweight="bold")
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height),
               ncol=min(4, len(handles)), frameon=False)
    return fig


def collect_curves(results: Sequence[RunResult], benchmark: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """``(runs, notes)`` for :func:`draw_curves`: every run's histories (:func:`read_histories`) and the notes about
    tasks without one. Raises ``ValueError`` when no run has any history, so a caller can refuse before writing."""
    _check_benchmark(results, benchmark)
    runs, notes = [], []
    for run in results:
        histories, run_notes = read_histories(run)
        runs.append((run.label, histories))
        notes += run_notes
    if not any(histories for _, histories in runs):
        raise ValueError(NO_HISTORY)
    return runs, notes


def plot_curves(results: Sequence[RunResult], benchmark: str, path: str | Path) -> tuple[Path, list[str]]:
    """Writes the training curves (:func:`draw_curves`) of the runs of a table to ``path``; returns the file and
    notes about tasks drawn without a curve (no history recorded)."""
    runs, notes = collect_curves(results, benchmark)
    return save_figure(draw_curves(runs, benchmark), path), notes
