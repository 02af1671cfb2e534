"""``pipe.load_visadapt``: visadapt adapters on any diffusers pipeline, with diffusers' LoRA-loader verbs.

After ``import visadapt`` every :class:`diffusers.DiffusionPipeline` has the methods of
:class:`VisadaptLoaderMixin`::

    pipe.load_visadapt("resadapter.safetensors")            # file, folder, hub repo id or state dict
    pipe.load_visadapt("org/selma-experts", weight_name="counting.safetensors", adapter_name="count", weight=0.5)
    pipe.load_visadapt("counting_v2.safetensors", adapter_name="count", hotswap=True)  # new weights, same modules
    pipe.set_visadapt_adapters(["default_0", "count"], [1.0, 0.7])  # only these run, at these weights
    pipe.set_visadapt_weights("count", 0.5)                  # change a weight, leave the others as they are
    pipe.get_active_visadapt()                               # ["default_0", "count"]
    pipe.disable_visadapt(); pipe.enable_visadapt()          # base pipeline exactly, then back
    pipe.fuse_visadapt(components=["unet"], lora_scale=1.0, safe_fusing=True)  # fold into the base weights
    pipe.unfuse_visadapt(components=["unet"])
    pipe.list_visadapt()                                     # {"unet": ["default_0", "count"]} (= get_list_visadapt)
    pipe.save_visadapt("count", "count.safetensors")
    pipe.delete_visadapt("count")
    pipe.unload_visadapt()                                   # every pipeline tensor is the original again

Each is diffusers' LoRA-loader method of the same meaning, with its argument names: ``load_lora_weights``,
``set_adapters``, ``get_active_adapters``, ``disable_lora`` / ``enable_lora``, ``fuse_lora(components,
lora_scale, safe_fusing, adapter_names)``, ``unfuse_lora(components)``, ``get_list_adapters``,
``delete_adapters``, ``unload_lora_weights``. ``load_visadapt`` takes every keyword ``load_lora_weights`` and
``lora_state_dict`` take in diffusers 0.42 (``weight_name``, ``subfolder``, ``cache_dir``, ``revision``,
``local_files_only``, ``token``, ``force_download``, ``proxies``, ``hotswap``, ``low_cpu_mem_usage``,
``use_safetensors``, ``unet_config``, ``return_lora_metadata``), honouring each or refusing it with the reason,
so a diffusers user needs no new vocabulary. Sources are read by :func:`visadapt.hub.read_source`, exactly as
:func:`visadapt.load_adapter` reads them for timm and open_clip models. Unlike diffusers, nothing is loaded "successfully" with keys left over: a visadapt file loads
strictly (:func:`visadapt.io.load_adapter`), and a foreign layout is handed to the registered
:mod:`visadapt.formats` converter that recognises it, which must report every key that did not fit.

The component an adapter goes to (``unet``, ...) is found from the pipeline: a visadapt file records the
fingerprint of the model it was trained on (family, depth and width, :func:`visadapt.sites.fingerprint`), and the
one component with that fingerprint receives it; an adapter for another architecture (an SDXL adapter on an SD1.5
pipeline) is refused with both architectures named.

diffusers' own LoRA adapters (``pipe.load_lora_weights``, PEFT backend) and visadapt adapters work side by side, in
either load order: visadapt never replaces modules, it hooks the real layers in place, under PEFT's wrappers
(:mod:`visadapt.peft_compat`), so loading, fusing, deleting or unloading one kind leaves the other as it was.
Adapter names are one namespace across the two. Fuse and unfuse in reverse order across the two kinds to get the
weights back bit for bit (visadapt's unfuse puts back the exact weights it overwrote; when a diffusers LoRA was
fused after it, it subtracts its delta instead, exact only to rounding, and warns).

``pipe.enable_xformers_memory_efficient_attention()`` is wrapped: it first probes whether xformers kernels really
run on the pipeline's device (:func:`xformers_usable`) and, when they do not (xformers absent, no CUDA, or a wheel
built for another torch, which raises "No operator found" at the first call), keeps PyTorch's SDPA attention with
a one-line notice instead of raising or, worse, failing later in the middle of generation.

The methods are installed lazily (:func:`install`): importing diffusers' pipelines costs seconds (it pulls in
transformers), which ``import visadapt`` must not charge to users of timm or open_clip models, so the methods are
added the moment ``diffusers.pipelines.pipeline_utils`` is imported, or right away when it already is.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt import api, formats, hub, inject, io
from visadapt.attention import xformers_usable as _xformers_usable
from visadapt.peft_compat import check_name_free_of_peft, free_default_name
from visadapt.sites import UnsupportedModelError, fingerprint, model_family

logger = logging.getLogger(__name__)

#: the file name visadapt writes into a folder (:func:`visadapt.io.save_adapter` given a directory)
ADAPTER_FILE_NAME = hub.ADAPTER_FILE_NAME
_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"
_FUSED_ATTR = "_visadapt_fused_weights"  # on a component: {adapter name: its weight before fuse_visadapt}
_DISABLED_ATTR = "_visadapt_disabled"  # on a component: the adapters that were active when disable_visadapt ran
#: the keywords of diffusers' load_lora_weights / lora_state_dict (0.42) beyond the hub ones, each honoured or
#: refused with its reason by load_visadapt (see its docstring)
_DIFFUSERS_KWARGS = ("low_cpu_mem_usage", "use_safetensors", "unet_config", "return_lora_metadata")
_LOAD_KWARGS = ("weight_name", "metadata", "component", "strict") + hub.HUB_KWARGS + _DIFFUSERS_KWARGS


class VisadaptPipelineError(ValueError):
    """A pipeline-level request cannot be met: no component fits the adapter, an unknown adapter name, ..."""


# ------------------------------------------------------------------------------------------ pipeline components


def _adaptable_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's components visadapt has sites in (its UNet, ...), by component name."""
    found = {}
    for name, module in pipe.components.items():
        if not isinstance(module, nn.Module):
            continue
        try:
            model_family(module)
        except UnsupportedModelError:
            continue
        found[name] = module
    return found


