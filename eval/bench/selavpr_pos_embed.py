"""SelaVPR position embeddings: DINOv2's official interpolation vs timm's resampling, side by side in one run.

    python eval/bench/selavpr_pos_embed.py                  # embedded backbone, inputs 16..64 px, 64 images

The official SelaVPR backbone interpolates its pre-training position embedding at every forward (bicubic, no
antialiasing, scale factor (h + 0.1) / M); timm resamples it (bicubic, antialiased, to the grid size; once at
load for ``img_size``, or per forward with ``dynamic_img_size``: the same numbers). On the embedded backbone
(``visadapt_procvit_tiny``: 8 x 8 grid of 4 px patches at 32 px, the pre-training size) this prints, per input
size, the relative difference ``||official - timm|| / ||timm||`` of

* the patch position embedding itself,
* the backbone's final normalised patch tokens (what SelaVPR's heads read),
* the SelaVPR global descriptor (GeM, p = 3, over the channel-normalised tokens; adapters at their zero start),

averaged over procedural upstream images. Rows where the grid equals the pre-training grid print 0: both use the
embedding as it is. A last line gives the embedding difference for DINOv2 ViT-L/14's 37 x 37 grid at SelaVPR's 224
px (16 x 16) on a smooth synthetic embedding (no pretrained weights are downloaded).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import visadapt
from visadapt.backbones import EMBEDDED_MODEL, create_backbone
from visadapt.data.procedural import render_upstream
from visadapt.plugins import selavpr


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of ``||a_i - b_i|| / ||b_i||``, ``a``/``b`` ``(N, ...)``."""
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).mean().item()


def smooth_embedding(side: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``(1, side * side, dim)``: random low-frequency sinusoids over the grid, like a trained embedding."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    fx, fy = torch.rand(2, dim, 1, 1, generator=gen) * 6
    phase = torch.rand(dim, 1, 1, generator=gen) * 6.28
    return torch.sin(fx * xx + fy * yy + phase).flatten(1).T.unsqueeze(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32, 40, 48, 64])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    base = torch.stack([torch.from_numpy(np.ascontiguousarray(render_upstream(rng)[0])).float()
                        for _ in range(args.images)])
    base = base.permute(0, 3, 1, 2) if base.shape[-1] == 3 else base
    base = base / 255.0  # uint8 renders to [0, 1]
    models = {}
    for choice in ("official", "timm"):
        model = create_backbone(EMBEDDED_MODEL, "default", **selavpr.BACKBONE_ARGUMENTS).eval()
        visadapt.attach(model, "selavpr", pos_embed=choice)
        models[choice] = model
    vit = models["timm"]
    grid = tuple(vit.patch_embed.grid_size)
    source = vit.pos_embed[:, vit.num_prefix_tokens:].detach()
    patch = vit.patch_embed.patch_size[0]
    print(f"{EMBEDDED_MODEL}: pre-training grid {grid[0]}x{grid[1]} of {patch} px patches; {args.images} images; "
          f"relative difference official vs timm")
    print(f"{'input px':>8}{'grid':>8}{'pos embedding':>15}{'patch tokens':>14}{'global descriptor':>19}")
    for size in args.sizes:
        images = F.interpolate(base, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = (images - 0.5) / 0.5
        side = size // patch
        official_pos = selavpr.dinov2_position_embedding(source, (side, side))
        timm_pos = resample_abs_pos_embed(source, new_size=[side, side], old_size=list(grid), num_prefix_tokens=0)
        with torch.no_grad():
            tokens = {k: m.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)[0]
                      for k, m in models.items()}
            descriptors = {k: selavpr.place_features(m, images)[0] for k, m in models.items()}
        print(f"{size:>8}{f'{side}x{side}':>8}{relative(official_pos, timm_pos):>15.4f}"
              f"{relative(tokens['official'], tokens['timm']):>14.4f}"
              f"{relative(descriptors['official'], descriptors['timm']):>19.4f}")
    large = smooth_embedding(37, 64)
    official_pos = selavpr.dinov2_position_embedding(large, (16, 16))
    timm_pos = resample_abs_pos_embed(large, new_size=[16, 16], old_size=[37, 37], num_prefix_tokens=0)
    print(f"DINOv2 ViT-L/14 grid 37x37 -> 16x16 (224 px), smooth synthetic embedding: pos embedding "
          f"{relative(official_pos, timm_pos):.4f}")


if __name__ == "__main__":
    main()
