"""Pretrain an embedded backbone, writing ``assets/proc*_tiny.safetensors``.

    python train/pretrain_backbone.py           # the shipped ViT recipe (about 12 min on 2 CPU cores)
    python train/pretrain_backbone.py --model visadapt_procswin_tiny   # the Swin's (about 15 min)
    python train/pretrain_backbone.py --samples 4000 --epochs 1 --output /tmp/vit.safetensors  # a quick look

Both backbones learn from the scene corpus of :mod:`visadapt.data.upstream` (one to three objects of 32
categories, shapes and stroke-font glyphs, on varied backgrounds and lighting) with four losses, chosen by what
transfers downstream (mini-VTAB for the ViT, the dense scenes for the Swin) rather than by upstream accuracy
(README, "The embedded default" and "The embedded Swin"):

* masked-image modelling (SimMIM): half of each batch has half of its 8x8-pixel blocks of tokens replaced by a
  learned token, and a linear layer predicts the raw pixels of every masked 4x4 patch of the 32x32 render (L1);
  this is what keeps colour, texture and where things are;
* a per-patch label (the category covering most of each 4x4 patch, or background; cross-entropy);
* the presence of each category, from the pooled features (multi-label BCE);
* the layout: the fraction of object patches in each of 4x4 regions, from the pooled features (BCE), so that
  the pooled vector, which is what a downstream head reads, keeps where the objects are.

The ViT (32x32 input) reads the per-patch heads from its final tokens (:class:`MaskedImageModel`); the Swin
(64x64 input: the renders upsampled bilinearly) from a hypercolumn of its four stages, so that every map a dense
decoder reads is trained (:class:`MaskedSwinModel`). AdamW with the MAE / SimMIM betas, timm's cosine schedule
with linear warm-up, gradients clipped at norm 1. Images are rendered once up front (in parallel) and kept in
memory as uint8. The file records the recipe and the held-out upstream figures in its safetensors metadata.
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
from timm.layers import LayerNorm2d
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
from visadapt.data.procedural import IMAGE_SIZE
from visadapt.data.upstream import NUM_CATEGORIES, PATCH_GRID, UPSTREAM_VERSION, render_scene

#: the corpus seed: item i is rendered from ``default_rng([seed, SCENES_STREAM, i])``
SCENES_STREAM = 11
#: held-out items start here, far beyond any training set
HOLDOUT_START = 10_000_000
#: side of the layout target: the fraction of object patches in each region of a LAYOUT_GRID x LAYOUT_GRID split
LAYOUT_GRID = 4


def to_input(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 ``(B, 3, 32, 32)`` -> float ``(B, 3, size, size)`` normalised with the model's mean = std = 0.5,
    i.e. to [-1, 1]; a ``size`` other than 32 is a bilinear upsample (the Swin's 64)."""
    return resize(images.float().div_(127.5).sub_(1.0), size)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, size, size)``, bilinear; ``x`` itself when it already has that size."""
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def _render_scenes(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, start, stop = args
    images = np.empty((stop - start, 32, 32, 3), dtype=np.uint8)
    labels = np.empty((stop - start, NUM_CATEGORIES), dtype=np.float32)
    patches = np.empty((stop - start, PATCH_GRID * PATCH_GRID), dtype=np.uint8)
    for k, index in enumerate(range(start, stop)):
        images[k], labels[k], grid = render_scene(np.random.default_rng([seed, SCENES_STREAM, index]))
        patches[k] = grid.reshape(-1)
    return images, labels, patches


def render_scene_set(seed: int, start: int, count: int,
                     workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scene images ``(N, 3, 32, 32)`` uint8, presence labels ``(N, NUM_CATEGORIES)`` float and patch labels
    ``(N, PATCH_GRID**2)`` long; item ``i`` depends only on ``(seed, start + i)``."""
    chunk = max(1, count // (workers * 8))
    jobs = [(seed, s, min(s + chunk, start + count)) for s in range(start, start + count, chunk)]
    with multiprocessing.Pool(workers) as pool:
        parts = pool.map(_render_scenes, jobs)
    images, presence, patches = (np.concatenate(arrays) for arrays in zip(*parts))
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(presence),
            torch.from_numpy(patches).long())


