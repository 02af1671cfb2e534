"""Train PPAP noise-range experts data-free on a frozen classifier, then measure what their guidance does.

    accelerate launch train/ppap.py                    # embedded world (16x16 shapes), no download, ~3 min on 2 cores
    accelerate launch train/ppap.py --pipeline ./my-ddpm --classifier deit_small_patch16_224 --pool-size 50000 \\
        --num-experts 5 --epochs 20 --warm-start

Step 1 (pool): the diffusion pipeline itself draws ``--pool-size`` unlabeled images into ``OUT/pool/shard_*/``
(:mod:`visadapt.data.shards`' verified, resumable shards: a rerun skips every complete shard; image ``i`` depends on
``(--seed, i)`` alone). Step 2 (experts): the classifier gets ``num_experts`` PPAP experts
(:mod:`visadapt.plugins.ppap`); expert ``i`` trains on ``x_t = scheduler.add_noise(x0, noise, t)``, ``t ~
U[lo_i, hi_i)``, against the frozen classifier on the clean ``x0`` (KL to the teacher sharpened by
``--temperature``; ``--objective dense``: MSE), on :func:`visadapt.engine.fit`, one run per expert under
``OUT/runs/expert_i`` (``--resume`` continues or reloads each). Every expert starts from the same initial state;
``--warm-start`` starts expert ``i+1`` from trained expert ``i`` (the official code's sequential chain). The teacher is
the classifier itself with the experts switched off (one backbone in memory). Step 3 (measurement, unless
``--eval-samples 0``): for random requested classes, the fraction of generated images that the clean classifier
labels as requested, with no guidance, with naive guidance (the frozen classifier) and with the PPAP experts,
from the same initial noise. Once the experts are trained, a labelled sample grid of the three settings (a row
each, a column per requested class; :mod:`visadapt.grids`) is written to ``samples/guidance.png`` and logged to the
run's trackers as ``samples/guidance``.

Outputs in ``--output-dir``: ``ppap_experts.safetensors`` (all experts in ONE visadapt file; the metadata lists the
ranges; ``visadapt.load_adapter(classifier, path)`` reloads it), ``metrics.json`` (pool, per-expert fit history,
guidance table), ``samples/`` and ``pool/``.

``--init-adapter FILE`` starts every expert from a trained experts file (the ``ppap_experts.safetensors`` of an
earlier run, or the shipped one) instead of the same fresh state: expert ``i`` from the file's expert ``i``. The file
must hold as many experts, of the same rank and alpha, over the pipeline's training timesteps, for this classifier;
all of this is checked before the output folder is made (one ``error:`` line naming the flag to change, exit code 2).
It excludes ``--warm-start``, which would overwrite experts 1.. with their trained predecessor.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

import visadapt
from visadapt.train.flags import add_run_flags, finish_run_args, run_options, run_script

if TYPE_CHECKING:  # annotations only: importing the job (its --help) loads no torch
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from visadapt.train.ppap_distillation import NoisedStudent, TeacherLabelledPool
from visadapt.tracking import tracker_config, tracking_options
from visadapt.train.preflight import refuse_existing_runs, report_error

EMBEDDED_WORLD = "visadapt_ppap_world"
POOL_VERSION = 1
EXPERTS_FILE = "ppap_experts.safetensors"
GRID_CLASSES = 4  # columns of the sample grids of a classifier with more classes than that
#: the PPAP config fields this script sets by flag (the fix an --init-adapter config difference names)
EXPERT_FLAGS = {"num_experts": "--num-experts", "rank": "--rank", "alpha": "--alpha"}


# ------------------------------------------------------------------------------------------- models, inputs


def check_world_choice(pipeline: str, classifier: str, classifier_weights: str | None) -> None:
    """Refuse, before anything loads, a ``--pipeline`` that can be no pipeline, an unknown timm ``--classifier``
    (``ValueError``) or ``--classifier-weights`` that are no file (``FileNotFoundError``; a timm classifier
    also takes ``default`` and ``none``)."""
    from visadapt.backbones import check_backbone_choice
    from visadapt.diffusion import check_pipeline_choice

    check_pipeline_choice(pipeline, embedded=EMBEDDED_WORLD)
    if classifier != EMBEDDED_WORLD:
        check_backbone_choice(classifier, "none", flags=("--classifier", "--classifier-weights"),
                              embedded=f"{EMBEDDED_WORLD} (the embedded world's classifier)")
    choice = classifier_weights or ("default" if classifier != EMBEDDED_WORLD else None)
    allowed = ("default", "none") if classifier != EMBEDDED_WORLD else ()
    if choice is not None and choice not in allowed and not Path(choice).is_file():
        kinds = "a checkpoint path, 'default' (timm's weights) or 'none'" if allowed else (
            "a checkpoint file of the embedded classifier, or no --classifier-weights for the shipped one")
        raise FileNotFoundError(f"--classifier-weights {choice!r} is not an existing file; give {kinds}")


def load_world(pipeline: str, classifier: str, classifier_weights: str | None, scheduler: str):
    """``(pipe, classifier, preprocess)``: the diffusion pipeline, the frozen classifier in eval mode, and the
    differentiable map from the pipeline's [-1, 1] images ``(B, 3, H, W)`` to the classifier's input.

    Raises what :func:`check_world_choice` does, and :class:`~visadapt.backbones.BackboneWeightsError` when a hub
    pipeline or the classifier's weights cannot be had."""
    check_world_choice(pipeline, classifier, classifier_weights)
    import torch
    import torch.nn.functional as F

    from visadapt.backbones import (
        _hub_source,
        create_ppap_world_classifier,
        create_ppap_world_pipeline,
        weights_error,
    )
    from visadapt.diffusion import load_pipeline

    if pipeline == EMBEDDED_WORLD:
        pipe = create_ppap_world_pipeline(scheduler=scheduler)
    else:
        from diffusers import DDIMScheduler, DDPMScheduler

        pipe = load_pipeline(pipeline)
        if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"--pipeline {pipeline!r} is a {type(pipe).__name__} without unet/scheduler; PPAP "
                             f"needs an unconditional UNet pipeline such as DDPMPipeline or DDIMPipeline")
        wanted = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
        pipe.scheduler = wanted.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if classifier == EMBEDDED_WORLD:
        model = create_ppap_world_classifier(weights=classifier_weights)

        def preprocess(images: torch.Tensor) -> torch.Tensor:  # it was trained on [-1, 1] images
            return images
    else:
        import timm
        from huggingface_hub.errors import EntryNotFoundError

        choice = classifier_weights or "default"
        overlay = {"file": str(Path(choice).resolve())} if Path(choice).is_file() else None
        try:
            model = timm.create_model(classifier, pretrained=choice != "none", pretrained_cfg_overlay=overlay).eval()
        except (OSError, EntryNotFoundError) as err:  # timm's default weights from the hub
            if overlay is not None:
                raise
            raise weights_error(classifier, _hub_source(classifier), err, embedded=EMBEDDED_WORLD,
                                flag="--classifier", local="--classifier-weights PATH (a local checkpoint file) "
                                                           "or --classifier-weights none (random init)") from err
        cfg = model.pretrained_cfg
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)

        def preprocess(images: torch.Tensor) -> torch.Tensor:
            images = (images + 1) / 2  # the pipeline's [-1, 1] -> [0, 1], then timm's resize and normalisation
            if tuple(images.shape[-2:]) != size:
                images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
            return (images - mean.to(images)) / std.to(images)
    for p in model.parameters():
        p.requires_grad_(False)
    return pipe, model, preprocess


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Pipeline output ``(B, H, W, 3)`` floats in [0, 1] -> ``(B, 3, H, W)`` in [-1, 1]."""
    import torch

    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


# ------------------------------------------------------------------------------------------------- the pool


def generate_pool(pipe, folder: Path, *, size: int, shard_size: int, batch_size: int, steps: int, seed: int,
                  pipeline_name: str) -> dict[str, int]:
    """Step 1: ``size`` unconditional samples of ``pipe`` as PNG shards under ``folder`` (resumable)."""

    from visadapt.data.shards import write_image_shards

    settings = {"version": POOL_VERSION, "kind": "ppap_pool", "pipeline": pipeline_name,
                "scheduler": type(pipe.scheduler).__name__, "steps": steps, "seed": seed}

    def render(prompts: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        return pipe(batch_size=len(prompts), generator=generators, num_inference_steps=steps,
                    output_type="pil").images

    from visadapt.progress import Progress

    # unconditional: every image's "prompt" is empty
    with Progress(total=size, desc="PPAP pool", unit="images") as images:
        return write_image_shards(render, [""] * size, folder, settings, shard_size=shard_size,
                                  batch_size=batch_size, seed=seed, progress=images)


# ---------------------------------------------------------------------------------------------- the experts


def distillation_evaluator(student: NoisedStudent, held_out: Dataset, loss_fn, seed: int, batch_size: int = 256):
    """``evaluate(model, accelerator)``: on ``held_out`` at fixed noise and t, the distillation loss and the
    ``agreement`` (%) of the expert's top class on x_t with the teacher's on x0."""
    import torch

    from visadapt.plugins.ppap import use_expert

    def evaluate(model: nn.Module, accelerator) -> dict[str, float]:
        generator = torch.Generator().manual_seed(seed)
        was_training = student.training
        student.eval()
        loss, agree, seen = 0.0, 0, 0
        with torch.no_grad(), use_expert(student.model, student.expert):
            for start in range(0, len(held_out), batch_size):
                items = [held_out[i] for i in range(start, min(start + batch_size, len(held_out)))]
                x0 = torch.stack([x for x, _ in items]).to(accelerator.device)
                teacher = torch.stack([y for _, y in items]).to(accelerator.device)
                out = student.model(student.preprocess(student.noised(x0, generator)))
                loss += loss_fn(out, teacher).item() * len(x0)
                if out.dim() == 2:
                    agree += (out.argmax(-1) == teacher.argmax(-1)).sum().item()
                seen += len(x0)
        student.train(was_training)
        return {"agreement": 100.0 * agree / max(seen, 1), "distill_loss": loss / max(seen, 1), "samples": seen}
    return evaluate


def class_names(args, classifier: nn.Module) -> list[str]:
    """Names of the classes the sample grids request: the embedded world's four, else the first four indices."""
    if args.classifier == EMBEDDED_WORLD:
        from visadapt.backbones import PPAP_WORLD_CLASSES

        return list(PPAP_WORLD_CLASSES)
    return [f"class {k}" for k in range(min(GRID_CLASSES, classifier.num_classes))]


