"""Exact export of visadapt LoRA adapters to the folders PEFT and diffusers load with their own calls.

::

    from visadapt.interop_export import export_diffusers, export_peft, export_resadapter

    export_peft(vit, "out/peft")                  # PeftModel.from_pretrained(fresh_vit, "out/peft")
    export_diffusers(pipe.unet, "out/diffusers")  # pipe.load_lora_weights("out/diffusers")
    export_resadapter(pipe.unet, "out/res")       # the official two files (load_lora_weights + load_state_dict)

What is written:

===========  ==========================================================  =====================================
format       files                                                       loads with
===========  ==========================================================  =====================================
peft         ``adapter_config.json`` (``LoraConfig.save_pretrained``),     ``PeftModel.from_pretrained(base, DIR)``
             ``adapter_model.safetensors`` (keys of
             ``get_peft_model_state_dict``: ``base_model.model.<path>.
             lora_A.weight``, the head as ``base_model.model.<head>.*``)
diffusers    ``pytorch_lora_weights.safetensors`` written by               ``pipe.load_lora_weights(DIR)``
             ``StableDiffusionPipeline.save_lora_weights`` with the
             ``LoraConfig`` as ``lora_adapter_metadata``
resadapter   ``pytorch_lora_weights.safetensors`` (kohya) +                the official loader (see
             ``diffusion_pytorch_model.safetensors`` (norms)               :func:`visadapt.plugins.resadapter.
                                                                           export_official`)
===========  ==========================================================  =====================================

Exactness. Each module's scale is read from the module itself (``module.scaling`` and ``module.rank``), never
from a config formula, and the written ``lora_alpha`` / ``alpha_pattern`` make PEFT's formula (``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``) give that scale. Ranks and alphas that differ from the most common one go
to ``rank_pattern`` / ``alpha_pattern`` keyed by ``"^" + re.escape(path)``: PEFT matches a pattern key ``K``
against a module path with ``re.match(rf"(.*\\.)?({K})$", path)`` (``peft.utils.other.get_pattern_key``), so the
escape and the anchor make each key match exactly one module (diffusers anchors its own keys the same way).

LoRAs on row slices of one fused layer (timm's q / k / v of ``qkv``) become ONE LoRA on the fused layer, exactly:
rank ``r_q + r_v``, ``A = [A_q; A_v]`` ``(r_q + r_v, in)`` and ``B`` ``(3 * dim, r_q + r_v)`` block-structured,
``B_q`` in the q rows and first ``r_q`` columns, ``B_v`` in the v rows and last ``r_v`` columns, zeros elsewhere
(the k rows). When the slices' scales are equal that scale is kept (``alpha = scale * (r_q + r_v)``); when they
differ, each slice's scale is folded into its block of ``B`` and the module gets ``alpha = rank`` (scale 1) --
``alpha = sqrt(rank)`` under ``use_rslora``. Several whole-layer LoRAs of one adapter on the same layer (SELMA's
merged experts) are stacked the same way.

Refused with the reason, before anything is written (:class:`~visadapt.export.ExportError`): k-bit LoRA (its
factors are quantised codes; PEFT and diffusers store float factors), LoRA on open_clip's
``nn.MultiheadAttention`` weights (``in_proj_weight`` and its q/k/v slices, ``out_proj``: PEFT wraps modules, and
MultiheadAttention reads those weights directly, so a PEFT LoRA layer there would never run), and every module that is not a LoRA (bottleneck
adapters, ResAdapter's norms -- those go to ``export_resadapter`` --, MoSA's sampled LoRAs, ...).

``adapter_name`` (every exporter): the adapter to write; default None, the one adapter attached (so a pipeline
that ``load_visadapt`` gave ``default_0`` needs no name). Nothing of the model changes.

The runtime weight (:func:`visadapt.set_weight`) is not written: the files hold the adapter as trained (weight 1),
and PEFT / diffusers take the weight at load time (``pipe.set_adapters([name], [w])``), as the official
ResAdapter loader does. Likewise dropout (training only) is written as ``lora_dropout`` for completeness.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt import api, inject
from visadapt.export import ExportError
from visadapt.lora_layouts import DiffusersLoraFormat, common_rank_alpha
from visadapt.peft_compat import resolve
from visadapt.peft_format import CONFIG_NAME as PEFT_CONFIG_FILE
from visadapt.peft_format import WEIGHTS_NAME as PEFT_WEIGHTS_FILE
from visadapt.plugins.resadapter import LORA_FILES, NORM_FILES
from visadapt.progress import Progress

# the file names written are the ones the loaders of these formats look for first
DIFFUSERS_WEIGHTS_FILE = DiffusersLoraFormat.file_names[0]
RESADAPTER_LORA_FILE, RESADAPTER_NORM_FILE = LORA_FILES[0], NORM_FILES[0]
FORMATS = ("peft", "diffusers", "resadapter")
#: the files each format's export may write (a folder's other files are never touched)
FORMAT_FILES = {"peft": (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE), "diffusers": (DIFFUSERS_WEIGHTS_FILE,),
                "resadapter": (RESADAPTER_LORA_FILE, RESADAPTER_NORM_FILE)}


@dataclass
class ExactLora:
    """One exported LoRA on the layer at ``path``: delta ``W += (alpha / rank) * up @ down`` (``alpha /
    sqrt(rank)`` under ``use_rslora``), identical to the sum of the adapter's LoRAs on that layer.

    ``down``: ``(rank, in)`` or ``(rank, in, kh, kw)``; ``up``: ``(out, rank)`` or ``(out, rank, 1, 1)``, ``out``
    the layer's full output width."""

    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    scale: float  # the factor the product is multiplied by: alpha / rank (or alpha / sqrt(rank) with rslora)
    rslora: bool = False  # the formula ``alpha`` is written for: PEFT's ``use_rslora``

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def resolve_adapter_name(model: nn.Module, adapter_name: str | None) -> str:
    """``adapter_name``, or when None the one adapter attached (``pipe.load_visadapt`` names them
    ``default_0``, ...)."""
    if adapter_name is not None:
        api.get_record(model, adapter_name)  # raises KeyError naming the attached ones
        return adapter_name
    names = list(api.records(model))
    if len(names) != 1:
        raise ExportError(f"this model holds {len(names)} adapters ({', '.join(map(repr, names)) or 'none'}); "
                          f"pass adapter_name to choose the one to export")
    return names[0]


