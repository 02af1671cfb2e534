"""Shared building blocks. Every plugin that needs a bottleneck adapter or a LoRA uses these classes.

A block computes only its *delta*; :mod:`visadapt.inject` decides where the delta is added.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}") from None


class BottleneckAdapter(nn.Module):
    """``s * up(dropout(act(down(norm(x)))))``: the bottleneck of Houlsby, Pfeiffer and AdaptFormer.

    Shapes: ``x`` is ``(..., in_features)``; the result is ``(..., out_features)``.
    ``up`` starts at zero so the adapted model starts equal to the base model; ``down`` keeps
    ``nn.Linear``'s default (Kaiming-uniform) initialisation as AdaptFormer does.
    """

    def __init__(
        self,
        in_features: int,
        bottleneck: int,
        out_features: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        scale: float = 1.0,
        layer_norm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.norm = nn.LayerNorm(in_features) if layer_norm else nn.Identity()
        self.down = nn.Linear(in_features, bottleneck, bias=bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, out_features, bias=bias)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(self.norm(x)))))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class LoRA(nn.Module):
    """Low-rank delta ``scaling * B(A(dropout(x)))`` for an ``nn.Linear`` or ``nn.Conv2d`` base layer.

    ``scaling = alpha / rank`` is the single source of the factor: :meth:`forward` and
    :meth:`delta_weight` (hence merging) both use it, so merged and unmerged outputs agree.

    For a Linear base: ``x`` is ``(..., in_features)``, the delta ``(..., out_features)``.
    For a Conv2d base: ``A`` is a convolution with the base's kernel, stride, padding and dilation
    onto ``rank`` channels, ``B`` a 1x1 convolution; ``x`` is ``(N, C_in, H, W)``.

    Merging writes ``W + delta`` into the base weight (computed in fp32, cast back) and keeps a copy of
    the rows it overwrote, so :meth:`unmerge_from` restores the base bit for bit.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        conv: nn.Conv2d | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if conv is not None:
            if conv.groups != 1:
                raise ValueError(f"LoRA on a grouped convolution (groups={conv.groups}) is not defined; target "
                                 f"ungrouped convolutions only")
            self.A = nn.Conv2d(in_features, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                               bias=False)
            self.B = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.A = nn.Linear(in_features, rank, bias=False)
            self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.merged = False
        self.register_buffer("_unmerged_rows", None, persistent=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scaling

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scaling * B @ A`` shaped like the base weight: ``(out, in)`` or ``(out, in, kh, kw)``."""
        a = self.A.weight.to(dtype) if dtype else self.A.weight
        b = self.B.weight.to(dtype) if dtype else self.B.weight
        if a.dim() == 4:
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        else:
            delta = b @ a
        return delta * self.scaling

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Add the delta to ``weight`` (the base layer's, or rows ``[start, stop)`` of it) in place."""
        if self.merged:
            return
        target = weight if rows is None else weight[rows[0]:rows[1]]
        self._unmerged_rows = target.detach().clone()
        target.copy_((target.float() + self.delta_weight(torch.float32)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Put back the exact base values :meth:`merge_into` overwrote."""
        if not self.merged:
            return
        target = weight if rows is None else weight[rows[0]:rows[1]]
        target.copy_(self._unmerged_rows)
        self._unmerged_rows = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def add_rows(full: torch.Tensor, part: torch.Tensor, rows: tuple[int, int] | None, dim: int = -1) -> torch.Tensor:
    """``full`` with ``part`` added on index range ``rows`` of dimension ``dim`` (all of it when None).

    Out of place, so autograd sees a plain add; the zero padding costs one tensor the size of ``full``.
    """
    if rows is None:
        return full + part
    dim = dim % full.dim()
    size = full.shape[dim]
    pad = [0, 0] * (full.dim() - 1 - dim) + [rows[0], size - rows[1]]
    return full + F.pad(part, pad)
