"""LoRA files in the layouts users meet, read as their producer reads them, attached as visadapt ``lora`` adapters,
and written back in the layout diffusers' ``pipe.load_lora_weights`` reads.

The ``diffusers_lora`` format (:class:`DiffusersLoraFormat`, :func:`attach_lora_state`) reads a LoRA file the way
``pipe.load_lora_weights`` does, through diffusers' and PEFT's own functions (:func:`read_diffusers_lora`): kohya
keys through ``_maybe_map_sgm_blocks_to_diffusers`` (SDXL ``input_blocks`` / ``middle_block`` / ``output_blocks``
names, given the UNet's config) and ``_convert_non_diffusers_lora_to_diffusers``; older names through
``convert_unet_state_dict_to_peft``; the config from the file's ``lora_adapter_metadata`` header (what
``save_lora_weights(..., unet_lora_adapter_metadata=LoraConfig(...).to_dict())`` writes) or, without one, from
diffusers' ``get_peft_kwargs`` (ranks, kohya ``.alpha`` tensors); each module's rank and alpha through PEFT's
``get_pattern_key`` (regex keys, first match wins); ``use_rslora`` kept. The visadapt config then holds explicit full
module paths. Layouts (the module path is the diffusers UNet's, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):

==========================  ==========================================================================================
PEFT / diffusers            ``[unet.]<path>.lora_A.weight``, ``[unet.]<path>.lora_B.weight``; visadapt also reads
                            ``[unet.]<path>.alpha`` scalars (diffusers refuses such keys)
older diffusers             ``[unet.]<path>.lora.down.weight`` / ``.lora.up.weight`` (LoRA-compatible layers) and
                            ``<path>.lora_linear_layer.down.weight`` / ``.up.weight``
diffusers attn-procs        ``<attention path>.processor.to_q_lora.down.weight`` / ``.up.weight`` (also ``to_k``,
                            ``to_v``, ``to_out`` -> ``to_out.0``), as ``unet.save_attn_procs`` wrote them
kohya (sd-scripts)          ``lora_unet_<path with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, in
                            diffusers naming (SD 1.x, ResAdapter's release) or SDXL's original naming
                            (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)
==========================  ==========================================================================================

PEFT ``save_pretrained`` folders (``adapter_config.json``) are the ``peft`` format (:mod:`visadapt.peft_format`).
Refused with the reason: DoRA (``dora_scale``, ``lora_magnitude_vector``, ``use_dora``), LoRA biases and the other
options :func:`visadapt.peft_format.check_lora_config` lists. Text-encoder entries (``text_encoder.`` /
``text_encoder_2.``, kohya ``lora_te*_``) are reported, not dropped: visadapt adapts the UNet.

:func:`read_lora_state` is the older hand-written key table, kept for layouts with more to them than a LoRA
(ResAdapter's release, whose kohya names it resolves exactly against the model).

Scaling: the delta of one module is ``(alpha / rank) * up @ down`` (``alpha / sqrt(rank)`` with rsLoRA). Conv LoRA
has a ``down`` convolution with the base's kernel (``(r, in, kh, kw)``, same stride and padding) and a 1x1 ``up``
(``(out, r, 1, 1)``), exactly :class:`visadapt.layers.LoRA` on a ``Conv2d``.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from visadapt import api, inject
from visadapt.formats import CheckpointFormat, register_format
from visadapt.load_report import MATCHED, MISMATCHED, UNEXPECTED, AdapterLoadError, LoadReport

#: the text-encoder components a LoRA file may also hold, by key prefix
TEXT_ENCODER_PREFIXES = {"text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_TEXT_PREFIXES = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}

# diffusers / transformers module names that contain an underscore: kohya writes every "." as "_", so a
# kohya name is split back at "_" except inside these (longest first), and digits are always their own segment
_COMPOUND_NAMES = sorted([
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "class_embedding", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "add_k_proj", "add_v_proj",
    "norm_out", "text_projection", "conv_act",
], key=lambda name: -name.count("_"))


@dataclasses.dataclass
class LoraWeights:
    """One module's LoRA: ``down`` ``(r, in)`` or ``(r, in, kh, kw)``, ``up`` ``(out, r)`` or ``(out, r, 1, 1)``,
    ``alpha`` (None when the file has none: then ``alpha = r``)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    #: the state-dict keys this module was read from (for load reports)
    keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta_weight(self) -> torch.Tensor:
        """``scaling * up @ down`` in fp32, shaped like the base weight: ``(out, in)`` or ``(out, in, kh, kw)``."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 4:
            return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scaling
        return (up @ down) * self.scaling


class LoraStateDict(dict):
    """``{UNet module path: LoraWeights}``, plus ``text_encoder``: ``{component: {module path: LoraWeights}}``
    for entries that target a text encoder (``text_encoder``, ``text_encoder_2``), and ``layout``: the name of
    the layout the keys were in (``peft``, ``diffusers_old``, ``attn_procs``, ``kohya``; ``+``-joined if mixed)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text_encoder: dict[str, dict[str, LoraWeights]] = {}
        self.layout = ""


