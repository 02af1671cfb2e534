"""Rerun issue 23's hostile cases as one script: crafted adapter files, crafted data folders and killed runs.

Every case is run in this process (kills and concurrent writers in child processes) and its outcome classified:

* ``clean``: a visadapt error type (``AdapterFileError``, ``AdapterLoadError``, ``DatasetError``,
  ``CheckpointError``, ``VisadaptPipelineError``) whose message names the input, or an accepted input whose result
  is checked (same tensors as the legitimate file, resume equal to the uninterrupted run, ...); in both cases the
  model's tensors are as they were and no partial or temporary file is left.
* ``raw``: any other exception type, or a visadapt error that does not name the input.
* ``silent``: no error, but a tensor of the model changed that should not have, results differ, or a partial file
  was left.
* ``security``: a write outside the folder the case may write to (the case's directory tree is snapshotted before
  and after, and every file opened for writing is recorded by an audit hook), an unrestricted unpickle (audit event
  ``pickle.find_class``) during a load, code run from a file, terminal control characters printed.

Prints one row per category (cases, each verdict, seconds) and exits 1 when any case is not clean. ``--quick`` runs
a reduced set for the test suite: a few cases of every category but three, trained in this process; the full mode
adds two processes saving one adapter (canonical bytes), real SIGKILLs at random steps with a resume in a new
process (``--kills``), and crafted ``visadapt.train`` records through ``visadapt-eval`` and ``visadapt export``.

    python eval/bench/hostile_rerun.py            # the full rerun (about 300 cases, 1.5-3 min on 2 CPU cores)
    python eval/bench/hostile_rerun.py --quick    # about 80 cases, under 30 s
    HOSTILE_VERBOSE=1 python eval/bench/hostile_rerun.py   # a line per case, clean ones too
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io as pyio
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no case may reach the network (a crafted record naming hub weights)
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models.py, test_data.py: the tiny models and data folders of the tests

import tiny_models as tm
import torch
from PIL import Image
from safetensors.torch import save_file
from test_data import png_claiming, write_image, write_vtab_task  # the data-test builders: one copy

import visadapt
from visadapt import engine, inject, io
from visadapt.data import DatasetError, fgvc, vtab
from visadapt.diffusers import VisadaptPipelineError
from visadapt.engine import CheckpointError
from visadapt.load_report import AdapterLoadError

CLEAN_ERRORS = (io.AdapterFileError, AdapterLoadError, DatasetError, CheckpointError, VisadaptPipelineError)
VERDICTS = ("clean", "raw", "silent", "security")
VERDICT_TITLES = {"clean": "clean", "raw": "raw traceback", "silent": "silent wrong", "security": "security"}


# ------------------------------------------------------------------------------------------------ watching


class Watch:
    """What a case does to the file system and to ``pickle``, recorded by an audit hook while ``on``."""

    on = False
    writes: ClassVar[list[str]] = []
    unpickled: ClassVar[list[str]] = []


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event: (index of the path written, index of its dir_fd or None); shutil.rmtree removes by dir_fd
_PATH_EVENTS = {"os.remove": (0, 1), "os.rename": (1, 3), "os.mkdir": (0, 2), "os.rmdir": (0, 1),
                "os.truncate": (0, None), "os.chmod": (0, 2), "os.symlink": (1, 2), "shutil.rmtree": (0, None),
                "shutil.move": (1, None), "os.link": (1, 3)}


def _absolute(path, dir_fd) -> str:
    """``path`` as an absolute path: relative ones are relative to ``dir_fd`` (when given) or the cwd."""
    path = os.fsdecode(path)
    if os.path.isabs(path):
        return path
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    return os.path.join(base, path)


def _audit(event: str, args: tuple) -> None:
    if not Watch.on:
        return
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes, os.PathLike)) and (
                (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS):
            Watch.writes.append(_absolute(path, None))
    elif event in _PATH_EVENTS:
        where, fd_at = _PATH_EVENTS[event]
        path = args[where]
        if isinstance(path, (str, bytes, os.PathLike)):
            Watch.writes.append(_absolute(path, args[fd_at] if fd_at is not None and fd_at < len(args) else None))
    elif event == "pickle.find_class":
        Watch.unpickled.append(f"{args[0]}.{args[1]}")


sys.addaudithook(_audit)


def tree(folder: Path) -> dict[str, tuple]:
    """``{relative path: (kind, size, mtime_ns, mode)}`` of everything under ``folder``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found[str(path.relative_to(folder))] = (kind, 0 if kind == "dir" else st.st_size,
                                                    0 if kind == "dir" else st.st_mtime_ns, st.st_mode)
    return found


def tensors_of(models) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``models`` (one module or a dict of them), cloned."""
    if isinstance(models, torch.nn.Module):
        models = {"": models}
    return {f"{owner}:{key}": value.detach().clone() for owner, model in models.items()
            for key, value in model.state_dict(keep_vars=True).items()}


def changed_existing(models, before: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of ``before`` whose value changed (tensors an attached adapter added are not compared)."""
    after = tensors_of(models)
    return [key for key, value in before.items() if key not in after or not torch.equal(after[key], value)]


def changed_tensors(models, before: dict[str, torch.Tensor]) -> list[str]:
    after = tensors_of(models)
    if list(after) != list(before):
        return [f"tensors added/removed: {sorted(set(after) ^ set(before))[:3]}"]
    return [key for key, value in before.items() if not torch.equal(after[key], value)]


