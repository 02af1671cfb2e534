"""SELMA (Li, Cho, Sung, Yoon, Bansal; NeurIPS 2024): skill-specific LoRA experts on a text-to-image UNet, merged
into one multi-skill adapter.

The ``selma`` plugin is a thin layer over the ``lora`` plugin (one LoRA implementation,
:class:`visadapt.layers.LoRA`): the same modules and file layout, with SELMA's defaults and the expert's skill
recorded in its config. Facts from the official code (GitHub ``jialuli-luka/SELMA``, read for facts only):

* targets: the UNet attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (``fine-tune/
  train_text_to_image_lora.py``: a PEFT ``LoraConfig`` with ``target_modules=["to_k", "to_q", "to_v", "to_out.0"]``);
* rank 128 with ``lora_alpha = rank`` (so the LoRA scaling is 1) and Gaussian init of ``A`` (``fine-tune/
  ft_sd_lora.sh`` and ``ft_sd_lora_sdxl.sh`` pass ``--rank 128``); visadapt keeps its Kaiming-uniform ``A`` and
  zero ``B``, which starts from the same point (a zero delta);
* optimisation, read from the shell scripts at the repository's newest commit (``dc691fa``) and the defaults of
  the diffusers training scripts they call: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 1e-2), gradient
  norm clipped at 1.0, learning rate 3e-4 held constant with no warm-up, random horizontal flip, fp16 mixed
  precision, seed 42. SD v1.4 (``fine-tune/ft_sd_lora.sh``): batch 16 per device x 4 accumulation steps, 5,000
  optimiser steps, resolution 512. SDXL (``fine-tune/ft_sd_lora_sdxl.sh``): batch 4 x 8, 10,000 steps,
  resolution 1024 (the commit before the newest one had lr 1e-4 and 5,000 steps). The paper trains on one L40
  GPU, where the per-device batch is the global batch. :data:`RECIPE` (SD) and :data:`RECIPE_SDXL` hold these;
  ``train/selma.py --recipe selma`` runs :data:`RECIPE` (its trainer builds no SDXL conditioning, so
  :data:`RECIPE_SDXL` is for an SDXL trainer of your own);
* merging (``inference/img_gen_merge.py``): every expert is loaded with ``pipe.load_lora_weights`` and combined
  with ``pipe.set_adapters(names, adapter_weights=[w] * n)``, i.e. the merged model adds ``sum_i w_i * delta_i``
  where ``delta_i = scaling_i * B_i @ A_i`` is expert ``i``'s weight delta. The weight intended is the uniform
  ``1/n`` (the script computes ``1 / len(args.model_id)``, the length of the model-id *string*, which looks like a
  slip for the number of experts; the paper describes merging as averaging). :func:`merge_experts` with
  ``method="average"`` is that uniform average, with weights you can change.

Merges (:func:`merge_experts`, :func:`merge_expert_files`), all producing an ordinary visadapt ``lora`` adapter:

* ``average`` (SELMA): ``sum_i w_i delta_i`` with ``w_i = 1/n`` by default. Represented *exactly* by concatenating
  ranks: ``sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 ... w_n s_n B_n] [A_1; ...; A_n]``, a LoRA of rank
  ``sum_i r_i`` with scaling 1 (``alpha = rank``). Sites where an expert has a smaller rank are zero-padded.
* ``ties`` (Yadav et al., NeurIPS 2023): per site, each weighted delta ``w_i delta_i`` (``w_i = 1`` by default)
  keeps its top ``density`` fraction of entries by magnitude (trim), the sign of each entry is the sign of the
  sum of the trimmed deltas (elect), and the merged entry is the mean of the trimmed entries that agree with
  that sign (disjoint mean).
* ``dare`` (Yu et al., ICML 2024): each entry of each delta is dropped with probability ``drop_rate`` and the
  rest rescaled by ``1 / (1 - drop_rate)`` (a seeded generator per expert and site), then ``sum_i w_i delta_i``
  with ``w_i = 1/n`` by default.

TIES and DARE work on the dense deltas ``(out, in)``, whose sum is generally not of low rank; the result is
refactored with a truncated SVD at ``rank`` (default: the sum of the experts' ranks, capped by the matrix size):
``B = U_k diag(S_k)``, ``A = V_k^T``. The relative Frobenius error ``||D - B A|| / ||D||`` of every site is in the
returned :class:`MergeReport` and in the file's ``selma.merge`` metadata.

The unmerged alternative: ``pipe.load_visadapt(expert, adapter_name=skill)`` for each expert, then
``pipe.set_visadapt_weights(skills, weights)`` (see :mod:`visadapt.diffusers`): the same weighted sum of deltas,
computed at run time, at the cost of one LoRA branch per expert per layer.

Experts in the diffusers/PEFT LoRA layout (SELMA's released checkpoints, ``pytorch_lora_weights.safetensors``)
are read through the registered checkpoint formats (:mod:`visadapt.formats`), e.g. ``diffusers_lora``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from visadapt import api, inject
from visadapt.layers import LoRA, effective_weight
from visadapt.names import SELMA_MERGE_METHODS as MERGE_METHODS
from visadapt.plugin import config_field
from visadapt.plugins.lora import LoRAConfig, LoRAPlugin
from visadapt.registry import register_plugin

MERGE_METADATA = "selma.merge"

#: the official SD v1.4 recipe (``fine-tune/ft_sd_lora.sh`` and the defaults of
#: ``fine-tune/train_text_to_image_lora.py`` at the newest commit); ``batch_size`` is per device (the paper: one GPU)
RECIPE = {"rank": 128, "alpha": 128.0, "targets": ("to_q", "to_k", "to_v", "to_out"), "lr": 3e-4,
          "lr_schedule": "constant", "warmup_steps": 0, "batch_size": 16, "grad_accum_steps": 4,
          "max_steps": 5000, "checkpoint_every_steps": 500, "resolution": 512, "random_flip": True, "seed": 42,
          "weight_decay": 1e-2, "adam_betas": (0.9, 0.999), "adam_eps": 1e-8, "max_grad_norm": 1.0,
          "mixed_precision": "fp16"}
#: the official SDXL recipe (``fine-tune/ft_sd_lora_sdxl.sh`` at the newest commit, which raised lr from 1e-4 and
#: steps from 5,000; optimiser defaults of ``fine-tune/train_text_to_image_lora_sdxl.py``)
RECIPE_SDXL = {**RECIPE, "batch_size": 4, "grad_accum_steps": 8, "max_steps": 10000, "checkpoint_every_steps": 2000,
               "resolution": 1024}


@dataclass
class SELMAConfig(LoRAConfig):
    rank: int = config_field(128, "r, the rank of each expert's low-rank update (official: 128)")
    alpha: float = config_field(128.0, "alpha; the update is scaled by alpha / rank (official: alpha = rank)")
    targets: tuple[str, ...] = config_field(("to_q", "to_k", "to_v", "to_out"),
                                            "UNet attention projections to adapt (official: q, k, v, out)")
    skill: str = config_field("", "the skill this expert was trained on (informational, e.g. 'counting')")


@register_plugin("selma")
class SELMAPlugin(LoRAPlugin):
    """A SELMA skill expert: LoRA on the UNet attention projections (see the module docstring)."""

    Config = SELMAConfig
    families = ("diffusers_unet",)


# ------------------------------------------------------------------------------------------ merging deltas


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES merge of same-shaped ``deltas`` (any shape): trim each ``w_i * delta_i`` to its top ``density``
    fraction of entries by magnitude, elect the sign of the sum, average the entries that agree with it."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]: the fraction of each delta's entries TIES keeps")
    trimmed = []
    for delta, weight in zip(deltas, weights, strict=True):
        delta = delta.float() * weight
        keep = max(1, math.ceil(density * delta.numel()))
        flat = delta.reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.abs().topk(keep, sorted=False).indices] = True
        trimmed.append((flat * mask).reshape(delta.shape))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(dim=0)
    return (stacked * agree).sum(dim=0) / count.clamp(min=1)


def dare_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], drop_rate: float,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
    """DARE merge: drop each entry of ``delta_i`` with probability ``drop_rate`` (``generators[i]``), rescale the
    rest by ``1 / (1 - drop_rate)``, return ``sum_i w_i * delta_i``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate={drop_rate} must be in [0, 1): the probability DARE drops a delta entry")
    merged = torch.zeros_like(deltas[0], dtype=torch.float32)
    for delta, weight, generator in zip(deltas, weights, generators, strict=True):
        keep = torch.rand(delta.shape, generator=generator) >= drop_rate
        merged += weight * delta.float() * keep / (1.0 - drop_rate)
    return merged


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (out, k), A (k, in), relative error)`` with ``B @ A`` the best rank-``k`` approximation of the
    2-D ``delta (out, in)``, ``k = min(rank, out, in)``, zero-padded to ``rank`` columns/rows."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    norm = delta.double().norm()
    error = float((delta.double() - b @ a).norm() / norm) if norm > 0 else 0.0
    return b.float(), a.float(), error


