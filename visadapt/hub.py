"""Where an adapter comes from and where it goes: files, folders, hub repos; ``save_pretrained`` / ``push_to_hub``.

One resolution for every loader (``visadapt.load_adapter``, ``pipe.load_visadapt``, SELMA's ``load_expert``):

* a file: a visadapt ``.safetensors`` file, or a file in a foreign layout (:mod:`visadapt.formats`);
* a local folder: ``weight_name`` when given, else ``adapter.safetensors``, else the files of the registered
  formats present there, else its only ``.safetensors`` file; ``subfolder`` picks a folder inside it;
* a hub repo id (``org/name``): the same files fetched through ``huggingface_hub.hf_hub_download``, so the HF
  cache, ``HF_HUB_OFFLINE``, ``local_files_only``, ``revision``, ``subfolder``, ``cache_dir``, ``token`` and
  ``force_download`` mean what they mean everywhere on the hub.

:func:`resolve` answers ``(kind, files)``: kind ``"visadapt"`` (one visadapt file) or ``"foreign"`` (files for a
format to recognise); every failure here is one :class:`~visadapt.io.AdapterFileError` naming the input and the fix.
:func:`read_source` is what the loaders call: it resolves a path or repo id, or takes a state dict, and answers an
:class:`AdapterSource`: a visadapt adapter read once (tensors and header) or a foreign layout with its format.

:func:`save_pretrained` writes a folder any of these loaders reads back (``adapter.safetensors`` plus a model card
``README.md`` made with huggingface_hub's :class:`~huggingface_hub.ModelCard`), and :func:`push_to_hub` uploads
that folder to a hub repo.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from visadapt import formats, io

#: the file name visadapt writes into a folder (:func:`visadapt.io.save_adapter` given a directory)
ADAPTER_FILE_NAME = "adapter.safetensors"
#: the model card :func:`save_pretrained` writes next to it
CARD_FILE_NAME = "README.md"
#: the keywords that reach ``huggingface_hub.hf_hub_download`` (``proxies`` only where the hub still takes it)
HUB_KWARGS = ("cache_dir", "revision", "subfolder", "local_files_only", "token", "force_download", "proxies")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def looks_like_path(value: str) -> bool:
    """A string that names a file or folder rather than a hub repo id (``org/name`` has one slash, no suffix)."""
    if os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or value.endswith("/"):
        return True
    if os.sep != "/" and os.sep in value:
        return True
    return value.endswith(_WEIGHT_SUFFIXES)


def single_file(path: Path) -> tuple[str, dict[str, Path]]:
    """``("visadapt", {name: path})`` for a visadapt file, ``("foreign", {name: path})`` otherwise.

    Pickles and other non-safetensors files are refused here, unopened (:func:`visadapt.io._check_is_safetensors`).
    """
    meta = io.read_safetensors_metadata(path)
    kind = "visadapt" if meta.get("format") == io.FORMAT else "foreign"
    return kind, {path.name: path}


def _sidecars(found: Mapping[str, Path]) -> dict[str, Path]:
    # A format's configuration files (PEFT's adapter_config.json) go with whichever weight file was picked: the
    # scale lives there, and loading the weights without it would load them at a guessed scale.
    return {name: path for name, path in found.items() if not name.endswith(_WEIGHT_SUFFIXES)}


def folder_files(folder: Path, weight_name: str | None) -> tuple[str, dict[str, Path]]:
    """What to load from a local folder: ``weight_name`` when given; else ``adapter.safetensors``; else the files
    of the registered formats that are present; else the folder's only ``.safetensors`` file."""
    known = {name: folder / name for name in formats.known_file_names() if (folder / name).is_file()}
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise io.AdapterNotFoundError(f"weight_name={weight_name!r} does not exist in {folder} (it holds: {present}); "
                                      f"pass the name of one of its files")
        kind, files = single_file(path)
        return kind, files if kind == "visadapt" else {**_sidecars(known), **files}
    if (folder / ADAPTER_FILE_NAME).is_file():
        return single_file(folder / ADAPTER_FILE_NAME)
    if known:
        return "foreign", known
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return single_file(candidates[0])
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    looked_for = ", ".join([ADAPTER_FILE_NAME, *formats.known_file_names()])
    raise io.AdapterFileError(
        f"folder {folder} holds no adapter file visadapt recognises (looked for {looked_for}; it holds: {present}); "
        f"pass weight_name='<file>.safetensors' to pick one")


