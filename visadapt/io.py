"""One adapter file format for every method: a single ``.safetensors`` file.

Header metadata (all strings):

=================  =================================================================================
``format``         ``"visadapt"``
``format_version`` ``"1"``
``plugin``         registry name of the method
``config``         the plugin config as JSON
``adapter_name``   the name it was saved under (informational; load under any name)
``base_model``     JSON fingerprint of the base model: family, name, depth and width per tower
``site_widths``    JSON ``{host path: [in, out]}`` of every host the adapter touches
``head``           path of the classifier head stored alongside (only the model's classifier may be named:
                   :func:`visadapt.api.classifier_paths`), or ``""``
``tensors_sha256`` digest of names, dtypes, shapes and bytes of all tensors: corruption is caught on load
``visadapt_version``
=================  =================================================================================

Only safetensors is ever read: no pickle, so a file cannot run code. Headers are untrusted: every field is checked
(:func:`check_header`, :func:`parse_header`) and the tensors the config implies are compared with the stored ones
(:func:`expected_adapter_state`) before anything is attached. Files are written with their metadata keys sorted
(:func:`canonical_safetensors_bytes`): the same adapter gives the same bytes in any process.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import types
import typing
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from visadapt import api, inject
from visadapt.load_report import AdapterLoadError, LoadReport
from visadapt.peft_compat import unwrap_peft_model
from visadapt.plugin import AdapterConfig, AdapterPlugin
from visadapt.registry import UnknownPluginError, get_plugin
from visadapt.sites import fingerprint

FORMAT = "visadapt"
FORMAT_VERSION = "1"
#: the header entries the format itself writes; save_adapter's ``metadata`` may not use them
RESERVED_METADATA = ("format", "format_version", "plugin", "config", "adapter_name", "base_model", "site_widths",
                     "head", "tensors_sha256", "visadapt_version")


class AdapterFileError(ValueError):
    """The file is missing, not safetensors, not a visadapt adapter, truncated or corrupted."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """The file, folder, file in a folder or hub repo named as an adapter source does not exist (or is not in the
    local cache offline); also a ``FileNotFoundError``, so ``except FileNotFoundError`` catches it."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def canonical_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` and ``metadata`` as bytes that depend on their contents alone.

    safetensors keeps the metadata in a Rust ``HashMap`` and writes it in a per-process random order, so the same
    adapter saved by two processes gave two different files. No library writes a canonical header, so this one
    re-emits safetensors' own header JSON with the metadata keys sorted (the tensor entries keep safetensors' order,
    which follows the data layout, and the data section is safetensors' own, byte for byte).
    """
    raw = save(tensors, metadata=metadata)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to keep the data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + header_len:]


# Temporary files of save_adapter: ``.<name>.<host>-<pid>-<random>.tmp`` next to the target, so that a later save
# can tell which ones a killed writer on this machine left behind.
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _process_is_gone(pid: int) -> bool:
    if os.name != "posix":
        return False  # no cheap liveness test: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    return False


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers of ``path`` killed mid-save on this machine left next to it (their
    process is gone); files of live writers and of other machines sharing the folder are kept. Returns those
    deleted."""
    path = Path(path)
    removed = []
    host = _host_tag()
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_PATTERN.match(entry.name)
        if (match and match["name"] == path.name and match["host"] == host
                and _process_is_gone(int(match["pid"]))):
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:  # another saver cleaned it first
                pass
    return removed


