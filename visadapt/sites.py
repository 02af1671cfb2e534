"""Where adapters can go: the one module that knows model internals.

Every supported family offers the same site names for transformer blocks, so a plugin written against
sites works on timm and open_clip alike:

==============  =====================================================================================
``attn_out``    serial, on the attention branch output before the residual add (Houlsby)
``mlp``         parallel to the MLP branch, fed the block's residual stream (AdaptFormer)
``mlp_out``     serial, on the MLP branch output before the residual add (Houlsby, Pfeiffer)
``attn_branch`` serial on the attention output inside its branch, before LayerScale: ``LS(a + f(a))`` (SelaVPR)
``attn_residual`` serial on the residual stream right after the attention's residual add: ``h + f(h)`` with
                ``h = x + attention branch``, so the MLP branch and its skip both read ``h + f(h)`` (MoSA's Houlsby)
``mlp_branch``  parallel to the MLP inside its branch: fed the MLP's (normalised) input, added to the MLP's
                output before LayerScale and the residual add (SelaVPR)
``block_out``   serial, on the block output
``qkv``         the fused q/k/v projection; ``q``, ``k``, ``v`` are its row slices
``proj``        attention output projection
``fc1``, ``fc2``  the MLP's two linear layers
==============  =====================================================================================

Diffusers UNets offer ``to_q``, ``to_k``, ``to_v``, ``to_out`` (attention projections; ``q``/``k``/``v``/
``proj`` are accepted as aliases), ``conv1``/``conv2`` (ResNet-block convolutions), ``downsample``/``upsample``
(the convolution of each down block's ``Downsample2D`` and each up block's ``Upsample2D``, which ResAdapter's
released LoRA adapts) and ``norm`` (the group norms of ResNet blocks and attention blocks; a module there
*replaces* the norm's output, e.g. a group norm with its own trainable affine).

timm ResNets (convolutional classifiers, e.g. the guidance classifiers of PPAP) offer ``stem`` (the first
convolution), ``conv1``/``conv2``/``conv3`` (the convolutions of every BasicBlock / Bottleneck), ``downsample``
(the shortcut's projection convolution), ``bn`` (every ``BatchNorm2d``: stem, blocks and shortcuts; a module
there *replaces* the norm's output) and ``head`` (the final ``fc``, replaced). A site's ``block`` is the index of
its residual block counted over all stages; the stem belongs to block 0.

:func:`module_sites` offers any ``nn.Linear`` / ungrouped ``nn.Conv2d`` by its module path (PEFT's
``target_modules``), for LoRA files that name their modules rather than site kinds.

A layer PEFT has wrapped (``pipe.load_lora_weights``, ``get_peft_model``) is offered as the real layer under the
wrapper (its ``base_layer``), at the path it had before PEFT wrapped it (:mod:`visadapt.peft_compat`): visadapt's
adapters then survive PEFT unloading its own, and their paths are the same with or without PEFT.

Each :class:`Site` says *how* an adapter attaches there (see :mod:`visadapt.inject`):
``output`` (add ``f(y)`` to the host's output ``y``), ``input`` (replace the host's input ``x`` by
``x + f(x)``), ``parallel`` (add ``f(x_branch)`` to the block output, ``x_branch`` being the input of
the ``tap`` module), ``linear`` (add ``f(x)`` to a Linear/Conv host's output, optionally on a row slice),
``residual`` (the ``tap`` child of the host block ends the attention branch; its output ``d`` becomes
``d + f(x + d)``, ``x`` being the block's input, so the block's own residual add gives ``h + f(h)``),
``weight`` (add a weight delta to parameter ``param`` of the host, for layers whose weights are read
directly rather than called, such as ``nn.MultiheadAttention``), ``replace`` (the module's output replaces the
host's: a classifier head, a normalisation layer) and ``held`` (a module kept on the model that the plugin calls itself, such as a head over the patch tokens).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from visadapt.peft_compat import base_layer, is_peft_layer, named_layers

FAMILIES = ("timm_vit", "timm_swin", "open_clip", "diffusers_unet", "timm_resnet")

#: site kinds of transformer families, in the order they are listed
TRANSFORMER_KINDS = (
    "attn_out", "attn_branch", "attn_residual", "mlp", "mlp_out", "mlp_branch", "block_out", "qkv", "q", "k", "v", "proj",
    "fc1", "fc2"
)
# Whole-model sites after the blocks: the timm ViT classifier, which a module replaces (quantised heads).
VIT_MODEL_KINDS = ("head",)
UNET_KINDS = ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2", "downsample", "upsample", "norm")
#: the transformer names accepted on UNets, so one LoRA config (``targets=("q", "v")``) fits every family
UNET_ALIASES = {"q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out"}
#: site kinds of timm ResNets (BasicBlock and Bottleneck stages)
RESNET_KINDS = ("stem", "conv1", "conv2", "conv3", "downsample", "bn", "head")

_FAMILY_CLASSES = {
    "timm_vit": {("timm.models.vision_transformer", "VisionTransformer")},
    "timm_swin": {("timm.models.swin_transformer", "SwinTransformer")},
    "timm_resnet": {("timm.models.resnet", "ResNet")},
    "open_clip": {
        ("open_clip.model", "CLIP"),
        ("open_clip.model", "CustomTextCLIP"),
        ("open_clip.transformer", "VisionTransformer"),
        ("open_clip.transformer", "TextTransformer"),
    },
    "diffusers_unet": {
        ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"),
        ("diffusers.models.unets.unet_2d", "UNet2DModel"),
    },
}


class UnsupportedModelError(TypeError):
    """The model belongs to no family visadapt knows."""


@dataclasses.dataclass(eq=False)
class Site:
    """One place in a model where an adapter can attach.

    ``path`` is the dotted name of the host module inside the model, ``block`` the index of the block
    it belongs to (forward order, counted per tower), ``in_features``/``out_features`` the widths an
    adapter there must have (channels for convolutions).
    """

    path: str
    kind: str
    block: int
    in_features: int
    out_features: int
    host: nn.Module
    how: str
    tower: str | None = None
    rows: tuple[int, int] | None = None  # q/k/v: the output rows of the fused projection
    #: parallel: attribute name, on the host, of the module whose input feeds the adapter; residual: of the module
    #: ending the attention branch, whose output the adapter's delta is added to
    tap: str | None = None
    param: str | None = None  # weight: the parameter of the host that receives the delta
    #: weight: a PEFT tuner layer wraps the attention holding this weight (PEFT's MultiheadAttention LoRA swaps
    #: its weights at every call, which a parametrization cannot share; :func:`visadapt.inject.insert` refuses)
    peft_wrapped: bool = False

    @property
    def name(self) -> str:
        """Unique, human-readable name: host path plus the kind where several kinds share a host."""
        return f"{self.path}:{self.kind}"


def model_family(model: nn.Module) -> str:
    """The family of ``model`` (one of :data:`FAMILIES`), recognised by class without importing libraries."""
    for cls in type(model).__mro__:
        for family, classes in _FAMILY_CLASSES.items():
            if (cls.__module__, cls.__name__) in classes:
                return family
    raise UnsupportedModelError(
        f"visadapt does not know models of class {type(model).__module__}.{type(model).__qualname__}; "
        f"supported families: timm VisionTransformer (timm_vit, incl. DINOv2), timm SwinTransformer (timm_swin), "
        f"open_clip CLIP / CustomTextCLIP / their towers (open_clip), diffusers UNet2DConditionModel / "
        f"UNet2DModel (diffusers_unet), timm ResNet (timm_resnet)"
    )


def model_name(model: nn.Module) -> str | None:
    """The model's published name where the library records one (timm architecture, diffusers repo id)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        tag = cfg.get("tag")
        return f"{cfg['architecture']}.{tag}" if tag else cfg["architecture"]
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    # diffusers keeps whatever from_pretrained was given, a pathlib.Path included; the fingerprint is JSON
    return str(name) if name else None


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    raise TypeError(f"cannot read a feature width from {type(module).__name__}")


