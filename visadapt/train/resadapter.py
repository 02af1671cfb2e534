"""Train a ResAdapter (ResCLoRA + ResENorm) on a frozen text-to-image pipeline with multi-resolution batches.

    accelerate launch train/resadapter.py                 # embedded default: tiny SD + procedural shapes, no download
    accelerate launch train/resadapter.py --pipeline runwayml/stable-diffusion-v1-5 --data /data/laion-subset \\
        --buckets 256x256 384x256 256x384 512x512 768x512 512x768 1024x1024 --batch-size 16 --epochs 10

``--data`` is an image-prompt folder (``metadata.jsonl`` with ``{"file_name", "text"}`` per line; see
:mod:`visadapt.diffusion`). The UNet, VAE and text encoder stay frozen; only the ``resadapter`` modules train.
Each epoch shuffles the images and draws one ``(height, width)`` bucket per batch from ``--buckets``
(:class:`visadapt.diffusion.BucketBatchSampler`): every batch has one resolution, an epoch mixes resolutions
and aspect ratios, which is the paper's mixed-resolution training. The loss is the denoising MSE of the
diffusers text-to-image examples (:class:`visadapt.diffusion.TextToImageTrainer`).

At every checkpoint (each epoch end) the script samples the prompts of ``--sample-prompts`` at every
``--sample-sizes`` resolution with the adapter, writes them as one labelled grid ``samples/epoch_<n>.png`` (a
row per resolution, a column per prompt, tiny samples upscaled; :mod:`visadapt.grids`) and logs the grid as
image ``samples`` to every tracker of the run.

Outputs in ``--output-dir``: ``resadapter.safetensors`` (one visadapt file; ``pipe.load_visadapt(path)``),
``samples/``, ``checkpoints/`` (for ``--resume``) and ``metrics.json`` (the denoising loss at fixed noise on
up to ``--eval-items`` images per epoch, before and after).

``--init-adapter FILE`` starts from a trained ResAdapter (e.g. the ``resadapter.safetensors`` of an earlier run)
instead of a fresh one: its header (plugin ``resadapter``, this run's config) is checked before the output folder
is made, its tensors (LoRA factors and ResNet norm affines) after the UNet is built; either failure is one
``error:`` line and exit code 2, with the UNet left as it was.

The official training code is not released (res-adapter#3). Defaults follow the paper where it says: the
released SD1.5 layout (rank 16, alpha 8, LoRA on the down/upsampler convs, trainable ResNet norms), frozen base,
mixed resolutions. The ``embedded`` recipe is sized for 2 CPU cores: the tiny pipeline of
:func:`visadapt.backbones.create_tiny_sd_pipeline` (trained size 32x32) on procedural shapes ("a red circle")
rendered at several resolutions, buckets 24x24 to 64x64 with aspect ratios 1:2 to 2:1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import visadapt
from visadapt.names import EMBEDDED_SD
from visadapt.tracking import tracking_options
from visadapt.train.flags import SetOverride, add_run_flags, finish_run_args, run_options, run_script
from visadapt.train.preflight import check_data_root, refuse_existing_runs, report_error

RECIPES = {
    "sd15": {"lr": 1e-4, "batch_size": 16, "epochs": 10, "steps": 25, "guidance": 7.5,
             "buckets": ["256x256", "384x256", "256x384", "512x512", "768x512", "512x768", "768x768", "1024x1024"],
             "sample_sizes": ["256x256", "512x768", "1024x1024"], "seed": 0},
    "embedded": {"lr": 2e-3, "batch_size": 4, "epochs": 3, "steps": 4, "guidance": 1.0,
                 "buckets": ["24x24", "32x32", "48x32", "32x48", "64x32", "32x64", "48x48", "64x64"],
                 "sample_sizes": ["24x24", "32x32", "48x32", "64x64"], "seed": 0},
}
DATA_VERSION = 1
DATA_MANIFEST = "resadapter_shapes.json"
COLORS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.15, 0.25, 0.9), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle", "star")
#: native sizes of the embedded images (height, width): several resolutions and aspect ratios
RENDER_SIZES = ((32, 32), (48, 32), (32, 48), (64, 64), (64, 32), (32, 64))


def parse_size(text: str) -> tuple[int, int]:
    """``"48x32"`` -> ``(48, 32)``: height x width in pixels."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 512x768")
    return int(height), int(width)


