"""Bottleneck adapters: AdaptFormer, Houlsby and Pfeiffer placements of one shared block.

* ``adaptformer`` (Chen et al., 2022): parallel to each MLP, fed the block's residual stream (the MLP
  branch's input before its LayerNorm), output scaled by ``s`` (default 0.1) and added to the block output.
* ``houlsby`` (Houlsby et al., 2019): serial, on the attention branch output and on the MLP branch output,
  each before its residual add (``x + f(x)``), ``s`` default 1.0.
* ``pfeiffer`` (Pfeiffer et al., 2021): serial on the MLP branch output only, ``s`` default 1.0.

The block is :class:`visadapt.layers.BottleneckAdapter`. Adapters with a non-linearity cannot be folded
into base weights, so this plugin refuses :func:`visadapt.merge`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from visadapt.inject import insert
from visadapt.layers import ACTIVATIONS, QUANT_BITS, BottleneckAdapter
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
from visadapt.sites import Site, find_sites

STYLE_SITES = {
    "adaptformer": ("mlp",),
    "houlsby": ("attn_out", "mlp_out"),
    "pfeiffer": ("mlp_out",),
}
DEFAULT_SCALE = {"adaptformer": 0.1, "houlsby": 1.0, "pfeiffer": 1.0}


@dataclass
class BottleneckAdapterConfig(AdapterConfig):
    style: str = config_field("adaptformer", "placement: adaptformer (parallel to MLP), houlsby (serial after "
                                             "attention and MLP), pfeiffer (serial after MLP)")
    bottleneck: int = config_field(8, "hidden width of each adapter")
    reduction_factor: int | None = config_field(None, "bottleneck = site width // reduction_factor when set; "
                                                      "overrides bottleneck (width-proportional, as the "
                                                      "Adapter baseline of Polyhistor)")
    scale: float | None = config_field(None, "s, the factor on the adapter output; None = the style's "
                                             "published default (adaptformer 0.1, houlsby/pfeiffer 1.0)")
    activation: str = config_field("relu", f"non-linearity between down and up: {', '.join(ACTIVATIONS)}")
    dropout: float = config_field(0.1, "dropout after the activation")
    layer_norm: bool = config_field(False, "LayerNorm on the adapter input")
    bias: bool = config_field(True, "biases in the down and up projections")
    bits: int = config_field(32, "bits per projection weight: 1, 2, 4, 8 (trained with the shared k-bit "
                                 "quantiser, stored packed) or 32 (full precision)")
    blocks: tuple[int, ...] | None = config_field(None, "indices of the blocks to adapt; None = all")
    towers: tuple[str, ...] = config_field(("visual",), "open_clip towers to adapt: visual, text")

    def validate(self) -> None:
        check_choice("style", self.style, STYLE_SITES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("bits", self.bits, QUANT_BITS)
        check_positive_int("bottleneck", self.bottleneck)
        if self.reduction_factor is not None:
            check_positive_int("reduction_factor", self.reduction_factor)
        if self.scale is not None:
            check_positive("scale", self.scale, allow_zero=True)
        check_dropout("dropout", self.dropout)

    @property
    def effective_scale(self) -> float:
        return DEFAULT_SCALE[self.style] if self.scale is None else self.scale


def bottleneck_width(config: BottleneckAdapterConfig, site: Site) -> int:
    """The hidden width of the adapter at ``site``: ``config.bottleneck``, or ``width // reduction_factor``."""
    if config.reduction_factor is None:
        return config.bottleneck
    width = site.in_features // config.reduction_factor
    if width < 1:
        raise ValueError(f"reduction_factor={config.reduction_factor} leaves no hidden unit at {site.name} "
                         f"({site.in_features} wide): use a reduction_factor <= {site.in_features}")
    return width


@register_plugin("adapter")
class BottleneckAdapterPlugin(AdapterPlugin):
    Config = BottleneckAdapterConfig
    families = ("timm_vit", "timm_swin", "open_clip")
    mergeable = False
    merge_refusal = ("a bottleneck adapter has a non-linearity between its projections, so no base weight "
                     "can absorb it; use the lora plugin where merged inference is needed")

    def attach(self, model: nn.Module, config: BottleneckAdapterConfig, adapter_name: str) -> None:
        for site in find_sites(model, STYLE_SITES[config.style], config.blocks, config.towers):
            insert(site, adapter_name, BottleneckAdapter(
                site.in_features, bottleneck_width(config, site), site.out_features, activation=config.activation,
                dropout=config.dropout, scale=config.effective_scale, layer_norm=config.layer_norm,
                bias=config.bias, bits=config.bits,
            ))
