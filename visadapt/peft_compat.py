"""visadapt next to PEFT: the real layer under PEFT's wrappers, canonical module names, one namespace of names.

PEFT (and diffusers' ``load_lora_weights``, which uses it) *replaces* a layer by a tuner layer
(:class:`peft.tuners.tuners_utils.BaseTunerLayer`, e.g. ``peft.tuners.lora.layer.Linear``) that keeps the original
as ``base_layer`` and calls it in its forward; unloading puts ``base_layer`` back. visadapt never replaces modules, so
it always attaches to that base layer (recursively, :func:`base_layer`):

* visadapt attached first and PEFT wrapping later: the hooked layer becomes PEFT's ``base_layer`` and keeps running;
* PEFT unloading or deleting its adapters: the base layer goes back in place with visadapt's modules on it;
* merging: both libraries fold into the same ``base_layer.weight`` (:func:`visadapt.inject.unmerge` notices when
  PEFT wrote into a weight after visadapt merged and then subtracts its delta instead of restoring its copy).

Module paths are *canonical* everywhere visadapt writes or compares one (file keys, ``site_widths``,
``target_modules`` / ``rank_pattern`` lookups, :class:`visadapt.inject.Attached` ``host_path``, load reports): the
``.base_layer`` segments under a tuner layer are dropped (:func:`canonical_path`), so ``...attn1.to_q`` names the same
layer with or without PEFT and a file saved while PEFT wraps a layer equals one saved without it.

Adapter names are one namespace per model: :func:`check_name_free_of_peft` refuses a visadapt name PEFT uses there,
and the wrappers :func:`install` puts on diffusers' ``load_lora_adapter`` / ``add_adapter`` and on PEFT's
``BaseTuner.inject_adapter`` (the step every PEFT or diffusers LoRA load goes through) refuse a PEFT name visadapt
uses. The PEFT wrapper also hides visadapt's own modules from PEFT's ``target_modules`` matching (``exclude_modules``
for the time of the injection), so ``add_adapter(LoraConfig(target_modules=["to_q"]))`` does not try to wrap
``...to_q.visadapt_adapters.<name>.to_q``.

Nothing here imports PEFT: when ``"peft"`` is not in :data:`sys.modules` no module can be a PEFT layer and every
function returns at once.
"""
from __future__ import annotations

import functools
import importlib.abc
import re
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing visadapt loads no torch (visadapt/__init__.py)
    from torch import nn

#: the attribute visadapt hangs its modules on (:data:`visadapt.inject.ADAPTERS_ATTR`; not imported: no cycle)
_ADAPTERS_ATTR = "visadapt_adapters"
_WRAPPED_ATTR = "_visadapt_wrapped"
_DIFFUSERS_PEFT_MODULE = "diffusers.loaders.peft"
_PEFT_TUNERS_MODULE = "peft.tuners.tuners_utils"


