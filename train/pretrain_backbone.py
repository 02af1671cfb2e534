"""Reproduce ``assets/procvit_tiny.safetensors``: pretrain the embedded ViT on the procedural upstream task.

    python train/pretrain_backbone.py                       # the shipped recipe (about 13 min on 2 CPU cores)
    python train/pretrain_backbone.py --samples 4000 --epochs 1 --output /tmp/procvit.safetensors   # a quick look

The upstream task (60 classes = 10 shapes x 6 fill patterns, random pose, colours and backgrounds) is in
:mod:`visadapt.data.procedural`; the downstream mini-VTAB tasks are deliberately different from it. The
images are rendered once up front (in parallel) and kept in memory as uint8, then the whole model is
trained with AdamW, a cosine schedule with linear warm-up and label smoothing. The file records the
recipe and the held-out upstream accuracy in its safetensors metadata.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from visadapt.backbones import EMBEDDED_MODEL, PROCVIT_TINY_ARGS, embedded_weights_path
from visadapt.data.procedural import GENERATOR_VERSION, UPSTREAM_CLASSES, render_upstream


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


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, 32, 32)`` -> float normalised with the model's mean = std = 0.5, i.e. to [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512) -> float:
    model.eval()
    correct = sum((model(to_input(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return 100.0 * correct / len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32000, help="upstream training images")
    parser.add_argument("--holdout", type=int, default=2000, help="held-out upstream images for the accuracy")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering images")
    parser.add_argument("--output", default=str(embedded_weights_path()))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    start = time.time()
    train_x, train_y = render_set(args.seed, 0, args.samples, args.workers)
    hold_x, hold_y = render_set(args.seed, 10_000_000, args.holdout, args.workers)
    print(f"rendered {args.samples} + {args.holdout} images in {time.time() - start:.0f} s", flush=True)

    model = timm.create_model(EMBEDDED_MODEL, pretrained=False, num_classes=UPSTREAM_CLASSES)
    # No weight decay on norms, biases and position/class tokens, as in the DeiT/timm recipes.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = args.samples // args.batch_size
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) * 0.5
                                                 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.samples, generator=generator)
        running, counted = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = to_input(train_x[idx])
            if torch.rand((), generator=generator) < 0.5:  # flips keep every upstream class intact
                x = x.flip(3)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            running, counted = running + loss.item(), counted + 1
            if step % 100 == 0:
                print(f"epoch {epoch + 1} step {step}/{total} loss {running / counted:.3f} "
                      f"({time.time() - start:.0f} s)", flush=True)
                running, counted = 0.0, 0
        print(f"epoch {epoch + 1}: held-out upstream accuracy {accuracy(model, hold_x, hold_y):.1f}%", flush=True)

    held_out = accuracy(model, hold_x, hold_y)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "model": EMBEDDED_MODEL,
        "model_args": json.dumps(PROCVIT_TINY_ARGS),
        "upstream_task": "procedural shapes x fills, 60 classes (visadapt.data.procedural.render_upstream)",
        "generator_version": str(GENERATOR_VERSION),
        "upstream_holdout_accuracy": f"{held_out:.2f}",
        "recipe": json.dumps({k: v for k, v in vars(args).items() if k not in ("output", "workers")}),
        "trained_with": f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}",
        "wall_time_s": f"{time.time() - start:.0f}",
    }
    tmp = args.output + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, args.output)
    print(f"held-out upstream accuracy {held_out:.1f}%; wrote {args.output} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
