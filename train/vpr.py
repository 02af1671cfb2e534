"""Train SelaVPR (or any adapter plus SelaVPR's place head) for visual place recognition, then test it.

    accelerate launch train/vpr.py               # embedded default: procedural places, no download
    accelerate launch train/vpr.py --recipe selavpr --data-root /data/pitts30k --pretrained default

Data: the "Visual Geo-localization Benchmark" layout, ``<data-root>/images/{train,val,test}/{database,queries}``
with UTM coordinates in the file names. Each epoch first mines, with the current model, every training query's
closest positive in descriptor space (among database images within 10 m) and its hardest negatives among a
random pool of database images farther than 25 m; then trains on (query, positive, negatives) tuples with the
global triplet loss plus the local mutual-nearest-neighbour loss; then measures Recall@K on ``val`` (global and
re-ranked). The adapter with the best re-ranked val R@5 is kept (as the official code selects its model) and
tested on ``test``. Outputs in ``--output-dir``: ``adapter.safetensors`` (that adapter, its place head
included), ``metrics.json`` (val history and test recalls for both stages, with timings); the table:
``visadapt-eval --benchmark vpr --adapters <output-dir>``.

Differences from the official recipe, each a flag away: the learning rate follows the engine's cosine schedule
(official: constant Adam; pass ``--warmup-epochs 0`` and a large ``--epochs`` to approach it); the mined tuples
are refreshed once per epoch (official: every 1000 queries); no early stopping (the val-best adapter is kept).
The embedded recipe mines semi-hard negatives (``--mining semihard``, see :func:`select_negatives`): with the
official hardest negatives its look-alike places collapse the global descriptors. It also gives the local
hinge a margin of 0.1 (``--local-margin``; official 0): the tiny backbone's patch tokens do not tell look-alike
places apart, and with margin 0 the hinge is met within two epochs and the local head learns nothing (re-ranking
then barely beats global retrieval; with 0.1 it adds about 10 points of R@1, README).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

import visadapt
from visadapt import api
from visadapt.backbones import EMBEDDED_MODEL, create_backbone
from visadapt.data import resolve_normalization
from visadapt.data.places import MANIFEST, PlaceSplit, TripletDataset, generate_mini_places
from visadapt.data.transforms import vtab_transform
from visadapt.engine import (
    TrainConfig,
    add_run_flags,
    finish_run_args,
    fit,
    make_accelerator,
    prepare_output_dir,
    run_options,
    run_script,
    seed_everything,
)
from visadapt.eval.vpr import evaluate_places, extract_place_features
from visadapt.io import TRAIN_METADATA, write_json_atomic
from visadapt.plugin import config_values
from visadapt.plugins.selavpr import BACKBONE_ARGUMENTS, PlaceRecognitionModel, SelaVPRLoss

# Every value can be overridden by its flag. "selavpr": the paper's (ViT-L/14 DINOv2 at 224, Adam lr 1e-5,
# 4 tuples of 1 + 1 + 2 images, re-rank the top 100). "mini-places": sized for 2 CPU cores.
RECIPES = {
    "selavpr": {"model": "vit_large_patch14_dinov2.lvd142m", "input_size": 224, "epochs": 50, "lr": 1e-5,
                "weight_decay": 0.0, "batch_size": 4, "warmup_epochs": 0.0, "negatives": 2, "rerank_k": 100,
                "mining_pool": 1000, "mining": "partial", "local_margin": 0.0, "adapter_settings": {}},
    "mini-places": {"model": EMBEDDED_MODEL, "input_size": 32, "epochs": 12, "lr": 3e-4, "weight_decay": 0.0,
                    "batch_size": 16, "warmup_epochs": 0.5, "negatives": 2, "rerank_k": 10, "mining_pool": 200,
                    "mining": "semihard", "local_margin": 0.1,
                    # local margin 0.1 (official 0): the tiny backbone's tokens do not tell family members apart,
                    # and with margin 0 the local hinge was met within 2 epochs, teaching the local head nothing
                    # semi-hard mining: the hardest negatives (look-alikes of the same family) collapsed the
                    # global descriptors (triplet loss stuck at the margin, cosine 0.999 between any two places);
                    # a 96-wide backbone: a smaller local head (official 256 -> 128 channels on 1024)
                    "adapter_settings": {"local_hidden": 128, "local_dim": 64}},
}
MINING_FILE = "mined_epoch_{epoch:04d}.pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/vpr.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="default: mini-places for the generated places (no --data-root, or a folder written by "
                        "generate_mini_places), selavpr otherwise")
    p.add_argument("--data-root", default=None, help="dataset folder holding images/{train,val,test}; default: the "
                                                     "generated procedural places (mini-places)")
    p.add_argument("--dataset-name", default=None, help="label of the test figures (default: the folder name)")
    p.add_argument("--model", default=None, help="timm ViT name (default: the recipe's)")
    p.add_argument("--pretrained", default="default",
                   help="backbone weights: 'default' (timm's for --model), 'none', a local file, or a hub repo id")
    p.add_argument("--adapter", default="selavpr", help="registered plugin; a plugin other than selavpr is "
                                                        "trained together with SelaVPR's place head")
    p.add_argument("--adapter-config", default=None, help="YAML file with the plugin's config fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one selavpr config field (value parsed as YAML); repeatable")
    p.add_argument("--normalize", default="model", choices=["model", "imagenet", "none"])
    for flag, kind in (("input-size", int), ("epochs", int), ("lr", float), ("weight-decay", float),
                       ("batch-size", int), ("warmup-epochs", float), ("negatives", int), ("rerank-k", int),
                       ("mining-pool", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's")
    p.add_argument("--mining", default=None, choices=["partial", "semihard", "random"],
                   help="partial: hardest negatives among --mining-pool random far images, in descriptor space; "
                        "semihard: the hardest of those that are farther than the positive (FaceNet), the "
                        "hardest overall where too few are; random: random far images (no mining). "
                        "Default: the recipe's")
    p.add_argument("--local-weight", type=float, default=1.0, help="weight of the local MNN loss (0 = global only)")
    p.add_argument("--margin", type=float, default=0.1, help="triplet margin of the global loss")
    p.add_argument("--local-margin", type=float, default=None,
                   help="margin of the local MNN hinge (official 0); default: the recipe's")
    p.add_argument("--train-positive-radius", type=float, default=10.0, help="metres; training positives")
    p.add_argument("--negative-radius", type=float, default=25.0, help="metres; negatives lie farther away")
    p.add_argument("--eval-radius", type=float, default=25.0, help="metres; a retrieval is correct within it")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0, help="mini-places only: seed of the generated world")
    p.add_argument("--output-dir", default=None, help="default: runs/vpr-<dataset>-<adapter>")
    add_run_flags(p)
    args = p.parse_args(argv)
    if args.recipe is None:  # the embedded world (generated, or a folder written by generate_mini_places)
        embedded = args.data_root is None or (Path(args.data_root) / MANIFEST).is_file()
        args.recipe = "mini-places" if embedded else "selavpr"
    finish_run_args(p, args, RECIPES[args.recipe])
    return args


def adapter_settings(args: argparse.Namespace) -> dict:
    """Recipe settings, then ``--adapter-config``, then ``--set key=value`` (later wins)."""
    return config_values(args.adapter_config, args.overrides,
                         base=args.adapter_settings if args.adapter == "selavpr" else None)


def attach_place_adapter(model, args: argparse.Namespace) -> None:
    """SelaVPR itself, or another plugin's adapters plus a SelaVPR place head with no block adapters."""
    settings = adapter_settings(args)
    if args.adapter == "selavpr":
        visadapt.attach(model, "selavpr", settings)
        return
    visadapt.attach(model, args.adapter, settings)
    visadapt.attach(model, "selavpr", dict(RECIPES[args.recipe]["adapter_settings"], serial=False, parallel=False),
                    adapter_name="place")


