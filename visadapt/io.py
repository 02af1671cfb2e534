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
``head``           path of the classifier head stored alongside, or ``""``
``tensors_sha256`` digest of names, dtypes, shapes and bytes of all tensors: corruption is caught on load
``visadapt_version``
=================  =================================================================================

Only safetensors is ever read: no pickle, so a file cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from visadapt import api, inject
from visadapt.load_report import AdapterLoadError, LoadReport
from visadapt.peft_compat import unwrap_peft_model
from visadapt.registry import get_plugin
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
    """Write ``payload`` as JSON so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def site_widths(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    """``{"host:kind": [in_features, out_features]}`` for every site the adapter occupies."""
    return {f"{item.host_path}:{item.kind}": list(item.module.site_widths)
            for item in inject.attached(model, adapter_name)}


# The metadata entry where train/ scripts record the run (benchmark, task, backbone, normalisation, ...).
TRAIN_METADATA = "visadapt.train"


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
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path} has visadapt format version {meta.get('format_version')!r}; this visadapt "
                               f"reads version {FORMAT_VERSION}: upgrade visadapt")


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
    _check_visadapt_metadata(Path(path), meta)
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
    _check_visadapt_metadata(path, meta)
    if tensors_digest(tensors) != meta.get("tensors_sha256"):
        raise AdapterFileError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    return tensors, meta


def _describe(fp: dict) -> str:
    towers = ", ".join(f"{t}: {v['depth']} blocks, {v['width']} wide" for t, v in fp.get("towers", {}).items())
    return f"{fp.get('name') or 'unnamed'} ({fp.get('family')}; {towers})"


def check_base_model(model: nn.Module, meta: dict[str, str], path: str | os.PathLike) -> None:
    """Raise when the file was trained for a model of another family, depth or width."""
    saved = json.loads(meta["base_model"])
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
    parent, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
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
    raises. A file made for another architecture (family, depth, width) is refused either way. Every failure
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


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                         adapter_name: str = "default", *, source: str = "a state dict",
                         replace_head: bool = False, strict: bool = True):
    """:func:`load_adapter` for tensors and header metadata already in memory (an adapter file's contents).

    The same checks as for a file: visadapt format and version, the tensor checksum when the metadata has one,
    the base model, the site widths, the head. ``source`` names the tensors in messages.
    """
    path = source
    model = unwrap_peft_model(model)  # a peft.PeftModel: the adapter goes on the model it wraps
    _check_visadapt_metadata(path, meta)
    if meta.get("tensors_sha256") and tensors_digest(tensors) != meta["tensors_sha256"]:
        raise AdapterFileError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    check_base_model(model, meta, path)
    plugin = get_plugin(meta["plugin"])()
    config = plugin.Config.from_dict(json.loads(meta["config"]))
    head = meta.get("head") or None
    head_state = {k[len(head) + 1:]: v for k, v in tensors.items() if head and k.startswith(head + ".")}
    adapter_tensors = {k: v for k, v in tensors.items() if not (head and k.startswith(head + "."))}
    replaced = None
    if head and replace_head:
        current = model.get_submodule(head).state_dict()
        if any(k in current and current[k].shape != v.shape for k, v in head_state.items()):
            replaced = _replace_linear_head(model, head, head_state, path)
    try:
        api.attach(model, plugin, config, adapter_name=adapter_name, head=head)
    except Exception:
        if replaced is not None:
            _put_back(model, head, replaced)
        raise
    if replaced is not None:  # detach (also on a failure below) swaps the model's own head back in
        api.get_record(model, adapter_name).head_before = replaced
    report = LoadReport(str(path), f"adapter {adapter_name!r}")
    try:
        saved_widths = json.loads(meta.get("site_widths", "{}"))
        here_widths = site_widths(model, adapter_name)
        if strict and saved_widths and saved_widths != here_widths:
            diff = [f"{k}: file {saved_widths.get(k)} vs model {here_widths.get(k)}"
                    for k in sorted(set(saved_widths) | set(here_widths)) if saved_widths.get(k) != here_widths.get(k)]
            raise AdapterFileError(f"adapter file {path} does not fit this model's sites:\n  " + "\n  ".join(diff[:10])
                                   + "\n(pass strict=False to load the sites that fit)")
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


def _put_back(model: nn.Module, head: str, module: nn.Module) -> None:
    parent, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