def _download_kwargs(hub_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``hub_kwargs`` as ``hf_hub_download`` takes them: ``proxies`` is refused where the hub ignores it."""
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if "proxies" in kwargs and "proxies" not in inspect.signature(hf_hub_download).parameters:
        # huggingface_hub >= 1.0 drops per-call proxies with a warning; downloading around the user's proxy
        # instead of through it is worse than stopping here.
        raise TypeError("proxies=...: this huggingface_hub downloads through one HTTP client for the whole process "
                        "and ignores per-call proxies; set the HTTPS_PROXY / HTTP_PROXY environment variables (or "
                        "huggingface_hub.set_client_factory) and drop proxies=")
    return kwargs


def hub_download(repo_id: str, filename: str, hub_kwargs: Mapping[str, Any]) -> Path | None:
    """The local path of ``filename`` of hub repo ``repo_id`` (downloaded or from the cache), None when the repo
    has no such file; raises a clear error when the repo itself cannot be found or reached."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    remote_missing = tuple(c for c in (getattr(hub_errors, "RemoteEntryNotFoundError", None),
                                       hub_errors.EntryNotFoundError) if c is not None)
    try:
        return Path(hf_hub_download(repo_id, filename, **_download_kwargs(hub_kwargs)))
    except hub_errors.LocalEntryNotFoundError:
        raise  # decided by the caller, which knows every file it tried
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as err:
        what = (f"revision {hub_kwargs.get('revision')!r} of " if isinstance(err, hub_errors.RevisionNotFoundError)
                else "")
        raise io.AdapterNotFoundError(
            f"{what}hub repo {repo_id!r} was not found (nor is {repo_id!r} a local file or folder); check the "
            f"name, or pass token=... for a private or gated repo") from err
    except remote_missing:
        return None


def hub_files(repo_id: str, weight_name: str | None, hub_kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Path]]:
    """Like :func:`folder_files` for a hub repo: only the files that might be needed are fetched."""
    from huggingface_hub import errors as hub_errors

    known_names = formats.known_file_names()
    names = [weight_name] if weight_name else [ADAPTER_FILE_NAME, *known_names]
    found: dict[str, Path] = {}
    not_cached: list[str] = []
    for name in names:
        try:
            path = hub_download(repo_id, name, hub_kwargs)
        except hub_errors.LocalEntryNotFoundError:
            not_cached.append(name)
            continue
        if path is None:
            continue
        if weight_name or name == ADAPTER_FILE_NAME:
            kind, files = single_file(path)
            if kind == "visadapt" or not weight_name:
                return kind, files
            sidecars = {}
            for sidecar in _sidecars(dict.fromkeys(known_names)):
                try:
                    sidecar_path = hub_download(repo_id, sidecar, hub_kwargs)
                except hub_errors.LocalEntryNotFoundError:
                    continue
                if sidecar_path is not None:
                    sidecars[sidecar] = sidecar_path
            return kind, {**sidecars, **files}
        found[name] = path
    if found:
        return "foreign", found
    where = f" under subfolder {hub_kwargs['subfolder']!r}" if hub_kwargs.get("subfolder") else ""
    if not_cached:
        from huggingface_hub import constants

        cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
        why = ("local_files_only=True" if hub_kwargs.get("local_files_only") else
               "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached")
        revision = f" at revision {hub_kwargs['revision']!r}" if hub_kwargs.get("revision") else ""
        raise io.AdapterNotFoundError(
            f"hub repo {repo_id!r}{revision} was not found in the local cache ({cache}){where}, and {why}: none of "
            f"{', '.join(not_cached)} is cached. Fix: run once with network access (or `hf download {repo_id}`) "
            f"to fill the cache, pass cache_dir= where it was downloaded, or pass the path of a local file or "
            f"folder instead of a repo id")
    raise io.AdapterFileError(
        f"hub repo {repo_id!r}{where} holds none of the files visadapt reads ({', '.join(names)}); "
        f"pass weight_name='<file>.safetensors' to pick its adapter file")


