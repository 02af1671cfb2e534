"""The user-facing calls: ``attach``, ``detach``, ``merge``, ``unmerge``, ``trainable_parameters``, ``summary``.

Each takes the model itself or a ``peft.PeftModel`` wrapping it (``get_peft_model(vit, LoraConfig(...))``): visadapt
then works on the model PEFT wraps (``get_base_model()``), on the real layers under PEFT's wrappers
(:mod:`visadapt.peft_compat`), so both libraries' adapters act. PEFT's ``unload()`` keeps visadapt's adapters (they
sit on the layers PEFT puts back); ``merge_and_unload()`` folds PEFT's only. Adapter names are one namespace: a name
PEFT uses on the model is refused here, and PEFT/diffusers refuse one visadapt uses.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from visadapt import inject
from visadapt.load_report import LoadReport
from visadapt.peft_compat import (
    canonical_path,
    check_name_free_of_peft,
    peft_owned_parameters,
    unwrap_peft_model,
)
from visadapt.plugin import AdapterConfig, AdapterPlugin
from visadapt.registry import get_plugin
from visadapt.sites import model_family

logger = logging.getLogger(__name__)

_RECORDS_ATTR = "_visadapt_records"
_GRAD_FLAGS_ATTR = "_visadapt_base_requires_grad"


@dataclasses.dataclass
class AttachedAdapter:
    """What :func:`attach` remembers about one adapter on a model (kept on the model object)."""

    plugin: AdapterPlugin
    config: AdapterConfig
    head: str | None
    #: what the load that filled the adapter matched, missed and skipped (None when attached untrained)
    load_report: LoadReport | None = None
    #: header entries of the file it was loaded from beyond the format's own (``visadapt.train``)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the head as it was before a load wrote into it (:func:`write_head`: its tensors; a ``replace_head`` load:
    #: the module it swapped out), put back by :func:`detach`; None when no load touched the head
    head_before: dict[str, torch.Tensor] | nn.Module | None = None


def records(model: nn.Module) -> dict[str, AttachedAdapter]:
    """Adapters attached to ``model`` by name, in attach order."""
    return model.__dict__.setdefault(_RECORDS_ATTR, {})


def get_record(model: nn.Module, adapter_name: str) -> AttachedAdapter:
    recs = records(model)
    if adapter_name not in recs:
        have = ", ".join(map(repr, recs)) or "none"
        raise KeyError(f"no adapter named {adapter_name!r} is attached to this model (attached: {have})")
    return recs[adapter_name]


def load_report(model: nn.Module, adapter_name: str = "default") -> LoadReport | None:
    """What the load that filled ``adapter_name`` matched, missed and skipped, per site (None for an adapter
    attached and trained here rather than loaded). ``print(visadapt.load_report(model))`` shows it."""
    return get_record(unwrap_peft_model(model), adapter_name).load_report


def _resolve_plugin(plugin: str | type[AdapterPlugin] | AdapterPlugin) -> AdapterPlugin:
    if isinstance(plugin, AdapterPlugin):
        return plugin
    if isinstance(plugin, type) and issubclass(plugin, AdapterPlugin):
        return plugin()
    return get_plugin(plugin)()


def build_config(plugin: AdapterPlugin, config: AdapterConfig | dict | None, overrides: dict[str, Any]) -> AdapterConfig:
    """The plugin's config from a config object, a dict, keyword overrides, or any mix of them."""
    if isinstance(config, AdapterConfig):
        if not isinstance(config, plugin.Config):
            raise TypeError(f"plugin {plugin.name!r} takes a {plugin.Config.__name__}, got {type(config).__name__}")
        values = config.to_dict()
    else:
        values = dict(config or {})
    values.update(overrides)
    return plugin.Config.from_dict(values)


def _reference_tensor(model: nn.Module) -> torch.Tensor | None:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor
    return None


