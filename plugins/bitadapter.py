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

**Bi-Head** (``quantize_head=True``, the official ``-bihead`` methods): the classifier becomes a bias-free
quantised linear at **1 bit whatever ``bits`` is**, as in the official ``main.py`` (``QLinear(768, C, 1)``).
``head_bits`` quantises it at another width instead (a visadapt option). Files saved before ``head_bits``
existed quantised their head at ``bits``; their header has no ``head_bits``, and they load as they were trained.

**Codebook** (``codebook_start``): the official code starts its 500 codebook iterations from all-zero
codewords, which at 8 bits has not converged (196 of the 256 levels still crowd within +-0.1; mean squared
error 1.87e-3 on N(0, 1) data). visadapt starts from normal quantiles (``"quantile"``, the default and a
deliberate departure): converged, error 1.66e-4, 11.2x lower (``python eval/bench/bitadapter_codebook.py``
prints both). At 1, 2 and 4 bits the two starts give the same codebook (within 1e-7), so only 8-bit adapters
differ. ``"zero"`` reproduces the official codebook; :func:`convert_official_checkpoint` uses it, so an
official 8-bit file dequantises to its own values.

**Storage** (the shared k-bit format of :func:`visadapt.inject.packed_adapter_state`). The file holds the packed codes of every quantised matrix in ONE uint8 tensor
(``codes``, first code in the low bits, matrices in model order, down before up) and their float32 mean and
std in ONE ``(n, 2)`` tensor (``stats``), plus the classifier head as usual. That is the official raw byte
stream regrouped, so a file is the official size plus one small safetensors header. After loading, the
layers hold the dequantised weights (inference costs what a plain AdaptFormer / LoRA costs).

**Official checkpoints.** :func:`convert_official_checkpoint` reads a release ``.bin`` (``JieShibo/PETL-ViT``
``binary_adapter/models_bin``) with its YAML config into a visadapt adapter file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from visadapt import inject
from visadapt.inject import insert
from visadapt.layers import CODEBOOK_STARTS, QUANT_BITS, BottleneckAdapter, QuantizedLinear
from visadapt.load_report import MATCHED, LoadReport
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
    quantize_head: bool = config_field(False, "replace the classifier by a bias-free quantised linear at head_bits "
                                              "(the official -bihead variants); the model's own head then idles")
    head_bits: int = config_field(1, "bits of the quantised head (quantize_head): official 1 whatever bits is; "
                                     "2, 4, 8 or 32 are visadapt options")
    codebook_start: str = config_field("quantile", "codebook iteration start: quantile (visadapt, converged; 8-bit "
                                                   "error 11x lower) or zero (official; unconverged at 8 bits)")

    def validate(self) -> None:
        check_choice("method", self.method, METHOD_SITES)
        check_choice("bits", self.bits, QUANT_BITS)
        check_choice("head_bits", self.head_bits, QUANT_BITS)
        check_choice("codebook_start", self.codebook_start, CODEBOOK_STARTS)
        check_positive_int("dim", self.dim)
        check_positive("scale", self.scale)
        check_dropout("dropout", self.dropout)

    @classmethod
    def saved_file_values(cls, values: dict) -> dict:
        # Files written before these fields existed quantised the head at `bits` and started the codebook
        # from quantiles: a header without the field keeps that behaviour.
        values.setdefault("head_bits", values.get("bits", 1))
        values.setdefault("codebook_start", "quantile")
        return values


@register_plugin("bitadapter")
class BitAdapterPlugin(AdapterPlugin):
    Config = BitAdapterConfig
    families = ("timm_vit",)
    mergeable = False
    merge_refusal = ("1-bit adapters are not folded into base weights: AdaptFormer has a ReLU between its "
                     "projections, and the loaded file already runs as dense dequantised weights")

    def replaces_head(self, config: BitAdapterConfig) -> bool:
        return config.quantize_head

    def attach(self, model: nn.Module, config: BitAdapterConfig, adapter_name: str) -> None:
        for site in find_sites(model, METHOD_SITES[config.method], config.blocks):
            adapter = BottleneckAdapter(
                site.in_features, config.dim, site.out_features, activation=METHOD_ACTIVATION[config.method],
                dropout=config.dropout, scale=config.scale, bias=False, bits=config.bits,
            )
            for layer in (adapter.down, adapter.up):
                if isinstance(layer, QuantizedLinear):
                    layer.codebook_start = config.codebook_start
            insert(site, adapter_name, adapter)
        if config.quantize_head:
            (site,) = find_sites(model, ["head"])
            head = (nn.Linear(site.in_features, site.out_features, bias=False) if config.head_bits == 32
                    else QuantizedLinear(site.in_features, site.out_features, config.head_bits, bias=False,
                                         codebook_start=config.codebook_start))
            insert(site, adapter_name, head)


