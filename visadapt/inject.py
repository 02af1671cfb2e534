"""Putting adapter modules at sites, finding them again, merging and removing them.

Modules stay where the model put them; nothing is replaced, so the base model's parameter names do not
change (``blocks.0.attn.qkv.weight`` stays ``blocks.0.attn.qkv.weight``). Each adapted host gets:

* a child ``visadapt_adapters``: ``ModuleDict[adapter_name -> ModuleDict[site kind -> delta module]]``,
  so every adapter tensor has ``visadapt_adapters`` in its name;
* one forward pre-hook and one forward hook, plain module-level functions (so ``copy.deepcopy`` and
  ``torch.compile`` see no closures) that read the host's *call plan*: the delta modules that run at call time,
  grouped by how they apply, worked out once whenever the host's adapters change (:func:`sync_hooks`), so a call
  costs no scan of the dict. LoRAs at a layer's outputs run batched (:func:`visadapt.layers.add_lora_deltas`).

Layers whose weight is read directly instead of called (``nn.MultiheadAttention.in_proj_weight``) get a
:mod:`torch.nn.utils.parametrize` parametrization instead, ``W -> W + delta``, holding the same dict.

Under a PEFT wrapper the host is the wrapper's ``base_layer`` (:mod:`visadapt.peft_compat`), and every path this
module reports or writes (``Attached.host_path``, the keys of :func:`adapter_state`) is canonical: without PEFT's
``.base_layer`` segments, so it is the same whether PEFT wraps the layer or not.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from visadapt.layers import LoRA, QuantizedLinear, add_lora_deltas, add_rows, batchable_lora
from visadapt.load_report import (
    MATCHED,
    MISMATCHED,
    AdapterLoadError,  # noqa: F401  (re-exported: visadapt.inject.AdapterLoadError)
    LoadReport,
    adapter_key_site,
)
from visadapt.peft_compat import canonical_path, peft_merge_state, resolve
from visadapt.sites import Site

logger = logging.getLogger(__name__)

ADAPTERS_ATTR = "visadapt_adapters"
_HOOKS_ATTR = "_visadapt_hook_handles"
_PLAN_ATTR = "_visadapt_call_plan"
_TAP_HOOK_ATTR = "_visadapt_tap_handle"
_TAP_VALUE_ATTR = "_visadapt_branch_input"
_RESIDUAL_HOOK_ATTR = "_visadapt_residual_handle"
_RESIDUAL_VALUE_ATTR = "_visadapt_residual_stream"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# merge order of every merged delta module (a process-wide counter): unmerge needs to know what was stacked later
_MERGE_ORDER_ATTR = "_visadapt_merge_order"
# hash of the weight rows a merge wrote, and the PEFT merge state of the layer then (both taken only where a PEFT
# layer wraps the host, the one writer besides visadapt): unmerge restores its exact copy only when nobody wrote
# since, or PEFT is back in the same state (a fuse/unfuse round trip left rounding)
_MERGED_HASH_ATTR = "_visadapt_merged_rows_hash"
_MERGED_PEFT_ATTR = "_visadapt_merged_peft_state"
_merge_counter = itertools.count()


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"adapter_name {name!r} must be a Python identifier (letters, digits, underscores)")


class WeightDelta(nn.Module):
    """Parametrization ``W -> W + sum of unmerged adapter deltas`` for weights read without a call.

    Shapes: ``weight`` is the host parameter, e.g. ``(3 * dim, dim)`` for a fused in-projection; each
    adapter's delta covers its ``site_rows`` of dimension 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.visadapt_adapters = nn.ModuleDict()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for per_name in self.visadapt_adapters.values():
            for module in per_name.values():
                if not module.merged and is_active(module):
                    delta = module.delta_weight().to(weight.dtype) * adapter_weight(module)
                    weight = add_rows(weight, delta, module.site_rows, dim=0)
        return weight


def _adapter_dict(owner: nn.Module, adapter_name: str) -> nn.ModuleDict:
    store = getattr(owner, ADAPTERS_ATTR, None)
    # the containers take the host's train/eval mode, so that attaching to an eval() model leaves every
    # submodule in eval mode (the delta modules themselves are set by api.attach)
    if store is None:
        store = nn.ModuleDict().train(owner.training)
        setattr(owner, ADAPTERS_ATTR, store)
    if adapter_name not in store:
        store[adapter_name] = nn.ModuleDict().train(owner.training)
    return store[adapter_name]


