"""Shared building blocks. Every plugin that needs a bottleneck adapter or a LoRA uses these classes.

A block computes only its *delta*; :mod:`visadapt.inject` decides where the delta is added.
"""
from __future__ import annotations

import functools
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
    ``nn.Linear``'s default (Kaiming-uniform) initialisation as AdaptFormer does. With ``bits < 32`` both
    projections are :class:`QuantizedLinear` and ``up`` starts near zero instead (truncated normal, std 1e-3).
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
        bits: int = 32,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.norm = nn.LayerNorm(in_features) if layer_norm else nn.Identity()
        if bits == 32:
            self.down = nn.Linear(in_features, bottleneck, bias=bias)
            self.up = nn.Linear(bottleneck, out_features, bias=bias)
            nn.init.zeros_(self.up.weight)
        else:
            self.down = QuantizedLinear(in_features, bottleneck, bits, bias=bias)
            self.up = QuantizedLinear(bottleneck, out_features, bits, bias=bias)
            # An all-zero matrix has std 0 and quantises degenerately: start tiny instead (official init).
            nn.init.trunc_normal_(self.up.weight, std=1e-3, a=-2e-3, b=2e-3)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(self.norm(x)))))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight ``layer``'s forward multiplies by right now.

    A plain layer's ``weight``; a :class:`QuantizedLinear`'s fake-quantised weight; a layer that samples its
    weight per step (MoSA's sparse modules) the sampled one. Such layers provide ``forward_weight()``.
    """
    forward_weight = getattr(layer, "forward_weight", None)
    return forward_weight() if forward_weight is not None else layer.weight


class LoRA(nn.Module):
    """Low-rank delta ``scaling * B(A(dropout(x)))`` for an ``nn.Linear`` or ``nn.Conv2d`` base layer.

    ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora=True``: rank-stabilised LoRA, Kalajdzievski
    2023, PEFT's ``use_rslora``) is the single source of the factor: :meth:`forward`, :meth:`delta_weight` (hence
    merging) and the batched :func:`add_lora_deltas` all use it, so merged and unmerged outputs agree.
    With ``bits < 32`` (linear bases only) ``A`` and ``B`` are :class:`QuantizedLinear`, trained through the
    k-bit quantiser and stored packed; ``B`` then starts near zero (truncated normal, std 1e-3) because an
    all-zero matrix has no spread to standardise.

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
        bits: int = 32,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if conv is not None:
            if conv.groups != 1:
                raise ValueError(f"LoRA on a grouped convolution (groups={conv.groups}) is not defined; target "
                                 f"ungrouped convolutions only")
            if bits != 32:
                raise ValueError(f"bits={bits}: k-bit LoRA is defined for linear layers; this site is a "
                                 f"convolution, use bits=32 there")
            self.A = nn.Conv2d(in_features, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                               bias=False)
            self.B = nn.Conv2d(rank, out_features, 1, bias=False)
        elif bits == 32:
            self.A = nn.Linear(in_features, rank, bias=False)
            self.B = nn.Linear(rank, out_features, bias=False)
        else:
            self.A = QuantizedLinear(in_features, rank, bits)
            self.B = QuantizedLinear(rank, out_features, bits)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        if bits == 32:
            nn.init.zeros_(self.B.weight)
        else:
            nn.init.trunc_normal_(self.B.weight, std=1e-3, a=-2e-3, b=2e-3)
        self.merged = False
        self.register_buffer("_unmerged_rows", None, persistent=False)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scaling

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scaling * B @ A`` shaped like the base weight: ``(out, in)`` or ``(out, in, kh, kw)``.

        Built from the weights the forward uses (k-bit or sampled, see :func:`effective_weight`)."""
        a, b = effective_weight(self.A), effective_weight(self.B)
        if dtype:
            a, b = a.to(dtype), b.to(dtype)
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
        # the runtime weight of visadapt.inject.set_adapter_weight, so merged output equals unmerged output
        delta = self.delta_weight(torch.float32) * self.__dict__.get("adapter_weight", 1.0)
        target.copy_((target.float() + delta).to(weight.dtype))
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
        return f"rank={self.rank}, alpha={self.alpha}{', rslora=True' if self.rslora else ''}, merged={self.merged}"


def batchable_lora(module: nn.Module) -> bool:
    """Whether :func:`add_lora_deltas` can run ``module``: a :class:`LoRA` with plain ``nn.Linear`` /
    ``nn.Conv2d`` factors (not k-bit, not sampled per step) and no dropout (a dropout draws one mask per LoRA,
    which a shared low-rank product could not)."""
    return (type(module) is LoRA and isinstance(module.dropout, nn.Identity)
            and type(module.A) in (nn.Linear, nn.Conv2d) and type(module.B) is type(module.A))


def add_lora_deltas(output: torch.Tensor, x: torch.Tensor, loras: tuple[LoRA, ...] | list[LoRA]) -> torch.Tensor:
    """``output + sum_i w_i * scaling_i * B_i(A_i(x))``, each delta on its LoRA's ``site_rows`` of the output
    channels (all of them when None), ``w_i`` the runtime weight of :func:`visadapt.inject.set_adapter_weight`.

    Equal to adding the LoRAs' forwards one by one, in fewer kernels and no module calls: one LoRA over all of a
    linear layer's outputs costs one ``x @ A^T`` and one ``addmm`` that multiplies by ``B``, scales and adds to
    ``output`` at once; several LoRAs on one layer (q and v rows of a fused qkv, two adapters) share ONE matmul
    with their ``A`` matrices stacked and one ``addmm`` with their scaled ``B`` matrices side by side.
    Every LoRA must satisfy :func:`batchable_lora` and sit on the same host layer.

    Linear host: ``x (..., in)``, ``output (..., out)``. Conv2d host: ``x (N, C_in, H, W)``, ``output (N, out, H',
    W')``; ``A`` is the host-shaped convolution onto ``r`` channels, ``B`` a 1x1 convolution.
    """
    first = loras[0]
    conv = first.A.weight.dim() == 4
    if len(loras) == 1 and getattr(first, "site_rows", None) is None:
        factor = first.scaling * first.__dict__.get("adapter_weight", 1.0)
        if conv:
            ax = first.A._conv_forward(x, first.A.weight, None)
            return torch.add(output, F.conv2d(ax, first.B.weight), alpha=factor)
        ax = F.linear(x, first.A.weight)
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), ax.reshape(-1, ax.shape[-1]), first.B.weight.t(),
                           alpha=factor)
        return flat.view(output.shape)
    a = torch.cat([lora.A.weight for lora in loras]) if len(loras) > 1 else first.A.weight
    ax = first.A._conv_forward(x, a, None) if conv else F.linear(x, a)  # (..., sum of ranks)
    width = output.shape[1 if conv else -1]
    columns = []
    for lora in loras:
        b = lora.B.weight.flatten(1)  # (out_i, r_i)
        factor = lora.scaling * lora.__dict__.get("adapter_weight", 1.0)
        if factor != 1.0:
            b = b * factor
        rows = getattr(lora, "site_rows", None)
        if rows is not None:
            b = F.pad(b, (0, 0, rows[0], width - rows[1]))
        columns.append(b)
    b = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]  # (out, sum of ranks)
    if conv:
        return output + F.conv2d(ax, b[:, :, None, None])
    flat = torch.addmm(output.reshape(-1, width), ax.reshape(-1, ax.shape[-1]), b.t())
    return flat.view(output.shape)


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


# ------------------------------------------------------------------------------------------ quantisation
# The k-bit quantiser of Jie et al. (ICCV 2023, "precision redundancy"): per-matrix standardisation, a
# fixed codebook designed for N(0, 1), de-standardisation, and a straight-through gradient.

QUANT_BITS = (1, 2, 4, 8, 32)


#: how the codebook iteration starts: ``"quantile"`` (visadapt: normal quantiles at the cell centres of equal
#: probability; converged for every width) or ``"zero"`` (the official code: every codeword at 0; at 8 bits 500
#: iterations leave it unconverged, see :func:`normal_codebook`)
CODEBOOK_STARTS = ("quantile", "zero")


@functools.cache
def normal_codebook(bits: int, iterations: int = 500, start: str = "quantile") -> tuple[torch.Tensor, torch.Tensor]:
    """Codewords ``(2**bits,)`` and thresholds ``(2**bits - 1,)``, ascending, for standard-normal data.

    Lloyd-style alternation as in the official code: thresholds are midpoints of adjacent codewords, and
    each codeword is the normal quantile at the *probability midpoint* of its cell (the conditional
    median, not the textbook conditional mean). 1 bit gives ``{-0.6745, +0.6745}`` = ``ppf(0.25), ppf(0.75)``.

    ``start`` is where the 500 iterations begin. The official ``QLinear.quantize`` starts from all-zero codewords:
    the levels then spread out from the two ends one cell per iteration, so at 8 bits the codebook has not
    converged after 500 iterations (196 of its 256 levels still lie within +-0.1; mean squared error on N(0, 1)
    data 1.87e-3). ``"quantile"`` (the default, a deliberate departure) starts from the quantiles
    ``ppf((k + 0.5) / 2**bits)`` and converges (20 levels within +-0.1), error 1.66e-4, 11.2x lower
    (``python eval/bench/bitadapter_codebook.py``).
    At 1, 2 and 4 bits both starts give the same codebook (within 1e-7). ``"zero"`` returns the official
    thresholds as well: the midpoints of the codewords *before* the last update (equal to the final midpoints
    once converged).
    """
    if bits not in QUANT_BITS or bits == 32:
        raise ValueError(f"bits={bits!r}: a codebook exists for 1, 2, 4 or 8 bits (32 means no quantisation)")
    if start not in CODEBOOK_STARTS:
        raise ValueError(f"codebook start {start!r} is not one of {list(CODEBOOK_STARTS)}")
    n = 2 ** bits
    if start == "zero":
        codes = torch.zeros(n, dtype=torch.float64)
    else:
        codes = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    thresholds = (codes[1:] + codes[:-1]) / 2
    for _ in range(iterations):
        thresholds = (codes[1:] + codes[:-1]) / 2
        cdf = torch.special.ndtr(thresholds)
        edges = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])
        codes = torch.special.ndtri((edges[1:] + edges[:-1]) / 2)
    if start == "quantile":
        thresholds = (codes[1:] + codes[:-1]) / 2
    return codes.float(), thresholds.float()


def fake_quantize(weight: torch.Tensor, bits: int, eps: float = 1e-5, start: str = "quantile"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_hat, codes, mean, std)`` for one weight matrix (any shape), quantised per tensor.

    ``z = (w - mean) / (std + eps)`` (unbiased std), ``codes`` index the nearest codeword, and
    ``w_hat = codeword * std + mean`` carries a straight-through gradient to ``w`` (and through ``mean``
    and ``std``, which are statistics of ``w``, never learnt). ``codes`` is uint8 of ``w``'s shape.
    ``start`` chooses the codebook (:func:`normal_codebook`).
    """
    codebook, thresholds = normal_codebook(bits, start=start)
    codebook, thresholds = codebook.to(weight.device), thresholds.to(weight.device)
    mean, std = weight.mean(), weight.std()
    z = (weight - mean) / (std + eps)
    codes = torch.bucketize(z.detach().float(), thresholds)
    z_ste = codebook[codes].to(weight.dtype) + (z - z.detach())
    return z_ste * std + mean, codes.to(torch.uint8), mean.detach(), std.detach()


def dequantize(codes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, bits: int, start: str = "quantile"
               ) -> torch.Tensor:
    """The weights :func:`fake_quantize` produced in the forward pass, from stored codes and statistics."""
    codebook = normal_codebook(bits, start=start)[0].to(codes.device)
    return codebook[codes.long()] * std + mean


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``codes`` (values < 2**bits) into bytes, ``8 // bits`` per byte, first code in the low bits.

    Returns a uint8 tensor of ``ceil(numel * bits / 8)`` bytes: the official release's bit order.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits={bits!r}: packing needs a width that divides 8 (1, 2, 4 or 8)")
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as uint8 ``(numel,)``."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2 ** bits - 1)
    if codes.numel() < numel:
        raise ValueError(f"{packed.numel()} packed bytes hold {codes.numel()} {bits}-bit codes, not {numel}")
    return codes.reshape(-1)[:numel].to(torch.uint8)


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the k-bit fake-quantised weight; the fp32 weight is the latent.

    After :meth:`load_codes` the layer holds the dequantised weight and stops re-quantising (re-quantising
    a dequantised weight would change it: its mean and std are not the stored ones), as the official
    code does; :meth:`export_codes` then returns the loaded bytes unchanged. With ``quantize_in_training=False``
    the layer is post-training quantised: full precision in training, k bits in eval mode and in storage.
    ``x`` is ``(..., in_features)``, the result ``(..., out_features)``. ``codebook_start`` chooses the codebook
    (:func:`normal_codebook`): ``"quantile"`` (converged) or ``"zero"`` (the official start).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False,
                 quantize_in_training: bool = True, codebook_start: str = "quantile") -> None:
        super().__init__(in_features, out_features, bias=bias)
        normal_codebook(bits, start=codebook_start)  # validates both
        self.bits = bits
        self.codebook_start = codebook_start
        self.fake_quant = True
        # False: post-training quantisation, full precision in training and k bits in eval mode and storage.
        self.quantize_in_training = quantize_in_training

    @property
    def packed_bytes(self) -> int:
        """Bytes the packed codes of this weight take: ``ceil(numel * bits / 8)``."""
        return -(-self.weight.numel() * self.bits // 8)

    def forward_weight(self) -> torch.Tensor:
        """The weight the forward uses: fake-quantised latent, or the loaded dequantised weight."""
        if self.fake_quant and (self.quantize_in_training or not self.training):
            return fake_quantize(self.weight, self.bits, start=self.codebook_start)[0]
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.forward_weight(), self.bias)

    @torch.no_grad()
    def export_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed uint8 codes, float32 [mean, std])``: of the latent weight, or exactly what was loaded."""
        if not self.fake_quant:
            return self._loaded_codes.clone(), self._loaded_stats.clone()
        _, codes, mean, std = fake_quantize(self.weight.float(), self.bits, start=self.codebook_start)
        return pack_codes(codes, self.bits), torch.stack([mean, std]).float()

    @torch.no_grad()
    def load_codes(self, packed: torch.Tensor, stats: torch.Tensor) -> None:
        """Hold the dequantised weight of ``packed`` codes and ``stats`` = float32 ``[mean, std]``."""
        codes = unpack_codes(packed, self.bits, self.weight.numel()).reshape(self.weight.shape)
        self.weight.copy_(dequantize(codes, stats[0], stats[1], self.bits, self.codebook_start).to(self.weight.dtype))
        # Kept so that saving a loaded adapter writes the same bytes back.
        self._loaded_codes, self._loaded_stats = packed.detach().cpu().clone(), stats.detach().float().cpu().clone()
        self.fake_quant = False

    def extra_repr(self) -> str:
        start = "" if self.codebook_start == "quantile" else f", codebook_start={self.codebook_start!r}"
        return f"{super().extra_repr()}, bits={self.bits}{start}"
