"""Checkpoint formats other than visadapt's own, converted on load into ordinary visadapt adapters.

Published adapters ship in their authors' layouts: ResAdapter as two files (a diffusers LoRA file and a file of
UNet normalisation tensors), SELMA's experts and community LoRAs in the diffusers/PEFT LoRA layout. A format is
one class registered with :func:`register_format`; :func:`find_format` picks the one that recognises a folder's
files (or an in-memory state dict), and its :meth:`CheckpointFormat.load` attaches the equivalent visadapt
adapter, so ``save_adapter`` afterwards writes the one visadapt file format.

``visadapt.diffusers``' ``pipe.load_visadapt`` reads visadapt files itself and asks these formats about
anything else; plugins register their formats at import (``plugins/resadapter.py``, ``plugins/selma.py``).
Built in: ``diffusers_lora`` (:mod:`visadapt.lora_layouts`: diffusers / kohya / older LoRA files, read with
diffusers' converters and their ``lora_adapter_metadata`` header) and ``peft`` (:mod:`visadapt.peft_format`:
``adapter_config.json`` + ``adapter_model.safetensors`` folders).

In-memory state dicts: a format's :meth:`~CheckpointFormat.load` takes ``metadata=``, what the file's header
(or, for ``peft``, its ``adapter_config.json``) would have said; a format that cannot read it refuses it
(:func:`refuse_metadata`) instead of dropping it. Loaders call :func:`load_checkpoint`.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from visadapt.plugin import AdapterConfig

_FORMATS: dict[str, type[CheckpointFormat]] = {}


class CheckpointFormat(abc.ABC):
    """One foreign layout. Subclasses set ``name`` and ``file_names`` and implement the two methods.

    ``file_names``: the file names the layout uses inside a folder or hub repo (most specific first), so a
    loader knows what to look for or download; the first that :meth:`detect` accepts wins.
    """

    name: str = ""
    file_names: tuple[str, ...] = ()

    @classmethod
    @abc.abstractmethod
    def detect(cls, files: Mapping[str, Path], state: Mapping[str, torch.Tensor] | None) -> bool:
        """Whether this layout is what ``files`` (existing files by name, possibly empty) or ``state`` (tensors
        given in memory instead of files, or None) hold. Must be cheap: read headers, not tensors."""

    @abc.abstractmethod
    def load(self, model: nn.Module, files: Mapping[str, Path], state: Mapping[str, torch.Tensor] | None,
             adapter_name: str, strict: bool = True, metadata: Mapping[str, str] | None = None) -> AdapterConfig:
        """Attach to ``model`` (a diffusers UNet, ...) the visadapt adapter ``adapter_name`` equivalent to the
        checkpoint and load its tensors; return the adapter's config. Every key goes into a
        :class:`~visadapt.load_report.LoadReport`, kept on the adapter's record (``record.load_report``) and
        enforced by its rule: ``strict`` raises with the report on anything that does not fit, leaving ``model``
        exactly as it was; ``strict=False`` loads what fits and prints the rest; nothing fitting always raises.

        ``metadata`` (a ``{str: str}`` mapping, or None): what the file's header would say, for an in-memory
        ``state``: ``diffusers_lora`` reads ``{"lora_adapter_metadata": "<json>"}``, ``peft``
        ``{"adapter_config": "<adapter_config.json text>"}``. A format that reads no metadata refuses any that
        is given (:func:`refuse_metadata`) rather than dropping it: a scale in it would be lost."""


def refuse_metadata(fmt: CheckpointFormat, metadata: Mapping[str, str] | None) -> None:
    """Raise ``TypeError`` when ``metadata`` is given to ``fmt``, a format that reads none (its ``load`` calls
    this first), so a header's scale is never silently dropped."""
    if metadata is not None:
        raise TypeError(f"checkpoint format {fmt.name!r} reads no metadata; metadata= cannot be honoured for it "
                        f"(drop it, or save the adapter with visadapt.save_adapter)")


def register_format(name: str):
    """Class decorator: ``@register_format("resadapter")`` makes the format known to :func:`find_format`."""

    def wrap(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
        if not (isinstance(cls, type) and issubclass(cls, CheckpointFormat)):
            raise TypeError(f"@register_format({name!r}) decorates CheckpointFormat subclasses, not {cls!r}")
        if name in _FORMATS and _FORMATS[name] is not cls:
            raise ValueError(f"checkpoint format {name!r} is already registered by {_FORMATS[name].__module__}")
        cls.name = name
        _FORMATS[name] = cls
        return cls

    return wrap


def _discover() -> None:
    # the plugins that define formats register them at import; the LoRA layouts module registers its own
    import visadapt.lora_layouts
    import visadapt.peft_format  # noqa: F401
    from visadapt.registry import _discover as discover_plugins

    discover_plugins()


def list_formats() -> list[str]:
    _discover()
    return sorted(_FORMATS)


def get_format(name: str) -> CheckpointFormat:
    _discover()
    if name not in _FORMATS:
        raise KeyError(f"unknown checkpoint format {name!r}; known: {', '.join(sorted(_FORMATS)) or 'none'}")
    return _FORMATS[name]()


def find_format(files: Mapping[str, Path], state: Mapping[str, torch.Tensor] | None = None
                ) -> CheckpointFormat | None:
    """The registered format that recognises ``files`` / ``state``, or None when none does."""
    _discover()
    for cls in _FORMATS.values():
        if cls.detect(files, state):
            return cls()
    return None


def known_file_names() -> list[str]:
    """Every file name some registered format may read, in registration order, without duplicates."""
    _discover()
    names: dict[str, None] = {}
    for cls in _FORMATS.values():
        names.update(dict.fromkeys(cls.file_names))
    return list(names)


def load_checkpoint(fmt: CheckpointFormat, model: nn.Module, files: Mapping[str, Path],
                    state: Mapping[str, torch.Tensor] | None, adapter_name: str, strict: bool = True,
                    metadata: Mapping[str, str] | None = None) -> AdapterConfig:
    """``fmt.load(...)`` on ``model`` (the model a ``peft.PeftModel`` wraps, when given one); ``metadata`` (the
    header of an in-memory ``state``) is refused by a format that cannot read it rather than dropped."""
    from visadapt.peft_compat import unwrap_peft_model

    model = unwrap_peft_model(model)  # a peft.PeftModel: the model it wraps, whose module paths the files name
    return fmt.load(model, files, state, adapter_name, strict=strict, metadata=metadata)