def _weight_delta_for(host: nn.Module, param: str) -> WeightDelta:
    if parametrize.is_parametrized(host, param):
        for p in host.parametrizations[param]:
            if isinstance(p, WeightDelta):
                return p
    delta = WeightDelta()
    # remove_parametrizations re-registers the parameter last; remember the order to put it back
    delta.param_order = list(host._parameters)
    # unsafe=True: the parametrization preserves shape and dtype, so PyTorch need not probe it by calling it
    parametrize.register_parametrization(host, param, delta, unsafe=True)
    return delta


def insert(site: Site, adapter_name: str, module: nn.Module) -> None:
    """Attach ``module`` (a delta module from :mod:`visadapt.layers`) at ``site`` under ``adapter_name``."""
    check_adapter_name(adapter_name)
    module.site_how = site.how
    module.site_rows = site.rows
    module.site_tap = site.tap
    module.site_widths = (site.in_features, site.out_features)
    # The runtime weight and on/off switch live in the module's __dict__ from the start: torch.compile guards a
    # key that exists, but not the absence of one, so a weight first set after compiling would be ignored.
    module.__dict__.setdefault("adapter_weight", 1.0)
    module.__dict__.setdefault("adapter_inactive", False)
    if site.how == "weight":
        if not hasattr(module, "delta_weight"):
            raise TypeError(f"site {site.name} takes weight deltas (LoRA-type modules) only, "
                            f"not {type(module).__name__}")
        if site.peft_wrapped:
            raise ValueError(f"site {site.name} is a weight of an attention layer PEFT has wrapped (its LoRA for "
                             f"nn.MultiheadAttention swaps {site.param} at every call, which visadapt's weight delta "
                             f"cannot share); attach visadapt to the MLP layers (fc1, fc2) there, or unload the PEFT "
                             f"adapter first (peft_model.unload())")
        if getattr(module, "dropout", None) is not None and not isinstance(module.dropout, nn.Identity):
            raise ValueError(f"site {site.name} is a weight read directly by its layer ({site.param}); a LoRA "
                             f"there cannot apply dropout to the layer input: set dropout=0")
        owner = _weight_delta_for(site.host, site.param)
    elif site.how in ("output", "input", "parallel", "residual", "linear", "replace", "held"):
        owner = site.host
    else:
        raise ValueError(f"site {site.name} is a {site.how!r} site; this adapter type attaches to "
                         f"output/input/parallel/residual/linear/weight sites only")
    existing = owner._modules.get(ADAPTERS_ATTR)
    if site.how == "replace" and existing is not None and any(
            m.site_how == "replace" for d in existing.values() for m in d.values()):
        raise ValueError(f"{site.name} is already replaced by another adapter; only one module can replace it")
    per_name = _adapter_dict(owner, adapter_name)
    if site.kind in per_name:
        raise ValueError(f"adapter {adapter_name!r} already has a module at {site.name}; detach it first "
                         f"or use another adapter_name")
    per_name[site.kind] = module
    sync_hooks(owner)
    if site.how == "parallel":
        tap = site.host.get_submodule(site.tap)
        if not hasattr(tap, _TAP_HOOK_ATTR):
            setattr(tap, _TAP_HOOK_ATTR, tap.register_forward_pre_hook(_tap_hook))
    if site.how == "residual":
        tap = site.host.get_submodule(site.tap)
        if not hasattr(tap, _RESIDUAL_HOOK_ATTR):
            setattr(tap, _RESIDUAL_HOOK_ATTR, tap.register_forward_hook(_residual_hook))


def _runs_in_hooks(module: nn.Module) -> bool:
    # "held" modules (heads a plugin calls itself, e.g. SelaVPR's place head) and weight parametrizations need
    # no hooks; merged or switched-off modules contribute nothing at call time
    return (module.site_how not in ("weight", "held") and not getattr(module, "merged", False)
            and is_active(module))


