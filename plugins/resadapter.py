"""ResAdapter (Cheng et al., 2024, arXiv 2403.02084): a resolution adapter for frozen diffusion UNets.

Two parts, both on a diffusers ``UNet2DConditionModel`` (site kinds of :mod:`visadapt.sites`):

* **ResCLoRA**: LoRA on convolutions of the UNet's down and up blocks, never on attention (attention LoRA
  carries style, which ResAdapter must not change). The paper says "the convolutions of the ResNet blocks";
  the *released* weights adapt the resolution-changing convolutions, i.e. each down block's
  ``Downsample2D.conv`` and each up block's ``Upsample2D.conv`` (site kinds ``downsample`` / ``upsample``),
  rank 16 (32 in ``resadapter_v1_sdxl_extrapolation``), alpha 8, no mid block. Those are the defaults;
  ``lora_targets=("conv1", "conv2")`` gives the paper's wording instead.
* **ResENorm**: the group norms of the ResNet blocks (``resnets.*.norm1`` / ``norm2``) of the down, **mid**
  and up blocks made trainable (the released normalisation files include ``mid_block``; attention-block norms
  and ``conv_norm_out`` are not included). The base norm is never modified: :class:`ResolutionNorm` sits at
  the norm's ``replace`` site and returns a group norm of the same input with its own affine, initialised
  from the base's. Merging writes the affine into the base norm and keeps the original for an exact unmerge.

Runtime weight ``w`` (:func:`visadapt.set_weight`, ``pipe.load_visadapt(..., weight=w)``,
``set_visadapt_weights``, ``fuse_visadapt(lora_scale=...)``): as in the official code, which passes its
``resadapter_alpha`` to ``pipe.set_adapters(["res_adapter"], adapter_weights=[alpha])`` and loads the norms with
``unet.load_state_dict(norms, strict=False)``, ``w`` scales the ResCLoRA deltas ONLY; the norms are fully the
adapter's at every weight, unfused and fused alike. So ``w = 0`` is NOT the base model: it is the base model with
the adapter's norms (detach or ``set_active_adapters`` gives the base model). The config field
``norm_weight_blend=True`` brings back the blend ``w * adapted + (1 - w) * base`` at the norms too (off by
default; it is no official setting: such a model differs from the official loader's at every ``w != 1``).

Parameter count (``C`` = channels of an adapted conv / norm, ``k = 3`` the kernel size, ``r`` the rank):
``sum over LoRA convs of r * (C_in * k * k + C_out)`` plus ``sum over norms of 2 * C``. SD1.5: downsamplers
320/640/1280, upsamplers 1280/1280/640, so ``16 * 10 * 5440 = 870,400`` LoRA parameters, plus 44 norms with
``99,840``: **970,240** (the README's "0.9M"). SDXL: downsamplers 320/640, upsamplers 1280/640,
``16 * 10 * 2880 = 460,800`` plus 34 norms with ``66,560``: **527,360** ("0.5M"). Counted on the real
UNet configs on the meta device in ``tests/test_resadapter.py``.

Official checkpoints (format ``"resadapter"`` below; key names read from the released files of
``bytedance/res-adapter``, ``models/res_adapter/resadapter_v{1,2}_{sd1.5,sdxl}*/``):

* LoRA file ``pytorch_lora_weights.safetensors`` (March 2024 commits: ``resolution_lora.safetensors``), kohya layout,
  float16: ``lora_unet_down_blocks_{i}_downsamplers_0_conv.lora_down.weight`` ``(r, C, 3, 3)``,
  ``...lora_up.weight`` ``(C, r, 1, 1)``, ``...alpha`` (scalar, 8.0); likewise
  ``lora_unet_up_blocks_{i}_upsamplers_0_conv.*``. SD1.5: down blocks 0-2 and up blocks 0-2 (18 tensors);
  SDXL: down blocks 0-1, up blocks 0-1 (12 tensors).
* Normalisation file ``diffusion_pytorch_model.safetensors`` (March 2024: ``resolution_normalization.safetensors``),
  float32, diffusers UNet parameter names: ``{down_blocks.{i},mid_block,up_blocks.{i}}.resnets.{j}.norm{1,2}.
  {weight,bias}`` (SD1.5: 88 tensors, SDXL: 68). The "-i" (interpolation) models may ship the LoRA file alone;
  they load as ``norm=False``.

The authors load them with two calls (``pipe.load_lora_weights(lora)`` and ``pipe.unet.load_state_dict(norms,
strict=False)``, which ignores keys that match nothing). Here one call converts both into one visadapt adapter,
and every key that fits nothing is an error. Both namings load; :func:`export_official` writes the current one.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visadapt import api, inject
from visadapt.formats import CheckpointFormat, refuse_metadata, register_format
from visadapt.load_report import MISSING, UNEXPECTED, AdapterLoadError, LoadReport
from visadapt.lora_layouts import (
    LoraLayoutError,
    fitting_loras,
    header_keys,
    load_lora_weights_into,
    looks_like_lora,
    lora_modules,
    read_lora_state,
    report_text_encoder,
)
from visadapt.peft_compat import named_layers, unwrap_peft_model
from visadapt.plugin import (
    AdapterConfig,
    AdapterPlugin,
    check_dropout,
    check_positive,
    check_positive_int,
    config_field,
)
from visadapt.plugins.lora import LoRAConfig, LoRAPlugin
from visadapt.registry import register_plugin
from visadapt.sites import all_sites, find_sites

#: the parts of a diffusers UNet, by the path prefix of their modules
UNET_PARTS = {"down": r"down_blocks\.\d+", "mid": r"mid_block", "up": r"up_blocks\.\d+"}
LORA_KINDS = ("downsample", "upsample", "conv1", "conv2")
_RESNET_NORM = r"resnets\.\d+\.norm[12]$"


def _parts_regex(parts: tuple[str, ...]) -> str:
    return "^(?:" + "|".join(UNET_PARTS[p] for p in parts) + r")\."


def _check_parts(name: str, parts: tuple[str, ...]) -> None:
    bad = [p for p in parts if p not in UNET_PARTS]
    if bad or not parts:
        raise ValueError(f"config field {name}={parts!r}: choose one or more of {tuple(UNET_PARTS)}")


@dataclass
class ResAdapterConfig(AdapterConfig):
    rank: int = config_field(16, "rank of the ResCLoRA convolutions (released checkpoints: 16)")
    alpha: float = config_field(8.0, "LoRA alpha; the delta is scaled by alpha / rank (released: 8)")
    lora_targets: tuple[str, ...] = config_field(("downsample", "upsample"),
                                                 "conv site kinds that get LoRA: downsample, upsample (released "
                                                 "weights), conv1, conv2 (ResNet convolutions, the paper's text)")
    lora_blocks: tuple[str, ...] = config_field(("down", "up"), "UNet parts whose convs get LoRA: down, mid, up")
    norm: bool = config_field(True, "ResENorm: trainable ResNet group norms (False: the '-i' interpolation-only "
                                    "variants, LoRA alone)")
    norm_blocks: tuple[str, ...] = config_field(("down", "mid", "up"),
                                                "UNet parts whose ResNet norms are trainable (released: all three)")
    dropout: float = config_field(0.0, "dropout on the input of the LoRA path")
    norm_weight_blend: bool = config_field(False, "the runtime weight w also blends the norms (w * adapted + "
                                                  "(1 - w) * base); off: w scales the LoRA only and the norms are "
                                                  "the adapter's, as the official loader does")

    def validate(self) -> None:
        check_positive_int("rank", self.rank)
        check_positive("alpha", self.alpha)
        check_dropout("dropout", self.dropout)
        bad = [k for k in self.lora_targets if k not in LORA_KINDS]
        if bad or not self.lora_targets:
            raise ValueError(f"config field lora_targets={self.lora_targets!r}: choose one or more of {LORA_KINDS}")
        _check_parts("lora_blocks", self.lora_blocks)
        _check_parts("norm_blocks", self.norm_blocks)

    def lora_config(self) -> LoRAConfig:
        """The ResCLoRA part as a config of the ``lora`` plugin (one LoRA implementation for both)."""
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.lora_targets,
                          path_pattern=_parts_regex(self.lora_blocks))


class ResolutionNorm(nn.Module):
    """ResENorm at one ``nn.GroupNorm``: ``group_norm(x, groups, weight, bias, eps)`` with a trainable affine of
    its own, initialised from the base norm's, so the adapter starts as the identity. ``x`` is ``(N, C, H, W)``.

    It sits at the norm's ``replace`` site (:mod:`visadapt.inject`): the base norm and its tensors stay as they
    are. ``merge_into_host`` writes the affine into the base norm and keeps the original, which
    ``unmerge_from_host`` puts back bit for bit.

    ``blends_with_weight`` (fixed at construction; the hooks read it once through
    :func:`visadapt.inject.blends_with_weight`): False (default, the official semantics) keeps this affine at
    every runtime weight; True gives ``w * adapted + (1 - w) * base``, unmerged and merged alike (both through
    :func:`visadapt.inject.replace_weight`).
    """

    def __init__(self, norm: nn.GroupNorm, blends_with_weight: bool = False) -> None:
        super().__init__()
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"ResolutionNorm adapts nn.GroupNorm layers, not {type(norm).__name__}")
        self.blends_with_weight = bool(blends_with_weight)
        self.num_groups, self.eps = norm.num_groups, norm.eps
        channels = norm.num_channels
        self.weight = nn.Parameter(norm.weight.detach().clone() if norm.affine else torch.ones(channels))
        self.bias = nn.Parameter(norm.bias.detach().clone() if norm.affine else torch.zeros(channels))
        self.merged = False
        self._saved_affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    @torch.no_grad()
    def merge_into_host(self, norm: nn.GroupNorm) -> None:
        if self.merged:
            return
        if not norm.affine:
            raise ValueError("a ResolutionNorm can merge only into a group norm with an affine (affine=True)")
        weight = inject.replace_weight(self)  # the hooks' rule, so merged and unmerged outputs agree
        self._saved_affine = (norm.weight.detach().clone(), norm.bias.detach().clone())
        # affine parameters enter the output linearly, so the weighted mix of outputs is the mix of affines;
        # unblended (the default), the adapter's affine is copied as it is
        for base, own in ((norm.weight, self.weight), (norm.bias, self.bias)):
            mixed = own.float() if weight == 1.0 else weight * own.float() + (1.0 - weight) * base.float()
            base.copy_(mixed.to(base.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_from_host(self, norm: nn.GroupNorm) -> None:
        if not self.merged:
            return
        norm.weight.copy_(self._saved_affine[0])
        norm.bias.copy_(self._saved_affine[1])
        self._saved_affine = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, merged={self.merged}, "
                f"blends_with_weight={self.blends_with_weight}")


def norm_sites(model: nn.Module, parts: tuple[str, ...]):
    """The ResNet group-norm sites (``resnets.*.norm1/norm2``) of the given UNet ``parts``."""
    return find_sites(model, ["norm"], path_pattern=_parts_regex(parts) + _RESNET_NORM)


@register_plugin("resadapter")
class ResAdapterPlugin(AdapterPlugin):
    Config = ResAdapterConfig
    families = ("diffusers_unet",)
    mergeable = True

    def attach(self, model: nn.Module, config: ResAdapterConfig, adapter_name: str) -> None:
        LoRAPlugin().attach(model, config.lora_config(), adapter_name)
        if config.norm:
            for site in norm_sites(model, config.norm_blocks):
                inject.insert(site, adapter_name, ResolutionNorm(site.host, config.norm_weight_blend))


# ------------------------------------------------------------------------------------------ official checkpoints

# current release names first, then the March 2024 ones (both load)
LORA_FILES = ("pytorch_lora_weights.safetensors", "resolution_lora.safetensors")
NORM_FILES = ("diffusion_pytorch_model.safetensors", "resolution_normalization.safetensors")
_NORM_KEY = re.compile(r"^(?P<path>(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.resnets\.\d+\.norm[12])\."
                       r"(?P<param>weight|bias)$")
# the module paths ResCLoRA may adapt: resolution-changing convs and ResNet convs of down/mid/up blocks
_LORA_PATH = re.compile(r"^(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\."
                        r"(?:downsamplers\.0\.conv|upsamplers\.0\.conv|resnets\.\d+\.conv[12])$")


def _lora_paths(keys) -> set[str] | None:
    """The module paths a LoRA key list names, when it is a LoRA of ResAdapter's module kinds; else None."""
    keys = list(keys)
    if not looks_like_lora(keys):
        return None
    try:
        paths = set(read_lora_state({k: torch.zeros(1, 1) if not k.endswith("alpha") else torch.zeros(())
                                     for k in keys}))
    except LoraLayoutError:
        return None
    return paths if paths and all(_LORA_PATH.match(p) for p in paths) else None