class LoraLayoutError(AdapterLoadError):
    """Keys of a LoRA state dict fit no known layout, or tensors do not fit the model (``report``: the
    :class:`~visadapt.load_report.LoadReport` when the error comes from a load)."""


# (regex on the key, role); the "path" group is the module path in diffusers' naming
_PEFT = re.compile(r"^(?P<path>.+)\.lora_(?P<role>A|B)(?:\.[A-Za-z_][A-Za-z0-9_]*)?\.weight$")
_OLD = re.compile(r"^(?P<path>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$")
_PROC = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_KOHYA = re.compile(r"^(?P<name>lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+?)\.(?:lora_(?P<role>down|up)\.weight|alpha)$")
_ALPHA = re.compile(r"^(?P<path>.+)\.alpha$")


def kohya_to_module_path(name: str, module_names: Iterable[str] | None = None) -> str:
    """The dotted module path of a kohya name without its ``lora_unet_`` / ``lora_te*_`` prefix,
    e.g. ``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.

    With ``module_names`` (the model's) the path is looked up exactly; otherwise it is rebuilt from diffusers'
    naming (digits are their own segment, known names such as ``to_q``, ``proj_in``, ``time_emb_proj`` keep
    their underscores). Raises ``LoraLayoutError`` when the lookup finds no module.
    """
    if module_names is not None:
        by_flat = (module_names if isinstance(module_names, Mapping)
                   else {path.replace(".", "_"): path for path in module_names})
        if name not in by_flat:
            raise LoraLayoutError(f"kohya LoRA name {name!r} names no module of this model (dots written as '_')")
        return by_flat[name]
    tokens = name.split("_")
    segments, i = [], 0
    while i < len(tokens):
        for compound in _COMPOUND_NAMES:
            parts = compound.split("_")
            if tokens[i:i + len(parts)] == parts:
                segments.append(compound)
                i += len(parts)
                break
        else:
            segments.append(tokens[i])
            i += 1
    return ".".join(segments)


def _component(key: str) -> tuple[str, str]:
    """``(component, key without its component prefix)``: "unet", "text_encoder" or "text_encoder_2"."""
    key = key.removeprefix("base_model.model.")
    for prefix, component in TEXT_ENCODER_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    if key.startswith("unet."):
        return "unet", key[len("unet."):]
    return "unet", key


