"""Loader throughput alone: decode every epoch vs the decoded-image cache, measured side by side in one run.

For each task of a synthetic VTAB-1k suite (NOAH layout, real JPEGs at each task's typical size; written
once by ``synthetic_vtab.py``, not timed) and each ``--workers`` value, the script iterates a DataLoader over
one split, moves every batch to the device and applies what training applies there:

* decode: ``ImageListDataset`` + ``vtab_transform`` (PIL decode, bicubic resize, ToTensor, Normalize in the
  workers), float32 batches to the device; one timed epoch (every epoch costs the same);
* cache: ``CachedImageDataset`` (uint8 items read from the cache file with pread), uint8 batches to the device, then
  its ``device_transform`` (/255, normalise) on the device; one untimed warm-up epoch, then ``--epochs``.

It also times the cache build (decode once with ``--cache-workers`` processes, write, checksum) and a re-open
(header + CRC-32 check of the whole file). Without a GPU the device is the CPU, so the cache's per-pixel
arithmetic runs in the main process and is part of its figure; ``cache uint8`` is the same loader without
that arithmetic (what a GPU receives; the GPU then does the arithmetic itself). Images/s are absolute;
``cache/decode`` is the ratio of the two measured in the same run. ``--consumer-imgs-per-s`` (the model's
training throughput, e.g. 3,000-4,000 imgs/s for ViT-B/16 bf16 on an H100) adds loader/consumer ratios:
above 1 the model, not the loader, is the limit.

Run from the repository root:  python eval/bench/dataloader.py [--tasks oxford_iiit_pet,svhn --workers 0,2]
(``--record`` also writes the README's table, eval/results/dataloader.json; then readme_figures.py --write)
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # synthetic_vtab.py next to this file

from machine import describe
from synthetic_vtab import NATIVE_SIZES, make_synthetic_vtab

from visadapt.data import cache as data_cache
from visadapt.data import vtab
from visadapt.data.tasks import resolve_tasks
from visadapt.data.transforms import resolve_normalization, vtab_transform


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None,
                   help="suite folder (default: <tmp>/visadapt-synthetic-vtab-<image size>-s<scale>)")
    p.add_argument("--scale", type=float, default=0.01,
                   help="test split sizes x scale (only --split test reads the test split)")
    p.add_argument("--tasks", default="oxford_iiit_pet,svhn",
                   help="VTAB task names or 'all' (default: a 500x375 photo task, a 32px one)")
    p.add_argument("--image-size", default="native",
                   help="stored JPEG size: 'native' (per task) or a square side")
    p.add_argument("--split", default="train800val200", choices=vtab.SPLITS, help="the split an epoch reads")
    p.add_argument("--input-size", type=int, default=224, help="side of the images the model gets")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader num_workers values")
    p.add_argument("--cache-workers", type=int, default=None, help="decode processes for the cache build")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs of the cache path (after one warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="repeats of each measurement; prints the median")
    p.add_argument("--normalize", default="imagenet", choices=("imagenet", "none"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--keep-cache", action="store_true", help="reuse a built cache instead of timing a build")
    p.add_argument("--consumer-imgs-per-s", type=float, default=None,
                   help="what the model consumes (imgs/s); adds loader/consumer ratios to the table")
    p.add_argument("--record", action="store_true",
                   help="also write the README table (block dataloader) into eval/results/dataloader.json; then "
                        "readme_figures.py --write")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(dataset, workers: int, batch_size: int, device: torch.device, device_transform, epochs: int,
                warmup: bool) -> float:
    """Images per second over ``epochs`` shuffled epochs of ``dataset``, each batch moved to ``device`` and
    passed through ``device_transform`` (if any); one untimed epoch first when ``warmup``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def one_epoch() -> int:
        seen = 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if device_transform is not None:
                images = device_transform(images)
            seen += images.shape[0]
        return seen

    if warmup:
        one_epoch()
    _sync(device)
    start = time.perf_counter()
    seen = sum(one_epoch() for _ in range(epochs))
    _sync(device)
    return seen / (time.perf_counter() - start)


