"""PEFT's two in-memory conveniences for visadapt: :func:`merge_and_unload` and :func:`disable_adapters`.

``peft_model.merge_and_unload()`` gives a plain model back with the LoRA folded into its weights; ``with
peft_model.disable_adapter():`` runs the base model for the length of a block. visadapt already has the pieces
(:func:`visadapt.merge`, :func:`visadapt.set_active_adapters`, :func:`visadapt.detach`); these two calls put
them together with PEFT's names and PEFT's results, which ``tests/test_peft_style.py`` checks against PEFT's
own calls on the same LoRA weights.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from visadapt import api, inject
from visadapt.peft_compat import unwrap_peft_model

logger = logging.getLogger(__name__)

# what a user can do instead of merge_and_unload when an adapter cannot fold (shown in every refusal)
_INSTEAD = ("keep the adapter attached (visadapt.merge folds what can fold) or ship it as a file with "
            "`visadapt export`")


def _folding_problem(model: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` cannot disappear into the base weights, or None when every module it added can.

    A module folds when :func:`visadapt.inject.merge` can write it into its host: a LoRA-type delta with a
    base weight (``merge_into``) or a module that rewrites its host itself (``merge_into_host``: ResAdapter's
    norms). Checked on the modules as they are now, before anything changes. MoSA merges its sparse modules
    into one plain module first, of the same type, so the check holds for its merged form too.
    """
    record = api.get_record(model, name)
    plugin = record.plugin
    if not plugin.mergeable:
        return f"{plugin.merge_refusal}"
    for item in inject.attached(model, name):
        module = item.module
        if getattr(module, "merged", False) or hasattr(module, "merge_into_host"):
            continue
        if hasattr(module, "merge_into") and item.base_weight is not None:
            continue
        where = f"{item.host_path}:{item.kind}" if item.host_path else item.kind
        return (f"its merged form keeps a {type(module).__name__} at {where}, a module with a function "
                f"of its own (not a delta of a base weight), so the model cannot be a plain model without it"
                + (" (mosa with base='lora' folds entirely)" if plugin.name == "mosa" else ""))
    return None


def _pipeline_bookkeeping_forget(module: nn.Module, names: Sequence[str]) -> None:
    """Drop ``names`` from the fuse/disable records that ``pipe.fuse_visadapt`` / ``pipe.disable_visadapt``
    keep on a component (:mod:`visadapt.diffusers`), so the pipeline refers to no adapter that is gone."""
    from visadapt.diffusers import _DISABLED_ATTR, _FUSED_ATTR

    fused = module.__dict__.get(_FUSED_ATTR)
    if fused is not None:
        for name in names:
            fused.pop(name, None)
        if not fused:
            module.__dict__.pop(_FUSED_ATTR)
    disabled = module.__dict__.get(_DISABLED_ATTR)
    if disabled is not None:
        disabled[:] = [name for name in disabled if name not in names]
        if not api.records(module):
            module.__dict__.pop(_DISABLED_ATTR)


