"""visadapt: parameter-efficient adapters for vision and diffusion models.

>>> import timm, visadapt
>>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
>>> visadapt.attach(model, "lora", rank=4, head="head")
>>> visadapt.save_adapter(model, "lora.safetensors")
>>> visadapt.save_pretrained(model, "my-lora")           # adapter.safetensors + model card README.md
>>> visadapt.load_adapter(fresh_model, "my-lora")         # a file, a folder, a hub repo id or a state dict
"""
from visadapt.api import (
    active_adapters,
    attach,
    detach,
    get_weight,
    load_report,
    merge,
    set_active_adapters,
    set_weight,
    summary,
    trainable_parameters,
    unmerge,
)
from visadapt.hub import push_to_hub, save_pretrained
from visadapt.io import load_adapter, read_adapter_file, save_adapter
from visadapt.peft_style import disable_adapters, merge_and_unload
from visadapt.plugin import AdapterConfig, AdapterPlugin, config_field
from visadapt.registry import get_plugin, list_plugins, register_plugin
from visadapt.sites import all_sites, find_sites, model_family

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterPlugin",
    "active_adapters",
    "all_sites",
    "attach",
    "config_field",
    "detach",
    "disable_adapters",
    "find_sites",
    "get_plugin",
    "get_weight",
    "list_plugins",
    "load_adapter",
    "load_report",
    "merge",
    "merge_and_unload",
    "model_family",
    "push_to_hub",
    "read_adapter_file",
    "register_plugin",
    "save_adapter",
    "save_pretrained",
    "set_active_adapters",
    "set_weight",
    "summary",
    "trainable_parameters",
    "unmerge",
]

# pipe.load_visadapt & co. on every diffusers.DiffusionPipeline (added when diffusers' pipelines are imported)
from visadapt import diffusers as _diffusers_loader

_diffusers_loader.install()
# PEFT's inject_adapter and diffusers' load_lora_adapter / add_adapter refuse names visadapt uses (on import)
from visadapt import peft_compat as _peft_compat

_peft_compat.install()
