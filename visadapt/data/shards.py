"""Verified, resumable image shards: how generated image pools are written to disk.

Used by ``train/selma_data.py`` (images for each SELMA skill's prompts) and ``train/ppap.py`` (PPAP's
unlabeled pool). Layout, which :class:`visadapt.diffusion.ImagePromptFolder` reads::

    <folder>/shard_00000/00000.png ...      shard_size images per shard
    <folder>/shard_00000/metadata.jsonl     {"file_name": "00000.png", "text": prompt}
    <folder>/shard_00000/manifest.json      the generation settings, prompts and SHA-256 of every image

A shard is written into a temporary folder and renamed into place once complete, manifest last. A second run
skips every shard whose manifest records the same settings and prompts and whose images still match their
hashes, and regenerates any other (interrupted, corrupted, or made with other settings).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from visadapt.progress import Progress

SHARD_MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_is_complete(folder: Path, settings: dict, prompts: list[str]) -> bool:
    """Whether ``folder`` holds the finished shard for ``settings`` and ``prompts``, every image hash verified."""
    try:
        manifest = json.loads((folder / SHARD_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("settings") != settings or manifest.get("prompts") != prompts:
        return False
    files = manifest.get("files", {})
    return len(files) == len(prompts) and all((folder / name).is_file() and _sha256(folder / name) == digest
                                              for name, digest in files.items())


def write_image_shards(render, prompts: list[str], folder: Path, settings: dict, *, shard_size: int = 100,
                       batch_size: int = 4, seed: int = 0, progress: Progress | None = None) -> dict[str, int]:
    """Write one image per prompt into verified, resumable shards under ``folder``.

    ``render(prompts, generators) -> list[PIL.Image]`` draws one image per prompt, image ``i`` from the torch
    generator seeded ``seed * 1_000_003 + i`` alone (so a regenerated shard equals the lost one). ``settings``
    (JSON) is recorded in every shard manifest; a shard with the same settings and prompts whose images match
    their hashes is skipped. An unconditional pool passes empty prompts. Returns ``{"written", "skipped"}`` shards.

    ``progress`` counts every image (a skipped shard's at once), e.g. one :class:`visadapt.progress.Progress`
    over a whole job of several folders; without it, a bar of this folder's images is shown.
    """
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
    if progress is None:
        with Progress(total=len(prompts), desc=folder.name, unit="images") as own:
            return write_image_shards(render, prompts, folder, settings, shard_size=shard_size,
                                      batch_size=batch_size, seed=seed, progress=own)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped": 0}
    for shard_index, start in enumerate(range(0, len(prompts), shard_size)):
        shard_prompts = prompts[start:start + shard_size]
        shard = folder / f"shard_{shard_index:05d}"
        if shard_is_complete(shard, settings, shard_prompts):
            counts["skipped"] += 1
            progress.update(len(shard_prompts))
            continue
        tmp = folder / f".{shard.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            files, lines = {}, []
            for batch_start in range(0, len(shard_prompts), batch_size):
                batch = shard_prompts[batch_start:batch_start + batch_size]
                generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + batch_start + j)
                              for j in range(len(batch))]
                images = render(batch, generators)
                for j, (image, prompt) in enumerate(zip(images, batch, strict=True)):
                    name = f"{start + batch_start + j:05d}.png"
                    image.save(tmp / name)
                    files[name] = _sha256(tmp / name)
                    lines.append(json.dumps({"file_name": name, "text": prompt}))
                    progress.update(1)
            (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            (tmp / SHARD_MANIFEST).write_text(json.dumps({"settings": settings, "prompts": shard_prompts,
                                                          "files": files}, indent=1))
            if shard.exists():
                shutil.rmtree(shard)
            os.replace(tmp, shard)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        counts["written"] += 1
    return counts
