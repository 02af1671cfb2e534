"""``pipe.load_visadapt``: visadapt adapters on any diffusers pipeline, with diffusers' LoRA-loader verbs.

After ``import visadapt`` every :class:`diffusers.DiffusionPipeline` has the methods of
:class:`VisadaptLoaderMixin`::

    pipe.load_visadapt("resadapter.safetensors")            # file, folder, hub repo id or state dict
    pipe.load_visadapt("org/selma-experts", weight_name="counting.safetensors", adapter_name="count", weight=0.5)
    pipe.set_visadapt_weights(["default_0", "count"], [1.0, 0.7])
    pipe.fuse_visadapt()                                     # fold LoRA-type adapters into the base weights
    pipe.unfuse_visadapt()
    pipe.list_visadapt()                                     # {"unet": ["default_0", "count"]}
    pipe.save_visadapt("count", "count.safetensors")
    pipe.unload_visadapt()                                   # every pipeline tensor is the original again

Names and arguments follow diffusers' LoRA loader mixins (``load_lora_weights(pretrained_model_name_or_path_or_dict,
adapter_name=None, weight_name=..., subfolder=..., cache_dir=..., revision=..., local_files_only=..., token=...)``,
``set_adapters``, ``fuse_lora(adapter_names=None, lora_scale=1.0)``, ``unfuse_lora``), so a diffusers user needs no
new vocabulary. Unlike diffusers, nothing is loaded "successfully" with keys left over: a visadapt file loads
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

import importlib.abc
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt import api, formats, io
from visadapt.attention import xformers_usable as _xformers_usable
from visadapt.peft_compat import check_name_free_of_peft, peft_adapter_names
from visadapt.sites import UnsupportedModelError, fingerprint, model_family

logger = logging.getLogger(__name__)

#: the file name visadapt writes into a folder (:func:`visadapt.io.save_adapter` given a directory)
ADAPTER_FILE_NAME = "adapter.safetensors"
_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"
_FUSED_ATTR = "_visadapt_fused_weights"  # on a component: {adapter name: its weight before fuse_visadapt}
_HUB_KWARGS = ("cache_dir", "revision", "subfolder", "local_files_only", "token", "force_download")
_LOAD_KWARGS = ("weight_name", "metadata", "component", "strict") + _HUB_KWARGS


class VisadaptPipelineError(ValueError):
    """A pipeline-level request cannot be met: no component fits the adapter, an unknown adapter name, ..."""


# --------------------------------------------------------------------------------------------- resolving input


def _looks_like_path(value: str) -> bool:
    """A string that names a file or folder rather than a hub repo id (``org/name`` has one slash, no suffix)."""
    if os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in value:
        return True
    return value.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))


def _single_file(path: Path) -> tuple[str, dict[str, Path]]:
    """``("visadapt", {name: path})`` for a visadapt file, ``("foreign", {name: path})`` otherwise.

    Pickles and other non-safetensors files are refused here, unopened (:func:`visadapt.io._check_is_safetensors`).
    """
    meta = io.read_safetensors_metadata(path)
    kind = "visadapt" if meta.get("format") == io.FORMAT else "foreign"
    return kind, {path.name: path}


def _folder_files(folder: Path, weight_name: str | None) -> tuple[str, dict[str, Path]]:
    """What to load from a local folder: ``weight_name`` when given; else ``adapter.safetensors``; else the files
    of the registered formats that are present; else the folder's only ``.safetensors`` file."""
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise io.AdapterFileError(f"weight_name={weight_name!r} does not exist in {folder} (it holds: {present})")
        return _single_file(path)
    if (folder / ADAPTER_FILE_NAME).is_file():
        return _single_file(folder / ADAPTER_FILE_NAME)
    found = {name: folder / name for name in formats.known_file_names() if (folder / name).is_file()}
    if found:
        return "foreign", found
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return _single_file(candidates[0])
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    looked_for = ", ".join([ADAPTER_FILE_NAME, *formats.known_file_names()])
    raise io.AdapterFileError(
        f"folder {folder} holds no adapter file visadapt recognises (looked for {looked_for}; it holds: {present}); "
        f"pass weight_name='<file>.safetensors' to pick one")