def write_file_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The file is created with the process's umask like any other output (safetensors' own writer creates 0600
    files). A crash mid-write leaves at most a hidden temporary file, which the next save to ``path`` deletes."""
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if os.name == "posix":  # the rename itself survives a power loss once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 metadata: dict[str, str] | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` (and its head) to ONE safetensors file, atomically.

    The file appears under its final name only once it is complete: a crash mid-write leaves at most a
    hidden temporary file, never a truncated adapter, and the next save to the same path deletes it. The bytes
    depend only on the tensors and the metadata (:func:`canonical_safetensors_bytes`): the same adapter saved twice,
    by any process, gives the same file. Returns the path written.
    """
    from visadapt import __version__

    model = unwrap_peft_model(model)  # a peft.PeftModel: the model it wraps, where visadapt's adapters are
    record = api.get_record(model, adapter_name)
    path = Path(path)
    if path.is_dir():
        path = path / "adapter.safetensors"
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in api.stored_tensors(model, adapter_name).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plugin": record.plugin.name,
        "config": json.dumps(record.config.to_dict(), sort_keys=True),
        "adapter_name": adapter_name,
        "base_model": json.dumps(fingerprint(model), sort_keys=True),
        "site_widths": json.dumps(site_widths(model, adapter_name), sort_keys=True),
        "head": record.head or "",
        "tensors_sha256": tensors_digest(tensors),
        "visadapt_version": __version__,
    }
    for key, value in (metadata or {}).items():
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved by the visadapt format; choose another name")
        meta[key] = str(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, canonical_safetensors_bytes(tensors, meta))
    return path


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON so that readers see the old file or the whole new one, never a part
    (:func:`write_file_atomic`: each writer has a temporary file of its own, so concurrent writers of one file
    cannot hand each other a half-written one)."""
    write_file_atomic(Path(path), json.dumps(payload, indent=1).encode())


def site_widths(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    """``{"host:kind": [in_features, out_features]}`` for every site the adapter occupies."""
    return {f"{item.host_path}:{item.kind}": list(item.module.site_widths)
            for item in inject.attached(model, adapter_name)}


# The metadata entry where train/ scripts record the run (benchmark, task, backbone, normalisation, ...).
TRAIN_METADATA = "visadapt.train"


class TrainingRun:
    """The ``visadapt.train`` entry of an adapter file (what a ``train/`` script recorded about its run), read as
    untrusted input: every getter checks the field's type and range and raises :class:`AdapterFileError` naming
    the file, ``visadapt.train.<field>`` and what was expected. A file without the entry reads as an empty run.
    """

    def __init__(self, path, meta: Mapping[str, str]):
        self.path = path
        self.present = TRAIN_METADATA in meta
        self._values = (_json_object(path, meta, TRAIN_METADATA, "a JSON object describing the training run")
                        if self.present else {})

    def _error(self, field: str, problem: str, expected: str) -> AdapterFileError:
        return _header_error(self.path, f"{TRAIN_METADATA}.{field}", problem, expected)

    def _get(self, field: str, required: bool) -> Any:
        value = self._values.get(field)
        if value is None and required:
            raise self._error(field, "is missing", "the value the train/ script records; this file was not "
                              "written by a complete visadapt train/ run, so name it on the command line")
        return value

    def text(self, field: str, default: str | None = None, *, required: bool = False) -> str | None:
        """A printable string field (a name, a benchmark, a precision)."""
        value = self._get(field, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value.isprintable() or len(value) > 4096:
            raise self._error(field, f"is {_shown(value)}", "a printable string")
        return value

    def integer(self, field: str, default: int | None = None, *, required: bool = False, minimum: int = 0,
                maximum: int = 2**32 - 1) -> int | None:
        """An integer field within ``[minimum, maximum]`` (a crafted ``input_size`` cannot size a huge model)."""
        value = self._get(field, required)
        if value is None:
            return default
        if not _is_int(value) or not minimum <= value <= maximum:
            raise self._error(field, f"is {_shown(value)}", f"an integer from {minimum} to {maximum}")
        return value

    def input_size(self, *, required: bool = False) -> int | None:
        """The image side the run trained at, or None when it used the model's own (at most 8192 pixels, so a
        crafted value cannot make the evaluator build a model with a huge position embedding)."""
        return self.integer("input_size", required=required, minimum=1, maximum=8192)

    def weights(self, default: str | None = "default") -> str | None:
        """``pretrained``: a weights name, a path, or ``"none"``."""
        value = self._values.get("pretrained", default)
        if value is not None and (not isinstance(value, str) or not value.isprintable()):
            raise self._error("pretrained", f"is {_shown(value)}", "a weights name, a path, or \"none\"")
        return value


def _check_is_safetensors(path: str | os.PathLike) -> Path:
    """``path`` as a Path once its first bytes look like safetensors; pickles are refused unopened."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header itself
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (len(head) == 9 and head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8):
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise AdapterFileError(
                f"{path} is a pickle/zip checkpoint (torch.save format); visadapt only reads safetensors files, "
                f"because unpickling can run arbitrary code. Convert it where you trust it: "
                f"`safetensors.torch.save_file(torch.load(f), 'adapter.safetensors')`"
            )
        raise AdapterFileError(f"{path} is not a safetensors file (truncated or corrupted, or another format)")
    return path


