"""MoSA, Mixture of Sparse Adapters: Zhang, Zou, An, Liu and Zhang, "Split & Merge: Unlocking the Potential
of Visual Adapters via Sparse Training" (arXiv 2312.02923; first titled "MoSA: Mixture of Sparse Adapters for
Visual Efficient Tuning"). Official code: Theia-4869/MoSA.

An adapter (the shared :class:`~visadapt.layers.BottleneckAdapter`, or :class:`~visadapt.layers.LoRA` for the
official "MoSL") is trained as N sparse modules and used as one plain adapter:

* **Split.** Each split matrix ``W (out, in)`` gets a random partition of its *elements* into N disjoint,
  equal-size masks ``M_1..M_N`` (sizes differ by at most one element), drawn from ``seed`` and the matrix's
  position in the model, and kept as a uint8 ``owner`` map that travels with the adapter. Module ``i`` is
  ``W`` with only ``M_i`` trainable. ``split=("up",)`` is the official VTAB-1k / FGVC recipe (the
  down-projection stays one dense, shared, fully trained layer); ``("down", "up")`` is the multi-task recipe.
  Biases are not split: as in the official code each module has its own full bias copy.
* **Stochastic activation.** In training every forward pass draws, per adapter site and per split role
  (down / up), one module index for the whole batch, uniform over the N modules. ``draw="per_site"`` (default)
  is the official draw: each site draws its own indices, independently of the others, so MoSL's q and v
  adapters (``vit_mosl.py``: a ``randint`` pair per target) and Houlsby's two adapters (``vit_mosa.py``: ``A, B``
  for the attention-side adapter, ``C, D`` for the MLP-side one) choose their modules independently.
  ``draw="per_block"`` is a visadapt variant (its only behaviour before issue 24, and what files saved then
  keep): the sites of one block share each role's index, so q and v always use the same module number.
  The official code takes its indices from Python's global ``random`` in forward order (per block: A, B, then
  Houlsby's C, D; MoSL: A, B per target q, k, v, o; drawn even for a shared matrix), so its numbers depend on
  everything else that consumes that generator and cannot be reproduced; visadapt keeps the distribution
  (independent, uniform) but not the numbers: its index is a hash of ``(seed, block, site, role, step,
  call)``, touching no global generator. Every process of a distributed run draws the same index at the same
  step with no communication, and a resumed run draws what the uninterrupted run would have (the engine
  hands the step count over through :meth:`MoSAPlugin.on_step`).
* **Sparse update.** Module ``i`` changes only the elements of ``M_i``.
* **Consistency.** With ``consistency_weight > 0`` (official: 1.0) each batch runs forward twice, the two
  passes drawing their own modules, and the loss adds ``weight * symKL(p1, p2)``, the R-Drop form
  ``0.5 * (KL(p2 || p1) + KL(p1 || p2))`` with each term's target detached. ``0`` gives a single pass.
* **Merge.** The merged adapter is the mean of the N modules, ``W = (1/N) sum_i W^(i)``, which is the
  expectation of the output over the random choice wherever the adapter is linear in the split matrix (the
  up-projection; both LoRA factors, drawn independently); with a split down-projection it is the expectation
  of the weights. :func:`visadapt.merge` turns the modules into that plain adapter in place (and folds a
  LoRA base into the backbone weights as the lora plugin does); :func:`visadapt.save_adapter` always writes
  the merged plain adapter, so a file costs at inference what a plain adapter costs. ``keep_modules=True``
  also stores the module state, so training can go on from the file.

**One dense tensor instead of N copies** (the official code keeps N full copies, N float masks and a merged
copy). The modules have disjoint supports, so their trainable elements fit in ONE tensor of the matrix's
shape; module ``i`` is ``where(owner == i, weight, initial)``, ``initial`` being a frozen copy of the
initial value, kept only where that is non-zero (a split down-projection; the zero-initialised
up-projection needs none). Gradients reach only the drawn module's elements, and AdamW's state is
element-wise, so this is the same training trajectory as N copies whose unused copies get zero gradients
(PyTorch's behaviour when the official code was written): ``tests/test_mosa.py`` checks it step for step
against such an N-copy reference. One deliberate difference: in the official code AdamW's decoupled weight
decay also shrinks each copy's elements *outside* its mask when the initial value is non-zero (a split
down-projection), so modules drift off their masks; here a module changes only its own elements, as the
method describes.

**Styles** (``base="adapter"``), each as ``vit_mosa.py`` places it, with ``h = x + Attn(LN1(x))`` the stream after
the attention's residual add and ``m = MLP(LN2(h))`` the MLP branch output:

* ``adaptformer`` (default): ``out = h + m + s * Up(Dropout(GELU(Down(LN_a(h)))))``, ``s = 0.1``, dropout 0.1.
* ``pfeiffer``: ``out = h + m + Up(ReLU(Down(LN_a(m))))``: serial on the MLP branch output, own LayerNorm,
  no scale (1.0), no dropout.
* ``houlsby``: ``h' = h + Up(SiLU(Down(h)))``, ``o = h' + MLP(LN2(h'))``, ``out = o + Up'(SiLU(Down'(o)))``:
  two adapters on the residual stream itself, after each residual add (sites ``attn_residual`` and
  ``block_out``), with no LayerNorm, no scale and no dropout. ``houlsby_placement="branch"`` is a visadapt
  variant (its only behaviour before issue 24, and what files saved then keep): the adapters sit inside the
  branches before the residual adds, ``x + a + f(a)`` (sites ``attn_out`` and ``mlp_out``, as the plain
  ``adapter`` plugin's Houlsby style and Houlsby et al. 2019).

``LN_a`` is the adapter's own LayerNorm with the official eps 1e-6 (``layer_norm_eps``; files saved before issue
24 keep PyTorch's 1e-5). ``layer_norm``, ``dropout``, ``scale`` and ``activation`` left at None take these per-style
values; biases are on and ``Down`` keeps ``nn.Linear``'s Kaiming-uniform start, ``Up`` starts at zero, as
official. A timm ViT with LayerScale or drop path applies them where timm does (the official ViT has neither).
On timm Swin the official code (``swin_mosa.py``) has one adapter, inside the MLP (``MoSAMlp``): fed the MLP's
input (already ``LN2``-normalised, no ``adapter_norm``) and added, times ``s``, to the MLP output, before drop path:
``out = h + DropPath(MLP(LN2(h)) + s * Up(Dropout(GELU(Down(LN2(h))))))``. ``style="adaptformer"`` on Swin does
that by default (site ``mlp_branch``, no LayerNorm); ``swin_placement="as_vit"`` is a visadapt variant (its only
behaviour before issue 24, and what files saved then keep) with the ViT placement and LayerNorm above. The
official Swin code has no Houlsby or Pfeiffer; visadapt places them as on ViT.

**Files written before issue 24** carry none of ``draw``, ``houlsby_placement``, ``swin_placement`` and
``layer_norm_eps`` in their header; :meth:`MoSAConfig.saved_file_values` reads them with the values of that time
(``per_block``, ``branch``, ``as_vit``, 1e-5, and ``dropout=None`` as 0.1 for every style), so they load, run and
continue training exactly as before.

**k bits.** ``bits < 32`` stores the merged adapter at k bits with the shared quantiser of the 1-bit adapters:
post-training quantisation of the merged weights. The modules train at full precision; eval mode (so the
accuracy measured during training) already computes with the k-bit merged weights, so what is evaluated is
what the file holds.

**Missing: the paper's "hierarchical sparse strategy"** for low-data settings. Only the paper's abstract is
readable here, and it names the strategy without defining it; the official code has no switch for it (its only
traces are a gradient-mask hook in ``trainer.py`` that nothing sets, and ``pruner.divide``'s unused ``row`` /
``column`` modes). Rather than invent one, visadapt leaves it out until the paper's method text is available.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visadapt import inject
from visadapt.inject import AdapterLoadError, insert
from visadapt.layers import ACTIVATIONS, QUANT_BITS, BottleneckAdapter, LoRA, QuantizedLinear, fake_quantize
from visadapt.plugin import (
    AdapterConfig,
    AdapterPlugin,
    check_choice,
    check_dropout,
    check_positive,
    check_positive_int,
    config_field,
)
from visadapt.plugins.adapter import DEFAULT_SCALE, STYLE_SITES
from visadapt.registry import register_plugin
from visadapt.sites import find_sites, model_family

#: the official activation per adapter style (vit_mosa.py): AdaptFormer GELU, Pfeiffer ReLU, Houlsby SiLU
STYLE_ACTIVATION = {"adaptformer": "gelu", "pfeiffer": "relu", "houlsby": "silu"}
#: the official adapter LayerNorm per style (vit_mosa.py: ``adapter_norm`` for AdaptFormer and Pfeiffer only)
STYLE_LAYER_NORM = {"adaptformer": True, "pfeiffer": True, "houlsby": False}
#: the official adapter dropout per style (vit_mosa.py applies ADAPTER.DROPOUT 0.1 in AdaptFormer only)
STYLE_DROPOUT = {"adaptformer": 0.1, "pfeiffer": 0.0, "houlsby": 0.0}
#: where each style's adapters sit (site kinds of visadapt.sites); Houlsby per ``houlsby_placement``
HOULSBY_SITES = {"residual_stream": ("attn_residual", "block_out"), "branch": ("attn_out", "mlp_out")}
DRAWS = ("per_site", "per_block")
#: the values a header written before these fields existed stands for (visadapt before issue 24)
FIELDS_BEFORE_ISSUE_24 = {"draw": "per_block", "houlsby_placement": "branch", "swin_placement": "as_vit",
                          "layer_norm_eps": 1e-5}
SWIN_PLACEMENTS = ("inside_mlp", "as_vit")
#: which child of the shared block each split role names
ROLE_CHILD = {"adapter": {"down": "down", "up": "up"}, "lora": {"down": "A", "up": "B"}}
#: prefix of the module (training) state in a file saved with keep_modules=True
TRAINING_STATE_PREFIX = "mosa_training_state."

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stable_hash(*parts: int) -> int:
    """A 64-bit hash of integers, identical in every process and every Python run (unlike ``hash``)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h


