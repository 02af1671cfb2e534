"""Seeds and honest numbers: mean ± std over seeds in visadapt-eval, and the validation-selected split.

Every expected number below was worked out by hand from the per-seed values next to it (the closed forms are
written out), not by the code under test.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from train_scripts import load_train_script

from visadapt import engine
from visadapt.data.procedural import generate_mini_vtab
from visadapt.engine import TrainConfig, fit, make_accelerator, validation_selected
from visadapt.eval.cli import main as eval_main
from visadapt.eval.tables import collect_run, summarize, to_csv, to_json, to_markdown

torch.set_num_threads(1)

MINI = ["digits", "textures", "cells", "landcover", "count", "position", "orientation"]
# Per task, the accuracy of seeds 0, 1, 2.
PER_SEED = {
    "digits": (60, 62, 64),       # mean 62, std 2
    "textures": (70, 70, 76),     # mean 72, deviations -2 -2 4: var 24/2 = 12, std sqrt(12)
    "cells": (80, 84, 82),        # mean 82, std 2
    "landcover": (50, 50, 50),    # mean 50, std 0
    "count": (30, 33, 36),        # mean 33, std 3
    "position": (40, 40, 40),     # mean 40, std 0
    "orientation": (20, 26, 20),  # mean 22, std sqrt(12)
}


def write_seeded_run(run_dir, per_seed=PER_SEED, seeds=(0, 1, 2), benchmark="mini-vtab", protocol="final",
                     **fields):
    """``<run_dir>/seed_<s>/<task>/metrics.json`` as train/vtab.py --seeds writes them."""
    for i, seed in enumerate(seeds):
        for task, values in per_seed.items():
            task_dir = run_dir / f"seed_{seed}" / task
            task_dir.mkdir(parents=True)
            record = {"benchmark": benchmark, "task": task, "seed": seed, "protocol": protocol, "eval_split": "test",
                      "accuracy_final": values[i], "accuracy_best": values[i] + 5, "adapter_params": 1000,
                      "trainable_params": 1100, "head_params": 100, "adapter_bytes": 4000}
            if protocol == "tune":
                record["accuracy_val_selected"] = values[i] - 10
            record.update(fields)
            (task_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


def test_mean_and_std_per_task_and_in_every_average(tmp_path):
    run = collect_run(write_seeded_run(tmp_path / "seeds"), "mini-vtab")
    assert run.seeds == (0, 1, 2) and run.n_seeds == 3
    s = summarize(run)
    assert s.accuracy == {"digits": 62, "textures": 72, "cells": 82, "landcover": 50, "count": 33, "position": 40,
                          "orientation": 22}
    assert s.accuracy_std["digits"] == pytest.approx(2.0)
    assert s.accuracy_std["textures"] == pytest.approx(math.sqrt(12))
    assert s.accuracy_std["landcover"] == 0.0 and s.accuracy_std["count"] == pytest.approx(3.0)
    # Group means per seed: Natural 65, 66, 70; Specialized 65, 67, 66; Structured 30, 33, 32.
    assert s.group_means["Natural"] == pytest.approx(67.0)
    assert s.group_means_std["Natural"] == pytest.approx(math.sqrt(7))       # (4 + 1 + 9) / 2
    assert s.group_means["Specialized"] == pytest.approx(66.0)
    assert s.group_means_std["Specialized"] == pytest.approx(1.0)             # (1 + 1 + 0) / 2
    assert s.group_means["Structured"] == pytest.approx(95 / 3)
    assert s.group_means_std["Structured"] == pytest.approx(math.sqrt(7 / 3))  # (25 + 16 + 1) / 9 / 2
    # Mean of the group means per seed: 160/3, 166/3, 168/3 -> mean 494/9, deviations -14/9, 4/9, 10/9.
    assert s.mean_groups == pytest.approx(494 / 9)
    assert s.mean_groups_std == pytest.approx(math.sqrt(312 / 81 / 2))
    # Mean over the 7 tasks per seed: 350/7, 365/7, 368/7 -> mean 1083/21, deviations -33/21, 12/21, 21/21.
    assert s.mean_tasks == pytest.approx(1083 / 21)
    assert s.mean_tasks_std == pytest.approx(math.sqrt(1674 / 441 / 2))
    # Not the mean of the per-task spreads (that would be 1.99): the spread of the average itself.
    assert s.mean_tasks_std == pytest.approx(1.3777, abs=1e-4)

    table = to_markdown([run])
    assert ("| seeds | 62.0 ± 2.0 | 72.0 ± 3.5 | 82.0 ± 2.0 | 50.0 ± 0.0 | 33.0 ± 3.0 | 40.0 ± 0.0 | 22.0 ± 3.5 "
            "| 67.0 ± 2.6 | 66.0 ± 1.0 | 31.7 ± 1.5 | 54.9 ± 1.4 | 51.6 ± 1.4 |") in table
    assert "sample standard deviation over seeds (n - 1 in the denominator)" in table
    assert "every average is computed per seed" in table and "seeds: 3 seeds (0, 1, 2)" in table


def test_csv_and_json_carry_mean_std_and_n(tmp_path):
    run = collect_run(write_seeded_run(tmp_path / "seeds"), "mini-vtab")
    row = next(csv.DictReader(io.StringIO(to_csv([run]))))
    assert row["digits"] == "62.0" and row["digits_std"] == "2.0" and row["textures_std"] == "3.4641"
    assert row["Natural"] == "67.0" and row["Natural_std"] == "2.6458"
    assert row["mean_groups"] == "54.8889" and row["mean_groups_std"] == "1.3878"
    assert row["mean_tasks"] == "51.5714" and row["mean_tasks_std"] == "1.3777"
    assert row["n_seeds"] == "3" and row["seeds"] == "0;1;2"
    data = json.loads(to_json([run]))
    assert "n - 1" in data["averages"]["std"]
    first = data["runs"][0]
    assert first["n_seeds"] == 3 and first["seeds"] == [0, 1, 2]
    assert first["accuracy"]["orientation"] == 22.0 and first["accuracy_std"]["orientation"] == 3.4641
    assert first["group_means_std"] == {"Natural": 2.6458, "Specialized": 1.0, "Structured": 1.5275}
    assert first["per_task"]["count"]["per_seed"] == [30, 33, 36] and first["per_task"]["count"]["seeds"] == [0, 1, 2]


def test_one_seed_prints_no_plus_minus(tmp_path):
    single = {task: (values[0],) for task, values in PER_SEED.items()}
    for run_dir in (write_seeded_run(tmp_path / "one", single, seeds=(7,)), tmp_path / "flat"):
        if run_dir.name == "flat":  # today's layout: <run>/<task>/metrics.json
            shutil.copytree(tmp_path / "one" / "seed_7", run_dir)
        run = collect_run(run_dir, "mini-vtab")
        s = summarize(run)
        assert s.n_seeds == 1 and s.mean_tasks == 50.0 and s.mean_tasks_std is None
        table = to_markdown([run])
        assert "±" not in table and "standard deviation" not in table
        row = next(csv.DictReader(io.StringIO(to_csv([run]))))
        assert row["n_seeds"] == "1" and row["digits_std"] == "" and row["mean_tasks_std"] == ""


def test_a_task_missing_for_one_seed_is_left_out_and_named(tmp_path):
    run_dir = write_seeded_run(tmp_path / "partial")
    shutil.rmtree(run_dir / "seed_2" / "count")
    (run_dir / "seed_3").mkdir()  # started, nothing finished: not a seed yet
    run = collect_run(run_dir, "mini-vtab")
    assert run.seeds == (0, 1, 2) and "count" not in run.results and run.missing == ["count"]
    assert any("task count is finished for seed(s) 0, 1 but not 2" in w for w in run.warnings)
    assert any("seed_3 holds no task yet" in w for w in run.warnings)
    # Structured per seed without count: (40 + 20) / 2, (40 + 26) / 2, (40 + 20) / 2 = 30, 33, 30.
    s = summarize(run)
    assert s.group_means["Structured"] == pytest.approx(31.0) and s.group_means_std["Structured"] == pytest.approx(
        math.sqrt(3))
    assert "Structured" in s.incomplete_groups


def test_seed_recorded_elsewhere_and_mixed_layouts_are_errors(tmp_path):
    run_dir = write_seeded_run(tmp_path / "bad", {"digits": (1, 2)}, seeds=(0, 1))
    record = json.loads((run_dir / "seed_1" / "digits" / "metrics.json").read_text())
    (run_dir / "seed_1" / "digits" / "metrics.json").write_text(json.dumps({**record, "seed": 5}))
    with pytest.raises(ValueError, match="records seed 5 but lies in seed_1"):
        collect_run(run_dir, "mini-vtab")
    both = write_seeded_run(tmp_path / "both", {"digits": (1,)}, seeds=(0,))
    (both / "digits").mkdir()
    with pytest.raises(ValueError, match="holds both seed directories"):
        collect_run(both, "mini-vtab")


# ---------------------------------------------------------------- the split a table shows


def test_cli_split_picks_the_protocol_and_refuses_to_mix(tmp_path, capsys):
    final = write_seeded_run(tmp_path / "final", {"digits": (60, 70)}, seeds=(0, 1))
    tune = write_seeded_run(tmp_path / "tune", {"digits": (60, 70)}, seeds=(0, 1), protocol="tune")
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(tune), "--split", "tune"]) == 0
    out = capsys.readouterr().out
    assert "validation-selected accuracy" in out.splitlines()[0] and "| tune | 55.0 ± 7.1 |" in out
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(final)]) == 0
    assert "| final | 65.0 ± 7.1 |" in capsys.readouterr().out

    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(final), str(tune)]) == 2
    assert "was trained with --split tune, not final" in capsys.readouterr().err
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(final), "--split", "tune"]) == 2
    assert "was trained with --split final, not tune" in capsys.readouterr().err
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(final), "--metric", "val-selected"]) == 2
    assert "no validation set to select by" in capsys.readouterr().err

    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(final), str(tune), "--mixed-protocols"]) == 0
    out = capsys.readouterr().out
    assert "| final | 65.0 ± 7.1 |" in out and "| tune | 65.0 ± 7.1 |" in out  # both: final-epoch test accuracy
    assert "Warning: the table mixes protocols" in out

    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(tune), "--split", "tune", "--metric", "best"]) == 0
    out = capsys.readouterr().out
    assert "best-on-test (optimistic)" in out.splitlines()[0] and "| tune | 70.0 ± 7.1 |" in out


def test_old_tune_records_on_val200_are_refused(tmp_path, capsys):
    old = write_seeded_run(tmp_path / "old", {"digits": (60,)}, seeds=(0,), protocol="tune", eval_split="val200")
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(old), "--split", "tune"]) == 2
    assert "val200 accuracies of an older train/vtab.py --split tune" in capsys.readouterr().err


# ---------------------------------------------------------------- validation-selected training


def test_validation_selected_takes_the_best_validation_entry_not_the_best_test():
    history = [
        {"epoch": 1, "accuracy": 50.0, "test_accuracy": 70.0},
        {"epoch": 2, "accuracy": 80.0, "test_accuracy": 65.0},  # best validation
        {"epoch": 3, "accuracy": 60.0, "test_accuracy": 90.0},  # best test: never chosen
        {"epoch": 4, "accuracy": 80.0, "test_accuracy": 85.0},  # ties epoch 2: the earlier one stays
        {"epoch": 5, "train_loss": 0.1},                        # not evaluated
    ]
    assert validation_selected(history)["epoch"] == 2 and validation_selected(history)["test_accuracy"] == 65.0
    assert validation_selected(history, "test_accuracy")["epoch"] == 3
    assert validation_selected([{"epoch": 1}]) is None


def _scripted_fit(monkeypatch, output_dir, epochs, val_scores, test_scores, resume=False):
    """fit on a linear model whose validation/test accuracies are scripted; returns (result, model, snapshots)
    where snapshots[k] is the weight at the k-th validation evaluation."""
    val, test, snapshots = iter(val_scores), iter(test_scores), []

    def scripted(model, loader, accelerator, expected, transform=None, **progress):
        if expected == 6:  # the validation set
            snapshots.append(accelerator.unwrap_model(model).weight.detach().clone())
            return {"accuracy": next(val), "samples": 6}
        return {"accuracy": next(test), "samples": 10}

    monkeypatch.setattr(engine, "evaluate", scripted)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    val_set = TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    test_set = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    config = TrainConfig(epochs=epochs, lr=0.1, batch_size=4, warmup_epochs=0, eval_every=1, keep_checkpoints=10,
                         progress=False)
    result = fit(model, data, val_set, config, accelerator=make_accelerator(None, log_with=None),
                 output_dir=output_dir, resume=resume, test_dataset=test_set, keep_best=True)
    return result, model, snapshots


def test_fit_keep_best_restores_the_validation_selected_adapter_and_reports_its_test(monkeypatch, tmp_path):
    result, model, snapshots = _scripted_fit(monkeypatch, tmp_path / "run", 4, [50, 80, 60, 80], [70, 65, 90, 85])
    assert [h["test_accuracy"] for h in result.history] == [70, 65, 90, 85]
    assert result.best_epoch == 2 and result.test_at_best == 65 and result.test_best == 90
    assert result.test_final == 85 and result.restored_best
    assert torch.equal(model.weight, snapshots[1])  # the weights evaluated at epoch 2, not the last ones
    assert not torch.equal(snapshots[1], snapshots[3])

    # A run resumed after epoch 3 gets the kept state back from the checkpoint, not from memory.
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 4 and all((c / "selected.safetensors").is_file() for c in checkpoints)
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(checkpoints[2], resumed / checkpoints[2].name)
    again, model2, _ = _scripted_fit(monkeypatch, tmp_path / "resumed", 4, [80], [85], resume=True)
    assert again.resumed_from.endswith(checkpoints[2].name) and again.best_epoch == 2 and again.test_at_best == 65
    assert torch.equal(model2.weight, snapshots[1])


def test_train_vtab_tune_saves_the_adapter_whose_number_it_reports(tmp_path, capsys):
    """--split tune end to end: val200 and test at every epoch, the reported number is the test accuracy at the
    best validation epoch, and the saved file, re-evaluated on test, gives exactly that number."""
    data = generate_mini_vtab(tmp_path / "data", seed=0, split_sizes={"train800": 16, "val200": 12, "test": 20})
    vtab = load_train_script("vtab")
    run = tmp_path / "run"
    assert vtab.main(["--data-root", str(data), "--output-dir", str(run), "--no-progress", "--pretrained", "none",
                      "--task", "cells", "--epochs", "3", "--eval-every", "1", "--batch-size", "8", "--lr", "3e-2",
                      "--warmup-epochs", "0", "--split", "tune", "--seeds", "3"]) == 0
    m = json.loads((run / "seed_3" / "cells" / "metrics.json").read_text())
    assert m["seed"] == 3 and m["protocol"] == "tune" and m["train_split"] == "train800"
    assert m["selection_split"] == "val200" and m["selection_samples"] == 12 and m["eval_samples"] == 20
    assert all({"val_accuracy", "accuracy"} <= set(h) for h in m["history"])
    chosen = max(m["history"], key=lambda h: h["val_accuracy"])  # max returns the first of equals
    assert m["val_selected_epoch"] == chosen["epoch"] and m["accuracy_val_selected"] == chosen["accuracy"]
    assert m["accuracy_final"] == m["history"][-1]["accuracy"]
    assert m["accuracy_best"] == max(h["accuracy"] for h in m["history"])
    assert m["adapter_checkpoint"] == f"validation-selected (epoch {chosen['epoch']})"
    capsys.readouterr()
    out_json = tmp_path / "re.json"
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(run), "--data-root", str(data), "--json",
                      str(out_json)]) == 0
    row = json.loads(out_json.read_text())["runs"][0]
    assert row["seeds"] == [3] and row["per_task"]["cells"]["accuracy"] == pytest.approx(m["accuracy_val_selected"])