def _refuse(adapter_name: str, what: str, items: list[str], why: str) -> ExportError:
    shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
    return ExportError(f"adapter {adapter_name!r} cannot be exported exactly: {what} ({shown}); {why}")


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    return scale * (math.sqrt(rank) if use_rslora else rank)


def exact_loras(model: nn.Module, adapter_name: str = "default", *,
                what_else: str = "save it with visadapt.save_adapter, or export the merged model "
                                 "(visadapt export --format dense)") -> dict[str, ExactLora]:
    """``{layer path: ExactLora}`` of ``adapter_name``: every LoRA of the adapter, slices of a fused layer joined
    into one block-structured LoRA of the layer (see the module docstring), each with the alpha that gives its
    exact scale under PEFT's formula. The formula is read from the modules themselves (``LoRA.rslora``): rsLoRA
    (``alpha / sqrt(r)``, ``ExactLora.rslora`` True) when every LoRA of the adapter is rsLoRA, else ``alpha / r``
    for all (PEFT's ``use_rslora`` is one flag per config; an rsLoRA module then gets the alpha that gives its
    scale under ``alpha / r``). Raises :class:`~visadapt.export.ExportError` naming the modules that have no exact
    LoRA form (``what_else`` ends the message with the alternative)."""
    from visadapt.layers import LoRA

    record = api.get_record(model, adapter_name)
    items = inject.attached(model, adapter_name)
    not_lora = [f"{i.host_path}:{i.kind} ({type(i.module).__name__})" for i in items if type(i.module) is not LoRA]
    if not_lora:
        hint = ("; for a ResAdapter, export_resadapter / --format resadapter writes the official two files"
                if record.plugin.name == "resadapter" else "")
        raise _refuse(adapter_name, f"plugin {record.plugin.name!r} holds modules that are not LoRA", not_lora,
                      f"PEFT and diffusers LoRA files hold LoRA factors only: {what_else}{hint}")
    k_bit = [f"{i.host_path}:{i.kind} ({getattr(i.module.A, 'bits', '?')} bits)" for i in items
             if type(i.module.A) not in (nn.Linear, nn.Conv2d) or type(i.module.B) is not type(i.module.A)]
    if k_bit:
        raise _refuse(adapter_name, "k-bit LoRA", k_bit, "its factors are quantised codes, PEFT and diffusers "
                                                         "store float factors: attach with bits=32 to export")
    in_weight = [f"{i.host_path}:{i.kind}" for i in items if i.module.site_how == "weight"]
    if in_weight:
        raise _refuse(adapter_name, "LoRA on a weight its layer reads directly (open_clip's nn.MultiheadAttention "
                                    "in_proj_weight and its q/k/v slices, out_proj)", in_weight,
                      "PEFT wraps modules, and MultiheadAttention reads in_proj_weight and out_proj.weight inside "
                      "F.multi_head_attention_forward without calling a sub-module, so no PEFT LoRA layer can "
                      "target them (PEFT's own MultiheadAttention LoRA adapts in_proj whole, never a slice): "
                      "target fc1/fc2 there to export")
    by_host: dict[str, list[LoRA]] = collections.defaultdict(list)
    for item in items:
        by_host[item.host_path].append(item.module)
    use_rslora = bool(items) and all(item.module.rslora for item in items)
    exported = {}
    for path, modules in by_host.items():
        # the real layer under any PEFT wrapper, as inject resolves a canonical host path
        out_features = resolve(model, path).weight.shape[0]
        scales = [float(m.scaling) for m in modules]
        if len(modules) == 1 and modules[0].site_rows is None:
            module = modules[0]
            exported[path] = ExactLora(path, module.A.weight.detach().clone(), module.B.weight.detach().clone(),
                                       _plain_alpha(module, use_rslora), scales[0], use_rslora)
            continue
        rank = sum(m.rank for m in modules)
        common = scales[0] if all(s == scales[0] for s in scales) else 1.0
        down = torch.cat([m.A.weight.detach() for m in modules], dim=0)
        b0 = modules[0].B.weight
        up = torch.zeros((out_features, rank, *b0.shape[2:]), dtype=b0.dtype, device=b0.device)
        column = 0
        for module, scale in zip(modules, scales):
            start, stop = module.site_rows if module.site_rows is not None else (0, out_features)
            block = module.B.weight.detach()
            # fold the slice's own scale into its block when the slices' scales differ (common is then 1)
            up[start:stop, column:column + module.rank] = block if scale == common else block * (scale / common)
            column += module.rank
        exported[path] = ExactLora(path, down, up, _alpha_for(common, rank, use_rslora), common, use_rslora)
    if not exported:
        raise ExportError(f"adapter {adapter_name!r} holds no LoRA module: there is nothing to export")
    return exported


