"""``visadapt-eval`` tables: the averages against hand-computed numbers, missing tasks, CSV/JSON, the CLI.

Every expected number below was worked out by hand from the per-task values next to it, not by the code under
test.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from visadapt.eval.cli import main
from visadapt.eval.tables import collect_run, summarize, to_csv, to_json, to_markdown

VTAB_NATURAL = ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"]
VTAB_SPECIALIZED = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
VTAB_STRUCTURED = ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"]
FGVC = ["cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]
MINI = ["digits", "textures", "cells", "landcover", "count", "position", "orientation"]


def write_run(run_dir, benchmark, accuracies, **fields):
    """``<run_dir>/<dir>/metrics.json`` for each ``dir: accuracy``; ``fields[dir]`` overrides entries."""
    for name, accuracy in accuracies.items():
        task_dir = run_dir / name
        task_dir.mkdir(parents=True)
        record = {"benchmark": benchmark, "task": name, "accuracy_final": accuracy, "accuracy_best": accuracy + 1,
                  "adapter_params": 1000, "trainable_params": 1100, "head_params": 100, "adapter_bytes": 4000,
                  "protocol": "final", "epochs": 10}
        record.update(fields.get(name, {}))
        (task_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


def vtab_easy(run_dir):
    # Natural 70..82 step 2 -> mean 76; Specialized 80, 84, 86, 90 -> 85; Structured 40..54 step 2 -> 47.
    accuracies = dict(zip(VTAB_NATURAL, [70, 72, 74, 76, 78, 80, 82]))
    accuracies |= dict(zip(VTAB_SPECIALIZED, [80, 84, 86, 90]))
    accuracies |= dict(zip(VTAB_STRUCTURED, [40, 42, 44, 46, 48, 50, 52, 54]))
    return write_run(run_dir, "vtab", accuracies)


def test_vtab_group_means_and_both_averages(tmp_path):
    run = collect_run(vtab_easy(tmp_path / "full"), "vtab")
    s = summarize(run)
    assert s.group_means == {"Natural": 76.0, "Specialized": 85.0, "Structured": 47.0}
    assert s.mean_groups == pytest.approx(69.3333, abs=1e-4)  # (76 + 85 + 47) / 3 = 208 / 3
    assert s.mean_tasks == pytest.approx(65.6842, abs=1e-4)  # (532 + 340 + 376) / 19 = 1248 / 19
    assert s.missing == () and s.incomplete_groups == ()
    table = to_markdown([run])
    assert "| full | 70.0 | 72.0 | 74.0 | 76.0 | 78.0 | 80.0 | 82.0 | 80.0 | 84.0 |" in table
    assert "| 54.0 | 76.0 | 85.0 | 47.0 | 69.3 | 65.7 | 0.00100 | 0.00110 | 4.0 KB |" in table
    assert "| Natural | Specialized | Structured | Mean (groups) | Mean (tasks) | Params (M) |" in table
    assert "| Run | CIFAR-100 | Caltech101 | DTD | Flowers102 | Pets |" in table
    assert "final-epoch accuracy" in table.splitlines()[0]
    assert "*" not in table


def test_spec_worked_example_full_ft(tmp_path):
    # Group sums of V-PETL's Full-FT row (spec 3.5): Natural 531.2, Specialized 333.5, Structured 381.1.
    accuracies = dict(zip(VTAB_NATURAL, [75.0] * 6 + [81.2]))  # 450 + 81.2
    accuracies |= dict(zip(VTAB_SPECIALIZED, [83.0, 83.0, 83.0, 84.5]))  # 249 + 84.5
    accuracies |= dict(zip(VTAB_STRUCTURED, [47.0] * 7 + [52.1]))  # 329 + 52.1
    s = summarize(collect_run(write_run(tmp_path / "ft", "vtab", accuracies), "vtab"))
    assert round(s.mean_groups, 2) == 68.97
    assert round(s.mean_tasks, 2) == 65.57


def test_best_metric_is_labelled_optimistic(tmp_path):
    run = collect_run(vtab_easy(tmp_path / "r"), "vtab", metric="best")
    assert summarize(run).group_means["Natural"] == 77.0  # every accuracy_best is accuracy_final + 1
    assert "best-on-test (optimistic)" in to_markdown([run]).splitlines()[0]


def test_aliases_missing_tasks_and_stray_directories(tmp_path):
    accuracies = dict(zip(["digits", "textures", "landcover", "count", "position", "orientation"],
                          [60, 70, 80, 30, 40, 50]))
    run_dir = write_run(tmp_path / "partial", "mini-vtab", accuracies)
    (run_dir / "notes").mkdir()
    (run_dir / "cells").mkdir()  # training started but wrote nothing
    (run_dir / "train.log").write_text("files are not tasks")
    run = collect_run(run_dir, "mini-vtab")
    s = summarize(run)
    assert s.missing == ("cells",) and s.incomplete_groups == ("Specialized",)
    assert s.group_means == {"Natural": 65.0, "Specialized": 80.0, "Structured": 40.0}
    assert s.mean_groups == pytest.approx(61.6667, abs=1e-4)  # (65 + 80 + 40) / 3
    assert s.mean_tasks == 55.0  # 330 / 6
    table = to_markdown([run])
    assert "| partial | 60.0 | 70.0 | — | 80.0 | 30.0 | 40.0 | 50.0 | 65.0 | 80.0* | 40.0 | 61.7* | 55.0* |" in table
    assert "Missing tasks: partial: Cells (1 of 7)." in table
    assert "notes is not a task of mini-vtab" in table
    assert "cells has no metrics.json" in table

    vtab_dir = write_run(tmp_path / "aliases", "vtab", {"cifar": 50.0, "pets": 60.0},
                         cifar={"task": "cifar100"}, pets={"task": "oxford_iiit_pet"})
    s = summarize(collect_run(vtab_dir, "vtab"))
    assert s.accuracy["cifar100"] == 50.0 and s.accuracy["oxford_iiit_pet"] == 60.0
    assert s.group_means == {"Natural": 55.0, "Specialized": None, "Structured": None}
    assert s.mean_groups == 55.0 and len(s.missing) == 17
    row = next(line for line in to_markdown([collect_run(vtab_dir, "vtab")]).splitlines() if "| aliases" in line)
    assert "| 55.0* | — | — | 55.0* | 55.0* |" in row


def test_fgvc_plain_mean_params_and_bytes(tmp_path):
    accuracies = dict(zip(FGVC, [85.0, 80.0, 98.0, 90.0, 87.0]))  # 440 / 5 = 88
    fields = {name: {"adapter_params": 200_000, "head_params": head, "trainable_params": 200_000 + head,
                     "adapter_bytes": size}
              for name, head, size in zip(FGVC, [1000, 2000, 3000, 4000, 5000], [4e5, 4e5, 4e5, 4e5, 9e5])}
    run = collect_run(write_run(tmp_path / "vpt", "fgvc", accuracies, **fields), "fgvc")
    s = summarize(run)
    assert s.group_means == {} and s.mean_groups is None and s.mean_tasks == 88.0
    assert s.adapter_params == 200_000 and s.trainable_params == 203_000 and s.adapter_bytes == 500_000
    table = to_markdown([run])
    assert "| Run | CUB-200-2011 | NABirds | Flowers | Dogs | Cars | Mean | Params (M) | Trainable (M) | Size |" in table
    assert "| vpt | 85.0 | 80.0 | 98.0 | 90.0 | 87.0 | 88.0 | 0.200 | 0.203 | 500.0 KB |" in table
    assert "Mean = plain mean over the 5 datasets" in table and "Mean (groups)" not in table


def test_head_is_excluded_from_params_when_only_totals_are_recorded(tmp_path):
    fields = {"cub": {"adapter_params": None, "trainable_params": 5_500_000, "head_params": 500_000}}
    s = summarize(collect_run(write_run(tmp_path / "r", "fgvc", {"cub": 80.0}, **fields), "fgvc"))
    assert s.adapter_params == 5_000_000 and s.trainable_params == 5_500_000


def test_csv_and_json(tmp_path):
    full = collect_run(vtab_easy(tmp_path / "full"), "vtab")
    half = collect_run(write_run(tmp_path / "half", "vtab", {"dtd": 61.0, "eurosat": 95.0}), "vtab")
    rows = list(csv.DictReader(io.StringIO(to_csv([full, half]))))
    assert [r["label"] for r in rows] == ["full", "half"]
    assert rows[0]["cifar100"] == "70.0" and rows[0]["Natural"] == "76.0" and rows[0]["mean_groups"] == "69.3333"
    assert rows[0]["mean_tasks"] == "65.6842" and rows[0]["missing"] == "" and rows[0]["metric"] == "final"
    assert rows[1]["dtd"] == "61.0" and rows[1]["cifar100"] == "" and rows[1]["Structured"] == ""
    assert rows[1]["mean_groups"] == "78.0" and rows[1]["mean_tasks"] == "78.0"  # (61 + 95) / 2
    assert rows[1]["missing"].split(";")[:3] == ["cifar100", "caltech101", "oxford_flowers102"]
    assert rows[1]["adapter_params"] == "1000.0" and rows[1]["adapter_bytes"] == "4000.0"

    data = json.loads(to_json([full, half]))
    assert data["benchmark"] == "vtab" and data["metric"] == "final" and data["protocol"] == "final"
    assert data["metric_description"] == "final-epoch accuracy"
    assert [t["name"] for t in data["tasks"]] == VTAB_NATURAL + VTAB_SPECIALIZED + VTAB_STRUCTURED
    first, second = data["runs"]
    assert first["group_means"] == {"Natural": 76.0, "Specialized": 85.0, "Structured": 47.0}
    assert first["mean_groups"] == 69.3333 and first["mean_tasks"] == 65.6842 and first["missing"] == []
    assert second["accuracy"]["cifar100"] is None and len(second["missing"]) == 17
    assert second["incomplete_groups"] == ["Natural", "Specialized", "Structured"]
    assert second["per_task"]["dtd"]["head_params"] == 100 and second["trainable_params"] == 1100
    assert second["per_task"]["dtd"]["protocol"] == "final" and second["per_task"]["dtd"]["eval_samples"] is None


def test_records_that_disagree_with_their_place_are_errors(tmp_path):
    wrong_bench = write_run(tmp_path / "a", "mini-vtab", {"dtd": 50.0})
    with pytest.raises(ValueError, match=r"a/dtd/metrics.json is for benchmark 'mini-vtab', not 'vtab'"):
        collect_run(wrong_bench, "vtab")
    wrong_task = write_run(tmp_path / "b", "vtab", {"dtd": 50.0}, dtd={"task": "svhn"})
    with pytest.raises(ValueError, match="is for task 'svhn' but lies in the directory of task 'dtd'"):
        collect_run(wrong_task, "vtab")
    twice = write_run(tmp_path / "c", "vtab", {"cifar": 50.0, "cifar100": 51.0}, cifar={"task": "cifar100"})
    with pytest.raises(ValueError, match="both hold task 'cifar100'"):
        collect_run(twice, "vtab")
    no_best = write_run(tmp_path / "d", "vtab", {"dtd": 50.0}, dtd={"accuracy_best": None})
    with pytest.raises(ValueError, match="'accuracy_best' is None"):
        collect_run(no_best, "vtab", metric="best")
    with pytest.raises(ValueError, match="single task"):
        collect_run(tmp_path / "b" / "dtd", "vtab")


# ---------------------------------------------------------------- CLI


def test_cli_prints_table_and_writes_csv_json_plot(tmp_path, capsys):
    runs = [vtab_easy(tmp_path / "full"), write_run(tmp_path / "half", "vtab", {"dtd": 61.0, "eurosat": 95.0})]
    out_csv, out_json, out_png = tmp_path / "o" / "t.csv", tmp_path / "o" / "t.json", tmp_path / "o" / "t.png"
    code = main(["--benchmark", "vtab", "--adapters", *map(str, runs), "--labels", "Full FT", "Half",
                 "--csv", str(out_csv), "--json", str(out_json), "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| Full FT | 70.0 |" in captured.out and "| 76.0 | 85.0 | 47.0 | 69.3 | 65.7 |" in captured.out
    assert "| Half | — | — | 61.0 |" in captured.out and "Missing tasks: Half: CIFAR-100, Caltech101" in captured.out
    assert f"wrote CSV to {out_csv}" in captured.err and f"wrote plot to {out_png}" in captured.err
    assert out_csv.read_text().startswith("label,path,metric,cifar100,")
    assert json.loads(out_json.read_text())["runs"][1]["label"] == "Half"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 1000


def test_cli_same_directory_names_get_their_paths_as_labels(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "lora", "fgvc", {"cub": 80.0})
    b = write_run(tmp_path / "b" / "lora", "fgvc", {"cub": 70.0})
    assert main(["--benchmark", "fgvc", "--adapters", str(a), str(b), "--metric", "best"]) == 0
    out = capsys.readouterr().out
    assert f"| {a} | 81.0 |" in out and f"| {b} | 71.0 |" in out and "best-on-test" in out


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "nope")], "nope does not exist"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "empty")], "empty has no directory for any task"),
    (lambda t: ["--benchmark", "vtab2", "--adapters", str(t / "run")], "invalid choice: 'vtab2'"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "run"), "--labels", "x", "y"],
     "--labels gives 2 labels for 1 --adapters paths"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "a.safetensors")], "add --data-root ROOT"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "mis")], "is for benchmark 'mini-vtab', not 'vtab'"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "run"), "--tasks", "cifar1000"], "no task 'cifar1000'"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "run"), "--protocol", "tune"], "add --data-root"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "run"), "--data-root", str(t), "--metric", "best"],
     "drop one of the two"),
    (lambda t: ["--benchmark", "vtab", "--adapters", str(t / "run"), "--data-root", str(t / "nodata")],
     "nodata is not a directory"),
])
def test_cli_bad_input_is_one_message_and_exit_2(tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "run" / "dtd").mkdir(parents=True)
    (tmp_path / "run" / "dtd" / "metrics.json").write_text(json.dumps({"benchmark": "vtab", "accuracy_final": 5}))
    write_run(tmp_path / "mis", "mini-vtab", {"dtd": 50.0})
    assert main(make_args(tmp_path)) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_cli_quiet_on_closed_pipe(tmp_path, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(["--benchmark", "vtab", "--adapters", str(vtab_easy(tmp_path / "r"))]) == 0


def test_cli_reevaluates_adapter_files(tmp_path, capsys):
    run_dir = tmp_path / "lora"
    for name in ["digits", "cells", "count"]:
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "adapter.safetensors").write_bytes(b"fake")
    (run_dir / "position").mkdir()  # no adapter file yet
    single = tmp_path / "other.safetensors"
    single.write_bytes(b"fake")
    scores = {"digits": 90.0, "cells": 70.0, "count": 50.0}
    calls = []

    def fake_evaluate(path, data_root, *, benchmark=None, task=None, protocol="final", batch_size=128,
                      normalize=None):
        calls.append((path.name, path.parent.name, task, protocol, batch_size))
        task = task or "textures"  # what the file's own metadata would say
        return {"benchmark": benchmark, "task": task, "accuracy": scores.get(task, 40.0), "eval_samples": 500,
                "trainable_params": 2100, "adapter_params": 2000, "head_params": 100, "adapter_bytes": 9000}

    args = ["--benchmark", "mini-vtab", "--adapters", str(run_dir), str(single), "--data-root", str(tmp_path),
            "--protocol", "tune", "--batch-size", "32"]
    assert main(args, evaluate=fake_evaluate) == 0
    captured = capsys.readouterr()
    assert calls == [("adapter.safetensors", "digits", "digits", "tune", 32),
                     ("adapter.safetensors", "cells", "cells", "tune", 32),
                     ("adapter.safetensors", "count", "count", "tune", 32),
                     ("other.safetensors", tmp_path.name, None, "tune", 32)]
    lines = captured.out.splitlines()
    assert "re-evaluated from adapter files; protocol tune" in lines[0]
    # Natural 90; Specialized 70; Structured 50 -> mean of groups 70.0, mean of tasks 210 / 3 = 70.0.
    assert "| lora | 90.0 | — | 70.0 | — | 50.0 | — | — | 90.0* | 70.0* | 50.0* | 70.0* | 70.0* |" in captured.out
    assert "| other | — | 40.0 | — | — | — | — | — | 40.0* | — | — | 40.0* | 40.0* |" in captured.out
    assert "position has no adapter.safetensors" in captured.out
    assert "evaluating" in captured.err


def test_cli_default_evaluator_is_visadapt_engine(tmp_path, capsys, monkeypatch):
    (tmp_path / "run" / "cub").mkdir(parents=True)
    (tmp_path / "run" / "cub" / "adapter.safetensors").write_bytes(b"fake")
    engine = types.ModuleType("visadapt.engine")
    engine.evaluate_adapter_file = lambda path, root, **kw: {"benchmark": kw["benchmark"], "task": kw["task"],
                                                              "accuracy": 66.6, "adapter_bytes": 2_500_000}
    monkeypatch.setitem(sys.modules, "visadapt.engine", engine)
    assert main(["--benchmark", "fgvc", "--adapters", str(tmp_path / "run"), "--data-root", str(tmp_path)]) == 0
    assert "| run | 66.6 | — | — | — | — | 66.6* | — | — | 2.5 MB* |" in capsys.readouterr().out


def test_cli_refuses_adapter_of_another_benchmark_before_evaluating(tmp_path, capsys):
    # oxford_flowers102 is a VTAB task and an FGVC alias: only the file's own record tells the two apart.
    adapter = tmp_path / "fgvc-run" / "oxford_flowers102" / "adapter.safetensors"
    adapter.parent.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(adapter),
              metadata={"visadapt.train": json.dumps({"benchmark": "fgvc", "task": "oxford_flowers"})})

    def never(*args, **kwargs):
        raise AssertionError("evaluated an adapter of another benchmark")

    args = ["--benchmark", "vtab", "--adapters", str(adapter.parent.parent), "--data-root", str(tmp_path)]
    assert main(args, evaluate=never) == 2
    assert "adapter.safetensors was trained on fgvc, not vtab; pass --benchmark fgvc" in capsys.readouterr().err


def test_cli_evaluator_errors_name_the_file(tmp_path, capsys):
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"fake")

    def broken(path, data_root, **kwargs):
        raise ValueError("fgvc has no task 'digits'")

    assert main(["--benchmark", "fgvc", "--adapters", str(adapter), "--data-root", str(tmp_path)],
                evaluate=broken) == 2
    assert f"evaluating {adapter}: fgvc has no task 'digits'" in capsys.readouterr().err
