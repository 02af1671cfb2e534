"""Grouped bar chart of per-task accuracy, runs side by side, for ``visadapt-eval --plot``.

matplotlib is an optional dependency (the ``plot`` extra), imported only here and only when a plot is drawn.
The figure is drawn on an explicit Agg canvas rather than through ``pyplot``, so plotting neither needs a
display nor changes the backend of a notebook or script that imported visadapt.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from visadapt.data.tasks import benchmark_tasks

from .tables import BENCHMARK_TITLES, RunResult, describe_metric

# Empty slots between two groups, so Natural / Specialized / Structured read as three blocks.
GROUP_GAP = 1.0


def require_matplotlib():
    """The matplotlib module, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f'plotting needs matplotlib ({err}); install it with: pip install "visadapt[plot]"') from err
    return matplotlib


def _layout(benchmark: str) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """The x position of every task, and each group's (name, first x, last x) in column order."""
    positions: dict[str, float] = {}
    spans: list[tuple[str, float, float]] = []
    x = 0.0
    for name, info in benchmark_tasks(benchmark).items():
        if not spans or info.group != spans[-1][0]:
            if spans:
                x += GROUP_GAP
            spans.append((info.group, x, x))
        spans[-1] = (info.group, spans[-1][1], x)
        positions[name] = x
        x += 1.0
    return positions, spans


def plot_runs(results: Sequence[RunResult], benchmark: str, path: str | Path) -> Path:
    """Draws per-task accuracy of every run as grouped bars and writes the figure to ``path``.

    Tasks are in canonical column order, with a gap, a dashed separator and the group name between the
    Natural / Specialized / Structured blocks (FGVC has no groups). Each run is one colour, named in the legend;
    a task a run lacks stays empty. The format follows the file's extension, PNG when it has none.
    """
    if not results:
        raise ValueError("no run to plot; pass at least one run")
    for run in results:
        if run.benchmark != benchmark:
            raise ValueError(f"run {run.label!r} is {run.benchmark}, not {benchmark}; plot one benchmark at a time")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    tasks = benchmark_tasks(benchmark)
    positions, spans = _layout(benchmark)
    slots = max(positions.values()) + 1
    width = 0.8 / len(results)
    fig = Figure(figsize=(min(40.0, 2.5 + slots * (0.3 + 0.12 * len(results))), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, run in enumerate(results):
        offset = (i - (len(results) - 1) / 2) * width
        present = [name for name in tasks if name in run.results]
        ax.bar([positions[n] + offset for n in present], [run.results[n].accuracy for n in present],
               width=width, label=run.label)
    ax.set_xticks([positions[n] for n in tasks])
    ax.set_xticklabels([info.title for info in tasks.values()], rotation=45, ha="right")
    ax.set_xlim(-0.6, slots - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    above = blended_transform_factory(ax.transData, ax.transAxes)
    for k, (group, first, last) in enumerate(spans):
        if group is None:
            continue
        ax.text((first + last) / 2, 1.01, group, transform=above, ha="center", va="bottom", fontweight="bold")
        if k:
            ax.axvline(first - (GROUP_GAP + 1) / 2, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_title(f"{BENCHMARK_TITLES.get(benchmark, benchmark)}: {describe_metric(results[0].metric)}",
                 pad=22 if spans[0][0] is not None else 6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=None if path.suffix else "png", dpi=120, bbox_inches="tight")
    return path