def _transformer_block_sites(
    block: nn.Module, path: str, index: int, tower: str | None, layout: dict[str, str]
) -> list[Site]:
    """Sites of one pre-norm transformer block; ``layout`` names its submodules in this family."""
    out: list[Site] = []

    def get(name: str) -> nn.Module:
        return base_layer(block.get_submodule(layout[name]))  # the real layer, also under a PEFT wrapper

    def sub(name: str) -> str:
        return f"{path}.{layout[name]}"

    dim = _width(get("norm1"))
    attn_out_how = layout.get("attn_out_how", "output")
    mlp_out_how = layout.get("mlp_out_how", "output")
    out.append(Site(sub("attn_out"), "attn_out", index, dim, dim, get("attn_out"), attn_out_how, tower))
    # The LayerScale (Swin: drop_path) module's *input* is the raw attention output: adapting it there is
    # LS(a + f(a)), inside the branch, whatever the attention module returns.
    out.append(Site(sub("attn_out"), "attn_branch", index, dim, dim, get("attn_out"), "input", tower))
    # The last module of the attention branch returns what the block adds to its input x: adding f(x + d) to
    # that output d puts f on the stream after the residual add, with no access to the block's own code.
    out.append(Site(path, "attn_residual", index, dim, dim, block, "residual", tower, tap=layout["attn_end"]))
    out.append(Site(path, "mlp", index, dim, dim, block, "parallel", tower, tap=layout["norm2"]))
    out.append(Site(sub("mlp_out"), "mlp_out", index, dim, dim, get("mlp_out"), mlp_out_how, tower))
    # The MLP module itself hosts a "linear"-style site: its output gains f(its input), inside the branch.
    out.append(Site(sub("mlp"), "mlp_branch", index, dim, dim, get("mlp"), "linear", tower))
    out.append(Site(path, "block_out", index, dim, dim, block, "output", tower))

    if layout.get("qkv_param"):
        # Attention that reads a fused weight directly (nn.MultiheadAttention): weight deltas only.
        attn = get("attn")
        wrapped = is_peft_layer(block.get_submodule(layout["attn"]))
        qkv_out = getattr(attn, layout["qkv_param"]).shape[0]
        per = qkv_out // 3
        out.append(Site(sub("attn"), "qkv", index, dim, qkv_out, attn, "weight", tower, param=layout["qkv_param"],
                        peft_wrapped=wrapped))
        for i, kind in enumerate("qkv"):
            out.append(Site(sub("attn"), kind, index, dim, per, attn, "weight", tower,
                            rows=(i * per, (i + 1) * per), param=layout["qkv_param"], peft_wrapped=wrapped))
        proj = get("proj")
        out.append(Site(sub("proj"), "proj", index, proj.in_features, proj.out_features, proj, "weight", tower,
                        param="weight", peft_wrapped=wrapped or is_peft_layer(block.get_submodule(layout["proj"]))))
    else:
        qkv = get("qkv")
        per = qkv.out_features // 3
        out.append(Site(sub("qkv"), "qkv", index, qkv.in_features, qkv.out_features, qkv, "linear", tower))
        for i, kind in enumerate("qkv"):
            out.append(Site(sub("qkv"), kind, index, qkv.in_features, per, qkv, "linear", tower,
                            rows=(i * per, (i + 1) * per)))
        proj = get("proj")
        out.append(Site(sub("proj"), "proj", index, proj.in_features, proj.out_features, proj, "linear", tower))
    for kind in ("fc1", "fc2"):
        try:
            fc = get(kind)
        except AttributeError:
            continue  # e.g. SwiGLU MLPs split fc1 in two; those layers are simply not offered
        if isinstance(fc, nn.Linear):
            out.append(Site(sub(kind), kind, index, fc.in_features, fc.out_features, fc, "linear", tower))
    return out