def measure_task(root: Path, task: str, args, workers: list[int], device: torch.device, normalization,
                 cache_workers: int) -> tuple[tuple, list[tuple]]:
    """``(build row, [throughput row per workers value])`` of one task."""
    if not args.keep_cache:
        shutil.rmtree(root / task / data_cache.CACHE_DIRNAME, ignore_errors=True)
    options = {"input_size": args.input_size, "normalization": normalization, "workers": cache_workers}
    start = time.perf_counter()
    cached = data_cache.load_cached_split("vtab", root, task, args.split, **options)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = data_cache.load_cached_split("vtab", root, task, args.split, **options)
    open_s = time.perf_counter() - start
    build = (task, len(cached), build_s, open_s, cached.cache_path.stat().st_size / 2**20)
    decoded = vtab.load_split(root, "vtab", task, args.split, vtab_transform(args.input_size, normalization))
    rows = []
    for w in workers:
        decode, cache, raw = [], [], []
        for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits all three alike
            decode.append(loader_rate(decoded, w, args.batch_size, device, None, 1, warmup=False))
            cache.append(loader_rate(cached, w, args.batch_size, device, cached.device_transform, args.epochs,
                                     warmup=True))
            raw.append(loader_rate(cached, w, args.batch_size, device, None, args.epochs, warmup=True))
        rows.append((task, len(cached), w, *(statistics.median(v) for v in (decode, cache, raw))))
        print(f"  measured {task} workers={w}", flush=True)
    return build, rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = [int(w) for w in args.workers.split(",")]
    tasks = [info.name for info in resolve_tasks("vtab", args.tasks)]
    default_root = Path(tempfile.gettempdir()) / f"visadapt-synthetic-vtab-{args.image_size}-s{args.scale}"
    root = Path(args.root) if args.root else default_root
    normalization = resolve_normalization(args.normalize)
    cache_workers = args.cache_workers or data_cache.default_workers()

    print(f"visadapt loader benchmark, {datetime.date.today().isoformat()}")
    print(describe())
    print(f"split {args.split}, {args.input_size} px to the model, batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}, normalisation {args.normalize}")
    started = time.perf_counter()
    make_synthetic_vtab(root, scale=args.scale, image_size=args.image_size, tasks=tasks, verbose=True)
    print(f"synthetic suite ready in {root} ({time.perf_counter() - started:.0f} s, not in any figure)\n")

    builds, rows = [], []
    for task in tasks:
        build, task_rows = measure_task(root, task, args, workers, device, normalization, cache_workers)
        builds.append(build)
        rows += task_rows

    native = args.image_size == "native"
    size = {t: "x".join(map(str, NATIVE_SIZES[t])) if native else str(args.image_size) for t in tasks}
    consumer = args.consumer_imgs_per_s
    print(f"\nLoader imgs/s, split {args.split}, {args.input_size} px, batch {args.batch_size}, "
          f"device {device}, median of {args.repeats}")
    extra = " decode/consumer | cache/consumer |" if consumer else ""
    print(f"| task | JPEG size | images | workers | decode | cache | cache/decode | cache uint8 |{extra}")
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if consumer else ""))
    for task, n, w, dec, cac, raw in rows:
        line = f"| {task} | {size[task]} | {n} | {w} | {dec:.0f} | {cac:.0f} | {cac / dec:.1f}x | {raw:.0f} |"
        if consumer:
            line += f" {dec / consumer:.2f}x | {cac / consumer:.2f}x |"
        print(line)
    print(f"\nCache build (decode once with {cache_workers} processes, write, CRC-32) and re-open "
          "(split file, image stats, header and CRC-32 check of the whole file)")
    print("| task | images | build s | build imgs/s | re-open s | MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for task, n, build_s, open_s, mib in builds:
        print(f"| {task} | {n} | {build_s:.2f} | {n / build_s:.0f} | {open_s:.3f} | {mib:.1f} |")
    if args.record:
        import readme_figures  # beside this script (eval/bench/), imported only to record

        # README row ids: task and workers; cells after the label: workers, decode, cache, ratio, cache uint8
        readme_figures.record_table("dataloader", [
            {"id": f"{task}-{w}", "values": [w, dec, cac, cac / dec, raw]} for task, _, w, dec, cac, raw in rows],
            readme_figures.bench_command("dataloader.py", sys.argv[1:] if argv is None else argv),
            readme_figures.machine_phrase(str(device)))


if __name__ == "__main__":
    main()
