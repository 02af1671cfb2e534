"""LoRA files in the layouts users meet, read into one form, attached as visadapt ``lora`` adapters, and written
back in the layout diffusers' ``pipe.load_lora_weights`` reads.

Layouts read by :func:`read_lora_state` (the module path is the diffusers UNet's, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):

==========================  ==========================================================================================
PEFT / diffusers            ``[unet.]<path>.lora_A[.<name>].weight``, ``[unet.]<path>.lora_B[.<name>].weight``, optional
                            ``[unet.]<path>.alpha``; ``base_model.model.`` (PEFT ``save_pretrained``) is stripped too
older diffusers             ``[unet.]<path>.lora.down.weight`` / ``.lora.up.weight`` (LoRA-compatible layers) and
                            ``<path>.lora_linear_layer.down.weight`` / ``.up.weight``
diffusers attn-procs        ``<attention path>.processor.to_q_lora.down.weight`` / ``.up.weight`` (also ``to_k``,
                            ``to_v``, ``to_out`` -> ``to_out.0``), as ``unet.save_attn_procs`` wrote them
kohya (sd-scripts)          ``lora_unet_<path with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
                            e.g. ResAdapter's released ``lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight``
                            (diffusers naming; SDXL files in the original ``input_blocks_*`` naming are refused:
                            convert them with diffusers first)
==========================  ==========================================================================================

Text-encoder entries (``text_encoder.`` / ``text_encoder_2.`` prefixes, kohya ``lora_te_`` / ``lora_te1_`` /
``lora_te2_``) are returned separately in :attr:`LoraStateDict.text_encoder`; visadapt adapts the UNet, so
:func:`attach_lora_state` refuses them with the fix rather than dropping them.

Scaling: the delta of one module is ``(alpha / rank) * up @ down``. A file without an alpha for a module means
``alpha = rank`` (scale 1), as in diffusers and kohya. Conv LoRA has a ``down`` convolution with the base's kernel
(``(r, in, kh, kw)``, same stride and padding) and a 1x1 ``up`` (``(out, r, 1, 1)``), exactly
:class:`visadapt.layers.LoRA` on a ``Conv2d``.
"""
from __future__ import annotations

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


def attach_lora_state(unet: nn.Module, state: Mapping[str, torch.Tensor] | LoraStateDict, adapter_name: str, *,
                      alpha: float | None = None, strict: bool = True, source: str | None = None):
    """Attach a visadapt ``lora`` adapter to exactly the modules ``state`` names, with their ranks and alphas,
    and load its tensors. Returns the :class:`~visadapt.plugins.lora.LoRAConfig` (``target_modules``,
    ``rank_pattern``, ``alpha_pattern``), so :func:`visadapt.save_adapter` writes an ordinary visadapt file.

    ``state``: a raw state dict in any layout :func:`read_lora_state` reads, or its result. ``alpha``: the
    alpha of modules whose file has none (default: their rank, i.e. scale 1, as diffusers does).

    Every key is accounted for in a :class:`~visadapt.load_report.LoadReport` (kept on the adapter's record,
    :func:`visadapt.load_report`): keys of no LoRA layout, modules this model lacks, shapes that do not fit,
    text-encoder entries (visadapt adapts the UNet; ``pipe.load_lora_weights`` loads those). ``strict``
    (default) raises :class:`LoraLayoutError` with the report and leaves the model as it was;
    ``strict=False`` attaches the modules that fit and prints the rest. ``source`` names the input in messages.
    """
    from visadapt.plugins.lora import LoRAConfig

    source = source or f"a LoRA state dict of {len(state)} entries"
    report = LoadReport(source, f"adapter {adapter_name!r}")
    loras = state if isinstance(state, LoraStateDict) else read_lora_state(
        state, module_names=[name for name, _ in unet.named_modules()], report=report)
    report_text_encoder(loras, report, "text encoder: visadapt loads UNet LoRAs; use pipe.load_lora_weights for these")
    fits = fitting_loras(unet, loras, report)
    try:
        report.enforce(strict)
    except AdapterLoadError as err:
        raise LoraLayoutError(str(err), report) from err
    ranks = [w.rank for w in fits.values()]
    rank = max(set(ranks), key=ranks.count)
    alphas = {path: (w.alpha if w.alpha is not None else (alpha if alpha is not None else w.rank))
              for path, w in fits.items()}
    alpha_values = list(alphas.values())
    common_alpha = float(max(set(alpha_values), key=alpha_values.count))
    config = LoRAConfig(
        rank=rank, alpha=common_alpha, targets=("to_q",), target_modules=tuple(fits),
        rank_pattern={path: w.rank for path, w in fits.items() if w.rank != rank},
        alpha_pattern={path: float(a) for path, a in alphas.items() if a != common_alpha},
    )
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


def looks_like_lora(keys: Iterable[str]) -> bool:
    """Whether every key is one of a LoRA layout (cheap: names only)."""
    keys = list(keys)
    if not keys:
        return False
    for key in keys:
        _, rest = _component(key)
        if not (_KOHYA.match(key) or _PEFT.match(rest) or _OLD.match(rest) or _PROC.match(rest)
                or _ALPHA.match(rest)):
            return False
    return True


@register_format("diffusers_lora")
class DiffusersLoraFormat(CheckpointFormat):
    """A single LoRA file in the diffusers/PEFT, older diffusers, attn-procs or kohya layout, attached as a
    visadapt ``lora`` adapter on the UNet (:func:`attach_lora_state`)."""

    file_names = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")

    @classmethod
    def detect(cls, files, state) -> bool:
        if not cls._holds_lora(files, state):
            return False
        # the generic fallback: a layout with more to it (ResAdapter's LoRA plus norms) claims the files first
        from visadapt.formats import _FORMATS

        return not any(other.detect(files, state) for other in _FORMATS.values() if other is not cls)

    @classmethod
    def _holds_lora(cls, files, state) -> bool:
        if state is not None:
            return looks_like_lora(state)
        for name in cls.file_names:
            if name in files:
                try:
                    return looks_like_lora(header_keys(files[name]))
                except (OSError, SafetensorError):  # not a safetensors file: some other format's
                    return False
        return False

    def load(self, model, files, state, adapter_name, strict=True):
        if state is None:
            from safetensors.torch import load_file

            name = next((n for n in self.file_names if n in files), None)
            if name is None:
                raise FileNotFoundError(f"no LoRA file among {sorted(files)}; expected one of {self.file_names}")
            return attach_lora_state(model, load_file(str(files[name])), adapter_name, strict=strict,
                                     source=str(files[name]))
        return attach_lora_state(model, state, adapter_name, strict=strict)
