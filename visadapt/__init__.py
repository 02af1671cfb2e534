"""visadapt: parameter-efficient adapters for vision and diffusion models.

>>> import timm, visadapt
>>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
>>> visadapt.attach(model, "lora", rank=4, head="head")
>>> visadapt.save_adapter(model, "lora.safetensors")
>>> visadapt.save_pretrained(model, "my-lora")           # adapter.safetensors + model card README.md
>>> visadapt.load_adapter(fresh_model, "my-lora")         # a file, a folder, a hub repo id or a state dict
"""
import importlib

from visadapt import peft_compat as _peft_compat

# The public names, imported on first use (PEP 562): ``import visadapt`` loads no torch, so that a command's
# ``--help`` or a parse error answers at once (tests/test_flags.py); ``visadapt.attach`` etc. import their module
# the first time they are looked up.
_EXPORTS = {
    "visadapt.api": ("active_adapters", "attach", "detach", "get_weight", "load_report", "merge",
                     "set_active_adapters", "set_weight", "summary", "trainable_parameters", "unmerge"),
    "visadapt.hub": ("push_to_hub", "save_pretrained"),
    "visadapt.io": ("load_adapter", "read_adapter_file", "save_adapter"),
    "visadapt.peft_style": ("disable_adapters", "merge_and_unload"),
    "visadapt.plugin": ("AdapterConfig", "AdapterPlugin", "config_field"),
    "visadapt.registry": ("get_plugin", "list_plugins", "register_plugin"),
    "visadapt.sites": ("all_sites", "find_sites", "model_family"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
# ``visadapt.load_report`` is a function (api) and a submodule: importing the submodule binds it on this package
# the first time, so it is imported now (it loads no torch) and its binding dropped, which leaves the name to
# the function (__getattr__) for good.
importlib.import_module("visadapt.load_report")
globals().pop("load_report")

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


def __getattr__(name: str):
    """A public name (:data:`__all__`) from its module, or a submodule (``visadapt.diffusers``), on first use."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _install_pipeline_methods(module) -> None:
    """``pipe.load_visadapt`` & co. on every ``DiffusionPipeline`` (:func:`visadapt.diffusers.install`), once
    diffusers' pipelines are imported; visadapt.diffusers (torch) is imported only then."""
    from visadapt.diffusers import install_methods

    if hasattr(module, "DiffusionPipeline"):
        install_methods(module.DiffusionPipeline)


# pipe.load_visadapt & co. on every diffusers.DiffusionPipeline (added when diffusers' pipelines are imported)
_peft_compat.on_import("diffusers.pipelines.pipeline_utils", _install_pipeline_methods)
# PEFT's inject_adapter and diffusers' load_lora_adapter / add_adapter refuse names visadapt uses (on import)
_peft_compat.install()