def guidance_grid(pipe, classifier: nn.Module, preprocess, classes: list[str], *, scale: float, steps: int,
                  seed: int):
    """The labelled grid of what guidance does with the trained experts: a column per requested class (index =
    column), a row per setting: no guidance, naive guidance (the frozen classifier), PPAP guidance. Column ``j``
    starts from the same noise in every row (:func:`measure_guidance`'s seeding), so the rows differ only by the
    guidance.

    Drawn once per run, after the last expert, not after each: the two guided rows take a classifier gradient at
    every step, and on CPU one grid of four columns costs about as much as a pool batch of 128 images."""
    import torch

    from visadapt.grids import labelled_grid
    from visadapt.plugins.ppap import guide, ppap_config

    targets = torch.arange(len(classes))
    rows = []
    for setting in ("unguided", "naive", "ppap"):
        call = {"batch_size": len(classes), "num_inference_steps": steps, "output_type": "np",
                "generator": [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(len(classes))]}
        if setting == "unguided":
            rows.append(pipe(**call).images)
            continue
        with guide(pipe, classifier, target=targets, scale=scale, naive=setting == "naive", preprocess=preprocess):
            rows.append(pipe(**call).images)
    experts = ppap_config(classifier).num_experts
    labels = ["no guidance", "naive guidance (frozen classifier)", f"PPAP guidance ({experts} experts)"]
    return labelled_grid(rows, row_labels=labels, column_labels=classes, row_axis="guidance",
                         column_axis="requested class",
                         title=f"PPAP samples ({steps} steps, guidance scale {scale:g}, seed {seed})")