def _component_summary(pipe) -> str:
    parts = []
    for name, module in pipe.components.items():
        if not isinstance(module, nn.Module):
            continue
        try:
            model_family(module)
            parts.append(f"{name} is {io._describe(fingerprint(module))}")
        except UnsupportedModelError:
            parts.append(f"{name} ({type(module).__name__}) has no visadapt sites")
    return "; ".join(parts) or "it has no torch components"


def _pick_components(pipe, component: str | None) -> dict[str, nn.Module]:
    adaptable = _adaptable_components(pipe)
    if component is None:
        if not adaptable:
            raise VisadaptPipelineError(f"{type(pipe).__name__} has no component visadapt can adapt "
                                        f"({_component_summary(pipe)})")
        return adaptable
    if component not in adaptable:
        raise VisadaptPipelineError(f"component={component!r} is not an adaptable component of "
                                    f"{type(pipe).__name__}; adaptable: {', '.join(adaptable) or 'none'}")
    return {component: adaptable[component]}


def _loaded(pipe) -> dict[str, list[str]]:
    """``{component: [adapter names]}`` of the visadapt adapters attached to the pipeline, in load order."""
    return {name: list(api.records(module)) for name, module in _adaptable_components(pipe).items()
            if api.records(module)}


def _owners(pipe, adapter_names: str | Sequence[str] | None) -> list[tuple[str, nn.Module, str]]:
    """``(component name, component, adapter name)`` for each named adapter (all when None); unknown names raise."""
    components = _adaptable_components(pipe)
    loaded = _loaded(pipe)
    if adapter_names is None:
        return [(comp, components[comp], name) for comp, names in loaded.items() for name in names]
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    every = {name for names in loaded.values() for name in names}
    unknown = [name for name in adapter_names if name not in every]
    if unknown:
        have = ", ".join(f"{n!r}" for names in loaded.values() for n in names) or "none"
        raise KeyError(f"no visadapt adapter named {', '.join(map(repr, unknown))} is loaded on this pipeline "
                       f"(loaded: {have}); see pipe.list_visadapt()")
    return [(comp, components[comp], name) for name in adapter_names for comp, names in loaded.items()
            if name in names]


def _refuse_switching_off_fused(modules: Mapping[str, nn.Module], keeping: Sequence[str] = ()) -> None:
    """Raise when a call would switch off fused adapters (all but ``keeping``) of ``modules`` (by component):
    they are in the base weights."""
    for component, module in modules.items():
        fused = sorted(set(module.__dict__.get(_FUSED_ATTR, {})) - set(keeping))
        if fused:
            raise ValueError(f"adapter(s) {', '.join(map(repr, fused))} on {component} are fused into the base "
                             f"weights and cannot be switched off; pipe.unfuse_visadapt() first")


def _non_finite_fused_tensor(module: nn.Module, adapter_name: str) -> str | None:
    """The first tensor fusing ``adapter_name`` wrote (a base weight at one of its sites, or its own merged
    modules) that holds NaN or inf, by name; None when all are finite."""
    for item in inject.attached(module, adapter_name):
        if item.base_weight is not None and not torch.isfinite(item.base_weight).all():
            return f"{item.host_path} (its weight)"
        for key, tensor in item.module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return f"{item.host_path}:{item.kind}.{key}"
    return None


