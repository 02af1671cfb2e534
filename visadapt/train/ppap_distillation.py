"""What train/ppap.py distils PPAP's experts from and into: the pool labelled once by the frozen teacher, and the
student that runs one expert of the classifier on noised images. A module of its own so that importing the job
(its ``--help``) loads no torch: these classes subclass torch's ``Dataset`` and ``nn.Module``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from visadapt.diffusion import read_metadata
from visadapt.plugins.ppap import use_expert


class TeacherLabelledPool(Dataset):
    """The pool images ``(3, H, W)`` in [-1, 1], each with the frozen teacher's output on it as its "label".

    The teacher runs once per image here (experts off, eval mode), not once per training step.
    """

    def __init__(self, root: Path, teacher: nn.Module, preprocess, batch_size: int = 256) -> None:
        paths = [path for path, _ in read_metadata(root)]
        self.images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths])
        self.images = self.images.permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad(), use_expert(teacher, None):
            self.teacher = torch.cat([teacher(preprocess(self.images[i:i + batch_size])).float()
                                      for i in range(0, len(self.images), batch_size)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.teacher[index]


class PoolSubset(Dataset):
    """The items ``indices`` of ``data`` (the training and held-out parts of the pool)."""

    def __init__(self, data: Dataset, indices: list[int]) -> None:
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.data[self.indices[index]]


class NoisedStudent(nn.Module):
    """Expert ``expert`` of the classifier on ``x_t = add_noise(x0, noise, t)``, ``t ~ U[lo, hi)``.

    ``forward(x0)``: ``(B, 3, H, W)`` clean images in [-1, 1] -> the student's output on x_t (``(B, K)`` logits).
    Noise and t come from torch's global RNG, which the engine checkpoints, so a resumed run draws the same.
    """

    def __init__(self, model: nn.Module, scheduler, expert: int, time_range: tuple[int, int], preprocess) -> None:
        super().__init__()
        self.model, self.scheduler, self.expert, self.time_range = model, scheduler, expert, time_range
        self.preprocess = preprocess

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lo, hi = self.time_range
        t = torch.randint(lo, hi, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.scheduler.add_noise(x0, noise, t)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        with use_expert(self.model, self.expert):
            return self.model(self.preprocess(self.noised(x0)))
