"""A synthetic VTAB-1k suite on disk: the NOAH layout, real JPEGs, VTAB-1k's split sizes (for benchmarks).

What a benchmark of the data path needs from VTAB-1k is its shape, not its content: 19 task folders in the
NOAH layout (``<root>/<task>/images/...jpg``, ``train800.txt``, ``val200.txt``, ``train800val200.txt``,
``test.txt``), 1,000 training images per task (800 + 200), the test split sizes of the benchmark, labels in
range for each task's class count, and JPEGs of about the sizes the real tasks have, so that decoding costs
what it costs on the real suite. The images are quick procedural content (a smooth colour field, film-grain
noise and one bar whose position follows the label); they are not meant to be learnable to any particular
accuracy.

    python eval/bench/synthetic_vtab.py --root /data/synthetic-vtab --scale 1.0     # all 406,904 images

``make_synthetic_vtab`` is idempotent: each task folder is written to a temporary folder, completed with a
marker file and renamed into place; a suite whose markers match is reused, a mismatching task is rewritten.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from visadapt.data.tasks import VTAB1K_TEST_SIZES, VTAB_TASKS, resolve_tasks

TRAIN_SIZES = {"train800": 800, "val200": 200}

# Typical stored image size (width, height) per task as the TFDS versions VTAB-1k is dumped from serve them
# (the originals vary within a task; these are representative, so that decoding costs about what it does on
# the real suite): CIFAR/SVHN 32 px, dSprites 64 px, sNORB and Camelyon 96 px, EuroSAT 64 px, Resisc45 256 px,
# Retinopathy's btgraham-300 crops, CLEVR 480x320, DMLab 480x360, KITTI 1242x375, photos about 500x375.
NATIVE_SIZES = {
    "cifar100": (32, 32), "caltech101": (300, 200), "dtd": (500, 400), "oxford_flowers102": (667, 500),
    "oxford_iiit_pet": (500, 375), "svhn": (32, 32), "sun397": (500, 375), "patch_camelyon": (96, 96),
    "eurosat": (64, 64), "resisc45": (256, 256), "diabetic_retinopathy": (300, 300),
    "clevr_count": (480, 320), "clevr_dist": (480, 320), "dmlab": (480, 360), "kitti": (1242, 375),
    "dsprites_loc": (64, 64), "dsprites_ori": (64, 64), "smallnorb_azi": (96, 96), "smallnorb_ele": (96, 96),
}
# Bump when the drawing changes, so that folders written by an older version are rewritten.
GENERATOR_VERSION = 1
MARKER = ".synthetic_vtab.json"
# PIL's default JPEG quality, what a plain Image.save(path) in a dump script writes.
JPEG_QUALITY = 75
_CHUNK = 64

assert set(VTAB1K_TEST_SIZES) == set(VTAB_TASKS) == set(NATIVE_SIZES)


def split_sizes(task: str, scale: float = 1.0, min_per_class: int = 2) -> dict[str, int]:
    """``{split: image count}`` of one task: 800 + 200 training images, and the test size times ``scale``
    (at least ``min_per_class`` per class, so every class is present)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0 (1.0 = VTAB-1k's test sizes), got {scale}")
    test = max(round(VTAB1K_TEST_SIZES[task] * scale), min_per_class * VTAB_TASKS[task].num_classes)
    return {**TRAIN_SIZES, "test": test}


def _size_of(task: str, image_size) -> tuple[int, int]:
    if image_size == "native":
        return NATIVE_SIZES[task]
    side = int(image_size)
    if side < 8:
        raise ValueError(f"image_size must be 'native' or a side >= 8 px, got {image_size!r}")
    return side, side


_GRAIN: Image.Image | None = None


def _grain(w: int, h: int) -> Image.Image:
    """A noise tile of at least ``w x h``, made once per process and cropped at random offsets (generating
    noise per image with Image.effect_noise would cost more than encoding the JPEG)."""
    global _GRAIN
    if _GRAIN is None or _GRAIN.width < w or _GRAIN.height < h:
        _GRAIN = Image.effect_noise((max(w, 1400), max(h, 600)), 10)
    return _GRAIN


def render(rng: np.random.Generator, size: tuple[int, int], label: int, num_classes: int) -> Image.Image:
    """One RGB image of ``size`` (width, height): smooth colours, grain, a bar placed by the label."""
    w, h = size
    field = rng.integers(0, 256, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.BILINEAR)
    grain = _grain(w, h)
    x0, y0 = int(rng.integers(0, grain.width - w + 1)), int(rng.integers(0, grain.height - h + 1))
    noise = grain.crop((x0, y0, x0 + w, y0 + h)).convert("RGB")
    img = ImageChops.add(img, noise, 1.0, -128)
    cx = (label + 0.5) / num_classes * w
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    half = max(1, w // 40)
    ImageDraw.Draw(img).rectangle([cx - half, h * 0.25, cx + half, h * 0.75], fill=colour)
    return img


def _write_chunk(folder: str, task: str, split_index: int, split: str, start: int, labels: list[int],
                 size: tuple[int, int], seed: int) -> None:
    num_classes = VTAB_TASKS[task].num_classes
    task_index = list(VTAB_TASKS).index(task)
    for offset, label in enumerate(labels):
        i = start + offset
        rng = np.random.default_rng([seed, task_index, split_index, i])
        render(rng, size, label, num_classes).save(Path(folder) / "images" / split / f"{i:06d}.jpg",
                                                   quality=JPEG_QUALITY)


def _wanted(task: str, scale: float, image_size, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "task": task, "seed": seed, "scale": scale,
            "image_size": image_size if image_size == "native" else int(image_size),
            "split_sizes": split_sizes(task, scale)}


def _is_complete(task_dir: Path, wanted: dict) -> bool:
    marker = task_dir / MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text()) == wanted
    except (OSError, ValueError):
        return False


def make_synthetic_vtab(root: str | os.PathLike, scale: float = 1.0, image_size: int | str = "native",
                        seed: int = 0, workers: int | None = None, tasks=None, verbose: bool = False) -> Path:
    """Write (or reuse) a synthetic VTAB-1k suite under ``root`` and return ``root``.

    Args:
        root: the data root; task folders go to ``<root>/<task>/`` (canonical VTAB task names).
        scale: multiplies each task's test split size (``1.0``: the real sizes, ~388k test images in all);
            every class keeps at least 2 test images. Training splits are always 800 + 200.
        image_size: ``"native"`` (each task's typical stored size, :data:`NATIVE_SIZES`) or one square side.
        seed: content and labels are a function of the seed (and task, split, index).
        workers: encoding processes (default: the CPUs available).
        tasks: task names or aliases (list or comma-separated string); ``None`` or ``"all"``: all 19.
        verbose: print one line per task written.

    Labels are balanced per split (a random permutation of ``0..C-1`` repeated). A task folder whose marker
    (written last, inside the folder, before the folder is renamed into place) matches these arguments is
    reused untouched, its decoded-image caches included; any other folder of that task is replaced.
    """
    root = Path(root)
    names = [info.name for info in resolve_tasks("vtab", tasks if tasks is not None else "all")]
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count())
    todo = [t for t in names if not _is_complete(root / t, _wanted(t, scale, image_size, seed))]
    if not todo:
        return root
    root.mkdir(parents=True, exist_ok=True)
    # fork: workers start at once with the modules loaded (spawn where fork does not exist). One worker: a
    # thread of this process, so that nothing needs pickling (the module may be loaded from a file path).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ThreadPoolExecutor(1) if workers == 1 else \
        ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    with executor as pool:
        for task in todo:
            started = time.perf_counter()
            wanted = _wanted(task, scale, image_size, seed)
            size = _size_of(task, image_size)
            num_classes = VTAB_TASKS[task].num_classes
            tmp = root / f".{task}.{uuid.uuid4().hex[:8]}.tmp"
            lines: dict[str, list[str]] = {}
            futures = []
            for split_index, (split, count) in enumerate(wanted["split_sizes"].items()):
                (tmp / "images" / split).mkdir(parents=True)
                rng = np.random.default_rng([seed, list(VTAB_TASKS).index(task), split_index, 10**6])
                labels = rng.permutation(np.resize(np.arange(num_classes), count)).tolist()
                lines[split] = [f"images/{split}/{i:06d}.jpg {label}\n" for i, label in enumerate(labels)]
                futures += [pool.submit(_write_chunk, str(tmp), task, split_index, split, s,
                                        labels[s:s + _CHUNK], size, seed)
                            for s in range(0, count, _CHUNK)]
            try:
                for future in futures:
                    future.result()
                lines["train800val200"] = lines["train800"] + lines["val200"]
                for split, rows in lines.items():
                    (tmp / f"{split}.txt").write_text("".join(rows))
                (tmp / MARKER).write_text(json.dumps(wanted, indent=1))
                final = root / task
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if verbose:
                total = sum(wanted["split_sizes"].values())
                took = time.perf_counter() - started
                print(f"  {task}: {total} JPEGs ({size[0]}x{size[1]}) in {took:.1f} s", flush=True)
    return root


def suite_size(scale: float = 1.0, tasks=None) -> int:
    """Total images (train800 + val200 + test) that ``make_synthetic_vtab`` writes for these arguments."""
    names = [info.name for info in resolve_tasks("vtab", tasks if tasks is not None else "all")]
    return sum(sum(split_sizes(t, scale).values()) for t in names)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="data root to write the task folders into")
    p.add_argument("--scale", type=float, default=1.0, help="test split sizes x scale (1.0: VTAB-1k's)")
    p.add_argument("--image-size", default="native", help="'native' (per-task typical size) or a square side")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    print(f"synthetic VTAB-1k: {suite_size(args.scale, args.tasks)} images -> {args.root}")
    make_synthetic_vtab(args.root, args.scale, args.image_size, args.seed, args.workers, args.tasks,
                        verbose=True)


if __name__ == "__main__":
    main()