def _plain_alpha(module, use_rslora: bool) -> float:
    """The module's own alpha where PEFT's formula (``use_rslora`` or not) with it gives ``module.scaling`` (the
    common case keeps the user's numbers), else the alpha that does."""
    own = float(module.alpha)
    formula = own / (math.sqrt(module.rank) if use_rslora else module.rank)
    return own if formula == float(module.scaling) else _alpha_for(float(module.scaling), module.rank, use_rslora)


def _pattern_key(path: str) -> str:
    # PEFT: re.match(rf"(.*\.)?({key})$", path); "^" inside the group fails unless the optional prefix is empty
    return "^" + re.escape(path)


def lora_config(model: nn.Module, loras: dict[str, ExactLora], *, modules_to_save: list[str] | None = None,
                dropout: float = 0.0, base_model_name_or_path: str | None = None):
    """The ``peft.LoraConfig`` of ``loras``: the most common rank / alpha as ``r`` / ``lora_alpha``, the others in
    ``rank_pattern`` / ``alpha_pattern`` keyed by anchored, escaped full paths; ``target_modules`` the exact
    paths (a list when no path is a dotted suffix of another module's path, else one full-match regex);
    ``use_rslora`` the formula the alphas are written for (``ExactLora.rslora``, one for all)."""
    from peft import LoraConfig

    formulas = {lora.rslora for lora in loras.values()}
    if len(formulas) != 1:
        raise ExportError(f"the LoRAs given mix alphas written for alpha / r and for alpha / sqrt(r) "
                          f"({len(loras)} LoRAs); PEFT's use_rslora is one flag: build them with exact_loras")
    (use_rslora,) = formulas

    rank, alpha, rank_pattern, alpha_pattern = common_rank_alpha(loras)
    # PEFT's list form matches `name == target or name.endswith("." + target)`: exact only when no target is a
    # proper dotted suffix of some module's path
    proper_suffixes = {".".join(parts[i:]) for parts in (name.split(".") for name, _ in model.named_modules())
                       for i in range(1, len(parts))}
    ambiguous = any(path in proper_suffixes for path in loras)
    targets: Any = ("^(?:" + "|".join(re.escape(p) for p in loras) + ")$") if ambiguous else sorted(loras)
    return LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets, lora_dropout=dropout,
        rank_pattern={_pattern_key(p): r for p, r in rank_pattern.items()},
        alpha_pattern={_pattern_key(p): a for p, a in alpha_pattern.items()},
        modules_to_save=modules_to_save, base_model_name_or_path=base_model_name_or_path, init_lora_weights=False,
    )


