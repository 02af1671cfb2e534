"""``visadapt-eval --plot``: bars that carry the table's numbers and ± std, missing tasks marked missing, and
``--plot curves`` drawing each run's metrics.json history.

The pictures are checked through matplotlib's own objects (bar containers, error-bar segments, texts, lines), not
pixels; the expected numbers are worked out by hand next to the per-seed values.
"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")

from visadapt.eval.cli import main
from visadapt.eval.plot import MISSING_GID, MISSING_HEIGHT, collect_curves, draw_curves, draw_runs
from visadapt.eval.tables import collect_run, summarize

MINI = ["digits", "textures", "cells", "landcover", "count", "position", "orientation"]
TITLES = ["Digits", "Textures", "Cells", "Landcover", "Count", "Position", "Orientation"]
# Per task, the accuracy of seeds 0, 1, 2 (mean, sample std): digits (62, 2), textures (72, sqrt 12), cells (82, 2)
PER_SEED = {"digits": (60, 62, 64), "textures": (70, 70, 76), "cells": (80, 84, 82), "landcover": (50, 50, 50),
            "count": (30, 33, 36), "position": (40, 40, 40), "orientation": (20, 26, 20)}
EXPECTED_STD = {"digits": 2.0, "textures": math.sqrt(12), "cells": 2.0, "landcover": 0.0, "count": 3.0,
                "position": 0.0, "orientation": math.sqrt(12)}


def write_run(run_dir, per_seed, seeds=(0, 1, 2), history=None):
    """``<run_dir>/seed_<s>/<task>/metrics.json`` (or ``<run_dir>/<task>/`` when ``seeds`` is empty).

    ``history(task, seed)`` gives the per-epoch history recorded for that task and seed (none when it is None).
    """
    for i, seed in enumerate(seeds or [None]):
        for task, values in per_seed.items():
            task_dir = run_dir / (f"seed_{seed}/{task}" if seed is not None else task)
            task_dir.mkdir(parents=True)
            record = {"benchmark": "mini-vtab", "task": task, "seed": seed, "protocol": "final",
                      "accuracy_final": values[i], "accuracy_best": values[i]}
            if history is not None and history(task, seed) is not None:
                record["history"] = history(task, seed)
            (task_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


def bars_of(ax, label):
    """The BarContainer of the run labelled ``label`` (the legend label starts with it)."""
    found = [c for c in ax.containers if type(c).__name__ == "BarContainer" and c.get_label().startswith(label)]
    assert len(found) == 1, [c.get_label() for c in ax.containers]
    return found[0]


def test_bars_carry_the_table_values_its_seed_std_as_error_bars_and_mark_missing_tasks(tmp_path):
    full = collect_run(write_run(tmp_path / "mosa", PER_SEED), "mini-vtab")
    partial_seeds = {task: values[:2] for task, values in PER_SEED.items() if task != "cells"}
    partial = collect_run(write_run(tmp_path / "lora", partial_seeds, seeds=(0, 1)), "mini-vtab")
    fig = draw_runs([full, partial], "mini-vtab")
    ax = fig.axes[0]
    table = summarize(full)
    bars = bars_of(ax, "mosa")
    # per task then the average (mini-VTAB has groups: Mean (groups), Mean (tasks))
    heights = [patch.get_height() for patch in bars.patches]
    assert heights[:7] == pytest.approx([62, 72, 82, 50, 33, 40, 22])
    assert heights[7:] == pytest.approx([table.mean_groups, table.mean_tasks])
    # the error bars: each segment spans mean ± std, the std the table prints
    segments = bars.errorbar.lines[2][0].get_segments()
    half = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    assert half[:7] == pytest.approx([EXPECTED_STD[t] for t in MINI])
    assert half[:7] == pytest.approx([table.accuracy_std[t] for t in MINI])
    assert half[7:] == pytest.approx([table.mean_groups_std, table.mean_tasks_std])
    centres = [(seg[0][1] + seg[1][1]) / 2 for seg in segments]
    assert centres == pytest.approx(heights)
    # the run lacking cells has no bar there, but a hatched n/a outline of the marker height
    lora = bars_of(ax, "lora")
    assert len(lora.patches) == 6 + 2
    assert [round(h, 4) for h in [p.get_height() for p in lora.patches][:6]] == [61.0, 70.0, 50.0, 31.5, 40.0, 23.0]
    missing = [p for p in ax.patches if p.get_gid() == MISSING_GID]
    assert len(missing) == 1 and missing[0].get_height() == MISSING_HEIGHT and not missing[0].get_fill()
    cells_x = ax.get_xticks()[MINI.index("cells")]
    assert missing[0].get_x() < cells_x + 0.5 and missing[0].get_x() + missing[0].get_width() > cells_x
    assert not any(abs(p.get_x() + p.get_width() / 2 - (missing[0].get_x() + missing[0].get_width() / 2)) < 1e-9
                   for p in lora.patches)
    texts = [t.get_text() for t in ax.texts]
    assert "n/a" in texts
    # value labels on every bar: the value, with * on an average over incomplete tasks
    for value in ["62.0", "72.0", "82.0", "22.0", "61.0", "31.5"]:
        assert value in texts
    assert f"{summarize(partial).mean_tasks:.1f}*" in texts
    assert [t.get_text() for t in ax.get_xticklabels()] == [*TITLES, "Mean (groups)", "Mean (tasks)"]
    assert "mini-VTAB" in ax.get_title() and "± std over 2/3 seeds" in ax.get_title()
    assert ax.get_ylabel() == "top-1 accuracy (%)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["mosa (3 seeds, ± std)", "lora (2 seeds, ± std)"] and any("n/a" in t for t in legend)


def test_a_single_seed_run_has_no_error_bars(tmp_path):
    single = collect_run(write_run(tmp_path / "one", {t: (v[0],) for t, v in PER_SEED.items()}, seeds=()),
                         "mini-vtab")
    bars = bars_of(draw_runs([single], "mini-vtab").axes[0], "one")
    assert bars.errorbar is None and [p.get_height() for p in bars.patches][:3] == [60, 70, 80]


def curve_history(task, seed):
    """A made-up history, different per task and seed: loss 1/epoch + seed, accuracy 10 * epoch + seed."""
    if task == "count":
        return None  # trained by an older train/vtab.py: no history
    return [{"epoch": e, "train_loss": 1 / e + (seed or 0), "lr": 0.1, "accuracy": 10.0 * e + (seed or 0)}
            for e in (1, 2, 3)]


def test_curves_draw_one_line_per_run_and_seed_with_the_history_values(tmp_path, capsys):
    seeded = write_run(tmp_path / "mosa", PER_SEED, seeds=(0, 1, 2), history=curve_history)
    single = write_run(tmp_path / "lora", {t: (v[0],) for t, v in PER_SEED.items()}, seeds=(), history=curve_history)
    runs = [collect_run(seeded, "mini-vtab"), collect_run(single, "mini-vtab")]
    curves, notes = collect_curves(runs, "mini-vtab")
    assert any("count" in note and "no per-epoch history" in note for note in notes)
    fig = draw_curves(curves, "mini-vtab")
    axes = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    loss, accuracy = axes["loss:digits"], axes["accuracy:digits"]
    assert [line.get_label() for line in loss.lines] == ["mosa, seed 0", "mosa, seed 1", "mosa, seed 2", "lora"]
    for line, seed in zip(loss.lines, (0, 1, 2, 0)):
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == pytest.approx([1 + seed, 0.5 + seed, 1 / 3 + seed])
    for line, seed in zip(accuracy.lines, (0, 1, 2, 0)):
        assert list(line.get_ydata()) == pytest.approx([10 + seed, 20 + seed, 30 + seed])
    # one colour per run, seeds told apart by line style
    colors = [line.get_color() for line in loss.lines]
    assert len(set(colors[:3])) == 1 and colors[3] != colors[0]
    assert len({line.get_linestyle() for line in loss.lines[:3]}) == 3
    assert "count" not in " ".join(axes)  # no history anywhere: no panel
    assert accuracy.get_xlabel() == "epoch" and fig.axes[0].get_ylabel() == "train loss"
    # the CLI writes it, with the note on stderr, and still draws the bars of a plain --plot FILE
    code = main(["--benchmark", "mini-vtab", "--adapters", str(seeded), str(single), "--plot", str(tmp_path / "b.png"),
                 "--plot", "curves", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote curves to" in err and "wrote plot to" in err and "note:" in err and "count" in err


@pytest.mark.parametrize("plot, message", [
    (["curves"], "--plot curves needs the file to write too"),
    (["pie", "x.png"], "expected --plot FILE (per-task bars) or --plot KIND FILE"),
    (["curves", "a.png", "b.png"], "expected --plot FILE"),
])
def test_bad_plot_requests_are_one_error_line_before_any_output(tmp_path, capsys, plot, message):
    run = write_run(tmp_path / "lora", PER_SEED, history=curve_history)
    assert main(["--benchmark", "mini-vtab", "--adapters", str(run), "--csv", str(tmp_path / "t.csv"),
                 "--plot", *plot]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("error:") == 1
    assert not (tmp_path / "t.csv").exists()


def test_curves_of_runs_without_any_history_are_refused_before_any_output(tmp_path, capsys):
    run = write_run(tmp_path / "old", PER_SEED)
    assert main(["--benchmark", "mini-vtab", "--adapters", str(run), "--plot", "curves", str(tmp_path / "c.png"),
                 "--csv", str(tmp_path / "t.csv")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no run records a per-epoch history" in captured.err
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "t.csv").exists()


def test_a_malformed_history_names_the_file_and_the_entry(tmp_path, capsys):
    run = write_run(tmp_path / "bad", {"digits": (50,)}, seeds=(),
                    history=lambda task, seed: [{"epoch": 1, "train_loss": "nan?"}])
    assert main(["--benchmark", "mini-vtab", "--adapters", str(run), "--plot", "curves", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "digits/metrics.json: history entry 0 has train_loss='nan?', expected a finite number" in err