def read_lora_state(state: Mapping[str, torch.Tensor], *, module_names: Iterable[str] | None = None,
                    report: LoadReport | None = None) -> LoraStateDict:
    """Read a LoRA state dict in any layout of the module docstring into ``{module path: LoraWeights}``.

    ``state``: tensors by key, as from ``safetensors.torch.load_file``. ``module_names``: the UNet's module
    paths, to resolve kohya names exactly (without it they are rebuilt from diffusers' naming). Text-encoder
    entries land in ``result.text_encoder``. Raises :class:`LoraLayoutError` listing every key that fits no
    layout, every module with a ``down`` but no ``up`` (or the reverse), and ranks that disagree; with a
    ``report`` those keys are recorded in it as unexpected instead (the caller enforces it).
    """
    parts: dict[tuple[str, str], dict[str, object]] = {}
    layouts: dict[str, None] = {}
    unknown: list[str] = []
    # kohya names resolved against the model: {path with "_" for ".": path}, built once
    flat_names = {path.replace(".", "_"): path for path in module_names} if module_names is not None else None

    def put(component: str, path: str, role: str, value, key: str, layout: str) -> None:
        entry = parts.setdefault((component, path), {})
        if role in entry:
            raise LoraLayoutError(f"LoRA key {key!r} repeats the {role} of module {path!r} ({component}); the "
                                  f"state dict mixes two copies of one module")
        entry[role] = value
        entry.setdefault("keys", []).append(key)
        layouts[layout] = None

    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise LoraLayoutError(f"LoRA state dict value of {key!r} is a {type(tensor).__name__}, not a tensor")
        match = _KOHYA.match(key)
        if match:
            name = match.group("name")
            prefix = next(p for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_") if name.startswith(p))
            component = "unet" if prefix == "lora_unet_" else KOHYA_TEXT_PREFIXES[prefix]
            try:
                path = kohya_to_module_path(name[len(prefix):], flat_names if component == "unet" else None)
            except LoraLayoutError:
                unknown.append(key)
                continue
            role = {"down": "down", "up": "up", None: "alpha"}[match.group("role")]
            put(component, path, role, tensor if role != "alpha" else float(tensor.item()), key, "kohya")
            continue
        component, rest = _component(key)
        for regex, layout in ((_PEFT, "peft"), (_OLD, "diffusers_old")):
            match = regex.match(rest)
            if match:
                role = {"A": "down", "B": "up"}.get(match.group("role"), match.group("role"))
                put(component, match.group("path"), role, tensor, key, layout)
                break
        else:
            match = _PROC.match(rest)
            if match:
                proj = "to_out.0" if match.group("proj") == "to_out" else match.group("proj")
                put(component, f"{match.group('attn')}.{proj}", match.group("role"), tensor, key, "attn_procs")
                continue
            match = _ALPHA.match(rest)
            if match and tensor.numel() == 1:
                put(component, match.group("path"), "alpha", float(tensor.item()), key, "peft")
                continue
            unknown.append(key)
    if unknown and report is not None:
        for key in unknown:
            report.add("(no LoRA layout)", key, UNEXPECTED, "fits no LoRA layout visadapt reads")
    elif unknown:
        shown = "\n  ".join(unknown[:20]) + (f"\n  ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise LoraLayoutError(
            f"{len(unknown)} of {len(state)} keys fit no LoRA layout visadapt reads (PEFT/diffusers lora_A/lora_B, "
            f"older diffusers lora.down/lora.up, attn-procs processor.to_q_lora, kohya lora_unet_*.lora_down):\n  "
            f"{shown}\nremove them, or convert the file to one of these layouts")

    result = LoraStateDict()
    result.layout = "+".join(layouts)
    problems = []

    def problem(entry: dict, component: str, path: str, message: str) -> None:
        if report is None:
            problems.append(f"{component} module {path!r}{message}")
        else:
            for key in entry["keys"]:
                report.add(path, key, UNEXPECTED, message.lstrip(": "))

    for (component, path), entry in parts.items():
        if "down" not in entry or "up" not in entry:
            have = ", ".join(sorted(r for r in entry if r != "keys"))
            problem(entry, component, path, f" has {have} but needs both down (lora_A) and up (lora_B)")
            continue
        down, up = entry["down"], entry["up"]
        conv = down.dim() == 4
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or (
                conv and tuple(up.shape[2:]) != (1, 1)):
            problem(entry, component, path, f": down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                                             f"a LoRA pair (down (r, in[, kh, kw]), up (out, r[, 1, 1]))")
            continue
        weights = LoraWeights(down, up, entry.get("alpha"), tuple(entry["keys"]))
        if component == "unet":
            result[path] = weights
        else:
            result.text_encoder.setdefault(component, {})[path] = weights
    if problems:
        raise LoraLayoutError("LoRA state dict is incomplete:\n  " + "\n  ".join(problems))
    if not result and not result.text_encoder and report is None:
        raise LoraLayoutError("the LoRA state dict holds no LoRA tensors (it is empty)")
    return result


def report_text_encoder(loras: LoraStateDict, report: LoadReport, detail: str) -> None:
    """Record every text-encoder key of ``loras`` in ``report`` as unexpected, with ``detail`` saying why."""
    for component, modules in loras.text_encoder.items():
        for path, weights in modules.items():
            for key in weights.keys or (f"{component}.{path}",):
                report.add(f"{component}.{path}", key, UNEXPECTED, detail)


def fitting_loras(model: nn.Module, loras: Mapping[str, LoraWeights], report: LoadReport) -> dict[str, LoraWeights]:
    """The LoRAs of ``loras`` whose module exists in ``model`` as a Linear / Conv2d of a fitting shape (``down``
    ``(r, in[, kh, kw])`` against the weight's input side, ``up`` ``(out, r[, 1, 1])`` against its output side);
    every module is recorded in ``report`` by its file keys: matched, unexpected (no such module, or not a layer
    LoRA applies to) or a shape mismatch naming both shapes.

    Paths are canonical (:func:`visadapt.peft_compat.named_layers`): a layer PEFT has wrapped (``pipe.load_lora_weights``
    before, adapters left by ``delete_adapters``) is found under its own path as the real layer under the wrapper."""
    from visadapt.peft_compat import named_layers

    modules = dict(named_layers(model))
    fits = {}
    for path, weights in loras.items():
        keys = weights.keys or (f"{path}.lora_down", f"{path}.lora_up")
        host = modules.get(path)
        if not isinstance(host, (nn.Linear, nn.Conv2d)):
            what = "this model has no such module" if host is None else f"a {type(host).__name__}, not Linear/Conv2d"
            for key in keys:
                report.add(path, key, UNEXPECTED, what)
            continue
        weight = host.weight
        if tuple(weights.down.shape[1:]) != tuple(weight.shape[1:]) or weights.up.shape[0] != weight.shape[0] or (
                weights.down.dim() != weight.dim()):
            detail = (f"file down {tuple(weights.down.shape)} / up {tuple(weights.up.shape)} vs model weight "
                      f"{tuple(weight.shape)}")
            for key in keys:
                report.add(path, key, MISMATCHED, detail)
            continue
        for key in keys:
            report.add(path, key, MATCHED)
        fits[path] = weights
    return fits


# the suffixes a kohya (sd-scripts) LoRA module writes; "dora_scale" is DoRA, which visadapt cannot represent
_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# diffusers' UNet key conversion lacks the older LoRA-compatible layer names; these two are its DIFFUSERS_OLD_TO_PEFT
_LINEAR_LAYER_TO_PEFT = {".lora_linear_layer.up": ".lora_B", ".lora_linear_layer.down": ".lora_A"}
_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<role>A|B)\.weight$")


@dataclasses.dataclass
class DiffusersLora:
    """A LoRA state dict read as diffusers' ``load_lora_weights`` reads it: ``loras`` ``{UNet module path:
    LoraWeights}`` with each module's alpha resolved as PEFT resolves it (``alpha`` is never None here), and
    ``use_rslora``."""

    loras: dict[str, LoraWeights]
    use_rslora: bool


def _convert_kohya(keys: list[str], state: Mapping[str, torch.Tensor], unet: nn.Module,
                   report: LoadReport) -> tuple[dict[str, str], dict[str, float], set[str]]:
    """kohya keys through diffusers' own converters: ``({diffusers key: original key}, network_alphas, the alpha
    keys handed to the converter)``.

    ``_maybe_map_sgm_blocks_to_diffusers`` (SDXL ``input_blocks`` / ``middle_block`` / ``output_blocks`` names,
    given the UNet's config) and ``_convert_non_diffusers_lora_to_diffusers``, exactly as
    ``StableDiffusionXLLoraLoaderMixin.lora_state_dict(..., unet_config=unet.config)`` calls them. The converters
    move values without looking at them (except ``.alpha``), so they are given each key's own name as its value:
    every converted key then names the file key it came from, for the load report. Groups diffusers would fail
    on (a down without its up, unknown suffixes) are reported per key first instead of one ValueError.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = key
    tagged: dict[str, object] = {}
    for name, parts in groups.items():
        if "dora_scale" in parts:
            raise LoraLayoutError(f"{report.source}: key {parts['dora_scale']!r} is a DoRA magnitude (dora_scale); "
                                  f"visadapt loads plain LoRA only and will not drop it (that would change the "
                                  f"model): load this file with pipe.load_lora_weights")
        complete = "lora_down.weight" in parts and "lora_up.weight" in parts
        for suffix, key in parts.items():
            if suffix not in _KOHYA_SUFFIXES:
                report.add(name, key, UNEXPECTED, "not a kohya LoRA tensor (lora_down.weight, lora_up.weight, alpha)")
            elif not complete:
                report.add(name, key, UNEXPECTED, "a kohya LoRA needs both lora_down.weight and lora_up.weight")
            elif suffix == "alpha" and state[key].numel() != 1:
                report.add(name, key, MISMATCHED, f"an alpha is one number, this is {tuple(state[key].shape)}")
            else:
                tagged[key] = state[key] if suffix == "alpha" else key
    alpha_keys = {key for key in tagged if key.endswith(".alpha")}
    if not tagged:
        return {}, {}, alpha_keys
    config = getattr(unet, "config", None)
    try:
        if config is not None and hasattr(config, "layers_per_block"):
            before = set(tagged)
            tagged = _maybe_map_sgm_blocks_to_diffusers(dict(tagged), config)
            # diffusers drops the SDXL-named keys of a file that mixes both namings; say so instead
            kept = {value for value in tagged.values() if isinstance(value, str)}
            for key in sorted(k for k in before - kept if not k.endswith(".alpha")):
                report.add(key.partition(".")[0], key, UNEXPECTED,
                           "SDXL (input_blocks) name in a file that also has diffusers (down_blocks) names: "
                           "diffusers drops these")
        converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(tagged))
    except (ValueError, KeyError, IndexError) as err:
        raise LoraLayoutError(f"{report.source}: diffusers' kohya converter cannot read this file: {err}") from err
    return dict(converted), network_alphas, alpha_keys


def read_diffusers_lora(unet: nn.Module, state: Mapping[str, torch.Tensor], *,
                        metadata: Mapping[str, object] | None = None, report: LoadReport,
                        default_alpha: float | None = None) -> DiffusersLora:
    """Read ``state`` (a diffusers / PEFT-layout, older diffusers, attn-procs or kohya LoRA, SD or SDXL) the way
    ``pipe.load_lora_weights`` does, using diffusers' and PEFT's own functions for every decision that changes
    numbers:

    1. kohya keys: :func:`_convert_kohya` (diffusers' converters, SDXL block names mapped with ``unet.config``);
    2. ``convert_unet_state_dict_to_peft`` (older ``lora.down`` / ``processor.to_q_lora`` names -> ``lora_A/B``);
    3. ``metadata``: the parsed ``lora_adapter_metadata`` header (``{"unet.r": .., "unet.lora_alpha": ..}``), or
       None; with it the config is ``LoraConfig(**metadata)``, else diffusers' ``get_peft_kwargs`` infers it from
       the ranks and the kohya alphas (``_create_lora_config``: most common rank/alpha plus ``^path`` patterns);
    4. per module, PEFT's ``get_pattern_key`` (regex, first matching key wins) picks rank and alpha from the
       patterns, as ``LoraModel._create_and_replace`` does; the module's scale is ``alpha / rank`` or, with
       ``use_rslora``, ``alpha / sqrt(rank)``.

    Every key lands in ``report``: matched later by :func:`fitting_loras`, or unexpected here (text-encoder
    entries, keys of no LoRA layout, incomplete pairs, a rank the config contradicts). visadapt also reads, beyond
    diffusers: keys without the ``unet.`` prefix, ``<path>.alpha`` scalars next to non-kohya keys (network alphas
    in diffusers' kohya naming) and kohya keys mixed with diffusers keys (diffusers skips those silently).
    ``default_alpha``: the alpha of a file that has neither metadata nor alphas (diffusers: the rank).
    Options visadapt cannot represent (DoRA, lora_bias, ...) raise :class:`LoraLayoutError` naming them.
    """
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_state_dict, convert_unet_state_dict_to_peft

    from visadapt.peft_format import check_lora_config, resolve_rank_alpha, warn_unused_patterns

    source = report.source
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise LoraLayoutError(f"{source}: value of {key!r} is a {type(value).__name__}, not a tensor")
    kohya_keys = [k for k in state if k.startswith(_KOHYA_PREFIXES)]
    origin, network_alphas, alpha_keys = (_convert_kohya(kohya_keys, state, unet, report) if kohya_keys
                                          else ({}, {}, set()))
    for key, value in state.items():
        if key.startswith(_KOHYA_PREFIXES):
            continue
        if key.startswith("base_model.model."):
            report.add(key.rpartition(".")[0], key, UNEXPECTED,
                       "PEFT save_pretrained layout: its alpha and targets are in adapter_config.json; load the "
                       "folder that holds both (format 'peft')")
        elif _ALPHA.match(key) and value.numel() == 1:
            path = key.removesuffix(".alpha")
            network_alphas[path if path.startswith(("unet.", "text_encoder")) else f"unet.{path}"] = float(value)
            alpha_keys.add(key)
        else:
            origin[key] = key
    for new in [k for k in origin if k.startswith(tuple(TEXT_ENCODER_PREFIXES))]:
        report.add(new.rpartition(".")[0], origin.pop(new), UNEXPECTED,
                   "text encoder: visadapt loads UNet LoRAs; use pipe.load_lora_weights for these")
    for key in sorted(k for k in alpha_keys if k.startswith(("lora_te", "text_encoder"))):
        alpha_keys.discard(key)
        report.add(key.removesuffix(".alpha"), key, UNEXPECTED,
                   "text encoder: visadapt loads UNet LoRAs; use pipe.load_lora_weights for these")
    # the UNet's part as diffusers' load_lora_adapter(prefix="unet") sees it, in lora_A / lora_B naming
    unet_keys = {new.removeprefix("unet."): original for new, original in origin.items()}
    peft_keys = convert_state_dict(convert_unet_state_dict_to_peft(unet_keys), _LINEAR_LAYER_TO_PEFT)
    for original in sorted(set(unet_keys.values()) - set(peft_keys.values())):  # two namings of one tensor
        report.add(original.rpartition(".")[0], original, UNEXPECTED,
                   "names the same LoRA tensor as another key of the file (two layouts mixed)")
    pairs: dict[str, dict[str, str]] = {}
    for key, original in peft_keys.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            if ".lora_magnitude_vector" in key:
                raise LoraLayoutError(f"{source}: key {original!r} is a DoRA magnitude vector; visadapt loads plain "
                                      f"LoRA only: load this file with pipe.load_lora_weights")
            if key.endswith(".lora_B.bias"):
                raise LoraLayoutError(f"{source}: key {original!r} is a LoRA bias (PEFT lora_bias=True), which "
                                      f"visadapt's LoRA does not have: load this file with pipe.load_lora_weights")
            report.add(key.rpartition(".")[0], original, UNEXPECTED, "fits no LoRA layout visadapt reads")
            continue
        roles = pairs.setdefault(match.group("path"), {})
        if match.group("role") in roles:  # two layouts naming the same tensor: keep the first, report the other
            report.add(match.group("path"), original, UNEXPECTED,
                       f"repeats lora_{match.group('role')} of this module (also in {peft_keys[roles[match.group('role')]]!r})")
            continue
        roles[match.group("role")] = key
    unet_alphas = {k.removeprefix("unet."): v for k, v in network_alphas.items() if k.startswith("unet.")}
    loras: dict[str, LoraWeights] = {}
    rank_dict: dict[str, int] = {}
    for path, roles in pairs.items():
        keys = tuple(peft_keys[k] for k in roles.values())
        # the module's alpha key, for the report (kohya: "<name>.alpha"; visadapt's extension: "[unet.]<path>.alpha")
        candidates = [f"{path}.alpha", f"unet.{path}.alpha"] + [k.partition(".")[0] + ".alpha" for k in keys]
        for candidate in candidates:
            if candidate in alpha_keys:
                keys += (candidate,)
                alpha_keys.discard(candidate)
                break
        if set(roles) != {"A", "B"}:
            for key in keys:
                report.add(path, key, UNEXPECTED, "a LoRA needs both down (lora_A) and up (lora_B)")
            continue
        down, up = state[peft_keys[roles["A"]]], state[peft_keys[roles["B"]]]
        conv = down.dim() == 4
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or (
                conv and tuple(up.shape[2:]) != (1, 1)):
            for key in keys:
                report.add(path, key, MISMATCHED, f"down {tuple(down.shape)} and up {tuple(up.shape)} are not a "
                                                  f"LoRA pair (down (r, in[, kh, kw]), up (out, r[, 1, 1]))")
            continue
        loras[path] = LoraWeights(down, up, None, keys)
        rank_dict[f"^{roles['B']}"] = int(up.shape[1])  # diffusers' load_lora_adapter: "^<lora_B key>" -> rank
    for key in sorted(alpha_keys):
        report.add(key.removesuffix(".alpha"), key, UNEXPECTED, "an alpha without a LoRA of its module")
    if not loras:
        return DiffusersLora({}, False)
    unet_metadata = None
    if metadata is not None:
        # a header describing only other components (text encoders) says nothing about the UNet's LoRA; diffusers
        # would build LoraConfig() from it and fail on the missing target_modules
        unet_metadata = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")} or None
        if unet_metadata and unet_alphas:
            raise LoraLayoutError(f"{source} has both lora_adapter_metadata and alpha tensors; diffusers refuses "
                                  f"such a file too ('Both network_alphas and metadata cannot be specified')")
    elif not unet_alphas and default_alpha is not None:
        unet_alphas = {f"{path}.alpha": float(default_alpha) for path in loras}
    peft_state = {roles[role]: None for roles in pairs.values() for role in roles}
    try:
        config = _create_lora_config(peft_state, unet_alphas or None, unet_metadata, rank_dict)
    except (TypeError, ValueError) as err:
        detail = err.__cause__ or err
        raise LoraLayoutError(f"{source}: its lora_adapter_metadata is not a PEFT LoraConfig: {detail}") from err
    # diffusers passes the state dict to PEFT, which then targets exactly the file's modules: the config's
    # target-selecting fields do not apply
    check_lora_config(config, f"{source} (lora_adapter_metadata)", targets_from_state=True)
    warn_unused_patterns(config, loras, source)
    fitting = {}
    for path, weights in loras.items():
        rank, alpha = resolve_rank_alpha(config, path)
        if rank != weights.rank:
            for key in weights.keys:
                report.add(path, key, MISMATCHED, f"the file's config gives this module rank {rank}, its tensors "
                                                  f"rank {weights.rank}")
            continue
        fitting[path] = dataclasses.replace(weights, alpha=float(alpha))
    return DiffusersLora(fitting, bool(config.use_rslora))


def attach_lora_state(unet: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str, *,
                      alpha: float | None = None, strict: bool = True, source: str | None = None,
                      metadata: Mapping[str, object] | None = None):
    """Attach a visadapt ``lora`` adapter to exactly the modules ``state`` names, with the ranks, alphas and
    rsLoRA flag diffusers' ``load_lora_weights`` would give them (:func:`read_diffusers_lora`), and load its
    tensors. Returns the :class:`~visadapt.plugins.lora.LoRAConfig` (explicit ``target_modules``, full-path
    ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``), so :func:`visadapt.save_adapter` writes an ordinary
    visadapt file.

    ``state``: a LoRA state dict in any layout of the module docstring. ``metadata``: the parsed
    ``lora_adapter_metadata`` header of its file (``{"unet.r": 4, "unet.lora_alpha": 8, ...}``), or None.
    ``alpha``: the alpha of a file that has neither metadata nor alphas (default: the rank, i.e. scale 1, as
    diffusers does).

    Every key is accounted for in a :class:`~visadapt.load_report.LoadReport` (kept on the adapter's record,
    :func:`visadapt.load_report`): keys of no LoRA layout, modules this model lacks, shapes that do not fit,
    text-encoder entries (visadapt adapts the UNet; ``pipe.load_lora_weights`` loads those). ``strict``
    (default) raises :class:`LoraLayoutError` with the report and leaves the model as it was;
    ``strict=False`` attaches the modules that fit and prints the rest. ``source`` names the input in messages.
    """

    source = source or f"a LoRA state dict of {len(state)} entries"
    report = LoadReport(source, f"adapter {adapter_name!r}")
    read = read_diffusers_lora(unet, state, metadata=metadata, report=report, default_alpha=alpha)
    fits = fitting_loras(unet, read.loras, report)
    try:
        report.enforce(strict)
    except AdapterLoadError as err:
        raise LoraLayoutError(str(err), report) from err
    config = lora_config_for(fits, use_rslora=read.use_rslora)
    try:
        api.attach(unet, "lora", config, adapter_name=adapter_name)
    except ValueError as err:
        raise LoraLayoutError(f"LoRA modules do not fit this UNet: {err}", report) from err
    try:
        load_lora_weights_into(unet, fits, adapter_name)
    except Exception:
        api.detach(unet, adapter_name)
        raise
    api.get_record(unet, adapter_name).load_report = report
    return config


def common_rank_alpha(loras: Mapping[str, LoraWeights]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(rank, alpha, rank_pattern, alpha_pattern)`` of ``loras`` (``{module path: anything with rank and alpha}``,
    alpha None meaning the rank): the most common rank and alpha (the first seen among equally common ones) and,
    keyed by full module path, the ranks / alphas of the modules that differ from them. The one builder behind
    :func:`lora_config_for` and the PEFT config an export writes (:func:`visadapt.interop_export.lora_config`)."""
    ranks = {path: w.rank for path, w in loras.items()}
    alphas = {path: float(w.alpha if w.alpha is not None else w.rank) for path, w in loras.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return (rank, alpha, {path: r for path, r in ranks.items() if r != rank},
            {path: a for path, a in alphas.items() if a != alpha})


def lora_config_for(loras: Mapping[str, LoraWeights], *, use_rslora: bool = False):
    """The visadapt :class:`~visadapt.plugins.lora.LoRAConfig` of exactly ``loras`` (alphas resolved): explicit
    ``target_modules``, the most common rank and alpha as defaults and full module paths in ``rank_pattern`` /
    ``alpha_pattern`` for the others (a full path is the longest key matching it, so it always wins)."""
    from visadapt.plugins.lora import LoRAConfig

    rank, alpha, rank_pattern, alpha_pattern = common_rank_alpha(loras)
    return LoRAConfig(rank=rank, alpha=alpha, targets=("to_q",), target_modules=tuple(loras), use_rslora=use_rslora,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def lora_modules(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """``{host module path: visadapt LoRA module}`` of one adapter."""
    from visadapt.layers import LoRA

    found = {}
    for item in inject.attached(model, adapter_name):
        if isinstance(item.module, LoRA):
            found[item.host_path] = item.module
    return found


def load_lora_weights_into(model: nn.Module, loras: Mapping[str, LoraWeights], adapter_name: str, *,
                           allow_missing: bool = False) -> None:
    """Copy ``loras`` into the LoRA modules of ``adapter_name`` already attached at the same module paths, strictly
    (every module both ways, every shape; with ``allow_missing`` attached modules the file lacks keep their
    initial zero delta); the alpha of each module must equal the attached one. Nothing is copied unless
    everything fits."""
    modules = lora_modules(model, adapter_name)
    missing = [] if allow_missing else sorted(set(modules) - set(loras))
    unexpected = sorted(set(loras) - set(modules))
    problems = [f"  model module without a LoRA in the file: {p}" for p in missing]
    problems += [f"  file LoRA for a module the adapter lacks: {p}" for p in unexpected]
    for path in sorted(set(modules) & set(loras)):
        module, weights = modules[path], loras[path]
        if weights.down.shape != module.A.weight.shape or weights.up.shape != module.B.weight.shape:
            problems.append(f"  {path}: file down {tuple(weights.down.shape)} / up {tuple(weights.up.shape)} vs model "
                            f"{tuple(module.A.weight.shape)} / {tuple(module.B.weight.shape)}")
        elif weights.alpha is not None and abs(weights.alpha - module.alpha) > 1e-6 * max(1.0, module.alpha):
            problems.append(f"  {path}: file alpha {weights.alpha} vs adapter alpha {module.alpha}")
    if problems:
        raise LoraLayoutError(f"LoRA tensors do not fit adapter {adapter_name!r} ({len(loras)} in the file, "
                              f"{len(modules)} in the model):\n" + "\n".join(problems))
    with torch.no_grad():
        for path, module in modules.items():
            if path not in loras:
                continue
            module.A.weight.copy_(loras[path].down)
            module.B.weight.copy_(loras[path].up)


def lora_state_to_peft(unet: nn.Module, adapter_name: str, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The LoRA modules of ``adapter_name`` in the diffusers/PEFT layout ``pipe.load_lora_weights`` reads:
    ``unet.<path>.lora_A.weight`` ``(r, in[, kh, kw])`` and ``unet.<path>.lora_B.weight`` ``(out, r[, 1, 1])``.

    Built by :func:`visadapt.interop_export.exact_loras` (slices of a fused layer joined exactly, never truncated;
    k-bit LoRA and non-LoRA modules refused with :class:`~visadapt.export.ExportError`). This bare state dict
    carries no alphas (diffusers then uses ``alpha = rank``), so each layer's scale is folded into ``lora_B``; the
    delta ``B @ A`` is the adapter's (bit-exact when the scale is a power of two). For a folder with the config,
    use :func:`visadapt.interop_export.export_diffusers` / ``export_peft``.
    """
    from visadapt.interop_export import exact_loras

    lead = f"{prefix}." if prefix else ""
    out = {}
    for path, lora in exact_loras(unet, adapter_name, what_else="save it with visadapt.save_adapter").items():
        out[f"{lead}{path}.lora_A.weight"] = lora.down.contiguous()
        out[f"{lead}{path}.lora_B.weight"] = (lora.up if lora.scale == 1.0 else lora.up * lora.scale).contiguous()
    return out


def header_keys(path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


# DoRA magnitudes (kohya's dora_scale, PEFT's lora_magnitude_vector): recognised as LoRA files so that loading them
# is refused with the reason rather than "no known layout"
_DORA = re.compile(r"^(?:lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+\.dora_scale|.+\.lora_magnitude_vector(?:\.\w+)?)$")


def looks_like_lora(keys: Iterable[str]) -> bool:
    """Whether every key is one of a LoRA layout (cheap: names only)."""
    keys = list(keys)
    if not keys:
        return False
    for key in keys:
        _, rest = _component(key)
        if not (_KOHYA.match(key) or _PEFT.match(rest) or _OLD.match(rest) or _PROC.match(rest)
                or _ALPHA.match(rest) or _DORA.match(key)):
            return False
    return True


LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def lora_adapter_metadata(header: Mapping[str, str] | None, source: str) -> dict | None:
    """The parsed ``lora_adapter_metadata`` entry of a safetensors header (what diffusers' ``save_lora_weights``
    writes from ``unet_lora_adapter_metadata=``: one JSON object with ``unet.``-prefixed ``LoraConfig`` fields),
    or None when there is none. Raises :class:`LoraLayoutError` naming ``source`` when it is not a JSON object."""
    import json

    raw = (header or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except (TypeError, ValueError) as err:
        raise LoraLayoutError(f"{source}: its {LORA_ADAPTER_METADATA_KEY} header is not valid JSON ({err}); "
                              f"re-save the file with diffusers' save_lora_weights") from err
    if not isinstance(parsed, dict):
        raise LoraLayoutError(f"{source}: its {LORA_ADAPTER_METADATA_KEY} header is a JSON "
                              f"{type(parsed).__name__}, not an object of LoraConfig fields")
    return parsed


@register_format("diffusers_lora")
class DiffusersLoraFormat(CheckpointFormat):
    """A single LoRA file in the diffusers/PEFT, older diffusers, attn-procs or kohya (SD or SDXL) layout, read
    as diffusers' ``load_lora_weights`` reads it, header ``lora_adapter_metadata`` included
    (:func:`read_diffusers_lora`), and attached as a visadapt ``lora`` adapter on the UNet
    (:func:`attach_lora_state`). In a folder: ``pytorch_lora_weights.safetensors``, else the only
    ``.safetensors`` file handed over. In memory: the state dict, and ``metadata=`` its safetensors header
    (``{"lora_adapter_metadata": "<json>"}``) when it has one."""

    file_names = ("pytorch_lora_weights.safetensors",)

    @classmethod
    def detect(cls, files, state) -> bool:
        if not cls._holds_lora(files, state):
            return False
        # the generic fallback: a layout with more to it (ResAdapter's LoRA plus norms, a PEFT folder) claims the
        # files first
        from visadapt.formats import _FORMATS

        return not any(other.detect(files, state) for other in _FORMATS.values() if other is not cls)

    @classmethod
    def _lora_file(cls, files):
        name = next((n for n in cls.file_names if n in files), None)
        if name is None:
            singles = [n for n in files if n.endswith(".safetensors")]
            name = singles[0] if len(singles) == 1 and len(files) == 1 else None
        return None if name is None else files[name]

    @classmethod
    def _holds_lora(cls, files, state) -> bool:
        if state is not None:
            return looks_like_lora(state)
        path = cls._lora_file(files)
        if path is None:
            return False
        try:
            return looks_like_lora(header_keys(path))
        except (OSError, SafetensorError):  # not a safetensors file: some other format's
            return False

    def load(self, model, files, state, adapter_name, strict=True, metadata=None):
        if state is None:
            from visadapt.io import read_safetensors

            path = self._lora_file(files)
            if path is None:
                raise FileNotFoundError(f"no LoRA file among {sorted(files)}; expected {self.file_names[0]} or one "
                                        f".safetensors file")
            tensors, header = read_safetensors(path)  # header and tensors from one open
            parsed = lora_adapter_metadata(header, str(path))
            return attach_lora_state(model, tensors, adapter_name, strict=strict, source=str(path), metadata=parsed)
        source = f"the state dict given ({len(state)} tensors)"
        return attach_lora_state(model, state, adapter_name, strict=strict, source=source,
                                 metadata=lora_adapter_metadata(metadata, source))
