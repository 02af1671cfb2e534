"""What an adapter costs a diffusers UNet call: base / visadapt unfused / visadapt fused / PEFT unfused / PEFT
fused (diffusers ``fuse_lora``), side by side in one run, as ratios to the base UNet and absolute milliseconds.

Scenarios (the same random weights in visadapt and PEFT, checked: both give the same UNet output):

* ``attn``: LoRA r=4 (alpha 4) on every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``);
* ``attn+conv``: the same plus LoRA r=4 on every ResNet convolution (``conv1``, ``conv2``; PEFT's conv LoRA is
  the same factorisation: a kxk convolution onto r channels, then a 1x1 one);
* ``resadapter``: visadapt's ResAdapter at its released defaults (rank-16 LoRA on the down/upsampler convs and
  trainable ResNet group norms); PEFT has no equivalent of the norm part, so its columns stay empty.

The UNet is built from a config (no download, random weights). On CPU: the small SD1.5-layout UNet of
``eval/bench/diffusers_load.py`` (widths 64/128/256/256). With ``--sd15`` (the default on CUDA): the SD1.5 UNet
itself (``UNet2DConditionModel()``'s default config: 320/640/1280/1280, cross-attention 768). The latent is
``size / 8`` on a side, batch 2 (classifier-free guidance), 77 context tokens.

    python eval/bench/diffusers_overhead.py                                   # 2 CPU cores: a few minutes
    python eval/bench/diffusers_overhead.py --device cuda --dtype bf16 --size 512

Each variant is warmed up, then the variants take turns call by call (so load from other processes hits them
alike); the median of ``--repeats`` calls is reported, and the best call (on a shared machine the least
disturbed one).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time

import torch
from diffusers_load import UNET_CONFIG as SMALL_UNET_CONFIG
from machine import describe
from torch import nn

import visadapt
from visadapt import inject
from visadapt.layers import LoRA

RANK = 4
ATTENTION = ("to_q", "to_k", "to_v", "to_out")
CONVS = ("conv1", "conv2")
SCENARIOS = {"attn": ATTENTION, "attn+conv": ATTENTION + CONVS, "resadapter": None}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_unet(sd15: bool, config: dict | None = None):
    """A random-init UNet: SD1.5's (``UNet2DConditionModel()``'s default config) when ``sd15``, else ``config``
    (default: the small SD1.5-layout one)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel() if sd15 else UNet2DConditionModel(**(config or SMALL_UNET_CONFIG))


def randomise_lora(unet: nn.Module, seed: int = 1) -> None:
    """Non-zero random A and B in every visadapt LoRA (B starts at zero, which would hide the adapter's cost
    nowhere but its effect everywhere), and a visible change in every ResAdapter norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for item in inject.attached(unet):
            for param in item.module.parameters():
                noise = torch.randn(param.shape, generator=generator) * 0.05
                if isinstance(item.module, LoRA):
                    param.copy_(noise.to(param.dtype))
                else:
                    param.add_(noise.to(param.dtype))


def visadapt_unet(base: nn.Module, scenario: str) -> nn.Module:
    unet = copy.deepcopy(base)
    if SCENARIOS[scenario] is None:
        visadapt.attach(unet, "resadapter", rank=16, alpha=8.0)
    else:
        visadapt.attach(unet, "lora", rank=RANK, alpha=float(RANK), targets=SCENARIOS[scenario])
    randomise_lora(unet)
    return unet


def peft_unet(base: nn.Module, visadapt_model: nn.Module):
    """The same LoRA as ``visadapt_model``'s through diffusers' PEFT integration (``unet.add_adapter``), with the
    same A and B tensors copied in; None where PEFT has no equivalent (ResAdapter's norms)."""
    from peft import LoraConfig

    items = inject.attached(visadapt_model)
    if not all(isinstance(item.module, LoRA) for item in items):
        return None
    unet = copy.deepcopy(base)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                target_modules=sorted({item.host_path for item in items})))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for item in items:
            layer = modules[item.host_path]
            layer.lora_A["default"].weight.copy_(item.module.A.weight)
            layer.lora_B["default"].weight.copy_(item.module.B.weight)
    return unet