class CallPlan(NamedTuple):
    """The delta modules of one host that run at call time, in the order the hooks apply them (each tuple in
    attachment order). ``lora``: the :class:`~visadapt.layers.LoRA` modules at ``linear`` sites, run batched by
    :func:`visadapt.layers.add_lora_deltas` when all of them qualify at call time
    (:func:`~visadapt.layers.batchable_lora`: a plugin may swap a LoRA's factors, as MoSA does); ``linear``: the
    other modules at ``linear`` sites; ``replace_blends``: for each ``replace`` module, whether its runtime weight
    blends it with the base output (:func:`blends_with_weight`, decided here once rather than on every call)."""

    input: tuple[nn.Module, ...]
    parallel: tuple[nn.Module, ...]
    residual: tuple[nn.Module, ...]
    lora: tuple[nn.Module, ...]
    linear: tuple[nn.Module, ...]
    output: tuple[nn.Module, ...]
    replace: tuple[nn.Module, ...]
    replace_blends: tuple[bool, ...]


def call_plan(owner: nn.Module) -> CallPlan | None:
    """``owner``'s :class:`CallPlan` as the hooks use it (None when no delta module runs at call time)."""
    return owner.__dict__.get(_PLAN_ATTR)


def _build_plan(store: nn.ModuleDict | None) -> CallPlan | None:
    groups: dict[str, list[nn.Module]] = {field: [] for field in CallPlan._fields if field != "replace_blends"}
    for per_name in store.values() if store is not None else ():
        for module in per_name.values():
            if _runs_in_hooks(module):
                how = module.site_how
                groups["lora" if how == "linear" and type(module) is LoRA else how].append(module)
    if not any(groups.values()):
        return None
    return CallPlan(**{field: tuple(modules) for field, modules in groups.items()},
                    replace_blends=tuple(map(blends_with_weight, groups["replace"])))


def sync_hooks(owner: nn.Module) -> None:
    """Register ``owner``'s forward hooks when one of its delta modules runs at call time, remove them when none
    does (all merged, switched off or removed): a layer whose adapters are all merged is called exactly like a
    plain layer, with no hook and no Python in its call, so merged inference costs what the base model costs.

    Also rebuilds the host's :class:`CallPlan`. Every change of which modules run (insert, merge, unmerge,
    switching adapters on or off, remove) goes through here; change them only with this module's functions."""
    plan = _build_plan(owner._modules.get(ADAPTERS_ATTR))
    if plan is None:
        owner.__dict__.pop(_PLAN_ATTR, None)
    else:
        owner.__dict__[_PLAN_ATTR] = plan
    registered = _HOOKS_ATTR in owner.__dict__
    if plan is not None and not registered:
        setattr(owner, _HOOKS_ATTR, (owner.register_forward_pre_hook(_pre_hook),
                                     owner.register_forward_hook(_post_hook)))
    elif registered and plan is None:
        for handle in owner.__dict__.pop(_HOOKS_ATTR):
            handle.remove()


def _sync_hosts(model: nn.Module, items: list) -> None:
    for path in dict.fromkeys(item.host_path for item in items):
        sync_hooks(resolve(model, path))


def is_active(module: nn.Module) -> bool:
    """Whether a delta module runs (True unless :func:`set_adapter_active` switched its adapter off)."""
    return not module.__dict__.get("adapter_inactive", False)


def set_adapter_active(model: nn.Module, adapter_name: str, active: bool) -> None:
    """Switch every delta module of ``adapter_name`` on or off: an inactive adapter is skipped by the hooks (it
    costs nothing and contributes nothing) but stays attached, trainable and saveable. A merged adapter is part
    of the base weights and cannot be switched off: unmerge it first."""
    items = attached(model, adapter_name)
    if not items:
        raise KeyError(f"no modules of adapter {adapter_name!r} are attached to this model")
    merged = [f"{i.host_path}:{i.kind}" for i in items if getattr(i.module, "merged", False)]
    if merged and not active:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights ({merged[0]}, ...); unmerge it "
                         f"before switching it off")
    for item in items:
        item.module.__dict__["adapter_inactive"] = not active
    _sync_hosts(model, items)