def merge_and_unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold adapters into the base weights and remove them: the model comes back plain, as PEFT's
    ``merge_and_unload()`` gives it, in memory and in place (the same object is returned).

    Afterwards no ``visadapt_`` module, hook or parametrization is left on the merged adapters' layers, and
    for any input ``x`` the output equals the adapted model's (eval mode: dropout off) within fp32 rounding:
    the deltas are added in fp32 (:func:`visadapt.merge`), at the adapter's runtime weight
    (:func:`visadapt.set_weight`).

    ``adapter_name``: None merges every attached adapter that runs (PEFT merges its active adapters); adapters
    switched off by :func:`visadapt.set_active_adapters` contribute nothing to the output and are removed
    unmerged, as PEFT does, with a warning naming them. A name merges that adapter only; the others stay
    attached and keep working, but none of them may be merged at the time (:func:`visadapt.unmerge` it first),
    because its exact unmerge copy would no longer match the base weights.

    The classifier head the adapter trained or loaded (``attach(..., head=...)``, the ``head`` of its file)
    STAYS: it is part of the model the adapter made (PEFT's ``merge_and_unload`` keeps its ``modules_to_save``
    the same way); :func:`visadapt.detach` is the call that gives the model's original head back. When the
    last adapter goes, parameters get back the ``requires_grad`` flags they had before the first
    :func:`visadapt.attach`, as after :func:`visadapt.detach`.

    Refused (``ValueError``, naming the adapter, its plugin and the reason), before anything changes, for
    adapters whose function is not linear in the base weights: bottleneck adapters (``adapter``, MoSA on its
    default bottleneck base, ``bitadapter``, SelaVPR, Polyhistor), PPAP's routed experts, the ranking head.
    LoRA-type adapters (``lora``, ``selma``, ``resadapter``, MoSA with ``base="lora"``, k-bit LoRA: its
    dequantised factors fold exactly) and ``linear`` (nothing to fold: the head stays) are merged.

    ``model`` may be a ``peft.PeftModel``: visadapt's adapters are folded into the layers under PEFT's
    wrappers and removed; PEFT's own adapters are left to PEFT (call its ``merge_and_unload()`` next), and the
    PeftModel is returned. A component of a diffusers pipeline (``pipe.unet``) may hold adapters
    ``pipe.load_visadapt`` loaded or ``pipe.fuse_visadapt`` fused: the pipeline forgets them too.
    """
    base = unwrap_peft_model(model)
    every = list(api.records(base))
    if not every:
        raise ValueError("merge_and_unload: no visadapt adapter is attached to this model")
    if adapter_name is not None:
        api.get_record(base, adapter_name)  # unknown names raise, listing the attached ones
        running = api.active_adapters(base)
        if adapter_name not in running:
            raise ValueError(f"merge_and_unload: adapter {adapter_name!r} is switched off "
                             f"(visadapt.set_active_adapters), so the model's output does not include it "
                             f"and merging it would change that output; switch it on first, or "
                             f"visadapt.detach it")
        merged_others = [name for name in every if name != adapter_name and any(
            getattr(item.module, "merged", False) for item in inject.attached(base, name))]
        if merged_others:
            raise ValueError(f"merge_and_unload: adapter {merged_others[0]!r} is merged into the base "
                             f"weights, where {adapter_name!r} would be folded for good; "
                             f"visadapt.unmerge(model, {merged_others[0]!r}) first, or merge_and_unload "
                             f"every adapter (adapter_name=None)")
        to_merge, to_drop = [adapter_name], []
    else:
        running = set(api.active_adapters(base))
        to_merge = [name for name in every if name in running]
        to_drop = [name for name in every if name not in running]
    for name in to_merge:
        problem = _folding_problem(base, name)
        if problem is not None:
            plugin = api.get_record(base, name).plugin.name
            raise ValueError(f"merge_and_unload: adapter {name!r} ({plugin}) cannot be folded into the base "
                             f"weights: {problem}. Nothing was changed; {_INSTEAD}")
    if to_drop:
        logger.warning("visadapt.merge_and_unload: adapter(s) %s are switched off (set_active_adapters) and "
                       "are removed without merging, as PEFT's merge_and_unload does",
                       ", ".join(map(repr, to_drop)))

    try:
        for name in to_merge:
            api.merge(base, name)
        for name in to_merge:
            left = [f"{item.host_path}:{item.kind}" for item in inject.attached(base, name)
                    if not getattr(item.module, "merged", False)]
            if left:  # a third-party plugin whose merge leaves a module running: the model would not be plain
                plugin = api.get_record(base, name).plugin.name
                raise ValueError(f"merge_and_unload: merging adapter {name!r} ({plugin}) left {left[0]} "
                                 f"unmerged; nothing was changed; {_INSTEAD}")
    except Exception:
        api.unmerge(base, None)  # back to the state before: merges undone bit for bit
        raise
    for name in [*to_merge, *to_drop]:
        record = api.records(base).pop(name)
        record.head_before = None  # the head the adapter brought stays (see the docstring)
        inject.remove(base, name, keep_merged=name in to_merge)
    _pipeline_bookkeeping_forget(base, [*to_merge, *to_drop])
    api.restore_trainable_flags(base)
    return model




def _components(target: Any) -> list[nn.Module]:
    """The models whose adapters :func:`disable_adapters` switches off: the model itself (the one a
    ``peft.PeftModel`` wraps), or each component of a diffusers pipeline that holds visadapt adapters."""
    if isinstance(target, nn.Module):
        return [unwrap_peft_model(target)]
    components = getattr(target, "components", None)
    if isinstance(components, dict):
        found = [m for m in components.values() if isinstance(m, nn.Module) and api.records(m)]
        if not found:
            raise ValueError(f"disable_adapters: no component of {type(target).__name__} holds a visadapt "
                             f"adapter")
        return found
    raise TypeError(f"disable_adapters takes a torch model, a peft.PeftModel or a diffusers pipeline, not "
                    f"{type(target).__name__}")


def _merge_order(model: nn.Module, name: str) -> int | None:
    """When adapter ``name`` was merged (the order of :func:`visadapt.inject.merge`), None when it is not."""
    orders = [item.module.__dict__.get(inject._MERGE_ORDER_ATTR) for item in inject.attached(model, name)
              if getattr(item.module, "merged", False)]
    orders = [order for order in orders if order is not None]
    return min(orders) if orders else None


def _head_owners(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """For each head path that an adapter in ``names`` wrote into, the adapters whose writes to undo, last
    writer first: a run of ``names`` from the end of the load order, stopping at the first adapter not being
    disabled that wrote into the same head (its values are what the head shows, and it keeps running)."""
    owners: dict[str, list[str]] = {}
    stopped: set[str] = set()
    for name in reversed(list(api.records(model))):
        record = api.records(model)[name]
        if record.head is None or record.head_before is None or record.head in stopped:
            continue
        if name in names:
            owners.setdefault(record.head, []).append(name)
        else:
            stopped.add(record.head)
    return owners


class _Disabled:
    """What :func:`disable_adapters` changed on one model, so that leaving the block puts it back exactly."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.active = api.active_adapters(model)
        # every merged adapter, in merge order: re-merged in that order after, so the weights come back bit
        # for bit
        merged = {name: _merge_order(model, name) for name in api.records(model)}
        self.merged = sorted((name for name, order in merged.items() if order is not None),
                             key=merged.__getitem__)
        self.heads: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {}

    def enter(self) -> None:
        if any(name in self.merged for name in self.names):
            # A merged adapter is in the base weights: take every merge off (exact), put back the ones staying
            # on
            for name in reversed(self.merged):
                api.unmerge(self.model, name)
            for name in self.merged:
                if name not in self.names:
                    api.merge(self.model, name)
        api.set_active_adapters(self.model, [name for name in self.active if name not in self.names])
        for path, writers in _head_owners(self.model, self.names).items():
            head = self.model.get_submodule(path)
            state = {key: value.detach().clone() for key, value in head.state_dict().items()}
            self.heads[path] = (head, state)
            for name in writers:  # last writer first: the head ends as it was before the first of them loaded
                before = api.records(self.model)[name].head_before
                if isinstance(before, nn.Module):
                    api.replace_submodule(self.model, path, before)
                else:
                    targets = self.model.get_submodule(path).state_dict(keep_vars=True)
                    with torch.no_grad():
                        for key, value in before.items():
                            targets[key].copy_(value)

    def leave(self) -> None:
        for path, (head, state) in self.heads.items():
            api.replace_submodule(self.model, path, head)
            targets = head.state_dict(keep_vars=True)
            with torch.no_grad():
                for key, value in state.items():
                    targets[key].copy_(value)
        still = [name for name in self.active if name in api.records(self.model)]
        api.set_active_adapters(self.model, still)
        if any(name in self.merged for name in self.names):
            staying = [n for n in self.merged if n not in self.names and n in api.records(self.model)]
            for name in reversed(staying):
                api.unmerge(self.model, name)
            for name in self.merged:
                if name in api.records(self.model):
                    api.merge(self.model, name)


