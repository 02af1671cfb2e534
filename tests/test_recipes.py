"""Paper recipes (assets/recipes/*.yaml) and --recipe of train/vtab.py, train/vpr.py and train/rank.py: every
shipped file validates for its script, the SelaVPR and ranking-CLIP files hold the official values, one runs for an
epoch on the embedded mini-VTAB, flags beat the recipe, per-task entries land in their task's metrics.json, and a
bad recipe fails with a message naming the file, the key and the known keys. (The smoke runs of selavpr-msls and
selavpr-pitts30k are in test_vpr_train.py: official_protocol_run and the second-stage test.)"""
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
from visadapt.recipes import SCHEMAS, load_recipe, script_of

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


def _script(name: str) -> str:
    return script_of(yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())["benchmark"])


VTAB_SHIPPED = [name for name in SHIPPED if _script(name) == "vtab"]


def test_the_required_recipes_are_shipped(vtab):
    assert vtab.available_recipes() == SHIPPED
    for name in ("bi-adaptformer-dim32-vtab", "bi-lora-dim32-vtab", "mosa-vtab", "mosa-fgvc",
                 "adaptformer-vpetl-vtab", "lora-vpetl-vtab", "selavpr-msls", "selavpr-pitts30k", "ranking-clip"):
        assert name in SHIPPED
    assert {name: _script(name) for name in ("selavpr-msls", "selavpr-pitts30k", "ranking-clip")} == {
        "selavpr-msls": "vpr", "selavpr-pitts30k": "vpr", "ranking-clip": "rank"}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_for_its_script_and_only_there(name):
    script = _script(name)
    recipe = load_recipe(name, script)
    assert recipe.name == name and recipe.source["paper"] and recipe.source["code"]
    assert set(recipe.settings) <= set(SCHEMAS[script].settings)
    visadapt.get_plugin(recipe.adapter)().Config.from_dict(recipe.adapter_config)
    for other in set(SCHEMAS) - {script}:
        with pytest.raises(ValueError, match=f"is run by {SCHEMAS[script].script}, not {SCHEMAS[other].script}"):
            load_recipe(name, other)


@pytest.mark.parametrize("name", VTAB_SHIPPED)
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


def test_a_vtab_recipe_sets_the_shared_optimisation_flags_and_a_flag_beats_it(vtab, tiny_data, tmp_path,
                                                                            monkeypatch):
    """A recipe can state the optimiser and schedule (e.g. timm's per-epoch cosine of the VTAB code); they reach
    fit's TrainConfig, a command-line flag wins over them, and a bad value names the key."""
    import visadapt.engine

    configs, real_fit = [], visadapt.engine.fit

    def recording_fit(model, train, evaluation, config, **kwargs):
        configs.append(config)
        return real_fit(model, train, evaluation, config, **kwargs)

    monkeypatch.setattr(visadapt.engine, "fit", recording_fit)  # the job imports fit when it trains
    recipe = _write_recipe(tmp_path / "sched.yaml", optimizer="momentum", momentum=0.8, sched_on="epochs",
                           warmup_lr=1e-5, min_lr=1e-4, max_grad_norm=1.0, lr_schedule="linear")
    assert vtab.main(_args(tiny_data, tmp_path / "run", "--recipe", str(recipe), "--task", "cells",
                           "--min-lr", "2e-4")) == 0
    (config,) = configs
    assert (config.optimizer, config.momentum, config.sched_on, config.warmup_lr, config.lr_schedule,
            config.max_grad_norm) == ("momentum", 0.8, "epochs", 1e-5, "linear", 1.0)
    assert config.min_lr == 2e-4  # the flag, not the recipe's 1e-4
    with pytest.raises(ValueError, match="sched_on"):
        load_recipe(_write_recipe(tmp_path / "bad.yaml", sched_on="hourly"), script="vtab")


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


# ------------------------------------------------------------------ train/vpr.py and train/rank.py recipes