def _check_diffusers_kwargs(pipe, kwargs: Mapping[str, Any], strict: bool) -> None:
    """Refuse, naming why and what to do, the ``load_lora_weights`` keywords visadapt cannot honour as given."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False asks for pickled (.bin/.pt) weights; visadapt reads safetensors "
                         "files only, because unpickling can run arbitrary code. Convert the file where you trust "
                         "it (`safetensors.torch.save_file(torch.load(f), 'adapter.safetensors')`) and drop "
                         "use_safetensors")
    if kwargs.get("low_cpu_mem_usage") and not strict:
        raise ValueError("low_cpu_mem_usage=True skips the random initialisation of the adapter's tensors because "
                         "the file fills every one of them; strict=False may leave some unfilled: drop one of the two")
    unet_config = kwargs.get("unet_config")
    if unet_config is not None:
        unet = getattr(pipe, "unet", None)
        own = dict(unet.config) if unet is not None and hasattr(unet, "config") else None
        if own is None or dict(unet_config) != own:
            differing = sorted(k for k in set(own or {}) | set(unet_config)
                               if (own or {}).get(k) != dict(unet_config).get(k))
            raise ValueError(f"unet_config= differs from this pipeline's UNet config (in {', '.join(differing[:6])}"
                             f"{', ...' if len(differing) > 6 else ''}): diffusers uses it to map kohya SDXL block "
                             f"numbers onto a UNet, and visadapt maps keys onto the pipeline's own UNet, the only "
                             f"one it loads into. Drop unet_config (or pass pipe.unet.config)")


# ------------------------------------------------------------------------------------------------ loading


def _load_visadapt(pipe, found: hub.AdapterSource, candidates: dict[str, nn.Module], adapter_name: str,
                   strict: bool = True) -> str:
    """Attach the visadapt adapter ``found`` (its tensors and header, read once by :func:`visadapt.hub.read_source`)
    to the one candidate component its base model matches."""
    meta = found.meta
    io.check_header(found.what, meta)  # every field present and typed before any is read here
    fits = {}
    for name, module in candidates.items():
        try:
            io.check_base_model(module, meta, found.what)
        except io.AdapterFileError:
            continue
        fits[name] = module
    if not fits:
        saved = io._describe(json.loads(meta["base_model"]))
        raise io.AdapterFileError(
            f"adapter file {found.what} ({meta.get('plugin')}) was trained for {saved}; no component of this "
            f"{type(pipe).__name__} has that architecture: {_component_summary(pipe)}. An adapter only loads on "
            f"the base model it was trained for (an SDXL adapter does not fit an SD1.5 pipeline): use the adapter "
            f"trained for this pipeline's base model")
    if len(fits) > 1:
        raise VisadaptPipelineError(f"adapter file {found.what} fits several components ({', '.join(fits)}); pass "
                                    f"component='<name>' to choose")
    (component, module), = fits.items()
    io.load_adapter_tensors(module, found.tensors, meta, adapter_name, source=found.what, strict=strict)
    return component


def _load_foreign(pipe, found: hub.AdapterSource, candidates: dict[str, nn.Module], adapter_name: str,
                  strict: bool = True) -> str:
    """Hand the foreign layout ``found`` (with the ``metadata`` of an in-memory state dict) to its format, on the
    first component it fits."""
    errors = []
    for component, module in candidates.items():
        try:
            formats.load_checkpoint(found.fmt, module, found.files, found.state, adapter_name, strict=strict,
                                    metadata=found.metadata)
        except Exception as err:  # the format left the component as it was; try the next one
            if len(candidates) == 1:
                raise
            errors.append(f"{component}: {err}")
            continue
        return component
    raise io.AdapterFileError(f"{found.what} ({found.fmt.name} format) fits no component of {type(pipe).__name__}:"
                              f"\n  " + "\n  ".join(errors))


def _load_source(pipe, source: Any, candidates: dict[str, nn.Module], adapter_name: str, *,
                 weight_name: str | None, metadata: Mapping[str, str] | None, strict: bool,
                 hub_kwargs: dict[str, Any]) -> str:
    """Attach ``source`` (path, hub id or state dict: :func:`visadapt.hub.read_source`, as
    :func:`visadapt.load_adapter` reads it) as ``adapter_name`` to one of ``candidates``; returns the component's
    name. Every loader below leaves the pipeline as it was when it raises."""
    found = hub.read_source(source, weight_name=weight_name, metadata=metadata, hub_kwargs=hub_kwargs)
    if found.is_visadapt:
        return _load_visadapt(pipe, found, candidates, adapter_name, strict)
    return _load_foreign(pipe, found, candidates, adapter_name, strict)


@contextlib.contextmanager
def _skipping_random_init():
    """diffusers' own ``no_init_weights``: ``torch.nn.init``'s random initialisers do nothing inside, so adapter
    modules are allocated without drawing random numbers their loaded tensors overwrite anyway."""
    from diffusers.models.modeling_utils import no_init_weights

    with no_init_weights():
        yield


def _site_layout(module: nn.Module, adapter_name: str) -> dict[str, tuple[str, dict[str, tuple]]]:
    """``{"host:kind": (module class, {tensor: (shape, dtype)})}`` of one adapter: what a hotswap must keep."""
    layout = {}
    for item in inject.attached(module, adapter_name):
        tensors = {key: (tuple(t.shape), t.dtype) for key, t in item.module.state_dict().items()}
        layout[f"{item.host_path}:{item.kind}"] = (type(item.module).__name__, tensors)
    return layout


def _hotswap_differences(module: nn.Module, loaded: str, incoming: str) -> list[str]:
    """What keeps adapter ``incoming`` from replacing the tensors of ``loaded`` in place (empty: nothing)."""
    old, new = api.get_record(module, loaded), api.get_record(module, incoming)
    if old.plugin.name != new.plugin.name:
        return [f"plugin: loaded {old.plugin.name!r}, new {new.plugin.name!r}"]
    differences = []
    old_config, new_config = old.config.to_dict(), new.config.to_dict()
    for field in sorted(set(old_config) | set(new_config)):
        if old_config.get(field) != new_config.get(field):
            differences.append(f"config {field}: loaded {old_config.get(field)!r}, new {new_config.get(field)!r}")
    if old.head != new.head:
        differences.append(f"head: loaded {old.head!r}, new {new.head!r}")
    old_layout, new_layout = _site_layout(module, loaded), _site_layout(module, incoming)
    differences += [f"site {site}: only in the loaded adapter" for site in sorted(set(old_layout) - set(new_layout))]
    differences += [f"site {site}: only in the new adapter" for site in sorted(set(new_layout) - set(old_layout))]
    for site in sorted(set(old_layout) & set(new_layout)):
        if old_layout[site] != new_layout[site]:
            differences.append(f"site {site}: loaded {old_layout[site]}, new {new_layout[site]}")
    return differences


def _copy_adapter_tensors(module: nn.Module, source: str, target: str) -> None:
    """Copy every tensor of adapter ``source`` into adapter ``target``'s own tensors (same layout, checked)."""
    incoming = {f"{i.host_path}:{i.kind}": i.module for i in inject.attached(module, source)}
    with torch.no_grad():
        for item in inject.attached(module, target):
            new_state = incoming[f"{item.host_path}:{item.kind}"].state_dict()
            for key, tensor in item.module.state_dict(keep_vars=True).items():
                tensor.copy_(new_state[key])