@dataclass
class MergeReport:
    """What :func:`merge_experts` did: the method, experts and weights, the merged rank, and per site the relative
    Frobenius error of the low-rank refactoring (0 for ``average``, which is exact)."""

    method: str
    experts: list[str]
    weights: list[float]
    rank: int
    site_errors: dict[str, float]
    options: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.site_errors.values(), default=0.0)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "max_error": self.max_error}, sort_keys=True)


def _expert_sites(model: nn.Module, name: str) -> dict[str, LoRA]:
    sites = {}
    for item in inject.attached(model, name):
        if not isinstance(item.module, LoRA):
            raise TypeError(f"adapter {name!r} has a {type(item.module).__name__} at {item.host_path}; only LoRA "
                             f"experts (plugins selma, lora) can be merged")
        sites[f"{item.host_path}:{item.kind}"] = item.module
    return sites


def _factors(module: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (out, r), A (r, in*kh*kw))`` as the forward uses them (k-bit ones dequantised)."""
    a = effective_weight(module.A).detach().float()
    b = effective_weight(module.B).detach().float()
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def merge_experts(model: nn.Module, experts: Sequence[str], method: str = "average", *,
                  weights: Sequence[float] | None = None, merged_name: str = "merged", rank: int | None = None,
                  density: float = 0.2, drop_rate: float = 0.5, seed: int = 0) -> MergeReport:
    """Attach to ``model`` a new ``lora`` adapter ``merged_name`` that merges the LoRA adapters ``experts``.

    ``experts`` must adapt the same sites (same targets). ``method``: ``average`` (SELMA, exact), ``ties`` (with
    ``density``, the kept fraction per delta) or ``dare`` (with ``drop_rate`` and ``seed``); see the module
    docstring for the formulas and default ``weights``. ``rank``: the merged rank (default the sum of the experts'
    ranks; ``average`` always uses that sum, as its representation is exact). The experts stay attached; detach
    them (or save only ``merged_name``) as you need. Returns the :class:`MergeReport`.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is not one of {', '.join(MERGE_METHODS)}")
    experts = list(experts)
    if len(experts) < 1:
        raise ValueError("merge_experts needs at least one expert adapter name")
    if len(set(experts)) != len(experts):
        raise ValueError(f"experts {experts} name an adapter twice")
    if weights is None:
        weights = [1.0] * len(experts) if method == "ties" else [1.0 / len(experts)] * len(experts)
    weights = [float(w) for w in weights]
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} weights for {len(experts)} experts; give one weight per expert")
    for name in experts:
        api.get_record(model, name)  # unknown names: the error lists the attached adapters
    sites = [_expert_sites(model, name) for name in experts]
    for name, per in zip(experts[1:], sites[1:], strict=True):
        if set(per) != set(sites[0]):
            diff = sorted(set(per) ^ set(sites[0]))[:2]
            raise ValueError(f"experts {experts[0]!r} and {name!r} adapt different sites (e.g. {diff}); merge "
                             f"experts trained with the same targets")
    keys = list(sites[0])
    rank_sum = max(sum(per[key].rank for per in sites) for key in keys)
    merged_rank = rank_sum if method == "average" else int(rank or rank_sum)
    if merged_rank <= 0:
        raise ValueError(f"rank={rank} must be a positive integer")

    base = api.get_record(model, experts[0]).config.to_dict()
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    config = {k: v for k, v in base.items() if k in fields}
    config.update(rank=merged_rank, alpha=float(merged_rank), dropout=0.0, bits=32, use_rslora=False)
    for key in ("rank_pattern", "alpha_pattern"):  # one rank for every site of the merged adapter
        if key in config:
            config[key] = {}
    api.attach(model, "lora", config, adapter_name=merged_name)
    try:
        merged_sites = _expert_sites(model, merged_name)
        if set(merged_sites) != set(keys):
            raise ValueError(f"the merged adapter's config selects other sites than the experts adapt "
                             f"({len(merged_sites)} vs {len(keys)}); merge experts attached from configs")
        errors: dict[str, float] = {}
        for site_index, key in enumerate(keys):
            target = merged_sites[key]
            modules = [per[key] for per in sites]
            if method == "average":
                b = torch.cat([w * m.scaling * _factors(m)[0] for w, m in zip(weights, modules, strict=True)], 1)
                a = torch.cat([_factors(m)[1] for m in modules], 0)
                pad = merged_rank - a.shape[0]
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
                errors[key] = 0.0
            else:
                deltas = [m.scaling * torch.matmul(*_factors(m)) for m in modules]
                if method == "ties":
                    dense = ties_merge(deltas, weights, density)
                else:
                    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i * 10_007 + site_index)
                                  for i in range(len(deltas))]
                    dense = dare_merge(deltas, weights, drop_rate, generators)
                b, a, errors[key] = truncated_factors(dense, merged_rank)
            with torch.no_grad():
                target.B.weight.copy_(b.reshape(target.B.weight.shape).to(target.B.weight.dtype))
                target.A.weight.copy_(a.reshape(target.A.weight.shape).to(target.A.weight.dtype))
    except Exception:
        api.detach(model, merged_name)
        raise
    options = {"average": {}, "ties": {"density": density}, "dare": {"drop_rate": drop_rate, "seed": seed}}[method]
    return MergeReport(method, experts, weights, merged_rank, errors, options)