def train_experts(model: nn.Module, scheduler, preprocess, pool: TeacherLabelledPool, out: Path, args,
                  accelerator) -> list[dict]:
    """Step 2: train every expert on ``pool``; return one record per expert (range, fit history)."""
    import torch

    from visadapt.engine import TrainConfig, fit
    from visadapt.plugins.ppap import (
        classifier_distillation_loss,
        copy_expert,
        dense_distillation_loss,
        expert_parameters,
        ppap_config,
    )
    from visadapt.train.ppap_distillation import NoisedStudent, PoolSubset

    config = ppap_config(model)
    loss_fn = ((lambda outputs, teacher: classifier_distillation_loss(outputs, teacher, args.temperature))
               if args.objective == "class" else dense_distillation_loss)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held = max(1, round(len(pool) * args.holdout_fraction))
    train_set, held_out = PoolSubset(pool, order[held:]), PoolSubset(pool, order[:held])
    if len(train_set) < args.batch_size:
        raise ValueError(f"--pool-size {len(pool)} leaves {len(train_set)} training images after the hold-out, fewer "
                         f"than --batch-size {args.batch_size}; generate a larger pool or lower the batch")
    records = []
    for expert, time_range in enumerate(config.ranges):
        if args.warm_start and expert > 0:
            copy_expert(model, expert - 1, expert)  # a resumed run then reloads its own checkpoint over it
        for p in model.parameters():
            p.requires_grad_(False)
        for p in expert_parameters(model, expert):
            p.requires_grad_(True)
        student = NoisedStudent(model, scheduler, expert, time_range, preprocess)
        train_config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                   batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                                   seed=args.seed + expert, progress=False,
                                   **run_options(args))
        result = fit(student, train_set, None, train_config, accelerator=accelerator,
                     output_dir=out / "runs" / f"expert_{expert}", resume=args.resume, loss_fn=loss_fn,
                     evaluator=distillation_evaluator(student, held_out, loss_fn, args.seed + 1000 + expert),
                     metric="agreement", log_prefix=f"[expert {expert} t in [{time_range[0]}, {time_range[1]})] ")
        records.append({"expert": expert, "range": list(time_range), "agreement_final": result.score_final,
                        "history": result.history, "wall_time_s": round(result.wall_time_s, 1),
                        "resumed_from": result.resumed_from})
    for p in model.parameters():
        p.requires_grad_(False)
    return records


