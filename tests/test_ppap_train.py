"""train/ppap.py end to end on the embedded PPAP world, at a very small size."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_scripts import load_train_script

import visadapt
from visadapt.backbones import (
    PPAP_WORLD_CLASSES,
    PPAP_WORLD_SIZE,
    create_ppap_world_classifier,
    create_ppap_world_pipeline,
    ppap_world_experts_path,
)
from visadapt.io import read_adapter_metadata
from visadapt.plugins.ppap import RANGES_METADATA, expert_parameters, use_expert

TINY_RUN = ["--pool-size", "12", "--shard-size", "4", "--pool-steps", "2", "--sample-batch", "6", "--num-experts", "2",
            "--rank", "4", "--epochs", "1", "--batch-size", "4", "--holdout-fraction", "0.2", "--eval-samples", "4",
            "--eval-steps", "2"]


def test_embedded_world_loads_and_generates():
    pipe = create_ppap_world_pipeline(scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, PPAP_WORLD_SIZE, PPAP_WORLD_SIZE, 3)
    classifier = create_ppap_world_classifier()
    logits = classifier(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    assert logits.shape == (2, len(PPAP_WORLD_CLASSES)) and torch.isfinite(logits).all()
    # the shipped weights are loaded, not the seeded random init
    fresh = create_ppap_world_classifier(pretrained=False)
    assert not torch.equal(fresh.head.weight, classifier.head.weight)


def test_train_ppap_end_to_end_and_resume(tmp_path):
    script = load_train_script("ppap")
    out = tmp_path / "run"
    assert script.main(["--output-dir", str(out), *TINY_RUN]) == 0

    # step 1: the pool is on disk in verified shards
    shards = sorted((out / "pool").glob("shard_*"))
    assert len(shards) == 3 and all((s / "manifest.json").is_file() for s in shards)
    stamps = {p: p.stat().st_mtime_ns for s in shards for p in s.iterdir()}

    # step 2: one file with both experts; its metadata lists the ranges; it reloads onto a fresh classifier
    path = out / script.EXPERTS_FILE
    meta = read_adapter_metadata(path)
    assert json.loads(meta[RANGES_METADATA]) == [[0, 500], [500, 1000]]
    saved = load_file(str(path))
    classifier = create_ppap_world_classifier()
    visadapt.load_adapter(classifier, path)
    for name, tensor in visadapt.api.stored_tensors(classifier, "default").items():
        assert torch.equal(tensor, saved[name]), name
    # both experts were trained (LoRA B starts at zero) and differ from each other
    trained = [torch.cat([p.detach().flatten() for p in expert_parameters(classifier, i)]) for i in range(2)]
    assert all(t.abs().sum() > 0 for t in trained) and not torch.equal(trained[0], trained[1])
    x = torch.randn(2, 3, PPAP_WORLD_SIZE, PPAP_WORLD_SIZE)
    with use_expert(classifier, None):
        base = classifier(x)
    with use_expert(classifier, 1):
        assert not torch.allclose(classifier(x), base)

    # step 3: the measurement table is in metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["guidance"]["table"]) == {"unguided", "naive", "ppap"}
    assert (out / "samples" / "guidance.png").is_file()  # the labelled grid (tests/test_grids.py: its content)
    assert [e["range"] for e in metrics["experts"]] == [[0, 500], [500, 1000]]

    # a resumed run rewrites no pool image and reloads the finished experts instead of retraining them
    assert script.main(["--output-dir", str(out), "--resume", *TINY_RUN]) == 0
    assert {p: p.stat().st_mtime_ns for s in shards for p in s.iterdir()} == stamps
    again = json.loads((out / "metrics.json").read_text())
    assert all(e["resumed_from"] for e in again["experts"])
    resaved = load_file(str(path))
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], saved[k]) for k in saved)


def test_warm_start_chains_experts(tmp_path):
    """--warm-start: expert 1 starts from trained expert 0, so with no training epochs of its own it would equal
    it; after its own step it differs from the independently started expert 1 of a plain run."""
    script = load_train_script("ppap")
    small = [a for a in TINY_RUN]
    small[small.index("--eval-samples") + 1] = "0"
    assert script.main(["--output-dir", str(tmp_path / "plain"), *small]) == 0
    assert script.main(["--output-dir", str(tmp_path / "warm"), "--warm-start", *small]) == 0
    plain = load_file(str(tmp_path / "plain" / script.EXPERTS_FILE))
    warm = load_file(str(tmp_path / "warm" / script.EXPERTS_FILE))
    expert0 = [k for k in plain if ".experts.0." in k or k.endswith("bias_deltas.0")]
    expert1 = [k for k in plain if ".experts.1." in k or k.endswith("bias_deltas.1")]
    assert expert0 and len(expert0) == len(expert1)
    # expert 0 is trained the same way in both runs; expert 1 differs because its starting point does
    assert all(torch.equal(plain[k], warm[k]) for k in expert0)
    assert any(not torch.equal(plain[k], warm[k]) for k in expert1)


def test_shipped_experts_guide_better_than_naive_and_unguided():
    """The issue's claim on the embedded world: with the shipped experts, guided DDIM-25 sampling makes the clean
    classifier see the requested class more often than unguided sampling and than naive guidance by the frozen
    classifier (same initial noise for all three; measured 22.9% / 53.1% / 59.4% on 96 samples)."""
    script = load_train_script("ppap")
    pipe, classifier, preprocess = script.load_world(script.EMBEDDED_WORLD, script.EMBEDDED_WORLD, None, "ddim")
    visadapt.load_adapter(classifier, ppap_world_experts_path())
    table = script.measure_guidance(pipe, classifier, preprocess, num_classes=len(PPAP_WORLD_CLASSES), samples=96,
                                    scale=40.0, steps=25, batch_size=96, seed=1)
    fraction = {name: row["fraction"] for name, row in table.items()}
    assert fraction["unguided"] < 0.35 < fraction["naive"] < fraction["ppap"], fraction


def test_dense_objective_trains_experts_to_regress_the_teacher_output(tmp_path):
    """--objective dense: MSE between the expert on x_t and the frozen model on x_0 (a regressor's outputs; here
    the classifier's logits stand in for a dense map). The run must train, save and reload like the KL one."""
    script = load_train_script("ppap")
    out = tmp_path / "dense"
    assert script.main(["--output-dir", str(out), "--objective", "dense", *TINY_RUN]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["objective"] == "dense"
    classifier = create_ppap_world_classifier()
    visadapt.load_adapter(classifier, out / script.EXPERTS_FILE)
    trained = torch.cat([p.detach().flatten() for p in expert_parameters(classifier, 1)])
    assert trained.abs().sum() > 0


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    script = load_train_script("ppap")
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--output-dir", str(tmp_path), "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err


# ------------------------------------------------------------------ --init-adapter

def experts_file(path, model=None, plugin="ppap", **config):
    """An experts file for the embedded classifier (or ``model``) as TINY_RUN trains them (2 experts of rank 4 over
    1000 timesteps), every expert tensor redrawn (a fresh expert's LoRA B is zero, so a fresh start cannot pass)."""
    model = model if model is not None else create_ppap_world_classifier()
    if plugin == "ppap":
        config = {"num_experts": 2, "rank": 4, "alpha": 8.0, "num_train_timesteps": 1000, **config}
    visadapt.attach(model, plugin, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visadapt_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    visadapt.save_adapter(model, path)
    return path


def test_init_adapter_starts_every_expert_from_the_file(tmp_path):
    """At a negligible learning rate both trained experts are the file's (to 1e-6)."""
    script = load_train_script("ppap")
    start = experts_file(tmp_path / "start.safetensors")
    small = [*TINY_RUN, "--lr", "1e-12"]
    small[small.index("--eval-samples") + 1] = "0"
    out = tmp_path / "run"
    assert script.main(["--output-dir", str(out), "--init-adapter", str(start), *small]) == 0
    before, after = load_file(str(start)), load_file(str(out / script.EXPERTS_FILE))
    assert before.keys() == after.keys() and max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6
    for expert in (0, 1):  # both experts' LoRA B came from the file, not from a fresh (zero) start
        lora_b = [k for k in before if f".experts.{expert}." in k and ".B" in k]
        assert lora_b and all(before[k].abs().max() > 1e-3 for k in lora_b), expert
    assert json.loads((out / "metrics.json").read_text())["recipe"]["init_adapter"] == str(start)


def test_init_adapter_files_that_do_not_fit_are_refused_before_any_output(tmp_path, capsys):
    from tiny_models import vit

    script = load_train_script("ppap")
    start = experts_file(tmp_path / "start.safetensors")
    out = tmp_path / "run"
    cases = [
        (start, ["--rank", "8", "--num-experts", "3"],
         "rank: file 4, run 8); train with --num-experts 2 --rank 4 or start without --init-adapter"),
        (experts_file(tmp_path / "t500.safetensors", num_train_timesteps=500), [],
         "its experts split 500 training timesteps; --pipeline visadapt_ppap_world has 1000"),
        (experts_file(tmp_path / "lora.safetensors", plugin="lora"), [], "holds a 'lora' adapter; this run trains 'ppap'"),
        (experts_file(tmp_path / "other.safetensors", vit()), [], "pass the --classifier it was trained on"),
        (tmp_path / "missing.safetensors", [], "missing.safetensors"),
    ]
    for file, extra, message in cases:
        argv = ["--output-dir", str(out), *TINY_RUN, *extra, "--init-adapter", str(file)]
        assert script.run_script(lambda argv=argv: script.main(argv)) == 2, file
        err = capsys.readouterr().err
        assert err.startswith(f"error: --init-adapter {file}") and err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--output-dir", str(out), "--init-adapter", str(start), "--warm-start"])
    assert exit_info.value.code == 2 and "--warm-start would overwrite experts 1.." in capsys.readouterr().err
    assert not out.exists()
