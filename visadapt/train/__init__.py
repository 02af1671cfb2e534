"""visadapt's training jobs, installed with the package: ``visadapt-train COMMAND ...``, ``python -m
visadapt.train COMMAND ...``, or the thin ``train/<command>.py`` scripts of a checkout (``accelerate launch
train/vtab.py``).

Each command is one module of this package with a ``main(argv, prog)`` (``prog``: how it was invoked, for its
usage line); this file imports none of them until one is
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


def module_prog(spec) -> str | None:
    """How a job names itself in its usage when run as ``python -m visadapt.train.<module>`` (``spec``: the
    running module's ``__spec__``); ``None`` (the job's default, ``train/<module>.py``) when run as a file."""
    return f"python -m {spec.name}" if spec is not None else None


def run(command: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``command`` (a key of :data:`COMMANDS`) with ``argv`` (default: ``sys.argv[1:]``); its exit code.

    ``prog`` is how the user invoked it, shown in the job's usage and ``--help`` (``visadapt-train vtab``,
    ``python -m visadapt.train vtab``); the default is the checkout's thin script, ``train/<module>.py``.
    """
    from visadapt.train.flags import run_script  # torch-free: the job parses before it loads torch

    module_name = COMMANDS[command][0]
    module = importlib.import_module(f"{__name__}.{module_name}")
    prog = prog or f"train/{module_name}.py"
    return run_script(lambda: module.main(argv, prog=prog) or 0)
