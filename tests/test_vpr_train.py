"""train/vpr.py end to end on a tiny generated world, re-evaluation of its adapter file, and the vpr table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_scripts import load_train_script

from visadapt.data.places import generate_mini_places
from visadapt.eval import cli
from visadapt.eval.vpr import evaluate_vpr_adapter_file, vpr_table


def _load_script():
    return load_train_script("vpr")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    return generate_mini_places(tmp_path_factory.mktemp("places") / "mini", seed=0,
                                num_places={"train": 20, "val": 10, "test": 10}, family_size=5)


@pytest.fixture(scope="module")
def trained_run(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vpr") / "run"
    argv = ["--data-root", str(tiny_world), "--output-dir", str(out), "--no-progress", "--epochs", "2",
            "--batch-size", "8", "--rerank-k", "5", "--mining-pool", "10", "--set", "local_hidden=8",
            "--set", "local_dim=8"]
    assert _load_script().main(argv) == 0
    return out


def test_training_writes_the_val_selected_adapter_and_test_recalls(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["recipe"] == "mini-places"  # recognised from the generated folder's manifest
    test = metrics["test"]["mini"]
    assert test["queries"] > 0 and test["database"] == 10 and test["rerank_k"] == 5
    for stage in ("global", "reranked"):
        assert set(test[stage]) == {"1", "5", "10"}
        assert 0.0 <= test[stage]["1"] <= test[stage]["5"] <= test[stage]["10"] <= 100.0
    # re-ranking permutes the top 5 only: from 5 on, the recalls of both stages agree
    assert test["reranked"]["5"] == test["global"]["5"] and test["reranked"]["10"] == test["global"]["10"]
    assert test["top1_fixed"] >= 0 and test["top1_broken"] >= 0
    assert test["reranked"]["1"] - test["global"]["1"] == pytest.approx(
        100.0 * (test["top1_fixed"] - test["top1_broken"]) / test["queries"])
    assert metrics["mining"] == "semihard" and metrics["local_margin"] == 0.1  # the embedded recipe's
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["val_best_R@5"] == max(h["R@5"] for h in metrics["history"])
    # every epoch mined its tuples with the model of that moment, and kept them for an exact resume
    for epoch in (0, 1):
        mined = torch.load(trained_run / f"mined_epoch_{epoch:04d}.pt")
        assert mined["negatives"].shape[1] == 2

    again = evaluate_vpr_adapter_file(trained_run / "adapter.safetensors", metrics["data_root"])
    assert again["test"]["mini"]["rerank_k"] == 5  # the k training used, read from the file's metadata
    assert again["test"]["mini"]["global"] == test["global"]
    assert again["test"]["mini"]["reranked"] == test["reranked"]


def test_vpr_table_and_cli(trained_run, capsys):
    assert cli.main(["--benchmark", "vpr", "--adapters", str(trained_run), "--labels", "SelaVPR"]) == 0
    out = capsys.readouterr().out
    assert "| SelaVPR |" in out and "SelaVPR + re-rank (top-5)" in out and "mini R@1" in out
    assert cli.main(["--benchmark", "vpr", "--adapters", str(trained_run), "--metric", "best"]) == 2
    assert "--metric belongs to the classification tables" in capsys.readouterr().err
    assert cli.main(["--benchmark", "vpr", "--adapters", str(trained_run / "adapter.safetensors")]) == 2
    assert "add --data-root" in capsys.readouterr().err


def test_vpr_table_layout():
    record = {"test": {"pitts30k": {"global": {"1": 80.0, "5": 90.0, "10": 95.0},
                                    "reranked": {"1": 90.5, "5": 96.0, "10": 97.0}, "rerank_k": 100,
                                    "global_ms_per_query": 1.0, "rerank_ms_per_query": 17.0}},
              "trainable_params": 53_000_000}
    lines = vpr_table([("SelaVPR", record)]).splitlines()
    assert lines[0] == "| method | pitts30k R@1 | pitts30k R@5 | pitts30k R@10 | ms/query | trainable |"
    assert lines[2] == "| SelaVPR | 80.0 | 90.0 | 95.0 | 1.00 | 53.00M |"
    assert lines[3] == "| SelaVPR + re-rank (top-100) | 90.5 | 96.0 | 97.0 | 18.00 | 53.00M |"


def test_semihard_mining_skips_negatives_closer_than_the_positive():
    select = _load_script().select_negatives
    d_negatives = torch.tensor([0.1, 0.6, 0.3, 0.9, 0.55])
    assert select(torch.tensor(0.5), d_negatives, 2).tolist() == [0, 2]  # hard: the closest
    assert select(torch.tensor(0.5), d_negatives, 2, semihard=True).tolist() == [4, 1]
    # too few beyond the positive: the closest of the rest fill up
    assert select(torch.tensor(0.5), d_negatives, 4, semihard=True).tolist() == [4, 1, 3, 0]


def test_a_resumed_epoch_trains_on_the_tuples_it_had_mined(tiny_world, tmp_path):
    import argparse

    from tiny_models import vit

    import visadapt
    from visadapt.data.places import PlaceSplit, TripletDataset
    from visadapt.engine import make_accelerator
    from visadapt.plugins.selavpr import PlaceRecognitionModel

    script = _load_script()
    split = PlaceSplit(tiny_world, "train", lambda img: torch.zeros(3, 32, 32))
    triplets = TripletDataset(split, negatives_per_query=2)
    args = argparse.Namespace(mining="partial", seed=0, negatives=2, mining_pool=10, eval_batch_size=8)
    backbone = vit()
    visadapt.attach(backbone, "selavpr", local_hidden=4, local_dim=4)
    miner = script.HardNegativeMiner(triplets, args, tmp_path, make_accelerator(None))
    miner(PlaceRecognitionModel(backbone), 0)  # mines and records epoch 0
    recorded = torch.load(tmp_path / "mined_epoch_0000.pt")
    assert torch.equal(triplets.negative_indices, recorded["negatives"])
    # a restart with another model, mid-epoch 0: the recorded tuples come back, whatever the model mines now
    chosen = torch.stack([torch.flip(row, [0]) for row in recorded["negatives"]])
    torch.save({"positive": recorded["positive"], "negatives": chosen}, tmp_path / "mined_epoch_0000.pt")
    triplets.clear_mined()
    miner(PlaceRecognitionModel(backbone), 0)
    assert torch.equal(triplets.negative_indices, chosen) and triplets.mined


# ------------------------------------------------------------------ the official protocol (issue 24)

def test_the_constant_schedule_keeps_the_rate_and_cosine_decays():
    from visadapt.engine import TrainConfig, build_lr_scheduler

    def rates(schedule: str, warmup_epochs: float, steps: int = 100) -> list[float]:
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
        scheduler = build_lr_scheduler(optimizer, TrainConfig(lr=1e-5, lr_schedule=schedule,
                                                              warmup_epochs=warmup_epochs),
                                       steps_per_epoch=4, total_steps=steps)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    # official SelaVPR: torch.optim.Adam(lr=1e-5) and no scheduler -> the rate is 1e-5 at every step
    assert rates("constant", 0) == [1e-5] * 100
    # with a warm-up (one epoch of 4 steps): linear from 0, then the rate for good (no decay)
    assert rates("constant", 1)[:6] == pytest.approx([0, 0.25e-5, 0.5e-5, 0.75e-5, 1e-5, 1e-5]) and \
        rates("constant", 1)[-1] == 1e-5
    cosine = rates("cosine", 0)
    assert cosine[0] == 1e-5 and cosine[50] == pytest.approx(0.5e-5) and cosine[99] == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="lr_schedule='step' must be one of cosine, constant, linear"):
        TrainConfig(lr_schedule="step")


class _Scripted(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i % 2


@pytest.mark.parametrize("patience, scores, evaluated, stopped", [
    (2, [10, 20, 15, 20, 30, 40], 4, True),   # 15 and 20 (a tie is no improvement, as official '>') -> stop
    (2, [10, 20, 15, 25, 24, 23, 30], 6, True),  # 25 resets the count; 24, 23 stop it after the 6th
    (3, [10, 20, 15, 20, 30, 40], 6, False),
    (None, [10, 9, 8, 7, 6, 5], 6, False),     # no patience: every epoch
])
def test_early_stopping_counts_evaluations_without_a_better_score(tmp_path, patience, scores, evaluated,
                                                                   stopped):
    """Official SelaVPR train.py: after each validation, not_improved_num = 0 if R@5 > best else +1; stop when
    not_improved_num >= patience. A resumed run that had stopped trains no further."""
    from torch import nn

    from visadapt.engine import TrainConfig, fit, make_accelerator

    calls = iter(scores)
    config = TrainConfig(epochs=len(scores), batch_size=2, warmup_epochs=0, lr=1e-3, progress=False,
                         patience=patience)
    result = fit(nn.Linear(2, 2), _Scripted(), None, config, accelerator=make_accelerator(None),
                 output_dir=tmp_path, evaluator=lambda model, acc: {"R@5": float(next(calls))}, metric="R@5")
    assert len(result.history) == evaluated and result.stopped_early is stopped
    assert result.score_best == max(scores[:evaluated])
    again = fit(nn.Linear(2, 2), _Scripted(), None, config, accelerator=make_accelerator(None),
                output_dir=tmp_path, resume=True, evaluator=lambda model, acc: {"R@5": float(next(calls))},
                metric="R@5")
    assert len(again.history) == evaluated  # stopped stays stopped; finished stays finished


@pytest.fixture(scope="module")
def official_protocol_run(tiny_world, tmp_path_factory):
    """selavpr-msls (the official recipe) on the tiny world with 2 epochs of 8 queries, mined every 4."""
    script = _load_script()
    seen = {"items": 0, "mined_at": []}
    original_item, original_mine = script.QueryRounds.__getitem__, script.RoundMiner.mine

    def counted_item(self, i):
        seen["items"] += 1
        return original_item(self, i)

    def recorded_mine(self, model, round_index):
        seen["mined_at"].append(seen["items"])
        return original_mine(self, model, round_index)

    script.QueryRounds.__getitem__, script.RoundMiner.mine = counted_item, recorded_mine
    out = tmp_path_factory.mktemp("vpr-official") / "run"
    argv = ["--recipe", "selavpr-msls", "--data-root", str(tiny_world), "--output-dir", str(out), "--no-progress",
            "--epochs", "2", "--queries-per-epoch", "8", "--mining-refresh-every", "4", "--mining-pool", "20",
            "--rerank-k", "5", "--set", "local_hidden=8", "--set", "local_dim=8", "--eval-batch-size", "16"]
    assert script.main(argv) == 0
    return out, seen


def test_queries_per_epoch_and_mining_refresh_follow_the_flags(official_protocol_run):
    out, seen = official_protocol_run
    metrics = json.loads((out / "metrics.json").read_text())
    # 2 epochs x 8 queries were trained on, mined afresh before queries 0, 4, 8 and 12 (cache_refresh_rate)
    assert (seen["items"], seen["mined_at"]) == (16, [0, 4, 8, 12])
    assert metrics["queries_per_epoch"] == 8 and metrics["mining_rounds_per_epoch"] == 2
    for round_index in range(4):  # each round's own 4 queries, kept for an exact resume
        mined = torch.load(out / f"mined_epoch_{round_index:04d}.pt")
        assert mined["queries"].shape == (4,) and mined["negatives"].shape == (4, 2)
    # validation once per epoch of 8 queries: after rounds 2 and 4
    assert [h["epoch"] for h in metrics["history"] if "R@5" in h] == [2, 4]
    # the recipe's constant Adam rate: 1e-5 at every round, no decay, no warm-up
    assert [h["lr"] for h in metrics["history"]] == [1e-5] * 4 and metrics["lr_schedule"] == "constant"
    assert metrics["weight_decay"] == 0.0 and metrics["batch_size"] == 4 and metrics["mining"] == "partial"


def test_a_round_is_mined_from_one_shared_pool_as_official(tiny_world):
    """compute_triplets_partial: one random pool of neg_samples_num database images per refresh; each query's
    negatives are the hardest of that pool outside its soft positives (25 m); the positive the closest in
    descriptor space among the database images within 10 m."""
    import argparse

    from tiny_models import vit

    import visadapt
    from visadapt.data.places import PlaceSplit, TripletDataset
    from visadapt.engine import make_accelerator
    from visadapt.eval.vpr import extract_place_features
    from visadapt.plugins.selavpr import PlaceRecognitionModel

    script = _load_script()
    from torchvision import transforms

    split = PlaceSplit(tiny_world, "train", transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))
    triplets = TripletDataset(split, negatives_per_query=2)
    args = argparse.Namespace(mining="partial", seed=0, negatives=2, mining_pool=12, eval_batch_size=8,
                              negative_radius=25.0)
    backbone = vit()
    visadapt.attach(backbone, "selavpr", local_hidden=4, local_dim=4)
    model = PlaceRecognitionModel(backbone)
    rounds = script.QueryRounds(triplets, 5, seed=0)
    script.RoundMiner(rounds, args, None, make_accelerator(None))(model, 3)
    generator = torch.Generator().manual_seed(0 * 100_003 + 3 + 1)
    pool = torch.randperm(split.num_database, generator=generator)[:12]
    db, _ = extract_place_features(model, split.database_dataset(), 8, keep_local=False)
    queries, _ = extract_place_features(model, split.query_dataset(), 8, keep_local=False)
    for row, usable in enumerate(rounds.queries.tolist()):
        q = queries[triplets.query_indices[usable]]
        candidates = triplets.candidate_positives[usable]
        assert rounds.positive[row] == candidates[(db[candidates] - q).norm(dim=1).argmin()]
        far = pool[triplets.negative_mask(usable)[pool]]
        hardest = far[(db[far] - q).norm(dim=1).argsort()[:2]]
        assert rounds.negatives[row].tolist() == hardest.tolist()


def test_patience_stops_the_vpr_run(tiny_world, tmp_path, monkeypatch):
    script = _load_script()
    real = script.evaluate_places

    def flat_val(model, split, **kwargs):  # the same val recalls every time: never an improvement after the first
        result = real(model, split, **kwargs)
        if split.split == "val":
            result["reranked"] = {"1": 50.0, "5": 60.0, "10": 70.0}
        return result

    monkeypatch.setattr(script, "evaluate_places", flat_val)
    out = tmp_path / "run"
    assert script.main(["--data-root", str(tiny_world), "--output-dir", str(out), "--no-progress", "--epochs", "5",
                        "--batch-size", "4", "--queries-per-epoch", "4", "--rerank-k", "5", "--mining-pool", "10",
                        "--set", "local_hidden=8", "--set", "local_dim=8", "--patience", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3] and metrics["stopped_early"] is True
    assert metrics["patience"] == 2 and metrics["best_epoch"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--mining-refresh-every", "4"], "give --queries-per-epoch too"),
    (["--queries-per-epoch", "10", "--mining-refresh-every", "4"], "must be a multiple of --mining-refresh-every 4"),
    (["--patience", "0"], "--patience 0 must be a positive integer"),
    (["--recipe", "selavpr-pitts30k"], "is a second stage"),
    (["--recipe", "mosa-vtab"], "is run by train/vtab.py, not train/vpr.py"),
    (["--recipe", "selavpr-msls", "--adapter", "lora"], "--adapter lora contradicts recipe 'selavpr-msls'"),
])
def test_inconsistent_protocol_flags_are_refused_before_any_work(tiny_world, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert _load_script().main(["--data-root", str(tiny_world), "--output-dir", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_old_recipe_name_maps_to_the_first_stage(tiny_world):
    args = _load_script().parse_args(["--recipe", "selavpr", "--data-root", str(tiny_world)])
    assert args.recipe == "selavpr-msls" and "is now selavpr-msls" in args.recipe_notice
    assert args.queries_per_epoch == 30000 and args.mining_refresh_every == 1000 and args.lr_schedule == "constant"
    assert args.model == "visadapt_procvit_tiny"  # the generated world: its backbone (a smoke run)
    assert args.recipe_overridden["model"] == "vit_large_patch14_dinov2.lvd142m"


# ------------------------------------------------------------------ --init-adapter

def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _trained_looking_adapter(stage1: Path, path: Path) -> Path:
    """The stage-1 adapter with every tensor redrawn at scale 0.1 (a few tiny-lr steps barely move the
    zero-initialised second Linears, so the stage-1 file alone could not tell a loaded adapter from a fresh one)."""
    import visadapt
    from visadapt.backbones import create_backbone

    backbone = create_backbone("visadapt_procvit_tiny", "default", num_classes=0, img_size=32)
    visadapt.load_adapter(backbone, stage1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "visadapt_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    visadapt.save_adapter(backbone, path)
    return path


def test_the_second_stage_starts_from_the_first_stage_adapter(official_protocol_run, tiny_world, tmp_path):
    """selavpr-pitts30k with --init-adapter: at a negligible learning rate the trained adapter is the file's
    adapter (to 1e-6); a fresh start would keep the second Linears at their zero initialisation."""
    start = _trained_looking_adapter(official_protocol_run[0] / "adapter.safetensors", tmp_path / "start.safetensors")
    out = tmp_path / "stage2"
    assert _load_script().main([
        "--recipe", "selavpr-pitts30k", "--output-dir", str(out), "--init-adapter", str(start), "--data-root",
        str(tiny_world), "--no-progress", "--epochs", "1", "--queries-per-epoch", "4", "--mining-refresh-every", "4",
        "--mining-pool", "20", "--rerank-k", "5", "--set", "local_hidden=8", "--set", "local_dim=8",
        "--eval-batch-size", "16", "--lr", "1e-12"]) == 0
    first, second = _adapter_tensors(start), _adapter_tensors(out / "adapter.safetensors")
    assert first.keys() == second.keys()
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-6
    zero_initialised = [k for k in first if ".up." in k]  # official D_fc2: zero at the start
    assert zero_initialised and all(first[k].abs().max() > 0.01 for k in zero_initialised)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init_adapter"]["file"] == str(start) and metrics["recipe"] == "selavpr-pitts30k"


def test_an_init_adapter_for_another_config_or_plugin_is_refused_before_any_work(official_protocol_run, tiny_world,
                                                                                 tmp_path, capsys):
    stage1 = official_protocol_run[0] / "adapter.safetensors"
    out = tmp_path / "run"
    base = ["--data-root", str(tiny_world), "--output-dir", str(out), "--init-adapter", str(stage1)]
    assert _load_script().main([*base, "--set", "local_hidden=8", "--set", "local_dim=4"]) == 2
    err = capsys.readouterr().err
    assert f"--init-adapter {stage1}" in err and "local_dim: file 8, run 4" in err and "--set local_dim=8" in err
    assert _load_script().main([*base, "--adapter", "lora"]) == 2
    assert "holds a 'selavpr' adapter; this run trains 'lora'" in capsys.readouterr().err
    assert _load_script().main([*base[:-1], str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_init_adapter_load_leaves_the_model_as_it_was(official_protocol_run):
    """A file for another backbone (the tiny world's 96-wide ViT, here a 32-wide one) passes the header checks
    (same plugin and config) and is refused by load_adapter's base-model check; the fresh adapter stays."""
    from tiny_models import vit

    import visadapt
    from visadapt.engine import InitAdapterError, init_adapter_from_file

    stage1 = official_protocol_run[0] / "adapter.safetensors"
    from visadapt.io import read_adapter_metadata

    config = read_adapter_metadata(stage1)["config"]
    model = vit()
    visadapt.attach(model, "selavpr", json.loads(config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trains = {k: p.requires_grad for k, p in model.named_parameters()}
    with pytest.raises(InitAdapterError, match="was trained for .*this model is"):
        init_adapter_from_file(model, stage1)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert trains == {k: p.requires_grad for k, p in model.named_parameters()}
    assert list(visadapt.api.records(model)) == ["default"]