def merge_expert_files(model: nn.Module, paths: Sequence[str | os.PathLike], output: str | os.PathLike,
                       method: str = "average", **options) -> MergeReport:
    """Merge expert files into ONE visadapt ``lora`` adapter file at ``output``; ``model`` ends as it began.

    Each path is a visadapt adapter file (``selma`` or ``lora``) or a LoRA in a layout a registered checkpoint
    format reads (diffusers/PEFT ``pytorch_lora_weights.safetensors``: SELMA's released experts). ``options`` go
    to :func:`merge_experts`. The file's ``selma.merge`` metadata holds the :class:`MergeReport` as JSON.
    """
    from visadapt.io import save_adapter

    names = [f"selma_expert_{i}" for i in range(len(paths))]
    loaded: list[str] = []
    try:
        for name, path in zip(names, paths, strict=True):
            load_expert(model, path, name)
            loaded.append(name)
        report = merge_experts(model, names, method, merged_name="selma_merged", **options)
        report.experts = [str(p) for p in paths]
        try:
            save_adapter(model, output, "selma_merged", metadata={MERGE_METADATA: report.to_json()})
        finally:
            api.detach(model, "selma_merged")
    finally:
        for name in loaded:
            api.detach(model, name)
    return report


def load_expert(model: nn.Module, path: str | os.PathLike, adapter_name: str, strict: bool = True):
    """Attach the expert in ``path`` as ``adapter_name``: a visadapt adapter file, or a file/folder (or hub repo
    id) in a layout a registered checkpoint format recognises, LoRA files renamed after their skill included.
    Resolved exactly as :func:`visadapt.load_adapter` resolves its sources (:mod:`visadapt.hub`); ``strict``
    as there (the report is on the adapter's record). Returns its config."""
    from visadapt.io import load_adapter

    return load_adapter(model, path, adapter_name, strict=strict)
