"""Hostile adapter files and faults: every crafted input gets a clear error naming it, leaves every tensor of the
model as it was, and leaves no partial file behind; a header never drives an allocation or a write outside the
adapter and the model's classifier.

Property tests use ``hypothesis`` with few, bounded examples (tiny models from ``tests/tiny_models.py``).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import tiny_models as tm
import torch

import visadapt
from visadapt import inject, io

ROOT = Path(__file__).resolve().parents[1]


def lora_vit(seed: int = 0, **attach):
    """A tiny ViT with a LoRA (non-zero B) and its 5-class head attached, deterministic from ``seed``."""
    torch.manual_seed(seed)
    model = tm.vit().eval()
    visadapt.attach(model, "lora", rank=2, head="head", **attach)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if inject.ADAPTERS_ATTR in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


# ------------------------------------------------------------------------------------------------ writing


def test_adapter_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = visadapt.save_adapter(lora_vit(), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # safetensors' own writer gives 0600 whatever the umask


_SAVE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch, visadapt
    from test_hostile_inputs import lora_vit
    path = visadapt.save_adapter(lora_vit(seed=3), {path!r}, metadata={{"visadapt.train": '{{"task": "x"}}',
                                                                      "b": "1", "a": "2", "z": "3"}})
""")


def save_in_subprocess(path: Path, env_extra: dict[str, str] | None = None) -> None:
    env = dict(os.environ, **(env_extra or {}))
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT.format(tests=str(ROOT / "tests"), path=str(path))],
                   check=True, env=env, cwd=ROOT)


def test_the_same_adapter_saved_by_two_processes_gives_the_same_bytes(tmp_path):
    # PYTHONHASHSEED differs too; the metadata order used to follow a per-process Rust HashMap seed
    save_in_subprocess(tmp_path / "one.safetensors", {"PYTHONHASHSEED": "1"})
    save_in_subprocess(tmp_path / "two.safetensors", {"PYTHONHASHSEED": "2"})
    one, two = (tmp_path / "one.safetensors").read_bytes(), (tmp_path / "two.safetensors").read_bytes()
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    header = one[8:8 + int.from_bytes(one[:8], "little")]
    assert header.index(b'"a":"2"') < header.index(b'"b":"1"') < header.index(b'"z":"3"')  # sorted keys
    tensors, meta = io.read_adapter_file(tmp_path / "one.safetensors")  # and safetensors reads it as written
    assert meta["a"] == "2" and len(tensors) == 10


_KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import visadapt
    from visadapt import io
    from test_hostile_inputs import lora_vit
    def killed(fd):  # the temporary file is written; the process dies before it is renamed
        os.kill(os.getpid(), signal.SIGKILL)
    io.os.fsync = killed
    visadapt.save_adapter(lora_vit(), {path!r})
""")


def test_a_killed_save_leaves_a_temporary_file_that_the_next_save_deletes(tmp_path):
    path = tmp_path / "a.safetensors"
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE_SCRIPT.format(tests=str(ROOT / "tests"),
                                                                              path=str(path))], check=False,
                            cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".a.safetensors.") and leftover.name.endswith(".tmp")
    other_host = tmp_path / ".a.safetensors.another-machine-1-0123abcd.tmp"  # a writer elsewhere: kept
    other_host.write_bytes(b"")
    mine = tmp_path / f".a.safetensors.{io._host_tag()}-{os.getpid()}-0123abcd.tmp"  # a live writer: kept
    mine.write_bytes(b"")
    visadapt.save_adapter(lora_vit(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, mine.name, "a.safetensors"])
    io.read_adapter_file(path)