def unet_inputs(context_dim: int, size: int, batch: int, device: torch.device, dtype: torch.dtype):
    """``(latent (batch, 4, size/8, size/8), timestep (batch,), context (batch, 77, context_dim))``, seeded."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(batch, 77, context_dim, generator=generator)
    timestep = torch.tensor([500] * batch)
    return latent.to(device, dtype), timestep.to(device), context.to(device, dtype)


def call_ms(unet: nn.Module, inputs, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        unet(*inputs, return_dict=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def output(unet: nn.Module, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return unet(*inputs, return_dict=False)[0].float()


def measure_scenario(base_cpu: nn.Module, base: nn.Module, scenario: str, inputs, device: torch.device,
                     dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    """One scenario's UNet call times: ``{"median": {variant: ms or None}, "best": {...}, "checks": [str],
    "max_abs_differences": {check: float}, "adapted_modules": int}``. ``base_cpu`` is the fp32 UNet the adapted copies are made from, ``base`` the same
    on ``device`` in ``dtype``; variants PEFT cannot build are None."""
    vis = visadapt_unet(base_cpu, scenario)
    peft = peft_unet(base_cpu, vis)
    variants: dict[str, nn.Module | None] = {"base": base, "visadapt unfused": vis.to(device, dtype)}
    fused = copy.deepcopy(variants["visadapt unfused"])
    visadapt.merge(fused)
    variants["visadapt fused"] = fused
    variants["PEFT unfused"] = peft.to(device, dtype) if peft is not None else None
    if peft is not None:
        peft_fused = copy.deepcopy(variants["PEFT unfused"])
        peft_fused.fuse_lora()
        variants["PEFT fused"] = peft_fused
    else:
        variants["PEFT fused"] = None
    n_adapted = len(inject.attached(vis))

    # ---- same weights: visadapt and PEFT agree, fused agrees with unfused
    outs = {name: output(model, inputs) for name, model in variants.items() if model is not None}
    effect = (outs["visadapt unfused"] - outs["base"]).abs().max().item()
    differences = {"adapter effect |unfused - base|": effect,
                   "|visadapt fused - unfused|": (outs["visadapt fused"] - outs["visadapt unfused"]).abs().max().item()}
    if "PEFT unfused" in outs:
        differences["|visadapt - PEFT| unfused"] = (outs["visadapt unfused"] - outs["PEFT unfused"]).abs().max().item()
        differences["|visadapt - PEFT| fused"] = (outs["visadapt fused"] - outs["PEFT fused"]).abs().max().item()
    checks = [f"{name} {value:.2e}" for name, value in differences.items()]
    del outs

    timed = {name: model for name, model in variants.items() if model is not None}
    for model in timed.values():
        for _ in range(warmup):
            call_ms(model, inputs, device)
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, model in timed.items():
            samples[name].append(call_ms(model, inputs, device))
    measured: dict = {"checks": checks, "max_abs_differences": differences, "adapted_modules": n_adapted}
    for stat, reduce in (("median", statistics.median), ("best", min)):
        values = {name: reduce(times) for name, times in samples.items()}
        measured[stat] = {name: values.get(name) for name in variants}
    del vis, peft, fused, variants, timed  # free the copies before the next scenario builds its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels; the latent is size / 8 "
                                                               "(default: 512 with --sd15, else 256)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sd15", action=argparse.BooleanOptionalAction, default=None,
                        help="the SD1.5-shaped UNet (default on CUDA) instead of the small one")
    parser.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default: 30 on "
                                                                  "CUDA, 10 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (5 / 2)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    sd15 = cuda if args.sd15 is None else args.sd15
    size = args.size or (512 if sd15 else 256)
    if size % 8:
        raise ValueError(f"--size {size} must be a multiple of 8 (the latent is size / 8 on a side)")
    repeats = args.repeats or (30 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    # built and adapted on CPU in fp32 (random init, weight copies), then moved: the same weights in every variant
    base_cpu = build_unet(sd15).eval()
    base = copy.deepcopy(base_cpu).to(device, dtype)
    inputs = unet_inputs(base.config.cross_attention_dim, size, args.batch, device, dtype)
    print(f"UNet: {'SD1.5 config' if sd15 else 'small SD1.5 layout ' + str(SMALL_UNET_CONFIG['block_out_channels'])}"
          f", {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters, {str(dtype)[6:]}; latent "
          f"{size // 8}x{size // 8} ({size} px), batch {args.batch}, 77 context tokens")
    print(f"{describe()}, {datetime.date.today()}")

    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for scenario in args.scenarios:
        measured = measure_scenario(base_cpu, base, scenario, inputs, device, dtype, repeats, warmup)
        for stat in ("median", "best"):
            results.setdefault(stat, {})[scenario] = measured[stat]
        print(f"\n[{scenario}] {measured['adapted_modules']} adapted modules; " + "; ".join(measured["checks"]))

    names = ("base", "visadapt unfused", "visadapt fused", "PEFT unfused", "PEFT fused")
    labels = {"median": f"median of {repeats}", "best": f"best of {repeats} (the least disturbed by other load)"}
    for stat, label in labels.items():
        print(f"\nUNet call, {label} after {warmup} warm-up: ms (ratio to base)")
        print("| scenario | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for scenario, row in results[stat].items():
            cells = ["-" if row.get(name) is None else f"{row[name]:.1f} ({row[name] / row['base']:.2f}x)"
                     for name in names]
            print(f"| {scenario} | " + " | ".join(cells) + " |")
    print(f"\n{describe()}, {datetime.date.today()}")


if __name__ == "__main__":
    main()
