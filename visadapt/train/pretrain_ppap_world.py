"""Reproduce the embedded PPAP world in ``assets/``: a tiny pixel diffusion model and the classifier that judges it.

    python train/pretrain_ppap_world.py                    # the shipped recipe (about 8-13 min on 2 CPU cores)
    python train/pretrain_ppap_world.py --unet-steps 200 --output-dir /tmp/world   # a quick look

The shipped files were made on 2 shared CPU cores by running the two halves side by side,
``--only classifier --threads 1`` (334 s, held-out accuracy 61.8%) and ``--only unet --threads 2`` (443 s).

The world is 16x16 RGB images of one solid shape on a flat background; the class is the shape
(:data:`visadapt.backbones.PPAP_WORLD_CLASSES`: circle, square, triangle, cross) under random position, size,
rotation and colours. Two models are trained on freshly rendered images (rendered once up front, kept in memory):

* ``ppap_world_classifier.safetensors``: a 2-block, 64-wide timm ViT with 2x2 patches
  (:func:`visadapt.backbones.create_ppap_world_classifier`) that reads images in [-1, 1], the diffusion model's
  own pixel space, so that guidance needs no normalisation in between. Cross-entropy, AdamW, cosine schedule.
* ``ppap_world_unet.safetensors``: a diffusers ``UNet2DModel`` (widths 32/64/64, no attention, 1.06 M
  parameters, stored in fp16) trained with the epsilon objective on a 1000-step linear-beta DDPM schedule
  (:func:`visadapt.backbones.create_ppap_world_pipeline` wraps it as a ``DDPMPipeline``).

Both files record the recipe, the seed and the measured figures (classifier held-out accuracy; the fraction of
DDIM-25 samples the classifier labels confidently) in their safetensors metadata. Everything is seeded by
``--seed``; the images depend on ``(seed, index)`` alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from visadapt.backbones import (
    PPAP_WORLD_CLASSES,
    PPAP_WORLD_CLASSIFIER_ARGS,
    PPAP_WORLD_CLASSIFIER_WEIGHTS,
    PPAP_WORLD_SIZE,
    PPAP_WORLD_UNET_CONFIG,
    PPAP_WORLD_UNET_WEIGHTS,
    assets_dir,
    create_ppap_world_classifier,
    create_ppap_world_pipeline,
)
from visadapt.cli import plain_help
from visadapt.data import procedural as P

WORLD_VERSION = 1


def render_world_image(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One world image ``(16, 16, 3)`` uint8 and its class index into :data:`PPAP_WORLD_CLASSES`.

    Drawn on the procedural module's 32x32 supersampled grid, then box-filtered down twice (anti-aliased).
    """
    label = int(rng.integers(len(PPAP_WORLD_CLASSES)))
    background = P._color(rng)
    canvas = np.broadcast_to(background, (*P._GX.shape, 3)).copy()
    size = rng.uniform(8.0, 11.0)
    margin = size * 0.9
    u, v = P._local(rng.uniform(margin, 32 - margin), rng.uniform(margin, 32 - margin), size,
                    rng.uniform(0, 2 * math.pi))
    P._paint(canvas, P._shape_mask(PPAP_WORLD_CLASSES[label], u, v), P._contrasting(rng, background, 0.6))
    image = P._downsample(canvas)  # 32x32
    image = image.reshape(PPAP_WORLD_SIZE, 2, PPAP_WORLD_SIZE, 2, 3).mean(axis=(1, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label


def render_world(seed: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 16, 16)`` in [-1, 1] and labels ``(N,)``; item ``i`` depends on ``(seed, start + i)``."""
    images, labels = [], []
    for index in range(start, start + count):
        image, label = render_world_image(np.random.default_rng([seed, 11, index]))
        images.append(image)
        labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x.contiguous(), torch.tensor(labels)


def _cosine(optimizer, total: int, warmup: int):
    """timm's cosine over ``total`` optimiser steps with a linear warm-up from 0 over the first ``warmup`` (timm's
    train.py convention: the warm-up overrides the cosine's start); call ``step_update(num_updates=n)`` after the
    n-th optimiser step."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=total, warmup_t=warmup, warmup_lr_init=0.0, t_in_epochs=False)


def train_classifier(args, train_x, train_y, hold_x, hold_y) -> tuple[torch.nn.Module, float]:
    model = create_ppap_world_classifier(pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.classifier_lr, weight_decay=0.05)
    steps = args.classifier_epochs * (len(train_x) // args.batch_size)
    schedule = _cosine(optimizer, steps, 100)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    updates = 0
    for epoch in range(args.classifier_epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(len(train_x) // args.batch_size):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            schedule.step_update(num_updates=updates)
        print(f"classifier epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy "
              f"{classifier_accuracy(model, hold_x, hold_y):.1f}%", flush=True)
    return model.eval(), classifier_accuracy(model, hold_x, hold_y)


@torch.no_grad()
def classifier_accuracy(model, images, labels) -> float:
    was_training = model.training
    model.eval()
    correct = sum((model(images[i:i + 512]).argmax(1) == labels[i:i + 512]).sum().item()
                  for i in range(0, len(images), 512))
    model.train(was_training)
    return 100.0 * correct / len(images)


def train_unet(args, train_x, start: float):
    pipe = create_ppap_world_pipeline(pretrained=False)
    unet, scheduler = pipe.unet, pipe.scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    schedule = _cosine(optimizer, args.unet_steps, 100)
    generator = torch.Generator().manual_seed(args.seed + 1)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    unet.train()
    running = 0.0
    for step in range(1, args.unet_steps + 1):
        idx = torch.randint(len(train_x), (args.batch_size,), generator=generator)
        x0 = train_x[idx]
        if torch.rand((), generator=generator) < 0.5:  # every class is mirror-symmetric as a set
            x0 = x0.flip(3)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step_update(num_updates=step)
        # An EMA of the weights samples visibly cleaner than the last iterate after so few steps.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running += loss.item()
        if step % 100 == 0:
            print(f"unet step {step}/{args.unet_steps}: loss {running / 100:.4f} ({time.time() - start:.0f} s)",
                  flush=True)
            running = 0.0
    unet.load_state_dict(ema)
    return pipe


@torch.no_grad()
def sample_quality(pipe, classifier, count: int, seed: int) -> dict[str, float]:
    """Label histogram and mean confidence of the classifier on ``count`` DDIM-25 samples."""
    from diffusers import DDIMPipeline, DDIMScheduler

    ddim = DDIMPipeline(unet=pipe.unet.eval(), scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=count, num_inference_steps=25, generator=torch.Generator().manual_seed(seed),
                  output_type="np").images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
    probs = classifier(x).softmax(-1)
    hist = torch.bincount(probs.argmax(-1), minlength=len(PPAP_WORLD_CLASSES)).tolist()
    return {"samples": count, "label_histogram": dict(zip(PPAP_WORLD_CLASSES, hist, strict=True)),
            "mean_confidence": round(probs.max(-1).values.mean().item(), 4),
            "confident_fraction": round((probs.max(-1).values > 0.9).float().mean().item(), 4)}


def _save(state: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def main(argv=None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog or "train/pretrain_ppap_world.py",
                                     description=plain_help(__doc__.splitlines()[0]))
    parser.add_argument("--samples", type=int, default=16000, help="rendered training images (both models)")
    parser.add_argument("--holdout", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classifier-epochs", type=int, default=6)
    parser.add_argument("--classifier-lr", type=float, default=2e-3)
    parser.add_argument("--unet-steps", type=int, default=700)
    parser.add_argument("--unet-lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(assets_dir()))
    parser.add_argument("--only", choices=("both", "classifier", "unet"), default="both",
                        help="train one model (two processes can share the work); 'unet' judges its samples with "
                             "the classifier in output-dir when there is one")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    train_x, train_y = render_world(args.seed, 0, args.samples)
    hold_x, hold_y = render_world(args.seed, 10_000_000, args.holdout)
    print(f"rendered {args.samples} + {args.holdout} images in {time.time() - start:.0f} s", flush=True)
    recipe = json.dumps({k: v for k, v in vars(args).items() if k not in ("output_dir", "only", "threads")})
    common = {"world": f"16x16 shapes {','.join(PPAP_WORLD_CLASSES)} (train/pretrain_ppap_world.py)",
              "world_version": str(WORLD_VERSION), "recipe": recipe,
              "trained_with": f"torch {torch.__version__}, {platform.processor() or platform.machine()}"}

    if args.only in ("both", "classifier"):
        classifier, accuracy = train_classifier(args, train_x, train_y, hold_x, hold_y)
        _save(classifier.state_dict(), out / PPAP_WORLD_CLASSIFIER_WEIGHTS,
              {**common, "model_args": json.dumps(PPAP_WORLD_CLASSIFIER_ARGS), "holdout_accuracy": f"{accuracy:.2f}",
               "wall_time_s": f"{time.time() - start:.0f}"})
        print(f"classifier held-out accuracy {accuracy:.1f}% ({time.time() - start:.0f} s)", flush=True)
    if args.only == "classifier":
        return

    unet_start = time.time()
    pipe = train_unet(args, train_x, start)
    quality = {}
    if (out / PPAP_WORLD_CLASSIFIER_WEIGHTS).is_file():
        classifier = create_ppap_world_classifier(weights=out / PPAP_WORLD_CLASSIFIER_WEIGHTS)
        quality = sample_quality(pipe, classifier, 256, args.seed)
    print(f"samples: {quality}", flush=True)
    _save({k: v.half() for k, v in pipe.unet.state_dict().items()}, out / PPAP_WORLD_UNET_WEIGHTS,
          {**common, "unet_config": json.dumps(PPAP_WORLD_UNET_CONFIG), "sample_quality": json.dumps(quality),
           "wall_time_s": f"{time.time() - unet_start:.0f}"})
    print(f"wrote {out / PPAP_WORLD_CLASSIFIER_WEIGHTS} and {out / PPAP_WORLD_UNET_WEIGHTS} "
          f"in {time.time() - start:.0f} s")


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    main(prog=module_prog(__spec__))