def _check_visadapt_metadata(path: Path, meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise AdapterFileError(
            f"{path} is a safetensors file without visadapt metadata (format={meta.get('format')!r}); "
            f"it was not written by visadapt.save_adapter"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        # only a larger integer is a newer format; anything else (missing, null, a list) is a damaged header, for
        # which "upgrade visadapt" would be the wrong fix
        newer = isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10 \
            and int(version) > int(FORMAT_VERSION)
        raise AdapterFileError(f"adapter file {path}: header field 'format_version' is {_shown(version)}; this "
                               f"visadapt reads version {FORMAT_VERSION}"
                               + (": upgrade visadapt" if newer else ": the header is damaged or not visadapt's"))


#: the header entries a visadapt file must have, each a string (JSON where noted in the module docstring)
REQUIRED_METADATA = ("format", "format_version", "plugin", "config", "base_model", "site_widths", "head")


@dataclasses.dataclass
class AdapterHeader:
    """The header of a visadapt file, every field checked for presence and type (:func:`check_header`)."""

    plugin: str
    config: dict[str, Any]
    base_model: dict[str, Any]
    site_widths: dict[str, list[int]]
    head: str | None


def _header_error(path, field: str, problem: str, expected: str) -> AdapterFileError:
    return AdapterFileError(f"adapter file {path}: header field {field!r} {problem}; expected {expected}")


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)  # repr escapes control characters: a crafted value cannot drive the terminal
    return text if len(text) <= limit else text[:limit] + "..."


def _json_object(path, meta: Mapping[str, str], field: str, expected: str) -> dict:
    raw = meta[field]
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise _header_error(path, field, f"is not JSON ({type(err).__name__}: {str(err)[:80]})", expected) from None
    if not isinstance(value, dict):
        raise _header_error(path, field, f"is a JSON {type(value).__name__} ({_shown(value)})", expected)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_header(path, meta: Mapping[str, str]) -> AdapterHeader:
    """Check every field of a visadapt header for presence and type, before anything is read or allocated.

    Raises :class:`AdapterFileError` naming ``path``, the field and what was expected. The plugin's own
    config fields are checked by :func:`parse_header`, which needs the plugin installed.
    """
    _check_visadapt_metadata(path, meta)
    for field in REQUIRED_METADATA:
        if field not in meta:
            raise _header_error(path, field, "is missing", "every field visadapt.save_adapter writes: "
                                + ", ".join(REQUIRED_METADATA))
        if not isinstance(meta[field], str):
            raise _header_error(path, field, f"is a {type(meta[field]).__name__}", "a string")
    plugin = meta["plugin"]
    if not plugin or not plugin.isprintable():
        raise _header_error(path, "plugin", f"is {_shown(plugin)}", "the registry name of an adapter plugin")
    config = _json_object(path, meta, "config", "a JSON object of the plugin's config fields")
    if not all(isinstance(key, str) for key in config):
        raise _header_error(path, "config", "has non-string keys", "a JSON object of the plugin's config fields")
    fingerprint_shape = 'a JSON object {"family": str, "name": str or null, "towers": {tower: {"depth": int, "width": int}}}'
    base_model = _json_object(path, meta, "base_model", fingerprint_shape)
    towers = base_model.get("towers")
    if (not isinstance(base_model.get("family"), str) or not isinstance(base_model.get("name"), (str, type(None)))
            or not isinstance(towers, dict)
            or not all(isinstance(v, dict) and _is_int(v.get("depth")) and _is_int(v.get("width"))
                       for v in towers.values())):
        raise _header_error(path, "base_model", f"is {_shown(base_model)}", fingerprint_shape)
    widths_shape = 'a JSON object {"host:kind": [in_features, out_features]} of integers'
    widths = _json_object(path, meta, "site_widths", widths_shape)
    for key, value in widths.items():
        if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value)):
            raise _header_error(path, "site_widths", f"maps {_shown(key)} to {_shown(value)}", widths_shape)
    if TRAIN_METADATA in meta:  # optional; its readers go through TrainingRun's typed getters
        _json_object(path, meta, TRAIN_METADATA, "a JSON object describing the training run")
    head = meta["head"]
    if head and not head.isprintable():
        raise _header_error(path, "head", f"is {_shown(head)}", "a module path or an empty string")
    return AdapterHeader(plugin, config, base_model, widths, head or None)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _value_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (JSON lists stand for tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_value_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_value_fits(v, a) for v, a in zip(value, args, strict=True))
        return all(_value_fits(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and (not args or all(
            _value_fits(k, args[0]) and _value_fits(v, args[1]) for k, v in value.items()))
    if origin is typing.Literal:
        return value in args
    return True  # an annotation this check does not know: the Config's own validate() decides


def parse_header(path, meta: Mapping[str, str]) -> tuple[AdapterHeader, AdapterPlugin, AdapterConfig]:
    """:func:`check_header`, then the plugin it names and its config, each config field checked against the type
    the plugin's ``Config`` declares and then by the Config's own range checks. Nothing is allocated."""
    header = check_header(path, meta)
    try:
        plugin = get_plugin(header.plugin)()
    except UnknownPluginError as err:
        raise AdapterFileError(f"adapter file {path}: header field 'plugin': {err}; install the package that "
                               f"provides it") from None
    hints = typing.get_type_hints(plugin.Config)
    for key, value in header.config.items():
        if key in hints and not _value_fits(value, hints[key]):
            raise _header_error(path, "config", f"sets {key}={_shown(value)}",
                                f"{key} of type {_type_name(hints[key])} for plugin {plugin.name!r}")
    try:
        config = plugin.Config.from_header(header.config)  # fields a file predates: their old values
    except Exception as err:  # noqa: BLE001 (a Config's checks may raise anything: re.error for a bad pattern)
        raise AdapterFileError(f"adapter file {path}: header field 'config': {err}") from None
    return header, plugin, config


def _open_error(path: Path, err: Exception) -> AdapterFileError:
    return AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of any safetensors file (no tensors read, no visadapt checks)."""
    path = _check_is_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _open_error(path, err) from err


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a visadapt adapter file, read from its header alone (no tensors, no checksum)."""
    meta = read_safetensors_metadata(path)
    check_header(Path(path), meta)
    return meta


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of any safetensors file, from one open (no visadapt checks)."""
    path = _check_is_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise _open_error(path, err) from err
    return tensors, meta


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a visadapt adapter file, after checking it is whole and uncorrupted."""
    tensors, meta = read_safetensors(path)
    path = Path(path)
    check_header(path, meta)
    if tensors_digest(tensors) != meta.get("tensors_sha256"):
        raise AdapterFileError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    return tensors, meta


def _describe(fp: dict) -> str:
    towers = ", ".join(f"{t}: {v['depth']} blocks, {v['width']} wide" for t, v in fp.get("towers", {}).items())
    return f"{fp.get('name') or 'unnamed'} ({fp.get('family')}; {towers})"


def check_base_model(model: nn.Module, meta: dict[str, str], path: str | os.PathLike) -> None:
    """Raise when the file was trained for a model of another family, depth or width."""
    saved = check_header(path, meta).base_model
    here = fingerprint(model)
    if saved.get("family") != here["family"] or saved.get("towers") != here["towers"]:
        raise AdapterFileError(
            f"adapter file {path} was trained for {_describe(saved)}; this model is {_describe(here)}"
        )


def _replace_linear_head(model: nn.Module, head: str, head_state: dict[str, torch.Tensor], path) -> nn.Module:
    """Swap ``model.<head>`` for an ``nn.Linear`` shaped like the file's head; returns the module it replaced."""
    old = model.get_submodule(head)
    weight = head_state.get("weight")
    if not isinstance(old, nn.Linear) or weight is None or weight.dim() != 2:
        raise AdapterFileError(f"replace_head=True replaces a Linear classifier by the one stored in {path}; "
                               f"{head!r} is a {type(old).__name__} and the file holds {sorted(head_state)}")
    new = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state,
                    device=old.weight.device, dtype=old.weight.dtype)
    new.train(old.training)
    for param, old_param in zip(new.parameters(), old.parameters(), strict=False):
        param.requires_grad_(old_param.requires_grad)
    api.replace_submodule(model, head, new)
    return old


def load_adapter(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                 adapter_name: str = "default", *, weight_name: str | None = None, subfolder: str | None = None,
                 revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool | None = None, token: str | bool | None = None,
                 force_download: bool | None = None, metadata: Mapping[str, str] | None = None,
                 replace_head: bool = False, strict: bool = True):
    """Attach the adapter in ``source`` to ``model`` and load its tensors; returns the attached config.

    ``source`` is any of (read by :func:`visadapt.hub.read_source`, the same rules as ``pipe.load_visadapt``):

    * a visadapt ``.safetensors`` file: the plugin recorded in it is attached with its saved config;
    * a folder holding ``adapter.safetensors`` (what :func:`visadapt.save_pretrained` writes), or the files of a
      registered foreign format (:mod:`visadapt.formats`: a PEFT folder, a diffusers LoRA, ...), or one
      ``.safetensors`` file; ``weight_name`` picks a file in it, ``subfolder`` a folder inside it;
    * a hub repo id (``"org/name"``) with the same content, fetched through ``huggingface_hub`` (``revision``,
      ``subfolder``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download`` as on the hub; the HF
      cache and ``HF_HUB_OFFLINE`` are respected);
    * an in-memory state dict ``{key: tensor}``: with ``metadata`` the header of a visadapt file, checked like
      a file (format, checksum, base model, site widths); otherwise a layout a registered format recognises,
      with ``metadata`` the header that layout's file would carry, when it has one (its format reads it).

    The classifier head trained with the adapter (stored in the same file) is restored too. When the model's
    head has another class count the load fails naming both counts, unless ``replace_head=True``: then a Linear
    head is replaced by one of the file's shape (timm models keep ``num_classes`` in sync through
    ``reset_classifier``; here only the module is swapped).

    Every tensor is accounted for in a :class:`~visadapt.load_report.LoadReport` (kept on the adapter's record:
    :func:`visadapt.load_report`). ``strict`` (default): anything missing, unexpected or misshapen raises with
    the report. ``strict=False``: what fits is loaded and the rest is printed; nothing fitting at all still
    raises. A file made for another architecture (family, depth, width) is refused either way, and so is a header
    that is malformed in any field, whose ``head`` is not the model's classifier, or whose config builds more
    tensor elements than the file stores (checked on a meta-device copy, before anything is allocated). Every failure
    (missing file, folder without an adapter, hub id not cached offline, corrupt file, unknown layout) is one
    error naming the input and the fix, and leaves ``model`` exactly as it was.
    """
    from visadapt import hub

    # a peft.PeftModel: every format sees the model it wraps (whose paths its files name), and the adapter goes
    # there, where api.records(model) finds it
    model = unwrap_peft_model(model)
    hub_kwargs = {"subfolder": subfolder, "revision": revision, "cache_dir": cache_dir,
                  "local_files_only": local_files_only, "token": token, "force_download": force_download}
    found = hub.read_source(source, weight_name=weight_name, metadata=metadata, hub_kwargs=hub_kwargs)
    if found.is_visadapt:
        return load_adapter_tensors(model, found.tensors, found.meta, adapter_name, source=found.what,
                                    replace_head=replace_head, strict=strict)
    if replace_head:
        raise TypeError(f"replace_head=True swaps in the classifier head a visadapt file stores; {found.what} is in "
                        f"the {found.fmt.name} layout: drop replace_head")
    if adapter_name in api.records(model):
        raise ValueError(f"an adapter named {adapter_name!r} is already attached; detach it or pass another "
                         f"adapter_name")
    from visadapt import formats

    # the format's contract leaves ``model`` as it was on failure
    return formats.load_checkpoint(found.fmt, model, found.files, found.state, adapter_name, strict=strict,
                                   metadata=found.metadata)


class ModelNotCopyableError(AdapterLoadError):
    """The model cannot be deep-copied, so a file's shapes cannot be checked on a tensor-free copy of it."""


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every tensor is on the meta device: modules, hooks and attached adapters alike,
    no tensor memory. Parameters and buffers, and tensors a module keeps as plain attributes (at most two
    containers deep), are mapped to meta tensors in ``copy.deepcopy``'s memo, so none is copied."""
    memo: dict[int, Any] = {}

    def to_meta(tensor: torch.Tensor) -> None:
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else empty)

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            to_meta(value)
        elif isinstance(value, nn.Module):
            for tensor in (*value.parameters(), *value.buffers()):
                to_meta(tensor)
        elif depth > 0 and isinstance(value, Mapping):
            for item in value.values():
                visit(item, depth - 1)
        elif depth > 0 and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth - 1)
        elif depth > 0 and dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                visit(getattr(value, field.name), depth - 1)

    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            to_meta(tensor)
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                visit(value, 3)  # e.g. the adapter records (their saved head) and split layers kept aside
    try:
        return copy.deepcopy(model, dict(memo))
    except Exception as first_error:  # noqa: BLE001 - any copy failure gets the fallback below, then a clear error
        # An attribute that cannot be copied (a lock, an open file, a C handle) is shared with ``model`` instead:
        # the skeleton needs the module tree and the tensor shapes, not those objects. Only the failing values are
        # shared, so the adapter records attach writes into are still the skeleton's own.
        for module in model.modules():
            for name, value in vars(module).items():
                if name not in ("_parameters", "_buffers", "_modules") and id(value) not in memo:
                    try:
                        copy.deepcopy(value, dict(memo))
                    except Exception:  # noqa: BLE001
                        memo[id(value)] = value
        try:
            return copy.deepcopy(model, memo)
        except Exception as error:
            raise ModelNotCopyableError(
                f"visadapt checks an adapter file's shapes on a tensor-free copy of the model before loading it, "
                f"and this {type(model).__name__} cannot be copied ({type(first_error).__name__}: "
                f"{str(first_error)[:120]}; then {type(error).__name__}); make the model copyable with "
                f"copy.deepcopy (a module that defines __deepcopy__ must return a copy)") from error


