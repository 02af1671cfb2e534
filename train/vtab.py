"""Train an adapter on a frozen backbone for VTAB-1k, FGVC or the embedded mini-VTAB, one task after another.

    accelerate launch train/vtab.py              # embedded default: procedural mini-VTAB, no download
    accelerate launch train/vtab.py --model vit_base_patch16_224.augreg_in21k --adapter lora \\
        --benchmark vtab --task cifar100 --data-root /data/vtab-1k
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train/vtab.py --task digits  # 2 CPU procs

Per task it writes ``<output-dir>/<task>/adapter.safetensors`` (the adapter and the head, one file) and
``metrics.json`` (final-epoch accuracy and the best accuracy seen during training, both labelled, trainable
parameters, bytes on disk, wall time). ``visadapt-eval`` turns a run directory into the paper-style table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import timm
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

import visadapt
from visadapt import api
from visadapt.backbones import EMBEDDED_MODEL, create_backbone
from visadapt.data import build_datasets, resolve_normalization
from visadapt.data.procedural import default_data_root, generate_mini_vtab
from visadapt.data.tasks import benchmark_tasks, resolve_tasks
from visadapt.data.verify import verify_benchmark
from visadapt.engine import (
    TrainConfig,
    add_run_flags,
    finish_run_args,
    fit,
    make_accelerator,
    prepare_output_dir,
    seed_everything,
)
from visadapt.io import TRAIN_METADATA, write_json_atomic
from visadapt.plugin import config_values

# Recipes per benchmark; every value can be overridden by its flag. VTAB-1k / FGVC: the common recipe of
# NOAH, PETL-ViT and V-PETL Bench. mini-vtab: sized to finish on 2 CPU cores in a few minutes.
RECIPES = {
    "vtab": {"model": "vit_base_patch16_224.augreg_in21k", "epochs": 100, "lr": 1e-3, "weight_decay": 1e-4,
             "batch_size": 64, "warmup_epochs": 10, "eval_every": 10},
    "fgvc": {"model": "vit_base_patch16_224.augreg_in21k", "epochs": 100, "lr": 1e-3, "weight_decay": 1e-4,
             "batch_size": 64, "warmup_epochs": 10, "eval_every": 10},
    "mini-vtab": {"model": EMBEDDED_MODEL, "epochs": 6, "lr": 5e-3, "weight_decay": 1e-4, "batch_size": 50,
                  "warmup_epochs": 1, "eval_every": 1},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/vtab.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", default="mini-vtab", choices=sorted(RECIPES))
    p.add_argument("--task", nargs="+", default=["all"], help="task names or aliases, or 'all'")
    p.add_argument("--data-root", default=None,
                   help="folder holding one directory per task; mini-vtab: generated here when missing "
                        "(default: the visadapt cache)")
    p.add_argument("--model", default=None, help="timm model name (default: the benchmark's recipe)")
    p.add_argument("--pretrained", default="default",
                   help="backbone weights: 'default' (timm's for --model), 'none', a local file, or a hub repo id")
    p.add_argument("--adapter", default="adapter", help="registered plugin (see `visadapt list`); 'linear' "
                                                        "trains the head only")
    p.add_argument("--adapter-config", default=None, help="YAML file with the plugin's config fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (value parsed as YAML); repeatable")
    p.add_argument("--split", default="final", choices=["final", "tune"],
                   help="final: train800val200 -> test (FGVC train+val -> test); tune: train800 -> val200")
    p.add_argument("--normalize", default="model", choices=["model", "imagenet", "none"],
                   help="input normalisation: the backbone's own statistics, ImageNet's, or none (published "
                        "VTAB numbers differ by this choice; it is recorded with every result)")
    p.add_argument("--input-size", type=int, default=None, help="default: the backbone's input size")
    for flag, kind in (("epochs", int), ("lr", float), ("weight-decay", float), ("batch-size", int),
                       ("warmup-epochs", float), ("eval-every", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the benchmark's recipe")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="also checkpoint mid-epoch every N optimiser steps (epoch ends are always saved)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="how many recent checkpoints to keep per task")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0, help="mini-vtab only: seed of the generated images")
    p.add_argument("--output-dir", default=None, help="default: runs/<benchmark>-<adapter>")
    add_run_flags(p, resume_help="continue from the newest checkpoint of each task; finished tasks are kept",
                  overwrite_help="discard earlier results in --output-dir")
    args = p.parse_args(argv)
    return finish_run_args(p, args, RECIPES[args.benchmark])


def adapter_settings(args: argparse.Namespace) -> dict:
    """Plugin config from ``--adapter-config`` then ``--set key=value`` (later wins)."""
    return config_values(args.adapter_config, args.overrides)


def train_task(args: argparse.Namespace, info, data_root: Path, out: Path, plugin, adapter_config) -> dict:
    """Train one task; returns its metrics (also written to ``out/metrics.json``)."""
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                         warmup_epochs=args.warmup_epochs, grad_accum_steps=args.grad_accum, seed=args.seed,
                         eval_every=args.eval_every, checkpoint_every_steps=args.checkpoint_every_steps,
                         keep_checkpoints=args.keep_checkpoints,
                         num_workers=args.num_workers, progress=not args.no_progress)
    accelerator = make_accelerator(out, grad_accum_steps=args.grad_accum)
    seed_everything(args.seed)
    model = create_backbone(args.model, args.pretrained, num_classes=info.num_classes)
    normalization = resolve_normalization(args.normalize, model)
    input_size = args.input_size or int(model.pretrained_cfg["input_size"][-1])
    train_set, eval_set = build_datasets(args.benchmark, data_root, info.name, protocol=args.split,
                                         input_size=input_size, normalization=normalization)
    # What the run trained on, recorded in metrics.json: the task's split files (hashes, per-class counts), and
    # every protocol defect visadapt-data verify finds (reported, not fatal: the loaders accepted the folder)
    data_report = verify_benchmark(data_root, args.benchmark, tasks=[info.name], check_images=False)
    for problem in data_report.problems[:10]:
        accelerator.print(f"[{info.name}] data notice: {problem}")
    head = model.pretrained_cfg.get("classifier") or "head"
    # A plugin with its own classifier (a quantised head) replaces the model's, which then stays frozen.
    owns_head = plugin.replaces_head(adapter_config)
    visadapt.attach(model, plugin, adapter_config, head=None if owns_head else head)
    counts = api.summary(model)
    run = {"benchmark": args.benchmark, "task": info.name, "model": args.model, "pretrained": args.pretrained,
           "normalize": args.normalize, "input_size": input_size, "protocol": args.split,
           "data_seed": args.data_seed, "seed": args.seed}
    accelerator.init_trackers(info.name, config={**run, **{k: str(v) for k, v in adapter_config.to_dict().items()},
                                                 **{k: v for k, v in vars(config).items() if k != "progress"}})
    accelerator.print(f"[{info.name}] {args.adapter} on {args.model}: {counts.trainable_params:,} trainable of "
                      f"{counts.total_params:,} params; {len(train_set)} train / {len(eval_set)} eval images")
    result = fit(model, train_set, eval_set, config, accelerator=accelerator, output_dir=out, resume=args.resume,
                 log_prefix=f"[{info.name}] ")
    metrics = {}
    if accelerator.is_main_process:
        adapter_file = visadapt.save_adapter(model, out / "adapter.safetensors",
                                             metadata={TRAIN_METADATA: json.dumps(run, sort_keys=True)})
        metrics = {
            "benchmark": args.benchmark, "task": info.name, "title": info.title, "group": info.group,
            "num_classes": info.num_classes, "model": args.model, "pretrained": args.pretrained,
            "adapter": args.adapter, "adapter_config": adapter_config.to_dict(), "protocol": args.split,
            "train_split": "train800val200" if args.split == "final" else "train800",
            "eval_split": "test" if args.split == "final" else "val200",
            "normalize": args.normalize, "input_size": input_size, "seed": args.seed, "epochs": args.epochs,
            "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
            "warmup_epochs": args.warmup_epochs,
            "accuracy_final": result.score_final,  # the adapter in adapter.safetensors
            "accuracy_best": result.score_best,    # best eval during training: optimistic, as papers report
            "best_epoch": result.best_epoch, "eval_samples": result.eval_samples,
            "trainable_params": counts.trainable_params,
            "adapter_params": counts.trainable_params - counts.head_params, "head_params": counts.head_params, "adapter_bytes": adapter_file.stat().st_size,
            "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from,
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "history": result.history, "adapter_file": adapter_file.name, "visadapt_version": visadapt.__version__,
            "torch_version": torch.__version__, "timm_version": timm.__version__,
            "device": str(accelerator.device), "data_root": str(data_root),
            "data_manifest_sha256": data_report.manifest_sha256(), "data_problems": len(data_report.problems),
        }
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = resolve_tasks(args.benchmark, args.task)
        plugin = visadapt.get_plugin(args.adapter)()
        adapter_config = plugin.Config.from_dict(adapter_settings(args))  # a bad config fails before any work
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Same device choice as the Accelerator each task builds (ACCELERATE_USE_CPU is set by `launch --cpu`).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and state.num_processes == 1:
        # Each launched process would otherwise train alone and overwrite the others' files.
        print(f"error: {os.environ['WORLD_SIZE']} processes were launched but Accelerate sees one; on a machine "
              f"without GPUs launch with ACCELERATE_USE_CPU=true (accelerate launch --multi_gpu --num_processes N)",
              file=sys.stderr)
        return 2
    if args.data_root is None:
        if args.benchmark != "mini-vtab":
            print(f"error: --benchmark {args.benchmark} needs --data-root, the folder with one directory per task "
                  f"({', '.join(list(benchmark_tasks(args.benchmark))[:3])}, ...)", file=sys.stderr)
            return 2
        args.data_root = str(default_data_root(args.data_seed))
    data_root = Path(args.data_root)
    if args.benchmark == "mini-vtab":
        with state.main_process_first():  # one process generates, the others then find it complete
            generate_mini_vtab(data_root, seed=args.data_seed)
    output_dir = Path(args.output_dir or f"runs/{args.benchmark}-{args.adapter}")

    results = {}
    for info in tasks:
        out = output_dir / info.name
        done = out / "metrics.json"
        if done.is_file() and args.resume:
            state.print(f"[{info.name}] finished earlier; keeping {done}")
            results[info.name] = json.loads(done.read_text())
            continue
        try:
            prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state)
        except FileExistsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        results[info.name] = train_task(args, info, data_root, out, plugin, adapter_config)

    if state.is_main_process:
        print(f"\n{'task':<22}{'final acc':>10}{'best acc':>10}  adapter file")
        for name, m in results.items():
            print(f"{name:<22}{m['accuracy_final']:>9.2f}%{m['accuracy_best']:>9.2f}%  "
                  f"{output_dir / name / m['adapter_file']}")
        print(f"\nfinal acc = the saved final-epoch adapter; best acc = best test accuracy during training "
              f"(optimistic).\ntable: visadapt-eval --benchmark {args.benchmark} --adapters {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