# ------------------------------------------------------------------------------------------ embedded data


def render_shape(shape: str, color: tuple[float, float, float], height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One ``shape`` of ``color`` on a grey vertical gradient, drawn at ``height x width``: ``(H, W, 3)`` uint8.
    The object's size follows the shorter side, so the same scene is drawn at every resolution."""
    from visadapt.data.procedural import _shape_mask

    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    top, bottom = rng.uniform(0.3, 0.7, size=2)
    canvas = np.repeat((top + (bottom - top) * y / height)[..., None], 3, axis=2)
    size = min(height, width) * rng.uniform(0.25, 0.38)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    angle = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * (x - cx) + s * (y - cy)) / size, (-s * (x - cx) + c * (y - cy)) / size
    canvas[_shape_mask(shape, u, v)] = color
    canvas += rng.normal(0, 0.02, canvas.shape)
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)


def default_data_root(seed: int = 0, count: int = 48) -> Path:
    cache = Path(os.environ.get("VISADAPT_CACHE", Path.home() / ".cache" / "visadapt"))
    return cache / f"resadapter-shapes-v{DATA_VERSION}-seed{seed}-n{count}"


def generate_shapes(root: str | os.PathLike | None = None, seed: int = 0, count: int = 48) -> Path:
    """Write ``count`` procedural images ("a red circle", ...) at the sizes of :data:`RENDER_SIZES` (cycled) as an
    image-prompt folder; deterministic in ``seed``, written once (a folder with the same manifest is reused)."""
    from visadapt.data.generated import write_generated
    from visadapt.diffusion import METADATA_FILE

    root = Path(root) if root is not None else default_data_root(seed, count)

    def write(tmp: Path) -> dict:
        lines = []
        for k in range(count):
            rng = np.random.default_rng([seed, k])
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
            height, width = RENDER_SIZES[k % len(RENDER_SIZES)]
            Image.fromarray(render_shape(shape, COLORS[color], height, width, rng)).save(
                tmp / f"{k:05d}.png", compress_level=1)
            lines.append(json.dumps({"file_name": f"{k:05d}.png", "text": f"a {color} {shape}"}))
        (tmp / METADATA_FILE).write_text("\n".join(lines) + "\n")
        return {}

    params = {"version": DATA_VERSION, "seed": seed, "count": count}
    return write_generated(root, DATA_MANIFEST, params, write, "ResAdapter embedded shapes")


# ------------------------------------------------------------------------------------------ sample grids


