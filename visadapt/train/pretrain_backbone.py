"""Pretrain an embedded backbone on the procedural upstream task, writing ``assets/proc*_tiny.safetensors``.

    python train/pretrain_backbone.py           # the shipped ViT recipe (about 13 min on 2 CPU cores)
    python train/pretrain_backbone.py --model visadapt_procswin_tiny --threads 1   # the Swin's (about 10 min)
    python train/pretrain_backbone.py --samples 4000 --epochs 1 --output /tmp/vit.safetensors  # a quick look

The upstream task (60 classes = 10 shapes x 6 fill patterns, random pose, colours and backgrounds) is in
:mod:`visadapt.data.procedural`; the downstream mini-VTAB tasks are deliberately different from it. The
images are rendered once up front (in parallel) and kept in memory as uint8, then the whole model is
trained with AdamW, timm's cosine schedule with linear warm-up and label smoothing. The Swin
(``visadapt_procswin_tiny``, 64x64 input) sees the same 32x32 renders upsampled bilinearly, so both backbones
learn from identical data; it trains for 8 epochs instead of 4 (its loss was still falling after 4). The file
records the recipe and the held-out upstream accuracy in its safetensors metadata.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.scheduler import CosineLRScheduler

from visadapt.backbones import (
    EMBEDDED_MODEL,
    EMBEDDED_SWIN,
    PROCSWIN_IMAGE_SIZE,
    PROCSWIN_TINY_ARGS,
    PROCVIT_TINY_ARGS,
    embedded_swin_weights_path,
    embedded_weights_path,
)
from visadapt.cli import plain_help
from visadapt.data.procedural import GENERATOR_VERSION, IMAGE_SIZE, UPSTREAM_CLASSES, render_upstream

#: what differs between the embedded backbones: the input side (renders are 32x32, a larger input is their
#: bilinear upsample), the architecture arguments recorded in the file, where the file ships, the names of
#: matrices kept out of weight decay besides norms and biases (position tables, as in the DeiT/Swin recipes),
#: and the default number of epochs of the shipped recipe
EMBEDDED_BACKBONES = {
    EMBEDDED_MODEL: {"input_size": IMAGE_SIZE, "model_args": PROCVIT_TINY_ARGS,
                     "output": embedded_weights_path, "no_decay": ("pos_embed",), "epochs": 4},
    EMBEDDED_SWIN: {"input_size": PROCSWIN_IMAGE_SIZE, "model_args": PROCSWIN_TINY_ARGS,
                    "output": embedded_swin_weights_path, "no_decay": ("relative_position_bias_table",),
                    "epochs": 8},
}


def _render(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, start, stop = args
    images = np.empty((stop - start, 32, 32, 3), dtype=np.uint8)
    labels = np.empty(stop - start, dtype=np.int64)
    for k, index in enumerate(range(start, stop)):
        images[k], labels[k] = render_upstream(np.random.default_rng([seed, 7, index]))
    return images, labels


def render_set(seed: int, start: int, count: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)``; item ``i`` depends only on ``(seed, start + i)``."""
    chunk = max(1, count // (workers * 8))
    jobs = [(seed, s, min(s + chunk, start + count)) for s in range(start, start + count, chunk)]
    with multiprocessing.Pool(workers) as pool:
        parts = pool.map(_render, jobs)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.concatenate([p[1] for p in parts]))


def to_input(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 ``(B, 3, 32, 32)`` -> float ``(B, 3, size, size)`` normalised with the model's mean = std = 0.5,
    i.e. to [-1, 1]; a ``size`` other than 32 is a bilinear upsample (the Swin's 64)."""
    x = images.float().div_(127.5).sub_(1.0)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512, size: int = IMAGE_SIZE) -> float:
    model.eval()
    correct = sum((model(to_input(images[i:i + batch_size], size)).argmax(1) == labels[i:i + batch_size])
                  .sum().item() for i in range(0, len(images), batch_size))
    return 100.0 * correct / len(images)


def main(argv=None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog or "train/pretrain_backbone.py",
                                     description=plain_help(__doc__.splitlines()[0]))
    parser.add_argument("--model", default=EMBEDDED_MODEL, choices=sorted(EMBEDDED_BACKBONES),
                        help="which embedded backbone to pretrain")
    parser.add_argument("--samples", type=int, default=32000, help="upstream training images")
    parser.add_argument("--holdout", type=int, default=2000, help="held-out upstream images for the accuracy")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: the shipped recipe's (4 for the ViT, 8 for the Swin)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering images")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per physical core)")
    parser.add_argument("--output", default=None,
                        help="the file to write (default: the model's shipped file in assets/)")
    args = parser.parse_args(argv)
    spec = EMBEDDED_BACKBONES[args.model]
    size = spec["input_size"]
    args.output = args.output or str(spec["output"]())
    args.epochs = spec["epochs"] if args.epochs is None else args.epochs
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    start = time.time()
    train_x, train_y = render_set(args.seed, 0, args.samples, args.workers)
    hold_x, hold_y = render_set(args.seed, 10_000_000, args.holdout, args.workers)
    print(f"rendered {args.samples} + {args.holdout} images in {time.time() - start:.0f} s", flush=True)

    model = timm.create_model(args.model, pretrained=False, num_classes=UPSTREAM_CLASSES)
    # No weight decay on norms, biases and position tables, as in the DeiT/Swin recipes.
    decayed = {n for n, p in model.named_parameters()
               if p.ndim > 1 and not any(k in n for k in spec["no_decay"])}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = args.samples // args.batch_size
    total = steps_per_epoch * args.epochs
    # timm's cosine over every step, the linear warm-up from 0 overriding its start (timm's train.py convention)
    schedule = CosineLRScheduler(optimizer, t_initial=total, warmup_t=args.warmup_steps, warmup_lr_init=0.0,
                                 t_in_epochs=False)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.samples, generator=generator)
        running, counted = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = to_input(train_x[idx], size)
            if torch.rand((), generator=generator) < 0.5:  # flips keep every upstream class intact
                x = x.flip(3)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            schedule.step_update(num_updates=step)
            running, counted = running + loss.item(), counted + 1
            if step % 100 == 0:
                print(f"epoch {epoch + 1} step {step}/{total} loss {running / counted:.3f} "
                      f"({time.time() - start:.0f} s)", flush=True)
                running, counted = 0.0, 0
        held_out = accuracy(model, hold_x, hold_y, size=size)
        print(f"epoch {epoch + 1}: held-out upstream accuracy {held_out:.1f}%", flush=True)

    held_out = accuracy(model, hold_x, hold_y, size=size)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    upstream = "procedural shapes x fills, 60 classes (visadapt.data.procedural.render_upstream)"
    if size != IMAGE_SIZE:
        upstream += f", 32x32 renders upsampled bilinearly to {size}x{size}"
    meta = {
        "model": args.model,
        "model_args": json.dumps(spec["model_args"]),
        "upstream_task": upstream,
        "generator_version": str(GENERATOR_VERSION),
        "upstream_holdout_accuracy": f"{held_out:.2f}",
        # The model is named above; workers, threads and the output path change nothing the recipe decides.
        "recipe": json.dumps({k: v for k, v in vars(args).items()
                              if k not in ("output", "workers", "threads", "model")}),
        "trained_with": f"torch {torch.__version__}, timm {timm.__version__}, "
                        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "wall_time_s": f"{time.time() - start:.0f}",
    }
    tmp = args.output + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, args.output)
    print(f"held-out upstream accuracy {held_out:.1f}%; wrote {args.output} in {time.time() - start:.0f} s")


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    main(prog=module_prog(__spec__))
