"""1-bit (k-bit) adapters: Jie, Wang and Deng, "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy" (ICCV 2023).

Two quantised adapters, both built from the shared :class:`visadapt.layers.BottleneckAdapter` with
``bits < 32`` (:class:`visadapt.layers.QuantizedLinear`, per-matrix mean/std standardisation, the
median-Lloyd normal codebook, straight-through gradients):

* ``method="adaptformer"`` (Bi-AdaptFormer): parallel to each MLP, fed the block's residual stream (the
  official code feeds the un-normalised ``x``, not LN2(x); the ``mlp`` site does exactly that),
  ``s * up(dropout(relu(down(x))))``, no biases.
* ``method="lora"`` (Bi-LoRA): on the q and v row slices of each fused ``qkv``, fed the attention input,
  ``s * B(dropout(A x))`` (identity activation), no biases.

Defaults follow the official recipe: ``dim`` 32, 1 bit, dropout 0.1. The scale ``s`` was searched per task
over {0.01, 0.1, 1, 10, 100} in the paper; 1.0 (the most frequent choice at dim 32) is the default here.

**Storage.** The adapter file holds the packed codes of every quantised matrix in ONE uint8 tensor
(``codes``, first code in the low bits, matrices in model order, down before up) and their float32 mean and
std in ONE ``(n, 2)`` tensor (``stats``), plus the classifier head as usual. That is the official raw byte
stream regrouped, so a file is the official size plus one small safetensors header. After loading, the
layers hold the dequantised weights (inference costs what a plain AdaptFormer / LoRA costs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from visadapt import inject
from visadapt.inject import AdapterLoadError, insert
from visadapt.layers import QUANT_BITS, BottleneckAdapter, QuantizedLinear
from visadapt.plugin import AdapterConfig, AdapterPlugin, check_choice, check_positive, config_field
from visadapt.registry import register_plugin
from visadapt.sites import find_sites

METHOD_SITES = {"adaptformer": ("mlp",), "lora": ("q", "v")}
METHOD_ACTIVATION = {"adaptformer": "relu", "lora": "identity"}


@dataclass
class BitAdapterConfig(AdapterConfig):
    method: str = config_field("adaptformer", "adaptformer (parallel to the MLP, ReLU) or lora (q and v, no "
                                              "activation)")
    dim: int = config_field(32, "bottleneck width (AdaptFormer) or rank (LoRA)")
    bits: int = config_field(1, f"bits per adapter weight: {', '.join(map(str, QUANT_BITS))} (32 = full precision)")
    scale: float = config_field(1.0, "s, the factor on the adapter output (searched per task in the paper)")
    dropout: float = config_field(0.1, "dropout between the two projections")
    blocks: tuple[int, ...] | None = config_field(None, "indices of the blocks to adapt; None = all")

    def validate(self) -> None:
        check_choice("method", self.method, METHOD_SITES)
        check_choice("bits", self.bits, QUANT_BITS)
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"config field dim={self.dim!r} is out of range: it must be an integer > 0")
        check_positive("scale", self.scale)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config field dropout={self.dropout!r} is out of range: it must be in [0, 1)")


def _quantized_layers(model: nn.Module, adapter_name: str) -> list[QuantizedLinear]:
    """Every quantised matrix of the adapter, in model order, down before up within a module."""
    return [layer for item in inject.attached(model, adapter_name) for layer in (item.module.down, item.module.up)]


@register_plugin("bitadapter")
class BitAdapterPlugin(AdapterPlugin):
    Config = BitAdapterConfig
    families = ("timm_vit",)
    mergeable = False
    merge_refusal = ("1-bit adapters are not folded into base weights: AdaptFormer has a ReLU between its "
                     "projections, and the loaded file already runs as dense dequantised weights")

    def attach(self, model: nn.Module, config: BitAdapterConfig, adapter_name: str) -> None:
        for site in find_sites(model, METHOD_SITES[config.method], config.blocks):
            insert(site, adapter_name, BottleneckAdapter(
                site.in_features, config.dim, site.out_features, activation=METHOD_ACTIVATION[config.method],
                dropout=config.dropout, scale=config.scale, bias=False, bits=config.bits,
            ))

    def export_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        layers = _quantized_layers(model, adapter_name)
        if not layers or not isinstance(layers[0], QuantizedLinear):
            return inject.adapter_state(model, adapter_name)  # bits == 32: plain tensors
        packed, stats = zip(*(layer.export_codes() for layer in layers))
        return {"codes": torch.cat(packed), "stats": torch.stack(stats)}

    def import_state(self, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        layers = _quantized_layers(model, adapter_name)
        if not layers or not isinstance(layers[0], QuantizedLinear):
            inject.load_adapter_state(model, state, adapter_name)
            return
        if set(state) != {"codes", "stats"}:
            raise AdapterLoadError(f"a quantised bitadapter file holds the tensors 'codes' and 'stats'; this one "
                                   f"holds {sorted(state)}")
        codes, stats = state["codes"], state["stats"]
        sizes = [-(-layer.weight.numel() * layer.bits // 8) for layer in layers]
        if stats.shape != (len(layers), 2) or codes.numel() != sum(sizes) or codes.dtype != torch.uint8:
            raise AdapterLoadError(
                f"the file's codes ({codes.numel()} bytes, {codes.dtype}) and stats {tuple(stats.shape)} do not fit "
                f"this model's {len(layers)} quantised matrices ({sum(sizes)} bytes expected)")
        for layer, chunk, stat in zip(layers, torch.split(codes, sizes), stats):
            layer.load_codes(chunk, stat)