@dataclass
class Result:
    category: str
    case: str
    verdict: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Rerun:
    """The workspace and the results of every case."""

    work: Path
    quick: bool
    results: list[Result] = field(default_factory=list)
    count: int = 0
    clock: float = field(default_factory=time.time)

    def folder(self) -> Path:
        self.count += 1
        path = self.work / f"case{self.count:04d}"
        path.mkdir()
        return path

    def record(self, category: str, case: str, verdict: str, detail: str = "") -> None:
        now = time.time()  # the case's time and its set-up since the previous case
        self.results.append(Result(category, case, verdict, detail, now - self.clock))
        self.clock = now
        if verdict != "clean" or os.environ.get("HOSTILE_VERBOSE"):
            print(f"  [{verdict}] {category} / {case}: {detail}"[:600], flush=True)

    def case(self, category: str, name: str, action: Callable[[], Any], *, names: tuple[str, ...] = (),
             models=None, may_write: tuple[Path, ...] = (), accept: Callable[[Any], str | None] | None = None,
             must_raise: bool = True, errors: tuple[type, ...] = CLEAN_ERRORS, after: Callable[[], str | None] | None = None,
             watch_pickle: bool = True) -> None:
        """Run ``action`` and classify it.

        ``names``: one of these must be in a clean error's message (the input file, folder or field). ``models``:
        whose tensors must be unchanged after a refusal (after an accepted case, ``accept`` checks them).
        ``may_write``: the folders the case may write to (everything else under the workspace is snapshotted).
        ``accept(value)``: for an input that may be accepted, the problem with the result (``None``: correct).
        ``after()``: a last check whatever happened (a problem phrase: silent wrong), e.g. no temporary left.
        A problem phrase starting with ``SECURITY`` is a security finding. Without ``names`` no error is expected.
        """
        before_tree = tree(self.work)
        before = tensors_of(models) if models is not None else None
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Watch.writes, Watch.unpickled = [], []
        Watch.on = True
        error = value = None
        try:
            value = action()
        except Exception as err:  # noqa: BLE001 (any failure of a case is classified, never fatal)
            error = err
        finally:
            Watch.on = False
        growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
        allowed = [str(p) for p in may_write]

        def outside(path: str) -> bool:
            real = os.path.realpath(path)
            return not any(real == a or real.startswith(a.rstrip("/") + "/") for a in
                           [os.path.realpath(a) for a in allowed]) and not real.startswith(("/dev/", "/proc/"))

        after_tree = tree(self.work)
        moved = sorted(k for k in set(before_tree) | set(after_tree)
                       if before_tree.get(k) != after_tree.get(k)
                       and outside(str(self.work / k)))
        stray = sorted({w for w in Watch.writes if outside(w)})
        if moved or stray:
            return self.record(category, name, "security", f"wrote outside {allowed}: {(moved + stray)[:4]}")
        if Watch.unpickled and watch_pickle:
            return self.record(category, name, "security", f"unpickled {Watch.unpickled[:4]}")
        if growth_mb > 200:
            return self.record(category, name, "silent", f"peak memory grew by {growth_mb:.0f} MB")
        changed = changed_tensors(models, before) if (models is not None and (error is not None or accept is None)) \
            else []
        last = after() if after is not None else None
        if error is not None:
            message = str(error)
            if changed:
                return self.record(category, name, "silent", f"refused but tensors changed: {changed[:4]}")
            if last:
                return self.record(category, name, "security" if last.startswith("SECURITY") else "silent", last)
            if not names:  # a case that names no input expects no error at all
                tb = "".join(traceback.format_exception(error)[-3:])
                return self.record(category, name, "raw", f"unexpected {type(error).__name__}: {message[:300]} | "
                                                          f"{tb[-300:]}")
            if not isinstance(error, errors):
                tb = "".join(traceback.format_exception(error)[-3:])
                return self.record(category, name, "raw", f"{type(error).__name__}: {message[:300]} | {tb[-300:]}")
            if names and not any(n in message for n in names):
                return self.record(category, name, "raw", f"{type(error).__name__} not naming {names}: {message[:300]}")
            return self.record(category, name, "clean", f"{type(error).__name__}")
        if must_raise and accept is None:
            return self.record(category, name, "silent", f"accepted without error (returned {str(value)[:100]})")
        problem = accept(value) if accept is not None else None
        problem = problem or (f"tensors changed: {changed[:4]}" if changed else None) or last
        if problem:  # "SECURITY: ..." from an accept check: a write into a frozen weight, a path out of the root;
            # "RAW: ..." an error reported without naming its input (a CLI's exit code and message)
            verdict = {"SECURITY": "security", "RAW": "raw"}.get(problem.split(":")[0], "silent")
            return self.record(category, name, verdict, problem)
        return self.record(category, name, "clean", "accepted, result checked")

    def table(self) -> str:
        categories = list(dict.fromkeys(r.category for r in self.results))
        rows = [("category", "cases", *(VERDICT_TITLES[v] for v in VERDICTS), "seconds")]
        for category in [*categories, "total"]:
            mine = [r for r in self.results if category in ("total", r.category)]
            rows.append((category, str(len(mine)), *(str(sum(r.verdict == v for r in mine)) for v in VERDICTS),
                         f"{sum(r.seconds for r in mine):.1f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ adapter files


def lora_vit(seed: int = 0) -> torch.nn.Module:
    """A tiny ViT with a LoRA (random non-zero B) and its 5-class head attached."""
    torch.manual_seed(seed)
    model = tm.vit().eval()
    visadapt.attach(model, "lora", rank=2, head="head")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if inject.ADAPTERS_ATTR in name or name.startswith("head."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


VIT_INPUT = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vit_output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(VIT_INPUT)


def write_crafted(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], fix_digest: bool = True) -> Path:
    """What an attacker writes: any header, with a checksum matching its tensors (anyone can compute it)."""
    meta = dict(meta)
    if fix_digest and "tensors_sha256" in meta:
        meta["tensors_sha256"] = io.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def raw_header_file(path: Path, header: bytes, data: bytes) -> Path:
    """A safetensors file with exactly ``header`` as its JSON bytes (non-UTF-8, duplicated keys, ...)."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


class AdapterCases:
    """Crafted visadapt files against the tiny ViT (and Swin, open_clip, the tiny SD pipeline's UNet)."""

    def __init__(self, rerun: Rerun):
        self.rerun = rerun
        legit_dir = rerun.work / "legit"
        legit_dir.mkdir()
        self.source = lora_vit()
        self.legit_path = visadapt.save_adapter(self.source, legit_dir / "a.safetensors")
        self.tensors, self.meta = io.read_adapter_file(self.legit_path)
        fresh = self.fresh()
        visadapt.load_adapter(fresh, self.legit_path)
        self.expected = vit_output(fresh)

    def fresh(self) -> torch.nn.Module:
        torch.manual_seed(1)
        return tm.vit().eval()

    def load_case(self, category: str, name: str, path: Path, *, may_load: bool = False,
                  field_name: str | None = None) -> None:
        """Load ``path`` into a fresh ViT. Refused: clean if the error names the file (and, given ``field_name``,
        says "<file>: header field '<field_name>'").
        Accepted (only where ``may_load``): the output must equal the legitimate file's, detach restore the model."""
        model = self.fresh()
        before = tensors_of(model)

        def accept(_):
            if not may_load:
                return "a crafted file was accepted"
            if not torch.allclose(vit_output(model), self.expected, atol=0, rtol=0):
                return "loaded, but the output differs from the legitimate file's"
            visadapt.detach(model)
            changed = changed_tensors(model, before)
            return f"detach left tensors changed: {changed[:4]}" if changed else None

        names = (str(path),)
        if field_name:  # the file and the field, or where another check sees it first, the file and what it found
            names = (f"{path}: header field '{field_name}'", *{
                "format": (f"{path} has no visadapt metadata",),  # then it is no visadapt file: a foreign layout?
                "tensors_sha256": (f"{path} is corrupted",),
                "head": (f"load of {path} into adapter",)}.get(field_name, ()))  # the report lists the head site
        self.rerun.case(category, name, lambda: visadapt.load_adapter(model, path), names=names, models=model,
                        accept=accept)

    # -- header fields ---------------------------------------------------------------------------------------

    def header_fields(self) -> None:
        fields = [*io.RESERVED_METADATA, io.TRAIN_METADATA]
        free_text = {"adapter_name", "visadapt_version"}  # descriptive only: a load may ignore them
        mutations = {"missing": None, "null": "null", "int": "123", "list": "[1, 2]", "empty": "",
                     "string": '"x"', "object": '{"a": 1}', "control": "\x1b[2J\x00", "huge": "9" * 5000}
        if self.rerun.quick:
            mutations = {k: mutations[k] for k in ("missing", "null", "list")}
            fields = ["format_version", "plugin", "config", "base_model", "site_widths", "head", "tensors_sha256"]
        for field_name in fields:
            for how, text in mutations.items():
                meta = dict(self.meta)
                if text is None:
                    meta.pop(field_name, None)
                else:
                    meta[field_name] = text
                if meta == self.meta:
                    continue
                folder = self.rerun.folder()
                path = write_crafted(folder / "crafted.safetensors", self.tensors, meta,
                                     fix_digest=field_name != "tensors_sha256")
                # head "" means no head: the file's head tensors are then unexpected (refused); free text loads;
                # a training record is descriptive for load_adapter once it is a JSON object
                may_load = field_name in free_text or (field_name == io.TRAIN_METADATA and how in ("missing", "object"))
                if field_name == "tensors_sha256" and how == "missing":
                    may_load = True  # an optional checksum (files written before it existed)
                self.load_case("header fields", f"{field_name}: {how}", path, may_load=may_load, field_name=field_name)

    def config_fields(self) -> None:
        config = json.loads(self.meta["config"])
        changes = {
            "alpha 'x'": {"alpha": "x"}, "targets 123": {"targets": 123}, "rank '2'": {"rank": "2"},
            "rank -1": {"rank": -1}, "rank 0": {"rank": 0}, "rank true": {"rank": True}, "rank 2.5": {"rank": 2.5},
            "dropout 'a'": {"dropout": "a"}, "dropout 7": {"dropout": 7}, "unknown key": {"bogus": 1},
            "alpha NaN": {"alpha": float("nan")}, "alpha 1e400": {"alpha": "1e400"},
            "targets ['nope']": {"targets": ["nope"]}, "rank huge int": {"rank": 10**40},
        }
        if self.rerun.quick:
            changes = {k: changes[k] for k in ("alpha 'x'", "targets 123", "rank -1")}
        for name, change in changes.items():
            edited = {**config, **change}
            if set(change) - set(config) and name != "unknown key":
                continue
            meta = {**self.meta, "config": json.dumps(edited)}
            path = write_crafted(self.rerun.folder() / "crafted.safetensors", self.tensors, meta)
            self.load_case("config fields", name, path)

    # -- header-driven allocation, shapes, site_widths ------------------------------------------------------

    def allocation(self) -> None:
        config = json.loads(self.meta["config"])
        ranks = [3_000_000, 100_000_000, 64] if not self.rerun.quick else [3_000_000]
        for rank in ranks:
            meta = {**self.meta, "config": json.dumps({**config, "rank": rank})}
            path = write_crafted(self.rerun.folder() / "huge.safetensors", self.tensors, meta)
            self.load_case("allocation and shapes", f"rank {rank:,} on a {path.stat().st_size:,} B file", path)
        widths = json.loads(self.meta["site_widths"])
        nonsense = {
            "site_widths {}": {}, "site_widths wrong site": {"nope.qkv": [32, 96]},
            "site_widths negative": {k: [-1, -1] for k in widths},
            "site_widths huge": {k: [10**9, 10**9] for k in widths},
            "site_widths strings": {k: ["a", "b"] for k in widths},
            "site_widths nested": {k: [[1], [2]] for k in widths},
        }
        if self.rerun.quick:
            nonsense = {k: nonsense[k] for k in ("site_widths {}", "site_widths huge")}
        for name, value in nonsense.items():
            meta = {**self.meta, "site_widths": json.dumps(value)}
            # {} records no widths (the shapes the config builds are still checked against the tensors): it may
            # load, with the legitimate file's result
            self.load_case("allocation and shapes", name,
                           write_crafted(self.rerun.folder() / "w.safetensors", self.tensors, meta),
                           may_load=value == {})
        first = min(k for k in self.tensors if inject.ADAPTERS_ATTR in k)
        shape_cases = {
            "a tensor transposed": {**self.tensors, first: self.tensors[first].t().contiguous()},
            "a tensor twice as big": {**self.tensors, first: torch.cat([self.tensors[first]] * 2)},
            "a tensor missing": {k: v for k, v in self.tensors.items() if k != first},
            "an extra tensor": {**self.tensors, "blocks.0.attn.qkv.weight": torch.zeros(96, 32)},
            "an int8 tensor": {**self.tensors, first: (self.tensors[first] * 100).to(torch.int8)},
            "a 0-d tensor": {**self.tensors, first: torch.tensor(1.0)},
            "head of another class count": {**self.tensors, "head.weight": torch.zeros(7, 32),
                                            "head.bias": torch.zeros(7)},
        }
        if self.rerun.quick:
            shape_cases = {k: shape_cases[k] for k in ("a tensor transposed", "an extra tensor")}
        for name, tensors in shape_cases.items():
            path = write_crafted(self.rerun.folder() / "s.safetensors", tensors, self.meta)
            if name != "an int8 tensor":
                self.load_case("allocation and shapes", name, path)
                continue
            # another dtype of the right shape is cast, as torch's load_state_dict does (an fp16 file into an fp32
            # model): accepted if the model holds exactly the stored values, cast
            model = self.fresh()
            self.rerun.case("allocation and shapes", "an int8 tensor (cast like fp16 into fp32)",
                            lambda m=model, p=path: visadapt.load_adapter(m, p), names=(str(path),),
                            accept=lambda _, m=model, t=tensors: None if torch.equal(
                                visadapt.api.stored_tensors(m, "default").get(first, torch.empty(0)), t[first].float())
                            else "the int8 values were not loaded as stored")
        # the other plugins' sizing fields (each plugin's own attach computes the shapes on a meta copy)
        plugins = [("adapter", tm.vit, {}, "bottleneck"), ("mosa", tm.swin, {"keep_modules": True}, "dim"),
                   ("lora", tm.clip, {}, "rank"), ("ranking_clip", tm.clip, {}, "prompt_tokens"),
                   ("resadapter", tm.unet, {}, "rank")]
        for plugin, make, attach, sizing in plugins[:1] if self.rerun.quick else plugins:
            torch.manual_seed(0)
            model = make()
            visadapt.attach(model, plugin, **attach)
            folder = self.rerun.folder()
            tensors, meta = io.read_adapter_file(visadapt.save_adapter(model, folder / "ok.safetensors"))
            config = json.loads(meta["config"])
            path = write_crafted(folder / "big.safetensors", tensors,
                                 {**meta, "config": json.dumps({**config, sizing: config[sizing] * 100_000})})
            target = make()
            self.rerun.case("allocation and shapes", f"{plugin} {sizing} x100000 ({make.__name__})",
                            lambda target=target, path=path: visadapt.load_adapter(target, path),
                            names=(str(path),), models=target)

    # -- truncations and garbled bytes ----------------------------------------------------------------------

    def truncations(self) -> None:
        data = self.legit_path.read_bytes()
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        offsets = {"0 B": 0, "1 B": 1, "7 B": 7, "8 B (length only)": 8, "9 B": 9, "header middle": header_end // 2,
                   "header end - 1": header_end - 1, "header end": header_end, "first tensor middle": header_end + 7,
                   "half": len(data) // 2, "last byte missing": len(data) - 1}
        garbled = {"length field 2**40": struct.pack("<Q", 2**40) + data[8:],
                   "length field larger than the file": struct.pack("<Q", len(data)) + data[8:],
                   "length field 0": struct.pack("<Q", 0) + data[8:],
                   "header brace flipped": data[:8] + b"[" + data[9:],
                   "garbage appended": data + os.urandom(64),
                   "tensor byte flipped": data[:-5] + bytes([data[-5] ^ 0x5A]) + data[-4:],
                   "random bytes": os.urandom(len(data))}
        if self.rerun.quick:
            offsets = {k: offsets[k] for k in ("0 B", "header middle", "half")}
            garbled = {k: garbled[k] for k in ("length field 2**40", "tensor byte flipped")}
        for name, cut in offsets.items():
            path = self.rerun.folder() / "cut.safetensors"
            path.write_bytes(data[:cut])
            self.load_case("truncation", f"cut at {name}", path)
        for name, content in garbled.items():
            path = self.rerun.folder() / "garbled.safetensors"
            path.write_bytes(content)
            self.load_case("truncation", name, path)
        # non-UTF-8 and duplicated keys in the header JSON itself (safetensors' own parser sees them first)
        header = data[8:header_end]
        raw = {"non-UTF-8 header": header.replace(b'"lora"', b'"lo\xff\xfea"', 1),
               "duplicated metadata key": header.replace(b'"__metadata__":{', b'"__metadata__":{"plugin":"x",', 1)}
        for name, bad in list(raw.items())[: 1 if self.rerun.quick else None]:
            path = raw_header_file(self.rerun.folder() / "raw.safetensors", bad, data[header_end:])
            # a repeated key: safetensors' parser keeps the last value, and every visadapt reader goes through it,
            # so inspect and load see the same header: accepted if it loads as the legitimate file
            self.load_case("truncation", name, path, may_load=name == "duplicated metadata key")

    # -- heads --------------------------------------------------------------------------------------------

    def heads(self) -> None:
        model = self.fresh()
        owners = [name for name, module in model.named_modules() if name and list(module.parameters(recurse=False))]
        if self.rerun.quick:
            owners = ["blocks.1.mlp.fc2", "patch_embed.proj", "head"]
        adapter = {k: v for k, v in self.tensors.items() if not k.startswith("head.")}
        for owner in owners:
            target = self.fresh()
            before = tensors_of(target)
            stored = {f"{owner}.{k}": torch.full_like(v, 7.0) for k, v in target.get_submodule(owner).state_dict().items()}
            path = write_crafted(self.rerun.folder() / "head.safetensors", {**adapter, **stored},
                                 {**self.meta, "head": owner})

            def accept(_, target=target, before=before, owner=owner):
                if owner != "head":
                    return f"SECURITY: a file wrote into '{owner}'"
                changed = changed_existing(target, before)
                if sorted(changed) != [":head.bias", ":head.weight"]:
                    return f"a head load changed {changed}"
                visadapt.detach(target)
                changed = changed_tensors(target, before)
                return f"detach left {changed} changed" if changed else None

            self.rerun.case("crafted heads", f"vit head = {owner}", lambda t=target, p=path: visadapt.load_adapter(t, p),
                            names=(str(path),), models=target, accept=accept)
        # Swin and open_clip: a backbone module named as head
        for make, owner in [(tm.swin, "layers.0.blocks.0.mlp.fc2"), (tm.clip, "visual.conv1")][
                : 1 if self.rerun.quick else None]:
            torch.manual_seed(0)
            base = make()
            visadapt.attach(base, "lora", rank=2)
            folder = self.rerun.folder()
            tensors, meta = io.read_adapter_file(visadapt.save_adapter(base, folder / "ok.safetensors"))
            target = make()
            stored = {f"{owner}.{k}": torch.full_like(v, 7.0) for k, v in target.get_submodule(owner).state_dict().items()}
            path = write_crafted(folder / "head.safetensors", {**tensors, **stored}, {**meta, "head": owner})
            self.rerun.case("crafted heads", f"{make.__name__} head = {owner}",
                            lambda t=target, p=path: visadapt.load_adapter(t, p), names=(str(path),), models=target)
        self.peft_modules_to_save()

    def peft_modules_to_save(self) -> None:
        from peft import LoraConfig, get_peft_model

        owners = ["blocks.1.mlp.fc2", "patch_embed.proj", "norm", "head"]
        if self.rerun.quick:
            owners = ["blocks.1.mlp.fc2"]
        for owner in owners:
            torch.manual_seed(0)
            vit = tm.vit().eval()
            peft_model = get_peft_model(copy.deepcopy(vit), LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"],
                                                                       modules_to_save=[owner]))
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_" in name or "modules_to_save" in name:
                        param.add_(0.2)
            folder = self.rerun.folder() / "peft"
            peft_model.save_pretrained(folder)
            target = copy.deepcopy(vit)
            before = tensors_of(target)

            def accept(_, target=target, before=before, owner=owner):
                if owner != "head":
                    return f"SECURITY: a PEFT folder wrote into '{owner}'"
                visadapt.detach(target, "default")
                changed = changed_tensors(target, before)
                return f"detach left {changed} changed" if changed else None

            self.rerun.case("crafted heads", f"PEFT modules_to_save = {owner}",
                            lambda t=target, f=folder: visadapt.load_adapter(t, f), names=(str(folder), owner),
                            models=target, accept=accept)

    def unet(self) -> None:
        """The tiny SD pipeline: crafted files through ``pipe.load_visadapt``; ``unload_visadapt`` restores."""
        from visadapt.backbones import create_tiny_sd_pipeline

        pipe = create_tiny_sd_pipeline()
        components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
        unet = copy.deepcopy(pipe.unet)
        visadapt.attach(unet, "lora", rank=2, targets=("q", "v"), head="conv_out")
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if inject.ADAPTERS_ATTR in name or name.startswith("conv_out."):
                    param.add_(0.1)
        folder = self.rerun.folder()
        with_head = visadapt.save_adapter(unet, folder / "conv_out.safetensors")
        tensors, meta = io.read_adapter_file(with_head)
        plain_tensors = {k: v for k, v in tensors.items() if not k.startswith("conv_out.")}
        config = json.loads(meta["config"])
        crafted = {
            "head = conv_out": (tensors, meta),
            "head = conv_in": ({**plain_tensors, **{f"conv_in.{k}": v + 1 for k, v in pipe.unet.conv_in.state_dict().items()}},
                               {**meta, "head": "conv_in"}),
            "rank 3,000,000": (plain_tensors, {**meta, "head": "", "config": json.dumps({**config, "rank": 3_000_000})}),
            "config missing": (plain_tensors, {k: v for k, v in meta.items() if k not in ("config", "head")}),
            "base_model null": (plain_tensors, {**meta, "head": "", "base_model": "null"}),
            "site_widths of a ViT": (plain_tensors, {**meta, "head": "", "site_widths": self.meta["site_widths"]}),
        }
        if self.rerun.quick:
            crafted = {k: crafted[k] for k in ("head = conv_out", "rank 3,000,000")}
        for name, (tensors_, meta_) in crafted.items():
            path = write_crafted(self.rerun.folder() / "unet.safetensors", tensors_, meta_)
            self.rerun.case("diffusers pipeline", name, lambda p=path: pipe.load_visadapt(p, adapter_name="x"),
                            names=(str(path),), models=components,
                            after=lambda: f"pipeline lists {pipe.list_visadapt()}" if pipe.list_visadapt() else None)
        # a legitimate file, then unload: the exact original back
        before = tensors_of(components)
        ok_unet = copy.deepcopy(pipe.unet)
        visadapt.attach(ok_unet, "lora", rank=2, targets=("q", "v"))
        ok_path = visadapt.save_adapter(ok_unet, self.rerun.folder() / "ok.safetensors")

        def load_then_unload():
            pipe.load_visadapt(ok_path, adapter_name="ok")
            pipe.unload_visadapt()

        def unloaded(_):
            changed = changed_tensors(components, before)
            return f"unload left {changed[:4]} changed" if changed else None

        self.rerun.case("diffusers pipeline", "legit file then unload_visadapt", load_then_unload, models=components,
                        accept=unloaded)

    # -- inspect ----------------------------------------------------------------------------------------

    def inspect(self) -> None:
        from visadapt.cli import main

        evil = "\x1b[2J\x1b[31mpwned\u202e\x07"
        config = json.loads(self.meta["config"])
        crafted = {
            "adapter_name with ANSI": {**self.meta, "adapter_name": evil},
            "visadapt_version with ANSI": {**self.meta, "visadapt_version": evil},
            "config path_pattern with ANSI": {**self.meta, "config": json.dumps({**config, "path_pattern": evil})},
            "plugin with ANSI (refused)": {**self.meta, "plugin": evil},
            "extra key with ANSI": {**self.meta, evil: evil},
        }
        tensor_keys = {k.replace("blocks.0.", f"blocks.0.{evil}") if "blocks.0." in k else k: v
                       for k, v in self.tensors.items()}
        cases = [(name, self.tensors, meta, "crafted.safetensors") for name, meta in crafted.items()]
        cases.append(("tensor keys with ANSI", tensor_keys, self.meta, "crafted.safetensors"))
        cases.append(("file name with ANSI (bad header)", self.tensors, {**self.meta, "config": "[1]"},
                      f"bad{evil}.safetensors"))
        if self.rerun.quick:
            cases = cases[:1] + cases[-1:]
        for name, tensors, meta, file_name in cases:
            path = write_crafted(self.rerun.folder() / file_name, tensors, meta)

            def action(path=path):
                out, err = pyio.StringIO(), pyio.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(["inspect", str(path), "--keys"])
                return code, out.getvalue() + err.getvalue()

            def accept(value):
                code, text = value
                unprintable = sorted({repr(c) for c in text if not c.isprintable() and c != "\n"})
                if unprintable:
                    return f"SECURITY: printed control characters {unprintable}"
                return None if code in (0, 2) and text else f"exit {code}, output {text[:80]!r}"

            self.rerun.case("inspect", name, action, names=(str(path),), accept=accept)

    # -- pickle ----------------------------------------------------------------------------------------------

    def pickles(self) -> None:
        marker = self.rerun.work / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        for name in ["adapter.bin", "adapter.pt", "pytorch_lora_weights.bin", "adapter_model.bin"][
                : 2 if self.rerun.quick else None]:
            folder = self.rerun.folder()
            path = folder / name
            path.write_bytes(pickle.dumps({"x": Payload()}))
            model = self.fresh()
            self.rerun.case("pickle", f"pickle file {name}", lambda m=model, p=path: visadapt.load_adapter(m, p),
                            names=(str(path),), models=model,
                            after=lambda: "SECURITY: the pickle payload ran" if marker.exists() else None)
            self.rerun.case("pickle", f"folder holding only {name}",
                            lambda m=model, f=folder: visadapt.load_adapter(m, f), names=(str(folder),), models=model,
                            after=lambda: "SECURITY: the pickle payload ran" if marker.exists() else None)


# --------------------------------------------------------------------------------------------- data folders

def read_all(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


class DataCases:
    def __init__(self, rerun: Rerun):
        self.rerun = rerun

    def split_paths(self) -> None:
        from visadapt.data.verify import verify_benchmark

        listed_cases = {"../../outside/secret.jpg": "../../outside/secret.jpg",
                        "absolute path": "{secret}",
                        "images/../../../outside": "images/../../../outside/secret.jpg",
                        "./../..": "./../../outside/secret.jpg",
                        "~/x": "~/secret.jpg", "NUL byte": "images/\x00.jpg",
                        "backslashes ..\\..": "..\\..\\outside\\secret.jpg",
                        "empty path": "", "label not an int": "images/train800/000000.jpg x",
                        "label out of range": "images/train800/000000.jpg 99999",
                        "missing file": "images/none.jpg"}
        if self.rerun.quick:
            listed_cases = {k: listed_cases[k] for k in ("../../outside/secret.jpg", "absolute path")}
        for name, listed in listed_cases.items():
            case = self.rerun.folder()
            root = case / "data"
            task_dir = write_vtab_task(root, "dtd")
            secret = case / "outside" / "secret.jpg"
            write_image(secret)
            listed = listed.format(secret=secret)
            line = listed if " " in listed else f"{listed} 1"
            list_file = task_dir / "train800.txt"
            list_file.write_text(list_file.read_text() + line + "\n")

            def accept(dataset, secret=secret, root=root):
                paths = [os.path.realpath(p) for p, _ in dataset.samples]
                escaped = [p for p in paths if not p.startswith(os.path.realpath(root) + "/")]
                if escaped:
                    return f"SECURITY: split file opened {escaped[:2]} outside the data root"
                read_all(dataset)
                return None

            self.rerun.case("split files", name, lambda r=root: vtab.load_split(r, "vtab", "dtd", "train800"),
                            names=(f"{list_file}:4",), accept=accept)
            if name in ("../../outside/secret.jpg", "absolute path", "images/../../../outside", "./../.."):
                report_problems = lambda r=root: verify_benchmark(r, "vtab", tasks=["dtd"], check_images=False)

                def flagged(report, list_file=list_file):
                    hits = [p for p in report.problems if p.file == str(list_file) and p.line == 4]
                    return None if hits and "data root" in hits[0].message else "verify does not flag the line"

                self.rerun.case("split files", f"verify flags {name}", report_problems, accept=flagged,
                                must_raise=False)
        # a symlink inside the root pointing outside it: followed by the documented rule (hub snapshots link into
        # blobs/); checked to read the linked image, and nothing else
        case = self.rerun.folder()
        task_dir = write_vtab_task(case / "data", "dtd")
        write_image(case / "outside" / "secret.jpg", size=(13, 11))
        os.symlink(case / "outside" / "secret.jpg", task_dir / "images" / "linked.jpg")
        (task_dir / "train800.txt").write_text((task_dir / "train800.txt").read_text() + "images/linked.jpg 1\n")
        self.rerun.case("split files", "symlink out of the root (documented: followed)",
                        lambda: vtab.load_split(case / "data", "vtab", "dtd", "train800")[3][0].size,
                        accept=lambda size: None if size == (13, 11) else f"read {size}")
        # FGVC split JSON
        fgvc_cases = {"key ../../": '{"a/1.jpg": 1,\n "../../../outside/secret.jpg": 2}',
                      "not JSON": '{"a/1.jpg": ', "a JSON list": "[1, 2]", "label a string": '{"a/1.jpg": "x"}'}
        if self.rerun.quick:
            fgvc_cases = {k: fgvc_cases[k] for k in ("key ../../",)}
        for name, text in fgvc_cases.items():
            case = self.rerun.folder()
            image_dir = case / "data" / "cub" / "images"
            write_image(image_dir / "a" / "1.jpg")
            write_image(case / "outside" / "secret.jpg")
            split = case / "data" / "cub" / "train.json"
            split.write_text(text)

            def action(split=split, image_dir=image_dir, case=case):
                problems: list = []
                good = fgvc.read_split_json(split, problems=problems, image_dir=image_dir, root=case / "data")
                if problems:
                    raise DatasetError("; ".join(f"{f}:{line}: {m}" for f, line, m in problems))
                return good

            def accept(good, case=case, image_dir=image_dir):
                top = os.path.realpath(case / "data")
                bad = [k for k in good if not os.path.realpath(image_dir / k).startswith(top + "/")]
                return f"SECURITY: keys outside the root accepted: {bad}" if bad else None

            self.rerun.case("split files", f"FGVC train.json {name}", action, names=(str(split),), accept=accept)

    def images(self) -> None:
        from visadapt.data.cache import load_cached_split

        jpeg = self.rerun.work / "ok.jpg"
        write_image(jpeg, size=(64, 64))
        small = pyio.BytesIO()
        Image.new("RGB", (40, 40), (1, 2, 3)).save(small, format="PNG")
        contents = {"decompression bomb (header 200000^2)": png_claiming(200_000, 200_000),
                    "bomb in PIL's warning range": small.getvalue(),
                    "truncated JPEG": jpeg.read_bytes()[:200], "random bytes": os.urandom(300), "empty file": b"",
                    "a text file": b"images/a.jpg 3\n", "PNG header only": png_claiming(8, 8)[:33],
                    "GIF with a bogus header": b"GIF89a" + os.urandom(40)}
        if self.rerun.quick:
            contents = {k: contents[k] for k in ("decompression bomb (header 200000^2)", "random bytes")}
        for name, data in contents.items():
            case = self.rerun.folder()
            task_dir = write_vtab_task(case / "data", "dtd")
            image = task_dir / "images" / "train800" / "000001.jpg"
            image.write_bytes(data)
            limit = Image.MAX_IMAGE_PIXELS

            def action(case=case, name=name, limit=limit):
                Image.MAX_IMAGE_PIXELS = 1000 if "warning range" in name else limit
                try:
                    return vtab.load_split(case / "data", "vtab", "dtd", "train800")[1]
                finally:
                    Image.MAX_IMAGE_PIXELS = limit

            self.rerun.case("images", name, action, names=(str(image),))
        # the same bomb through the cache's decode pool: DatasetError, and no cache file left
        for workers in ([1] if self.rerun.quick else [1, 2]):
            case = self.rerun.folder()
            task_dir = write_vtab_task(case / "data", "dtd")
            image = task_dir / "images" / "train800" / "000001.jpg"
            image.write_bytes(png_claiming(200_000, 200_000))
            cache_dir = task_dir / ".visadapt_cache"
            self.rerun.case("images", f"bomb through the cache decode pool ({workers} workers)",
                            lambda c=case, w=workers: load_cached_split("vtab", c / "data", "dtd", "train800",
                                                                        input_size=8, workers=w),
                            names=(str(image),), may_write=(cache_dir,),
                            after=lambda d=cache_dir: f"left {list(d.iterdir())}" if d.exists() and any(d.iterdir())
                            else None)

    def cache(self) -> None:
        from torch.utils.data import DataLoader

        from visadapt.data.cache import load_cached_split

        def build(case: Path):
            write_vtab_task(case / "data", "dtd", {"train800": [0, 1, 2], "val200": [1, 0], "test": list(range(9))})
            dataset = load_cached_split("vtab", case / "data", "dtd", "test", input_size=8, workers=1)
            expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
            return dataset, expected

        def same(expected):
            return lambda got: None if torch.equal(got, expected) else "items differ from the cache as built"

        case = self.rerun.folder()
        dataset, expected = build(case)

        def deleted_before_first_item(dataset=dataset):
            fresh = load_cached_split("vtab", case / "data", "dtd", "test", input_size=8, workers=1)
            fresh.cache_path.unlink()
            return torch.stack([fresh[i][0] for i in range(len(fresh))])

        cache_folder = case / "data" / "dtd" / ".visadapt_cache"
        self.rerun.case("cache", "deleted before the first item", deleted_before_first_item, accept=same(expected),
                        may_write=(cache_folder,))

        def deleted_between_epochs_with_workers():
            fresh = load_cached_split("vtab", case / "data", "dtd", "test", input_size=8, workers=1)
            loader = DataLoader(fresh, batch_size=4, num_workers=2, multiprocessing_context="fork")
            first = torch.cat([x for x, _ in loader])
            fresh.cache_path.unlink()
            second = torch.cat([x for x, _ in loader])
            return first if torch.equal(first, second) else second * 0 + 1e9

        if not self.rerun.quick:  # DataLoader workers send batches through pickle: not a finding here
            self.rerun.case("cache", "deleted between epochs (2 workers)", deleted_between_epochs_with_workers,
                            accept=same(expected), may_write=(cache_folder,), watch_pickle=False)
        item = 3 * 8 * 8
        keeps = [0, 1, item - 1, item * 4 + 5, item * 9 - 1] if not self.rerun.quick else [0, item * 4 + 5]
        for keep in keeps:
            case = self.rerun.folder()
            dataset, expected = build(case)
            cache_folder = case / "data" / "dtd" / ".visadapt_cache"
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # a child reads after the cut: SIGBUS would kill it (the finding)
                os.close(read)
                try:
                    os.truncate(dataset.cache_path, keep)
                    outcome = []
                    for i in range(len(dataset)):
                        try:
                            outcome.append("same" if torch.equal(dataset[i][0], expected[i]) else "DIFFERENT")
                        except DatasetError as err:
                            outcome.append("clean" if ".vcache" in str(err) and (
                                "cut short" in str(err) or "modified while in use" in str(err)) else
                                f"unnamed: {err}")
                        except Exception as err:  # noqa: BLE001
                            outcome.append(f"RAW {type(err).__name__}: {err}")
                    os.write(write, json.dumps(outcome).encode())
                finally:
                    os._exit(0)
            os.close(write)

            def child(pid=pid, read=read, keep=keep):
                with os.fdopen(read) as pipe:
                    text = pipe.read()
                _, status = os.waitpid(pid, 0)
                if os.WIFSIGNALED(status):
                    raise RuntimeError(f"the reader died of signal {os.WTERMSIG(status)} (SIGBUS is 7)")
                outcome = json.loads(text)
                raw = [o for o in outcome if o.startswith(("RAW", "unnamed"))]
                if raw:
                    raise RuntimeError(raw[0])
                return outcome

            def accept(outcome, keep=keep):
                # once the file changed after its check nothing is served, whole items before the cut included
                for i, o in enumerate(outcome):
                    if o != "clean":
                        return f"item {i}: {o} (cut at {keep} bytes)"
                return None

            self.rerun.case("cache", f"truncated to {keep} B while in use", child, accept=accept,
                            may_write=(cache_folder,))
        # pickled by hand then deleted: the clone says so
        case = self.rerun.folder()
        dataset, _ = build(case)

        def pickled_then_deleted(dataset=dataset):
            clone = pickle.loads(pickle.dumps(dataset))
            dataset.cache_path.unlink()
            return clone[0]

        # the case pickles the dataset itself (as a spawned DataLoader worker does): not a finding
        self.rerun.case("cache", "pickled copy, file deleted", pickled_then_deleted, names=(str(dataset.cache_path),),
                        may_write=(case / "data" / "dtd" / ".visadapt_cache",), watch_pickle=False)

    def concurrent_generation(self) -> None:
        import multiprocessing

        from visadapt.data.procedural import generate_mini_vtab

        sizes = {"train800": 4, "val200": 2, "test": 2}
        counts = [2] if self.rerun.quick else [2, 3, 4]
        context = multiprocessing.get_context("fork")
        for processes in counts:
            case = self.rerun.folder()
            root = case / "cache" / "mini-vtab"

            def run(root=root, processes=processes):
                with context.Manager() as manager:
                    barrier = manager.Barrier(processes)
                    with context.Pool(processes) as pool:
                        return pool.map(_generate_and_read, [(str(root), barrier, sizes)] * processes)

            def accept(digests, root=root):
                if not all(d == digests[0] for d in digests) or not digests[0]:
                    return "the generators saw different data"
                left = sorted(p.name for p in root.parent.iterdir())
                return None if left == [".mini-vtab.lock", "mini-vtab"] else f"left {left}"

            self.rerun.case("concurrent generation", f"{processes} generators at once", run, accept=accept,
                            may_write=(case / "cache",))
        # a killed generator leaves nothing at the root; the next one cleans up
        case = self.rerun.folder()
        root = case / "mini"
        pid = os.fork()
        if pid == 0:
            try:
                generate_mini_vtab(root, seed=0, split_sizes={"train800": 400, "val200": 100, "test": 100})
            finally:
                os._exit(0)

        def killed_then_regenerated():
            deadline = time.time() + 60
            while time.time() < deadline and not list(case.glob(".mini.gen-*.tmp/*/images/train800/*.png")):
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if root.exists():
                return "a partial suite is at the data root"
            generate_mini_vtab(root, seed=0, split_sizes=sizes)
            return sorted(p.name for p in case.iterdir())

        self.rerun.case("concurrent generation", "generator killed, then one more", killed_then_regenerated,
                        may_write=(case,),
                        accept=lambda left: None if left == [".mini.lock", "mini"] else f"left {left}")


def _generate_and_read(args) -> dict[str, int]:
    from visadapt.data.procedural import generate_mini_vtab

    root, barrier, sizes = args
    barrier.wait()
    generate_mini_vtab(root, seed=0, split_sizes=sizes)
    for task_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        vtab.load_split(root, "mini-vtab", task_dir.name, "train800val200")  # raises if any image is missing
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- writes and faults


def _save_child(path: str, die_at: str) -> None:
    """In a forked child: save an adapter and die with SIGKILL at ``die_at`` (``fsync``, ``rename``)."""
    def killed(*_args):
        os.kill(os.getpid(), signal.SIGKILL)

    if die_at == "fsync":
        io.os.fsync = killed
    else:
        io.os.replace = killed
    visadapt.save_adapter(lora_vit(), path)


class WriteCases:
    def __init__(self, rerun: Rerun):
        self.rerun = rerun

    def killed_saves(self) -> None:
        for die_at in ["fsync", "rename"]:
            case = self.rerun.folder()
            path = case / "a.safetensors"
            pid = os.fork()
            if pid == 0:
                try:
                    _save_child(str(path), die_at)
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            leftover = sorted(p.name for p in case.iterdir())

            def next_save(path=path, status=status, leftover=leftover):
                if not (os.WIFSIGNALED(status) and leftover and leftover[0].endswith(".tmp")):
                    return f"the save was not killed mid-write (status {status}, left {leftover})"
                visadapt.save_adapter(lora_vit(), path)
                io.read_adapter_file(path)
                return sorted(p.name for p in path.parent.iterdir())

            self.rerun.case("killed save", f"killed at {die_at}, then saved again", next_save, may_write=(case,),
                            accept=lambda left: None if left == ["a.safetensors"] else f"left {left}")

    def permissions(self) -> None:
        from visadapt.io import write_json_atomic

        umasks = [0o022, 0o027] if self.rerun.quick else [0o002, 0o022, 0o027, 0o077]
        writers = {"save_adapter": lambda p: visadapt.save_adapter(lora_vit(), p / "a.safetensors"),
                   "write_json_atomic": lambda p: (write_json_atomic(p / "m.json", {"a": 1}), p / "m.json")[1],
                   "save_pretrained": lambda p: (visadapt.save_pretrained(lora_vit(), p / "folder")
                                                 if hasattr(visadapt, "save_pretrained") else None,
                                                 p / "folder" / "adapter.safetensors")[1]}
        for umask in umasks:
            for writer_name, writer in writers.items():
                case = self.rerun.folder()

                def action(writer=writer, case=case, umask=umask):
                    old = os.umask(umask)
                    try:
                        return writer(case)
                    finally:
                        os.umask(old)

                def accept(path, umask=umask):
                    mode = Path(path).stat().st_mode & 0o777
                    return None if mode == 0o666 & ~umask else f"mode {oct(mode)}, umask {oct(umask)} wants " \
                                                               f"{oct(0o666 & ~umask)}"

                self.rerun.case("permissions", f"{writer_name} under umask {umask:03o}", action, may_write=(case,),
                                accept=accept)

    def canonical_bytes(self) -> None:
        case = self.rerun.folder()
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(ROOT / 'eval' / 'bench')!r}); sys.argv = ['x']
            import hostile_rerun, visadapt
            visadapt.save_adapter(hostile_rerun.lora_vit(3), sys.stdin.readline().strip(),
                                  metadata={{"visadapt.train": '{{"task": "x"}}', "b": "1", "a": "2", "z": "3"}})
        """)

        def two_processes():
            for seed in ("1", "2"):
                subprocess.run([sys.executable, "-c", code], input=str(case / f"{seed}.safetensors"), text=True,
                               check=True, cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED=seed),
                               capture_output=True)
            return (case / "1.safetensors").read_bytes() == (case / "2.safetensors").read_bytes()

        self.rerun.case("canonical bytes", "one adapter saved by two processes", two_processes, may_write=(case,),
                        accept=lambda same: None if same else "the two files' bytes differ")


class ResumeCases:
    """``train/vtab.py`` on a tiny mini-VTAB folder: damaged checkpoints, a missing RNG state, killed runs."""

    TASK = "orientation"
    UMASK = 0o027

    def run_permissions(self) -> None:
        """Every file a training run writes (adapter, metrics, each checkpoint's files) has the umask's mode."""
        wanted = 0o666 & ~self.UMASK

        def modes():
            return {str(p.relative_to(self.reference)): p.stat().st_mode & 0o777
                    for p in sorted(self.reference.rglob("*")) if p.is_file()}

        def accept(found):
            wrong = sorted({f"{Path(k).name}: {oct(v)}" for k, v in found.items() if v != wanted})
            return f"files not {oct(wanted)} under umask {self.UMASK:03o}: {wrong}" if wrong else None

        self.rerun.case("permissions", f"a training run's {len(modes())} files under umask {self.UMASK:03o}", modes,
                        accept=accept)

    def __init__(self, rerun: Rerun):
        from visadapt.data.procedural import generate_mini_vtab

        self.rerun = rerun
        self.data = generate_mini_vtab(rerun.work / "minivtab", seed=0,
                                       split_sizes={"train800": 16, "val200": 8, "test": 20})
        self.epochs = "1" if rerun.quick else "3"
        self.reference = rerun.work / "reference"
        old = os.umask(self.UMASK)  # the run's files must follow it (see run_permissions)
        try:
            if rerun.quick:  # in this process: no subprocess start-up
                code = self.resume(self.reference, resume=False)
            else:  # a subprocess, like the killed runs it is compared with
                code = subprocess.run([sys.executable, str(ROOT / "train" / "vtab.py"), *self.args(self.reference)],
                                      check=False, env=self.env(), capture_output=True).returncode
        finally:
            os.umask(old)
        assert code == 0, "the reference run failed"
        self.checkpoints = sorted((self.reference / self.TASK / "checkpoints").glob("step_*"))

    def args(self, out: Path, *extra: str) -> list[str]:
        return ["--data-root", str(self.data), "--output-dir", str(out), "--no-progress", "--pretrained", "none",
                "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0", "--task", self.TASK, "--epochs",
                self.epochs, "--checkpoint-every-steps", "1", "--keep-checkpoints", "100", *extra]

    @staticmethod
    def env() -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
        env.pop("ACCELERATE_MIXED_PRECISION", None)
        return env

    def resume(self, out: Path, *extra: str, resume: bool = True) -> int:
        from train_scripts import load_train_script  # the job train/vtab.py runs, imported afresh

        module = load_train_script("vtab")
        argv = self.args(out, *(["--resume"] if resume else []), *extra)
        out_text, err_text = pyio.StringIO(), pyio.StringIO()
        with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
            code = engine.run_script(lambda: module.main(argv))
        self.last_output = out_text.getvalue() + err_text.getvalue()
        return code

    def run_with(self, checkpoints: list[Path], out: Path) -> Path:
        root = out / self.TASK / "checkpoints"
        root.mkdir(parents=True)
        for checkpoint in checkpoints:
            shutil.copytree(checkpoint, root / checkpoint.name)
        return root

    def same_as_reference(self, out: Path) -> str | None:
        from safetensors.torch import load_file

        resumed = json.loads((out / self.TASK / "metrics.json").read_text())
        full = json.loads((self.reference / self.TASK / "metrics.json").read_text())
        if resumed["history"] != full["history"] or resumed["accuracy_final"] != full["accuracy_final"]:
            return "the resumed run's metrics differ from the uninterrupted run's"
        a = load_file(str(out / self.TASK / "adapter.safetensors"))
        b = load_file(str(self.reference / self.TASK / "adapter.safetensors"))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return "the resumed adapter's tensors differ from the uninterrupted run's"
        root = out / self.TASK / "checkpoints"
        partial = [p.name for p in root.iterdir() if p.name.startswith(engine._STAGING_PREFIX)
                   or engine.checkpoint_problem(p) is not None]
        return f"partial checkpoints left: {partial}" if partial else None

    def checkpoint_files(self) -> None:
        """Cut any file of the newest checkpoint: it is skipped for the previous one, with a notice naming it."""
        newest, previous = self.checkpoints[-1], self.checkpoints[-2]
        files = ["progress.json", "trainable.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
        fractions = [0.0, 0.5, 0.99] if not self.rerun.quick else [0.5]
        for name in files:
            for fraction in fractions:
                case = self.rerun.folder()
                root = self.run_with([previous, newest], case)
                target = root / newest.name / name
                data = target.read_bytes()
                target.write_bytes(data[:int(len(data) * fraction)])

                def accept(value, root=root, name=name):
                    chosen, notices = value
                    if chosen != root / previous.name:
                        return f"chose {chosen}"
                    return None if len(notices) == 1 and name in notices[0] and newest.name in notices[0] else \
                        f"notices {notices}"

                self.rerun.case("resume", f"newest {name} cut at {fraction:.0%}: previous chosen",
                                lambda r=root: engine._choose_resume_checkpoint(r, 1, needs_scaler=False),
                                accept=accept)

    def real_resumes(self) -> None:
        checkpoints = self.checkpoints
        previous, newest = checkpoints[-3], checkpoints[-2]
        for name in (["progress.json"] if self.rerun.quick else ["progress.json", "trainable.safetensors"]):
            case = self.rerun.folder()
            root = self.run_with([previous, newest], case)
            target = root / newest.name / name
            target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])

            def action(case=case):
                return self.resume(case)

            def accept(code, case=case):
                if code != 0:
                    return f"exit {code}: {self.last_output[-300:]}"
                if "skipping broken checkpoint" not in self.last_output:
                    return "no notice about the skipped checkpoint"
                return self.same_as_reference(case)

            self.rerun.case("resume", f"half-written newest {name}: resumed from the previous", action,
                            accept=accept, may_write=(case / self.TASK,))
        # a missing RNG state: refused (exit 2 naming the file), then allowed explicitly with a warning
        case = self.rerun.folder()
        root = self.run_with([newest], case)
        (root / newest.name / "random_states_0.pkl").unlink()

        def refused():
            code = self.resume(case)
            if code == 2 and "random_states_0.pkl" in self.last_output and "--allow-rng-reset" in self.last_output:
                raise CheckpointError(self.last_output)
            return code

        self.rerun.case("resume", "missing random_states_0.pkl: refused", refused,
                        names=(str(root / newest.name),), may_write=(case / self.TASK,))
        self.rerun.case("resume", "missing random_states_0.pkl with --allow-rng-reset: warned",
                        lambda: self.resume(case, "--allow-rng-reset"), may_write=(case / self.TASK,),
                        accept=lambda code: None if code == 0 and "warning:" in self.last_output and
                        "random_states_0.pkl" in self.last_output else f"exit {code}: {self.last_output[-300:]}")
        # no complete checkpoint at all: one error line, exit 2, nothing deleted
        case = self.rerun.folder()
        root = self.run_with(checkpoints[:1], case)
        (root / checkpoints[0].name / "progress.json").write_text('{"epoch": 0, "bat')

        def none_complete():
            code = self.resume(case)
            if code == 2 and "Traceback" not in self.last_output and str(root) in self.last_output:
                raise CheckpointError(self.last_output)
            return code

        self.rerun.case("resume", "no complete checkpoint", none_complete, names=(str(root),),
                        may_write=(case / self.TASK,),
                        after=lambda: None if (root / checkpoints[0].name).is_dir() else "the checkpoint was deleted")
        # a crafted RNG pickle that runs code: the checkpoint is unreadable, never executed
        marker = self.rerun.work / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        case = self.rerun.folder()
        root = self.run_with([newest], case)
        (root / newest.name / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))

        def crafted_pickle():
            problem = engine.checkpoint_problem(root / newest.name)
            if problem and "random_states_0.pkl" in problem:
                raise CheckpointError(f"{root / newest.name}: {problem}")
            return problem

        self.rerun.case("resume", "random_states_0.pkl carrying code", crafted_pickle, names=(str(root),),
                        after=lambda: "SECURITY: the pickle payload ran" if marker.exists() else None)
        # leftovers of a killed checkpoint write: ignored, then removed
        if not self.rerun.quick:
            case = self.rerun.folder()
            root = self.run_with([previous], case)
            staged = root / f"{engine._STAGING_PREFIX}{newest.name}"
            shutil.copytree(newest, staged)
            (staged / "progress.json").unlink()

            def accept(code, case=case):
                return f"exit {code}" if code else self.same_as_reference(case)

            self.rerun.case("resume", "staging folder of a killed write", lambda: self.resume(case), accept=accept,
                            may_write=(case / self.TASK,))

    def kills(self, count: int) -> None:
        """Real SIGKILLs at random steps, then a resume in a new process: it ends as the uninterrupted run."""
        steps = random.Random().sample(range(2, len(self.checkpoints)), k=min(count, len(self.checkpoints) - 2))
        for step in steps:
            case = self.rerun.folder()

            def killed_and_resumed(case=case, step=step):
                proc = subprocess.Popen([sys.executable, str(ROOT / "train" / "vtab.py"), *self.args(case)],
                                        env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                root = case / self.TASK / "checkpoints"
                names = (f"step_{step:08d}", f"{engine._STAGING_PREFIX}step_{step:08d}")
                deadline = time.time() + 120
                while time.time() < deadline and proc.poll() is None:
                    if any((root / n).exists() for n in names):
                        proc.send_signal(signal.SIGKILL)
                        break
                    time.sleep(0.001)
                if proc.wait() != -signal.SIGKILL:
                    return "the run ended before it could be killed"
                broken = [p.name for p in root.glob("step_*") if engine.checkpoint_problem(p)]
                if broken:
                    return f"incomplete checkpoints under final names: {broken}"
                done = subprocess.run([sys.executable, str(ROOT / "train" / "vtab.py"), *self.args(case, "--resume")],
                                      check=False, env=self.env(), capture_output=True, text=True)
                return f"resume exit {done.returncode}: {done.stderr[-300:]}" if done.returncode else \
                    self.same_as_reference(case)

            self.rerun.case("resume", f"SIGKILL at step {step}, resumed in a new process", killed_and_resumed,
                            may_write=(case,), accept=lambda problem: problem)


class TrainRecordCases:
    """The ``visadapt.train`` header entry: checked to be a JSON object on load, then read key by key by
    ``engine.evaluate_adapter_file`` (``visadapt-eval --data-root``) and ``export.recorded_model_spec`` (``visadapt
    export``). Full mode only: the closing note of the previous session lists these readers as still open."""

    def __init__(self, rerun: Rerun, adapters: AdapterCases, data_root: Path):
        self.rerun, self.adapters, self.data_root = rerun, adapters, data_root

    RECORDS: ClassVar[dict[str, dict]] = {
        "{}": {},
        "benchmark 5": {"benchmark": 5, "task": "orientation", "model": "vit_tiny_patch16_224", "pretrained": "none"},
        "no model": {"benchmark": "mini-vtab", "task": "orientation"},
        "task a list": {"benchmark": "mini-vtab", "task": ["a"], "model": "vit_tiny_patch16_224", "pretrained": "none"},
        "seed 'x'": {"benchmark": "mini-vtab", "task": "orientation", "model": "vit_tiny_patch16_224", "seed": "x",
                     "pretrained": "none"},
        "model an object": {"benchmark": "mini-vtab", "task": "orientation", "model": {"a": 1}, "pretrained": "none"},
        "input_size 'big'": {"benchmark": "mini-vtab", "task": "orientation", "model": "vit_tiny_patch16_224",
                             "pretrained": "none", "input_size": "big"},
    }

    def run(self) -> None:
        from visadapt import export
        from visadapt.cli import main as visadapt_main
        from visadapt.eval.cli import main as eval_main

        for name, record in self.RECORDS.items():
            folder = self.rerun.folder()
            path = write_crafted(folder / "adapter.safetensors", self.adapters.tensors,
                                 {**self.adapters.meta, io.TRAIN_METADATA: json.dumps(record)})
            self.rerun.case("training record", f"evaluate_adapter_file, {name}",
                            lambda p=path: engine.evaluate_adapter_file(p, data_root=self.data_root),
                            names=(str(path),))
            self.rerun.case("training record", f"recorded_model_spec, {name}",
                            lambda p=path: export.recorded_model_spec(io.read_adapter_file(p)[1], p),
                            names=(str(path),), accept=lambda spec: None if spec[0] is None or isinstance(
                                spec[0], str) and isinstance(spec[2], int) else f"returned {spec}")

            def cli(main, argv):
                out, err = pyio.StringIO(), pyio.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(argv)
                return code, err.getvalue()

            def one_error_line(value, path=path):
                code, err = value
                if code == 0:
                    return None
                lines = [line for line in err.splitlines() if "error" in line]
                return None if lines and str(path) in lines[-1] and "Traceback" not in err else \
                    f"RAW: exit {code} without one error line naming the file: {err[-300:]!r}"

            self.rerun.case("training record", f"visadapt-eval CLI, {name}",
                            lambda p=path: cli(eval_main, ["--benchmark", "mini-vtab", "--data-root",
                                                           str(self.data_root), "--adapters", str(p)]),
                            names=(str(path),), accept=one_error_line)
            self.rerun.case("training record", f"visadapt export CLI, {name}",
                            lambda p=path, f=folder: cli(visadapt_main, ["export", str(p), "--to", str(f / "out"),
                                                                      "--pretrained", "none"]),
                            names=(str(path),), accept=one_error_line, may_write=(folder / "out",))


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases of every category (for the test suite)")
    parser.add_argument("--kills", type=int, default=3, help="real SIGKILL-and-resume runs (full mode)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # torch says so when a crafted random_states_0.pkl is refused by its weights_only unpickler: expected here
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hostile-rerun-") as folder:
        rerun = Rerun(Path(folder), quick=args.quick)
        adapters = AdapterCases(rerun)
        adapters.header_fields()
        adapters.config_fields()
        adapters.allocation()
        adapters.truncations()
        adapters.heads()
        adapters.unet()
        adapters.inspect()
        adapters.pickles()
        data = DataCases(rerun)
        data.split_paths()
        data.images()
        data.cache()
        data.concurrent_generation()
        writes = WriteCases(rerun)
        writes.killed_saves()
        writes.permissions()
        if not args.quick:
            writes.canonical_bytes()
        resume = ResumeCases(rerun)
        resume.run_permissions()
        resume.checkpoint_files()
        resume.real_resumes()
        if not args.quick:
            resume.kills(args.kills)
            TrainRecordCases(rerun, adapters, resume.data).run()
    print(rerun.table())
    print(f"{len(rerun.results)} cases in {time.time() - started:.1f} s ({'quick' if args.quick else 'full'} mode)")
    return 0 if all(r.verdict == "clean" for r in rerun.results) else 1


if __name__ == "__main__":
    sys.exit(main())