def test_the_selavpr_recipes_hold_the_official_values():
    """Lu-Feng/SelaVPR parser.py defaults and README commands: Adam lr 1e-5 with no scheduler, 4 tuples of
    1 + 1 + 2 images, hardest 2 of 1,000 sampled negatives ('partial'), cache refreshed every 1,000 queries,
    50 epochs, patience 3, margin 0.1, 224 x 224, positives within 10 m, soft positives within 25 m, re-rank 100;
    30,000 queries per epoch on MSLS, 5,000 on Pitts30k (from the MSLS model)."""
    official = {"lr": 1e-5, "lr_schedule": "constant", "warmup_epochs": 0.0, "weight_decay": 0.0, "batch_size": 4,
                "negatives": 2, "mining": "partial", "mining_pool": 1000, "mining_refresh_every": 1000,
                "epochs": 50, "patience": 3, "margin": 0.1, "input_size": 224, "train_positive_radius": 10.0,
                "negative_radius": 25.0, "eval_radius": 25.0, "rerank_k": 100, "local_weight": 1.0,
                "local_margin": 0.0, "normalize": "imagenet", "model": "vit_large_patch14_dinov2.lvd142m", "seed": 0}
    msls, pitts = load_recipe("selavpr-msls", "vpr"), load_recipe("selavpr-pitts30k", "vpr")
    for recipe, queries in ((msls, 30000), (pitts, 5000)):
        assert {k: recipe.settings[k] for k in official} == official
        assert recipe.settings["queries_per_epoch"] == queries and recipe.adapter == "selavpr"
        assert recipe.adapter_config == {"ratio": 0.5, "parallel_scale": 0.2, "local_hidden": 256, "local_dim": 128}
    assert not msls.starts_from and "selavpr-msls" in pitts.starts_from


def test_the_ranking_recipe_holds_the_official_values():
    """uynaes/RankingAwareCLIP README command and params.py / loss.py / model-config.json."""
    recipe = load_recipe("ranking-clip", "rank")
    assert recipe.settings == {
        "model": "convnext_large_d_320", "pretrained": "laion2b_s29b_b131k_ft_soup", "epochs": 32, "lr": 5e-5,
        "lr_schedule": "cosine", "warmup_epochs": 1.0, "weight_decay": 0.01, "list_size": 64, "negative_ratio": 0.2,
        "pair_partners": None, "rank_weight": 1.0, "regression_weight": 0.2, "zero_weight": 0.0, "seed": 0}
    assert recipe.adapter_config == {"num_layers": 2, "num_heads": 8, "mlp_ratio": 4.0, "prompt_tokens": 32,
                                     "prompt_form": "scalar", "post_layers": 2, "dropout": 0.1,
                                     "relational_tokens": 16}
    betas = recipe.fixed_by_code["adamw betas and eps"]
    assert "(0.9, 0.98) and eps 1e-6 for ViT towers" in betas and "(0.9, 0.999) and eps 1e-8" in betas
    assert "'bn', 'ln', 'bias' or 'logit_scale'" in recipe.fixed_by_code["weight decay groups"]
    assert {"lr", "epochs", "warmup", "list_size"} <= set(recipe.not_published)


