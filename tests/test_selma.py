"""SELMA: the expert plugin, the three merges against their formulas on the LoRA deltas, files, and errors."""
from __future__ import annotations

import json

import pytest
import torch

import visadapt
from visadapt import api, inject
from visadapt.backbones import create_tiny_sd_pipeline
from visadapt.io import read_adapter_metadata
from visadapt.plugins.selma import (
    MERGE_METADATA,
    dare_merge,
    merge_expert_files,
    merge_experts,
    ties_merge,
    truncated_factors,
)

SKILLS = ("counting", "color")

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


def randomise(model, name, seed):
    """Give adapter ``name`` non-zero B (a trained expert's state) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for item in inject.attached(model, name):
            for p in item.module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def unet():
    unet = create_tiny_sd_pipeline().unet
    for i, skill in enumerate(SKILLS):
        visadapt.attach(unet, "selma", adapter_name=skill, rank=4 + 2 * i, skill=skill)
        randomise(unet, skill, i)
    return unet


def deltas(unet, name):
    return {f"{i.host_path}:{i.kind}": i.module.delta_weight(torch.float32).detach() for i in inject.attached(unet, name)}


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 7, 32, generator=g)


def test_selma_defaults_are_the_official_recipe():
    config = visadapt.get_plugin("selma").Config()
    assert (config.rank, config.alpha) == (128, 128.0)
    assert set(config.targets) == {"to_q", "to_k", "to_v", "to_out"}
    unet = create_tiny_sd_pipeline().unet
    visadapt.attach(unet, "selma", rank=2)
    kinds = {item.kind for item in inject.attached(unet)}
    assert kinds == {"to_q", "to_k", "to_v", "to_out"}


def test_average_merge_is_exactly_the_weighted_sum_of_deltas(unet):
    weights = [0.3, 0.7]
    report = merge_experts(unet, SKILLS, "average", weights=weights)
    assert report.rank == 4 + 6 and report.max_error == 0.0
    experts = [deltas(unet, s) for s in SKILLS]
    merged = deltas(unet, "merged")
    assert set(merged) == set(experts[0])
    for key, delta in merged.items():
        torch.testing.assert_close(delta, weights[0] * experts[0][key] + weights[1] * experts[1][key],
                                   atol=1e-6, rtol=1e-5)
    # the merged adapter alone == the experts at their weights, unmerged (pipe.set_visadapt_weights' way)
    visadapt.set_weight(unet, "merged", 0.0)
    for skill, w in zip(SKILLS, weights, strict=True):
        visadapt.set_weight(unet, skill, w)
    with torch.no_grad():
        unmerged = unet(*unet_inputs()).sample
        for skill in SKILLS:
            visadapt.set_weight(unet, skill, 0.0)
        visadapt.set_weight(unet, "merged", 1.0)
        merged_out = unet(*unet_inputs()).sample
    torch.testing.assert_close(merged_out, unmerged, atol=1e-5, rtol=1e-4)


def reference_ties(deltas, weights, density):
    """TIES written entry by entry, to check the vectorised one."""
    flat = [(d * w).reshape(-1).tolist() for d, w in zip(deltas, weights, strict=True)]
    kept = []
    for values in flat:
        k = max(1, -(-int(density * len(values) * 1000) // 1000))
        threshold = sorted((abs(v) for v in values), reverse=True)[k - 1]
        kept.append([v if abs(v) >= threshold else 0.0 for v in values])
    out = []
    for j in range(len(flat[0])):
        column = [values[j] for values in kept]
        total = sum(column)
        sign = (total > 0) - (total < 0)
        agree = [v for v in column if v != 0 and ((v > 0) - (v < 0)) == sign]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out).reshape(deltas[0].shape)


def test_ties_and_dare_match_their_formulas():
    g = torch.Generator().manual_seed(1)
    ds = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    torch.testing.assert_close(ties_merge(ds, weights, 0.4), reference_ties(ds, weights, 0.4))
    # density 1: no trimming; entries where all agree are the plain mean
    all_same = [torch.ones(2, 2), 3 * torch.ones(2, 2)]
    torch.testing.assert_close(ties_merge(all_same, [1.0, 1.0], 1.0), 2 * torch.ones(2, 2))

    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    merged = dare_merge(ds, weights, 0.5, gens)
    expected = sum(w * d * (torch.rand(d.shape, generator=torch.Generator().manual_seed(i)) >= 0.5) / 0.5
                   for i, (d, w) in enumerate(zip(ds, weights, strict=True)))
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(dare_merge(ds, weights, 0.0, gens), sum(w * d for d, w in zip(ds, weights, strict=True)))
    with pytest.raises(ValueError, match="drop_rate"):
        dare_merge(ds, weights, 1.0, gens)
    with pytest.raises(ValueError, match="density"):
        ties_merge(ds, weights, 0.0)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_dense_merges_are_refactored_with_the_reported_error(unet, method):
    experts = [deltas(unet, s) for s in SKILLS]
    full = merge_experts(unet, SKILLS, method, merged_name="full", rank=64, seed=3)  # >= every site's size
    low = merge_experts(unet, SKILLS, method, merged_name="low", rank=2, seed=3)
    merged_full, merged_low = deltas(unet, "full"), deltas(unet, "low")
    assert full.max_error < 1e-5 and low.max_error > 0.01
    for index, key in enumerate(merged_full):
        pair = [e[key] for e in experts]
        if method == "ties":
            dense = ties_merge(pair, [1.0, 1.0], 0.2)
        else:
            gens = [torch.Generator().manual_seed(3 * 1_000_003 + i * 10_007 + index) for i in range(2)]
            dense = dare_merge(pair, [0.5, 0.5], 0.5, gens)
        torch.testing.assert_close(merged_full[key], dense, atol=1e-5, rtol=1e-4)
        error = float((merged_low[key] - dense).norm() / dense.norm())
        assert error == pytest.approx(low.site_errors[key], rel=1e-3, abs=1e-6)


def test_truncated_factors_are_exact_on_low_rank_matrices():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(8, 3, generator=g) @ torch.randn(3, 9, generator=g)
    b, a, error = truncated_factors(matrix, 5)
    assert b.shape == (8, 5) and a.shape == (5, 9) and error < 1e-6
    torch.testing.assert_close(b @ a, matrix, atol=1e-5, rtol=1e-5)


def test_merged_file_is_an_ordinary_lora_adapter(unet, tmp_path):
    paths = []
    for skill in SKILLS:
        paths.append(visadapt.save_adapter(unet, tmp_path / f"{skill}.safetensors", skill))
    expected = {}
    merge_experts(unet, SKILLS, "average", merged_name="reference")
    expected = deltas(unet, "reference")
    visadapt.detach(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    report = merge_expert_files(unet, paths, tmp_path / "merged.safetensors", "average")
    assert not api.records(unet)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    meta = read_adapter_metadata(tmp_path / "merged.safetensors")
    assert meta["plugin"] == "lora" and json.loads(meta[MERGE_METADATA])["method"] == "average"
    assert report.experts == [str(p) for p in paths]
    visadapt.load_adapter(unet, tmp_path / "merged.safetensors", "loaded")
    for key, delta in deltas(unet, "loaded").items():
        torch.testing.assert_close(delta, expected[key], atol=1e-6, rtol=1e-5)
    # merged into the base weights, the output equals the unmerged one
    with torch.no_grad():
        unmerged = unet(*unet_inputs()).sample
        visadapt.merge(unet)
        torch.testing.assert_close(unet(*unet_inputs()).sample, unmerged, atol=1e-5, rtol=1e-4)


def test_bad_merges_are_refused(unet, tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        merge_experts(unet, SKILLS, "median")
    with pytest.raises(ValueError, match="one weight per expert"):
        merge_experts(unet, SKILLS, weights=[1.0])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        merge_experts(unet, ["counting", "nope"])
    visadapt.attach(unet, "selma", adapter_name="q_only", rank=2, targets=("to_q",))
    with pytest.raises(ValueError, match="adapt different sites"):
        merge_experts(unet, ["counting", "q_only"])
    assert "merged" not in api.records(unet)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_expert_files(unet, [tmp_path / "missing.safetensors"], tmp_path / "out.safetensors")


def test_train_script_writes_experts_and_a_merged_adapter_that_load(tmp_path, monkeypatch, capsys):
    from train_scripts import load_train_script

    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    script = load_train_script("selma")
    out = tmp_path / "run"
    code = script.main(["--output-dir", str(out), "--per-skill", "8", "--epochs", "1", "--eval-items", "4",
                        "--merge", "dare", "--drop-rate", "0.3", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["experts"]) == {"counting", "color"}
    assert all(len(e["history"]) == 1 for e in metrics["experts"].values())
    for skill in ("counting", "color"):  # a labelled grid per skill and evaluation (tests/test_grids.py: its content)
        assert (out / "samples" / skill / "epoch_001.png").is_file()
    unet = create_tiny_sd_pipeline().unet
    for skill in ("counting", "color"):
        config = visadapt.load_adapter(unet, out / "experts" / f"{skill}.safetensors", skill)
        assert config.skill == skill and api.records(unet)[skill].plugin.name == "selma"
    visadapt.load_adapter(unet, out / "merged-dare.safetensors", "merged")
    assert metrics["merge"]["method"] == "dare" and metrics["merge"]["rank"] == 8
    # the files are what the run trained: merging the loaded experts again gives the same adapter
    merge_experts(unet, ["counting", "color"], "dare", merged_name="again", drop_rate=0.3, seed=0)
    again, loaded = deltas(unet, "again"), deltas(unet, "merged")
    for key in loaded:
        torch.testing.assert_close(loaded[key], again[key])
    # bad skill folders are refused with the layout in the message
    assert script.main(["--output-dir", str(tmp_path / "bad"), "--skill", f"x={tmp_path}/nope"]) == 2
    assert "metadata.jsonl" in capsys.readouterr().err


def test_data_script_generates_resumable_shards_the_dataset_reads(tmp_path, capsys):
    from train_scripts import load_train_script

    from visadapt.diffusion import ImagePromptFolder

    script = load_train_script("selma_data")
    prompts = ["one circle", "two squares", "a red star", "three stars", "a blue circle"]
    (tmp_path / "count.txt").write_text("\n".join(prompts[:3]) + "\n\n")
    (tmp_path / "color.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts[3:]))
    argv = ["--prompts", f"counting={tmp_path / 'count.txt'}", "--prompts", f"color={tmp_path / 'color.jsonl'}",
            "--output-dir", str(tmp_path / "data"), "--shard-size", "2", "--steps", "2", "--seed", "5"]
    assert script.main(argv) == 0
    shards = sorted((tmp_path / "data" / "counting").glob("shard_*"))
    assert [s.name for s in shards] == ["shard_00000", "shard_00001"]
    first = (shards[0] / "00000.png").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}
    capsys.readouterr()
    # a second run writes nothing
    assert script.main(argv) == 0
    assert "0 shards written" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()} == stamps
    # an interrupted shard (no manifest) and a corrupted one are regenerated, identically, and only they
    (shards[1] / "manifest.json").unlink()
    (shards[0] / "00001.png").write_bytes(b"broken")
    assert script.main(argv) == 0
    assert "[counting] 3 prompts: 2 shards written, 0 already complete" in capsys.readouterr().out
    assert (shards[0] / "00000.png").read_bytes() == first
    data = ImagePromptFolder(tmp_path / "data" / "counting", create_tiny_sd_pipeline().tokenizer, resolution=32)
    assert data.prompts == prompts[:3]
    assert ImagePromptFolder(tmp_path / "data" / "color", data.tokenizer, resolution=32).prompts == prompts[3:]
    assert data[2][0]["pixel_values"].shape == (3, 32, 32)
    (tmp_path / "bad.jsonl").write_text('{"caption": "x"}\n')
    assert script.main(["--prompts", f"x={tmp_path / 'bad.jsonl'}", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no string 'prompt' or 'text'" in capsys.readouterr().err


def test_experts_in_the_diffusers_peft_layout_merge_like_visadapt_files(unet, tmp_path):
    from safetensors.torch import save_file

    from visadapt.lora_layouts import lora_state_to_peft

    visadapt_file = visadapt.save_adapter(unet, tmp_path / "counting.safetensors", "counting")
    # SELMA's released layout: a folder with pytorch_lora_weights.safetensors, and the same under another name
    (tmp_path / "color").mkdir()
    peft_state = lora_state_to_peft(unet, "color")
    save_file(peft_state, str(tmp_path / "color" / "pytorch_lora_weights.safetensors"))
    save_file(peft_state, str(tmp_path / "color_expert.safetensors"))
    merge_experts(unet, SKILLS, "average", merged_name="reference")
    expected = deltas(unet, "reference")
    visadapt.detach(unet)
    for color_path in (tmp_path / "color", tmp_path / "color_expert.safetensors"):
        merge_expert_files(unet, [visadapt_file, color_path], tmp_path / "merged.safetensors")
        visadapt.load_adapter(unet, tmp_path / "merged.safetensors", "loaded")
        got = deltas(unet, "loaded")
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
        visadapt.detach(unet)


def test_recipes_are_the_official_values():
    from visadapt.plugins.selma import RECIPE, RECIPE_SDXL

    # Restated from GitHub jialuli-luka/SELMA at its newest commit (dc691fa): fine-tune/ft_sd_lora.sh and
    # fine-tune/ft_sd_lora_sdxl.sh (--learning_rate, --lr_scheduler, --lr_warmup_steps, --train_batch_size,
    # --gradient_accumulation_steps, --max_train_steps, --checkpointing_steps, --resolution, --rank, --seed,
    # --mixed_precision, --random_flip), and the argparse defaults of fine-tune/train_text_to_image_lora.py and
    # train_text_to_image_lora_sdxl.py (--adam_beta1/2, --adam_epsilon, --adam_weight_decay, --max_grad_norm).
    shared = {"rank": 128, "alpha": 128.0, "lr": 3e-4, "lr_schedule": "constant", "warmup_steps": 0, "seed": 42,
              "random_flip": True, "mixed_precision": "fp16", "weight_decay": 1e-2, "adam_betas": (0.9, 0.999),
              "adam_eps": 1e-8, "max_grad_norm": 1.0}
    sd = {"batch_size": 16, "grad_accum_steps": 4, "max_steps": 5000, "checkpoint_every_steps": 500,
          "resolution": 512}
    sdxl = {"batch_size": 4, "grad_accum_steps": 8, "max_steps": 10000, "checkpoint_every_steps": 2000,
            "resolution": 1024}  # the commit before dc691fa had lr 1e-4 and 5,000 steps
    assert {k: RECIPE[k] for k in {**shared, **sd}} == {**shared, **sd}
    assert {k: RECIPE_SDXL[k] for k in {**shared, **sdxl}} == {**shared, **sdxl}


def test_train_script_runs_the_official_recipe(tmp_path):
    from train_scripts import load_train_script

    script = load_train_script("selma")
    args = script.parse_args(["--pipeline", str(tmp_path), "--skill", f"a={tmp_path}"])
    assert args.recipe == "selma"
    assert (args.lr, args.lr_schedule, args.max_steps, args.batch_size, args.grad_accum_steps) == (
        3e-4, "constant", 5000, 16, 4)
    assert (args.weight_decay, args.max_grad_norm, args.rank, args.alpha, args.seed) == (1e-2, 1.0, 128, 128.0, 42)
    assert args.epochs is None  # the step count decides, as official
    # diffusers' train_text_to_image_lora.py: num_update_steps_per_epoch = ceil(len(loader) / accumulation),
    # num_train_epochs = ceil(max_train_steps / num_update_steps_per_epoch); 1,000 images at 16 x 4 -> 313 epochs
    assert script.epochs_for_steps(5000, 1000, 16, 4) == 313
    assert script.epochs_for_steps(4, 10, 2, 2) == 2


def test_constant_schedule_and_max_steps_stop_mid_epoch_as_official(tmp_path):
    """diffusers' ``constant`` schedule keeps lr fixed; ``global_step >= max_train_steps`` ends training mid-epoch,
    counting optimiser (gradient-accumulation) steps."""
    from visadapt.engine import TrainConfig, fit, make_accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    evaluations = []

    def evaluator(model, accelerator):
        evaluations.append(1)
        return {"accuracy": 0.0}

    # 10 items, batch 2 -> 5 batches, accumulation 2 -> 3 optimiser steps per epoch; 4 steps end in epoch 2
    config = TrainConfig(epochs=2, lr=0.1, weight_decay=0.0, batch_size=2, grad_accum_steps=2, warmup_epochs=0,
                         lr_schedule="constant", max_steps=4, progress=False)
    result = fit(model, data, None, config, accelerator=make_accelerator(None, grad_accum_steps=2, log_with=None),
                 output_dir=tmp_path, evaluator=evaluator)
    assert [entry["lr"] for entry in result.history] == [0.1, 0.1]
    assert len(evaluations) == 2
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000004"]
    # resuming a finished run trains no further
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, data, None, config, accelerator=make_accelerator(None, grad_accum_steps=2, log_with=None),
        output_dir=tmp_path, resume=True, evaluator=evaluator)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="polynomial")


# ------------------------------------------------------------------ train/selma.py --init-adapter

TINY_SELMA_RUN = ["--per-skill", "4", "--epochs", "1", "--batch-size", "4", "--eval-items", "1", "--no-progress"]


def expert_file(path, plugin="selma", **config):
    """A trained-looking expert for the embedded UNet (every adapter tensor redrawn: a fresh LoRA B is zero)."""
    unet = create_tiny_sd_pipeline().unet
    visadapt.attach(unet, plugin, **config)
    randomise(unet, "default", 0)
    visadapt.save_adapter(unet, path)
    return path


def test_train_script_starts_a_named_skill_from_its_init_adapter_file(tmp_path, monkeypatch):
    """--init-adapter counting=FILE at a negligible learning rate: the counting expert is the file's (to 1e-6), the
    color expert, not named, starts fresh (LoRA B zero)."""
    from safetensors.torch import load_file
    from train_scripts import load_train_script

    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    start = expert_file(tmp_path / "counting.safetensors", rank=4, alpha=4.0, skill="counting")
    out = tmp_path / "run"
    script = load_train_script("selma")
    assert script.main([*TINY_SELMA_RUN, "--output-dir", str(out), "--lr", "1e-12",
                        "--init-adapter", f"counting={start}"]) == 0
    before, after = load_file(start), load_file(out / "experts" / "counting.safetensors")
    assert before.keys() == after.keys() and max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6
    fresh = load_file(out / "experts" / "color.safetensors")
    lora_b = [k for k in fresh if ".B." in k]
    assert lora_b and all(before[k].abs().max() > 1e-3 and fresh[k].abs().max() < 1e-6 for k in lora_b)
    experts = json.loads((out / "metrics.json").read_text())["experts"]
    assert experts["counting"]["init_adapter"] == str(start) and experts["color"]["init_adapter"] is None


def test_train_script_refuses_init_adapters_that_do_not_fit_before_any_output(tmp_path, monkeypatch, capsys):
    from train_scripts import load_train_script

    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    start = expert_file(tmp_path / "counting.safetensors", rank=4, alpha=4.0, skill="counting")
    resadapter = expert_file(tmp_path / "resadapter.safetensors", "resadapter")
    out = tmp_path / "run"
    script = load_train_script("selma")
    cases = [
        ([str(start)], (f"expected SKILL=FILE with SKILL one of this run's skills (counting, color), e.g. "
                        f"--init-adapter counting={start}")),
        ([f"shapes={start}"], "expected SKILL=FILE"),
        ([f"counting={start}", f"counting={start}"], "names skill 'counting' twice"),
        ([f"color={start}"], (f"holds the expert of skill 'counting', not 'color'; start the skill it was "
                              f"trained on (--init-adapter counting={start}")),
        ([f"counting={resadapter}"], "holds a 'resadapter' adapter; this run trains 'selma'"),
        ([f"counting={tmp_path / 'missing.safetensors'}"], "missing.safetensors"),
    ]
    for items, message in cases:
        argv = [*TINY_SELMA_RUN, "--output-dir", str(out), *(a for item in items for a in ("--init-adapter", item))]
        assert script.run_script(lambda argv=argv: script.main(argv)) == 2, items
        err = capsys.readouterr().err
        assert err.startswith("error: --init-adapter") and err.count("\n") == 1 and message in err, (items, err)
    assert script.main([*TINY_SELMA_RUN, "--output-dir", str(out), "--rank", "8",
                        "--init-adapter", f"counting={start}"]) == 2
    assert "rank: file 4, run 8" in capsys.readouterr().err
    assert not out.exists()