def attach(
    model: nn.Module,
    plugin: str | type[AdapterPlugin] | AdapterPlugin,
    config: AdapterConfig | dict | None = None,
    *,
    adapter_name: str = "default",
    head: str | None = None,
    **overrides: Any,
) -> AdapterConfig:
    """Insert the adapter ``plugin`` into ``model`` in place and freeze everything else.

    Afterwards exactly the adapter parameters require grad, plus the parameters of the module at path
    ``head`` when given (e.g. ``head="head"`` for a timm classifier); that head is saved with the adapter.
    The model's train/eval mode is kept, and new modules take the device and dtype of the model.
    Returns the resolved config.

    ``model`` may be a ``peft.PeftModel``: the adapter goes on the model it wraps, at the real layers under PEFT's
    wrappers, and PEFT's own adapter parameters keep their ``requires_grad``. An ``adapter_name`` PEFT already
    uses on the model is refused (one namespace for both libraries).
    """
    model = unwrap_peft_model(model)
    plugin_obj = _resolve_plugin(plugin)
    family = model_family(model)
    if family not in plugin_obj.families:
        raise ValueError(f"plugin {plugin_obj.name!r} supports {', '.join(plugin_obj.families)} models; "
                         f"this model is {family}")
    inject.check_adapter_name(adapter_name)
    if adapter_name in records(model):
        raise ValueError(f"an adapter named {adapter_name!r} is already attached; detach it or pass another "
                         f"adapter_name")
    check_name_free_of_peft(model, adapter_name)
    if head is not None:
        try:
            model.get_submodule(head)
        except AttributeError:
            tops = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"head={head!r} is not a submodule of this model (top-level modules: {tops})") from None
    cfg = build_config(plugin_obj, config, overrides)

    if _GRAD_FLAGS_ATTR not in model.__dict__:  # before attaching: parametrizations rename weights
        # canonical names: the flags find their parameter again after PEFT wrapped or unwrapped its layer
        model.__dict__[_GRAD_FLAGS_ATTR] = {canonical_path(model, n): p.requires_grad
                                            for n, p in model.named_parameters()}
    was_training = model.training
    try:
        plugin_obj.attach(model, cfg, adapter_name)
    except Exception:
        inject.remove(model, adapter_name)  # leave no half-attached adapter behind
        if not records(model):
            model.__dict__.pop(_GRAD_FLAGS_ATTR, None)
        raise
    ref = _reference_tensor(model)
    for item in inject.attached(model, adapter_name):
        if ref is not None:
            item.module.to(device=ref.device, dtype=ref.dtype)
        item.module.train(was_training)

    records(model)[adapter_name] = AttachedAdapter(plugin_obj, cfg, head)
    _set_trainable(model)
    return cfg


#: open_clip's projection heads that are modules (the native towers keep theirs as plain parameters, ``proj`` /
#: ``text_projection``, which no file head can name): a timm vision tower's ``head``, a Hugging Face text tower's
#: ``proj``, a ``text_projection`` built as ``nn.Linear``; as paths in a CLIP model and in a bare tower
_OPEN_CLIP_HEADS = ("visual.head", "visual.proj", "text.proj", "text_projection", "text.text_projection", "head",
                    "proj")