def _tuner_layer_class():
    """PEFT's ``BaseTunerLayer`` when PEFT is imported (None otherwise: then no module can be one)."""
    if "peft" not in sys.modules:
        return None
    module = sys.modules.get(_PEFT_TUNERS_MODULE)
    if module is None:  # peft imported but its tuners not yet: nothing can have been wrapped
        return None
    return getattr(module, "BaseTunerLayer", None)


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (a wrapper holding the original layer as ``base_layer``)."""
    cls = _tuner_layer_class()
    return cls is not None and isinstance(module, cls)


def base_layer(module: nn.Module) -> nn.Module:
    """The real layer under any PEFT tuner layers wrapping it (``module`` itself when it is none)."""
    cls = _tuner_layer_class()
    if cls is None:
        return module
    while isinstance(module, cls):
        inner = module.get_base_layer()  # PEFT's own unwrapping, recursive over nested tuner layers
        if inner is module:
            break
        module = inner
    return module


def canonical_path(model: nn.Module, path: str) -> str:
    """``path`` (a module path or a tensor key of ``model``) without the ``base_layer`` segments PEFT's wrappers
    add: ``down_blocks.0....attn1.to_q.base_layer.visadapt_adapters.x.to_q.A.weight`` ->
    ``down_blocks.0....attn1.to_q.visadapt_adapters.x.to_q.A.weight``. A ``base_layer`` that is not the child of a
    tuner layer (a model's own module of that name) is kept. Free when PEFT is not imported."""
    if "base_layer" not in path or _tuner_layer_class() is None:
        return path
    kept, module = [], model
    for segment in path.split("."):
        child = module._modules.get(segment) if module is not None else None
        if segment == "base_layer" and module is not None and is_peft_layer(module):
            module = child
            continue
        kept.append(segment)
        module = child
    return ".".join(kept)


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The real module at canonical ``path`` (the inverse of :func:`canonical_path`): each segment is looked up
    through any PEFT wrapper in the way, and the module found is unwrapped. Raises ``AttributeError`` like
    ``nn.Module.get_submodule`` when there is no such module."""
    return base_layer(_lookup(model, path))


def _lookup(model: nn.Module, path: str) -> nn.Module:
    """The module at canonical ``path``, each segment looked up through any PEFT wrapper in the way; the module
    found is returned as it is (possibly a tuner layer). Raises ``AttributeError`` naming the missing segment."""
    module = model
    for segment in path.split(".") if path else ():
        child = module._modules.get(segment)
        while child is None and is_peft_layer(module):
            module = module.base_layer
            child = module._modules.get(segment)
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {segment!r} (looking up {path!r})")
        module = child
    return module


def named_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(canonical path, module)`` like ``model.named_modules()``, without PEFT's tuner layers and their own
    modules (``lora_A``, ``lora_B``, dropouts, ...): each wrapped layer appears once, as its real layer under the
    path it had before PEFT wrapped it."""
    if _tuner_layer_class() is None:
        yield from model.named_modules()
        return
    # named_modules walks depth first, so the tuner layers enclosing a path form a stack; only what lies under a
    # tuner layer's base_layer is the model's, its other children (lora_A, lora_B, ...) are PEFT's own
    enclosing: list[str] = []
    for path, module in model.named_modules():
        while enclosing and not path.startswith(enclosing[-1] + "."):
            enclosing.pop()
        if enclosing and path[len(enclosing[-1]) + 1:].split(".", 1)[0] != "base_layer":
            continue
        if is_peft_layer(module):
            enclosing.append(path)
            continue
        yield canonical_path(model, path), module


def peft_owned_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter PEFT's tuner layers own (their adapters, not the base layers they wrap)."""
    if _tuner_layer_class() is None:
        return set()
    owned: set[int] = set()
    for module in model.modules():
        if is_peft_layer(module):
            base_params = {id(p) for p in base_layer(module).parameters()}
            owned.update(id(p) for p in module.parameters() if id(p) not in base_params)
    return owned


def peft_merge_state(model: nn.Module, path: str) -> tuple[int, frozenset[str]] | None:
    """``(id of the outermost PEFT tuner layer at canonical path, the adapters PEFT has merged there)``, or None
    when no tuner layer wraps the layer at ``path``. :func:`visadapt.inject.unmerge` compares it with the state at
    merge time to tell PEFT fuse/unfuse round trips (only rounding left behind) from a PEFT merge still in place."""
    if _tuner_layer_class() is None:
        return None
    try:
        module = _lookup(model, path)
    except AttributeError:
        return None
    if not is_peft_layer(module):
        return None
    outer, merged = module, set()
    while is_peft_layer(module):
        merged.update(getattr(module, "merged_adapters", ()))
        module = getattr(module, "base_layer", module)
        if module is outer:
            break
    return id(outer), frozenset(merged)


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """The model a ``peft.PeftModel`` (or PEFT's ``LoraModel`` &c.) wraps, via ``get_base_model()``; any other
    model as it is. visadapt's model-level calls take either, so both adapters act on the same layers."""
    if "peft" not in sys.modules:
        return model
    peft = sys.modules["peft"]
    peft_model_cls = getattr(peft, "PeftModel", None)
    if peft_model_cls is not None and isinstance(model, peft_model_cls):
        return model.get_base_model()
    tuner_cls = getattr(sys.modules.get(_PEFT_TUNERS_MODULE), "BaseTuner", None)
    if tuner_cls is not None and isinstance(model, tuner_cls):
        return model.model
    return model


# ------------------------------------------------------------------------------------------------ adapter names


def peft_adapter_names(model: nn.Module) -> set[str]:
    """Names of the PEFT adapters on ``model``: its ``peft_config`` keys and the adapters its tuner layers hold
    (those stay after a bare ``inject_adapter_in_model``, which records no ``peft_config`` on plain models)."""
    names = set(getattr(model, "peft_config", None) or {})
    if _tuner_layer_class() is None:
        return names
    for module in model.modules():
        if is_peft_layer(module):
            for attr in getattr(module, "adapter_layer_names", ()):
                names.update(getattr(module, attr, None) or {})
    return names


def visadapt_adapter_names(model: nn.Module) -> set[str]:
    """Names of the visadapt adapters on ``model`` (attached through :func:`visadapt.attach` or loaded)."""
    from visadapt import api, inject

    return set(api.records(model)) | set(inject.adapter_names(model))


def check_name_free_of_peft(model: nn.Module, adapter_name: str) -> None:
    """Raise ``ValueError`` when PEFT already has an adapter ``adapter_name`` on ``model`` (visadapt side)."""
    if _tuner_layer_class() is None and not getattr(model, "peft_config", None):
        return
    if adapter_name in peft_adapter_names(model):
        raise ValueError(
            f"adapter name {adapter_name!r} is already used by a PEFT/diffusers adapter on this model "
            f"(pipe.load_lora_weights / add_adapter / get_peft_model); visadapt and PEFT adapters share one "
            f"namespace so that set_adapters, fuse and unload calls cannot mean the other library's adapter: "
            f"pass another adapter_name to visadapt, or delete the PEFT one first (pipe.delete_adapters(name))")


def _refuse_visadapt_name(model: nn.Module, adapter_name: str, what: str) -> None:
    if adapter_name in visadapt_adapter_names(model):
        raise ValueError(
            f"{what}: adapter name {adapter_name!r} is already used by a visadapt adapter on this model; visadapt "
            f"and PEFT/diffusers adapters share one namespace: pass another adapter_name, or unload the visadapt "
            f"one first (pipe.unload_visadapt({adapter_name!r}) or visadapt.detach(model, {adapter_name!r}))")


def free_default_name(*models: nn.Module, start: int | None = None) -> str:
    """``default_<n>`` (diffusers' naming) with the smallest ``n >= start`` neither library uses on any of
    ``models`` (a pipeline's components); ``start`` defaults to the number of adapter names in use there, as
    diffusers' ``get_adapter_name`` counts its own."""
    taken = set().union(*(peft_adapter_names(model) | visadapt_adapter_names(model) for model in models))
    index = len(taken) if start is None else start
    while f"default_{index}" in taken:
        index += 1
    return f"default_{index}"


# ----------------------------------------------------------------------------------- wrappers on PEFT/diffusers


def visadapt_module_paths(model: nn.Module, outside_peft_layers: bool = False) -> list[str]:
    """Every module path (as ``model.named_modules()`` spells it) under a ``visadapt_adapters`` container; with
    ``outside_peft_layers``, only those not inside a PEFT tuner layer (PEFT's injection never looks there)."""
    pattern = re.compile(rf"(^|\.){_ADAPTERS_ATTR}(\.|$)")
    peft_prefixes = tuple(f"{path}." for path, m in model.named_modules() if is_peft_layer(m)) \
        if outside_peft_layers else ()
    return [path for path, _ in model.named_modules()
            if pattern.search(path) and not (peft_prefixes and path.startswith(peft_prefixes))]


def _with_visadapt_excluded(config, paths: list[str]):
    """``config.exclude_modules`` extended by ``paths`` (PEFT matches a list entry as a full path or a dotted
    suffix, a string as a regular expression over the full path). Returns the value to restore."""
    old = config.exclude_modules
    if isinstance(old, str):
        config.exclude_modules = "|".join([f"(?:{old})"] + [re.escape(p) for p in paths])
    else:
        config.exclude_modules = (list(old) if old else []) + paths
    return old


def _refuse_weight_delta_targets(model: nn.Module, config, state_dict) -> None:
    """Refuse a PEFT injection that would wrap a layer (or the attention around it) whose weight carries a visadapt
    weight delta (a parametrization, e.g. open_clip's ``in_proj_weight``): PEFT's MultiheadAttention LoRA swaps
    those weights at every call, which fails on a parametrized weight only at the first forward."""
    from visadapt.inject import WeightDelta

    held = {path for path, module in model.named_modules()
            if any(isinstance(p, WeightDelta) for plist in getattr(module, "parametrizations", {}).values()
                   for p in plist)}
    if not held:
        return
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.tuners.tuners_utils import check_target_module_exists

    targeted = None
    if state_dict is not None:  # PEFT's own reading of which modules a state dict targets
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
        targeted = {key.rsplit("." + prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
    for path in sorted(held | {path.rpartition(".")[0] for path in held}):
        if path in targeted if targeted is not None else bool(check_target_module_exists(config, path)):
            raise ValueError(
                f"PEFT would wrap {path}, whose weights carry a visadapt adapter as a weight delta (PEFT's LoRA for "
                f"nn.MultiheadAttention swaps those weights at every call, which the delta cannot share): target "
                f"other modules (exclude_modules={path!r}), or detach the visadapt adapter first")


def _wrap_inject_adapter(tuner_cls) -> None:
    original = tuner_cls.inject_adapter
    if getattr(original, _WRAPPED_ATTR, False):
        return

    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        _refuse_visadapt_name(model, adapter_name, f"PEFT cannot add adapter {adapter_name!r}")
        config = self.peft_config[adapter_name]
        # matching by target_modules (a state_dict, as diffusers passes, names its modules exactly); PEFT skips
        # what lies inside its existing tuner layers, and warns about exclusions that matched nothing
        state_dict = kwargs.get("state_dict", args[2] if len(args) > 2 else None)
        by_config = state_dict is None
        _refuse_weight_delta_targets(model, config, state_dict)
        paths = visadapt_module_paths(model, outside_peft_layers=True) if by_config else []
        if not paths or not hasattr(config, "exclude_modules"):
            return original(self, model, adapter_name, *args, **kwargs)
        # PEFT's first injection freezes every parameter it does not own; visadapt's keep their own flags
        flags = [(p, p.requires_grad) for n, p in model.named_parameters() if _ADAPTERS_ATTR in n]
        # visadapt's modules are named after the site they adapt (``...to_q.visadapt_adapters.x.to_q``), so a
        # short target such as "to_q" would match them: hide them from PEFT's matching for this injection only,
        # leaving the config the user gave (and the one saved with the adapter) as it was
        old = _with_visadapt_excluded(config, paths)
        try:
            return original(self, model, adapter_name, *args, **kwargs)
        finally:
            config.exclude_modules = old
            for param, flag in flags:
                param.requires_grad_(flag)

    setattr(inject_adapter, _WRAPPED_ATTR, True)
    tuner_cls.inject_adapter = inject_adapter


def _wrap_diffusers_mixin(mixin) -> None:
    load_original, add_original = mixin.load_lora_adapter, mixin.add_adapter
    if getattr(load_original, _WRAPPED_ATTR, False):
        return

    @functools.wraps(load_original)
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        name = kwargs.get("adapter_name")
        if name is None and not kwargs.get("hotswap") and visadapt_adapter_names(self):
            # diffusers would name it default_<n> counting its own adapters only; skip visadapt's names too
            from diffusers.utils.peft_utils import get_adapter_name

            kwargs["adapter_name"] = free_default_name(self, start=int(get_adapter_name(self).rsplit("_", 1)[1]))
        elif name is not None and not kwargs.get("hotswap"):
            # refused here, before diffusers touches the model (its own clean-up assumes a started injection)
            _refuse_visadapt_name(self, name, f"load_lora_adapter(adapter_name={name!r})")
        return load_original(self, pretrained_model_name_or_path_or_dict, *args, **kwargs)

    @functools.wraps(add_original)
    def add_adapter(self, adapter_config, adapter_name: str = "default"):
        _refuse_visadapt_name(self, adapter_name, f"add_adapter(adapter_name={adapter_name!r})")
        return add_original(self, adapter_config, adapter_name)

    for function in (load_lora_adapter, add_adapter):
        setattr(function, _WRAPPED_ATTR, True)
    mixin.load_lora_adapter, mixin.add_adapter = load_lora_adapter, add_adapter


_TARGETS = {
    _PEFT_TUNERS_MODULE: lambda module: _wrap_inject_adapter(module.BaseTuner),
    _DIFFUSERS_PEFT_MODULE: lambda module: _wrap_diffusers_mixin(module.PeftAdapterMixin),
}


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Runs a callback on a module right after it is executed (once per module): PEFT's / diffusers' entry points
    here, diffusers' ``DiffusionPipeline`` methods (:func:`visadapt.diffusers.install`). One finder serves every
    callback registered with :func:`on_import`."""

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        callback = self.pending.pop(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:  # whoever would have found it (site-packages, an editable install, ...)
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            callback(module)

        spec.loader.exec_module = exec_module
        return spec


def on_import(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """``callback(module)`` now when ``module_name`` is imported already, otherwise right after it is (importing
    it here would charge seconds to every ``import visadapt``). A second registration for a module still pending
    replaces the first."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _WrapOnImport)), None)
    if finder is None:
        finder = _WrapOnImport()
        sys.meta_path.insert(0, finder)
    finder.pending[module_name] = callback


def install() -> None:
    """Wrap PEFT's ``BaseTuner.inject_adapter`` and diffusers' ``PeftAdapterMixin.load_lora_adapter`` /
    ``add_adapter``: now for the modules already imported, the others as soon as they are (:func:`on_import`)."""
    for name, wrap in _TARGETS.items():
        on_import(name, wrap)