_TIMM_VIT_LAYOUT = {
    "norm1": "norm1", "norm2": "norm2", "attn_out": "ls1", "attn_end": "drop_path1", "mlp_out": "ls2", "mlp": "mlp",
    "qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
}
# Swin blocks have no LayerScale; the branch output is the input of drop_path, which is always called.
_TIMM_SWIN_LAYOUT = dict(_TIMM_VIT_LAYOUT, attn_out="drop_path1", mlp_out="drop_path2",
                         attn_out_how="input", mlp_out_how="input")
_OPEN_CLIP_LAYOUT = {
    "norm1": "ln_1", "norm2": "ln_2", "attn_out": "ls_1", "attn_end": "ls_1", "mlp_out": "ls_2", "mlp": "mlp",
    "attn": "attn", "qkv_param": "in_proj_weight", "proj": "attn.out_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj",
}


def _check_block(block: nn.Module, layout: dict[str, str], family: str) -> None:
    for key, name in layout.items():
        if key.endswith("_how") or key in ("fc1", "fc2", "qkv_param"):
            continue
        try:
            block.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(
                f"{family} block of class {type(block).__name__} has no submodule {name!r}; visadapt supports "
                f"pre-norm blocks (timm Block / SwinTransformerBlock, open_clip ResidualAttentionBlock)"
            ) from None


