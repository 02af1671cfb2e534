"""Paper recipes (assets/recipes/*.yaml) and train/vtab.py --recipe: every shipped file validates, one runs for
an epoch on the embedded mini-VTAB, flags beat the recipe, per-task entries land in their task's metrics.json,
and a bad recipe fails with a message naming the file, the key and the known keys."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from train_scripts import load_train_script

import visadapt
from visadapt.data.procedural import generate_mini_vtab
from visadapt.data.tasks import benchmark_tasks
from visadapt.data.verify import verify_benchmark

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "assets" / "recipes"
SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
TINY_SIZES = {"train800": 16, "val200": 8, "test": 20}


@pytest.fixture(scope="module")
def vtab():
    return load_train_script("vtab")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_mini_vtab(tmp_path_factory.mktemp("minivtab"), seed=0, split_sizes=TINY_SIZES)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(out), "--no-progress", "--batch-size", "8", *extra]


def _metrics(out: Path, task: str) -> dict:
    return json.loads((out / task / "metrics.json").read_text())


def test_the_required_recipes_are_shipped(vtab):
    assert vtab.available_recipes() == SHIPPED
    for name in ("bi-adaptformer-dim32-vtab", "bi-lora-dim32-vtab", "mosa-vtab", "mosa-fgvc",
                 "adaptformer-vpetl-vtab", "lora-vpetl-vtab"):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_parses_and_validates(vtab, name):
    recipe = vtab.load_recipe(name)
    assert recipe.name == name and recipe.path.name == f"{name}.yaml"
    assert recipe.sha256 == hashlib.sha256((RECIPE_DIR / f"{name}.yaml").read_bytes()).hexdigest()
    assert recipe.source["paper"] and recipe.source["code"] and recipe.benchmark in ("vtab", "fgvc")
    plugin = visadapt.get_plugin(recipe.adapter)()
    for task in benchmark_tasks(recipe.benchmark):  # every task's config builds
        plugin.Config.from_dict(recipe.adapter_values(task))
    settings = recipe.task_settings(None)
    for key in ("model", "epochs", "lr", "weight_decay", "batch_size", "warmup_epochs", "normalize", "seed"):
        assert key in settings, f"{name} does not state {key}"
    assert isinstance(recipe.not_published, dict) and all(isinstance(v, str) for v in recipe.not_published.values())


def test_per_task_scales_are_the_published_ones(vtab):
    # binary_adapter/configs/adaptformer/<task>-bit1-dim32.yaml, as listed in the research notes (spec 1.5).
    expected = {"cifar100": 0.1, "caltech101": 10, "dtd": 0.01, "oxford_flowers102": 1, "oxford_iiit_pet": 0.01,
                "svhn": 10, "sun397": 0.1, "patch_camelyon": 1, "eurosat": 1, "resisc45": 10,
                "diabetic_retinopathy": 1, "clevr_count": 1, "clevr_dist": 0.1, "dmlab": 1, "kitti": 1,
                "dsprites_loc": 1, "dsprites_ori": 0.1, "smallnorb_azi": 1, "smallnorb_ele": 1}
    recipe = vtab.load_recipe("bi-adaptformer-dim32-vtab")
    assert {task: recipe.adapter_values(task)["scale"] for task in expected} == expected
    assert recipe.adapter_values("dtd") == {"method": "adaptformer", "dim": 32, "bits": 1, "dropout": 0.1,
                                            "quantize_head": False, "scale": 0.01}
    mosa = vtab.load_recipe("mosa-fgvc")
    assert mosa.task_settings("stanford_cars")["lr"] == 5e-3 and mosa.task_settings("cub")["lr"] == 1e-3
    assert mosa.adapter_values("stanford_cars")["split"] == ["down"] and mosa.adapter_values("cub")["dim"] == 64


def test_a_recipe_runs_one_epoch_on_mini_vtab(vtab, tiny_data, tmp_path, capsys):
    """The VTAB-1k recipe on the embedded tiny backbone: its hyperparameters and adapter config, that
    benchmark's backbone, and its per-task entries reported as not applied."""
    out = tmp_path / "run"
    assert vtab.main(_args(tiny_data, out, "--recipe", "bi-adaptformer-dim32-vtab", "--benchmark", "mini-vtab",
                           "--task", "digits", "cells", "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert "per-task entries for cifar100" in printed and "are not applied on mini-vtab" in printed
    recipe_file = RECIPE_DIR / "bi-adaptformer-dim32-vtab.yaml"
    for task in ("digits", "cells"):
        m = _metrics(out, task)
        assert m["recipe"] == "bi-adaptformer-dim32-vtab"
        assert m["recipe_sha256"] == hashlib.sha256(recipe_file.read_bytes()).hexdigest()
        assert m["adapter"] == "bitadapter" and m["adapter_config"]["dim"] == 32 and m["adapter_config"]["bits"] == 1
        assert m["model"] == "visadapt_procvit_tiny" and m["input_size"] == 32  # mini-vtab's backbone
        assert m["lr"] == 1e-3 and m["weight_decay"] == 1e-4 and m["warmup_epochs"] == 10  # the recipe's
        assert m["drop_path_rate"] == 0.1 and m["seed"] == 42 and m["epochs"] == 1 and m["batch_size"] == 8
        assert m["recipe_details"]["overridden"] == {"model": "vit_base_patch16_224.orig_in21k", "input_size": 224,
                                                     "epochs": 100, "batch_size": 64}
        assert m["recipe_details"]["per_task_applied"] == {}


def test_metrics_json_records_how_the_number_was_made(vtab, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert vtab.main(_args(tiny_data, out, "--recipe", "mosa-vtab", "--benchmark", "mini-vtab", "--task", "count",
                           "--epochs", "1", "--seed", "5")) == 0
    m = _metrics(out, "count")
    # the recipe's ImageNet normalisation, as values
    assert m["normalization"] == {"choice": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert m["image_format"] == "png" and m["resolution"] == [32, 32]  # the generator writes 32 px PNGs
    assert m["images"]["train800val200"] == {"images": 24, "formats": {"png": 24}, "min_size": [32, 32],
                                             "max_size": [32, 32]}
    assert m["images"]["test"]["images"] == TINY_SIZES["test"]
    assert m["seed"] == 5 and m["recipe_details"]["overridden"]["seed"] == 3407
    assert m["device"] == "cpu" and m["device_name"]
    assert m["visadapt_version"] == visadapt.__version__ and m["torch_version"] == torch.__version__
    assert m["timm_version"] == timm.__version__
    expected = verify_benchmark(tiny_data, "mini-vtab", tasks=["count"], check_images=False)
    assert m["data_manifest_sha256"] == expected.manifest_sha256()
    assert m["recipe"] == "mosa-vtab" and len(m["recipe_sha256"]) == 64
    assert m["protocol"] == "final" and m["eval_split"] == "test" and m["adapter_checkpoint"] == "final epoch"


def _write_recipe(path: Path, **changes) -> Path:
    """A mini-vtab recipe (so that per-task entries apply) with a per-task lr and scale for digits."""
    recipe = {"name": "tiny-test", "source": {"paper": "none (test)", "code": "tests/test_recipes.py"},
              "benchmark": "mini-vtab", "adapter": "bitadapter", "epochs": 1, "lr": 2.0e-3, "weight_decay": 0.0,
              "warmup_epochs": 0, "normalize": "model", "pretrained": "none",
              "adapter_config": {"dim": 4, "scale": 1.0},
              "per_task": {"digits": {"lr": 7.0e-3, "adapter_config": {"scale": 10.0}}},
              "not_published": {"everything": "this recipe is made up for a test"}}
    recipe.update(changes)
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_flags_beat_the_recipe_and_per_task_entries_land_in_their_task(vtab, tiny_data, tmp_path):
    recipe = _write_recipe(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    assert vtab.main(_args(tiny_data, out, "--recipe", str(recipe), "--task", "digits", "cells",
                           "--weight-decay", "0.05")) == 0
    digits, cells = _metrics(out, "digits"), _metrics(out, "cells")
    assert digits["lr"] == 7e-3 and digits["adapter_config"]["scale"] == 10.0  # digits' per-task entry
    assert cells["lr"] == 2e-3 and cells["adapter_config"]["scale"] == 1.0     # the recipe's own values
    assert digits["weight_decay"] == cells["weight_decay"] == 0.05             # the flag
    assert digits["recipe_details"]["per_task_applied"] == {"lr": 7e-3, "adapter_config": {"scale": 10.0}}
    assert digits["recipe_details"]["overridden"] == {"weight_decay": 0.0}
    assert digits["recipe"] == "tiny-test" and digits["recipe_details"]["file"] == str(recipe)

    # A flag also beats a per-task entry: --lr for every task, --set for the plugin field.
    out2 = tmp_path / "run2"
    assert vtab.main(_args(tiny_data, out2, "--recipe", str(recipe), "--task", "digits", "--lr", "1e-2",
                           "--set", "scale=0.5")) == 0
    digits = _metrics(out2, "digits")
    assert digits["lr"] == 1e-2 and digits["adapter_config"]["scale"] == 0.5
    assert digits["recipe_details"]["overridden"] == {"lr": 7e-3, "adapter_config.scale": 10.0}


def test_seeds_write_one_directory_per_seed_and_resume(vtab, tiny_data, tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    assert vtab.main(_args(tiny_data, out, "--recipe", str(recipe), "--task", "cells", "--seeds", "0,1")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed_0", "seed_1"]
    assert [_metrics(out / f"seed_{s}", "cells")["seed"] for s in (0, 1)] == [0, 1]
    first = _metrics(out / "seed_0", "cells")
    # More seeds later: the finished ones are kept, the new one trained.
    assert vtab.main(_args(tiny_data, out, "--recipe", str(recipe), "--task", "cells", "--seeds", "0,1,2",
                           "--resume")) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert _metrics(out / "seed_0", "cells") == first and _metrics(out / "seed_2", "cells")["seed"] == 2


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"per_task": {"digits": {"lrr": 0.1}}}, "per_task.digits: unknown key 'lrr' (did you mean 'lr'?)"),
    ({"per_task": {"digitz": {"lr": 0.1}}}, "per_task: mini-vtab has no task 'digitz'"),
    ({"per_task": {"digits": {"seed": 3}}}, "seed applies to the whole run"),
    ({"lr": "1e-3"}, "lr is '1e-3' (str); expected a float"),
    ({"adapter_config": {"dimm": 4}}, "has no field 'dimm' (did you mean 'dim'?)"),
    ({"adapter": "nope"}, "no visadapt plugin named 'nope'"),
    ({"normalize": "zscore"}, "normalize is 'zscore'"),
    ({"source": {"paper": "x"}}, "source needs 'paper' and 'code'"),
])
def test_a_bad_recipe_fails_naming_the_file_and_the_key(vtab, tiny_data, tmp_path, capsys, change, message):
    recipe = _write_recipe(tmp_path / "bad.yaml", **change)
    assert vtab.main(_args(tiny_data, tmp_path / "run", "--recipe", str(recipe))) == 2
    err = capsys.readouterr().err
    assert f"recipe {recipe}" in err and message in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_unknown_key_message_lists_the_known_keys(vtab, tmp_path):
    recipe = _write_recipe(tmp_path / "bad.yaml", learning_rate=0.1)
    with pytest.raises(ValueError) as caught:
        vtab.load_recipe(str(recipe))
    text = str(caught.value)
    assert str(recipe) in text and "'learning_rate'" in text and "known keys:" in text
    for known in ("lr", "weight_decay", "per_task", "adapter_config", "not_published", "source"):
        assert known in text.split("known keys:")[1]


def test_recipe_names_and_adapter_conflicts(vtab, tiny_data, tmp_path, capsys):
    assert vtab.main(_args(tiny_data, tmp_path / "a", "--recipe", "bi-adaptformer-dim23-vtab")) == 2
    assert "did you mean 'bi-adaptformer-dim32-vtab'" in capsys.readouterr().err
    assert vtab.main(_args(tiny_data, tmp_path / "b", "--recipe", "mosa-vtab", "--adapter", "lora")) == 2
    assert "--adapter lora contradicts recipe 'mosa-vtab'" in capsys.readouterr().err


def test_a_plugin_seed_follows_the_run_seed_unless_set(vtab):
    plan = vtab.plan_run(vtab.parse_args(["--adapter", "mosa", "--task", "digits", "--seeds", "0,3"]))
    assert [vtab.seeded_config(plan, "digits", seed).seed for seed in (0, 3)] == [0, 3]
    fixed = vtab.plan_run(vtab.parse_args(["--adapter", "mosa", "--task", "digits", "--seeds", "0,3",
                                           "--set", "seed=5"]))
    assert vtab.seeded_config(fixed, "digits", 3).seed == 5
    plain = vtab.plan_run(vtab.parse_args(["--adapter", "lora", "--task", "digits"]))
    assert vtab.seeded_config(plain, "digits", 3) is plain.adapter_configs["digits"]
