"""visadapt's training jobs, installed with the package: ``visadapt-train COMMAND ...``, ``python -m visadapt.train
COMMAND ...``, or the thin ``train/<command>.py`` scripts of a checkout (``accelerate launch train/vtab.py``).

Each command is one module of this package with a ``main(argv)``; this file imports none of them until one is
run, so that listing the commands stays instant.
"""
from __future__ import annotations

import importlib

#: command -> (module of this package, one-line summary shown by ``visadapt-train --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "vtab": ("vtab", "adapters on VTAB-1k, FGVC or the embedded mini-VTAB (classification)"),
    "vpr": ("vpr", "SelaVPR visual place recognition (MSLS, Pitts30k or the embedded mini-places)"),
    "rank": ("rank", "ranking-aware CLIP adapter (text-driven image ordering)"),
    "dense": ("dense", "Polyhistor multi-task dense prediction (PASCAL-Context or procedural scenes)"),
    "resadapter": ("resadapter", "ResAdapter: resolution adapter for a diffusers UNet"),
    "selma": ("selma", "SELMA skill-specific LoRA experts for a diffusers UNet, then their merge"),
    "ppap": ("ppap", "PPAP plug-and-play guidance experts (noise-level classifiers)"),
    "selma-data": ("selma_data", "generate a SELMA skill's image-text pairs with a diffusers pipeline"),
    "selma-prompts": ("selma_prompts", "generate SELMA skill prompts with a language model"),
    "pretrain-backbone": ("pretrain_backbone", "pretrain the embedded procedural ViT / Swin backbones"),
    "pretrain-ppap-world": ("pretrain_ppap_world", "pretrain the embedded PPAP world (classifier and UNet)"),
}


def run(command: str, argv: list[str] | None = None) -> int:
    """Run ``command`` (a key of :data:`COMMANDS`) with ``argv`` (default: ``sys.argv[1:]``); its exit code."""
    from visadapt.train.flags import run_script  # torch-free: the job parses before it loads torch

    module = importlib.import_module(f"{__name__}.{COMMANDS[command][0]}")
    return run_script(lambda: module.main(argv) or 0)