def _dropout_of(model: nn.Module, adapter_name: str) -> float:
    return float(getattr(api.get_record(model, adapter_name).config, "dropout", 0.0) or 0.0)


def _warn_runtime_weight(model: nn.Module, adapter_name: str) -> None:
    weights = {inject.adapter_weight(i.module) for i in inject.attached(model, adapter_name)}
    if weights != {1.0}:
        warnings.warn(f"adapter {adapter_name!r} runs at weight {sorted(weights)}; the exported files hold it at "
                      f"weight 1 (as trained): give the weight to the loading library (pipe.set_adapters)",
                      stacklevel=3)


def _base_name(model: nn.Module) -> str | None:
    from visadapt.sites import model_name

    try:
        return model_name(model)
    except Exception:  # noqa: BLE001 - a name is a courtesy in the config, never a reason to fail the export
        return None


class _StagedFolder:
    """Write into a hidden folder inside ``folder`` and move the files into place only when all are written, so a
    failed export leaves ``folder`` as it was. ``names``: every file the format may write; those already in
    ``folder`` are replaced only with ``overwrite``, and those this export did not write (ResAdapter's norm file
    for an adapter without norms) are removed on success: an earlier export's file would be loaded with the new
    ones. This is the one place such a stale file is cleaned up."""

    def __init__(self, folder: str | os.PathLike, names: tuple[str, ...], overwrite: bool) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ExportError(f"--to {self.folder} is a file; give a folder")
        clashes = [n for n in names if (self.folder / n).exists()]
        if clashes and not overwrite:
            raise ExportError(f"{self.folder} already holds {', '.join(clashes)}; pass overwrite=True (--overwrite) "
                              f"to replace them, or choose another folder")
        self.names = names

    def __enter__(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".visadapt-export-", dir=self.folder))
        return self.staging

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                written = set()
                for path in self.staging.iterdir():
                    os.replace(path, self.folder / path.name)
                    written.add(path.name)
                for name in set(self.names) - written:
                    (self.folder / name).unlink(missing_ok=True)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