def _hotswap(pipe, adapter_name: str | None, load, init, component: str | None) -> str:
    """``load_visadapt(..., hotswap=True)``: load the new adapter under a scratch name next to the old one,
    check it has the same layout, copy its tensors into the old adapter's modules, drop the scratch one."""
    loaded = _loaded(pipe)
    if adapter_name is None or not any(adapter_name in names for names in loaded.values()):
        have = ", ".join(repr(n) for names in loaded.values() for n in names) or "none"
        raise ValueError(f"hotswap=True replaces the weights of an adapter already loaded, by name: pass "
                         f"adapter_name= one of the loaded visadapt adapters ({have}), or hotswap=False to "
                         f"load a new one")
    ((owner, module, _),) = _owners(pipe, [adapter_name])
    if component is not None and component != owner:
        raise VisadaptPipelineError(f"hotswap=True: adapter {adapter_name!r} is on component {owner!r}, not "
                                    f"component={component!r}")
    if adapter_name in module.__dict__.get(_FUSED_ATTR, {}):
        raise ValueError(f"adapter {adapter_name!r} is fused into the base weights; pipe.unfuse_visadapt() "
                         f"before hotswapping it")
    scratch = f"{adapter_name}__hotswap"
    while scratch in api.records(module):
        scratch += "_"
    with init():
        load({owner: module}, scratch)
    try:
        differences = _hotswap_differences(module, adapter_name, scratch)
        if differences:
            raise VisadaptPipelineError(
                f"hotswap=True: the new adapter does not fit adapter {adapter_name!r} in place (a compiled "
                f"model would need recompiling):\n  " + "\n  ".join(differences[:12])
                + ("\n  ..." if len(differences) > 12 else "")
                + f"\nLoad it under another adapter_name, or unload {adapter_name!r} first")
        _copy_adapter_tensors(module, scratch, adapter_name)
        old, new = api.get_record(module, adapter_name), api.get_record(module, scratch)
        old.load_report, old.metadata = new.load_report, new.metadata
        # the scratch load wrote the new file's head (api.write_head) and kept the head it overwrote; detaching
        # the scratch would put that back and drop the new head. The head from before any load stays with the
        # adapter that keeps running, for its own detach.
        if old.head_before is None:
            old.head_before = new.head_before
        new.head_before = None
    finally:
        api.detach(module, scratch)
    return owner


def _fuse_components(pipe, components: str | Sequence[str] | None, method: str) -> dict[str, nn.Module]:
    """The components a fuse/unfuse call means: all adaptable ones for None, else the named ones (checked)."""
    adaptable = _adaptable_components(pipe)
    if components is None:
        return adaptable
    names = [components] if isinstance(components, str) else list(components)
    loaded = {n for names_ in _loaded(pipe).values() for n in names_}
    if any(name in loaded and name not in adaptable for name in names):
        raise TypeError(f"{method}(components={names!r}): these are adapter names; diffusers' order is "
                        f"{method}(components, ...): pass adapter_names={names!r}")
    unknown = [name for name in names if name not in adaptable]
    if unknown:
        raise ValueError(f"{method}: {', '.join(map(repr, unknown))} is not a component of "
                         f"{type(pipe).__name__} visadapt adapts; adaptable: {', '.join(adaptable) or 'none'}")
    return {name: adaptable[name] for name in names}


