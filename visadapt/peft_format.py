"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained``
writes them) loaded as visadapt ``lora`` adapters that give ``PeftModel.from_pretrained``'s outputs.

The config is read with PEFT's own classes (``PeftConfig.from_peft_type``, so PEFT's own validation runs) and its
target-selection rules (``check_target_module_exists``: ``target_modules`` as a list of names/suffixes or one regex
string, ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``, and never inside ``modules_to_save``);
per-module rank and alpha come from PEFT's ``get_pattern_key`` (regex keys, the first match wins), resolved here
against the model's module names, so the visadapt config holds explicit full paths. Every field of the installed
PEFT ``LoraConfig`` is decided:

=============================  ===========================================================================
honoured                       ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``
                               (scale ``alpha / sqrt(r)``), ``target_modules`` (list or regex string),
                               ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
                               ``modules_to_save`` (one module, the model's classifier: it becomes the adapter's
                               stored head and its saved tensors are copied into the model's module, as PEFT's
                               ``ModulesToSaveWrapper`` does)
ignored, with the reason       ``task_type``, ``auto_mapping``, ``base_model_name_or_path``, ``revision``,
                               ``peft_version`` (descriptive; they select no weights); ``inference_mode`` (training
                               flag); ``lora_dropout`` (identity at inference; visadapt keeps it at 0 so training
                               further starts clean); ``init_lora_weights`` True / False / "gaussian" /
                               "orthogonal" (initialisation only: the file's tensors replace it);
                               ``loftq_config``, ``eva_config``, ``corda_config``, ``lora_ga_config``,
                               ``megatron_core``, ``qalora_group_size``, ``runtime_config`` (only read together
                               with an option refused below or at training time)
refused, naming option/file    ``peft_type`` other than LORA; ``use_dora``; ``lora_bias``; ``bias`` other than
                               "none"; ``fan_in_fan_out`` True; ``target_parameters``; ``megatron_config``;
                               ``layer_replication``; ``trainable_token_indices``; ``alora_invocation_tokens``;
                               ``use_qalora``; ``use_bdlora``; ``velora_config``; ``arrow_config``; ``kasa_config``;
                               ``monteclora_config``; ``ensure_weight_tying`` True; ``init_lora_weights`` "pissa*",
                               "olora", "corda", "loftq", "eva", "lora_ga" (these change the *base* weights);
                               ``target_modules`` None or "all-linear" (PEFT resolves them from transformers model
                               types only); ``modules_to_save`` matching several modules, or a module that is not
                               the classifier (:func:`visadapt.api.classifier_paths`); fields this PEFT does not
                               know, unless null/false
=============================  ===========================================================================

A corrupt or unparseable ``adapter_config.json``, a missing ``adapter_model.safetensors`` (a pickled
``adapter_model.bin`` is not opened), a target that is not ``nn.Linear`` / ``nn.Conv2d``, and keys that do not
match the model give one error naming the file; the model is left exactly as it was. Works on any model visadapt
has sites for (timm ViT with ``target_modules=["qkv"]``, diffusers UNets, ...).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from visadapt import api
from visadapt.formats import CheckpointFormat, register_format
from visadapt.io import AdapterFileError
from visadapt.load_report import MATCHED, MISMATCHED, MISSING, UNEXPECTED, AdapterLoadError, LoadReport
from visadapt.lora_layouts import (
    LoraLayoutError,
    LoraWeights,
    fitting_loras,
    load_lora_weights_into,
    lora_config_for,
)
from visadapt.peft_compat import named_layers, unwrap_peft_model

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STATE_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model

#: fields refused unless they hold this "off" value (PEFT's defaults)
_REFUSED_UNLESS = {
    "use_dora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False, "target_parameters": None,
    "megatron_config": None, "layer_replication": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "velora_config": None,
    "arrow_config": None, "kasa_config": None, "monteclora_config": None, "ensure_weight_tying": False,
}
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")
_TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


def check_lora_config(config, source: str, *, targets_from_state: bool = False) -> None:
    """Refuse a ``peft.LoraConfig`` that asks for anything visadapt's LoRA cannot give exactly (the module
    docstring's table), naming the option, its value and ``source``. ``targets_from_state``: the modules come
    from the state dict's keys (diffusers' loader), so the target-selecting fields are not checked."""
    for name, off in _REFUSED_UNLESS.items():
        value = getattr(config, name, off)
        if value not in (off, None) and not (off is None and value in ([], {}, False)):
            raise LoraLayoutError(f"{source}: PEFT option {name}={value!r} has no visadapt equivalent (visadapt loads "
                                  f"plain LoRA); load it with PEFT itself, or retrain without {name}")
    init = config.init_lora_weights
    if not any(init is plain or init == plain for plain in _PLAIN_INITS):
        raise LoraLayoutError(f"{source}: PEFT option init_lora_weights={init!r} rewrites the base model's weights "
                              f"when the adapter is created, which visadapt does not reproduce; convert the adapter "
                              f"to a plain LoRA with PEFT first (save_pretrained(..., "
                              f"path_initial_model_for_weight_conversion=...))")
    if targets_from_state:
        return
    targets = config.target_modules
    if targets is None or targets == "all-linear" or (not isinstance(targets, str) and "all-linear" in targets):
        raise LoraLayoutError(f"{source}: PEFT option target_modules={targets!r} is resolved by PEFT from "
                              f"transformers model types; name the modules (e.g. [\"qkv\"]) in {CONFIG_NAME}")


def resolve_rank_alpha(config, path: str) -> tuple[int, float]:
    r"""``(rank, alpha)`` PEFT gives module ``path`` under ``config``: ``LoraModel._create_and_replace``'s lookup
    with PEFT's ``get_pattern_key`` (pattern keys are regexes matched as ``(.*\.)?(key)$``, the first wins)."""
    from peft.utils.other import get_pattern_key

    rank = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), path), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), path), config.lora_alpha)
    return int(rank), float(alpha)