def resolve(source: str | os.PathLike, weight_name: str | None = None,
            hub_kwargs: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Path]]:
    """``(kind, files)`` for a file, folder or hub repo id; kind is "visadapt" (one visadapt file) or "foreign"
    (files by name, for :func:`visadapt.formats.find_format`). ``hub_kwargs``: any of :data:`HUB_KWARGS`."""
    hub_kwargs = {k: v for k, v in (hub_kwargs or {}).items() if v is not None}
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected hub argument(s) {', '.join(unknown)}; known: {', '.join(HUB_KWARGS)}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an adapter source is a file or folder path or a hub repo id, not {type(source).__name__}")
    path = Path(os.path.expanduser(os.fspath(source)))
    if hub_kwargs.get("subfolder") and path.is_dir():
        path = path / hub_kwargs["subfolder"]
        if not path.is_dir():
            raise io.AdapterNotFoundError(f"subfolder={hub_kwargs['subfolder']!r} does not exist in {source} (it holds: "
                                      f"{', '.join(sorted(p.name for p in path.parent.iterdir())) or 'nothing'})")
    if path.is_dir():
        return folder_files(path, weight_name)
    if path.is_file():
        if weight_name is not None:
            raise TypeError(f"weight_name={weight_name!r} picks a file inside a folder or hub repo; {path} is a "
                            f"file already: drop weight_name")
        return single_file(path)
    if isinstance(source, os.PathLike) or looks_like_path(str(source)):
        raise io.AdapterNotFoundError(f"adapter path {str(source)!r} does not exist (neither a file nor a folder)")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:  # huggingface_hub's own rule, checked before any download is attempted
        validate_repo_id(str(source))
    except HFValidationError as err:
        raise io.AdapterNotFoundError(
            f"adapter source {str(source)!r} is neither an existing file or folder nor a valid hub repo id ({err}); "
            f"check the path, or give a repo id such as 'org/name'") from err
    return hub_files(str(source), weight_name, hub_kwargs)