class VisadaptLoaderMixin:
    """The methods ``import visadapt`` adds to :class:`diffusers.DiffusionPipeline` (see the module docstring)."""

    def load_visadapt(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, *,
                      hotswap: bool = False, weight: float | None = None, **kwargs: Any):
        """Load a visadapt adapter (or a checkpoint in a registered foreign layout) into the matching component.

        Args:
            pretrained_model_name_or_path_or_dict: a visadapt ``.safetensors`` file; a local folder holding
                ``adapter.safetensors`` or the files of a registered format (``visadapt.formats``); a hub repo id
                with the same content; or a state dict ``{key: tensor}`` that a registered format recognises
                (or, with ``metadata=`` the header of a visadapt file, a visadapt adapter). Resolved by
                :func:`visadapt.hub.read_source`, as :func:`visadapt.load_adapter` does.
            adapter_name: name to load it under; default ``default_<n>`` as diffusers does.
            hotswap: as in ``load_lora_weights``: replace the tensors of the already-loaded adapter
                ``adapter_name`` in place (same module objects, so a ``torch.compile``'d UNet is not
                recompiled). The new file must have the same plugin, config, sites and tensor shapes; otherwise
                the error lists what differs and nothing changes. The adapter keeps its runtime weight and its
                active/disabled state unless ``weight`` is given.
            weight: runtime weight (:func:`visadapt.set_weight`): 0 is the base model (ResAdapter: the weight
                scales its LoRA only, as the official loader's; its norms stay), 1 (the default for a new adapter)
                the adapter as trained.
            weight_name: the file to read inside a folder or hub repo.
            subfolder, cache_dir, revision, local_files_only, token, force_download: as in diffusers'
                ``load_lora_weights`` (hub downloads through ``huggingface_hub.hf_hub_download``).
            proxies: passed to ``hf_hub_download`` where huggingface_hub still takes per-call proxies; the
                installed one (>= 1.0) ignores them, so a hub download with ``proxies`` raises naming the fix
                (``HTTPS_PROXY``). Local paths need no proxy and ignore it.
            low_cpu_mem_usage: build the adapter modules without random initialisation (diffusers'
                ``no_init_weights``) since every tensor is then loaded from the file; the result is identical.
                Needs ``strict=True`` (a non-strict load could leave tensors the file lacks uninitialised).
            use_safetensors: ``None`` / ``True`` only: visadapt reads safetensors files alone (unpickling a
                ``.bin`` can run code); ``False`` is refused with the conversion to run.
            unet_config: diffusers uses it to map kohya SDXL block numbers onto a UNet; visadapt maps keys onto
                the pipeline's own UNet, so only that UNet's config (``pipe.unet.config``) is accepted.
            return_lora_metadata: return ``(adapter_name, metadata)``: the component, plugin, config and file
                metadata of the adapter as loaded (diffusers' ``lora_state_dict`` returns the file's LoRA
                metadata the same way).
            metadata: the header of an in-memory state dict: a visadapt file's header (checked like the file), or
                the header a foreign layout's file carries (diffusers' ``lora_adapter_metadata``), given to the
                format that reads it (``visadapt.formats.load_checkpoint``) and refused where none does.
            component: the pipeline component to load into (``"unet"``); found from the adapter by default.
            strict: ``True`` (default): every key must land, else the error shows the load report (matched,
                missing, unexpected keys and shape mismatches per site). ``False``: load what fits and print the
                report; a load where nothing fits still raises. The report of the load stays on the adapter:
                ``visadapt.load_report(pipe.unet, adapter_name)``.

        Returns the adapter name (with ``return_lora_metadata=True``, the pair above). On any error the pipeline
        is left exactly as it was.
        """
        unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
        if unknown:
            raise TypeError(f"load_visadapt() got unexpected keyword argument(s) {', '.join(unknown)}; it accepts "
                            f"adapter_name, hotswap, weight, {', '.join(_LOAD_KWARGS)}")
        strict = bool(kwargs.get("strict", True))
        low_cpu_mem_usage = bool(kwargs.get("low_cpu_mem_usage", False))
        _check_diffusers_kwargs(self, kwargs, strict)
        hub_kwargs = {k: kwargs[k] for k in hub.HUB_KWARGS if kwargs.get(k) is not None}
        load = functools.partial(_load_source, self, pretrained_model_name_or_path_or_dict,
                                 weight_name=kwargs.get("weight_name"), metadata=kwargs.get("metadata"),
                                 strict=strict, hub_kwargs=hub_kwargs)
        init = _skipping_random_init if low_cpu_mem_usage else contextlib.nullcontext

        if hotswap:
            component = _hotswap(self, adapter_name, load, init, kwargs.get("component"))
        else:
            candidates = _pick_components(self, kwargs.get("component"))
            if adapter_name is None:
                # as diffusers' get_adapter_name: default_<number of adapters there>, skipping names in use by
                # either library on any adaptable component (one namespace: visadapt.peft_compat)
                adapter_name = free_default_name(*_adaptable_components(self).values())
            taken = {name for names in _loaded(self).values() for name in names}
            if adapter_name in taken:
                raise ValueError(f"a visadapt adapter named {adapter_name!r} is already loaded on this pipeline; "
                                 f"unload it (pipe.unload_visadapt({adapter_name!r})), pass another adapter_name, "
                                 f"or hotswap=True to replace its weights in place")
            for module in candidates.values():  # one namespace with diffusers' own LoRAs (visadapt.peft_compat)
                check_name_free_of_peft(module, adapter_name)
            with init():
                component = load(candidates, adapter_name)
            module = _adaptable_components(self)[component]
            disabled = module.__dict__.get(_DISABLED_ATTR)
            if disabled is not None:  # loaded while the pipeline's adapters are disabled: it waits like them
                api.set_active_adapters(module, [n for n in api.active_adapters(module) if n != adapter_name])
                disabled.append(adapter_name)
            weight = None if weight == 1.0 else weight  # a new adapter runs at 1.0 already
        if weight is not None:
            module = _adaptable_components(self)[component]
            try:
                api.set_weight(module, adapter_name, weight)
            except Exception:
                if not hotswap:
                    api.detach(module, adapter_name)
                raise
        if kwargs.get("return_lora_metadata"):
            record = api.get_record(_adaptable_components(self)[component], adapter_name)
            return adapter_name, {"component": component, "plugin": record.plugin.name,
                                  "config": record.config.to_dict(), **record.metadata}
        return adapter_name

    def list_visadapt(self) -> dict[str, list[str]]:
        """``{component name: [adapter names in load order]}``, e.g. ``{"unet": ["default_0", "style"]}``;
        components without visadapt adapters are left out (``{}`` when none is loaded). diffusers' name for this
        is ``get_list_adapters``; :meth:`get_list_visadapt` is the same method."""
        return _loaded(self)

    get_list_visadapt = list_visadapt  # diffusers' name: get_list_adapters

    def get_active_visadapt(self) -> list[str]:
        """The names of the active visadapt adapters (diffusers' ``get_active_adapters``), in load order: all
        loaded ones unless :meth:`set_visadapt_adapters` chose some. As in diffusers, :meth:`disable_visadapt`
        does not change this list (it switches the adapters off without forgetting which were chosen)."""
        active: list[str] = []
        for module in _adaptable_components(self).values():
            disabled = module.__dict__.get(_DISABLED_ATTR)
            names = disabled if disabled is not None else api.active_adapters(module)
            active += [name for name in api.records(module) if name in names]
        return active

    def set_visadapt_adapters(self, adapter_names: str | Sequence[str],
                              adapter_weights: float | Sequence[float] | None = None) -> None:
        """diffusers' ``set_adapters``: ONLY the named adapters run, each at its weight (one number for all, one
        per name, or None for 1.0); the others stay loaded but are switched off until named again."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        _refuse_switching_off_fused(_adaptable_components(self), keeping=names)
        self.set_visadapt_weights(names, adapter_weights)
        for module in _adaptable_components(self).values():
            wanted = [name for name in api.records(module) if name in names]
            if module.__dict__.get(_DISABLED_ATTR) is not None:
                module.__dict__[_DISABLED_ATTR] = wanted
            else:
                api.set_active_adapters(module, wanted)

    def set_visadapt_weights(self, adapter_names: str | Sequence[str],
                             weights: float | Mapping[str, float] | Sequence[float | Mapping[str, float]] | None
                             = None) -> None:
        """Set the runtime weight of each named adapter: ``weights`` is one number for all, one per name, or None
        for 1.0; as in diffusers' ``set_adapters``, a weight may be a dict by component (``{"unet": 0.5}``: the
        entry for the adapter's component, 1.0 when it has none; diffusers' per-block UNet dicts are refused).
        Adapters not named keep their weights and stay active (use :meth:`set_visadapt_adapters`, like
        diffusers' ``set_adapters``, to run only the named ones). Nothing changes when any weight is refused.
        A ResAdapter keeps its norms at weight 0, as the official loader does; :meth:`disable_visadapt` or
        :meth:`set_visadapt_adapters` switch it off entirely."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if weights is None or isinstance(weights, (int, float, Mapping)):
            weights = [1.0 if weights is None else weights] * len(names)
        else:
            weights = list(weights)
            if len(weights) != len(names):
                raise ValueError(f"set_visadapt_weights got {len(names)} adapter names but {len(weights)} weights; "
                                 f"pass one weight per name, or a single number for all")
        by_name = dict(zip(names, weights))
        owners = _owners(self, names)
        fused = [name for _, module, name in owners if name in module.__dict__.get(_FUSED_ATTR, {})]
        if fused:
            raise ValueError(f"adapter {fused[0]!r} is fused into the base weights; pipe.unfuse_visadapt() before "
                             f"changing its weight")
        resolved = {}
        for component, _, name in owners:
            weight = by_name[name]
            if isinstance(weight, Mapping):
                unknown = sorted(set(weight) - set(self.components))
                if unknown:
                    raise ValueError(f"weight of adapter {name!r} names {', '.join(map(repr, unknown))}, not a "
                                     f"component of {type(self).__name__}; its adapter is on {component!r}")
                weight = weight.get(component, 1.0)
                if isinstance(weight, Mapping):
                    raise TypeError(f"weight of adapter {name!r} for {component!r} is a dict (diffusers' per-block "
                                     f"UNet scales); a visadapt adapter takes one number per component")
            resolved[name] = weight
        for _, module, name in owners:
            api.set_weight(module, name, resolved[name])

    def disable_visadapt(self) -> None:
        """diffusers' ``disable_lora`` for visadapt adapters: every component runs as the base model (bit for
        bit: the adapters' hooks are skipped) until :meth:`enable_visadapt`; the adapters stay loaded, with
        their weights and the choice of :meth:`set_visadapt_adapters`. diffusers' own LoRAs are not touched.
        Fused adapters are in the base weights: unfuse them first."""
        modules = _adaptable_components(self)
        _refuse_switching_off_fused(modules)
        for module in modules.values():
            if api.records(module) and module.__dict__.get(_DISABLED_ATTR) is None:
                module.__dict__[_DISABLED_ATTR] = api.active_adapters(module)
                api.set_active_adapters(module, [])

    def enable_visadapt(self) -> None:
        """Undo :meth:`disable_visadapt` (diffusers' ``enable_lora``): the adapters that were active run again."""
        for module in _adaptable_components(self).values():
            disabled = module.__dict__.pop(_DISABLED_ATTR, None)
            if disabled is not None:
                api.set_active_adapters(module, [name for name in disabled if name in api.records(module)])

    def fuse_visadapt(self, components: str | Sequence[str] | None = None, lora_scale: float = 1.0,
                      safe_fusing: bool = False, adapter_names: str | Sequence[str] | None = None) -> None:
        """diffusers' ``fuse_lora``: fold adapters into the base weights of ``components`` (all adaptable ones by
        default), scaled by their weight times ``lora_scale``; inference then costs what the base pipeline costs.

        ``adapter_names``: the adapters to fuse (default: the active ones, as in diffusers). ``safe_fusing``: the
        fused weights are checked for NaN/inf, and if any is not finite everything fused by this call is undone
        and a ``ValueError`` names the adapter (diffusers raises too, but keeps the layers it fused before the
        broken one; here the pipeline is left exactly as it was). fp32 arithmetic; the overwritten weights are
        kept, so :meth:`unfuse_visadapt` restores them bit for bit. Adapters whose method cannot be folded (a
        non-linear module) raise, naming the reason, before anything is fused.
        """
        modules = _fuse_components(self, components, "fuse_visadapt")
        if adapter_names is None:
            owners = [(comp, module, name) for comp, module in modules.items()
                      for name in (module.__dict__.get(_DISABLED_ATTR) is None and api.active_adapters(module) or [])]
            if not owners:
                raise ValueError(f"no active visadapt adapter is loaded on {', '.join(modules) or 'this pipeline'}; "
                                 f"pipe.load_visadapt(...) first (or pipe.enable_visadapt() if disabled)")
        else:
            owners = [owner for owner in _owners(self, adapter_names) if owner[0] in modules]
            if not owners:
                raise ValueError(f"adapter(s) {adapter_names!r} are not on component(s) {', '.join(modules)}")
        for _, module, name in owners:
            record = api.get_record(module, name)
            if not record.plugin.mergeable:
                raise ValueError(f"adapter {name!r} ({record.plugin.name}) cannot be fused: "
                                 f"{record.plugin.merge_refusal}")
            if name in module.__dict__.get(_FUSED_ATTR, {}):
                raise ValueError(f"adapter {name!r} is fused already; pipe.unfuse_visadapt() first to fuse it "
                                 f"again with another lora_scale")
            if module.__dict__.get(_DISABLED_ATTR) is not None or name not in api.active_adapters(module):
                raise ValueError(f"adapter {name!r} is switched off (disable_visadapt / set_visadapt_adapters); "
                                 f"enable it before fusing")
        done: list[tuple[nn.Module, str]] = []
        try:
            for _, module, name in owners:
                before = api.get_weight(module, name)
                if lora_scale != 1.0:
                    api.set_weight(module, name, before * lora_scale)
                api.merge(module, name)
                module.__dict__.setdefault(_FUSED_ATTR, {})[name] = before
                done.append((module, name))
                if safe_fusing:
                    broken = _non_finite_fused_tensor(module, name)
                    if broken:
                        raise ValueError(f"safe_fusing=True: fusing adapter {name!r} gives NaN/inf in {broken}; "
                                         f"the adapter seems broken, nothing was fused")
        except Exception:
            for module, name in reversed(done):
                api.unmerge(module, name)
                api.set_weight(module, name, module.__dict__[_FUSED_ATTR].pop(name))
            raise

    def unfuse_visadapt(self, components: str | Sequence[str] | None = None,
                        adapter_names: str | Sequence[str] | None = None) -> None:
        """diffusers' ``unfuse_lora``: undo :meth:`fuse_visadapt` on ``components`` (all by default), for the
        named adapters or all of them, restoring the base weights bit for bit and the adapters' weights."""
        modules = _fuse_components(self, components, "unfuse_visadapt")
        owners = [owner for owner in _owners(self, adapter_names) if owner[0] in modules]
        for _, module, name in reversed(owners):
            fused = module.__dict__.get(_FUSED_ATTR, {})
            if name not in fused:
                continue
            api.unmerge(module, name)
            api.set_weight(module, name, fused.pop(name))

    def unload_visadapt(self, adapter_name: str | Sequence[str] | None = None) -> None:
        """Remove visadapt adapters (the named ones, or all: diffusers' ``unload_lora_weights``), unfusing them
        first. Once all are gone every tensor of the pipeline equals the original bit for bit; diffusers' own
        LoRAs are not touched."""
        for _, module, name in reversed(_owners(self, adapter_name)):
            module.__dict__.get(_FUSED_ATTR, {}).pop(name, None)
            disabled = module.__dict__.get(_DISABLED_ATTR)
            if disabled is not None and name in disabled:
                disabled.remove(name)
            api.detach(module, name)
            if not api.records(module):
                module.__dict__.pop(_DISABLED_ATTR, None)

    def delete_visadapt(self, adapter_names: str | Sequence[str]) -> None:
        """diffusers' ``delete_adapters``: remove the named visadapt adapters (unfused first); the others keep
        working. Unknown names raise (diffusers skips them silently) and nothing is removed."""
        if adapter_names is None:
            raise TypeError("delete_visadapt needs the adapter names to delete; pipe.unload_visadapt() removes all")
        self.unload_visadapt(adapter_names)

    def save_visadapt(self, adapter_name: str, path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
        """Write adapter ``adapter_name`` to ONE visadapt ``.safetensors`` file, whatever layout it was loaded
        from; a ``path`` not ending in ``.safetensors`` is a folder (created if needed) that gets
        ``adapter.safetensors``, which ``load_visadapt(folder)`` reads back. Returns the path written
        (:func:`visadapt.save_pretrained` on ``pipe.unet`` writes the folder with a model card)."""
        ((_, module, name),) = _owners(self, [adapter_name])
        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
        return io.save_adapter(module, path, name, metadata=metadata)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """diffusers' method, kept safe: when xformers kernels do not run on this pipeline's device (see
        :func:`xformers_usable`), the pipeline keeps PyTorch SDPA attention (diffusers' ``AttnProcessor2_0``)
        and one line says why, instead of an exception now or in the middle of generation."""
        dtype = None
        if attention_op is not None:  # the op decides the dtype it supports, as diffusers' own check does
            dtype = next(iter(attention_op[0].SUPPORTED_DTYPES), None)
        usable, reason = xformers_usable(self.device, dtype or self.dtype)
        if usable:
            _ORIGINAL_METHODS["enable_xformers_memory_efficient_attention"](self, attention_op)
            return
        logger.warning("xformers memory-efficient attention is not usable on %s (%s); using PyTorch SDPA "
                       "attention instead", self.device, reason)
        # diffusers' own way back to SDPA processors (keeps IP-Adapter / custom-diffusion processors' kinds)
        self.disable_xformers_memory_efficient_attention()


# ------------------------------------------------------------------------------------------------ xformers probe

#: diffusers' own probe results, per device and dtype (its reason names the pipeline)
_XFORMERS_PROBES: dict[tuple[str, torch.dtype | None], tuple[bool, str]] = {}


def xformers_usable(device: str | torch.device = "cuda", dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """:func:`visadapt.attention.xformers_usable` as the pipelines use it: ``(True, version)`` when xformers'
    kernels really run on ``device``, else ``(False, reason)``; cached per device and dtype."""
    return _xformers_usable(device, dtype, cache=_XFORMERS_PROBES,
                            not_cuda="diffusers runs xformers attention on CUDA only; this pipeline is on {device}")


# ------------------------------------------------------------------------------------------------ installation

#: the pipeline methods visadapt wraps, as diffusers defined them (filled by :func:`install_methods`)
_ORIGINAL_METHODS: dict[str, Any] = {}
_MIXIN_METHODS = ("load_visadapt", "list_visadapt", "get_list_visadapt", "get_active_visadapt",
                  "set_visadapt_adapters", "set_visadapt_weights", "disable_visadapt", "enable_visadapt",
                  "fuse_visadapt", "unfuse_visadapt", "unload_visadapt", "delete_visadapt",
                  "save_visadapt")
_WRAPPED_METHODS = ("enable_xformers_memory_efficient_attention",)


def install_methods(pipeline_cls: type) -> None:
    """Add :class:`VisadaptLoaderMixin`'s methods to ``pipeline_cls`` (``DiffusionPipeline``); idempotent."""
    for name in _MIXIN_METHODS:
        setattr(pipeline_cls, name, getattr(VisadaptLoaderMixin, name))
    for name in _WRAPPED_METHODS:
        current = pipeline_cls.__dict__.get(name)
        if current is not None and current is not getattr(VisadaptLoaderMixin, name):
            _ORIGINAL_METHODS[name] = current
        setattr(pipeline_cls, name, getattr(VisadaptLoaderMixin, name))


def install() -> None:
    """Make every ``DiffusionPipeline`` have the visadapt methods: now when diffusers' pipelines are imported,
    otherwise as soon as they are (importing them here would add seconds to every ``import visadapt``); the import
    hook is :func:`visadapt.peft_compat.on_import`, shared with the PEFT wrappers."""
    from visadapt.peft_compat import on_import

    def install_on(module) -> None:
        if hasattr(module, "DiffusionPipeline"):
            install_methods(module.DiffusionPipeline)

    on_import(_PIPELINE_MODULE, install_on)