def warn_unused_patterns(config, paths: Iterable[str], source: str) -> None:
    """Log the ``rank_pattern`` / ``alpha_pattern`` keys that match none of ``paths`` (PEFT warns and ignores them
    too; diffusers' kohya attention alphas end up here)."""
    from peft.utils.other import get_pattern_key

    paths = list(paths)
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, field) or {}
        used = {get_pattern_key(list(pattern), path) for path in paths}
        unused = [key for key in pattern if key not in used]
        if unused:
            logger.warning("%s: %s keys %s match no adapted module and are ignored, as PEFT ignores them",
                           source, field, unused)


def read_peft_config(raw: Mapping | str | bytes, source: str):
    """``adapter_config.json`` contents (JSON text or the parsed dict) -> ``peft.LoraConfig`` built by PEFT
    (``PeftConfig.from_peft_type``), after refusing non-LoRA types and unknown fields, then checked by
    :func:`check_lora_config`."""
    import dataclasses

    from peft import LoraConfig, PeftConfig

    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as err:
            raise AdapterFileError(f"{source} is not valid JSON ({err}); re-save the adapter with PEFT's "
                                   f"save_pretrained") from err
    if not isinstance(raw, Mapping):
        raise AdapterFileError(f"{source} holds a JSON {type(raw).__name__}, not an object of LoraConfig fields")
    kwargs = dict(raw)
    peft_type = kwargs.get("peft_type")
    if str(getattr(peft_type, "value", peft_type)) != "LORA":
        raise LoraLayoutError(f"{source}: peft_type={peft_type!r}; visadapt loads PEFT LoRA adapters only "
                              f"(peft_type 'LORA'): load this one with PeftModel.from_pretrained")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = {k: v for k, v in kwargs.items() if k not in known and v not in (None, False, [], {})}
    if unknown:
        raise LoraLayoutError(f"{source}: fields {sorted(unknown)} are unknown to the installed PEFT LoraConfig; "
                              f"visadapt will not load an adapter whose options it cannot check (upgrade PEFT, or "
                              f"remove them if they are at their defaults)")
    kwargs = {k: v for k, v in kwargs.items() if k in known}
    try:
        config = PeftConfig.from_peft_type(**kwargs)
    except (TypeError, ValueError) as err:
        raise LoraLayoutError(f"{source}: PEFT rejects this config: {err}") from err
    check_lora_config(config, source)
    return config


