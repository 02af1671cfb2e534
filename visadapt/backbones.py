"""Backbones for the training scripts: any timm model, plus the small ViT the project pretrains itself.

``visadapt_procvit_tiny`` is registered with timm like any timm model, so ``timm.create_model(
"visadapt_procvit_tiny", pretrained=True, num_classes=10)`` loads the weights shipped in ``assets/`` (no
download): a 4-block, 96-wide ViT on 32x32 images with 4x4 patches (0.46 M parameters), trained by
``train/pretrain_backbone.py`` on the procedural upstream task of :mod:`visadapt.data.procedural`.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from visadapt.data.procedural import IMAGE_SIZE, UPSTREAM_CLASSES

EMBEDDED_MODEL = "visadapt_procvit_tiny"
EMBEDDED_WEIGHTS = "procvit_tiny.safetensors"
PROCVIT_TINY_ARGS = {"img_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3,
                     "mlp_ratio": 4.0}


def embedded_weights_path() -> Path:
    """The shipped upstream checkpoint of ``visadapt_procvit_tiny`` (package data ``visadapt.assets``)."""
    return Path(str(importlib.resources.files("visadapt.assets") / EMBEDDED_WEIGHTS))


# timm reads `default_cfgs` of the module that registers a model to learn its pretrained configs.
default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_MODEL}.upstream_v1": {
        "file": str(embedded_weights_path()),
        "num_classes": UPSTREAM_CLASSES,
        "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "mean": (0.5, 0.5, 0.5),  # the upstream run fed [0, 1] images normalised to [-1, 1]
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    },
})


@register_model
def visadapt_procvit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 inputs (patch 4, width 96, depth 4, 3 heads), pretrained on procedural shapes."""
    args = dict(PROCVIT_TINY_ARGS, **kwargs)
    return build_model_with_cfg(VisionTransformer, EMBEDDED_MODEL, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **args)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or value.endswith((".safetensors", ".pth", ".pt", ".bin", ".npz"))


def create_backbone(model: str, pretrained: str | None = "default", num_classes: int = 0, **kwargs) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head, weights chosen by ``pretrained``.

    ``pretrained`` is ``"default"`` (timm's default weights for ``model``, from the hub or timm's cache; the
    embedded model's are in ``assets/``), ``"none"`` (random init), a local checkpoint file (safetensors or
    a torch checkpoint timm can read), or a Hugging Face hub repo id holding timm weights.
    """
    if model not in timm.list_models(pretrained=False) and model.split(".")[0] not in timm.list_models():
        raise ValueError(f"--model {model!r} is not a timm model name; see `timm.list_models()`, "
                         f"or use {EMBEDDED_MODEL} (the embedded default)")
    kwargs = dict(num_classes=num_classes, **kwargs)
    choice = (pretrained or "default").strip()
    if choice == "none":
        return timm.create_model(model, pretrained=False, **kwargs)
    if choice == "default":
        return timm.create_model(model, pretrained=True, **kwargs)
    if os.path.isfile(choice):
        return timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(choice)},
                                 **kwargs)
    if _looks_like_path(choice):
        raise FileNotFoundError(f"--pretrained {choice!r} is not an existing file; give a checkpoint path, a hub "
                                f"repo id, 'default' or 'none'")
    return timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"hf_hub_id": choice}, **kwargs)