def adapter_weight(module: nn.Module) -> float:
    """The runtime weight of one delta module (1.0 unless :func:`set_adapter_weight` changed it)."""
    return module.__dict__.get("adapter_weight", 1.0)


def blends_with_weight(module: nn.Module) -> bool:
    """Whether a module at a ``replace`` site is blended with its host's output by its runtime weight
    (``w * new + (1 - w) * base``): True unless the module sets ``blends_with_weight = False``, which makes it the
    adapter's at every weight. Fixed when the module is built: the hooks read it once, into the
    :class:`CallPlan`."""
    return getattr(module, "blends_with_weight", True)


def replace_weight(module: nn.Module, blends: bool | None = None) -> float:
    """The share ``w`` of a ``replace`` module's output in ``w * new + (1 - w) * base``: its runtime weight when
    it blends (``blends``: the :class:`CallPlan`'s decision; None decides it from the module), else 1.0. The
    hooks and a module merging itself into its host (``merge_into_host``) both use it, so the two agree."""
    if blends is None:
        blends = blends_with_weight(module)
    return adapter_weight(module) if blends else 1.0


def _weighted(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    weight = adapter_weight(module)
    return delta if weight == 1.0 else delta * weight


def set_adapter_weight(model: nn.Module, adapter_name: str, weight: float) -> None:
    """Scale every delta of ``adapter_name`` by ``weight`` at run time (LoRA-style ``set_adapters`` weights).

    Additive deltas become ``weight * f(x)``; a module that replaces its host's output (a trainable norm, a
    quantised head) gives ``weight * new + (1 - weight) * base``, so 0 is the base model and 1 the adapter,
    unless it sets ``blends_with_weight = False`` (:func:`blends_with_weight`, :func:`replace_weight`): then it is
    the adapter's at every weight (ResAdapter's norms, whose official loader scales only the LoRA: there 0 is the
    base model plus the adapter's norms).
    Merging folds the weighted delta. A merged adapter must be unmerged before its weight changes, and
    adapters holding a module of their own (a head the plugin calls) have no weight to set.
    """
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"adapter weight must be a finite number, got {weight}")
    items = attached(model, adapter_name)
    if not items:
        raise KeyError(f"no modules of adapter {adapter_name!r} are attached to this model")
    merged = [f"{i.host_path}:{i.kind}" for i in items if getattr(i.module, "merged", False)]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights ({merged[0]}, ...); unmerge "
                         f"(unfuse) it before changing its weight")
    held = [f"{i.host_path}:{i.kind}" for i in items if i.module.site_how == "held"]
    if held and weight != 1.0:
        raise ValueError(f"adapter {adapter_name!r} holds a module its plugin calls itself ({held[0]}); a "
                         f"weight cannot scale it, so only 1.0 is allowed")
    for item in items:
        item.module.__dict__["adapter_weight"] = weight


def _tap_hook(tap: nn.Module, args: tuple) -> None:
    # The parallel branch of a block is fed the tap's (e.g. norm2's) input: the residual stream after attention.
    setattr(tap, _TAP_VALUE_ATTR, args[0])


def _residual_hook(tap: nn.Module, args: tuple, output):
    # ``tap`` ends the attention branch: the block computes ``x + output``. Returning ``d + f(x + d)`` instead
    # makes that ``h + f(h)`` with ``h = x + d``, the stream after the residual add (its input ``x`` was handed
    # over by the block's pre-hook, with the modules to apply in attachment order).
    handed = tap.__dict__.pop(_RESIDUAL_VALUE_ATTR, None)
    if handed is None:  # called outside its block's forward: nothing to add to
        return None
    stream, modules = handed
    delta = output
    for module in modules:
        delta = delta + _weighted(module, module(stream + delta))
    return delta


def _pre_hook(host: nn.Module, args: tuple):
    plan = host.__dict__.get(_PLAN_ATTR)
    if plan is None:
        return None
    if plan.residual:
        for tap_name in dict.fromkeys(module.site_tap for module in plan.residual):
            host.get_submodule(tap_name).__dict__[_RESIDUAL_VALUE_ATTR] = (
                args[0], tuple(m for m in plan.residual if m.site_tap == tap_name))
    if not plan.input:
        return None
    x = args[0]
    for module in plan.input:
        x = x + _weighted(module, module(x))
    return (x, *args[1:])


