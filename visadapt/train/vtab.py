"""Train an adapter on a frozen backbone for VTAB-1k, FGVC or the embedded mini-VTAB, one task after another.

    accelerate launch train/vtab.py              # embedded default: procedural mini-VTAB, no download
    accelerate launch train/vtab.py --model vit_base_patch16_224.augreg_in21k --adapter lora \\
        --benchmark vtab --task cifar100 --data-root /data/vtab-1k
    accelerate launch train/vtab.py --recipe bi-adaptformer-dim32-vtab --task all --data-root /data/vtab-1k \\
        --seeds 0,1,2                            # a published recipe (assets/recipes), three seeds
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train/vtab.py --task digits  # 2 CPU procs

Per task it writes ``<output-dir>/<task>/adapter.safetensors`` (the adapter and the head, one file) and
``metrics.json``; with ``--seeds`` each seed gets its own ``<output-dir>/seed_<n>/<task>/``. ``visadapt-eval``
turns a run directory into the paper-style table (mean ± std over the seeds it finds).

Two protocols (``--split``):

* ``final`` (default): train on train800val200 (FGVC: train+val), evaluate on test. The adapter file holds the
  final epoch's adapter; ``accuracy_final`` is its test accuracy, the number tables show by default.
  ``accuracy_best`` is the best test accuracy of any evaluation: picked on the test set itself, so optimistic.
* ``tune``: train on train800 (FGVC: train); every evaluation measures val200 (FGVC: val) AND test. The
  evaluation with the best validation accuracy (the earliest of equals) is selected, its test accuracy is
  ``accuracy_val_selected``, and the adapter file holds the adapter of that evaluation, so the file and the
  reported number always belong together. ``accuracy_final`` / ``accuracy_best`` are the test accuracies of the
  last / best-on-test evaluation of the same run.

A recipe (``--recipe NAME`` from ``assets/recipes``, or a YAML path) supplies the published hyperparameters:
its values become the defaults, flags given on the command line win, and its ``per_task`` entries (e.g. the
1-bit adapters' per-task scale) apply to their task. Every ``metrics.json`` records the recipe (name, sha256,
what was overridden), the input normalisation (mean/std values), the image format and sizes of the data, the
resolution, seed, device, the visadapt/torch/timm versions and the data manifest hash.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

# Only what parsing needs is imported here (no torch, timm or diffusers: --help and a parse error answer at once,
# tests/test_flags.py); each function imports the heavy modules it uses.
import visadapt
from visadapt.names import NORMALIZATION_CHOICES, PROTOCOLS
from visadapt.recipes import (
    BACKBONE_SETTINGS,
    BENCHMARK_DEFAULTS,
    COMMON_DEFAULTS,
    SETTING_TYPES,
    Recipe,
    available_recipes,
    load_recipe,
)
from visadapt.tracking import tracker_config, tracking_options
from visadapt.train.flags import SetOverride, add_run_flags, finish_run_args, run_options, run_script
from visadapt.train.preflight import check_data_root, refuse_existing_runs, report_error, task_output_dir

# ----------------------------------------------------------------------------------------------- arguments

def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; repeated or negative seeds are an error."""
    try:
        seeds = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct non-negative seeds, e.g. 0,1,2")
    return seeds


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one: ``None`` stands for 'from the recipe, else the benchmark',
    which each of those flags' help says in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The command line as given: every recipe-settable flag left out is ``None`` (see :func:`plan_run`)."""
    p = argparse.ArgumentParser(prog=prog or "train/vtab.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help=f"published recipe: a name in assets/recipes ({', '.join(available_recipes())}) or a "
                        "YAML file; its values become the defaults, flags given here win, its per-task entries "
                        "apply to their task")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--benchmark", default=None, choices=sorted(BENCHMARK_DEFAULTS),
                   help="default: the recipe's benchmark, else mini-vtab. A recipe run on another benchmark (e.g. "
                        "--benchmark mini-vtab --epochs 1 as a smoke test) keeps the recipe's optimisation, "
                        "normalisation and adapter settings but takes that benchmark's backbone (model, pretrained, "
                        "input size) unless given as flags; the recipe's per-task entries name tasks of its own "
                        "benchmark and are reported as not applied")
    p.add_argument("--task", nargs="+", default=["all"], help="task names or aliases, or 'all'")
    p.add_argument("--data-root", default=None,
                   help="folder holding one directory per task; mini-vtab: generated here when missing "
                        "(default: the visadapt cache)")
    p.add_argument("--model", default=None, help="timm model name (default: the recipe's, else the benchmark's)")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights: 'default' (timm's for --model), 'none', a local file, or a hub repo id "
                        "(default: 'default')")
    p.add_argument("--adapter", default=None, help="registered plugin (see `visadapt list`); 'linear' trains the "
                                                   "head only (default: the recipe's, else 'adapter')")
    p.add_argument("--adapter-config", default=None, help="YAML file with the plugin's config fields (over the "
                                                          "recipe's)")
    p.add_argument("--set", dest="overrides", action=SetOverride, default=[], metavar="KEY=VALUE",
                   help="override one config field (value parsed as YAML); repeatable; wins over the recipe and "
                        "--adapter-config")
    p.add_argument("--split", default="final", choices=sorted(PROTOCOLS),
                   help="final: train800val200 -> test (FGVC train+val -> test), the final epoch's adapter is saved; "
                        "tune: train800 -> val200 and test at every evaluation (FGVC train -> val and test), the "
                        "adapter of the best validation accuracy is saved and its test accuracy reported")
    p.add_argument("--normalize", default=None, choices=list(NORMALIZATION_CHOICES),
                   help="input normalisation: the backbone's own statistics, ImageNet's, or none (published "
                        "VTAB numbers differ by this choice; its mean/std are recorded with every result) "
                        "(default: the recipe's, else 'model')")
    p.add_argument("--input-size", type=int, default=None, help="default: the recipe's, else the backbone's")
    for flag, kind in (("epochs", int), ("lr", float), ("weight-decay", float), ("batch-size", int),
                       ("warmup-epochs", float), ("eval-every", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's, else the benchmark's")
    p.add_argument("--label-smoothing", type=float, default=None, help="cross-entropy label smoothing (default: "
                                                                       "the recipe's, else 0)")
    p.add_argument("--drop-path-rate", type=float, default=None,
                   help="stochastic depth of the frozen backbone during training (default: the recipe's, else 0)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="also checkpoint mid-epoch every N optimiser steps (epoch ends are always saved)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="how many recent checkpoints to keep per task")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes (default: 8 or the CPUs available when training on a GPU, "
                        "else 0)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="serve images from the decoded-image cache: each split is decoded once into "
                        "<task folder>/.visadapt_cache/ (or --cache-dir), rebuilt when its split file or images "
                        "change, checksummed on open, and fed to the device as uint8 (normalised there). The "
                        "evaluation splits are cached only when the run evaluates them more than once. Default: on "
                        "when training on a GPU (decoding every epoch cannot keep up with one), off on a CPU")
    p.add_argument("--cache-dir", default=None,
                   help="keep the decoded-image caches under DIR/<benchmark>/<task>/ (for a read-only or slow data "
                        "folder); implies --cache")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None,
                       help="one run, written to <output-dir>/<task>/ (default: the recipe's, else 0)")
    seeds.add_argument("--seeds", type=parse_seeds, default=None, metavar="S1,S2,...",
                       help="one run per seed, each written to <output-dir>/seed_<n>/<task>/ (also for a single "
                            "seed, so that more seeds can be added later with --resume)")
    p.add_argument("--data-seed", type=int, default=0, help="mini-vtab only: seed of the generated images")
    p.add_argument("--output-dir", default=None, help="default: runs/<benchmark>-<recipe or adapter>")
    add_run_flags(p, resume_help="continue from the newest checkpoint of each task; finished tasks are kept",
                  overwrite_help="discard earlier results in --output-dir", init_adapter=True)
    args = finish_run_args(p, p.parse_args(argv))
    if args.cache is False and args.cache_dir is not None:
        p.error("--cache-dir says where to keep the decoded-image cache; it contradicts --no-cache")
    return args


class RunPlan(NamedTuple):
    """What a run will do, decided and checked before any training starts.

    ``task_args[task]`` is the argument namespace of one task: the command line, then the recipe (its per-task
    entry first), then the benchmark's defaults. ``adapter_configs[task]`` is its built plugin config and
    ``config_fields[task]`` the fields it was built from.
    """

    benchmark: str
    tasks: list
    seeds: list[int] | None
    plugin: Any
    task_args: dict[str, argparse.Namespace]
    adapter_configs: dict[str, Any]
    config_fields: dict[str, dict[str, Any]]
    recipe: Recipe | None
    notices: list[str]

    @property
    def recipe_tasks_apply(self) -> bool:
        """Whether the recipe's per-task entries apply: only on the recipe's own benchmark."""
        return self.recipe is not None and self.recipe.benchmark == self.benchmark

    def args_for(self, task: str, seed: int | None) -> argparse.Namespace:
        """The namespace :func:`train_task` gets for ``task`` (and ``seed`` of ``--seeds``), with the recipe
        record metrics.json carries."""
        values = dict(vars(self.task_args[task]))
        if seed is not None:
            values["seed"] = seed
        if self.recipe is not None:
            values["recipe_record"] = _recipe_record(self.recipe, task if self.recipe_tasks_apply else None, values,
                                                     self.config_fields[task], self.recipe_tasks_apply)
        return argparse.Namespace(**values)


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Load the recipe, choose the benchmark, fill every unset flag per task, and build each task's plugin
    config, so that a bad recipe, flag, config, backbone name or ``--pretrained`` path fails before any work
    (``ValueError`` / ``KeyError`` / ``FileNotFoundError``)."""
    from visadapt.backbones import check_backbone_choice
    from visadapt.data.tasks import resolve_tasks
    from visadapt.plugin import config_values

    recipe = load_recipe(args.recipe) if args.recipe else None
    benchmark = args.benchmark or (recipe.benchmark if recipe else "mini-vtab")
    if recipe and args.adapter is not None and args.adapter != recipe.adapter:
        raise ValueError(f"--adapter {args.adapter} contradicts recipe {recipe.name!r}, which trains "
                         f"{recipe.adapter!r}; drop --adapter, or drop --recipe")
    tasks = resolve_tasks(benchmark, args.task)
    explicit = {key: getattr(args, key) for key in SETTING_TYPES if getattr(args, key) is not None}
    notices: list[str] = []
    own_benchmark = recipe is None or recipe.benchmark == benchmark
    if recipe and not own_benchmark:
        replaced = [k for k in BACKBONE_SETTINGS if k in recipe.settings and k not in explicit]
        if replaced:
            notices.append(f"recipe {recipe.name} is for {recipe.benchmark}; on {benchmark} its "
                           f"{', '.join(f'{k}={recipe.settings[k]}' for k in replaced)} give way to {benchmark}'s "
                           "defaults")
        if recipe.per_task:
            notices.append(f"recipe {recipe.name}: per-task entries for {', '.join(recipe.per_task)} "
                           f"({recipe.benchmark} tasks) are not applied on {benchmark}")
    plugin = visadapt.get_plugin(args.adapter or (recipe.adapter if recipe else COMMON_DEFAULTS["adapter"]))()
    task_args: dict[str, argparse.Namespace] = {}
    adapter_configs: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {}
    backbones: set[tuple[str, str | None]] = set()
    for info in tasks:
        recipe_task = info.name if own_benchmark else None
        values = {**COMMON_DEFAULTS, **BENCHMARK_DEFAULTS[benchmark]}
        if recipe:
            from_recipe = recipe.task_settings(recipe_task)
            if not own_benchmark:
                from_recipe = {k: v for k, v in from_recipe.items() if k not in BACKBONE_SETTINGS}
            values.update(from_recipe)
        values.update(explicit)
        values.update(benchmark=benchmark, adapter=plugin.name)
        base = recipe.adapter_values(recipe_task) if recipe else {}
        fields[info.name] = config_values(args.adapter_config, args.overrides, base=base)
        adapter_configs[info.name] = plugin.Config.from_dict(fields[info.name])  # a bad config fails before any work
        task_args[info.name] = argparse.Namespace(**{**vars(args), **values})
        backbones.add((task_args[info.name].model, task_args[info.name].pretrained))
    for model, pretrained in sorted(backbones, key=str):  # names and paths only: nothing is built or downloaded
        check_backbone_choice(model, pretrained)
    return RunPlan(benchmark, tasks, args.seeds, plugin, task_args, adapter_configs, fields, recipe, notices)


def _recipe_record(recipe: Recipe, task: str | None, values: dict, config_fields: dict, own_benchmark: bool) -> dict:
    """What metrics.json says about the recipe: which file, which per-task entry applied, what differs."""
    published = recipe.task_settings(task)
    published_config = recipe.adapter_values(task)
    overridden = {k: v for k, v in published.items() if values.get(k) != v}
    overridden.update({f"adapter_config.{k}": v for k, v in published_config.items() if config_fields.get(k) != v})
    return {
        "name": recipe.name, "file": str(recipe.path), "sha256": recipe.sha256, "benchmark": recipe.benchmark,
        "source": recipe.source, "per_task_applied": recipe.per_task.get(task, {}) if own_benchmark else {},
        # recipe values this run did not use (a flag, --set or another benchmark replaced them): key -> recipe value
        "overridden": overridden,
        "not_published": recipe.not_published, "deviations": recipe.deviations,
    }


# ----------------------------------------------------------------------------------------------- data facts

def describe_images(datasets: dict[str, Any]) -> dict[str, dict]:
    """Per split: how many images of each file format (read from the file headers, not the names) and the
    range of their stored sizes. ``datasets`` maps split names to ``ImageListDataset``s.

    Recorded because VTAB-1k copies differ in how they were dumped (PNG vs re-encoded JPEG shifts CIFAR-100 by
    points); an image PIL cannot identify is counted as ``unreadable``, never skipped.
    """
    described = {}
    for split, dataset in datasets.items():
        formats: Counter = Counter()
        widths, heights = [], []
        for path, _ in dataset.samples:
            try:
                with Image.open(path) as img:  # lazy: reads the header only
                    formats[(img.format or "unknown").lower()] += 1
                    widths.append(img.size[0])
                    heights.append(img.size[1])
            # Any failure to parse a header (a decompression bomb's DecompressionBombError included) is counted;
            # the decode of that item then raises a DatasetError naming it.
            except Exception:  # noqa: BLE001
                formats["unreadable"] += 1
        described[split] = {"images": len(dataset.samples), "formats": dict(sorted(formats.items())),
                            "min_size": [min(widths), min(heights)] if widths else None,
                            "max_size": [max(widths), max(heights)] if widths else None}
    return described


def image_format_summary(described: dict[str, dict]) -> str:
    """One word when every image has the same format (``png``), else the counts (``jpeg 990, png 10``)."""
    total: Counter = Counter()
    for split in described.values():
        total.update(split["formats"])
    if len(total) == 1:
        return next(iter(total))
    return ", ".join(f"{name} {count}" for name, count in sorted(total.items()))


# ----------------------------------------------------------------------------------------------- training

def _split_names(benchmark: str, protocol: str) -> tuple[str, str]:
    train_split, eval_split = PROTOCOLS[protocol]["fgvc" if benchmark == "fgvc" else "vtab"]
    name = "+".join(train_split) if isinstance(train_split, tuple) else train_split
    return name, eval_split


def data_cache_choice(args: argparse.Namespace, on_gpu: bool) -> bool | str:
    """``build_datasets``' ``cache`` for this run: ``False``, ``"train"`` (the training split) or ``True`` (every
    split). On by default on a GPU or with ``--cache-dir``; the evaluation splits join only when the run evaluates
    them more than once (``--eval-every`` below ``--epochs``), since a split read once costs a full decode
    either way and its cache would only add the write."""
    wanted = args.cache if args.cache is not None else (args.cache_dir is not None or on_gpu)
    if not wanted:
        return False
    evaluations = -(-args.epochs // args.eval_every)
    return True if evaluations > 1 else "train"


def train_task(args: argparse.Namespace, info, data_root: Path, out: Path, plugin, adapter_config) -> dict:
    """Train one task with the settings in ``args``; returns its metrics (also written to ``out/metrics.json``)."""
    import accelerate
    import timm
    import torch

    from visadapt import api
    from visadapt.backbones import create_backbone
    from visadapt.data import build_datasets, resolve_normalization
    from visadapt.data.cache import default_workers
    from visadapt.data.verify import verify_benchmark
    from visadapt.engine import (
        TEST_METRIC,
        TrainConfig,
        fit,
        init_adapter_from_file,
        make_accelerator,
        precision_name,
        seed_everything,
        validation_selected,
    )
    from visadapt.io import TRAIN_METADATA, write_json_atomic

    accelerator = make_accelerator(out, grad_accum_steps=args.grad_accum, precision=args.precision,
                                   **tracking_options(args))
    on_gpu = accelerator.device.type == "cuda"
    # A GPU needs loader workers to be fed (decoding the splits that are not cached); a CPU run keeps its cores.
    num_workers = args.num_workers if args.num_workers is not None else min(8, default_workers()) if on_gpu else 0
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                         warmup_epochs=args.warmup_epochs, grad_accum_steps=args.grad_accum, seed=args.seed,
                         eval_every=args.eval_every, label_smoothing=args.label_smoothing,
                         checkpoint_every_steps=args.checkpoint_every_steps, keep_checkpoints=args.keep_checkpoints,
                         num_workers=num_workers, progress=not args.no_progress, **run_options(args))
    seed_everything(args.seed)
    backbone_options = {"drop_path_rate": args.drop_path_rate} if args.drop_path_rate else {}
    model = create_backbone(args.model, args.pretrained, num_classes=info.num_classes, input_size=args.input_size,
                            **backbone_options)
    normalization = resolve_normalization(args.normalize, model)
    input_size = args.input_size or int(model.pretrained_cfg["input_size"][-1])
    tune = args.split == "tune"
    cache = data_cache_choice(args, on_gpu)
    data_options = {"input_size": input_size, "normalization": normalization, "cache": cache,
                    "cache_dir": args.cache_dir if cache else None}
    # One process builds a missing cache, the others then open it (racing builds are safe, but wasted work).
    with accelerator.main_process_first():
        if cache:
            which = "every split" if cache is True else "the training split"
            accelerator.print(f"[{info.name}] decoded-image cache: {which} (built on first use, one decode pass)")
        train_set, eval_set = build_datasets(args.benchmark, data_root, info.name, protocol=args.split,
                                             **data_options)
        # tune: the test split is measured at every evaluation too, and reported at the validation-selected one.
        test_set = build_datasets(args.benchmark, data_root, info.name, protocol="final",
                                  **data_options)[1] if tune else None
    train_split, eval_split = _split_names(args.benchmark, args.split)
    # What the run trained on, recorded in metrics.json: the task's split files (hashes, per-class counts), and
    # every protocol defect visadapt-data verify finds (reported, not fatal: the loaders accepted the folder)
    data_report = verify_benchmark(data_root, args.benchmark, tasks=[info.name], check_images=False)
    for problem in data_report.problems[:10]:
        accelerator.print(f"[{info.name}] data notice: {problem}")
    head = model.pretrained_cfg.get("classifier") or "head"
    # A plugin with its own classifier (a quantised head) replaces the model's, which then stays frozen.
    owns_head = plugin.replaces_head(adapter_config)
    visadapt.attach(model, plugin, adapter_config, head=None if owns_head else head)
    if args.init_adapter:  # every task starts from the file (its head too: a task of another class count fails)
        init_adapter_from_file(model, args.init_adapter)
    counts = api.summary(model)
    recipe = getattr(args, "recipe_record", None)
    run = {"benchmark": args.benchmark, "task": info.name, "model": args.model, "pretrained": args.pretrained,
           "normalize": args.normalize, "input_size": input_size, "protocol": args.split,
           "data_seed": args.data_seed, "seed": args.seed, "recipe": recipe["name"] if recipe else None,
           # re-evaluation (visadapt-eval) runs at the precision the run was trained and evaluated at
           "precision": precision_name(accelerator.mixed_precision)}
    accelerator.init_trackers(info.name,
                              config=tracker_config({**run, **adapter_config.to_dict(), **vars(config)}))
    evaluated = f"{len(eval_set)} {eval_split}" + (f" + {len(test_set)} test" if tune else "")
    accelerator.print(f"[{info.name}] {args.adapter} on {args.model} (seed {args.seed}): {counts.trainable_params:,} "
                      f"trainable of {counts.total_params:,} params; {len(train_set)} {train_split} / {evaluated} "
                      f"images")
    result = fit(model, train_set, eval_set, config, accelerator=accelerator, output_dir=out, resume=args.resume,
                 log_prefix=f"[{info.name}] ", test_dataset=test_set, keep_best=tune)
    metrics = {}
    if accelerator.is_main_process:
        adapter_file = visadapt.save_adapter(model, out / "adapter.safetensors",
                                             metadata={TRAIN_METADATA: json.dumps(run, sort_keys=True)})
        if tune:
            # In metrics.json "accuracy" is the test accuracy under both protocols; validation is "val_accuracy".
            history = [{**{k: v for k, v in entry.items() if k not in ("accuracy", TEST_METRIC)},
                        **({"val_accuracy": entry["accuracy"], "accuracy": entry[TEST_METRIC]}
                           if "accuracy" in entry else {})} for entry in result.history]
            chosen = validation_selected(history, "val_accuracy")
            tested = [entry for entry in history if "accuracy" in entry]
            best_test = max(tested, key=lambda entry: entry["accuracy"])  # the first of equals, as in fit
            scores = {
                "accuracy_val_selected": chosen["accuracy"],  # the adapter in adapter.safetensors
                "val_selected_epoch": int(chosen["epoch"]), "val_accuracy_selected": chosen["val_accuracy"],
                "accuracy_final": tested[-1]["accuracy"], "val_accuracy_final": tested[-1]["val_accuracy"],
                "accuracy_best": best_test["accuracy"], "best_epoch": int(best_test["epoch"]),
                "adapter_checkpoint": f"validation-selected (epoch {int(chosen['epoch'])})",
                "selection_split": eval_split, "selection_samples": len(eval_set),
            }
            described = describe_images({train_split: train_set, eval_split: eval_set, "test": test_set})
        else:
            history = result.history
            scores = {
                "accuracy_final": result.score_final,  # the adapter in adapter.safetensors
                "accuracy_best": result.score_best,    # best eval during training: optimistic, as papers report
                "best_epoch": result.best_epoch, "adapter_checkpoint": "final epoch",
            }
            described = describe_images({train_split: train_set, eval_split: eval_set})
        mean, std = normalization if normalization is not None else (None, None)
        metrics = {
            "benchmark": args.benchmark, "task": info.name, "title": info.title, "group": info.group,
            "num_classes": info.num_classes, "model": args.model, "pretrained": args.pretrained,
            "adapter": args.adapter, "adapter_config": adapter_config.to_dict(), "protocol": args.split,
            "train_split": train_split, "eval_split": "test", "normalize": args.normalize,
            "normalization": {"choice": args.normalize, "mean": list(mean) if mean else None,
                              "std": list(std) if std else None},
            "input_size": input_size, "resolution": [input_size, input_size],
            "image_format": image_format_summary(described), "images": described,
            "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
            "batch_size": args.batch_size, "warmup_epochs": args.warmup_epochs, "eval_every": args.eval_every,
            "label_smoothing": args.label_smoothing, "drop_path_rate": args.drop_path_rate,
            **scores, "eval_samples": len(test_set) if tune else result.eval_samples,
            "trainable_params": counts.trainable_params,
            "adapter_params": counts.trainable_params - counts.head_params, "head_params": counts.head_params,
            "adapter_bytes": adapter_file.stat().st_size,
            "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from,
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "precision": result.precision, "compiled": result.compiled, "attention": result.attention,
            "num_workers": config.num_workers,
            "data_cache": {split: str(getattr(dataset, "cache_path", "")) or None
                           for split, dataset in ((train_split, train_set), (eval_split, eval_set),
                                                  ("test", test_set)) if dataset is not None},
            "history": history, "adapter_file": adapter_file.name, "visadapt_version": visadapt.__version__,
            "torch_version": torch.__version__, "timm_version": timm.__version__,
            "accelerate_version": accelerate.__version__, "python_version": platform.python_version(),
            "device": str(accelerator.device),
            "device_name": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "data_root": str(data_root),
            "data_manifest_sha256": data_report.manifest_sha256(), "data_problems": len(data_report.problems),
            "recipe": recipe["name"] if recipe else None, "recipe_sha256": recipe["sha256"] if recipe else None,
            "recipe_details": recipe, "init_adapter": args.init_adapter,
        }
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


SEED_DIR = "seed_{}"


def _print_recipes() -> None:
    for name in available_recipes():
        recipe = load_recipe(name)
        per_task = sorted({k for entry in recipe.per_task.values() for k in entry})
        print(f"{name:<32} {recipe.benchmark:<6} {recipe.adapter:<11} per task: {', '.join(per_task) or '-'}\n"
              f"{'':<32} {recipe.source['paper']}")


def seeded_config(plan: RunPlan, task: str, seed: int):
    """The task's plugin config for a run of ``seed``: a plugin with a ``seed`` field of its own (MoSA's masks
    and module draws) takes the run's seed unless the config or recipe set it, so that ``--seeds 0,1,2`` varies
    everything random about the method, not only the initialisation and data order."""
    config = plan.adapter_configs[task]
    if "seed" in {f.name for f in dataclasses.fields(config)} and "seed" not in plan.config_fields[task]:
        return dataclasses.replace(config, seed=seed)
    return config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from accelerate import PartialState  # after parsing: --help and parse errors load none of these
    from accelerate.utils import parse_flag_from_env

    from visadapt.backbones import BackboneWeightsError
    from visadapt.data.errors import DatasetError
    from visadapt.data.procedural import default_data_root, generate_mini_vtab
    from visadapt.data.tasks import benchmark_tasks
    from visadapt.data.vtab import find_task_dir
    from visadapt.engine import check_init_adapter

    if args.list_recipes:
        _print_recipes()
        return 0
    # The cheap checks come first, each one error line and exit 2: the recipe, task, adapter and config names,
    # the backbone name and a --pretrained path (plan_run); then the data folder and the output folders. No model
    # is built and the hub is not contacted before they pass.
    try:
        plan = plan_run(args)
    except (ValueError, KeyError, OSError) as err:
        return report_error(err)
    benchmark = plan.benchmark
    if args.data_root is None and benchmark != "mini-vtab":
        print(f"error: --benchmark {benchmark} needs --data-root, the folder with one directory per task "
              f"({', '.join(list(benchmark_tasks(benchmark))[:3])}, ...)", file=sys.stderr)
        return 2
    if args.data_root is not None and (benchmark != "mini-vtab" or Path(args.data_root).exists()):
        try:  # a mini-vtab folder that does not exist yet is generated below
            check_data_root(args.data_root, f"one directory per {benchmark} task")
        except ValueError as err:
            return report_error(err)
    # Same device choice as the Accelerator each task builds (ACCELERATE_USE_CPU is set by `launch --cpu`).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and state.num_processes == 1:
        # Each launched process would otherwise train alone and overwrite the others' files.
        print(f"error: {os.environ['WORLD_SIZE']} processes were launched but Accelerate sees one; on a machine "
              f"without GPUs launch with ACCELERATE_USE_CPU=true (accelerate launch --multi_gpu --num_processes N)",
              file=sys.stderr)
        return 2
    for notice in plan.notices:
        state.print(f"notice: {notice}")
    if args.data_root is None:
        args.data_root = str(default_data_root(args.data_seed))
    data_root = Path(args.data_root)
    if benchmark == "mini-vtab":
        # One rank generates while the others wait, then find it complete; independent runs sharing the folder
        # are serialised by generate_mini_vtab's own lock (it builds aside and renames into place).
        with state.main_process_first():
            generate_mini_vtab(data_root, seed=args.data_seed)
    run_name = plan.recipe.name if plan.recipe else plan.plugin.name
    output_dir = Path(args.output_dir or f"runs/{benchmark}-{run_name}")

    # One pass per seed; without --seeds, one pass with the single seed in today's flat layout.
    passes = [(seed, output_dir / SEED_DIR.format(seed)) for seed in plan.seeds] if plan.seeds else [(None, output_dir)]
    try:
        for info in plan.tasks:  # every task's folder is there before the first task trains
            find_task_dir(data_root, info)
        if args.init_adapter:  # the header only: its plugin and config against each run's (the seed's too)
            for seed, _ in passes:
                for info in plan.tasks:
                    config = seeded_config(plan, info.name, plan.args_for(info.name, seed).seed)
                    check_init_adapter(args.init_adapter, plan.plugin.name, config)
        refuse_existing_runs([seed_dir / info.name for _, seed_dir in passes for info in plan.tasks],
                             resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # DatasetError and InitAdapterError are ValueErrors
        return report_error(err)
    results: dict[tuple[int | None, str], dict] = {}
    for seed, seed_dir in passes:
        for info in plan.tasks:
            out = seed_dir / info.name
            done = out / "metrics.json"
            if done.is_file() and args.resume:
                state.print(f"[{info.name}] finished earlier; keeping {done}")
                results[seed, info.name] = json.loads(done.read_text())
                continue
            task_args = plan.args_for(info.name, seed)
            try:
                with task_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state):
                    results[seed, info.name] = train_task(task_args, info, data_root, out, plan.plugin,
                                                          seeded_config(plan, info.name, task_args.seed))
            # what the cheap checks cannot see: hub weights that cannot be had, a malformed split file or image
            except (FileExistsError, BackboneWeightsError, DatasetError) as err:
                return report_error(err, state)

    if state.is_main_process:
        tune = args.split == "tune"
        reported = "val-selected" if tune else "final acc"
        print(f"\n{'seed':>5}  {'task':<22}{reported:>13}{'best acc':>10}  adapter file")
        for (seed, name), m in results.items():
            number = m["accuracy_val_selected"] if tune else m["accuracy_final"]
            folder = output_dir / SEED_DIR.format(seed) if seed is not None else output_dir
            print(f"{m['seed']:>5}  {name:<22}{number:>12.2f}%{m['accuracy_best']:>9.2f}%  "
                  f"{folder / name / m['adapter_file']}")
        what = ("val-selected = test accuracy of the evaluation with the best validation accuracy (the saved "
                "adapter)" if tune else "final acc = the saved final-epoch adapter's test accuracy")
        print(f"\n{what}; best acc = best test accuracy during training (optimistic).\n"
              f"table: visadapt-eval --benchmark {benchmark} --adapters {output_dir}"
              + (" --split tune" if tune else ""))
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
