"""train/dense.py end to end on a few procedural scenes, and visadapt-eval --benchmark dense (issue 8)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_scripts import load_train_script

import visadapt
from visadapt.backbones import EMBEDDED_SWIN, create_backbone
from visadapt.data.dense import ProceduralDenseScenes
from visadapt.dense import MultiTaskDenseModel, attach_dense_method, evaluate_dense
from visadapt.eval import cli as eval_cli

torch.set_num_threads(1)

TINY = ["--train-samples", "16", "--val-samples", "8", "--epochs", "2", "--batch-size", "8", "--eval-every", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def dense():
    return load_train_script("dense")


@pytest.fixture(scope="module")
def runs(dense, tmp_path_factory):
    """Three runs shared by the tests: Polyhistor-Lite, per-task adapters, and the single-task reference."""
    root = tmp_path_factory.mktemp("dense")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISADAPT_CACHE", str(root / "cache"))
        for method, extra in (("lite", []), ("per-task", []), ("full", ["--single-task", "--tasks", "semseg", "sal"])):
            out = root / method
            assert dense.main(["--method", method, "--output-dir", str(out), *TINY, *extra]) == 0
    return root


def test_metrics_record_every_task_and_the_parameter_split(runs):
    record = json.loads((runs / "lite" / "metrics.json").read_text())
    assert record["tasks"] == ["semseg", "human_parts", "sal", "normals"]
    assert set(record["results"]["semseg"]) >= {"mIoU"} and "maxF" in record["results"]["sal"]
    assert 0.0 <= record["results"]["normals"]["mean"] <= 180.0
    assert record["trainable_params"] == (record["adapter_params"] + record["stage_norm_params"]
                                          + record["decoder_params"])
    assert record["plugin_configs"]["default"]["variant"] == "lite"
    assert len(record["history"]) == 2 and "semseg/mIoU" in record["history"][-1]
    per_task = json.loads((runs / "per-task" / "metrics.json").read_text())
    assert sorted(per_task["files"]) == sorted([f"adapter-{t}.safetensors" for t in record["tasks"]]
                                               + ["heads.safetensors"])
    # the embedded recipe keeps Lite's adapter far below one adapter per task, as the paper's Swin-T numbers
    assert record["adapter_params"] < 0.2 * per_task["adapter_params"]


def test_saved_files_rebuild_the_trained_model(runs):
    """adapter.safetensors + heads.safetensors give back the metrics the run recorded."""
    out = runs / "lite"
    record = json.loads((out / "metrics.json").read_text())
    backbone = create_backbone(EMBEDDED_SWIN, "default", num_classes=0)
    visadapt.load_adapter(backbone, out / "adapter.safetensors")
    from visadapt.plugins.polyhistor import set_task

    heads = load_file(str(out / "heads.safetensors"))
    task_outputs = {"semseg": 6, "human_parts": 5, "sal": 1, "normals": 3}
    model = MultiTaskDenseModel(backbone, task_outputs, lambda task: set_task(backbone, task))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISADAPT_CACHE", str(runs / "cache"))
        norm = record["normalization"]
        assert norm["choice"] == "model" and norm["mean"] == [0.5, 0.5, 0.5]  # the embedded Swin's own statistics
        val = ProceduralDenseScenes("val", num_samples=8, normalization=(norm["mean"], norm["std"]))
    results = evaluate_dense(model, val, batch_size=8)
    for task, result in results.items():
        scalars = {k: v for k, v in result.items() if isinstance(v, float)}
        assert scalars and scalars == pytest.approx({k: record["results"][task][k] for k in scalars}, abs=1e-3,
                                                    nan_ok=True), task


def test_single_task_reference_and_the_eval_table(runs, capsys):
    reference = json.loads((runs / "full" / "metrics.json").read_text())
    assert reference["single_task"] and set(reference["results"]) == {"semseg", "sal"}
    assert (runs / "full" / "semseg" / "backbone.safetensors").is_file()
    assert eval_cli.main(["--benchmark", "dense", "--adapters", str(runs / "full"), "--reference",
                          str(runs / "full")]) == 0
    table = capsys.readouterr().out
    assert "| full |" in table and "+0.00" in table  # the reference against itself
    # runs over other tasks than the reference's: Δm needs every task, so it shows as missing, never invented
    assert eval_cli.main(["--benchmark", "dense", "--adapters", str(runs / "lite"), str(runs / "per-task"),
                          "--labels", "Lite", "per-task", "--reference", "pascal"]) == 0
    table = capsys.readouterr().out
    assert "| Lite |" in table and "PASCAL-Context" in table


def test_bad_method_fields_fail_before_any_work(dense, capsys):
    assert dense.main(["--method", "lite", "--set", "variantt=lite"]) == 2
    assert "variantt" in capsys.readouterr().err
    assert dense.main(["--method", "decoder", "--set", "reduction_factor=2"]) == 2
    assert "attaches no adapter" in capsys.readouterr().err


def test_per_task_adapters_switch_with_the_task():
    backbone = create_backbone(EMBEDDED_SWIN, "none", num_classes=0)
    select, configs = attach_dense_method(backbone, "per-task", ["semseg", "sal"], {"reduction_factor": 4})
    assert set(configs) == {"semseg", "sal"}
    select("sal")
    assert visadapt.active_adapters(backbone) == ["sal"]
    widths = {item.module.site_widths[0]: item.module for item in visadapt.inject.attached(backbone, "sal")}
    assert {w: m.down.out_features for w, m in widths.items()} == {24: 6, 48: 12, 96: 24, 192: 48}


def test_eval_refuses_options_of_other_tables(runs, capsys):
    assert eval_cli.main(["--benchmark", "dense", "--adapters", str(runs / "lite"), "--split", "tune"]) == 2
    assert "does not apply to --benchmark dense" in capsys.readouterr().err
    assert eval_cli.main(["--benchmark", "dense", "--adapters", str(Path(runs) / "nowhere")]) == 2


# ------------------------------------------------------------------ --init-adapter

ONE_EPOCH = ["--train-samples", "8", "--val-samples", "4", "--epochs", "1", "--batch-size", "8", "--eval-every", "1",
             "--no-progress", "--tasks", "semseg", "sal"]


def trained_looking_files(dense, folder: Path, method: str, *extra: str) -> dict[str, Path]:
    """``{adapter name: file}``: the adapters a ``method`` run of ``dense`` attaches (its exact plugin config), every
    tensor redrawn at scale 0.1 (a fresh bottleneck's up-projection is zero, so a fresh start cannot pass for it)."""
    args = dense.parse_args(["--method", method, *ONE_EPOCH, *extra])
    backbone = create_backbone(EMBEDDED_SWIN, "default", num_classes=0)
    _, configs = attach_dense_method(backbone, method, args.tasks, dense.plugin_fields(args))
    generator = torch.Generator().manual_seed(0)
    files = {}
    for name in configs:
        with torch.no_grad():
            for item in visadapt.inject.attached(backbone, name):
                for param in item.module.parameters():
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        files[name] = visadapt.save_adapter(backbone, folder / f"{method}-{name}.safetensors", adapter_name=name)
    return files


def _max_difference(first: Path, second: Path) -> float:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_a_run_starts_its_adapters_from_init_adapter_files(dense, tmp_path, monkeypatch):
    """At a negligible learning rate the trained adapters are the files' (to 1e-6): lite's one adapter from
    ``--init-adapter FILE``; per-task's semseg adapter from ``semseg=FILE`` while its sal adapter, not named,
    starts fresh (its up-projection still near zero)."""
    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    lite = trained_looking_files(dense, tmp_path, "lite")["default"]
    out = tmp_path / "lite"
    assert dense.main(["--method", "lite", *ONE_EPOCH, "--lr", "1e-12", "--output-dir", str(out),
                       "--init-adapter", str(lite)]) == 0
    assert _max_difference(lite, out / "adapter.safetensors") < 1e-6
    assert json.loads((out / "metrics.json").read_text())["init_adapter"] == {"default": str(lite)}
    per_task = trained_looking_files(dense, tmp_path, "per-task")
    out = tmp_path / "per-task"
    assert dense.main(["--method", "per-task", *ONE_EPOCH, "--lr", "1e-12", "--output-dir", str(out),
                       "--init-adapter", f"semseg={per_task['semseg']}"]) == 0
    assert _max_difference(per_task["semseg"], out / "adapter-semseg.safetensors") < 1e-6
    fresh = load_file(str(out / "adapter-sal.safetensors"))
    up = [k for k in fresh if ".up." in k]
    assert up and all(fresh[k].abs().max() < 1e-6 for k in up)
    assert json.loads((out / "metrics.json").read_text())["init_adapter"] == {"semseg": str(per_task["semseg"])}


def test_init_adapter_forms_that_do_not_fit_the_run_are_refused_before_any_output(dense, tmp_path, capsys):
    per_task = trained_looking_files(dense, tmp_path, "per-task")
    semseg = per_task["semseg"]
    lite = trained_looking_files(dense, tmp_path, "lite")["default"]  # Polyhistor-Lite on semseg and sal
    out = tmp_path / "run"
    base = [*ONE_EPOCH, "--output-dir", str(out)]
    cases = [
        (["--method", "per-task", "--init-adapter", str(semseg)],
         f"per-task trains one adapter per task; name the task the file starts, e.g. --init-adapter semseg={semseg}"),
        (["--method", "lite", "--single-task", "--init-adapter", str(semseg)], "--single-task trains a model per task"),
        (["--method", "per-task", "--init-adapter", f"normals={semseg}"], "does not train task 'normals'"),
        (["--method", "shared", "--init-adapter", f"semseg={semseg}"],
         f"trains one adapter for every task; pass the file alone: --init-adapter {semseg}"),
        (["--method", "shared", "--init-adapter", str(semseg), "--init-adapter", str(semseg)], "given twice"),
        (["--method", "decoder", "--init-adapter", str(semseg)], "method 'decoder' attaches no adapter"),
        (["--method", "lite", "--init-adapter", str(semseg)], "holds a 'adapter' adapter; this run trains 'polyhistor'"),
        (["--method", "per-task", "--set", "reduction_factor=2", "--init-adapter", f"sal={semseg}"],
         "reduction_factor: file 4, run 2"),
        (["--method", "per-task", "--init-adapter", f"sal={tmp_path / 'missing.safetensors'}"], "missing.safetensors"),
        # Polyhistor's task list comes from --tasks (not --set): the fix names --tasks, or a file of that task alone
        (["--method", "lite", "--init-adapter", str(lite), "--tasks", "semseg"],
         "trained on tasks ['semseg', 'sal']; this model trains ['semseg']: train with --tasks semseg sal"),
        (["--method", "lite", "--single-task", "--init-adapter", f"semseg={lite}"],
         "start task semseg from a file trained on it alone"),
    ]
    for argv, message in cases:
        assert dense.run_script(lambda argv=argv: dense.main([*base, *argv])) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: --init-adapter") and err.count("\n") == 1 and message in err, (argv, err)
    assert not out.exists()
    # the shared method's adapter has the per-task adapters' plugin and config: a per-task file starts it
    assert dense.init_adapter_starts(dense.parse_args(["--method", "shared", "--init-adapter", str(semseg)])) == {
        "default": str(semseg)}