def _signed64(value: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_SPLITMIX_CONSTANTS = tuple(_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    # int64 ``>>`` is arithmetic (copies the sign bit); masking the top bits makes it the unsigned shift
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`_splitmix64` on an int64 tensor holding 64-bit values in two's complement (any shape).

    int64 adds and multiplies wrap modulo 2**64 exactly as the masked Python integers do, so the bits agree;
    this is what a compiled forward runs, where a Python integer would be baked into the graph.
    """
    add, mul1, mul2 = _SPLITMIX_CONSTANTS
    x = x + add
    x = (x ^ _shift_right_logical(x, 30)) * mul1
    x = (x ^ _shift_right_logical(x, 27)) * mul2
    return x ^ _shift_right_logical(x, 31)


def unsigned_mod(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(x read as unsigned 64-bit) % n`` for an int64 tensor: ``(2 * (x >>> 1) + (x & 1)) % n``."""
    return ((_shift_right_logical(x, 1) % n) * 2 + (x & 1)) % n


def partition_elements(shape: torch.Size | tuple[int, ...], num_modules: int, seed: int) -> torch.Tensor:
    """uint8 ``owner`` map of ``shape``: element ``e`` belongs to module ``owner[e]``; modules differ in size by
    at most one element, and the assignment is a uniformly random permutation drawn from ``seed``."""
    numel = int(torch.Size(shape).numel())
    order = torch.randperm(numel, generator=torch.Generator().manual_seed(seed % (1 << 63)))
    owner = torch.empty(numel, dtype=torch.uint8)
    owner[order] = (torch.arange(numel) * num_modules // numel).to(torch.uint8)
    return owner.reshape(shape)


class SparseModulesLinear(nn.Module):
    """N sparse modules of one linear layer, kept in one dense tensor (no bias sharing: ``(N, out)`` biases).

    Shapes: ``x`` is ``(..., in_features)``, the result ``(..., out_features)``. Module ``i``'s weight is
    ``where(owner == i, weight_modules, initial)`` (``initial`` = 0 when not stored). In training each call
    draws a module (see :meth:`draw`); in eval mode the layer computes with the merged weight, the mean of
    the N modules: ``(weight_modules + (N - 1) * initial) / N``, which is what :attr:`weight` returns.
    """

    def __init__(self, base: nn.Linear, num_modules: int, mask_seed: int, draw_seed: int, draw_key: int,
                 bits: int = 32, starts_at_zero: bool | None = None) -> None:
        """``starts_at_zero``: whether ``base`` is zero-initialised (MoSA's up-projection), for a ``base`` on the
        meta device, whose values cannot be read: a load's dry run builds the adapter there to learn the tensor
        shapes a file must hold (:func:`visadapt.io.expected_adapter_state`). Real tensors decide by their values."""
        super().__init__()
        self.bits = bits  # eval mode and storage use the merged weight at this width (post-training)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_modules = num_modules
        initial = base.weight.detach().clone()
        self.weight_modules = nn.Parameter(initial.clone())
        # Only a non-zero start needs a frozen copy: module i keeps it outside its own mask.
        if initial.is_meta:  # shapes only, nothing allocated: the same buffers a real base would give
            if starts_at_zero is None:
                raise ValueError("a SparseModulesLinear over a meta-device layer needs starts_at_zero")
            self.register_buffer("initial", None if starts_at_zero else initial)
            self.register_buffer("owner", torch.empty(initial.shape, dtype=torch.uint8, device="meta"))
        else:
            self.register_buffer("initial", initial if bool(initial.any()) else None)
            self.register_buffer("owner", partition_elements(initial.shape, num_modules, mask_seed).to(initial.device))
        self.bias_modules = (nn.Parameter(base.bias.detach().expand(num_modules, -1).clone())
                             if base.bias is not None else None)
        self.draw_seed, self.draw_key = draw_seed, draw_key
        self.step, self.call = 0, 0
        self.last_drawn: int | None = None
        # The same draw state as tensors, for a compiled forward (torch.compile): a Python integer read there is
        # baked into the graph and guarded, so a new step or call would recompile it. ``_draw_state`` holds
        # stable_hash(seed, key, step) (int64 bits), ``_draw_calls`` the calls since set_step. Not persistent:
        # set_step rebuilds them (the engine calls it before training and on resume).
        device = initial.device
        self.register_buffer("_draw_state", torch.tensor(_signed64(stable_hash(draw_seed, draw_key, 0)),
                                                         device=device), persistent=False)
        self.register_buffer("_draw_calls", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def draw(self) -> int:
        """The module index of this training call: a pure function of (seed, block, role, step, call)."""
        index = stable_hash(self.draw_seed, self.draw_key, self.step, self.call) % self.num_modules
        self.call += 1
        self.last_drawn = index
        return index

    def draw_tensor(self) -> torch.Tensor:
        """:meth:`draw` in tensor ops, as a 0-dim int64 tensor: the index of the same (seed, block, role, step,
        call), the call counted by ``_draw_calls``. The compiled forward uses it (no Python integer changes
        between steps, so the graph is compiled once); :attr:`last_drawn` is not updated."""
        index = unsigned_mod(splitmix64_tensor(self._draw_state ^ self._draw_calls), self.num_modules)
        self._draw_calls.add_(1)
        return index

    def set_step(self, step: int) -> None:
        self.step, self.call = step, 0
        with torch.no_grad():
            self._draw_state.fill_(_signed64(stable_hash(self.draw_seed, self.draw_key, step)))
            self._draw_calls.zero_()

    def _draw_index(self) -> int | torch.Tensor:
        # Eager keeps the Python draw (and last_drawn); under torch.compile the tensor draw gives the same index.
        # A step runs either eager or compiled: the two keep their own call counters.
        return self.draw_tensor() if torch.compiler.is_compiling() else self.draw()

    def module_weight(self, index: int | torch.Tensor) -> torch.Tensor:
        """``(out, in)`` weight of module ``index`` (an int or a 0-dim integer tensor): its own elements
        trainable, the rest at the initial value."""
        rest = self.initial if self.initial is not None else self.weight_modules.new_zeros(())
        return torch.where(self.owner == index, self.weight_modules, rest)

    def module_mask(self, index: int) -> torch.Tensor:
        return self.owner == index

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight ``(out, in)``: the mean of the N module weights."""
        total = self.weight_modules if self.initial is None else self.weight_modules + (self.num_modules - 1) * self.initial
        return total / self.num_modules

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.bias_modules is None else self.bias_modules.mean(dim=0)

    def eval_weight(self) -> torch.Tensor:
        """The merged weight as inference uses it: fake-quantised to ``bits`` when ``bits < 32``."""
        return self.weight if self.bits == 32 else fake_quantize(self.weight, self.bits)[0]

    def forward_weight(self) -> torch.Tensor:
        """The weight this call computes with: a drawn module in training, the merged weight otherwise."""
        return self.module_weight(self._draw_index()) if self.training else self.eval_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.eval_weight(), self.bias)
        index = self._draw_index()
        bias = None
        if self.bias_modules is not None:
            # a tensor index selects by index_select: ``[index]`` would read it back as a Python int (a sync and a
            # graph break); both give the row and the same gradient (the row's, zeros elsewhere)
            bias = (self.bias_modules[index] if isinstance(index, int)
                    else self.bias_modules.index_select(0, index.view(1)).view(-1))
        return F.linear(x, self.module_weight(index), bias)

    def to_plain(self) -> nn.Linear:
        """A plain layer holding the merged weight and bias (a :class:`QuantizedLinear` when ``bits < 32``)."""
        return _plain_copy(self.weight, self.bias, self.bits).train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_modules={self.num_modules}, "
                f"initial={'stored' if self.initial is not None else 'zero'}")


def _plain_copy(weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> nn.Linear:
    """An ``nn.Linear`` with these values; at ``bits < 32`` a post-training :class:`QuantizedLinear`."""
    out_features, in_features = weight.shape
    layer = (nn.Linear(in_features, out_features, bias=bias is not None) if bits == 32
             else QuantizedLinear(in_features, out_features, bits, bias=bias is not None, quantize_in_training=False))
    layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def symmetric_kl(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``0.5 * (KL(q || p) + KL(p || q))`` of the softmaxes of two ``(B, C)`` logits, batch mean, in fp32;
    each direction's target is detached (R-Drop, the official ``symmetric_KL_loss``)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(other.float(), dim=-1)
    return 0.5 * (F.kl_div(log_p, log_q.detach(), reduction="batchmean", log_target=True)
                  + F.kl_div(log_q, log_p.detach(), reduction="batchmean", log_target=True))


@dataclass
class MoSAConfig(AdapterConfig):
    base: str = config_field("adapter", "adapter (bottleneck, placed by style) or lora (MoSA on LoRA, the "
                                        "official MoSL)")
    style: str = config_field("adaptformer", "adapter base: adaptformer (parallel to the MLP), houlsby (on the "
                                             "residual stream after each residual add), pfeiffer (serial on the "
                                             "MLP output)")
    dim: int = config_field(16, "bottleneck width (adapter) or rank (lora); official VTAB-1k 16, FGVC 64")
    num_modules: int = config_field(4, "N, the number of sparse modules each split matrix is divided into")
    split: tuple[str, ...] = config_field(("up",), "matrices split into modules: ('up',) = official VTAB/FGVC "
                                                   "(down shared), ('down', 'up') = official multi-task")
    scale: float | None = config_field(None, "s on the adapter output, or the LoRA scalar (alpha = s * rank); "
                                             "None = official: adaptformer 0.1, houlsby/pfeiffer 1.0, lora 1.0")
    activation: str | None = config_field(None, "adapter base: non-linearity; None = official per style "
                                                "(adaptformer gelu, pfeiffer relu, houlsby silu)")
    dropout: float | None = config_field(None, "dropout inside the adapter; None = official (adaptformer 0.1, "
                                               "pfeiffer 0, houlsby 0, lora 0)")
    layer_norm: bool | None = config_field(None, "adapter base: LayerNorm on the adapter input; None = official "
                                                 "(adaptformer and pfeiffer yes, houlsby no; none inside the Swin MLP)")
    layer_norm_eps: float = config_field(1e-6, "eps of the adapter's LayerNorm (official 1e-6; files saved before "
                                               "this field existed used 1e-5)")
    houlsby_placement: str = config_field("residual_stream", "houlsby style: residual_stream (official: after each "
                                                             "residual add) or branch (inside each branch, before "
                                                             "its residual add: visadapt before issue 24)")
    swin_placement: str = config_field("inside_mlp", "timm Swin, adaptformer style: inside_mlp (official "
                                                     "swin_mosa.py: inside the MLP, fed its normalised input, no "
                                                     "adapter LayerNorm) or as_vit (the ViT placement: visadapt "
                                                     "before issue 24)")
    draw: str = config_field("per_site", "per_site (official: every adapter site draws its own modules) or "
                                         "per_block (the sites of a block share each role's draw: visadapt "
                                         "before issue 24)")
    bias: bool = config_field(True, "adapter base: biases in down and up (official)")
    targets: tuple[str, ...] = config_field(("q", "v"), "lora base: site kinds to adapt (official 'qv')")
    consistency_weight: float = config_field(1.0, "weight of the symmetric-KL term between two forward passes "
                                                  "(official 1.0); 0 = one pass per batch")
    seed: int = config_field(0, "seed of the masks and of the per-step module draws")
    keep_modules: bool = config_field(False, "also store the N-module training state in saved files, so "
                                             "training can continue from them")
    bits: int = config_field(32, "bits per weight of the stored merged adapter: 1, 2, 4, 8 (shared k-bit "
                                 "quantiser) or 32")
    blocks: tuple[int, ...] | None = config_field(None, "indices of the blocks to adapt; None = all")
    towers: tuple[str, ...] = config_field(("visual",), "open_clip towers to adapt: visual, text")

    def validate(self) -> None:
        check_choice("base", self.base, ROLE_CHILD)
        check_choice("style", self.style, STYLE_SITES)
        check_choice("bits", self.bits, QUANT_BITS)
        check_choice("draw", self.draw, DRAWS)
        check_choice("houlsby_placement", self.houlsby_placement, HOULSBY_SITES)
        check_choice("swin_placement", self.swin_placement, SWIN_PLACEMENTS)
        if self.activation is not None:
            check_choice("activation", self.activation, ACTIVATIONS)
        check_positive_int("dim", self.dim)
        check_positive("layer_norm_eps", self.layer_norm_eps)
        if not isinstance(self.num_modules, int) or not 2 <= self.num_modules <= 255:
            raise ValueError(f"config field num_modules={self.num_modules!r} is out of range: it must be an integer "
                             f"in [2, 255] (1 module is a plain adapter: use the adapter or lora plugin)")
        if not self.split or len(set(self.split)) != len(self.split) or not set(self.split) <= {"down", "up"}:
            raise ValueError(f"config field split={self.split!r} must name 'down', 'up' or both, each once")
        if self.scale is not None:
            check_positive("scale", self.scale)
        if self.dropout is not None:
            check_dropout("dropout", self.dropout)
        check_positive("consistency_weight", self.consistency_weight, allow_zero=True)
        if self.base == "lora" and not self.targets:
            raise ValueError("config field targets is empty: name at least one site kind, e.g. ('q', 'v')")

    @property
    def effective_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 1.0 if self.base == "lora" else DEFAULT_SCALE[self.style]

    @property
    def effective_dropout(self) -> float:
        if self.dropout is not None:
            return self.dropout
        return 0.0 if self.base == "lora" else STYLE_DROPOUT[self.style]

    def inside_swin_mlp(self, family: str) -> bool:
        """Whether the adapters go inside the MLP as ``swin_mosa.py`` puts them (adaptformer style on timm Swin)."""
        return (family == "timm_swin" and self.base == "adapter" and self.style == "adaptformer"
                and self.swin_placement == "inside_mlp")

    def effective_layer_norm(self, family: str) -> bool:
        """``layer_norm``, or when None the official choice for the style (and, on Swin, the placement)."""
        if self.layer_norm is not None:
            return self.layer_norm
        return False if self.inside_swin_mlp(family) else STYLE_LAYER_NORM[self.style]

    def site_kinds(self, family: str) -> tuple[str, ...]:
        """The site kinds the adapters attach to on a model of ``family``: per style (adapter base) or
        ``targets`` (lora base)."""
        if self.base == "lora":
            return tuple(self.targets)
        if self.inside_swin_mlp(family):
            return ("mlp_branch",)
        return HOULSBY_SITES[self.houlsby_placement] if self.style == "houlsby" else STYLE_SITES[self.style]

    @classmethod
    def saved_file_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A saved file's config values. A field the header lacks takes the value it had before it existed
        (:data:`FIELDS_BEFORE_ISSUE_24`); a header with none of them predates the per-style dropout too, when
        ``dropout=None`` meant 0.1 for every adapter style. Such a file loads, runs and trains as it did."""
        predates = not any(key in values for key in FIELDS_BEFORE_ISSUE_24)
        for key, old in FIELDS_BEFORE_ISSUE_24.items():
            values.setdefault(key, old)
        if predates and values.get("dropout") is None and values.get("base", "adapter") == "adapter":
            values["dropout"] = 0.1
        return values


def _draw_key(tower_index: int, block: int, role: str, site_kind: str | None) -> int:
    """The key of a layer's draws: ``site_kind`` None gives one key per block and role (``draw="per_block"``,
    the sites of a block then draw alike), a kind one key per site (``draw="per_site"``, as official)."""
    key = stable_hash(tower_index, block, 0 if role == "down" else 1)
    if site_kind is None:
        return key  # the key of visadapt before issue 24: old files keep drawing what they drew
    kind_code = int.from_bytes(hashlib.sha256(site_kind.encode()).digest()[:8], "little")  # stable across runs
    return stable_hash(key, kind_code)


def _check_no_activation_checkpointing(model: nn.Module) -> None:
    # Recomputing a block in backward would draw a second module index for the same pass.
    model = getattr(model, "module", model)  # DistributedDataParallel
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("mosa draws a module per forward pass, which activation checkpointing would draw again "
                         "on recomputation: call model.set_grad_checkpointing(False) before training MoSA")


def _adapter_modules(model: nn.Module, adapter_name: str) -> list[nn.Module]:
    """The adapter's bottleneck / LoRA modules. Each carries ``mosa_state``: ``"split"`` (training form),
    ``"merged"`` (after :func:`visadapt.merge`; the split layers wait aside) or ``"loaded-merged"`` (loaded
    from a file without module state: a plain adapter with nothing to split back to)."""
    return [item.module for item in inject.attached(model, adapter_name)]


@register_plugin("mosa")
class MoSAPlugin(AdapterPlugin):
    Config = MoSAConfig
    families = ("timm_vit", "timm_swin", "open_clip")
    mergeable = True

    def attach(self, model: nn.Module, config: MoSAConfig, adapter_name: str) -> None:
        _check_no_activation_checkpointing(model)
        family = model_family(model)
        sites = find_sites(model, config.site_kinds(family), config.blocks, config.towers)
        towers = list(dict.fromkeys(site.tower for site in sites))
        matrix = 0
        for site in sites:
            if config.base == "adapter":
                module = BottleneckAdapter(
                    site.in_features, config.dim, site.out_features,
                    activation=config.activation or STYLE_ACTIVATION[config.style], dropout=config.effective_dropout,
                    scale=config.effective_scale, layer_norm=config.effective_layer_norm(family), bias=config.bias)
                if isinstance(module.norm, nn.LayerNorm):
                    module.norm.eps = config.layer_norm_eps  # the shared block keeps PyTorch's 1e-5 otherwise
            else:
                if site.how not in ("linear", "weight"):
                    raise ValueError(f"mosa with base='lora' adapts linear layers; site kind {site.kind!r} is an "
                                     f"{site.how} site")
                module = LoRA(site.in_features, site.out_features, config.dim, config.effective_scale * config.dim,
                              config.effective_dropout)
            for role in ("down", "up"):
                child = ROLE_CHILD[config.base][role]
                layer = getattr(module, child)
                if role in config.split:
                    setattr(module, child, SparseModulesLinear(
                        layer, config.num_modules, mask_seed=stable_hash(config.seed, matrix), draw_seed=config.seed,
                        draw_key=_draw_key(towers.index(site.tower), site.block, role,
                                           site.kind if config.draw == "per_site" else None), bits=config.bits,
                        starts_at_zero=role == "up"))  # BottleneckAdapter.up and LoRA.B start at zero
                    matrix += 1
                elif config.bits != 32:  # a shared layer: full precision in training, k bits in eval and storage
                    setattr(module, child, _plain_copy(layer.weight.detach(), layer.bias, config.bits))
            module.mosa_state = "split"
            insert(site, adapter_name, module)

    # -------------------------------------------------------------------------------- merged / split forms
    def _consolidate(self, model: nn.Module, adapter_name: str, config: MoSAConfig) -> list[nn.Module]:
        """Replace every split layer by the plain merged layer (at ``config.bits``); returns the modules
        that were split, each keeping its split layers aside for :meth:`_split_back`."""
        changed = []
        for module in _adapter_modules(model, adapter_name):
            if module.mosa_state != "split":
                continue
            aside = {}
            for child in ROLE_CHILD[config.base].values():
                layer = getattr(module, child)
                if isinstance(layer, SparseModulesLinear):
                    aside[child] = layer
                    setattr(module, child, layer.to_plain())
            module.__dict__["_mosa_split_layers"] = aside
            module.mosa_state = "merged"
            changed.append(module)
        return changed

    @staticmethod
    def _split_back(modules: list[nn.Module]) -> None:
        for module in modules:
            for child, layer in module.__dict__.pop("_mosa_split_layers").items():
                setattr(module, child, layer)
            module.mosa_state = "split"

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Merge the N modules into one plain adapter in place (a LoRA base is then folded into the backbone
        weights too); :meth:`unmerge` restores the modules exactly as they were."""
        from visadapt import api

        config = api.get_record(model, adapter_name).config
        self._consolidate(model, adapter_name, config)
        if config.base == "lora":
            # Fold the inference form whatever the model's mode: k-bit factors quantise only in eval mode.
            modules = _adapter_modules(model, adapter_name)
            modes = [m.training for m in modules]
            for module in modules:
                module.eval()
            try:
                inject.merge(model, adapter_name)
            finally:
                for module, mode in zip(modules, modes):
                    module.train(mode)

    def unmerge(self, model: nn.Module, adapter_name: str) -> None:
        """Undo :meth:`merge`. An adapter loaded from a merged-only file has no modules to return to and
        stays merged (its LoRA base is still unfolded from the backbone)."""
        from visadapt import api

        if api.get_record(model, adapter_name).config.base == "lora":
            inject.unmerge(model, adapter_name)
        self._split_back([m for m in _adapter_modules(model, adapter_name) if m.mosa_state == "merged"])

    # -------------------------------------------------------------------------------------------- storage
    @staticmethod
    def _training_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors in split form (the modules), whichever form it is in now."""
        swapped = []
        for module in _adapter_modules(model, adapter_name):
            if module.mosa_state == "loaded-merged":
                raise ValueError(f"keep_modules=True, but adapter {adapter_name!r} was loaded from a merged-only "
                                 f"file and has no module state to store; save it with keep_modules=False")
            if module.mosa_state == "merged":
                for child, layer in module.__dict__["_mosa_split_layers"].items():
                    swapped.append((module, child, getattr(module, child)))
                    setattr(module, child, layer)
        try:
            return inject.adapter_state(model, adapter_name)
        finally:
            for module, child, plain in swapped:
                setattr(module, child, plain)

    def export_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The merged plain adapter (packed at ``bits < 32``), plus the module state under
        ``mosa_training_state.`` when ``keep_modules``."""
        from visadapt import api

        config = api.get_record(model, adapter_name).config
        with torch.no_grad():
            training = self._training_state(model, adapter_name) if config.keep_modules else {}
            changed = self._consolidate(model, adapter_name, config)
            try:
                state = inject.packed_adapter_state(model, adapter_name)
            finally:
                self._split_back(changed)
        state.update({TRAINING_STATE_PREFIX + k: v for k, v in training.items()})
        return state

    def import_state(self, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, *,
                     strict: bool = True, report=None):
        """Load a file's merged adapter, or its module state when it has one (checked against its merged part).

        With ``strict=False`` a module state that fits only in part is loaded in part and the check against the
        file's merged part is skipped (it cannot hold); the report says so. Returns the load report.
        """
        from visadapt import api
        from visadapt.load_report import LoadReport

        report = report if report is not None else LoadReport("a state dict", f"adapter {adapter_name!r}")
        config = api.get_record(model, adapter_name).config
        training = {k[len(TRAINING_STATE_PREFIX):]: v for k, v in state.items() if k.startswith(TRAINING_STATE_PREFIX)}
        merged = {k: v for k, v in state.items() if not k.startswith(TRAINING_STATE_PREFIX)}
        if training:
            inject.load_adapter_state(model, training, adapter_name, strict=strict, report=report)
            if not report.ok:
                report.notes.append("the module state loaded in part, so the file's merged adapter was not used "
                                    "and not checked against it")
                return report
            recomputed = self.export_state(model, adapter_name)
            bad = sorted(k for k in set(merged) | {k for k in recomputed if not k.startswith(TRAINING_STATE_PREFIX)}
                         if k not in merged or k not in recomputed or merged[k].shape != recomputed[k].shape
                         or not torch.allclose(merged[k].float(), recomputed[k].float(), rtol=1e-5, atol=1e-6))
            if bad:
                raise AdapterLoadError(f"the file's merged adapter is not the merge of its stored modules "
                                       f"({len(bad)} tensors differ, e.g. {bad[0]}): the file was edited or corrupted")
            return report
        changed = self._consolidate(model, adapter_name, config)
        try:
            inject.load_packed_adapter_state(model, merged, adapter_name, strict=strict, report=report)
        except Exception:
            self._split_back(changed)
            raise
        for module in changed:
            module.__dict__.pop("_mosa_split_layers")  # untrained modules: nothing to go back to
            module.mosa_state = "loaded-merged"
        return report

    # ------------------------------------------------------------------------------------------ training
    def on_step(self, model: nn.Module, step: int) -> None:
        for layer in model.modules():
            if isinstance(layer, SparseModulesLinear):
                layer.set_step(step)

    def training_loss(self, model: nn.Module, config: MoSAConfig, images: torch.Tensor, labels: torch.Tensor,
                      loss_fn) -> torch.Tensor:
        _check_no_activation_checkpointing(model)
        states = {getattr(m, "mosa_state", None) for m in model.modules()}
        if "loaded-merged" in states:
            raise ValueError("this MoSA adapter was loaded from a file holding only the merged adapter; MoSA training "
                             "needs the modules: load a file saved with keep_modules=True (or train a plain adapter)")
        if "merged" in states:
            raise ValueError("this MoSA adapter is merged; call visadapt.unmerge(model) before training it")
        logits = model(images)
        loss = loss_fn(logits, labels)
        if config.consistency_weight > 0:
            loss = loss + config.consistency_weight * symmetric_kl(logits, model(images))
        return loss