def _script_recipe(path: Path, script: str, **changes) -> Path:
    base = {"vpr": "selavpr-msls", "rank": "ranking-clip"}[script]
    data = yaml.safe_load((RECIPE_DIR / f"{base}.yaml").read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("script, key", [(script, key) for script in ("vpr", "rank")
                                         for key in SCHEMAS[script].settings])
def test_every_setting_of_the_vpr_and_rank_recipes_is_type_checked(tmp_path, script, key):
    recipe = _script_recipe(tmp_path / "bad.yaml", script, **{key: True})  # a boolean is no setting's type
    with pytest.raises(ValueError, match=rf"recipe {recipe}: {key} is True \(bool\); expected a"):
        load_recipe(str(recipe), script)


@pytest.mark.parametrize("script, change, message", [
    ("vpr", {"mining": "hardest"}, "mining is 'hardest'; choose one of partial, semihard, random"),
    ("vpr", {"lr_schedule": "step"}, "lr_schedule is 'step'; choose one of cosine, constant"),
    ("vpr", {"queries_per_epoch": 0}, "queries_per_epoch is 0; expected a positive integer"),
    ("vpr", {"list_size": 8}, "unknown key 'list_size'"),
    ("vpr", {"per_task": {"a": {"lr": 1.0}}}, "unknown key 'per_task'"),
    ("vpr", {"queries_per_epok": 5}, "unknown key 'queries_per_epok' (did you mean 'queries_per_epoch'?)"),
    ("vpr", {"fixed_by_code": {"lr": "1e-5"}}, "fixed_by_code.lr is a setting of train/vpr.py"),
    ("vpr", {"fixed_by_code": {"betas": [0.9, 0.98]}}, "fixed_by_code.betas must say in words"),
    ("vpr", {"starts_from": 3}, "starts_from must be a str"),
    ("vpr", {"adapter_config": {"ratioo": 0.5}}, "has no field 'ratioo'"),
    ("vpr", {"benchmark": "msls"}, "benchmark 'msls' is not one of vpr"),
    ("rank", {"benchmark": "vpr"}, "is run by train/vpr.py, not train/rank.py"),
    ("rank", {"lr": "5e-5"}, "lr is '5e-5' (str); expected a float"),
    ("rank", {"deviations": [3]}, "deviations must be a list of texts"),
])
def test_a_bad_vpr_or_rank_recipe_names_the_file_and_the_key(tmp_path, script, change, message):
    recipe = _script_recipe(tmp_path / "bad.yaml", script, **change)
    with pytest.raises(ValueError) as caught:
        load_recipe(str(recipe), script)
    assert str(recipe) in str(caught.value) and message in str(caught.value)


def test_the_vpr_script_reports_a_bad_recipe_before_any_work(tmp_path, capsys):
    recipe = _script_recipe(tmp_path / "bad.yaml", "vpr", mining_pol=10)
    out = tmp_path / "run"
    assert load_train_script("vpr").main(["--recipe", str(recipe), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"recipe {recipe}: unknown key 'mining_pol' (did you mean 'mining_pool'" in err and not out.exists()


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> Path:
    from visadapt.data.ranking import generate_mini_counting

    return generate_mini_counting(tmp_path_factory.mktemp("counting") / "mini", seed=0,
                                  sizes={"train": 32, "val": 16, "test": 16})


def test_the_ranking_recipe_runs_on_the_embedded_data_and_a_run_can_start_from_its_adapter(counting, tmp_path):
    """ranking-clip on mini-counting (its tiny CLIP instead of ConvNeXt-L-d, the recipe's optimisation and adapter
    config), one short epoch; then train/rank.py --init-adapter at a negligible rate keeps that adapter (1e-6)."""
    from safetensors.torch import load_file

    import visadapt
    from visadapt.backbones import EMBEDDED_CLIP, create_clip

    rank = load_train_script("rank")
    common = ["--recipe", "ranking-clip", "--data-root", str(counting), "--no-progress", "--epochs", "1",
              "--list-size", "8", "--pair-partners", "2"]
    first = tmp_path / "first"
    assert rank.main([*common, "--output-dir", str(first)]) == 0
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["recipe"] == "ranking-clip" and metrics["model"] == EMBEDDED_CLIP and metrics["lr"] == 5e-5
    assert metrics["recipe_sha256"] == hashlib.sha256((RECIPE_DIR / "ranking-clip.yaml").read_bytes()).hexdigest()
    assert metrics["adapter_config"]["default"]["prompt_form"] == "scalar"
    # a start that differs from any fresh adapter: the first run's adapter, every tensor redrawn
    clip, _ = create_clip(EMBEDDED_CLIP, "none")
    visadapt.load_adapter(clip, first / "adapter.safetensors")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in clip.named_parameters():
            if "visadapt_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    start = tmp_path / "start.safetensors"
    visadapt.save_adapter(clip, start)
    second = tmp_path / "second"
    assert rank.main([*common, "--output-dir", str(second), "--init-adapter", str(start), "--lr", "1e-12"]) == 0
    before, after = load_file(start), load_file(second / "adapter.safetensors")
    assert before.keys() == after.keys() and max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6
    assert json.loads((second / "metrics.json").read_text())["init_adapter"] == str(start)


def test_vtab_starts_a_task_from_an_adapter_file_and_refuses_one_for_another_head(vtab, tiny_data, tmp_path,
                                                                                  capsys):
    """train/vtab.py --init-adapter: at a negligible rate the trained adapter (head included) is the file's; a
    file whose head has another class count (digits: 10 classes, cells: another count) is refused before
    training, naming the file."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    assert vtab.main(_args(tiny_data, first, "--adapter", "lora", "--task", "digits", "--epochs", "1",
                           "--lr", "0.05")) == 0
    start = first / "digits" / "adapter.safetensors"
    second = tmp_path / "second"
    assert vtab.main(_args(tiny_data, second, "--adapter", "lora", "--task", "digits", "--epochs", "1",
                           "--lr", "1e-12", "--init-adapter", str(start))) == 0
    before, after = load_file(start), load_file(second / "digits" / "adapter.safetensors")
    assert before.keys() == after.keys() and max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6
    assert any(".B." in k and before[k].abs().max() > 1e-3 for k in before)  # LoRA B starts at 0: not vacuous
    assert _metrics(second, "digits")["init_adapter"] == str(start)
    third = _args(tiny_data, tmp_path / "third", "--adapter", "lora", "--task", "cells", "--epochs", "1",
                  "--init-adapter", str(start))
    assert vtab.run_script(lambda: vtab.main(third)) == 2  # the script's entry point: one error line, exit 2
    err = capsys.readouterr().err
    assert f"error: --init-adapter {start}" in err and "the file's head 'head' has 10 classes, this model's 2" in err
