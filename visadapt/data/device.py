"""Batch transforms that run on the model's device: uint8 images in, normalised float32 images out.

A decoded-image cache (:mod:`visadapt.data.cache`) serves ``uint8`` tensors, four times fewer bytes to copy to
the GPU than float32, and leaves the per-pixel arithmetic to the device, where it costs next to nothing.
The arithmetic is exactly torchvision's ``ToTensor`` (``x.float().div(255)``) followed by ``Normalize``
(``sub_(mean).div_(std)`` with float32 mean/std), so on the CPU the result is bit-identical to the
decode-every-time path; a random horizontal flip (FGVC training) commutes with both and is applied per sample.

The engine applies ``getattr(dataset, "device_transform", None)`` to every batch right after it reaches the
device; datasets of the decode path have no such attribute and already yield float tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DeviceTransform"]


class DeviceTransform:
    """``uint8 (B, 3, H, W)`` on any device -> ``float32 (B, 3, H, W)`` on the same device.

    Steps: ``/ 255`` (as ``ToTensor``), a random horizontal flip of each sample with probability 1/2 when
    ``flip`` (drawn with the torch RNG of the images' device, one number per sample), then
    ``(x - mean) / std`` per channel when ``normalization`` is ``(mean, std)`` (as ``Normalize``).

    A plain class (not a closure) so that datasets carrying it can be pickled to DataLoader workers.
    """

    def __init__(self, normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                 flip: bool = False):
        if normalization is not None:
            mean, std = normalization
            if len(mean) != 3 or len(std) != 3:
                raise ValueError(f"normalization must be (mean, std) with 3 values each (RGB), "
                                 f"got {normalization!r}")
            if any(float(s) == 0 for s in std):
                raise ValueError(f"normalization std {tuple(std)} has a zero; every channel's std must be "
                                 "non-zero")
            normalization = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        self.normalization = normalization
        self.flip = bool(flip)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``uint8 (B, 3, H, W)``. Returns a new ``float32 (B, 3, H, W)`` tensor on its device."""
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceTransform expects uint8 images (a decoded-image cache's batches), got "
                            f"{images.dtype}; a dataset that yields float tensors needs no device transform")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceTransform expects a batch (B, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
        # ToTensor: img.to(dtype=float32).div(255); the same two ops give the same bits (in place: 1 buffer).
        x = images.to(torch.float32).div_(255)
        if self.flip:
            # torchvision's RandomHorizontalFlip draws torch.rand(1) < p per image; here one draw per sample.
            flipped = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.normalization is not None:
            mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1)
                         for v in self.normalization)
            x.sub_(mean).div_(std)  # torchvision's F_t.normalize: tensor.sub_(mean).div_(std)
        return x

    def __repr__(self) -> str:
        return f"DeviceTransform(normalization={self.normalization}, flip={self.flip})"
