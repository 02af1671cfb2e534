"""Linear probing: no adapter at all, only the classifier head trains (the baseline of every PETL table).

Attach it with a head, ``visadapt.attach(model, "linear", head="head")``; the adapter file then holds the
head alone, in the same format as every other method, so tables and loaders treat it like any plugin.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from visadapt.plugin import AdapterConfig, AdapterPlugin
from visadapt.registry import register_plugin


@dataclass
class LinearProbeConfig(AdapterConfig):
    """Linear probing has nothing to configure: the head is chosen with ``attach(..., head=...)``."""


@register_plugin("linear")
class LinearProbePlugin(AdapterPlugin):
    Config = LinearProbeConfig
    families = ("timm_vit", "timm_swin", "open_clip")
    mergeable = True  # nothing to fold: merge and unmerge leave the model as it is

    def attach(self, model: nn.Module, config: LinearProbeConfig, adapter_name: str) -> None:
        """Insert nothing; :func:`visadapt.attach` freezes the backbone and leaves ``head`` trainable."""
