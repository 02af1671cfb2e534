"""PPAP side by side in one run: memory of N experts on one backbone vs N deep copies, and the time per sampling
step of guided vs unguided DDIM.

    python eval/bench/ppap.py                     # ResNet-50 and DeiT-S shapes (random init), tiny DDIM UNet
    python eval/bench/ppap.py --experts 5 --steps 10

1. **Memory** (parameter + buffer bytes, fp32): the frozen classifier plus N PPAP experts (visadapt: one
   backbone, N small expert states) against the official layout, N full ``copy.deepcopy`` s of the adapted
   classifier (each copy a backbone plus one expert). Random init: only shapes matter.
2. **Time per step**: a DDIMPipeline with a small UNet2DModel at 32 px, batch 4, unguided vs guided by a
   ResNet-50-shaped classifier (PPAP experts, routing by t) and by the same classifier naively (experts off).
   Guidance adds one classifier forward + backward per step, so the ratio depends on classifier / UNet cost.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import timm
import torch

import visadapt
from visadapt.plugins.ppap import guide


def tensor_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def memory_rows(experts: int, rank: int) -> list[tuple[str, int, int]]:
    rows = []
    for name in ("resnet50", "deit_small_patch16_224"):
        model = timm.create_model(name, pretrained=False)
        visadapt.attach(model, "ppap", num_experts=experts, rank=rank)
        shared = tensor_bytes(model)
        single = timm.create_model(name, pretrained=False)
        visadapt.attach(single, "ppap", num_experts=1, rank=rank)
        copies = [copy.deepcopy(single) for _ in range(experts)]
        rows.append((name, shared, sum(tensor_bytes(c) for c in copies)))
    return rows


def time_per_step(pipe, steps: int, repeats: int, **guidance) -> float:
    times = []
    for _ in range(repeats):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        if guidance:
            with guide(pipe, **guidance):
                pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np")
        else:
            pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np")
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# PPAP benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n## memory, N={args.experts} experts, rank {args.rank} (fp32 parameter + buffer bytes)")
    print(f"{'classifier':<26}{'1 backbone + N experts':>24}{'N deep copies':>16}{'ratio':>8}")
    for name, shared, copies in memory_rows(args.experts, args.rank):
        print(f"{name:<26}{shared / 2**20:>21.1f} MB{copies / 2**20:>13.1f} MB{copies / shared:>8.2f}")

    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    classifier = timm.create_model("resnet50", pretrained=False).eval()
    visadapt.attach(classifier, "ppap", num_experts=args.experts, rank=args.rank)
    labels = torch.arange(4)
    plain = time_per_step(pipe, args.steps, args.repeats)
    guided = time_per_step(pipe, args.steps, args.repeats, guidance_model=classifier, target=labels)
    naive = time_per_step(pipe, args.steps, args.repeats, guidance_model=classifier, target=labels, naive=True)
    print(f"\n## DDIM step, UNet2DModel 32 px (32/64/64 wide), batch 4, ResNet-50 guidance, {args.steps} steps")
    print(f"{'sampling':<34}{'ms/step':>10}{'vs unguided':>13}")
    for label, value in (("unguided", plain), ("PPAP guided (routed experts)", guided),
                         ("naive guided (experts off)", naive)):
        print(f"{label:<34}{value * 1e3:>10.1f}{value / plain:>13.2f}")


if __name__ == "__main__":
    main()