def patchify(x: torch.Tensor, patch: int = IMAGE_SIZE // PATCH_GRID) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, N, p*p*3)``, row-major over the patches: the pixel target of a 32x32 render is
    one row of ``p*p*3`` values per cell of the ``PATCH_GRID x PATCH_GRID`` label map."""
    b, c, h, w = x.shape
    p = patch
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)


class MaskedImageModel(torch.nn.Module):
    """A timm ViT with a SimMIM-style masked-image head: masked patch tokens are replaced by a learned token
    before the position embedding, and a linear layer predicts each patch's pixels from its final token.

    ``forward(x (B, 3, 32, 32), mask (B, 64) bool)`` -> ``(logits (B, C), pixels (B, 64, 48), patch logits
    (B, 64, C + 1), layout logits (B, LAYOUT_GRID**2))``: one row per 4x4 patch, which is one cell of the
    ``PATCH_GRID`` label map.
    """

    #: the side of the input, of the token grid the mask covers, and of a masking block in tokens (8x8 px)
    input_size, mask_grid, mask_block = IMAGE_SIZE, PATCH_GRID, 2

    def __init__(self, vit):
        super().__init__()
        self.backbone = vit
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = torch.nn.Linear(vit.embed_dim, 3 * (IMAGE_SIZE // PATCH_GRID) ** 2)
        self.patch_head = torch.nn.Linear(vit.embed_dim, NUM_CATEGORIES + 1)
        self.layout_head = torch.nn.Linear(vit.embed_dim, LAYOUT_GRID * LAYOUT_GRID)

    def forward(self, x, mask):
        vit = self.backbone
        tokens = vit.patch_embed(x)
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
        tokens = vit.norm(vit.blocks(tokens))
        patches = tokens[:, vit.num_prefix_tokens:]
        pooled = vit.forward_head(tokens, pre_logits=True)
        return (vit.head(pooled), self.decoder(patches), self.patch_head(patches), self.layout_head(pooled))

    def cell_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The token mask ``(B, mask_grid**2)`` as a mask of the label-map cells ``(B, PATCH_GRID**2)``."""
        return mask


class MaskedSwinModel(torch.nn.Module):
    """The same four heads on a timm Swin (SimMIM's Swin variant): masked tokens of the patch embedding's
    ``16x16`` grid (64 px input) are replaced by a learned token before the first stage; the heads read a
    hypercolumn of every stage's map, each layer-normed and resized to the ``PATCH_GRID x PATCH_GRID`` label map
    (stage 1 average-pooled, stage 2 as is, stages 3-4 repeated), so that every stage a dense decoder reads is
    trained to carry the pixels and the category of each place; presence and layout read the pooled final map.

    ``forward(x (B, 3, 64, 64), mask (B, 256) bool)`` -> the :class:`MaskedImageModel` outputs.
    """

    input_size, mask_grid, mask_block = PROCSWIN_IMAGE_SIZE, PROCSWIN_IMAGE_SIZE // 4, 4

    def __init__(self, swin):
        super().__init__()
        self.backbone = swin
        channels = [info["num_chs"] for info in swin.feature_info]
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 1, channels[0]))
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.stage_norms = torch.nn.ModuleList(LayerNorm2d(c, eps=1e-5) for c in channels)
        self.decoder = torch.nn.Linear(sum(channels), 3 * (IMAGE_SIZE // PATCH_GRID) ** 2)
        self.patch_head = torch.nn.Linear(sum(channels), NUM_CATEGORIES + 1)
        self.layout_head = torch.nn.Linear(swin.num_features, LAYOUT_GRID * LAYOUT_GRID)

    def forward(self, x, mask):
        swin = self.backbone
        tokens = swin.patch_embed(x)  # (B, 16, 16, C) NHWC
        b, h, w, _ = tokens.shape
        tokens = torch.where(mask.reshape(b, h, w, 1), self.mask_token.to(tokens.dtype), tokens)
        maps = []
        for stage, norm in zip(swin.layers, self.stage_norms):
            tokens = stage(tokens)
            stage_map = norm(tokens.permute(0, 3, 1, 2))
            if stage_map.shape[-1] > PATCH_GRID:
                stage_map = F.adaptive_avg_pool2d(stage_map, PATCH_GRID)
            elif stage_map.shape[-1] < PATCH_GRID:
                stage_map = F.interpolate(stage_map, size=(PATCH_GRID, PATCH_GRID), mode="nearest")
            maps.append(stage_map)
        column = torch.cat(maps, 1).flatten(2).transpose(1, 2)  # (B, PATCH_GRID**2, sum of widths)
        pooled = swin.forward_head(swin.norm(tokens), pre_logits=True)
        return (swin.head.fc(pooled), self.decoder(column), self.patch_head(column), self.layout_head(pooled))

    def cell_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A cell is masked when the 2x2 tokens over it are (masking blocks cover whole cells)."""
        b, side = len(mask), self.mask_grid
        cells = mask.reshape(b, PATCH_GRID, side // PATCH_GRID, PATCH_GRID, side // PATCH_GRID)
        return cells.all(4).all(2).reshape(b, PATCH_GRID * PATCH_GRID)


#: what differs between the embedded backbones: the masked-image wrapper, the architecture arguments recorded
#: in the file, where the file ships, the names of matrices kept out of weight decay besides norms and biases
#: (position tables, as in the DeiT/Swin recipes; the ViT's mask token too, as SimMIM; the Swin's shipped run
#: decayed its mask token, which lives only during pretraining) and the shipped recipe's defaults (each a flag)
EMBEDDED_BACKBONES = {
    EMBEDDED_MODEL: {"wrapper": MaskedImageModel, "model_args": PROCVIT_TINY_ARGS,
                     "output": embedded_weights_path, "no_decay": ("pos_embed", "mask_token"),
                     "recipe": {"samples": 60000, "epochs": 8, "batch_size": 128, "lr": 1e-3, "warmup_steps": 150}},
    EMBEDDED_SWIN: {"wrapper": MaskedSwinModel, "model_args": PROCSWIN_TINY_ARGS,
                    "output": embedded_swin_weights_path, "no_decay": ("relative_position_bias_table",),
                    "recipe": {"samples": 64000, "epochs": 8, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200}},
}


def layout_target(patches: torch.Tensor) -> torch.Tensor:
    """``(B, PATCH_GRID**2)`` patch labels -> ``(B, LAYOUT_GRID**2)`` fraction of object patches per region."""
    objects = (patches != NUM_CATEGORIES).float().reshape(-1, 1, PATCH_GRID, PATCH_GRID)
    return F.adaptive_avg_pool2d(objects, LAYOUT_GRID).flatten(1)


def block_mask(batch: int, grid: int, block: int, ratio: float, generator) -> torch.Tensor:
    """``(batch, grid*grid)`` bool: ``ratio`` of the ``block x block`` groups of patch tokens masked (SimMIM's
    masking unit is larger than a patch, so that a masked patch cannot be copied from its neighbour)."""
    cells = grid // block
    chosen = torch.rand(batch, cells * cells, generator=generator).argsort(1) < round(ratio * cells * cells)
    chosen = chosen.reshape(batch, cells, 1, cells, 1).expand(batch, cells, block, cells, block)
    return chosen.reshape(batch, grid * grid)


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over categories of the average precision (%) of presence ``scores (N, C)`` for ``labels (N, C)`` in
    {0, 1}; a category with no positive is skipped."""
    aps = []
    for c in range(labels.shape[1]):
        order = scores[:, c].argsort(descending=True)
        hits = labels[order, c]
        if hits.sum() == 0:
            continue
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum() / hits.sum())
    return 100.0 * float(torch.stack(aps).mean())


def param_groups(model: torch.nn.Module, no_decay: tuple[str, ...], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and the named tables (DeiT/Swin recipes)."""
    decayed = {n for n, p in model.named_parameters() if p.ndim > 1 and not any(k in n for k in no_decay)}
    return [{"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0}]


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """timm's cosine over every step, the linear warm-up from 0 overriding its start (timm's train.py)."""
    return CosineLRScheduler(optimizer, t_initial=total_steps, warmup_t=warmup_steps, warmup_lr_init=0.0,
                             t_in_epochs=False)


def optimizer_step(model: torch.nn.Module, optimizer, loss: torch.Tensor) -> None:
    """Backward ``loss``, clip the gradient norm at 1 and step: the same update in both recipes."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def scene_mask(model, batch: int, ratio: float, generator) -> torch.Tensor:
    """``(batch, model.mask_grid**2)``: ``ratio`` of the model's 8x8-pixel blocks of tokens masked."""
    return block_mask(batch, model.mask_grid, model.mask_block, ratio, generator)


def input_and_target(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 renders ``(B, 3, 32, 32)`` -> the model's input ``(B, 3, S, S)`` (``S = model.input_size``) and the
    pixel target ``(B, PATCH_GRID**2, 48)``: the 4x4 patches of the render itself, whatever the input size."""
    rendered = to_input(images)
    return resize(rendered, model.input_size), patchify(rendered)


def masked_pixel_l1(model, pixels: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 of predicted ``pixels`` against ``target`` (both ``(B, PATCH_GRID**2, 48)``) over the cells the
    token ``mask`` hides; zero, still attached to the graph, when nothing is masked."""
    if not mask.any():
        return pixels.sum() * 0
    return (pixels - target).abs()[model.cell_mask(mask)[..., None].expand_as(pixels)].mean()


def scene_losses(model, images, presence, patches, mask) -> dict[str, torch.Tensor]:
    """The four upstream losses (module docstring) of uint8 renders ``images (B, 3, 32, 32)`` fed at the model's
    input size, with ``mask (B, model.mask_grid**2)``; the pixel target is the 32x32 render itself."""
    x, target = input_and_target(model, images)
    logits, pixels, patch_logits, layout_logits = model(x, mask)
    return {
        "pixels": masked_pixel_l1(model, pixels, target, mask),
        "patches": F.cross_entropy(patch_logits.flatten(0, 1), patches.flatten()),
        "presence": F.binary_cross_entropy_with_logits(logits, presence),
        "layout": F.binary_cross_entropy_with_logits(layout_logits, layout_target(patches)),
    }


@torch.no_grad()
def scene_holdout(model, images, presence, patches, mask_ratio: float, seed: int) -> dict:
    """Held-out figures: presence mAP (%), foreground patch-label accuracy (%), masked-pixel L1 ([-1, 1] units)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    hits = fg = 0
    l1, scores = [], []
    for i in range(0, len(images), 500):
        x, target = input_and_target(model, images[i:i + 500])
        p = patches[i:i + 500]
        mask = scene_mask(model, len(x), mask_ratio, generator)
        l1.append(masked_pixel_l1(model, model(x, mask)[1], target, mask))
        # unmasked, the wrapper's logits are the backbone's own (tests/test_upstream_corpus.py)
        logits, _, patch_logits, _ = model(x, torch.zeros_like(mask))
        scores.append(logits)
        foreground = p != NUM_CATEGORIES
        hits += int((patch_logits.argmax(-1) == p)[foreground].sum())
        fg += int(foreground.sum())
    presence_map = mean_average_precision(torch.cat(scores), presence)
    return {"upstream_holdout_map": f"{presence_map:.2f}",
            "upstream_holdout_patch_accuracy": f"{100.0 * hits / max(fg, 1):.2f}",
            "upstream_holdout_pixel_l1": f"{float(torch.stack(l1).mean()):.4f}"}


def train_scenes(args, spec: dict, start: float) -> tuple[dict, dict]:
    """The scene corpus with the four losses; returns the backbone's state (without the pretraining heads) and
    the held-out figures."""
    train_x, train_y, train_p = render_scene_set(args.seed, 0, args.samples, args.workers)
    hold = render_scene_set(args.seed, HOLDOUT_START, args.holdout, args.workers)
    print(f"rendered {args.samples} + {args.holdout} scenes in {time.time() - start:.0f} s", flush=True)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=NUM_CATEGORIES)
    model = spec["wrapper"](backbone)
    optimizer = torch.optim.AdamW(param_groups(model, spec["no_decay"], args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))  # the MAE / SimMIM betas
    steps_per_epoch = args.samples // args.batch_size
    total = steps_per_epoch * args.epochs
    schedule = cosine_schedule(optimizer, total, args.warmup_steps)
    weights = {"pixels": args.mim_weight, "patches": args.patch_weight, "presence": args.presence_weight,
               "layout": args.layout_weight}
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.samples, generator=generator)
        sums = dict.fromkeys(weights, 0.0)
        counted = 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            # the first half of the batch masked (pixel loss), the rest whole, as a downstream task sees images
            mask = scene_mask(model, len(idx), args.mask_ratio, generator)
            mask[len(idx) // 2:] = False
            losses = scene_losses(model, train_x[idx], train_y[idx], train_p[idx], mask)
            loss = sum(weights[k] * v for k, v in losses.items())
            optimizer_step(model, optimizer, loss)
            step += 1
            schedule.step_update(num_updates=step)
            for k, v in losses.items():
                sums[k] += v.item()
            counted += 1
            if step % args.log_every == 0:
                shown = " ".join(f"{k} {v / counted:.4f}" for k, v in sums.items())
                print(f"epoch {epoch + 1} step {step}/{total} {shown} ({time.time() - start:.0f} s)", flush=True)
                sums, counted = dict.fromkeys(weights, 0.0), 0
        figures = scene_holdout(model, *hold, args.mask_ratio, args.seed)  # seeded masks: the same on every call
        print(f"epoch {epoch + 1}: held-out {figures}", flush=True)
    if args.epochs == 0:
        figures = scene_holdout(model, *hold, args.mask_ratio, args.seed)
    figures["upstream_task"] = (f"procedural scenes v{UPSTREAM_VERSION}, {NUM_CATEGORIES} categories "
                                f"(visadapt.data.upstream.render_scene)")
    figures["upstream_version"] = str(UPSTREAM_VERSION)
    return {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, figures


def main(argv=None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog or "train/pretrain_backbone.py",
                                     description=plain_help(__doc__.splitlines()[0]))
    parser.add_argument("--model", default=EMBEDDED_MODEL, choices=sorted(EMBEDDED_BACKBONES),
                        help="which embedded backbone to pretrain")
    shipped = "default: the model's shipped recipe"
    parser.add_argument("--samples", type=int, default=None, help=f"upstream training images ({shipped})")
    parser.add_argument("--holdout", type=int, default=2000, help="held-out upstream images for the figures")
    parser.add_argument("--epochs", type=int, default=None, help=shipped)
    parser.add_argument("--batch-size", type=int, default=None, help=shipped)
    parser.add_argument("--lr", type=float, default=None, help=shipped)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=None, help=shipped)
    scene = parser.add_argument_group("the scene objective (module docstring)")
    scene.add_argument("--mim-weight", type=float, default=1.0, help="weight of the masked-pixel L1")
    scene.add_argument("--patch-weight", type=float, default=1.0, help="weight of the per-patch label loss")
    scene.add_argument("--presence-weight", type=float, default=1.0, help="weight of the presence BCE")
    scene.add_argument("--layout-weight", type=float, default=1.0, help="weight of the layout BCE")
    scene.add_argument("--mask-ratio", type=float, default=0.5, help="share of the 8x8-pixel masking blocks masked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering images")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per physical core)")
    parser.add_argument("--log-every", type=int, default=100, help="steps between loss lines")
    parser.add_argument("--output", default=None,
                        help="the file to write (default: the model's shipped file in assets/)")
    args = parser.parse_args(argv)
    spec = EMBEDDED_BACKBONES[args.model]
    for key, value in spec["recipe"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output = args.output or str(spec["output"]())
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    start = time.time()
    state, figures = train_scenes(args, spec, start)
    meta = {
        "model": args.model,
        "model_args": json.dumps(spec["model_args"]),
        **figures,
        # The model is named above; workers, threads, logging and the output path change nothing the recipe decides.
        "recipe": json.dumps({k: v for k, v in vars(args).items()
                              if k not in ("output", "workers", "threads", "model", "log_every")}),
        "trained_with": f"torch {torch.__version__}, timm {timm.__version__}, "
                        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "wall_time_s": f"{time.time() - start:.0f}",
    }
    tmp = args.output + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, args.output)
    shown = {k: v for k, v in figures.items() if k.startswith("upstream_holdout")}
    print(f"held-out {shown}; wrote {args.output} in {time.time() - start:.0f} s")


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    main(prog=module_prog(__spec__))