# ---------------------------------------------------------------------------------------------- measurement


def measure_guidance(pipe, classifier: nn.Module, preprocess, *, num_classes: int, samples: int, scale: float,
                     steps: int, batch_size: int, seed: int) -> dict[str, dict[str, float]]:
    """Step 3: per setting (``unguided``, ``naive``, ``ppap``), the fraction of ``samples`` generated images the
    clean classifier labels as their requested class (random classes from ``seed``), with its standard error.

    Sample ``i`` starts from the same noise in every setting (generator seeded from ``(seed, i)``), so the
    settings differ only by the guidance.
    """
    import torch

    from visadapt.plugins.ppap import guide, use_expert
    from visadapt.progress import Progress

    targets = torch.randint(num_classes, (samples,), generator=torch.Generator().manual_seed(seed))
    table = {}
    bar = Progress(total=3 * samples, desc="PPAP guidance measurement", unit="samples")
    for setting in ("unguided", "naive", "ppap"):
        start, hits = time.time(), 0
        bar.set_description(f"PPAP guidance measurement ({setting})")
        for lo in range(0, samples, batch_size):
            batch_targets = targets[lo:lo + batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + lo + j) for j in range(len(batch_targets))]
            call = {"batch_size": len(batch_targets), "generator": generators, "num_inference_steps": steps,
                    "output_type": "np"}
            if setting == "unguided":
                images = pipe(**call).images
            else:
                with guide(pipe, classifier, target=batch_targets, scale=scale, naive=setting == "naive",
                           preprocess=preprocess):
                    images = pipe(**call).images
            with torch.no_grad(), use_expert(classifier, None):
                predicted = classifier(preprocess(images_to_tensor(images))).argmax(-1)
            hits += (predicted == batch_targets).sum().item()
            bar.update(len(batch_targets))
        fraction = hits / samples
        table[setting] = {"fraction": fraction, "stderr": math.sqrt(fraction * (1 - fraction) / samples),
                          "samples": samples, "seconds": round(time.time() - start, 1)}
    bar.close()
    return table