def expected_adapter_state(model: nn.Module, plugin: AdapterPlugin, config: AdapterConfig,
                           adapter_name: str) -> tuple[dict[str, torch.Size], dict[str, list[int]]]:
    """The shapes of the tensors a file must hold for adapter ``plugin`` / ``config`` on ``model``, and its site
    widths, computed by attaching the adapter to a meta-device copy of ``model`` (:func:`_meta_skeleton`): the
    plugin's own attach and export decide, for every plugin alike, and nothing is allocated however large the
    config. ``model`` itself is not touched."""
    skeleton = _meta_skeleton(model)
    with torch.device("meta"):  # what a plugin creates without naming a device lands on meta as well
        api.attach(skeleton, type(plugin)(), config, adapter_name=adapter_name)
        state = plugin.export_state(skeleton, adapter_name)
        widths = site_widths(skeleton, adapter_name)
    return {key: tensor.shape for key, tensor in state.items()}, widths


def _check_tensors_fit_config(path, expected: dict[str, torch.Size], stored: Mapping[str, torch.Tensor],
                              strict: bool) -> None:
    """Refuse a file whose config implies other tensors than it stores, before the adapter is allocated.

    strict: a tensor the file stores under an expected key must have the expected shape. Always: the adapter the
    config builds may hold no more elements than the file's adapter tensors, so the memory a load takes is bounded
    by the file itself (keys missing or unexpected are reported by the load itself, as always).
    """
    misshapen = sorted(key for key, shape in expected.items() if key in stored and stored[key].shape != shape)
    implied = sum(shape.numel() for shape in expected.values())
    held = sum(tensor.numel() for tensor in stored.values())
    if (strict and misshapen) or implied > held:
        examples = "; ".join(f"{key}: config {tuple(expected[key])}, file {tuple(stored[key].shape)}"
                             for key in misshapen[:3])
        missing = sorted(set(expected) - set(stored))
        if missing and not examples:
            examples = "missing " + ", ".join(missing[:3])
        raise AdapterFileError(
            f"adapter file {path}: header field 'config' does not match the file's tensors: the adapter it builds on "
            f"this model holds {implied:,} elements in {len(expected)} tensors, the file stores {held:,} in "
            f"{len(stored)} ({examples}); expected a config that builds exactly the stored tensors (a load never "
            f"allocates more than the file brings)")


