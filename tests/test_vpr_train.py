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