def _post_hook(host: nn.Module, args: tuple, output):
    plan = host.__dict__.get(_PLAN_ATTR)
    if plan is None:
        return None
    if plan.parallel:
        for module in plan.parallel:
            tap = host.get_submodule(module.site_tap)
            branch_input = getattr(tap, _TAP_VALUE_ATTR)
            # Swin returns (B, H, W, C) while its MLP branch saw (B, H*W, C): same elements, other view
            output = output + _weighted(module, module(branch_input)).reshape(output.shape)
        for module in plan.parallel:
            setattr(host.get_submodule(module.site_tap), _TAP_VALUE_ATTR, None)  # free the activation
    one_by_one = plan.linear
    if plan.lora:
        if all(map(batchable_lora, plan.lora)):
            output = add_lora_deltas(output, args[0], plan.lora)
        else:  # k-bit, sampled (MoSA) or dropout factors: each LoRA through its own forward
            one_by_one = plan.lora + plan.linear
    if one_by_one:
        x = args[0]
        channel_dim = 1 if isinstance(host, nn.Conv2d) else -1
        for module in one_by_one:
            output = add_rows(output, _weighted(module, module(x)), module.site_rows, dim=channel_dim)
    for module in plan.output:
        output = output + _weighted(module, module(output))
    for module, blends in zip(plan.replace, plan.replace_blends):  # at most one (checked in insert)
        # a module may be the adapter's at every weight (ResAdapter's norms, as the official code loads them)
        weight = replace_weight(module, blends)
        replaced = module(args[0])
        output = replaced if weight == 1.0 else weight * replaced + (1.0 - weight) * output
    return output


@dataclasses.dataclass
class Attached:
    """One attached delta module: where it sits and the base weight it can merge into."""

    host_path: str
    adapter_name: str
    kind: str
    module: nn.Module
    base_weight: torch.Tensor | None


def attached(model: nn.Module, adapter_name: str | None = None) -> list[Attached]:
    """Every attached delta module (of one adapter when ``adapter_name`` is given), in model order; ``host_path``
    is canonical (:func:`visadapt.peft_compat.canonical_path`: no PEFT ``.base_layer`` segment)."""
    found = []
    for path, owner in model.named_modules():
        store = owner._modules.get(ADAPTERS_ATTR)
        if store is None:
            continue
        if isinstance(owner, WeightDelta):
            # path is "<host>.parametrizations.<param>.<i>"; the base tensor is the list's .original
            plist = model.get_submodule(path.rsplit(".", 1)[0])
            base, host_path = plist.original, canonical_path(model, path.split(".parametrizations.")[0])
        else:
            base, host_path = getattr(owner, "weight", None), canonical_path(model, path)
        for name, per_name in store.items():
            if adapter_name is not None and name != adapter_name:
                continue
            for kind, module in per_name.items():
                found.append(Attached(host_path, name, kind, module, base))
    return found


def held_module(model: nn.Module, kind: str, adapter_name: str | None, *, what: str, plugin: str) -> nn.Module:
    """The module a plugin keeps on ``model`` at its held site ``kind`` (see :func:`visadapt.sites.held_site`):
    the only one, or that of ``adapter_name``. ``what`` names it in errors, ``plugin`` is the fix."""
    held = [item for item in attached(model, adapter_name) if item.kind == kind]
    if not held:
        raise ValueError(f"no {what} is attached to this model: visadapt.attach(model, {plugin!r}) or load a "
                         f"{plugin} adapter file first")
    if len(held) > 1:
        names = ", ".join(repr(item.adapter_name) for item in held)
        raise ValueError(f"several {plugin} adapters are attached ({names}); pass adapter_name")
    return held[0].module


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for item in attached(model):
        names[item.adapter_name] = None
    return list(names)


def _rows(weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return weight if rows is None else weight[rows[0]:rows[1]]


def _rows_hash(rows: torch.Tensor) -> object:
    # torch.hash_tensor (torch >= 2.9) xors the elements' 64-bit patterns: one pass, nothing kept; before it,
    # two float64 sums (plain and position-weighted) tell a weight PEFT has fused into from the one merged here
    if hasattr(torch, "hash_tensor"):
        return int(torch.hash_tensor(rows.detach()).item())
    flat = rows.detach().reshape(-1).double()
    return (flat.sum().item(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype)).sum().item())