def sample_cells(pipe, prompts: list[str], sizes: list[tuple[int, int]], *, steps: int, guidance: float,
                 seed: int) -> list[list[np.ndarray]]:
    """Images of every prompt at every size: ``cells[row][column]`` is prompt ``column`` at size ``row``, an
    ``(H, W, 3)`` uint8 array of that size. Same seed for every cell, so grids of two epochs differ only through
    the adapter."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    cells = []
    for height, width in sizes:
        images = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                      output_type="np", generator=torch.Generator().manual_seed(seed)).images
        cells.append([(np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8) for image in images])
    return cells


def sample_grid(pipe, prompts: list[str], sizes: list[tuple[int, int]], *, steps: int, guidance: float, seed: int,
                title: str) -> Image.Image:
    """The labelled grid of :func:`sample_cells`: a row per resolution, a column per prompt
    (:func:`visadapt.grids.labelled_grid`; tiny samples upscaled with NEAREST)."""
    from visadapt.grids import labelled_grid

    cells = sample_cells(pipe, prompts, sizes, steps=steps, guidance=guidance, seed=seed)
    return labelled_grid(cells, row_labels=[f"{h}x{w}" for h, w in sizes], column_labels=prompts, title=title,
                         row_axis="resolution (HxW)", column_axis="prompt")


# ------------------------------------------------------------------------------------------ the run


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "train/resadapter.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pipeline", default=EMBEDDED_SD, help="local folder or hub id of a diffusers Stable Diffusion "
                                                           f"pipeline, or {EMBEDDED_SD} (embedded, no download)")
    p.add_argument("--data", default=None, help="image-prompt folder (default: the embedded procedural shapes)")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="default: embedded for the embedded pipeline, sd15 otherwise")
    for flag, kind in (("lr", float), ("batch-size", int), ("epochs", int), ("seed", int), ("steps", int),
                       ("guidance", float)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's (steps and guidance are "
                                                                  "for the sample grids)" if flag in
                       ("steps", "guidance") else "default: the recipe's")
    p.add_argument("--buckets", nargs="+", default=None, metavar="HxW", help="training resolutions (per batch)")
    p.add_argument("--sample-sizes", nargs="+", default=None, metavar="HxW", help="rows of the sample grids")
    p.add_argument("--sample-prompts", nargs="+", default=["a red circle", "a blue square", "a yellow star"])
    p.add_argument("--set", dest="overrides", action=SetOverride, default=[], metavar="KEY=VALUE",
                   help="override one resadapter config field (YAML value), e.g. norm=false or rank=8")
    p.add_argument("--eval-items", type=int, default=16, help="images for the fixed-noise denoising loss")
    p.add_argument("--data-seed", type=int, default=0, help="embedded data only: seed of the generated images")
    p.add_argument("--images", type=int, default=48, help="embedded data only: number of images")
    p.add_argument("--output-dir", default="runs/resadapter")
    add_run_flags(p, init_adapter=True)
    args = p.parse_args(argv)
    args.recipe = args.recipe or ("embedded" if args.pipeline == EMBEDDED_SD else "sd15")
    finish_run_args(p, args, RECIPES[args.recipe])
    try:
        args.buckets = [parse_size(s) for s in args.buckets]
        args.sample_sizes = [parse_size(s) for s in args.sample_sizes]
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The cheap checks come first, each one error line and exit 2: flags, the config, the header of
    # --init-adapter, the --pipeline name or folder, the --data folder, an output folder holding a run. The output
    # folder is made once the pipeline, the adapter and the data are loaded, so a failed start leaves none.
    args = parse_args(argv, prog)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from visadapt import api
    from visadapt.backbones import BackboneWeightsError
    from visadapt.diffusion import (
        METADATA_FILE,
        BucketBatchSampler,
        ImagePromptFolder,
        TextToImageTrainer,
        check_pipeline_choice,
        denoising_evaluator,
        denoising_loss,
        load_pipeline,
    )
    from visadapt.engine import (
        TrainConfig,
        check_init_adapter,
        fit,
        init_adapter_from_file,
        make_accelerator,
        prepare_output_dir,
        seed_everything,
    )
    from visadapt.io import TRAIN_METADATA, write_json_atomic
    from visadapt.plugin import config_values

    try:
        config = visadapt.get_plugin("resadapter")().Config.from_dict(config_values(None, args.overrides))
        if args.init_adapter:  # the header only: the file's plugin and config against this run's
            check_init_adapter(args.init_adapter, "resadapter", config)
        check_pipeline_choice(args.pipeline)
        if args.data is not None:
            check_data_root(args.data, f"{METADATA_FILE} (an image-prompt folder)", flag="--data")
        refuse_existing_runs([Path(args.output_dir)], resume=args.resume, overwrite=args.overwrite)
    except (ValueError, KeyError, TypeError, OSError) as err:  # InitAdapterError is a ValueError too
        return report_error(err)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.data is None:
        with state.main_process_first():
            args.data = str(generate_shapes(seed=args.data_seed, count=args.images))
    data_root = Path(args.data)
    if not (data_root.is_dir() and any(data_root.rglob(METADATA_FILE))):
        print(f"error: --data {data_root}: not a folder holding {METADATA_FILE} (an image-prompt folder, see "
              f"visadapt.diffusion)", file=sys.stderr)
        return 2
    out = Path(args.output_dir)

    seed_everything(args.seed)
    try:
        pipe = load_pipeline(args.pipeline)
    except BackboneWeightsError as err:  # a hub pipeline that cannot be had
        return report_error(err, state)
    visadapt.attach(pipe.unet, "resadapter", config)  # freezes the UNet; the trainer freezes VAE and text encoder
    if args.init_adapter:  # the file's tensors replace the fresh ones (base UNet, widths and shapes checked)
        init_adapter_from_file(pipe.unet, args.init_adapter)
    model = TextToImageTrainer.from_pipeline(pipe)
    try:  # a malformed metadata.jsonl (DatasetError), too few images for the buckets
        data = ImagePromptFolder(data_root, pipe.tokenizer, resolution=args.buckets[0][0])
        sampler = BucketBatchSampler(len(data), args.batch_size, buckets=args.buckets, seed=args.seed)
    except ValueError as err:
        return report_error(err, state)
    # the fixed-noise loss on the first --eval-items images, each at a training resolution drawn per image
    held_sampler = BucketBatchSampler(min(args.eval_items, len(data)), 1, buckets=args.buckets, seed=args.seed + 1)
    denoising = denoising_evaluator(data, seed=args.seed, batch_sampler=held_sampler)
    try:
        prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state)
    except FileExistsError as err:  # filled since the check above
        return report_error(err, state)

    accelerator = make_accelerator(out, grad_accum_steps=1, precision=args.precision,
                                   **tracking_options(args))
    run = {"benchmark": "resadapter", "pipeline": args.pipeline, "recipe": args.recipe, "data": str(data_root),
           "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
           "buckets": [f"{h}x{w}" for h, w in args.buckets], "config": config.to_dict(),
           "init_adapter": args.init_adapter}
    accelerator.init_trackers("resadapter", config={k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                                    for k, v in run.items()})
    progress = {"epoch": -1}
    (out / "samples").mkdir(parents=True, exist_ok=True)

    def evaluate(trainer, accel) -> dict[str, float]:
        metrics = denoising(trainer, accel)
        if progress["epoch"] >= 0:  # at a checkpoint (epoch end), not the 'before' measurement
            if accel.is_main_process:
                from visadapt.grids import save_and_log

                epoch = progress["epoch"] + 1
                grid = sample_grid(pipe, args.sample_prompts, args.sample_sizes, steps=args.steps,
                                   guidance=args.guidance, seed=args.seed,
                                   title=f"ResAdapter samples after epoch {epoch} ({args.steps} steps, guidance "
                                         f"{args.guidance:g}, seed {args.seed})")
                save_and_log(grid, out / "samples" / f"epoch_{epoch:03d}.png", accel.trackers, "samples", epoch)
            accel.wait_for_everyone()
        return metrics

    def before_epoch(_model, epoch: int) -> None:
        progress["epoch"] = epoch

    before = evaluate(model, accelerator)["denoising_loss"]
    train_config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=0.0, batch_size=args.batch_size,
                               warmup_epochs=0, seed=args.seed, progress=not args.no_progress,
                               **run_options(args))
    result = fit(model, data, None, train_config, accelerator=accelerator, output_dir=out, resume=args.resume,
                 loss_fn=denoising_loss, evaluator=evaluate, metric="neg_denoising_loss",
                 before_epoch=before_epoch, batch_sampler=sampler)
    path = out / "resadapter.safetensors"
    if accelerator.is_main_process:
        visadapt.save_adapter(pipe.unet, path, metadata={TRAIN_METADATA: json.dumps(run, sort_keys=True)})
        counts = api.summary(pipe.unet)
        metrics = {**run, "images": len(data), "denoising_loss_before": before,
                   "denoising_loss_after": result.history[-1]["denoising_loss"], "history": result.history,
                   "trainable_params": counts.trainable_params, "adapter_bytes": path.stat().st_size,
                   "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from,
                   "samples": sorted(str(p) for p in (out / "samples").glob("*.png")), "file": str(path),
                   "visadapt_version": visadapt.__version__}
        write_json_atomic(out / "metrics.json", metrics)
        print(f"[resadapter] {len(data)} images at {len(args.buckets)} resolutions: denoising loss {before:.4f} -> "
              f"{metrics['denoising_loss_after']:.4f}; {counts.trainable_params:,} trainable params; {path} "
              f"({metrics['adapter_bytes']:,} bytes); sample grids in {out / 'samples'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