class _SafetensorsTensors(Mapping):
    """The tensors of a safetensors file as a read-only mapping: keys from the header (format detection looks at
    keys only); the first tensor asked for loads the whole file once (a format that claimed the file reads all of
    it), so a format's per-key reads do not reopen it."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self._keys = list(handle.keys())
        self._tensors: dict | None = None

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise KeyError(key)
        if self._tensors is None:
            from safetensors.torch import load_file

            self._tensors = load_file(str(self.path))
        return self._tensors[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def find_foreign_format(files: Mapping[str, Path], state: Mapping | None, what: str
                        ) -> tuple[formats.CheckpointFormat, Mapping[str, Path], Mapping | None]:
    """The registered format for ``files`` / ``state`` and what to hand it. A single ``.safetensors`` file no
    format knows by name (a LoRA renamed after its skill) is offered to each format under the weight-file names
    it reads, so detection goes by its header and the format's messages name the real path. Raises naming
    ``what`` when nothing recognises it."""
    fmt = formats.find_format(files, state)
    if fmt is None and state is None and len(files) == 1:
        (path,) = files.values()
        if path.suffix == ".safetensors":
            # detection by content first (a format that goes by file names alone must not claim any file)...
            lazy = _SafetensorsTensors(path)
            fmt = formats.find_format({}, lazy)
            if fmt is not None:
                # ...then, where the format also accepts the file under one of its own names, hand it the file,
                # so its messages name the path
                for name in type(fmt).file_names:
                    if name.endswith(".safetensors") and type(fmt).detect({name: path}, None):
                        return fmt, {name: path}, None
                return fmt, {}, lazy
    if fmt is None:
        known = ", ".join(formats.list_formats()) or "none"
        raise io.AdapterFileError(
            f"{what} has no visadapt metadata, and no registered checkpoint format recognises its layout "
            f"(registered formats: {known}); save it with visadapt.save_adapter, or pass the visadapt header as "
            f"metadata= for an in-memory state dict")
    return fmt, files, state


@dataclasses.dataclass
class AdapterSource:
    """An adapter source as :func:`read_source` found it: a visadapt adapter (``tensors`` and its header
    ``meta``, read and checked once) or a foreign layout (``fmt`` with the ``files`` / ``state`` to hand it and the
    ``metadata`` an in-memory state dict came with). ``what`` names the input in messages."""

    what: str
    tensors: dict[str, Any] | None = None
    meta: dict[str, str] | None = None
    fmt: formats.CheckpointFormat | None = None
    files: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    state: Mapping | None = None
    metadata: Mapping[str, str] | None = None

    @property
    def is_visadapt(self) -> bool:
        return self.tensors is not None


def read_source(source: Any, *, weight_name: str | None = None, metadata: Mapping[str, str] | None = None,
                hub_kwargs: Mapping[str, Any] | None = None) -> AdapterSource:
    """The one source dispatch of every loader (``visadapt.load_adapter``, ``pipe.load_visadapt``): a file,
    folder or hub repo id (:func:`resolve`; a visadapt file is read here, once, with its checksum checked), or an
    in-memory state dict, which with ``metadata`` holding a visadapt header is a visadapt adapter and otherwise
    goes, with that ``metadata``, to the registered format that recognises its keys. Raises ``TypeError`` for
    arguments that do not apply to the kind of source given."""
    hub_kwargs = dict(hub_kwargs or {})
    if isinstance(source, Mapping):
        if weight_name is not None or hub_kwargs.get("subfolder") is not None:
            raise TypeError("weight_name / subfolder pick a file in a folder or hub repo; a state dict was given")
        tensors = {str(key): value for key, value in source.items()}
        what = f"the state dict given ({len(tensors)} tensors)"
        if metadata is not None and metadata.get("format") == io.FORMAT:
            return AdapterSource(what, tensors=tensors, meta={str(k): str(v) for k, v in metadata.items()})
        fmt, files, state = find_foreign_format({}, tensors, what)
        return AdapterSource(what, fmt=fmt, files=files, state=state, metadata=metadata)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an adapter source is a file or folder path, a hub repo id or a state dict, not "
                        f"{type(source).__name__}")
    if metadata is not None:
        raise TypeError("metadata= describes an in-memory state dict; files carry their own metadata")
    kind, files = resolve(source, weight_name, hub_kwargs)
    if kind == "visadapt":
        (path,) = files.values()
        tensors, meta = io.read_adapter_file(path)
        return AdapterSource(str(path), tensors=tensors, meta=meta)
    what = ", ".join(str(p) for p in files.values())
    fmt, files, state = find_foreign_format(files, None, what)
    return AdapterSource(what, fmt=fmt, files=files, state=state)


# ------------------------------------------------------------------------------------------- model cards


def _train_run(meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        run = json.loads(meta.get(io.TRAIN_METADATA) or "{}")
    except json.JSONDecodeError:
        return {}
    return run if isinstance(run, dict) else {}


def _base_model_id(model: nn.Module, run: Mapping[str, Any]) -> str | None:
    """The hub id of the base model when it is known: the backbone a visadapt ``train/`` run recorded (timm
    names live under ``timm/`` on the hub), or the repo a diffusers model was loaded from. A model built from a
    config (random weights) has none."""
    name = run.get("model") or run.get("pipeline")
    if name and run.get("pretrained") not in (None, False, "none", ""):
        name = str(name)
        if "/" in name:
            return name if not looks_like_path(name) else None
        if getattr(model, "pretrained_cfg", None) is not None:
            return f"timm/{name}"
        return None
    config = getattr(model, "config", None)
    loaded_from = getattr(config, "_name_or_path", None) if config is not None else None
    if loaded_from and str(loaded_from).count("/") == 1 and not Path(str(loaded_from)).exists():
        return str(loaded_from)
    return None


def _markdown_table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {json.dumps(value) if not isinstance(value, str) else value} |" for key, value in rows.items()]
    return "\n".join(lines)


def model_card(model: nn.Module, adapter_name: str, meta: Mapping[str, str], *,
               metrics: Mapping[str, float] | None = None, repo_id: str | None = None):
    """The :class:`huggingface_hub.ModelCard` of adapter ``adapter_name``: YAML card data (``library_name:
    visadapt``, tags, ``base_model`` when known) and a body with the plugin, its config, the base model's
    fingerprint, the trainable parameters and bytes, the training run and ``metrics`` when known, and the
    lines that load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from visadapt import api

    plugin = meta["plugin"]
    config = json.loads(meta["config"])
    fingerprint = json.loads(meta["base_model"])
    run = _train_run(meta)
    counts = api.summary(model).adapters[adapter_name]
    base_model = _base_model_id(model, run)
    family = str(fingerprint.get("family", ""))
    card_data = ModelCardData(library_name="visadapt", base_model=base_model,
                              tags=["visadapt", "adapter", f"visadapt-{plugin}", family],
                              metrics=sorted(metrics) if metrics else None)
    source = repo_id or "<this folder or repo id>"
    if family.startswith("diffusers"):
        usage = (f"import visadapt\n# pipe = diffusers.StableDiffusionPipeline.from_pretrained(...)\n"
                 f"pipe.load_visadapt({source!r}, adapter_name={adapter_name!r})")
    elif family.startswith("timm") and base_model:
        head = meta.get("head")
        weight = model.get_submodule(head).state_dict().get("weight") if head else None
        classes = f", num_classes={weight.shape[0]}" if weight is not None and weight.dim() == 2 else ""
        usage = (f"import timm, visadapt\nmodel = timm.create_model({'hf-hub:' + base_model!r}, pretrained=True"
                 f"{classes})\nvisadapt.load_adapter(model, {source!r})")
    else:
        usage = f"import visadapt\n# model = the base model below\nvisadapt.load_adapter(model, {source!r})"
    sections = [
        f"# visadapt adapter: {plugin}",
        (f"A `{plugin}` adapter for {io._describe(fingerprint)}, saved by "
        f"visadapt {meta.get('visadapt_version', '')} as one `{ADAPTER_FILE_NAME}` "
        f"(config, base-model fingerprint and checksum in its header)."),
        "## Load it\n\n```python\n" + usage + "\n```",
        "## Adapter\n\n" + _markdown_table({"plugin": plugin, "trainable parameters": f"{counts['params']:,}",
                                            "bytes on disk (tensors)": f"{counts['bytes']:,}",
                                            "classifier head stored": meta.get("head") or "none"}),
        "## Config\n\n```json\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```",
        "## Base model\n\n" + (f"`{base_model}`; " if base_model else "")
        + "fingerprint (family, depth and width per tower; a load checks it):\n\n```json\n"
        + json.dumps(fingerprint, indent=1, sort_keys=True) + "\n```",
    ]
    if run:
        sections.append("## Training run\n\n" + _markdown_table(run))
    if metrics:
        sections.append("## Metrics\n\n" + _markdown_table(dict(metrics)))
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