def _merge_one(model: nn.Module, item: Attached) -> None:
    if hasattr(item.module, "merge_into_host"):  # needs more of its host than the weight (a norm's bias)
        item.module.merge_into_host(resolve(model, item.host_path))
    else:
        item.module.merge_into(item.base_weight.data, item.module.site_rows)
        peft_state = peft_merge_state(model, item.host_path)
        if peft_state is not None:  # PEFT could fold into this weight too: remember what this merge left there
            item.module.__dict__[_MERGED_HASH_ATTR] = _rows_hash(_rows(item.base_weight.data, item.module.site_rows))
            item.module.__dict__[_MERGED_PEFT_ATTR] = peft_state
    item.module.__dict__[_MERGE_ORDER_ATTR] = next(_merge_counter)


def _unmerge_one(model: nn.Module, item: Attached) -> None:
    module = item.module
    if hasattr(module, "unmerge_from_host"):
        module.unmerge_from_host(resolve(model, item.host_path))
    else:
        merged_hash = module.__dict__.pop(_MERGED_HASH_ATTR, None)
        peft_then = module.__dict__.pop(_MERGED_PEFT_ATTR, None)
        target = _rows(item.base_weight.data, module.site_rows)
        peft_now = peft_merge_state(model, item.host_path)
        if merged_hash is None:
            # no PEFT layer wrapped the host at merge time (nothing hashed then): PEFT can have written into the
            # weight only by wrapping it since and merging there now
            peft_wrote = peft_now is not None and bool(peft_now[1])
        else:
            peft_wrote = _rows_hash(target) != merged_hash and peft_now != peft_then
        if peft_wrote and hasattr(module, "delta_weight") and getattr(module, "merged", False):
            # PEFT wrote into the weight after this merge: its fuse_lora / merge_and_unload fold into the same
            # base_layer.weight. Unless the same PEFT layer is back in the merge state it had then (a fuse and
            # unfuse in between leave only rounding, which the exact copy removes), putting back the copy taken
            # at merge time would erase what PEFT wrote or re-add what it took off: take off this delta instead,
            # as PEFT's own unmerge does (fp32; exact up to rounding).
            logger.warning("visadapt: %s was changed after adapter %r merged into it (PEFT fuse/unfuse?); "
                           "unmerging by subtracting its delta, which is exact only up to rounding. Unfuse in "
                           "reverse order of fusing to restore weights bit for bit", item.host_path,
                           item.adapter_name)
            with torch.no_grad():
                delta = module.delta_weight(torch.float32) * adapter_weight(module)
                target.copy_((target.float() - delta).to(target.dtype))
            module._unmerged_rows = None
            module.merged = False
        else:
            module.unmerge_from(item.base_weight.data, module.site_rows)
    module.__dict__.pop(_MERGE_ORDER_ATTR, None)


def _merge_order(item: Attached) -> int:
    return item.module.__dict__.get(_MERGE_ORDER_ATTR, -1)


def merge(model: nn.Module, adapter_name: str) -> None:
    """Fold each delta of ``adapter_name`` into its base weight (fp32 arithmetic, exact copy kept); layers left
    with no unmerged adapter lose their hooks (:func:`sync_hooks`)."""
    items = attached(model, adapter_name)
    for item in items:
        if getattr(item.module, "merged", False):
            continue
        if not hasattr(item.module, "merge_into_host") and (
                not hasattr(item.module, "merge_into") or item.base_weight is None):
            raise ValueError(f"{item.host_path}:{item.kind} holds a {type(item.module).__name__}, which has no "
                             f"weight to merge into")
        _merge_one(model, item)
    _sync_hosts(model, items)


