"""``pipe.load_visadapt`` vs diffusers' ``pipe.load_lora_weights`` (PEFT backend) for the same LoRA (as a visadapt
file, and the *same* diffusers-format folder read by both loaders), and the
pipeline step time of the base pipeline, a visadapt LoRA unfused and fused (and diffusers' LoRA unfused, for
reference), measured in one run on one machine, printed as ratios.

The pipeline is a Stable Diffusion 1.5 layout built from configs (no download): the SD1.5 UNet with its widths
divided by 5 (64/128/256/256, two ResNet blocks per level, cross-attention on the first three levels), a small
CLIP text encoder and VAE, random weights. The LoRA is rank 8 on every attention projection (to_q, to_k, to_v,
to_out.0), the usual diffusers LoRA targets; the PEFT file holds the *same* tensors as the visadapt file (checked:
both pipelines give the same UNet output).

    python eval/bench/diffusers_load.py            # about a minute on 2 CPU cores
    python eval/bench/diffusers_load.py --load-repeats 15 --step-repeats 15 --record   # the README's table
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import visadapt
from visadapt import inject
from visadapt.backbones import TINY_SD_CONFIG, tiny_tokenizer_dir

UNET_CONFIG = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (64, 128, 256, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 32,
}
TEXT_CONFIG = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": 77, "projection_dim": 128}
LORA_RANK = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


def build_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tiny_tokenizer_dir()
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_SD_CONFIG["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                  bos_token_id=tokenizer.bos_token_id,
                                                  eos_token_id=tokenizer.eos_token_id, **TEXT_CONFIG)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET_CONFIG),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_loras(pipe, folder: Path) -> tuple[Path, Path, int]:
    """The same random LoRA as a visadapt file and as a diffusers (PEFT-layout) folder; returns both and the
    number of LoRA tensors."""
    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(pipe.unet)
    visadapt.attach(unet, "lora", rank=LORA_RANK, alpha=float(LORA_RANK), targets=LORA_TARGETS)
    generator = torch.Generator().manual_seed(1)
    peft_state = {}
    with torch.no_grad():
        for item in inject.attached(unet, "default"):
            for part in ("A", "B"):
                weight = getattr(item.module, part).weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
                # diffusers' PEFT layout: <module path>.lora_A.weight / lora_B.weight, alpha/rank as visadapt's
                peft_state[f"{item.host_path}.lora_{part}.weight"] = weight.detach().clone()
    visadapt_file = visadapt.save_adapter(unet, folder / "visadapt_lora.safetensors")
    peft_folder = folder / "peft_lora"
    StableDiffusionPipeline.save_lora_weights(peft_folder, unet_lora_layers=peft_state)
    return visadapt_file, peft_folder, len(peft_state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per timed generation")
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (the VAE downsamples by 2)")
    parser.add_argument("--record", action="store_true",
                        help="also write the README table (block diffusers-load) into "
                             "eval/results/diffusers_load.json; then readme_figures.py --write")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": expected, the LoRA is UNet-only
    base = build_pipeline()
    unet_params = sum(p.numel() for p in base.unet.parameters())
    print("UNet config:", json.dumps(UNET_CONFIG))
    print(f"UNet parameters: {unet_params / 1e6:.1f} M; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"image {args.size}x{args.size} (latent {args.size // 2}x{args.size // 2}), batch 2 (classifier-free "
          f"guidance)")

    with tempfile.TemporaryDirectory() as tmp:
        visadapt_file, peft_folder, n_tensors = write_loras(base, Path(tmp))
        size_kb = visadapt_file.stat().st_size / 1024
        print(f"LoRA: rank {LORA_RANK} on {', '.join(LORA_TARGETS)}: {n_tensors} tensors, {size_kb:.0f} KiB")

        # ---- load time: a fresh copy of the pipeline per trial (copying is not timed), the two loaders in turn
        loads = {"visadapt": lambda p: p.load_visadapt(visadapt_file),
                 "visadapt_diffusers_file": lambda p: p.load_visadapt(peft_folder, adapter_name="lora"),
                 "peft": lambda p: p.load_lora_weights(peft_folder, adapter_name="lora")}
        load_samples: dict[str, list[float]] = {name: [] for name in loads}
        for _ in range(args.load_repeats):
            for name, load in loads.items():
                pipe = copy.deepcopy(base)
                start = time.perf_counter()
                load(pipe)
                load_samples[name].append(time.perf_counter() - start)
        t_visadapt, t_same_file, t_peft = (min(load_samples[name])
                                           for name in ("visadapt", "visadapt_diffusers_file", "peft"))

        # ---- same weights: both loaded pipelines give the same UNet output
        vis_pipe, peft_pipe = copy.deepcopy(base), copy.deepcopy(base)
        vis_pipe.load_visadapt(visadapt_file)
        peft_pipe.load_lora_weights(peft_folder, adapter_name="lora")
        same_file_pipe = copy.deepcopy(base)
        same_file_pipe.load_visadapt(peft_folder)
        latent = torch.randn(1, 4, args.size // 2, args.size // 2, generator=torch.Generator().manual_seed(0))
        context = torch.randn(1, 77, TEXT_CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out_vis = vis_pipe.unet(latent, 10, context).sample
            out_peft = peft_pipe.unet(latent, 10, context).sample
            out_same_file = same_file_pipe.unet(latent, 10, context).sample
            out_base = base.unet(latent, 10, context).sample
        same = (out_vis - out_peft).abs().max().item()
        same_file = (out_same_file - out_peft).abs().max().item()
        effect = (out_vis - out_base).abs().max().item()

    # ---- step time: the pipelines take turns, so load from other processes hits all of them alike
    fused_pipe = copy.deepcopy(vis_pipe)
    fused_pipe.fuse_visadapt()
    runs = {"base": base, "visadapt LoRA, unfused": vis_pipe, "visadapt LoRA, fused": fused_pipe,
            "diffusers LoRA (PEFT), unfused": peft_pipe}

    def run(pipe) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
        return (time.perf_counter() - start) / args.steps

    for pipe in runs.values():
        run(pipe)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.step_repeats):
        for name, pipe in runs.items():
            samples[name].append(run(pipe))
    steps = {name: min(values) for name, values in samples.items()}  # best of N: least disturbed

    print()
    print(f"{'load (best of ' + str(args.load_repeats) + ')':<40}{'seconds':>10}{'ratio':>10}")
    print(f"{'pipe.load_visadapt (visadapt file)':<40}{t_visadapt:>10.4f}{1.0:>10.2f}")
    print(f"{'pipe.load_visadapt (diffusers folder)':<40}{t_same_file:>10.4f}{t_same_file / t_visadapt:>10.2f}")
    print(f"{'pipe.load_lora_weights (same folder)':<40}{t_peft:>10.4f}{t_peft / t_visadapt:>10.2f}")
    print(f"same diffusers folder: load_visadapt / load_lora_weights = {t_same_file / t_peft:.2f}x (target <= 1.0x)")
    print(f"same weights: max |UNet out visadapt - PEFT| = {same:.2e}, diffusers folder read by visadapt - PEFT = "
          f"{same_file:.2e} (LoRA effect on the output: {effect:.2e})")
    print()
    print(f"{'pipeline step (best of ' + str(args.step_repeats) + ')':<34}{'seconds':>10}{'vs base':>10}")
    for name, value in steps.items():
        print(f"{name:<34}{value:>10.4f}{value / steps['base']:>10.2f}")
    if args.record:
        record((t_visadapt, t_same_file, t_peft), steps, sys.argv[1:] if argv is None else argv)


STEP_ROWS = {"base": "step-base", "visadapt LoRA, unfused": "step-visadapt-unfused",
             "visadapt LoRA, fused": "step-visadapt-fused", "diffusers LoRA (PEFT), unfused": "step-peft-unfused"}


def record(loads: tuple[float, float, float], steps: dict[str, float], argv: list[str]) -> None:
    """The README's table (block diffusers-load): best load seconds (visadapt file, diffusers folder by
    visadapt, the same folder by diffusers) and best step seconds per pipeline, ratios to the first of each."""
    import readme_figures  # beside this script (eval/bench/), imported only to record

    t_visadapt, t_same_file, t_peft = loads
    rows = [{"id": "load-visadapt", "values": [t_visadapt, 1.0]},
            {"id": "load-visadapt-diffusers-folder", "values": [t_same_file, t_same_file / t_visadapt]},
            {"id": "load-lora-weights", "values": [t_peft, t_peft / t_visadapt]},
            {"id": "same-folder-ratio", "values": [None, t_same_file / t_peft]}]
    rows += [{"id": STEP_ROWS[name], "values": [value, value / steps["base"]]} for name, value in steps.items()]
    readme_figures.record_table("diffusers-load", rows, readme_figures.bench_command("diffusers_load.py", argv))

if __name__ == "__main__":
    main()