@contextlib.contextmanager
def disable_adapters(model: Any, adapter_name: str | Sequence[str] | None = None) -> Iterator[None]:
    """``with visadapt.disable_adapters(model):`` runs the model without its visadapt adapters, as PEFT's
    ``with peft_model.disable_adapter():`` does; on leaving the block (also when it raises) everything is as
    before, bit for bit: which adapters run, merged weights, heads.

    Inside, the output is the base model's exactly (:func:`visadapt.detach` would give the same model): the
    adapters' hooks are skipped, merged adapters are unmerged (exact copies of the base weights) and merged
    again after in their original order, and a classifier head an adapter's load wrote into shows the values
    it had before that load (PEFT's disabled ``modules_to_save`` likewise run the original module). A head
    trained in place by ``attach(..., head=...)`` has no other values to show: it stays, as it stays after
    ``detach``. ``requires_grad`` flags are not touched.

    ``model``: a torch model, a ``peft.PeftModel`` (PEFT's own adapters keep running: use PEFT's
    ``disable_adapter()`` for those), or a diffusers pipeline (every component with visadapt adapters;
    adapters ``pipe.fuse_visadapt`` fused are unfused for the block and fused again after). ``adapter_name``:
    one name or several to switch off only those (the others keep running); None (default) switches off all.
    """
    models = _components(model)
    if adapter_name is None:
        wanted = None
    else:
        wanted = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    plans = []
    for module in models:
        attached = list(api.records(module))
        if wanted is None:
            if not attached and len(models) == 1:
                raise ValueError("disable_adapters: no visadapt adapter is attached to this model")
            names = attached
        else:
            names = [name for name in wanted if name in attached]
        plans.append(_Disabled(module, names))
    if wanted is not None:
        everywhere = {name for module in models for name in api.records(module)}
        unknown = [name for name in wanted if name not in everywhere]
        if unknown:
            raise KeyError(f"disable_adapters: no adapter named {', '.join(map(repr, unknown))} is attached "
                           f"(attached: {', '.join(map(repr, sorted(everywhere))) or 'none'})")
    entered: list[_Disabled] = []
    try:
        for plan in plans:
            entered.append(plan)
            plan.enter()
        yield
    finally:
        for plan in reversed(entered):
            plan.leave()