def format_table(table: dict[str, dict[str, float]], scale: float, steps: int, scheduler: str) -> str:
    lines = [f"requested-class fraction ({scheduler}, {steps} steps, guidance scale {scale}; clean-classifier labels)",
             f"{'setting':<10} {'fraction':>9} {'+-se':>7} {'samples':>8} {'time s':>7}"]
    for name, row in table.items():
        lines.append(f"{name:<10} {100 * row['fraction']:8.1f}% {100 * row['stderr']:6.1f}% {row['samples']:>8} "
                     f"{row['seconds']:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "train/ppap.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pipeline", default=EMBEDDED_WORLD, help=f"local folder or hub id of an unconditional diffusers "
                                                              f"pipeline, or {EMBEDDED_WORLD} (embedded)")
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim",
                   help="sampler for the pool and the measurement (same training schedule)")
    p.add_argument("--classifier", default=EMBEDDED_WORLD, help="timm model name, or the embedded world's classifier")
    p.add_argument("--classifier-weights", default=None,
                   help="checkpoint file, 'default' (timm's) or 'none'; embedded: the file in assets/")
    p.add_argument("--objective", choices=("class", "dense"), default="class",
                   help="class: KL to the sharpened teacher; dense: MSE to the teacher's output")
    p.add_argument("--output-dir", default="runs/ppap")
    add_run_flags(p, resume_help="continue an interrupted run in --output-dir",
                  overwrite_help="empty --output-dir first", progress=False, init_adapter=True)
    g = p.add_argument_group("pool (step 1)")
    g.add_argument("--pool-size", type=int, default=2048)
    g.add_argument("--pool-steps", type=int, default=25, help="denoising steps per pool image")
    g.add_argument("--shard-size", type=int, default=512)
    g.add_argument("--sample-batch", type=int, default=128, help="images per pipeline call")
    g = p.add_argument_group("experts (step 2)")
    g.add_argument("--num-experts", type=int, default=5)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=float, default=8.0)
    g.add_argument("--temperature", type=float, default=0.25, help="teacher sharpening of the KL target")
    g.add_argument("--warm-start", action="store_true",
                   help="expert i+1 starts from trained expert i (official); not with --init-adapter")
    g.add_argument("--epochs", type=int, default=16, help="epochs over the pool per expert")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=5e-3)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=float, default=0.5)
    g.add_argument("--holdout-fraction", type=float, default=0.1, help="pool share kept for the agreement metric")
    g = p.add_argument_group("measurement (step 3)")
    g.add_argument("--eval-samples", type=int, default=256, help="samples per setting; 0 skips the measurement")
    g.add_argument("--eval-scale", type=float, default=40.0,
                   help="guidance scale (official 7.5 for ADM-256; the 16x16 embedded world needs more)")
    g.add_argument("--eval-steps", type=int, default=25)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("pool_size", "pool_steps", "shard_size", "sample_batch", "epochs", "batch_size", "eval_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.holdout_fraction < 1:
        p.error("--holdout-fraction must lie in (0, 1)")
    if args.init_adapter and args.warm_start:
        p.error("--init-adapter starts every expert from the file's; --warm-start would overwrite experts 1.. with "
                "their trained predecessor: choose one")
    return finish_run_args(p, args)  # no recipe: refuses --resume with --overwrite, like every train script


def check_init_experts(path: str, classifier: nn.Module, config: dict, pipeline: str) -> None:
    """Refuse ``--init-adapter path`` unless it holds PPAP experts this run can start from: ``config``'s expert
    count, rank and alpha (the fix names their flags), its training timesteps (those of ``pipeline``) and the
    other fields (:func:`visadapt.engine.check_init_adapter`), for ``classifier`` (un-adapted). Header only."""
    from visadapt.engine import InitAdapterError, check_init_adapter
    from visadapt.io import AdapterFileError, check_base_model, parse_header, read_adapter_metadata

    try:
        _, plugin, file_config = parse_header(path, read_adapter_metadata(path))
    except AdapterFileError:
        plugin = None  # check_init_adapter names what is wrong with the file
    if plugin is not None and plugin.name == "ppap":
        have = file_config.to_dict()
        differing = [key for key in EXPERT_FLAGS if have[key] != config[key]]
        if differing:
            raise InitAdapterError(
                f"--init-adapter {path}: its experts differ from this run's ("
                + "; ".join(f"{key}: file {have[key]!r}, run {config[key]!r}" for key in differing)
                + f"); train with {' '.join(f'{EXPERT_FLAGS[key]} {have[key]}' for key in differing)} or start "
                  f"without --init-adapter")
        if have["num_train_timesteps"] != config["num_train_timesteps"]:
            raise InitAdapterError(
                f"--init-adapter {path}: its experts split {have['num_train_timesteps']} training timesteps; "
                f"--pipeline {pipeline} has {config['num_train_timesteps']}: use the pipeline they were trained "
                f"with or start without --init-adapter")
    check_init_adapter(path, "ppap", config)
    try:
        check_base_model(classifier, read_adapter_metadata(path), path)
    except AdapterFileError as err:
        raise InitAdapterError(f"--init-adapter {path}: {err}; pass the --classifier it was trained on") from None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The cheap checks come first, each one error line and exit 2: flags, the --pipeline name or folder, the
    # --classifier name and its weights file, an output folder holding a run; then the models load (a pipeline or
    # weights that cannot be had: one line), --init-adapter is checked against them, and the output folder is made.
    args = parse_args(argv, prog)
    from accelerate import PartialState

    from visadapt.backbones import PPAP_WORLD_CLASSES, BackboneWeightsError
    from visadapt.engine import init_adapter_from_file, make_accelerator, prepare_output_dir, seed_everything
    from visadapt.io import TRAIN_METADATA, write_json_atomic
    from visadapt.plugins.ppap import save_experts
    from visadapt.train.ppap_distillation import TeacherLabelledPool

    out = Path(args.output_dir)
    try:
        check_world_choice(args.pipeline, args.classifier, args.classifier_weights)
        refuse_existing_runs([out], resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        return report_error(err)
    state = PartialState()
    seed_everything(args.seed)
    start = time.time()
    # the models before the output folder: --init-adapter is checked against them first
    try:
        pipe, classifier, preprocess = load_world(args.pipeline, args.classifier, args.classifier_weights,
                                                  args.scheduler)
    except (BackboneWeightsError, ValueError) as err:  # weights that cannot be had, a pipeline without a UNet
        return report_error(err, state)
    config = {"num_experts": args.num_experts, "rank": args.rank, "alpha": args.alpha,
              "num_train_timesteps": pipe.scheduler.config.num_train_timesteps}
    try:
        if args.init_adapter:
            check_init_experts(args.init_adapter, classifier, config, args.pipeline)
        prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state)
    except (FileExistsError, ValueError) as err:  # InitAdapterError is a ValueError too
        print(f"error: {err}", file=sys.stderr)
        return 2

    pool_dir = out / "pool"
    if state.is_main_process:
        counts = generate_pool(pipe, pool_dir, size=args.pool_size, shard_size=args.shard_size,
                               batch_size=args.sample_batch, steps=args.pool_steps, seed=args.seed,
                               pipeline_name=args.pipeline)
        print(f"pool: {args.pool_size} images, {counts['written']} shards written, {counts['skipped']} already "
              f"complete ({time.time() - start:.0f} s)", flush=True)
    state.wait_for_everyone()
    pool_time = time.time() - start

    visadapt.attach(classifier, "ppap", config)
    if args.init_adapter:  # every expert's tensors from the file (shapes and checksum checked)
        init_adapter_from_file(classifier, args.init_adapter)
    pool = TeacherLabelledPool(pool_dir, classifier, preprocess)
    accelerator = make_accelerator(out, precision=args.precision, **tracking_options(args))
    accelerator.init_trackers("ppap", config=tracker_config(vars(args)))
    experts = train_experts(classifier, pipe.scheduler, preprocess, pool, out, args, accelerator)
    recipe = {k: v for k, v in vars(args).items() if k not in ("output_dir", "resume", "overwrite")}
    metrics = {"pool": {"images": len(pool), "folder": str(pool_dir), "seconds": round(pool_time, 1)},
               "experts": experts, "recipe": recipe}
    if accelerator.is_main_process:
        save_experts(classifier, out / EXPERTS_FILE, metadata={TRAIN_METADATA: json.dumps(recipe)})
        print(f"wrote {out / EXPERTS_FILE} ({args.num_experts} experts)", flush=True)
        from visadapt.grids import save_and_log

        grid = guidance_grid(pipe, classifier, preprocess, class_names(args, classifier), scale=args.eval_scale,
                             steps=args.eval_steps, seed=args.seed + 1)
        save_and_log(grid, out / "samples" / "guidance.png", accelerator.trackers, "samples/guidance",
                     args.num_experts)
        if args.eval_samples > 0:
            num_classes = (len(PPAP_WORLD_CLASSES) if args.classifier == EMBEDDED_WORLD
                           else classifier.num_classes)
            table = measure_guidance(pipe, classifier, preprocess, num_classes=num_classes,
                                     samples=args.eval_samples, scale=args.eval_scale, steps=args.eval_steps,
                                     batch_size=args.sample_batch, seed=args.seed + 1)
            metrics["guidance"] = {"scheduler": args.scheduler, "steps": args.eval_steps, "scale": args.eval_scale,
                                   "table": table}
            print(format_table(table, args.eval_scale, args.eval_steps, args.scheduler), flush=True)
        metrics["wall_time_s"] = round(time.time() - start, 1)
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.end_training()
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