def select_negatives(d_positive: torch.Tensor, d_negatives: torch.Tensor, count: int, semihard: bool = False
                     ) -> torch.Tensor:
    """Indices of the ``count`` negatives to train on, from descriptor distances: ``d_positive`` ``()`` (the
    query to its positive), ``d_negatives`` ``(P,)`` (the query to each negative of the pool).

    Hard: the ``count`` closest. Semi-hard (FaceNet): the closest of those farther than the positive, then,
    if too few are, the closest of the rest. Why it exists: where negatives are look-alikes the backbone
    cannot yet tell apart (the generated places' families), the hardest ones are closer than the positive for
    most queries, and the cheapest way to lower the triplet loss is then to pull every descriptor together;
    the loss settles at the margin and the descriptors end up nearly identical.
    """
    if semihard:
        # unit descriptors are at most 2 apart: +4 sends the negatives closer than the positive behind the rest
        d_negatives = torch.where(d_negatives > d_positive, d_negatives, d_negatives + 4.0)
    return d_negatives.topk(count, largest=False).indices


class HardNegativeMiner:
    """``before_epoch`` hook: re-draws the tuples of an epoch from the current model, deterministically.

    The choice of epoch ``e`` is written to ``<output-dir>/mined_epoch_<e>.pt`` so that a run resumed in the
    middle of that epoch trains on exactly the tuples it had chosen, whatever the model looks like on restart.
    """

    def __init__(self, triplets: TripletDataset, args: argparse.Namespace, output_dir: Path, accelerator) -> None:
        self.triplets, self.args, self.output_dir, self.accelerator = triplets, args, output_dir, accelerator

    def __call__(self, model, epoch: int) -> None:
        self.triplets.set_epoch(epoch)
        if self.args.mining == "random":
            return
        path = self.output_dir / MINING_FILE.format(epoch=epoch)
        if path.is_file():
            # tensors only: weights_only refuses any pickled object that is not a tensor or plain container
            # (the default before torch 2.6 would run whatever code a planted file carries)
            mined = torch.load(path, weights_only=True)
            self.triplets.set_mined(mined["positive"], mined["negatives"])
            return
        positive, negatives = self.mine(self.accelerator.unwrap_model(model), epoch)
        self.triplets.set_mined(positive, negatives)
        if self.accelerator.is_main_process:
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save({"positive": positive, "negatives": negatives}, tmp)
            os.replace(tmp, path)

    @torch.no_grad()
    def mine(self, model, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        split, triplets = self.triplets.split, self.triplets
        db_global, _ = extract_place_features(model, split.database_dataset(), self.args.eval_batch_size,
                                              keep_local=False)
        q_global, _ = extract_place_features(model, split.query_dataset(), self.args.eval_batch_size,
                                             keep_local=False)
        generator = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        positive = torch.empty(len(triplets), dtype=torch.long)
        negatives = torch.empty(len(triplets), self.args.negatives, dtype=torch.long)
        for i, query in enumerate(triplets.query_indices.tolist()):
            candidates = triplets.candidate_positives[i]
            d_pos = torch.cdist(q_global[query][None], db_global[candidates])[0]
            positive[i] = candidates[d_pos.argmin()]
            far = triplets.negative_mask(i).nonzero().flatten()
            pool = far[torch.randperm(far.numel(), generator=generator)[: self.args.mining_pool]]
            d_neg = torch.cdist(q_global[query][None], db_global[pool])[0]
            negatives[i] = pool[select_negatives(d_pos.min(), d_neg, self.args.negatives,
                                                 semihard=self.args.mining == "semihard")]
        return positive, negatives


def train(args: argparse.Namespace, data_root: Path, out: Path) -> dict:
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                         warmup_epochs=args.warmup_epochs, seed=args.seed, progress=not args.no_progress,
                         **run_options(args))
    accelerator = make_accelerator(out, precision=args.precision)
    seed_everything(args.seed)
    # the pretrained grid, any input size: SelaVPR interpolates the position embedding per forward
    backbone = create_backbone(args.model, args.pretrained, num_classes=0, **BACKBONE_ARGUMENTS)
    transform = vtab_transform(args.input_size, resolve_normalization(args.normalize, backbone))
    splits = {name: PlaceSplit(data_root, name, transform) for name in ("train", "val", "test")}
    triplets = TripletDataset(splits["train"], positive_radius_m=args.train_positive_radius,
                              negative_radius_m=args.negative_radius, negatives_per_query=args.negatives,
                              seed=args.seed)
    if triplets.dropped:
        accelerator.print(f"note: {triplets.dropped} training queries have no database image within "
                          f"{args.train_positive_radius} m and are not used")
    attach_place_adapter(backbone, args)
    model = PlaceRecognitionModel(backbone, "default" if args.adapter == "selavpr" else "place")
    counts = api.summary(backbone)
    name = args.dataset_name or data_root.name
    run = {"benchmark": "vpr", "dataset": name, "data_root": str(data_root), "model": args.model,
           "pretrained": args.pretrained, "normalize": args.normalize, "input_size": args.input_size, "recipe": args.recipe,
           "data_seed": args.data_seed, "seed": args.seed, "adapter": args.adapter, "rerank_k": args.rerank_k}
    accelerator.init_trackers("vpr", config={**run, **{k: v for k, v in vars(config).items() if k != "progress"}})
    accelerator.print(f"[vpr] {args.adapter} on {args.model}: {counts.trainable_params:,} trainable of "
                      f"{counts.total_params:,} params; {len(triplets)} training tuples, "
                      f"{len(splits['val'].query_paths)} val queries")

    best_json = out / "best.json"

    def best_file(adapter_name: str) -> Path:
        return out / f"best_{adapter_name}.safetensors"

    def evaluator(prepared, accelerator) -> dict[str, float]:
        result = evaluate_places(accelerator.unwrap_model(prepared), splits["val"], rerank_k=args.rerank_k,
                                 positive_radius_m=args.eval_radius, batch_size=args.eval_batch_size)
        score = result["reranked"]["5"]
        best = json.loads(best_json.read_text())["R@5"] if best_json.is_file() else -1.0
        if score > best and accelerator.is_main_process:
            for adapter_name in api.records(backbone):
                visadapt.save_adapter(backbone, best_file(adapter_name), adapter_name,
                                      metadata={TRAIN_METADATA: json.dumps(run, sort_keys=True)})
            write_json_atomic(best_json, {"R@5": score})
        accelerator.wait_for_everyone()
        return {"R@1": result["reranked"]["1"], "R@5": score, "R@10": result["reranked"]["10"],
                "R@1_global": result["global"]["1"], "R@5_global": result["global"]["5"],
                "samples": result["queries"]}

    result = fit(model, triplets, None, config, accelerator=accelerator, output_dir=out, resume=args.resume,
                 loss_fn=SelaVPRLoss(margin=args.margin, local_weight=args.local_weight,
                                     local_margin=args.local_margin), evaluator=evaluator,
                 metric="R@5", before_epoch=HardNegativeMiner(triplets, args, out, accelerator), log_prefix="[vpr] ")
    # Test the val-selected adapter, as the paper does.
    bare = accelerator.unwrap_model(model)
    for adapter_name in list(api.records(backbone)):
        visadapt.detach(backbone, adapter_name)
        visadapt.load_adapter(backbone, best_file(adapter_name), adapter_name)
    test = evaluate_places(bare, splits["test"], rerank_k=args.rerank_k, positive_radius_m=args.eval_radius,
                           batch_size=args.eval_batch_size)
    metrics = {}
    if accelerator.is_main_process:
        for adapter_name in api.records(backbone):
            target = "adapter.safetensors" if adapter_name == "default" else f"adapter_{adapter_name}.safetensors"
            shutil.copyfile(best_file(adapter_name), out / target)
        metrics = {
            **run, "adapter_config": {n: r.config.to_dict() for n, r in api.records(backbone).items()},
            "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "negatives": args.negatives,
            "mining": args.mining, "mining_pool": args.mining_pool, "local_weight": args.local_weight,
            "local_margin": args.local_margin,
            "val_best_R@5": result.score_best, "best_epoch": result.best_epoch,
            "test": {name: test},
            "trainable_params": counts.trainable_params, "adapter_params": counts.adapter_params,
            "adapter_bytes": (out / "adapter.safetensors").stat().st_size if (out / "adapter.safetensors").exists()
            else None,
            "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from,
            "num_processes": accelerator.num_processes, "history": result.history,
            "visadapt_version": visadapt.__version__,
        }
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        visadapt.get_plugin(args.adapter)().Config.from_dict(adapter_settings(args))  # fail before any work
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.data_root is None:
        with state.main_process_first():  # one process generates, the others then find it complete
            args.data_root = str(generate_mini_places(seed=args.data_seed))
    data_root = Path(args.data_root)
    out = Path(args.output_dir or f"runs/vpr-{args.dataset_name or data_root.name}-{args.adapter}")
    try:
        prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = train(args, data_root, out)
    if state.is_main_process:
        name = next(iter(metrics["test"]))
        test = metrics["test"][name]
        print(f"\n[{name} test] {test['queries']} queries, {test['database']} database images")
        for stage in ("global", "reranked"):
            print(f"  {stage:<9} R@1 {test[stage]['1']:5.1f}  R@5 {test[stage]['5']:5.1f}  R@10 {test[stage]['10']:5.1f}")
        print(f"  re-ranking made {test['top1_fixed']} first answers right and {test['top1_broken']} wrong")
        print(f"table: visadapt-eval --benchmark vpr --adapters {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