def _check_head(model: nn.Module, head: str | None, path) -> None:
    """A file's head may only be the model's classifier (:func:`visadapt.api.classifier_paths`): a file writes
    into nothing else the model had."""
    if head is None:
        return
    allowed = api.classifier_paths(model)
    if head not in allowed:
        what = (f"one of {', '.join(map(repr, allowed))} (this model's classifier)" if allowed
                else "'' (this model has no classifier head a file may replace)")
        raise _header_error(path, "head", f"names {_shown(head)}, which is not this model's classifier", what)


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                         adapter_name: str = "default", *, source: str = "a state dict",
                         replace_head: bool = False, strict: bool = True):
    """:func:`load_adapter` for tensors and header metadata already in memory (an adapter file's contents).

    The same checks as for a file, all before anything is attached or allocated: every header field's presence
    and type (:func:`parse_header`), the tensor checksum when the metadata has one, the base model, the head (only
    the model's classifier), the site widths, and the tensor shapes the config implies against the stored ones
    (:func:`expected_adapter_state`). ``source`` names the tensors in messages.
    """
    path = source
    model = unwrap_peft_model(model)  # a peft.PeftModel: the adapter goes on the model it wraps
    header, plugin, config = parse_header(path, meta)
    if meta.get("tensors_sha256") and tensors_digest(tensors) != meta["tensors_sha256"]:
        raise AdapterFileError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    check_base_model(model, meta, path)
    head = header.head
    _check_head(model, head, path)
    head_state = {k[len(head) + 1:]: v for k, v in tensors.items() if head and k.startswith(head + ".")}
    adapter_tensors = {k: v for k, v in tensors.items() if not (head and k.startswith(head + "."))}
    if adapter_name in api.records(model):
        raise ValueError(f"an adapter named {adapter_name!r} is already attached; detach it or pass another "
                         f"adapter_name")
    try:
        expected, here_widths = expected_adapter_state(model, plugin, config, adapter_name)
    except ModelNotCopyableError:  # the model, not the file, is the problem
        raise
    except Exception as err:  # only the meta copy saw it: whatever the plugin raised, the file's config does not
        # build on this model, and the model is untouched
        raise AdapterFileError(f"adapter file {path}: header field 'config' does not fit this model: {err}") from err
    saved_widths = header.site_widths
    if strict and saved_widths and saved_widths != here_widths:
        diff = [f"{k}: file {saved_widths.get(k)} vs model {here_widths.get(k)}"
                for k in sorted(set(saved_widths) | set(here_widths)) if saved_widths.get(k) != here_widths.get(k)]
        raise AdapterFileError(f"adapter file {path} does not fit this model's sites (header field 'site_widths' "
                               f"against the sites its config builds here):\n  " + "\n  ".join(diff[:10])
                               + "\n(pass strict=False to load the sites that fit)")
    _check_tensors_fit_config(path, expected, adapter_tensors, strict)
    replaced = None
    if head and replace_head:
        current = model.get_submodule(head).state_dict()
        if any(k in current and current[k].shape != v.shape for k, v in head_state.items()):
            replaced = _replace_linear_head(model, head, head_state, path)
    try:
        api.attach(model, plugin, config, adapter_name=adapter_name, head=head)
    except Exception:
        if replaced is not None:
            api.replace_submodule(model, head, replaced)
        raise
    if replaced is not None:  # detach (also on a failure below) swaps the model's own head back in
        api.get_record(model, adapter_name).head_before = replaced
    report = LoadReport(str(path), f"adapter {adapter_name!r}")
    try:
        head_fits: list[str] = []
        classes = ""
        if head:
            current = model.get_submodule(head).state_dict()
            head_fits = report.compare({f"{head}.{k}": v for k, v in head_state.items()},
                                       {f"{head}.{k}": v for k, v in current.items()}, site_of=lambda _key: head)
            if "weight" in head_state and "weight" in current and head_state["weight"].dim() == 2 and (
                    head_state["weight"].shape[0] != current["weight"].shape[0]):
                classes = (f"the file's head {head!r} has {head_state['weight'].shape[0]} classes, this model's "
                           f"{current['weight'].shape[0]}: create the model with num_classes="
                           f"{head_state['weight'].shape[0]}, or pass replace_head=True to use the file's head")
        try:
            plugin.import_state(model, adapter_tensors, adapter_name, strict=strict, report=report)
        except AdapterLoadError as err:
            if classes:
                raise AdapterLoadError(f"{err}\n{classes}", report) from err
            raise
        if head_fits:
            api.write_head(model, adapter_name, {key[len(head) + 1:]: tensors[key] for key in head_fits})
    except Exception:
        api.detach(model, adapter_name)
        raise
    record = api.get_record(model, adapter_name)
    record.load_report = report
    # what the file says beyond the format (the training run under ``visadapt.train``) stays with the adapter,
    # so save_pretrained's card and file keep it
    record.metadata = {k: v for k, v in meta.items() if k not in RESERVED_METADATA}
    return config