def export_peft(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None, *,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write ``adapter_name`` of ``model`` (timm, open_clip or a diffusers UNet) as a PEFT LoRA folder that
    ``PeftModel.from_pretrained(base_model, folder)`` loads into the visadapt model's outputs (at weight 1).

    ``adapter_config.json`` is written by ``LoraConfig.save_pretrained`` (:func:`lora_config`);
    ``adapter_model.safetensors`` holds ``base_model.model.<path>.lora_A.weight`` ``(r, in[, kh, kw])`` and
    ``...lora_B.weight`` ``(out, r[, 1, 1])`` per layer, plus the classifier head saved with the adapter as
    ``base_model.model.<head>.<param>`` with ``modules_to_save=[head]`` (PEFT's ModulesToSaveWrapper saves its
    copy under the module's own name). Returns ``{"config": path, "weights": path}``.
    """
    from safetensors.torch import save_file

    adapter_name = resolve_adapter_name(model, adapter_name)
    record = api.get_record(model, adapter_name)
    loras = exact_loras(model, adapter_name)
    modules_to_save = None
    tensors = {}
    for path, lora in loras.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora.down.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora.up.contiguous()
    if record.head:
        # PEFT finds modules_to_save by `name.endswith(entry)` (plain string): another module ending with the
        # head's path would be replaced too
        others = [name for name, _ in model.named_modules() if name != record.head and name.endswith(record.head)]
        if others:
            raise _refuse(adapter_name, f"its head {record.head!r} is a name suffix of other modules", others,
                          "PEFT's modules_to_save would wrap those too")
        modules_to_save = [record.head]
        for key, tensor in model.get_submodule(record.head).state_dict().items():
            tensors[f"base_model.model.{record.head}.{key}"] = tensor.detach().clone().contiguous()
    config = lora_config(model, loras, modules_to_save=modules_to_save, dropout=_dropout_of(model, adapter_name),
                         base_model_name_or_path=base_model_name_or_path or _base_name(model))
    _warn_runtime_weight(model, adapter_name)
    with _StagedFolder(folder, FORMAT_FILES["peft"], overwrite) as staging:
        config.save_pretrained(str(staging))  # writes PEFT's CONFIG_NAME, the name PeftFormat reads
        save_file(tensors, str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    folder = Path(folder)
    return {"config": folder / PEFT_CONFIG_FILE, "weights": folder / PEFT_WEIGHTS_FILE}


def diffusers_lora_layers(unet: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """``(unet_lora_layers, LoraConfig)`` for ``save_lora_weights``: ``<path>.lora_A.weight`` /
    ``<path>.lora_B.weight`` per layer (diffusers adds the ``unet.`` prefix) and the config whose ``to_dict()``
    is the ``lora_adapter_metadata`` ``load_lora_weights`` builds its ``LoraConfig`` from."""
    _require_diffusers_unet(unet)
    return _diffusers_lora_layers(unet, resolve_adapter_name(unet, adapter_name))


def _require_diffusers_unet(unet: nn.Module) -> None:
    from visadapt.sites import model_family

    family = model_family(unet)
    if not family.startswith("diffusers"):
        raise ExportError(f"a diffusers LoRA file is for a diffusers UNet; this model is {family}: export it with "
                          f"--format peft (PeftModel.from_pretrained) instead")


def _diffusers_lora_layers(unet: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor], Any]:
    """:func:`diffusers_lora_layers` for an adapter name already resolved."""
    loras = exact_loras(unet, adapter_name)
    layers = {}
    for path, lora in loras.items():
        layers[f"{path}.lora_A.weight"] = lora.down.contiguous()
        layers[f"{path}.lora_B.weight"] = lora.up.contiguous()
    return layers, lora_config(unet, loras, dropout=_dropout_of(unet, adapter_name))


def export_diffusers(unet: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None, *,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write ``adapter_name`` of a diffusers UNet as ``folder/pytorch_lora_weights.safetensors``, by diffusers'
    own ``StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=..., unet_lora_adapter_metadata=
    LoraConfig(...).to_dict())``: ``pipe.load_lora_weights(folder)`` gives the visadapt pipeline's outputs (at
    weight 1), ranks, alphas and rsLoRA read from the metadata. Returns ``{"weights": path}``."""
    from diffusers import StableDiffusionPipeline

    _require_diffusers_unet(unet)
    adapter_name = resolve_adapter_name(unet, adapter_name)
    layers, config = _diffusers_lora_layers(unet, adapter_name)
    _warn_runtime_weight(unet, adapter_name)
    metadata = json.loads(json.dumps(config.to_dict(), default=list))  # sets (target_modules) as lists
    with _StagedFolder(folder, (DIFFUSERS_WEIGHTS_FILE,), overwrite) as staging:
        StableDiffusionPipeline.save_lora_weights(str(staging), unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=metadata,
                                                  weight_name=DIFFUSERS_WEIGHTS_FILE, safe_serialization=True)
    return {"weights": Path(folder) / DIFFUSERS_WEIGHTS_FILE}


def export_resadapter(unet: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None, *,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write a ``resadapter`` adapter in the official two-file layout
    (:func:`visadapt.plugins.resadapter.export_official`), loaded by the official code's calls."""
    from visadapt.plugins.resadapter import export_official

    adapter_name = resolve_adapter_name(unet, adapter_name)
    record = api.get_record(unet, adapter_name)
    if record.plugin.name != "resadapter":
        raise ExportError(f"adapter {adapter_name!r} is a {record.plugin.name} adapter; the ResAdapter layout holds "
                          f"resadapter adapters only: use --format diffusers or peft")
    _warn_runtime_weight(unet, adapter_name)
    return export_official(unet, folder, adapter_name, overwrite=overwrite)


EXPORTERS = {"peft": export_peft, "diffusers": export_diffusers, "resadapter": export_resadapter}


def export_adapter(model: nn.Module, folder: str | os.PathLike, format: str, adapter_name: str | None = None,
                   **kwargs: Any) -> dict[str, Path]:
    """Dispatch to :func:`export_peft`, :func:`export_diffusers` or :func:`export_resadapter` by ``format``."""
    if format not in EXPORTERS:
        raise ExportError(f"format {format!r}: choose one of {', '.join(EXPORTERS)} (or dense, the merged model)")
    return EXPORTERS[format](model, folder, adapter_name, **kwargs)


# ------------------------------------------------------------------------------- `visadapt export --format`


def _owner_loaded(base: nn.Module, folder: Path, format: str) -> nn.Module:
    """``base`` with the exported folder loaded by the owning library's own calls (no visadapt code involved)."""
    if format == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(folder)).eval()
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    # what pipe.load_lora_weights(folder) does for the UNet: diffusers' converters, then its PEFT injection
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(folder), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, base, adapter_name="exported", metadata=metadata)
    if format == "resadapter" and (folder / RESADAPTER_NORM_FILE).is_file():
        base.load_state_dict(load_file(str(folder / RESADAPTER_NORM_FILE)), strict=False)  # the official norm loading
    return base.eval()


def export_file(adapter: str | os.PathLike, format: str, to: str | os.PathLike, *, model: str | None = None,
                pretrained: str | None = None, probe_size: int = 2, tolerance: float | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """``visadapt export --format peft|diffusers|resadapter``: load the adapter file on its base model, write the
    folder with :func:`export_adapter`, load that folder into a fresh copy of the base model with the owning
    library's own calls (``PeftModel.from_pretrained``; diffusers' ``lora_state_dict`` + ``load_lora_into_unet``,
    what ``pipe.load_lora_weights`` runs for the UNet, plus ``unet.load_state_dict(norms, strict=False)`` for
    ResAdapter) and compare its outputs with visadapt's on a seeded probe batch. Files are moved into ``to`` only
    when the check passes (else :class:`~visadapt.export.ExportParityError`).

    ``model``: as for the dense export (default: the backbone the file records; the file's recorded seed seeds a
    random init on that backbone only, :func:`visadapt.export.read_adapter_on_base`). ``pretrained``: base
    weights for the check (default ``none``: random init, seeded; the check compares two loaders on the same base,
    so real weights are not needed and nothing is downloaded). Returns a report dict.
    """
    from visadapt.export import (
        DENSE_RTOL,
        ExportParityError,
        ModelOutputs,
        compare,
        output_names,
        probe_inputs,
        read_adapter_on_base,
        run_outputs,
    )

    if format not in EXPORTERS:
        raise ExportError(f"--format {format!r}: choose dense, {', '.join(EXPORTERS)}")
    adapter, to = Path(adapter), Path(to)
    destination = _StagedFolder(to, FORMAT_FILES[format], overwrite)  # refuses a clash before any work
    source = read_adapter_on_base(adapter, model)  # the file's one read; its recorded seed only on its backbone
    spec, num_classes = source.model_spec, source.num_classes
    # Steps, as the dense export shows them: the base model, the folder, its owner's load and check.
    steps = Progress(total=3, desc=f"visadapt export {format}: building the base model", unit="steps")
    base, facts = source.build_base(pretrained or "none", num_classes)
    library = facts["library"]
    fresh = copy.deepcopy(base)
    source.load_into(base)
    del source
    inputs = probe_inputs(base, library, probe_size)
    reference = run_outputs(ModelOutputs(base, library, list(inputs)), inputs)
    names = output_names(library, len(reference), num_classes)
    kwargs = {"base_model_name_or_path": spec} if format == "peft" else {}
    staging = Path(tempfile.mkdtemp(prefix=".visadapt-export-"))
    try:
        steps.update(1)
        steps.set_description(f"visadapt export {format}: writing the folder")
        written = export_adapter(base, staging, format, **kwargs)
        steps.update(1)
        steps.set_description(f"visadapt export {format}: loading it with its own library and checking")
        loaded = _owner_loaded(fresh, staging, format)
        got = run_outputs(ModelOutputs(loaded, library, list(inputs)), inputs)
        steps.update(1)
        check = compare(reference, got, names, DENSE_RTOL if tolerance is None else tolerance)
        report = {"format": format, "adapter": str(adapter), "model": spec, "library": library,
                  "files": sorted(p.name for p in written.values()), "check": check, "folder": str(to)}
        if not check["passed"]:
            raise ExportParityError(f"the {format} folder, loaded by its own library, does not reproduce visadapt's "
                                    f"outputs (max |diff| {check['max_abs_diff']:.3g} > {check['tolerance']:.3g} on "
                                    f"{check['worst_output']}); nothing was written to {to}", report)
        with destination as final_staging:
            for name in report["files"]:
                shutil.copy2(staging / name, final_staging / name)
        return report
    finally:
        steps.close()
        shutil.rmtree(staging, ignore_errors=True)


LOADERS = {
    "peft": "PeftModel.from_pretrained(base_model, '{dir}')",
    "diffusers": "pipe.load_lora_weights('{dir}')",
    "resadapter": "pipe.load_lora_weights('{dir}', adapter_name='res_adapter'); "
                  f"pipe.unet.load_state_dict(load_file('{{dir}}/{RESADAPTER_NORM_FILE}'), strict=False)",
}


def format_report(report: dict[str, Any]) -> str:
    check = report["check"]
    return "\n".join([
        f"{report['format']} export of {report['adapter']} on {report['model']} [{report['library']}]",
        f"  wrote {', '.join(report['files'])} to {report['folder']}",
        (f"  loaded by its own library: max |diff| {check['max_abs_diff']:.3g} <= tolerance "
         f"{check['tolerance']:.3g} (output {check['worst_output']}): ok"),
        f"  load with {LOADERS[report['format']].format(dir=report['folder'])}",
    ])


__all__ = ["ExactLora", "diffusers_lora_layers", "exact_loras", "export_adapter", "export_diffusers", "export_file",
           "export_peft", "export_resadapter", "format_report", "lora_config"]