def convert_official_checkpoint(bin_path: str | os.PathLike, config_path: str | os.PathLike, model: nn.Module,
                                output: str | os.PathLike) -> Path:
    """Convert an official binary-adapter ``.bin`` + its YAML config into a visadapt adapter file.

    The official file is a raw byte stream in module order: for every quantised matrix its packed codes
    (first code in the low bits) then float32 mean and std; then, unless the method ends in ``-bihead``,
    the fp32 head weight ``(C, D)`` and bias ``(C,)`` (with ``-bihead`` the head is the last quantised
    matrix instead, bias-free). Module order is the official registration order,
    which visadapt's site order reproduces: block by block, ``lora_q`` before ``lora_v``, and
    ``adapter_down`` before ``adapter_up``. The YAML gives ``method``, ``dim``, ``bit``,
    ``scale`` and ``num_class``. ``model`` is the backbone it was trained on (e.g. timm
    ``vit_base_patch16_224_in21k`` weights) with a ``num_class`` head; it gets the adapter attached.
    The codes are read with the official codebook (``codebook_start="zero"``) and a ``-bihead`` head at 1 bit,
    as the official loader reads them.
    """
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    missing = [k for k in ("method", "dim", "bit", "scale") if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}: it is not an official binary-adapter config")
    method = str(config["method"])
    bihead = method.endswith("-bihead")
    method = method.removesuffix("-bihead")
    head = model.get_submodule("head")
    if "num_class" in config and head.out_features != int(config["num_class"]):
        raise ValueError(f"{config_path} is for {config['num_class']} classes; the model's head has "
                         f"{head.out_features}: create the model with num_classes={config['num_class']}")
    from visadapt import api, io

    api.attach(model, BitAdapterPlugin(), {"method": method, "dim": int(config["dim"]), "bits": int(config["bit"]),
                                           "scale": float(config["scale"]), "quantize_head": bihead,
                                           "head_bits": 1, "codebook_start": "zero"},
               head=None if bihead else "head")
    try:
        data = Path(bin_path).read_bytes()
        layers = [layer for _, layer in inject.quantized_layers(model, "default")]
        sizes = [layer.packed_bytes for layer in layers]
        head_bytes = 0 if bihead else (head.weight.numel() + head.bias.numel()) * 4
        expected = sum(sizes) + 8 * len(layers) + head_bytes
        if len(data) != expected:
            raise ValueError(f"{bin_path} has {len(data):,} bytes; {method} dim {config['dim']} at {config['bit']} "
                             f"bit on this model ({len(layers)} matrices, {head.out_features}-class head) needs "
                             f"{expected:,}: the config, the model or the file does not match")
        codes, stats, offset = [], [], 0
        for size in sizes:
            codes.append(torch.from_numpy(np.frombuffer(data, np.uint8, size, offset).copy()))
            stats.append(torch.from_numpy(np.frombuffer(data, "<f4", 2, offset + size).copy()))
            offset += size + 8
        # the stream has no names: its byte count (checked above) is what makes every matrix land; the report
        # records each quantised matrix and the head, as for every other load
        report = LoadReport(str(bin_path), "adapter 'default'")
        if not bihead:
            report.add("head", "head.weight", MATCHED)
            report.add("head", "head.bias", MATCHED)
        inject.load_packed_adapter_state(model, {"codes": torch.cat(codes), "stats": torch.stack(stats)}, "default",
                                         report=report)
        if not bihead:
            floats = torch.from_numpy(np.frombuffer(data, "<f4", head_bytes // 4, offset).copy())
            with torch.no_grad():
                head.weight.copy_(floats[:head.weight.numel()].reshape(head.weight.shape))
                head.bias.copy_(floats[head.weight.numel():])
        api.get_record(model, "default").load_report = report
        return io.save_adapter(model, output, metadata={"converted_from": Path(bin_path).name})
    except Exception:
        api.detach(model, "default")
        raise