def target_paths(model: nn.Module, config) -> list[str]:
    """The module paths PEFT's ``inject_adapter`` would adapt in ``model`` for ``config`` (PEFT's own
    ``check_target_module_exists``; visadapt's own submodules are skipped). Paths are canonical
    (:func:`visadapt.peft_compat.named_layers`): a layer PEFT has wrapped already counts once, as itself, and
    PEFT's own ``lora_A`` / ``lora_B`` modules are not the model's."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return [name for name, _ in named_layers(model)
            if name and "visadapt_" not in name and check_target_module_exists(config, name)]


def saved_module_paths(model: nn.Module, config) -> list[str]:
    """The modules ``modules_to_save`` names, matched as PEFT's ``_set_trainable`` does (plain ``endswith``), by
    canonical path (:func:`target_paths`)."""
    names = config.modules_to_save or []
    return [key for key, _ in named_layers(model) if key and "visadapt_" not in key
            and any(key.endswith(name) for name in names)]


def load_peft_state(model: nn.Module, config, state: Mapping[str, torch.Tensor], adapter_name: str, *,
                    strict: bool = True, source: str):
    """Attach to ``model`` the visadapt ``lora`` adapter equal to PEFT adapter ``config`` + ``state`` (keys
    ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` and the ``modules_to_save`` module's own
    tensors) and load it; return the :class:`~visadapt.plugins.lora.LoRAConfig`. Every key lands in a
    :class:`~visadapt.load_report.LoadReport` (on the record); ``strict`` raises on anything that does not fit,
    leaving ``model`` exactly as it was."""
    report = LoadReport(source, f"adapter {adapter_name!r}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise LoraLayoutError(f"{source}: value of {key!r} is a {type(value).__name__}, not a tensor")
    model = unwrap_peft_model(model)  # a PeftModel: the keys' base_model.model. prefix is its wrapped model's
    remaining = dict(state)
    modules = dict(named_layers(model))
    paths = target_paths(model, config)
    if not paths:
        raise LoraLayoutError(f"{source}: target_modules={config.target_modules!r} match no module of this "
                              f"{type(model).__name__} (PEFT refuses this too)")
    loras: dict[str, LoraWeights] = {}
    for path in paths:
        keys = (f"{STATE_PREFIX}{path}.lora_A.weight", f"{STATE_PREFIX}{path}.lora_B.weight")
        present = [key for key in keys if key in remaining]
        for key in present:
            remaining.pop(key)
        if not isinstance(modules[path], (nn.Linear, nn.Conv2d)):
            for key in present or keys:
                report.add(path, key, UNEXPECTED, f"PEFT targets a {type(modules[path]).__name__} here; visadapt's "
                                                  f"LoRA adapts nn.Linear / nn.Conv2d")
            continue
        if len(present) < 2:
            # PEFT would keep its zero-initialised lora_B there (no change to the output) and warn
            for key in keys:
                report.add(path, key, MISSING if key not in present else UNEXPECTED,
                           "" if key not in present else "its partner tensor is missing")
            continue
        down, up = state[keys[0]], state[keys[1]]
        rank, alpha = resolve_rank_alpha(config, path)
        if down.dim() < 2 or up.dim() < 2 or down.shape[0] != rank or up.shape[1] != rank:
            for key in keys:
                report.add(path, key, MISMATCHED, f"config rank {rank} vs tensors lora_A {tuple(down.shape)} / "
                                                  f"lora_B {tuple(up.shape)}")
            continue
        loras[path] = LoraWeights(down, up, float(alpha), keys)
    warn_unused_patterns(config, paths, source)
    fits = fitting_loras(model, loras, report)

    head = None
    head_state: dict[str, torch.Tensor] = {}
    saved = saved_module_paths(model, config)
    if len(saved) > 1:
        raise LoraLayoutError(f"{source}: modules_to_save={config.modules_to_save!r} matches {len(saved)} modules "
                              f"({', '.join(saved[:5])}); visadapt stores one head per adapter")
    allowed = api.classifier_paths(model)
    if saved and saved[0] not in allowed:
        # the rule every visadapt file follows: a file writes into the adapter's modules and the classifier only
        raise LoraLayoutError(f"{source}: modules_to_save={config.modules_to_save!r} names {saved[0]!r}, which is not "
                              f"this model's classifier ({', '.join(allowed) or 'it has none a file may write'}); "
                              f"visadapt lets an adapter file replace the classifier only: load this folder with "
                              f"PeftModel.from_pretrained")
    if saved:
        head = saved[0]
        expected = modules[head].state_dict()
        given = {key[len(STATE_PREFIX):]: remaining.pop(key) for key in list(remaining)
                 if key.startswith(f"{STATE_PREFIX}{head}.")}
        for name, tensor in expected.items():
            key = f"{STATE_PREFIX}{head}.{name}"
            got = given.pop(f"{head}.{name}", None)
            if got is None:
                report.add(head, key, MISSING)
            elif got.shape != tensor.shape:
                report.add(head, key, MISMATCHED, f"file {tuple(got.shape)} vs model {tuple(tensor.shape)}")
            else:
                report.add(head, key, MATCHED)
                head_state[name] = got
        for name in given:
            report.add(head, f"{STATE_PREFIX}{name}", UNEXPECTED, f"no such tensor in {head}")
    for key in remaining:
        why = ("not a module PEFT's config targets" if key.endswith((".lora_A.weight", ".lora_B.weight"))
               else "fits no PEFT LoRA key (base_model.model.<path>.lora_A/lora_B.weight)")
        report.add(key.removeprefix(STATE_PREFIX).rpartition(".")[0], key, UNEXPECTED, why)
    try:
        report.enforce(strict)
    except AdapterLoadError as err:
        raise LoraLayoutError(str(err), report) from err
    if not fits:
        raise LoraLayoutError(f"{source}: no LoRA module of the adapter fits this model", report)

    config_out = lora_config_for(fits, use_rslora=bool(config.use_rslora))
    try:
        api.attach(model, "lora", config_out, adapter_name=adapter_name, head=head)
    except ValueError as err:
        raise LoraLayoutError(f"{source}: the adapter does not fit this model: {err}", report) from err
    try:
        load_lora_weights_into(model, fits, adapter_name)
        if head:
            api.write_head(model, adapter_name, head_state)  # detach (also on a failure here) puts it back
    except Exception:
        api.detach(model, adapter_name)
        raise
    api.get_record(model, adapter_name).load_report = report
    return config_out


@register_format("peft")
class PeftFormat(CheckpointFormat):
    """A PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``), see the module docstring.
    In memory: a state dict with ``base_model.model.`` keys, and ``metadata={"adapter_config": <the JSON text
    of adapter_config.json, or its dict>}``."""

    file_names = (CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def detect(cls, files, state) -> bool:
        if state is not None:
            return bool(state) and all(str(k).startswith(STATE_PREFIX) for k in state)
        return CONFIG_NAME in files

    def load(self, model, files, state, adapter_name, strict=True, metadata=None):
        if state is not None:
            source = f"the PEFT state dict given ({len(state)} tensors)"
            raw = (metadata or {}).get("adapter_config")
            if raw is None:
                raise LoraLayoutError(f"{source} has no config: a PEFT state dict's alpha, rank patterns and targets "
                                      f"are in adapter_config.json; pass metadata={{'adapter_config': "
                                      f"<its JSON text>}} or load the folder")
            config = read_peft_config(raw, f"{source} (adapter_config)")
            return load_peft_state(model, config, state, adapter_name, strict=strict, source=source)
        if CONFIG_NAME not in files:
            raise AdapterFileError(f"no {CONFIG_NAME} among {sorted(files)}; a PEFT adapter folder holds "
                                   f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        config_path = Path(files[CONFIG_NAME])
        try:
            text = config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise AdapterFileError(f"cannot read {config_path}: {err}") from err
        config = read_peft_config(text, str(config_path))
        weights = files.get(WEIGHTS_NAME) or config_path.parent / WEIGHTS_NAME
        if not Path(weights).is_file():
            pickle = config_path.parent / "adapter_model.bin"
            extra = (f"; {pickle.name} is there, a pickle, which visadapt does not open: re-save it with PEFT's "
                     f"save_pretrained(..., safe_serialization=True)" if pickle.is_file() else "")
            raise AdapterFileError(f"PEFT adapter {config_path.parent} has {CONFIG_NAME} but no {WEIGHTS_NAME}"
                                   f"{extra}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from visadapt.io import _check_is_safetensors

        _check_is_safetensors(weights)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise AdapterFileError(f"{weights} is not a readable safetensors file: {err}") from err
        return load_peft_state(model, config, state, adapter_name, strict=strict, source=str(weights))