def _timm_vit_sites(model: nn.Module) -> list[Site]:
    sites = []
    for i, block in enumerate(model.blocks):
        _check_block(block, _TIMM_VIT_LAYOUT, "timm_vit")
        sites += _transformer_block_sites(block, f"blocks.{i}", i, None, _TIMM_VIT_LAYOUT)
    head = base_layer(getattr(model, "head", None))
    if isinstance(head, nn.Linear):
        # A module here *replaces* the classifier (e.g. a quantised head): how="replace".
        sites.append(Site("head", "head", len(model.blocks), head.in_features, head.out_features, head, "replace"))
    return sites


def _timm_swin_sites(model: nn.Module) -> list[Site]:
    sites, index = [], 0
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            _check_block(block, _TIMM_SWIN_LAYOUT, "timm_swin")
            sites += _transformer_block_sites(block, f"layers.{s}.blocks.{b}", index, None, _TIMM_SWIN_LAYOUT)
            index += 1
    return sites


def _open_clip_towers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(tower, path prefix, module holding .resblocks)`` for each transformer tower present."""
    towers = []
    cls = type(model).__name__
    if cls == "VisionTransformer":
        return [("visual", "transformer", model.transformer)]
    if cls == "TextTransformer":
        return [("text", "transformer", model.transformer)]
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        towers.append(("visual", "visual.transformer", visual.transformer))
    if hasattr(getattr(model, "transformer", None), "resblocks"):  # CLIP keeps its text tower at the top level
        towers.append(("text", "transformer", model.transformer))
    text = getattr(model, "text", None)  # CustomTextCLIP
    if text is not None and hasattr(getattr(text, "transformer", None), "resblocks"):
        towers.append(("text", "text.transformer", text.transformer))
    return towers


def _open_clip_sites(model: nn.Module) -> list[Site]:
    sites = []
    towers = _open_clip_towers(model)
    if not towers:
        raise UnsupportedModelError(
            f"open_clip model {type(model).__name__} has no transformer tower (ResNet/timm/HF towers are not sites)"
        )
    for tower, prefix, transformer in towers:
        for i, block in enumerate(transformer.resblocks):
            layout = dict(_OPEN_CLIP_LAYOUT)
            if type(block).__name__ == "CustomResidualAttentionBlock":
                # its attention calls out_proj as a module but still reads in_proj_weight directly
                layout["proj"] = "attn.out_proj"
            _check_block(block, layout, "open_clip")
            sites += _transformer_block_sites(block, f"{prefix}.resblocks.{i}", i, tower, layout)
    return sites


def _unet_sites(model: nn.Module) -> list[Site]:
    sites: list[Site] = []
    resnet_index = attn_index = 0
    # canonical paths, PEFT's own modules skipped; every layer read below is unwrapped to PEFT's base layer
    for path, module in named_layers(model):
        cls = type(module).__name__
        if cls == "ResnetBlock2D":
            for kind in ("conv1", "conv2"):
                conv = base_layer(getattr(module, kind))
                sites.append(Site(f"{path}.{kind}", kind, resnet_index, conv.in_channels, conv.out_channels,
                                  conv, "linear"))
            for norm_name in ("norm1", "norm2"):
                norm = getattr(module, norm_name)
                if isinstance(norm, nn.GroupNorm):
                    sites.append(Site(f"{path}.{norm_name}", "norm", resnet_index, norm.num_channels,
                                      norm.num_channels, norm, "replace"))
            resnet_index += 1
        elif cls in ("Downsample2D", "Upsample2D") and isinstance(base_layer(getattr(module, "conv", None)),
                                                                  nn.Conv2d):
            # the block's resolution change; numbered with the ResNet block before it, so depth is unchanged
            kind = "downsample" if cls == "Downsample2D" else "upsample"
            conv = base_layer(module.conv)
            sites.append(Site(f"{path}.conv", kind, max(resnet_index - 1, 0), conv.in_channels, conv.out_channels,
                              conv, "linear"))
        elif cls == "Attention" and hasattr(module, "to_q"):
            for kind in ("to_q", "to_k", "to_v"):
                lin = base_layer(getattr(module, kind))
                sites.append(Site(f"{path}.{kind}", kind, attn_index, lin.in_features, lin.out_features, lin,
                                  "linear"))
            out = base_layer(module.to_out[0])
            sites.append(Site(f"{path}.to_out.0", "to_out", attn_index, out.in_features, out.out_features, out,
                              "linear"))
            attn_index += 1
        elif cls == "Transformer2DModel" and isinstance(getattr(module, "norm", None), nn.GroupNorm):
            sites.append(Site(f"{path}.norm", "norm", attn_index, module.norm.num_channels,
                              module.norm.num_channels, module.norm, "replace"))
    return sites


def _conv_site(path: str, kind: str, index: int, conv: nn.Module) -> Site:
    conv = base_layer(conv)
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModelError(f"timm_resnet: {path} is a {type(conv).__name__}, not an nn.Conv2d; visadapt "
                                    f"supports ResNets whose stem and block convolutions are plain Conv2d layers")
    return Site(path, kind, index, conv.in_channels, conv.out_channels, conv, "linear")


def _bn_site(path: str, index: int, norm: nn.Module) -> list[Site]:
    norm = base_layer(norm)
    # exactly BatchNorm2d: subclasses such as timm's BatchNormAct2d fold an activation into forward, which a
    # module replacing the output would drop
    if type(norm) is nn.BatchNorm2d and norm.affine:
        return [Site(path, "bn", index, norm.num_features, norm.num_features, norm, "replace")]
    return []


def _timm_resnet_sites(model: nn.Module) -> list[Site]:
    sites: list[Site] = []
    stem = base_layer(model.conv1)
    if isinstance(stem, nn.Sequential):  # deep stems ("resnet50d"): three convolutions, all stem sites
        for name, layer in stem.named_children():
            if isinstance(base_layer(layer), nn.Conv2d):
                sites.append(_conv_site(f"conv1.{name}", "stem", 0, layer))
            else:
                sites += _bn_site(f"conv1.{name}", 0, layer)
    else:
        sites.append(_conv_site("conv1", "stem", 0, stem))
    sites += _bn_site("bn1", 0, model.bn1)
    index = 0
    for stage_name in ("layer1", "layer2", "layer3", "layer4"):
        for b, block in enumerate(getattr(model, stage_name)):
            path = f"{stage_name}.{b}"
            for kind in ("conv1", "conv2", "conv3"):
                conv = getattr(block, kind, None)
                if conv is None:
                    continue  # BasicBlock has no conv3
                sites.append(_conv_site(f"{path}.{kind}", kind, index, conv))
                sites += _bn_site(f"{path}.bn{kind[-1]}", index, getattr(block, f"bn{kind[-1]}"))
            shortcut = getattr(block, "downsample", None)
            if isinstance(shortcut, nn.Sequential):
                for name, layer in shortcut.named_children():
                    if isinstance(base_layer(layer), nn.Conv2d):
                        sites.append(_conv_site(f"{path}.downsample.{name}", "downsample", index, layer))
                    else:
                        sites += _bn_site(f"{path}.downsample.{name}", index, layer)
            index += 1
    head = base_layer(getattr(model, "fc", None))
    if isinstance(head, nn.Linear):
        sites.append(Site("fc", "head", index, head.in_features, head.out_features, head, "replace"))
    return sites


_ENUMERATORS = {
    "timm_vit": _timm_vit_sites,
    "timm_swin": _timm_swin_sites,
    "open_clip": _open_clip_sites,
    "diffusers_unet": _unet_sites,
    "timm_resnet": _timm_resnet_sites,
}


def family_kinds(family: str) -> tuple[str, ...]:
    if family == "diffusers_unet":
        return UNET_KINDS
    if family == "timm_resnet":
        return RESNET_KINDS
    return TRANSFORMER_KINDS + VIT_MODEL_KINDS if family == "timm_vit" else TRANSFORMER_KINDS


def all_sites(model: nn.Module) -> list[Site]:
    """Every site of ``model``, in forward order."""
    return _ENUMERATORS[model_family(model)](model)


def find_sites(
    model: nn.Module,
    kinds: Sequence[str],
    blocks: Iterable[int] | None = None,
    towers: Sequence[str] | None = None,
    path_pattern: str | None = None,
) -> list[Site]:
    """Sites of the given ``kinds``, optionally restricted to block indices, open_clip towers
    (``"visual"``, ``"text"``) and a regular expression on the host path.

    Raises ``ValueError`` when a kind is unknown to the family or when the selection matches nothing,
    listing what the model does offer; a selection that silently adapts nothing is never returned.
    """
    family = model_family(model)
    offered = family_kinds(family)
    resolved = []
    for kind in kinds:
        kind = UNET_ALIASES.get(kind, kind) if family == "diffusers_unet" else kind
        if kind not in offered:
            raise ValueError(f"site {kind!r} does not exist on {family} models; sites there: {', '.join(offered)}")
        resolved.append(kind)
    sites = [s for s in all_sites(model) if s.kind in resolved]
    if towers is not None and family == "open_clip":
        present = sorted({s.tower for s in sites})
        missing = [t for t in towers if t not in present]
        if missing:
            raise ValueError(f"open_clip tower(s) {missing} not in this model; it has {present}")
        sites = [s for s in sites if s.tower in towers]
    if blocks is not None:
        wanted = set(blocks)
        depth = 1 + max((s.block for s in sites), default=-1)
        bad = sorted(b for b in wanted if not 0 <= b < depth)
        if bad:
            raise ValueError(f"block indices {bad} are out of range: this model has blocks 0..{depth - 1}")
        sites = [s for s in sites if s.block in wanted]
    if path_pattern:
        regex = re.compile(path_pattern)
        sites = [s for s in sites if regex.search(s.path)]
    if not sites:
        raise ValueError(
            f"no site matches kinds={list(kinds)}, blocks={blocks}, towers={towers}, path_pattern={path_pattern!r} "
            f"on this {family} model; run `visadapt sites` to see what it offers"
        )
    return sites


def _matches_module(path: str, pattern: str) -> bool:
    return path == pattern or path.endswith("." + pattern)


def module_sites(model: nn.Module, patterns: Sequence[str]) -> list[Site]:
    """Sites at the modules named by ``patterns`` (PEFT ``target_modules``: a full module path such as
    ``down_blocks.0.resnets.0.conv1``, or a dotted suffix such as ``to_q`` that matches every module ending so).

    A module that is also a site of the family (e.g. a UNet ``to_q``, an open_clip ``out_proj`` read as a
    weight) gets that site, kind and attachment included; any other ``nn.Linear`` or ungrouped ``nn.Conv2d``
    gets a ``linear`` site of kind ``module``. Raises ``ValueError`` naming every pattern that matches no
    such layer, so a misspelt target never adapts nothing silently. Paths are canonical: a layer PEFT has wrapped
    matches under its own path (never ``...to_q.base_layer``) and its site is the real layer under the wrapper.
    """
    family = model_family(model)
    known: dict[str, Site] = {}
    for site in all_sites(model):
        # row slices (q/k/v of a fused qkv) are not whole modules; the first whole-module site wins
        if site.rows is None and site.how in ("linear", "weight"):
            known.setdefault(site.path, site)
    sites, unmatched = [], []
    # canonical paths of the real layers: a layer PEFT wrapped is offered (and matched) as it was before
    layers = [(path, m) for path, m in named_layers(model)
              if isinstance(m, (nn.Linear, nn.Conv2d)) and "visadapt_" not in path]
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        hits = [(path, m) for path, m in layers if _matches_module(path, pattern)]
        if not hits:
            unmatched.append(pattern)
        for path, module in hits:
            if path in chosen:
                continue
            if path in known:
                chosen[path] = known[path]
            elif isinstance(module, nn.Conv2d):
                chosen[path] = Site(path, "module", -1, module.in_channels, module.out_channels, module, "linear")
            else:
                chosen[path] = Site(path, "module", -1, module.in_features, module.out_features, module, "linear")
    if unmatched:
        paths = [path for path, _ in layers]
        close = {p: difflib.get_close_matches(p, paths, n=3, cutoff=0.6) for p in unmatched}
        close_text = "; ".join(f"{p!r} is close to {', '.join(c)}" for p, c in close.items() if c)
        leaves = list(dict.fromkeys(path.rpartition(".")[2] for path in paths))
        raise ValueError(
            f"target_modules {unmatched} match no nn.Linear / nn.Conv2d of this {family} model (patterns are full "
            f"module paths or dotted suffixes, e.g. 'down_blocks.0.resnets.0.conv1' or 'to_q'). "
            f"{close_text + '. ' if close_text else ''}Its {len(paths)} layers end in: {', '.join(leaves[:30])}"
            f"{', ...' if len(leaves) > 30 else ''}; `visadapt sites MODEL` lists every site with its widths")
    order = {path: i for i, (path, _) in enumerate(layers)}
    sites = sorted(chosen.values(), key=lambda s: order[s.path])
    return sites


def fingerprint(model: nn.Module) -> dict:
    """What an adapter file needs to know about its base model: family, name and per-tower depth/width."""
    family = model_family(model)
    sites = all_sites(model)
    shape: dict[str, dict[str, int]] = {}
    for s in sites:
        if s.kind in VIT_MODEL_KINDS:  # not a block: depth counts transformer blocks only
            continue
        key = s.tower or "model"
        entry = shape.setdefault(key, {"depth": 0, "width": s.in_features})
        entry["depth"] = max(entry["depth"], s.block + 1)
    return {"family": family, "name": model_name(model), "towers": shape}


def held_site(model: nn.Module, kind: str, in_features: int, out_features: int) -> Site:
    """A site on the model itself for a module no hook calls: the plugin calls it on features it reads
    (SelaVPR's place head over :func:`patch_token_map`). It is saved, loaded and detached like any adapter."""
    model_family(model)
    return Site("", kind, -1, in_features, out_features, model, "held")


def patch_embed_site(model: nn.Module, kind: str) -> Site:
    """An output site on a timm ViT's ``patch_embed``: its module gets the patch tokens ``(B, h, w, D)``
    (``dynamic_img_size``) or ``(B, h * w, D)`` before the position embedding is added, and its result is added to
    them (SelaVPR's official position-embedding interpolation)."""
    family = model_family(model)
    if family != "timm_vit":
        raise ValueError(f"the patch embedding site exists on timm ViTs; this model is {family}")
    return Site("patch_embed", kind, -1, model.embed_dim, model.embed_dim, model.patch_embed, "output")


def patch_token_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The final, normalised patch tokens of a timm ViT as a map ``(B, D, H/p, W/p)`` (prefix tokens such as
    the class and register tokens dropped) for images ``(B, 3, H, W)``; adapters attached at block sites
    take part as in the model's own forward."""
    family = model_family(model)
    if family != "timm_vit":
        raise ValueError(f"patch token maps are read from timm ViTs (incl. DINOv2); this model is {family}")
    return model.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)[0]
