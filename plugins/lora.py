"""LoRA (Hu et al., 2021) on linear and convolution layers of any supported family.

Targets are site kinds (:mod:`visadapt.sites`): ``q``, ``k``, ``v`` are row slices of a fused ``qkv``
projection (timm) or of ``nn.MultiheadAttention.in_proj_weight`` (open_clip); on diffusers UNets the same
names map to ``to_q``/``to_k``/``to_v``/``to_out``, and ``conv1``/``conv2`` adapt ResNet convolutions.
``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``) in both the unmerged forward and the merge
(:class:`visadapt.layers.LoRA`).
``bits < 32`` trains ``A`` and ``B`` through the shared k-bit quantiser (linear layers only) and stores them
packed, as the 1-bit adapters do; merging then folds the quantised product into the base weight.

As in PEFT, ``target_modules`` names host modules by path instead of site kinds (what LoRA files in the
diffusers/PEFT or kohya layouts do, see :mod:`visadapt.lora_layouts`), and ``rank_pattern`` /
``alpha_pattern`` give some modules a rank / alpha of their own; a pattern key matches a module whose path
equals it or ends with ``"." + key``, the longest matching key winning. (PEFT's own pattern keys are regular
expressions, first match winning; the foreign loaders of :mod:`visadapt.lora_layouts` and
:mod:`visadapt.peft_format` resolve them against the model and store explicit full paths here.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from visadapt.inject import insert
from visadapt.layers import QUANT_BITS, LoRA
from visadapt.plugin import (
    AdapterConfig,
    AdapterPlugin,
    check_choice,
    check_dropout,
    check_positive,
    check_positive_int,
    config_field,
)
from visadapt.registry import register_plugin
from visadapt.sites import find_sites, module_sites


@dataclass
class LoRAConfig(AdapterConfig):
    rank: int = config_field(8, "r, the rank of each low-rank update")
    alpha: float = config_field(8.0, "alpha; the update is scaled by alpha / rank")
    dropout: float = config_field(0.0, "dropout on the layer input of the low-rank path")
    targets: tuple[str, ...] = config_field(("q", "v"), "site kinds to adapt: q, k, v, qkv, proj, fc1, fc2 "
                                                        "(UNets also to_q.., to_out, conv1, conv2)")
    blocks: tuple[int, ...] | None = config_field(None, "indices of the blocks to adapt; None = all")
    towers: tuple[str, ...] = config_field(("visual",), "open_clip towers to adapt: visual, text")
    path_pattern: str | None = config_field(None, "regular expression the host module path must match")
    bits: int = config_field(32, "bits per A/B weight: 1, 2, 4, 8 (k-bit quantiser, stored packed; linear "
                                 "layers only) or 32 (full precision)")
    target_modules: tuple[str, ...] | None = config_field(
        None, "module paths or dotted suffixes to adapt (PEFT target_modules); when set, targets, blocks, "
              "towers and path_pattern are not used")
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={
        "help": "{module path or dotted suffix: rank} for modules whose rank differs from rank (PEFT)"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={
        "help": "{module path or dotted suffix: alpha} for modules whose alpha differs from alpha (PEFT)"})
    use_rslora: bool = config_field(False, "rank-stabilised LoRA (PEFT use_rslora): scale by alpha / sqrt(rank) "
                                           "instead of alpha / rank")

    def validate(self) -> None:
        check_positive_int("rank", self.rank)
        check_positive("alpha", self.alpha)
        check_choice("bits", self.bits, QUANT_BITS)
        check_dropout("dropout", self.dropout)
        if not self.targets:
            raise ValueError("config field targets is empty: name at least one site kind, e.g. ('q', 'v')")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("config field target_modules is empty: name at least one module, or leave it None "
                             "to use targets")
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_positive(f"alpha_pattern[{key!r}]", value)

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """``(rank, alpha)`` of the module at ``path``: its pattern entries where any match, else the defaults."""
        return (_lookup(self.rank_pattern, path, self.rank), float(_lookup(self.alpha_pattern, path, self.alpha)))


def _lookup(pattern: dict, path: str, default):
    # the longest (most specific) key that is the path or a dotted suffix of it
    keys = [key for key in pattern if path == key or path.endswith("." + key)]
    return pattern[max(keys, key=len)] if keys else default


@register_plugin("lora")
class LoRAPlugin(AdapterPlugin):
    Config = LoRAConfig
    families = ("timm_vit", "timm_swin", "open_clip", "diffusers_unet")
    mergeable = True

    def attach(self, model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
        if config.target_modules is not None:
            sites = module_sites(model, config.target_modules)
        else:
            sites = find_sites(model, config.targets, config.blocks, config.towers, config.path_pattern)
        for site in sites:
            if site.how not in ("linear", "weight"):
                raise ValueError(f"lora adapts linear and convolution layers; site kind {site.kind!r} is an "
                                 f"{site.how} site (use the adapter plugin there)")
            conv = site.host if isinstance(site.host, nn.Conv2d) else None
            rank, alpha = config.rank_alpha(site.path)
            insert(site, adapter_name, LoRA(site.in_features, site.out_features, rank, alpha,
                                            config.dropout, conv=conv, bits=config.bits,
                                            rslora=config.use_rslora))
