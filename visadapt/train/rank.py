"""Train the ranking-aware CLIP adapter on text-driven image ordering, then test it.

    accelerate launch train/rank.py                 # embedded default: mini-counting on a tiny CLIP, no download
    accelerate launch train/rank.py --recipe ranking-clip --data-root /data/coco-count --output-dir runs/count

Data: a folder with ``train.csv``, ``val.csv`` and ``test.csv`` in the official tab-separated layout (columns
``filepath``, ``title``, ``cname``, ``value``; see :mod:`visadapt.data.ranking`). Every training step is one list
of ``--list-size`` images under one instruction, 20% of them negatives of other categories with value 0 (the
official sampler). The adapter with the best val SRCC is kept and tested on ``test``; the frozen CLIP's
zero-shot ranking (cosine of image and instruction embeddings) is measured on the same test set as the
baseline. Outputs in ``--output-dir``: ``adapter.safetensors``, ``metrics.json`` (PLCC / SRCC / MAE, the
official and the strict pairwise accuracy (see :mod:`visadapt.eval.ranking`), overall, per category and their
mean over categories (the official script's headline figure), for the adapter and zero-shot; val history; timings); the table: ``visadapt-eval --benchmark rank --adapters <dir>``.

Optimiser: the official AdamW parameter groups by default (:func:`visadapt.plugins.ranking_clip.
official_param_groups`: no weight decay on gains and biases, amsgrad, betas and eps per image tower);
``--param-groups plain`` gives one group with ``--weight-decay`` everywhere and the optimiser's defaults (the
official groups are AdamW's: with ``--optimizer`` sgd, momentum or lamb they need ``--param-groups plain``).
Measured on the small run of ``tests/test_rank_train.py`` (512 images, 12 epochs, one seed): test SRCC 0.335
with the official defaults, 0.376 with ``--param-groups plain --set image_proj=frozen`` (visadapt's behaviour
before 2026-12; ``--param-groups`` was called ``--optimizer`` before the shared ``--optimizer`` flag).
Recipes: ``ranking-clip`` (``assets/recipes/ranking-clip.yaml``, read by :mod:`visadapt.recipes`; ``--recipe``
also takes another recipe file) follows the official command (AdamW, weight decay 0.01, lr 5e-5: the README's flag
is garbled, 5e-5 is the spec's reading; loss 1.0 pairwise + 0.2 regression) on the released checkpoints'
ConvNeXt-L-d (LAION-2B soup); the file names the official values no flag sets. ``mini-counting`` is sized for 2 CPU cores: the tiny random-init CLIP of :func:`visadapt.backbones.create_clip`
(so zero-shot is chance by construction, like CLIP's 0.001 SRCC on COCO counting in the paper).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import visadapt
from visadapt.names import EMBEDDED_CLIP
from visadapt.recipes import available_recipes, load_recipe
from visadapt.train.flags import SetOverride, add_run_flags, finish_run_args, run_options, run_script

if TYPE_CHECKING:
    import torch
    from torchvision import transforms
from visadapt.tracking import tracker_config, tracking_options
from visadapt.train.preflight import check_data_root, report_error, task_output_dir

# The embedded recipe; the published one is a recipe file (assets/recipes/ranking-clip.yaml).
RECIPES = {
    "mini-counting": {"model": EMBEDDED_CLIP, "pretrained": "none", "epochs": 30, "lr": 1e-3,
                      "weight_decay": 0.01, "list_size": 32, "warmup_epochs": 1.0,
                      # a 64-wide CLIP: 4 heads of 16 (official 8 heads on 768)
                      "adapter_settings": {"num_heads": 4}},
}
SPLITS = ("train", "val", "test")
# Values of the settings a recipe file may leave out, when no flag gives them either.
SETTING_DEFAULTS = {"negative_ratio": 0.2, "rank_weight": 1.0, "regression_weight": 0.2, "zero_weight": 0.0,
                    "seed": 0, "pair_partners": None, "lr_schedule": "cosine"}


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "train/rank.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help=f"a recipe file, or a name: shipped {', '.join(available_recipes('rank'))}, embedded "
                        f"{', '.join(RECIPES)}. Default: mini-counting for the generated data (no --data-root, or a "
                        f"folder written by generate_mini_counting), ranking-clip otherwise")
    p.add_argument("--data-root", default=None, help="folder with train.csv, val.csv, test.csv; default: the "
                                                     "generated mini-counting data")
    p.add_argument("--model", default=None, help="open_clip model name (default: the recipe's)")
    p.add_argument("--pretrained", default=None, help="open_clip tag, local checkpoint, 'default' or 'none'")
    p.add_argument("--adapter-config", default=None, help="YAML file with ranking_clip config fields")
    p.add_argument("--set", dest="overrides", action=SetOverride, default=[], metavar="KEY=VALUE",
                   help="override one ranking_clip config field (value parsed as YAML); repeatable")
    for flag, kind in (("epochs", int), ("lr", float), ("weight-decay", float), ("list-size", int),
                       ("warmup-epochs", float)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's")
    p.add_argument("--param-groups", default="official", choices=("official", "plain"),
                   help="official: the official AdamW groups (no weight decay on gains and biases, amsgrad, betas "
                        "(0.9, 0.98) / eps 1e-6 for ViT towers, (0.9, 0.999) / 1e-8 otherwise; --optimizer adamw or "
                        "adam); plain: one group with --weight-decay on every tensor and the --optimizer's defaults "
                        "(visadapt before 2026-12, when this flag was called --optimizer)")
    p.add_argument("--negative-ratio", type=float, default=None, help="share of each list drawn from other "
                                                                      "categories with target 0 (official 0.2)")
    p.add_argument("--pair-partners", type=int, default=None,
                   help="train the pair branch on K random partners per image (linear in the list size) "
                        "instead of all N^2 ordered pairs (official)")
    p.add_argument("--rank-weight", type=float, default=None, help="weight of the pairwise (RankNet) loss (1)")
    p.add_argument("--regression-weight", type=float, default=None, help="weight of log(1 + SmoothL1) (0.2)")
    p.add_argument("--zero-weight", type=float, default=None, help="weight of the zero-target BCE (0; official: "
                                                                    "off)")
    p.add_argument("--ordinal", action="store_true", help="targets are ordinal classes: also report accuracy "
                                                          "after rounding the scores")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's, else 0")
    p.add_argument("--data-seed", type=int, default=0, help="mini-counting only: seed of the generated data")
    p.add_argument("--output-dir", default=None, help="default: runs/rank-<dataset>")
    add_run_flags(p, init_adapter=True)
    args = p.parse_args(argv)
    from visadapt.data.ranking import COUNTING_MANIFEST  # after parsing: --help loads no torch

    embedded = args.data_root is None or (Path(args.data_root) / COUNTING_MANIFEST).is_file()
    if args.recipe is None:
        args.recipe = "mini-counting" if embedded else "ranking-clip"
    args.recipe_sha256 = None
    if args.recipe in RECIPES:
        values = RECIPES[args.recipe]
    else:  # a recipe file; ValueError for a bad one (main reports it)
        recipe = load_recipe(args.recipe, "rank")
        args.recipe, args.recipe_sha256 = recipe.name, recipe.sha256
        values = {**recipe.settings, "adapter_settings": recipe.adapter_config}
        if embedded:  # a smoke run on the generated data: its tiny CLIP, the recipe's optimisation
            values.update({k: RECIPES["mini-counting"][k] for k in ("model", "pretrained")})
    finish_run_args(p, args, {**SETTING_DEFAULTS, **values})
    if args.param_groups == "official" and args.optimizer not in (None, "adamw", "adam"):
        p.error(f"--optimizer {args.optimizer}: the official parameter groups carry AdamW's betas, eps and amsgrad; "
                f"pass --param-groups plain with it, or --optimizer adamw")
    if args.list_size < 2:
        p.error(f"--list-size {args.list_size}: a ranking list needs at least 2 images")
    if args.pair_partners is not None and args.pair_partners < 1:
        p.error(f"--pair-partners {args.pair_partners} must be >= 1 (leave it out for all pairs)")
    return args


def clip_transforms(facts: dict) -> tuple[transforms.Compose, transforms.Compose]:
    """Train and eval transforms: plain bicubic resize (no centre crop, as the official training), CLIP mean/std;
    training adds a horizontal flip."""
    from torchvision import transforms

    size = facts["image_size"]
    base = [transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), transforms.Normalize(facts["mean"], facts["std"])]
    return transforms.Compose([transforms.RandomHorizontalFlip(), *base]), transforms.Compose(base)


def tower_digest(clip: torch.nn.Module) -> str:
    """SHA-256 of every CLIP tensor outside the adapter: equal before and after training, or the towers moved."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        if not name.startswith("visadapt_adapters.") and ".visadapt_adapters." not in name:
            h.update(name.encode())
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(args: argparse.Namespace, data_root: Path, out: Path) -> dict:
    from visadapt import api
    from visadapt.backbones import create_clip
    from visadapt.data.ranking import RankingLists, RankingTable
    from visadapt.engine import TrainConfig, fit, init_adapter_from_file, make_accelerator, seed_everything
    from visadapt.eval.ranking import adapter_scorer, evaluate_ranking, zero_shot_scorer
    from visadapt.io import TRAIN_METADATA, write_json_atomic
    from visadapt.plugin import config_values
    from visadapt.plugins.ranking_clip import (
        RankingLoss,
        RankingModel,
        default_tokenizer,
        official_param_groups,
    )

    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=1,
                         warmup_epochs=args.warmup_epochs, seed=args.seed, progress=not args.no_progress,
                         **run_options(args))
    accelerator = make_accelerator(out, precision=args.precision, **tracking_options(args))
    seed_everything(args.seed)
    clip, facts = create_clip(args.model, args.pretrained)
    train_tf, eval_tf = clip_transforms(facts)
    tables = {split: RankingTable(data_root / f"{split}.csv", train_tf if split == "train" else eval_tf)
              for split in SPLITS}
    tokenizer = default_tokenizer(clip)
    lists = RankingLists(tables["train"], tokenizer, args.list_size, args.negative_ratio, seed=args.seed)
    zero_shot = evaluate_ranking(zero_shot_scorer(clip.eval(), tokenizer), tables["test"],
                                 batch_size=args.eval_batch_size, ordinal=args.ordinal)
    visadapt.attach(clip, "ranking_clip", config_values(args.adapter_config, args.overrides,
                                                        base=args.adapter_settings))
    if args.init_adapter:
        init_adapter_from_file(clip, args.init_adapter)
    digest = tower_digest(clip)
    model = RankingModel(clip, pair_partners=args.pair_partners)
    param_groups = official_param_groups(model, args.weight_decay) if args.param_groups == "official" else None
    counts = api.summary(clip)
    name = data_root.name
    run = {"benchmark": "rank", "dataset": name, "data_root": str(data_root), "model": args.model,
           "pretrained": args.pretrained, "recipe": args.recipe, "data_seed": args.data_seed, "seed": args.seed,
           "adapter": "ranking_clip", "ordinal": args.ordinal, "recipe_sha256": args.recipe_sha256,
           "init_adapter": args.init_adapter, "lr_schedule": config.lr_schedule, "optimizer": config.optimizer,
           "param_groups": args.param_groups}
    accelerator.init_trackers("rank", config=tracker_config({**run, **vars(config)}))
    accelerator.print(f"[rank] ranking_clip on {args.model}: {counts.trainable_params:,} trainable of "
                      f"{counts.total_params:,} params; {len(lists)} lists of {args.list_size} per epoch, "
                      f"{len(tables['val'])} val images; zero-shot test SRCC {zero_shot['all']['srcc']:.3f}")
    best_json, best_file = out / "best.json", out / "best_default.safetensors"

    def evaluator(prepared, accelerator) -> dict[str, float]:
        bare = accelerator.unwrap_model(prepared)
        result = evaluate_ranking(adapter_scorer(bare.clip, tokenizer), tables["val"],
                                  batch_size=args.eval_batch_size, ordinal=args.ordinal)["all"]
        best = json.loads(best_json.read_text())["srcc"] if best_json.is_file() else -2.0
        if result["srcc"] > best and accelerator.is_main_process:
            visadapt.save_adapter(clip, best_file, metadata={TRAIN_METADATA: json.dumps(run, sort_keys=True)})
            write_json_atomic(best_json, {"srcc": result["srcc"]})
        accelerator.wait_for_everyone()
        return {**result, "samples": len(tables["val"])}

    def before_epoch(_model, epoch: int) -> None:
        lists.set_epoch(epoch)

    loss = RankingLoss(rank_weight=args.rank_weight, regression_weight=args.regression_weight,
                       zero_weight=args.zero_weight)
    result = fit(model, lists, None, config, accelerator=accelerator, output_dir=out, resume=args.resume,
                 loss_fn=loss, evaluator=evaluator, metric="srcc", before_epoch=before_epoch, log_prefix="[rank] ",
                 param_groups=param_groups)
    if tower_digest(clip) != digest:
        raise RuntimeError("the frozen CLIP towers changed during training; this is a visadapt bug, please report it")
    visadapt.detach(clip, "default")
    visadapt.load_adapter(clip, best_file)
    test = evaluate_ranking(adapter_scorer(clip, tokenizer), tables["test"], batch_size=args.eval_batch_size,
                            ordinal=args.ordinal)
    metrics = {}
    if accelerator.is_main_process:
        shutil.copyfile(best_file, out / "adapter.safetensors")
        metrics = {
            **run, "adapter_config": {n: r.config.to_dict() for n, r in api.records(clip).items()},
            "epochs": args.epochs, "lr": args.lr, "list_size": args.list_size, "negative_ratio": args.negative_ratio,
            "pair_partners": args.pair_partners, "loss_weights": {"rank": args.rank_weight,
                                                                  "regression": args.regression_weight,
                                                                  "zero": args.zero_weight},
            "val_best_srcc": result.score_best, "best_epoch": result.best_epoch,
            "test": test, "zero_shot": zero_shot, "towers_unchanged": True,
            "trainable_params": counts.trainable_params, "adapter_params": counts.adapter_params,
            "adapter_bytes": (out / "adapter.safetensors").stat().st_size,
            "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from,
            "num_processes": accelerator.num_processes, "history": result.history,
            "visadapt_version": visadapt.__version__,
        }
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The cheap checks come first, each one error line and exit 2: flags, recipe, adapter config, the CLIP name
    # and tag or --pretrained path, the data folder and its CSVs, an output folder holding a run. No model is
    # built and the hub is not contacted before they pass.
    try:
        args = parse_args(argv, prog)
        from visadapt.backbones import check_clip_choice
        from visadapt.engine import check_init_adapter
        from visadapt.plugin import config_values

        settings = config_values(args.adapter_config, args.overrides, base=args.adapter_settings)
        visadapt.get_plugin("ranking_clip")().Config.from_dict(settings)
        if args.init_adapter:  # the header only: the file's plugin and config against this run's
            check_init_adapter(args.init_adapter, "ranking_clip", settings)
        check_clip_choice(args.model, args.pretrained)
        if args.data_root is not None:
            check_data_root(args.data_root, "train.csv, val.csv and test.csv")
    except (ValueError, KeyError, OSError) as err:
        return report_error(err)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from visadapt.backbones import BackboneWeightsError
    from visadapt.data.errors import DatasetError
    from visadapt.data.ranking import generate_mini_counting

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.data_root is None:
        with state.main_process_first():
            args.data_root = str(generate_mini_counting(seed=args.data_seed))
    data_root = Path(args.data_root)
    missing = [f"{s}.csv" for s in SPLITS if not (data_root / f"{s}.csv").is_file()]
    if missing:
        print(f"error: {data_root} lacks {', '.join(missing)}; a ranking dataset folder holds train.csv, val.csv "
              f"and test.csv (tab-separated: filepath, title, cname, value)", file=sys.stderr)
        return 2
    out = Path(args.output_dir or f"runs/rank-{data_root.name}")
    try:
        with task_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state):
            metrics = train(args, data_root, out)
    # what the cheap checks cannot see: CLIP weights that cannot be had, a malformed CSV
    except (FileExistsError, BackboneWeightsError, DatasetError) as err:
        return report_error(err, state)
    if state.is_main_process:
        print(f"\n[{metrics['dataset']} test] {metrics['test']['images']} images")
        for label, record in (("zero-shot CLIP", metrics["zero_shot"]), ("ranking adapter", metrics["test"])):
            m = record["all"]
            print(f"  {label:<16} PLCC {m['plcc']:6.3f}  SRCC {m['srcc']:6.3f}  MAE {m['mae']:5.2f}  "
                  f"pair acc official {m['pair_acc_official']:.3f}  strict {m['pair_acc_strict']:.3f}")
        print(f"table: visadapt-eval --benchmark rank --adapters {out}")
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
