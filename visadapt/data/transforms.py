"""Benchmark pre-processing: VTAB-1k (resize only) and FGVC (resize + crop, flip for training).

The PETL literature does not agree on input normalisation for VTAB-1k: PETL-ViT follows VPT/SSF and feeds
unnormalised ``[0, 1]`` inputs, NOAH and V-PETL Bench use ImageNet mean/std, and the backbone's own
statistics (timm ``pretrained_cfg``; ``(0.5, 0.5, 0.5)`` for the Google in21k ViT-B/16) are a third choice.
Reported accuracies depend on it, so it is an explicit choice here (:func:`resolve_normalization`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from visadapt.names import NORMALIZATION_CHOICES

if TYPE_CHECKING:
    from torchvision.transforms import Compose

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_normalization(choice: str, model=None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` per RGB channel for ``choice``, or ``None`` for no normalisation.

    ``model``: the backbone's own statistics from a timm model's ``pretrained_cfg`` (pass ``model``);
    ``imagenet``: ImageNet mean/std (NOAH, V-PETL Bench, FGVC in VPT); ``none``: inputs stay in ``[0, 1]``
    (PETL-ViT, VPT/SSF on VTAB-1k).
    """
    key = str(choice).lower()
    if key == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if key == "none":
        return None
    if key == "model":
        if model is None:
            raise ValueError("normalization 'model' needs the model whose pretrained_cfg holds mean/std; "
                             "pass model=..., or choose 'imagenet' or 'none'")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is None or std is None:
            raise ValueError(f"{type(model).__name__} has no mean/std in its pretrained_cfg (not a timm model, "
                             "or one without a pretrained config); choose normalization 'imagenet' or 'none'")
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    raise ValueError(f"unknown normalization {choice!r}; choose one of {', '.join(NORMALIZATION_CHOICES)}")


def _torchvision_transforms():
    # Imported on first use: importing torchvision costs seconds (it pulls in torch._dynamo), and the task
    # tables and the mini-VTAB generator in this package should not pay that.
    from torchvision import transforms

    return transforms


def _to_tensor(normalization) -> list:
    """ToTensor, then Normalize when ``normalization`` is ``(mean, std)``."""
    T = _torchvision_transforms()
    steps: list = [T.ToTensor()]
    if normalization is not None:
        mean, std = normalization
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"normalization must be (mean, std) with 3 values each (RGB), got {normalization!r}")
        steps.append(T.Normalize(mean, std))
    return steps


def vtab_transform(input_size: int, normalization=None) -> Compose:
    """VTAB-1k pre-processing, the same for training and evaluation (the protocol has no augmentation).

    PIL image -> ``(3, input_size, input_size)`` float tensor: bicubic resize to a square (aspect ratio is not
    kept, as in NOAH/PETL-ViT), ``[0, 1]`` scaling, then ``(x - mean) / std`` when ``normalization`` is given.
    """
    T = _torchvision_transforms()
    return T.Compose([T.Resize((input_size, input_size), interpolation=T.InterpolationMode.BICUBIC),
                      *_to_tensor(normalization)])


def fgvc_transforms(input_size: int, normalization=None) -> tuple[Compose, Compose]:
    """FGVC pre-processing as in VPT: ``(train, eval)`` transforms, each to ``(3, input_size, input_size)``.

    Both resize the shorter side to ``input_size * 256/224`` (256 for 224); training then takes a random crop
    and a random horizontal flip, evaluation the centre crop.
    """
    T = _torchvision_transforms()
    resize = T.Resize(round(input_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC)
    train = T.Compose([resize, T.RandomCrop(input_size), T.RandomHorizontalFlip(), *_to_tensor(normalization)])
    evaluate = T.Compose([resize, T.CenterCrop(input_size), *_to_tensor(normalization)])
    return train, evaluate


def pil_to_tensor(img) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float tensor in [0, 1] (without importing torchvision, which is slow): the
    loaders' default when no transform is given."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