def classifier_paths(model: nn.Module) -> list[str]:
    """Module paths of ``model``'s classifier: the only module, besides the adapter's own, that an adapter file
    may write into (``head`` in its header).

    timm: the module ``get_classifier()`` returns and the paths ``pretrained_cfg["classifier"]`` names (``head``,
    ``head.fc``, a distilled model's ``head_dist``); open_clip: its projection heads where they are modules
    (:data:`_OPEN_CLIP_HEADS`); diffusers UNets: none (their ``conv_out`` is the image output, frozen like the
    rest). ``model`` may be a ``peft.PeftModel``.
    """
    model = unwrap_peft_model(model)
    family = model_family(model)
    paths: list[str] = []
    if family.startswith("timm"):
        get_classifier = getattr(model, "get_classifier", None)
        classifier = get_classifier() if callable(get_classifier) else None
        named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        found = [name for name, module in model.named_modules() if module is classifier and name]
        found += [named] if isinstance(named, str) else [str(name) for name in named]
        for path in found:
            paths.append(path)
            # a module holding the classifier and no other tensor (Swin's ``head`` around ``head.fc``) is the
            # classifier too; one with more (a final norm) is not
            try:
                own = {id(t) for t in (*model.get_submodule(path).parameters(), *model.get_submodule(path).buffers())}
            except AttributeError:
                continue
            parts = path.split(".")
            for depth in range(len(parts) - 1, 0, -1):
                parent = model.get_submodule(".".join(parts[:depth]))
                if {id(t) for t in (*parent.parameters(), *parent.buffers())} != own:
                    break
                paths.append(".".join(parts[:depth]))
    elif family == "open_clip":
        paths += list(_OPEN_CLIP_HEADS)
    present = []
    for path in dict.fromkeys(paths):
        try:
            if isinstance(model.get_submodule(path), nn.Module):
                present.append(path)
        except AttributeError:
            continue
    return present


def _set_trainable(model: nn.Module) -> None:
    heads = tuple(f"{r.head}." for r in records(model).values() if r.head)
    peft_owned = peft_owned_parameters(model)  # PEFT's adapters are PEFT's to freeze or train
    for name, param in model.named_parameters():
        if id(param) not in peft_owned:
            param.requires_grad_(inject.ADAPTERS_ATTR in name or name.startswith(heads))