def unmerge(model: nn.Module, adapter_name: str) -> None:
    """Undo :func:`merge` of ``adapter_name``, restoring the base weights bit for bit, in any order of adapters.

    Each merged delta keeps the exact values it overwrote, which are right only once every delta merged after it
    into the same layer is gone. So the deltas stacked later on a layer are taken off first (last merged first),
    this adapter's values are put back, and the later ones are merged again onto the restored weight: unmerging
    stacked adapters in any order ends with the original weights, bit for bit.
    """
    everything = attached(model)
    for item in reversed(attached(model, adapter_name)):
        if not getattr(item.module, "merged", False):
            continue
        later = sorted((other for other in everything
                        if other.host_path == item.host_path and other.module is not item.module
                        and getattr(other.module, "merged", False) and _merge_order(other) > _merge_order(item)),
                       key=_merge_order, reverse=True)
        for other in later:
            _unmerge_one(model, other)
        _unmerge_one(model, item)
        for other in reversed(later):
            _merge_one(model, other)
    _sync_hosts(model, attached(model, adapter_name))


def remove(model: nn.Module, adapter_name: str | None = None, *, keep_merged: bool = False) -> None:
    """Remove every module of ``adapter_name`` (all adapters when None), unmerging first, and the hooks and
    parametrizations that no adapter needs any more. ``keep_merged``: leave what merging wrote into the base
    weights (:func:`visadapt.merge_and_unload`), so the merged delta stays in the plain layer."""
    for name in [adapter_name] if adapter_name else adapter_names(model):
        if not keep_merged:
            unmerge(model, name)
    for path, owner in list(model.named_modules()):
        store = owner._modules.get(ADAPTERS_ATTR)
        if store is None:
            continue
        taps = {(m.site_how, m.site_tap) for per in store.values() for m in per.values()
                if m.site_how in ("parallel", "residual")}
        for name in list(store):
            if adapter_name is None or name == adapter_name:
                del store[name]
        still_tapped = {(m.site_how, m.site_tap) for per in store.values() for m in per.values()
                        if m.site_how in ("parallel", "residual")}
        for how, tap_name in taps - still_tapped:
            tap = owner.get_submodule(tap_name)
            hook_attr, value_attr = ((_TAP_HOOK_ATTR, _TAP_VALUE_ATTR) if how == "parallel"
                                     else (_RESIDUAL_HOOK_ATTR, _RESIDUAL_VALUE_ATTR))
            getattr(tap, hook_attr).remove()
            delattr(tap, hook_attr)
            tap.__dict__.pop(value_attr, None)
        if len(store):
            sync_hooks(owner)
            continue
        delattr(owner, ADAPTERS_ATTR)
        if isinstance(owner, WeightDelta):
            host_path, param = path.split(".parametrizations.")
            param = param.split(".")[0]
            host = model.get_submodule(host_path)
            if len(host.parametrizations[param]) != 1:
                raise RuntimeError(f"{host_path}.{param} carries other parametrizations besides visadapt's; "
                                   f"remove them first so the original weight can be restored")
            parametrize.remove_parametrizations(host, param, leave_parametrized=False)
            order = [n for n in owner.param_order if n in host._parameters]
            host._parameters = {n: host._parameters[n] for n in order + [n for n in host._parameters if n not in order]}
        else:
            sync_hooks(owner)


