"""The plugin contract: a config dataclass plus a small class that attaches, merges and exports.

A plugin never looks inside a model itself; it asks :mod:`visadapt.sites` for named sites and inserts
modules there. Everything it inserts lives under a child named ``visadapt_adapters`` of the host module,
so the trainable set, the saved state and detach are all found by name.
"""
from __future__ import annotations

import abc
import dataclasses
import difflib
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from visadapt import inject
from visadapt.load_report import LoadReport


def config_field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field that carries its own one-line help text (shown by ``visadapt list``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass
class AdapterConfig:
    """Base of every plugin config. Subclasses are dataclasses whose fields all have defaults."""


    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed range when a value is out of range."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Build a config, refusing unknown fields with the closest valid names in the error."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(known), n=3)
                hints.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
            raise ValueError(
                f"{cls.__qualname__} has no field {', '.join(hints)}; valid fields: {', '.join(known)}"
            )
        coerced = {}
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            # JSON has no tuples: give tuple-typed fields their tuple back so configs compare equal.
            if isinstance(value, list) and _accepts_tuple(hints.get(key)):
                value = tuple(value)
            coerced[key] = value
        return cls(**coerced)

    @classmethod
    def from_header(cls, values: dict[str, Any]) -> AdapterConfig:
        """The config a saved adapter file's header describes (what :func:`visadapt.io.parse_header` builds).

        A field added after a file was written is missing from its header, and that file must keep the
        behaviour it was trained with even where the new default differs: :meth:`saved_file_values` fills
        such fields first; then as :meth:`from_dict`."""
        return cls.from_dict(cls.saved_file_values(dict(values)))

    @classmethod
    def saved_file_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (a saved header's config) with every field the file predates set to the value that
        reproduces its old behaviour. Override when a new field's default is not the old behaviour."""
        return values

    @classmethod
    def field_help(cls) -> list[tuple[str, Any, str]]:
        """``(name, default, help)`` for each field, for listings."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, default, f.metadata.get("help", "")))
        return rows


def _accepts_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    return any(typing.get_origin(arg) is tuple for arg in typing.get_args(hint))


def config_values(config_file: str | os.PathLike | None, overrides: typing.Iterable[str] = (),
                  base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plugin config fields for a training script: ``base``, then a YAML file, then ``KEY=VALUE`` strings
    (values parsed as YAML), later wins; what the ``--adapter-config`` and ``--set`` flags give."""
    import yaml

    values = dict(base or {})
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"--adapter-config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--adapter-config {path}: expected a mapping of config fields, got {type(loaded).__name__}")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set bottleneck=16")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"config field {name}={value!r} is not one of {choices}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"config field {name}={value!r} is out of range: it must be {bound}")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"config field {name}={value!r} is out of range: it must be an integer > 0")


def check_dropout(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"config field {name}={value!r} is out of range: it must be in [0, 1)")


class AdapterPlugin(abc.ABC):
    """Contract the core relies on. Subclass, set ``name``/``Config``/``families``, register with
    :func:`visadapt.register_plugin`.

    Required: :meth:`attach`. Optional: :meth:`merge`/:meth:`unmerge` (set ``mergeable = True``),
    :meth:`export_state`/:meth:`import_state` where the stored form differs from the training form,
    :meth:`on_step` for per-step behaviour the training engine calls, :meth:`training_loss` for methods
    whose objective is more than the task loss of one forward pass.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    families: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = False
    #: why merging is impossible, shown in the error when ``mergeable`` is False
    merge_refusal: ClassVar[str] = "this method inserts non-linear modules that no base weight can absorb"

    @abc.abstractmethod
    def attach(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        """Insert this method's modules into ``model`` in place, at sites from :mod:`visadapt.sites`."""

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Fold this adapter into the base weights (only called when ``mergeable``)."""
        inject.merge(model, adapter_name)

    def unmerge(self, model: nn.Module, adapter_name: str) -> None:
        inject.unmerge(model, adapter_name)

    def export_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors to store, keyed without the adapter name (see :func:`visadapt.inject.adapter_state`);
        k-bit matrices (:class:`visadapt.layers.QuantizedLinear`) are stored packed."""
        return inject.packed_adapter_state(model, adapter_name)

    def import_state(self, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, *,
                     strict: bool = True, report: LoadReport | None = None) -> LoadReport:
        """Inverse of :meth:`export_state`. Every key goes into ``report`` (returned); ``strict`` raises on any
        missing, unexpected or misshapen tensor before loading anything, ``strict=False`` loads what fits and
        prints the rest (see :mod:`visadapt.load_report`)."""
        return inject.load_packed_adapter_state(model, state, adapter_name, strict=strict, report=report)

    def replaces_head(self, config: AdapterConfig) -> bool:
        """True when the adapter brings its own classifier (a quantised head), so the model's head must be
        neither trained nor stored; training scripts then attach without ``head=``."""
        return False

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called by the training engine with the number of optimiser steps done so far: once before
        training starts (or resumes) and after every optimiser step. Most methods need nothing here."""

    def training_loss(self, model: nn.Module, config: AdapterConfig, images: torch.Tensor, labels: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The scalar loss of one training batch; ``model`` may be wrapped for distributed training.

        Default: ``loss_fn(model(images), labels)``. A method overrides this for extra forward passes or
        regularisers (MoSA's consistency term); the engine refuses two attached adapters that both do.
        """
        return loss_fn(model(images), labels)