def save_pretrained(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default",
                    metrics: Mapping[str, float] | None = None, *, metadata: Mapping[str, str] | None = None,
                    repo_id: str | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` into ``folder`` (created if needed) as the hub expects it:
    ``adapter.safetensors`` (:func:`visadapt.save_adapter`) and a model card ``README.md``.

    The card (:func:`model_card`) lists the plugin, its config, the base model (its hub id when known, and its
    fingerprint), trainable parameters and bytes, the training run a ``train/`` script recorded, and
    ``metrics`` (``{"accuracy": 0.91}``) when given. ``metadata``: extra header entries for the file, kept with
    those the adapter was loaded with (``visadapt.train``). ``repo_id``: named in the card's loading snippet.
    ``visadapt.load_adapter(model, folder)`` reads it back. Returns the folder.
    """
    from visadapt import api

    record = api.get_record(model, adapter_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {**record.metadata, **(metadata or {})}
    path = io.save_adapter(model, folder / ADAPTER_FILE_NAME, adapter_name, metadata=header)
    card = model_card(model, adapter_name, io.read_adapter_metadata(path), metrics=metrics, repo_id=repo_id)
    card.save(folder / CARD_FILE_NAME)
    return folder


def push_to_hub(model: nn.Module, repo_id: str, adapter_name: str = "default", *, private: bool | None = None,
                token: str | bool | None = None, commit_message: str = "Upload visadapt adapter",
                revision: str | None = None, metrics: Mapping[str, float] | None = None,
                create_pr: bool | None = None):
    """Upload adapter ``adapter_name`` to hub repo ``repo_id``: :func:`save_pretrained` into a temporary folder,
    then ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder`` (the branch ``revision`` is created
    first when given, as transformers' ``push_to_hub`` does). The model is not changed. Returns the
    ``CommitInfo``; ``visadapt.load_adapter(model, repo_id)`` loads it back."""
    from huggingface_hub import HfApi

    hub = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="visadapt-push-") as tmp:
        save_pretrained(model, tmp, adapter_name, metrics, repo_id=repo_id)
        hub.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if revision is not None and not revision.startswith("refs/pr"):
            hub.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        return hub.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, token=token,
                                 revision=revision, create_pr=create_pr)