def _hub_download(repo_id: str, filename: str, hub_kwargs: dict[str, Any]) -> Path | None:
    """The local path of ``filename`` of hub repo ``repo_id`` (downloaded or from the cache), None when the repo
    has no such file; raises a clear error when the repo itself cannot be found or reached."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    remote_missing = tuple(c for c in (getattr(hub_errors, "RemoteEntryNotFoundError", None),
                                       hub_errors.EntryNotFoundError) if c is not None)
    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    except hub_errors.LocalEntryNotFoundError:
        raise  # decided by the caller, which knows every file it tried
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as err:
        what = (f"revision {hub_kwargs.get('revision')!r} of " if isinstance(err, hub_errors.RevisionNotFoundError)
                else "")
        raise io.AdapterFileError(
            f"{what}hub repo {repo_id!r} was not found (nor is {repo_id!r} a local file or folder); check the "
            f"name, or pass token=... for a private or gated repo") from err
    except remote_missing:
        return None


def _hub_files(repo_id: str, weight_name: str | None, hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Path]]:
    """Like :func:`_folder_files` for a hub repo: only the files that might be needed are fetched."""
    from huggingface_hub import errors as hub_errors

    names = [weight_name] if weight_name else [ADAPTER_FILE_NAME, *formats.known_file_names()]
    found: dict[str, Path] = {}
    not_cached: list[str] = []
    for name in names:
        try:
            path = _hub_download(repo_id, name, hub_kwargs)
        except hub_errors.LocalEntryNotFoundError:
            not_cached.append(name)
            continue
        if path is None:
            continue
        if weight_name or name == ADAPTER_FILE_NAME:
            return _single_file(path)
        found[name] = path
    if found:
        return "foreign", found
    where = f" under subfolder {hub_kwargs['subfolder']!r}" if hub_kwargs.get("subfolder") else ""
    if not_cached:
        from huggingface_hub import constants

        cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
        why = ("local_files_only=True" if hub_kwargs.get("local_files_only") else
               "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached")
        raise io.AdapterFileError(
            f"hub repo {repo_id!r} was not found in the local cache ({cache}){where}, and {why}: none of "
            f"{', '.join(not_cached)} is cached. Fix: run once with network access (or `hf download {repo_id}`) "
            f"to fill the cache, pass cache_dir= where it was downloaded, or pass the path of a local file or "
            f"folder instead of a repo id")
    raise io.AdapterFileError(
        f"hub repo {repo_id!r}{where} holds none of the files visadapt reads ({', '.join(names)}); "
        f"pass weight_name='<file>.safetensors' to pick its adapter file")


def _resolve(source: Any, weight_name: str | None, hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Path]]:
    """``(kind, files)`` for a path or hub id; kind is "visadapt" (one visadapt file) or "foreign"."""
    path = Path(os.path.expanduser(os.fspath(source)))
    if hub_kwargs.get("subfolder") and path.is_dir():
        path = path / hub_kwargs["subfolder"]
    if path.is_dir():
        return _folder_files(path, weight_name)
    if path.is_file():
        if weight_name is not None:
            raise TypeError(f"weight_name={weight_name!r} picks a file inside a folder or hub repo; {path} is a "
                            f"file already: drop weight_name")
        return _single_file(path)
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        raise io.AdapterFileError(f"adapter path {str(source)!r} does not exist (neither a file nor a folder)")
    return _hub_files(str(source), weight_name, hub_kwargs)


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


def _default_adapter_name(pipe) -> str:
    # as diffusers' get_adapter_name: default_<number of adapters already there>, skipping names in use, also
    # those of diffusers' own LoRAs (one namespace: visadapt.peft_compat)
    taken = {name for names in _loaded(pipe).values() for name in names}
    taken |= {name for module in _adaptable_components(pipe).values() for name in peft_adapter_names(module)}
    index = len(taken)
    while f"default_{index}" in taken:
        index += 1
    return f"default_{index}"


# ------------------------------------------------------------------------------------------------ loading


def _load_visadapt_file(pipe, path: Path, candidates: dict[str, nn.Module], adapter_name: str,
                        strict: bool = True, contents: tuple[dict, dict] | None = None) -> str:
    """Attach the adapter of visadapt file ``path`` (or of ``contents``: its tensors and metadata already in
    memory, ``path`` then only names them) to the one candidate component its base model matches."""
    meta = contents[1] if contents is not None else io.read_adapter_metadata(path)
    fits = {}
    for name, module in candidates.items():
        try:
            io.check_base_model(module, meta, path)
        except io.AdapterFileError:
            continue
        fits[name] = module
    if not fits:
        saved = io._describe(json.loads(meta["base_model"]))
        raise io.AdapterFileError(
            f"adapter file {path} ({meta.get('plugin')}) was trained for {saved}; no component of this "
            f"{type(pipe).__name__} has that architecture: {_component_summary(pipe)}. An adapter only loads on "
            f"the base model it was trained for (an SDXL adapter does not fit an SD1.5 pipeline): use the adapter "
            f"trained for this pipeline's base model")
    if len(fits) > 1:
        raise VisadaptPipelineError(f"adapter file {path} fits several components ({', '.join(fits)}); pass "
                                    f"component='<name>' to choose")
    (component, module), = fits.items()
    if contents is None:
        io.load_adapter(module, path, adapter_name, strict=strict)
    else:
        io.load_adapter_tensors(module, contents[0], contents[1], adapter_name, source=str(path), strict=strict)
    return component


def _load_foreign(pipe, files: Mapping[str, Path], state: Mapping[str, torch.Tensor] | None,
                  candidates: dict[str, nn.Module], adapter_name: str, what: str, strict: bool = True) -> str:
    """Hand ``files`` / ``state`` to the registered format that recognises them, on the first component it fits."""
    fmt = formats.find_format(files, state)
    if fmt is None:
        known = ", ".join(formats.list_formats()) or "none"
        raise io.AdapterFileError(
            f"{what} is neither a visadapt adapter (no visadapt metadata) nor a layout any registered checkpoint "
            f"format recognises (registered formats: {known}); save it with visadapt.save_adapter, or pass the "
            f"visadapt header as metadata= for an in-memory state dict")
    errors = []
    for component, module in candidates.items():
        try:
            fmt.load(module, files, state, adapter_name, strict=strict)
        except Exception as err:  # the format left the component as it was; try the next one
            if len(candidates) == 1:
                raise
            errors.append(f"{component}: {err}")
            continue
        return component
    raise io.AdapterFileError(f"{what} ({fmt.name} format) fits no component of {type(pipe).__name__}:\n  "
                              + "\n  ".join(errors))


def _load_visadapt_state(pipe, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                         candidates: dict[str, nn.Module], adapter_name: str, strict: bool = True) -> str:
    """An in-memory visadapt adapter (tensors plus the header metadata of its file), checked like a file:
    checksum, base model, site widths (:func:`visadapt.io.load_adapter_tensors`)."""
    tensors = {str(key): value for key, value in state.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    return _load_visadapt_file(pipe, Path(f"the state dict given ({len(tensors)} tensors)"), candidates, adapter_name,
                               strict=strict, contents=(tensors, meta))


class VisadaptLoaderMixin:
    """The methods ``import visadapt`` adds to :class:`diffusers.DiffusionPipeline` (see the module docstring)."""

    def load_visadapt(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                      weight: float = 1.0, **kwargs: Any) -> str:
        """Load a visadapt adapter (or a checkpoint in a registered foreign layout) into the matching component.

        Args:
            pretrained_model_name_or_path_or_dict: a visadapt ``.safetensors`` file; a local folder holding
                ``adapter.safetensors`` or the files of a registered format (``visadapt.formats``); a hub repo id
                with the same content; or a state dict ``{key: tensor}`` that a registered format recognises
                (or, with ``metadata=`` the header of a visadapt file, a visadapt adapter).
            adapter_name: name to load it under; default ``default_<n>`` as diffusers does.
            weight: runtime weight (:func:`visadapt.set_weight`): 0 is the base model (ResAdapter: the weight
                scales its LoRA only, as the official loader's; its norms stay), 1 the adapter as trained.
            weight_name: the file to read inside a folder or hub repo.
            subfolder, cache_dir, revision, local_files_only, token, force_download: as in diffusers'
                ``load_lora_weights`` (hub downloads through ``huggingface_hub.hf_hub_download``).
            metadata: the visadapt header metadata of an in-memory state dict.
            component: the pipeline component to load into (``"unet"``); found from the adapter by default.
            strict: ``True`` (default): every key must land, else the error shows the load report (matched,
                missing, unexpected keys and shape mismatches per site). ``False``: load what fits and print the
                report; a load where nothing fits still raises. The report of the load stays on the adapter:
                ``visadapt.load_report(pipe.unet, adapter_name)``.

        Returns the adapter name. On any error the pipeline is left exactly as it was.
        """
        unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
        if unknown:
            raise TypeError(f"load_visadapt() got unexpected keyword argument(s) {', '.join(unknown)}; it accepts "
                            f"adapter_name, weight, {', '.join(_LOAD_KWARGS)}")
        weight_name = kwargs.get("weight_name")
        metadata = kwargs.get("metadata")
        strict = bool(kwargs.get("strict", True))
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        candidates = _pick_components(self, kwargs.get("component"))

        if adapter_name is None:
            adapter_name = _default_adapter_name(self)
        taken = {name for names in _loaded(self).values() for name in names}
        if adapter_name in taken:
            raise ValueError(f"a visadapt adapter named {adapter_name!r} is already loaded on this pipeline; "
                             f"unload it (pipe.unload_visadapt({adapter_name!r})) or pass another adapter_name")
        for module in candidates.values():  # one namespace with diffusers' own LoRAs (visadapt.peft_compat)
            check_name_free_of_peft(module, adapter_name)

        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            if weight_name is not None:
                raise TypeError("weight_name picks a file in a folder or hub repo; a state dict was given")
            if metadata is not None and metadata.get("format") == io.FORMAT:
                component = _load_visadapt_state(self, source, metadata, candidates, adapter_name, strict)
            else:
                component = _load_foreign(self, {}, source, candidates, adapter_name,
                                          f"the state dict given ({len(source)} tensors)", strict)
        elif isinstance(source, (str, os.PathLike)):
            if metadata is not None:
                raise TypeError("metadata= describes an in-memory state dict; files carry their own metadata")
            kind, files = _resolve(source, weight_name, hub_kwargs)
            if kind == "visadapt":
                (path,) = files.values()
                component = _load_visadapt_file(self, path, candidates, adapter_name, strict)
            else:
                what = ", ".join(str(p) for p in files.values())
                component = _load_foreign(self, files, None, candidates, adapter_name, what, strict)
        else:
            raise TypeError(f"load_visadapt takes a file or folder path, a hub repo id or a state dict, not "
                            f"{type(source).__name__}")

        if weight != 1.0:
            module = _adaptable_components(self)[component]
            try:
                api.set_weight(module, adapter_name, weight)
            except Exception:
                api.detach(module, adapter_name)
                raise
        return adapter_name

    def list_visadapt(self) -> dict[str, list[str]]:
        """``{component name: [adapter names in load order]}``, e.g. ``{"unet": ["default_0", "style"]}``;
        components without visadapt adapters are left out (``{}`` when none is loaded)."""
        return _loaded(self)

    def set_visadapt_weights(self, adapter_names: str | Sequence[str],
                             weights: float | Sequence[float] | None = None) -> None:
        """Set the runtime weight of each named adapter (``set_adapters``-style): ``weights`` is one number for
        all, one per name, or None for 1.0. Adapters not named keep their weights (unlike diffusers'
        ``set_adapters``, this does not switch the others off: set their weight to 0 for that; a ResAdapter keeps
        its norms at weight 0, as the official loader does: :func:`visadapt.set_active_adapters` switches it off)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float)):
            weights = [float(weights)] * len(names)
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
        for _, module, name in owners:
            api.set_weight(module, name, by_name[name])

    def fuse_visadapt(self, adapter_names: str | Sequence[str] | None = None, lora_scale: float = 1.0) -> None:
        """Fold adapters (all when ``adapter_names`` is None) into the base weights, scaled by their weight times
        ``lora_scale``; inference then costs what the base pipeline costs. fp32 arithmetic; the overwritten
        weights are kept, so :meth:`unfuse_visadapt` restores them bit for bit. Adapters whose method cannot be
        folded (a non-linear module) raise, naming the reason, before anything is fused."""
        owners = _owners(self, adapter_names)
        if not owners:
            raise ValueError("no visadapt adapter is loaded on this pipeline; pipe.load_visadapt(...) first")
        for _, module, name in owners:
            record = api.get_record(module, name)
            if not record.plugin.mergeable:
                raise ValueError(f"adapter {name!r} ({record.plugin.name}) cannot be fused: "
                                 f"{record.plugin.merge_refusal}")
            if name in module.__dict__.get(_FUSED_ATTR, {}):
                raise ValueError(f"adapter {name!r} is fused already; pipe.unfuse_visadapt() first to fuse it "
                                 f"again with another lora_scale")
        for _, module, name in owners:
            before = api.get_weight(module, name)
            if lora_scale != 1.0:
                api.set_weight(module, name, before * lora_scale)
            api.merge(module, name)
            module.__dict__.setdefault(_FUSED_ATTR, {})[name] = before

    def unfuse_visadapt(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Undo :meth:`fuse_visadapt` (for the named adapters, or all), restoring the base weights bit for bit
        and the adapters' weights as they were before fusing."""
        owners = _owners(self, adapter_names)
        for _, module, name in reversed(owners):
            fused = module.__dict__.get(_FUSED_ATTR, {})
            if name not in fused:
                continue
            api.unmerge(module, name)
            api.set_weight(module, name, fused.pop(name))

    def unload_visadapt(self, adapter_name: str | Sequence[str] | None = None) -> None:
        """Remove visadapt adapters (the named ones, or all), unfusing them first. Once all are gone every
        tensor of the pipeline equals the original bit for bit; diffusers' own LoRAs are not touched."""
        for _, module, name in reversed(_owners(self, adapter_name)):
            module.__dict__.get(_FUSED_ATTR, {}).pop(name, None)
            api.detach(module, name)

    def save_visadapt(self, adapter_name: str, path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
        """Write adapter ``adapter_name`` to ONE visadapt ``.safetensors`` file, whatever layout it was loaded
        from; a ``path`` not ending in ``.safetensors`` is a folder (created if needed) that gets
        ``adapter.safetensors``, which ``load_visadapt(folder)`` reads back. Returns the path written."""
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
_MIXIN_METHODS = ("load_visadapt", "list_visadapt", "set_visadapt_weights", "fuse_visadapt", "unfuse_visadapt",
                  "unload_visadapt", "save_visadapt")
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


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Adds the methods to ``DiffusionPipeline`` right after diffusers defines it (one shot)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PIPELINE_MODULE:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:  # whoever would have found it (site-packages, an editable install, ...)
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            install_methods(module.DiffusionPipeline)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Make every ``DiffusionPipeline`` have the visadapt methods: now when diffusers' pipelines are imported,
    otherwise as soon as they are (importing them here would add seconds to every ``import visadapt``)."""
    module = sys.modules.get(_PIPELINE_MODULE)
    if module is not None and hasattr(module, "DiffusionPipeline"):
        install_methods(module.DiffusionPipeline)
    elif not any(isinstance(finder, _InstallOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallOnImport())