def detach(model: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one adapter (all when ``adapter_name`` is None), restoring the base model exactly.

    Merged adapters are unmerged first. When the last adapter goes, parameters get back the
    ``requires_grad`` flags they had before the first :func:`attach` (PEFT's adapter parameters keep theirs).
    ``model`` may be a ``peft.PeftModel`` (see :func:`attach`).
    """
    model = unwrap_peft_model(model)
    names = [adapter_name] if adapter_name is not None else list(records(model))
    for name in names:
        get_record(model, name)
    for name in reversed(names):  # last loaded first: each head goes back to what the load before it left
        _restore_head(model, records(model)[name])
        inject.remove(model, name)
        del records(model)[name]
    restore_trainable_flags(model)


def restore_trainable_flags(model: nn.Module) -> None:
    """After adapters went away: the trainable set of those left, or, when none is left, the ``requires_grad``
    flags parameters had before the first :func:`attach` (PEFT's adapter parameters keep theirs)."""
    if records(model):
        _set_trainable(model)
    else:
        flags = model.__dict__.pop(_GRAD_FLAGS_ATTR, {})
        peft_owned = peft_owned_parameters(model)
        for name, param in model.named_parameters():
            if id(param) not in peft_owned:
                param.requires_grad_(flags.get(canonical_path(model, name), param.requires_grad))


def write_head(model: nn.Module, adapter_name: str, head_state: dict[str, torch.Tensor]) -> None:
    """Copy ``head_state`` (keys relative to the head module: ``weight``, ``bias``) into the head of adapter
    ``adapter_name``, keeping the values it overwrites so that :func:`detach` gives the model back bit for bit.
    Every loader that writes a head (visadapt files, PEFT ``modules_to_save``) goes through here."""
    record = get_record(model, adapter_name)
    targets = model.get_submodule(record.head).state_dict(keep_vars=True)
    unknown = sorted(set(head_state) - set(targets))
    if unknown:
        raise KeyError(f"head {record.head!r} has no tensor {', '.join(unknown)}")
    if record.head_before is None:
        record.head_before = {key: value.detach().clone() for key, value in targets.items()}
    with torch.no_grad():
        for key, value in head_state.items():
            targets[key].copy_(value)


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted) in ``model``, in place of what is there."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _restore_head(model: nn.Module, record: AttachedAdapter) -> None:
    if record.head_before is None:
        return
    if isinstance(record.head_before, nn.Module):  # a replace_head load swapped the module: swap it back
        replace_submodule(model, record.head, record.head_before)
    else:
        targets = model.get_submodule(record.head).state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in record.head_before.items():
                targets[key].copy_(value)
    record.head_before = None


def _names(model: nn.Module, adapter_name: str | None) -> list[str]:
    if adapter_name is not None:
        get_record(model, adapter_name)
        return [adapter_name]
    if not records(model):
        raise ValueError("no visadapt adapter is attached to this model")
    return list(records(model))


def merge(model: nn.Module, adapter_name: str | None = None, probe: Any = None) -> float | None:
    """Put adapters in their inference form: LoRA-type deltas folded into the base weights (inference then
    costs what the base model costs), MoSA's sparse modules merged into one plain adapter (and a MoSA LoRA
    folded too).

    Arithmetic is fp32 whatever the model dtype; the overwritten weights are kept so :func:`unmerge`
    (and :func:`detach`) restore them bit for bit. Methods that cannot be merged raise ``ValueError``.

    ``probe``: an input batch (a tensor, or a tuple of positional arguments) run through the model before and
    after merging, in its current mode and without gradients. Then the largest absolute output difference the
    merge caused is returned (and logged): rounding in a bf16/fp16 model shows here, in the unit of the outputs.
    Without a probe, returns None.

    ``model`` may be a ``peft.PeftModel`` (see :func:`attach`); the deltas go into the base layers' weights, where
    PEFT's ``merge_adapter`` / diffusers' ``fuse_lora`` also write: unmerge in reverse order of merging to get the
    weights back bit for bit (out of order, :func:`unmerge` subtracts instead and warns).
    """
    model = unwrap_peft_model(model)
    for name in _names(model, adapter_name):
        plugin = get_record(model, name).plugin
        if not plugin.mergeable:
            raise ValueError(f"adapter {name!r} ({plugin.name}) cannot be merged: {plugin.merge_refusal}")
    before = _probe_output(model, probe) if probe is not None else None
    for name in _names(model, adapter_name):
        get_record(model, name).plugin.merge(model, name)
    if before is None:
        return None
    after = _probe_output(model, probe)
    difference = max(((a.float() - b.float()).abs().max().item() for a, b in zip(before, after, strict=True)),
                     default=0.0)
    logger.info("visadapt.merge: largest output difference on the probe batch %.3g", difference)
    return difference


def _probe_output(model: nn.Module, probe: Any) -> list[torch.Tensor]:
    """Every tensor ``model(*probe)`` returns (plain tensors, tuples/lists/dicts of them, diffusers outputs)."""
    args = probe if isinstance(probe, tuple) else (probe,)
    with torch.no_grad():
        out = model(*args)
    found: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value.detach().clone())
        elif isinstance(value, dict) or hasattr(value, "values") and callable(value.values):
            for item in value.values():
                collect(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item)

    collect(out)
    if not found:
        raise TypeError(f"the probe batch gave {type(out).__name__}, in which merge found no tensor to compare")
    return found


def set_weight(model: nn.Module, adapter_name: str, weight: float) -> None:
    """Scale adapter ``adapter_name`` by ``weight`` at run time: 0 is the base model (ResAdapter: plus its norms,
    which the weight does not scale), 1 the adapter as trained,
    anything between or beyond interpolates or extrapolates its deltas (see
    :func:`visadapt.inject.set_adapter_weight`). Unmerge a merged adapter first; merging folds the weighted
    delta, so merged and unmerged outputs stay equal."""
    model = unwrap_peft_model(model)
    get_record(model, adapter_name)
    inject.set_adapter_weight(model, adapter_name, weight)


def set_active_adapters(model: nn.Module, adapter_names: str | list[str] | tuple[str, ...] | None) -> None:
    """Run only ``adapter_names`` (one name, several, or None for all), like PEFT's ``set_adapter``: the others
    stay attached, trainable and saveable but are skipped by the hooks, so they cost no time. Used to train one
    adapter per task on a shared frozen backbone. A merged adapter cannot be switched off (unmerge it first);
    held modules a plugin calls itself (heads) are the plugin's to call or not."""
    model = unwrap_peft_model(model)
    every = list(records(model))
    if adapter_names is None:
        wanted = set(every)
    else:
        wanted = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        unknown = sorted(wanted - set(every))
        if unknown:
            raise KeyError(f"no adapter named {', '.join(map(repr, unknown))} is attached to this model "
                           f"(attached: {', '.join(map(repr, every)) or 'none'})")
    for name in every:
        if inject.attached(model, name):
            inject.set_adapter_active(model, name, name in wanted)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters that run (all, unless :func:`set_active_adapters` switched some off)."""
    model = unwrap_peft_model(model)
    return [name for name in records(model)
            if not inject.attached(model, name) or any(inject.is_active(i.module) for i in inject.attached(model, name))]


def get_weight(model: nn.Module, adapter_name: str) -> float:
    """The runtime weight of ``adapter_name`` (1.0 unless :func:`set_weight` changed it)."""
    model = unwrap_peft_model(model)
    get_record(model, adapter_name)
    items = inject.attached(model, adapter_name)
    return inject.adapter_weight(items[0].module) if items else 1.0


def unmerge(model: nn.Module, adapter_name: str | None = None) -> None:
    """Undo :func:`merge`, in reverse order of adapters, restoring base weights bit for bit (``model`` may be a
    ``peft.PeftModel``)."""
    model = unwrap_peft_model(model)
    for name in reversed(_names(model, adapter_name)):
        plugin = get_record(model, name).plugin
        if plugin.mergeable:
            plugin.unmerge(model, name)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad: hand these to the optimiser."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclasses.dataclass
class Summary:
    """Parameter and storage counts. ``adapter_bytes`` is what :func:`visadapt.save_adapter` stores as tensors."""

    trainable_params: int
    total_params: int
    adapter_params: int
    adapter_bytes: int
    adapters: dict[str, dict[str, Any]]
    head_params: int = 0  # parameters of the classifier heads stored with the adapters (in trainable_params)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.3f}%)",
                 f"adapter params:   {self.adapter_params:,}   adapter bytes on disk: {self.adapter_bytes:,}"]
        for name, info in self.adapters.items():
            lines.append(f"  {name}: {info['plugin']}, {info['params']:,} params, {info['bytes']:,} bytes"
                         + (f", head={info['head']}" if info["head"] else ""))
        return "\n".join(lines)


def stored_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Exactly the tensors an adapter file holds: the plugin's exported state plus its head."""
    record = get_record(model, adapter_name)
    tensors = dict(record.plugin.export_state(model, adapter_name))
    if record.head:
        for key, tensor in model.get_submodule(record.head).state_dict().items():
            tensors[f"{record.head}.{key}"] = tensor
    return tensors


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameter counts and the stored size of each attached adapter (``model`` may be a
    ``peft.PeftModel``: its PEFT parameters are counted in the totals)."""
    model = unwrap_peft_model(model)
    per: dict[str, dict[str, Any]] = {}
    for name, record in records(model).items():
        tensors = stored_tensors(model, name)
        # Parameters are counted on the modules, bytes on what is stored: a 1-bit file packs 8 per byte.
        head_params = (sum(p.numel() for p in model.get_submodule(record.head).parameters())
                       if record.head else 0)
        params = sum(p.numel() for item in inject.attached(model, name) for p in item.module.parameters())
        per[name] = {
            "plugin": record.plugin.name,
            "params": params + head_params,
            "head_params": head_params,
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "head": record.head,
        }
    params = list(model.named_parameters())
    return Summary(
        trainable_params=sum(p.numel() for _, p in params if p.requires_grad),
        total_params=sum(p.numel() for _, p in params),
        adapter_params=sum(p.numel() for n, p in params if inject.ADAPTERS_ATTR in n),
        adapter_bytes=sum(info["bytes"] for info in per.values()),
        adapters=per,
        head_params=sum(info["head_params"] for info in per.values()),
    )