_KEY_RE = re.compile(rf"(^|\.){ADAPTERS_ATTR}\.([A-Za-z_][A-Za-z0-9_]*)\.")


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name``, keyed without the adapter name so a file loads under any name:
    ``blocks.0.attn.qkv.visadapt_adapters.default.q.A.weight`` -> ``blocks.0.attn.qkv.visadapt_adapters.q.A.weight``.
    """
    state = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        match = _KEY_RE.search(key)
        if match and match.group(2) == adapter_name:
            key = canonical_path(model, key)  # the same key with or without a PEFT wrapper around the host
            match = _KEY_RE.search(key)
            state[key[: match.start()] + f"{match.group(1)}{ADAPTERS_ATTR}." + key[match.end():]] = tensor
    return state


def _named_key(key: str, adapter_name: str) -> str:
    marker = f"{ADAPTERS_ATTR}."
    head, _, tail = key.partition(marker)
    return f"{head}{marker}{adapter_name}.{tail}"


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                       skip: frozenset[str] = frozenset(), *, strict: bool = True,
                       report: LoadReport | None = None) -> LoadReport:
    """Copy ``state`` (keys as from :func:`adapter_state`) into the attached adapter.

    Every key is recorded in ``report`` (a new :class:`~visadapt.load_report.LoadReport` when None), which is
    then enforced: strict raises :class:`AdapterLoadError` with the report (missing, unexpected and misshapen
    keys, per site) before anything is copied; ``strict=False`` copies the keys that fit and prints the rest.
    Keys in ``skip`` are filled by the caller (packed weights). Returns the report.
    """
    report = report if report is not None else LoadReport("a state dict", f"adapter {adapter_name!r}")
    expected = adapter_state(model, adapter_name)
    fits = report.compare(state, expected, skip=skip)
    report.enforce(strict)
    targets = {canonical_path(model, key): tensor for key, tensor in model.state_dict(keep_vars=True).items()
               if ADAPTERS_ATTR in key}
    with torch.no_grad():
        for key in fits:
            targets[_named_key(key, adapter_name)].copy_(state[key])
    return report


# ---------------------------------------------------------------------------------------- k-bit storage
# Any adapter built from QuantizedLinear blocks is stored packed: the codes of every quantised matrix in ONE
# uint8 tensor "codes" (model order, first code in the low bits) and their float32 [mean, std] in ONE
# (n, 2) tensor "stats"; every other tensor (biases, norms) is stored as it is.


def quantized_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, QuantizedLinear]]:
    """``(weight key as in adapter_state, layer)`` for every quantised matrix of the adapter, in model order."""
    marker = f"{ADAPTERS_ATTR}.{adapter_name}."
    return [(_unnamed(f"{canonical_path(model, path)}.weight", adapter_name), module)
            for path, module in model.named_modules()
            if isinstance(module, QuantizedLinear) and marker in path]


def _unnamed(key: str, adapter_name: str) -> str:
    return key.replace(f"{ADAPTERS_ATTR}.{adapter_name}.", f"{ADAPTERS_ATTR}.", 1)


def packed_adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """:func:`adapter_state` with every quantised matrix replaced by its packed codes and statistics."""
    state = adapter_state(model, adapter_name)
    layers = quantized_layers(model, adapter_name)
    if not layers:
        return state
    for key, _ in layers:
        del state[key]
    packed, stats = zip(*(layer.export_codes() for _, layer in layers))
    state["codes"], state["stats"] = torch.cat(packed), torch.stack(stats)
    return state


def load_packed_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, *,
                              strict: bool = True, report: LoadReport | None = None) -> LoadReport:
    """Inverse of :func:`packed_adapter_state`, reported and enforced like :func:`load_adapter_state`.

    The packed ``codes`` / ``stats`` hold every quantised matrix back to back with no names, so they load whole
    or not at all: when they do not fit this adapter's matrices, each matrix is reported as mismatched (and
    ``strict=False`` loads the other tensors only).
    """
    report = report if report is not None else LoadReport("a state dict", f"adapter {adapter_name!r}")
    layers = quantized_layers(model, adapter_name)
    if not layers:
        return load_adapter_state(model, state, adapter_name, strict=strict, report=report)
    state = dict(state)
    codes, stats = state.pop("codes", None), state.pop("stats", None)
    sizes = [layer.packed_bytes for _, layer in layers]
    if codes is None or stats is None:
        why = ("the file holds no packed 'codes' and 'stats' (it was saved at full precision: attach with "
               "bits=32)")
    elif stats.shape != (len(layers), 2) or codes.numel() != sum(sizes) or codes.dtype != torch.uint8:
        why = (f"the file's codes ({codes.numel()} bytes, {codes.dtype}) and stats {tuple(stats.shape)} do not fit "
               f"this model's {len(layers)} quantised matrices ({sum(sizes)} bytes expected)")
    else:
        why = ""
    if why:
        report.notes.append(why)
    for key, _ in layers:
        report.add(adapter_key_site(key), key, MISMATCHED if why else MATCHED, "packed codes" if why else "")
    load_adapter_state(model, state, adapter_name, skip=frozenset(key for key, _ in layers), strict=strict,
                       report=report)
    if not why:
        for (_, layer), chunk, stat in zip(layers, torch.split(codes, sizes), stats):
            layer.load_codes(chunk, stat)
    return report