def _first(files: Mapping[str, Path], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in files), None)


def split_official_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(lora tensors, norm tensors)`` of one dict holding both halves of a ResAdapter checkpoint."""
    norms = {k: v for k, v in state.items() if _NORM_KEY.match(k)}
    return {k: v for k, v in state.items() if k not in norms}, norms


@register_format("resadapter")
class ResAdapterFormat(CheckpointFormat):
    """The official two-file release (see the module docstring), converted on load into ONE visadapt
    ``resadapter`` adapter. Also an in-memory dict holding the LoRA keys and the norm keys together."""

    file_names = LORA_FILES + NORM_FILES

    @classmethod
    def detect(cls, files, state) -> bool:
        if state is not None:
            lora, _norms = split_official_state(state)
            return bool(lora) and _lora_paths(lora) is not None
        lora_name, norm_name = _first(files, LORA_FILES), _first(files, NORM_FILES)
        if lora_name is None:
            return False
        try:
            if _lora_paths(header_keys(files[lora_name])) is None:
                return False
            return norm_name is None or all(_NORM_KEY.match(k) for k in header_keys(files[norm_name]))
        except (OSError, ValueError, RuntimeError):  # not safetensors: not this format
            return False

    def load(self, model, files, state, adapter_name, strict=True, metadata=None):
        refuse_metadata(self, metadata)  # the official files carry no scale or config in their headers
        if state is not None:
            lora_state, norm_state = split_official_state(state)
            where = "the state dict"
        else:
            from safetensors.torch import load_file

            lora_name, norm_name = _first(files, LORA_FILES), _first(files, NORM_FILES)
            if lora_name is None:
                raise FileNotFoundError(f"no ResAdapter LoRA file among {sorted(files)}; expected {LORA_FILES[0]} "
                                        f"(or {LORA_FILES[1]})")
            lora_state = load_file(str(files[lora_name]))
            norm_state = load_file(str(files[norm_name])) if norm_name else {}
            where = ", ".join(str(files[n]) for n in (lora_name, norm_name) if n)
        return load_official(model, lora_state, norm_state, adapter_name, strict=strict, source=where)


def load_official(unet: nn.Module, lora_state: Mapping[str, torch.Tensor], norm_state: Mapping[str, torch.Tensor],
                  adapter_name: str = "default", *, strict: bool = True,
                  source: str = "the ResAdapter state dicts") -> ResAdapterConfig:
    """Attach a ``resadapter`` adapter equal to the official LoRA tensors (kohya or PEFT layout) plus the
    normalisation tensors (diffusers UNet names; empty for the "-i" models).

    The config is derived from the tensors (rank, alpha, which conv kinds and UNet parts, norm on/off). Every key
    of both files goes into one :class:`~visadapt.load_report.LoadReport` (on the adapter's record):
    ``strict`` (default) raises with it unless every key lands, leaving the UNet as it was; ``strict=False``
    attaches and loads what fits and prints the rest. Returns the config, so :func:`visadapt.save_adapter`
    writes one visadapt file.
    """
    report = LoadReport(source, f"adapter {adapter_name!r}")
    unet = unwrap_peft_model(unet)  # a peft.PeftModel around the UNet: the adapter goes on the UNet
    # canonical paths (peft_compat.named_layers): a conv an LCM-LoRA wrapped is named as itself, PEFT's own modules
    # are not the UNet's
    loras = read_lora_state(lora_state, module_names=[name for name, _ in named_layers(unet)], report=report)
    report_text_encoder(loras, report, "a ResAdapter LoRA adapts the UNet only")
    for key in sorted(k for k in norm_state if not _NORM_KEY.match(k)):
        report.add(key.rpartition(".")[0] or key, key, UNEXPECTED,
                   "not a ResNet group norm of the UNet's down/mid/up blocks")
    outside = {p: w for p, w in loras.items() if not _LORA_PATH.match(p)}
    for path, weights in outside.items():
        for key in weights.keys:
            report.add(path, key, UNEXPECTED, "outside ResAdapter's convolutions (down/upsamplers, ResNet "
                                              "conv1/conv2): load such a file as a plain LoRA ('diffusers_lora')")
    loras = fitting_loras(unet, {p: w for p, w in loras.items() if p not in outside}, report)
    norm_state = {k: v for k, v in norm_state.items() if _NORM_KEY.match(k)}
    if not loras:
        report.enforce(strict)  # raises: nothing of the LoRA fits, so no config can be derived
    kinds_by_path = {s.path: s.kind for s in all_sites(unet)}
    ranks = {w.rank for w in loras.values()}
    alphas = {w.alpha if w.alpha is not None else w.rank for w in loras.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise LoraLayoutError(f"{source}: ResAdapter uses one rank and one alpha for all its convolutions; this file "
                              f"has ranks {sorted(ranks)} and alphas {sorted(alphas)}: load it as a plain LoRA instead")
    norm_paths = {m.group("path") for m in map(_NORM_KEY.match, norm_state)}

    def parts_of(paths) -> tuple[str, ...]:
        return tuple(part for part, prefix in UNET_PARTS.items() if any(re.match(prefix + r"\.", p) for p in paths))

    config = ResAdapterConfig(
        rank=ranks.pop(), alpha=float(alphas.pop()),
        lora_targets=tuple(k for k in LORA_KINDS if k in {kinds_by_path.get(p) for p in loras}),
        lora_blocks=parts_of(loras), norm=bool(norm_paths),
        norm_blocks=parts_of(norm_paths) if norm_paths else ResAdapterConfig.norm_blocks,
    )
    api.attach(unet, "resadapter", config, adapter_name=adapter_name)
    try:
        attached = lora_modules(unet, adapter_name)
        for path in sorted(set(attached) - set(loras)):  # a site the config covers that the file has no LoRA for
            report.add(path, f"{path}.lora_down/lora_up", MISSING)
        norms = {item.host_path: item.module for item in inject.attached(unet, adapter_name)
                 if isinstance(item.module, ResolutionNorm)}
        expected = {f"{path}.{param}": getattr(module, param) for path, module in norms.items()
                    for param in ("weight", "bias")}
        norm_fits = report.compare(norm_state, expected, site_of=lambda key: key.rpartition(".")[0])
        try:
            report.enforce(strict)
        except AdapterLoadError as err:
            raise LoraLayoutError(str(err), report) from err
        load_lora_weights_into(unet, {p: w for p, w in loras.items() if p in attached}, adapter_name,
                               allow_missing=not strict)
        with torch.no_grad():
            for key in norm_fits:
                expected[key].copy_(norm_state[key])
    except Exception:
        api.detach(unet, adapter_name)
        raise
    api.get_record(unet, adapter_name).load_report = report
    return config


def official_state(unet: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, torch.Tensor]]:
    """The adapter in the official layout: ``(kohya LoRA tensors with alphas, norm tensors under diffusers UNet
    names)``, the contents of ``pytorch_lora_weights.safetensors`` and ``diffusion_pytorch_model.safetensors``.
    Tensors keep the adapter's dtype (the released files are float16 LoRA / float32 norms; fp32 here is exact).
    The runtime weight is not in them: the official loader takes it as ``set_adapters(..., adapter_weights=[w])``."""
    from visadapt.layers import LoRA

    record = api.get_record(unet, adapter_name)
    if record.plugin.name != "resadapter":
        raise ValueError(f"adapter {adapter_name!r} is a {record.plugin.name} adapter, not a resadapter one")
    lora, norms = {}, {}
    for item in inject.attached(unet, adapter_name):
        if isinstance(item.module, LoRA):
            name = "lora_unet_" + item.host_path.replace(".", "_")
            lora[f"{name}.lora_down.weight"] = item.module.A.weight.detach().clone()
            lora[f"{name}.lora_up.weight"] = item.module.B.weight.detach().clone()
            lora[f"{name}.alpha"] = torch.tensor(float(item.module.alpha))
        elif isinstance(item.module, ResolutionNorm):
            norms[f"{item.host_path}.weight"] = item.module.weight.detach().clone()
            norms[f"{item.host_path}.bias"] = item.module.bias.detach().clone()
    return lora, norms


def export_official(unet: nn.Module, folder, adapter_name: str = "default", *,
                    overwrite: bool = True) -> dict[str, Path]:
    """Write ``adapter_name`` as the official release does, to ``folder`` (created): ``pytorch_lora_weights.
    safetensors`` (kohya LoRA, :func:`official_state`) and, unless the adapter has no norms (``norm=False``, the
    "-i" variants), ``diffusion_pytorch_model.safetensors``. Existing files of these two names are replaced
    (``overwrite=False`` refuses them), a norm file this adapter does not write is removed (it is an earlier
    export's), and nothing in ``folder`` changes when writing fails (files are staged and moved in at the end).

    The official loading gives this adapter's outputs at weight ``w``::

        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="res_adapter")
        pipe.set_adapters(["res_adapter"], adapter_weights=[w])
        pipe.unet.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=False)

    An adapter created with ``norm_weight_blend=True`` has no official equivalent at ``w != 1`` (the official norms
    are unweighted); its files are the same, and equal outputs hold at weight 1. Returns ``{role: path}``.
    """
    from safetensors.torch import save_file

    from visadapt.interop_export import _StagedFolder

    lora, norms = official_state(unet, adapter_name)
    folder = Path(folder)
    roles = {"lora": (LORA_FILES[0], lora)} | ({"norms": (NORM_FILES[0], norms)} if norms else {})
    # the staging folder removes a norm file of an earlier export when this adapter writes none
    with _StagedFolder(folder, (LORA_FILES[0], NORM_FILES[0]), overwrite) as staging:
        for name, tensors in roles.values():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / name), metadata={"format": "pt"})
    return {role: folder / name for role, (name, _) in roles.items()}
