"""Benchmark data: the VTAB-1k and FGVC folder datasets, the procedural mini-VTAB and the transforms."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from visadapt.data import fgvc, vtab
from visadapt.data.errors import DatasetError
from visadapt.data.tasks import benchmark_tasks
from visadapt.data.transforms import fgvc_transforms, resolve_normalization, vtab_transform
from visadapt.data.vtab import ImageListDataset
from visadapt.names import PROTOCOLS  # which splits train and evaluate under each protocol

__all__ = ["PROTOCOLS", "DatasetError", "ImageListDataset", "build_datasets", "resolve_normalization"]



def build_datasets(benchmark: str, data_root: str | os.PathLike, task: str, *, protocol: str = "final",
                   input_size: int, normalization=None, cache: bool | str = False,
                   cache_dir: str | os.PathLike | None = None,
                   cache_workers: int | None = None) -> tuple[Dataset, Dataset]:
    """``(train_dataset, eval_dataset)`` of one benchmark task under ``protocol``.

    Args:
        benchmark: ``vtab``, ``mini-vtab`` (both the NOAH image-list layout) or ``fgvc`` (VPT JSON layout).
        data_root: the folder holding the task folders, e.g. ``<data_root>/cifar/train800.txt``.
        task: task name or alias (``cifar100``/``cifar``, ``cub``, ``digits``, ...).
        protocol: ``final`` (VTAB: train800val200 -> test; FGVC: train+val -> test) or ``tune``
            (VTAB: train800 -> val200; FGVC: train -> val).
        input_size: side of the square image tensors, ``(3, input_size, input_size)``.
        normalization: ``(mean, std)`` from :func:`resolve_normalization`, ``None`` for ``[0, 1]`` inputs,
            or a choice string ``imagenet``/``none`` resolved here.
        cache: serve both datasets from the decoded-image cache (:mod:`visadapt.data.cache`; built on first
            use, rebuilt when stale or corrupt) instead of decoding every image every epoch. ``"train"``: the
            training split only, the evaluation split decoded as usual (a split evaluated once gains nothing
            from a cache: building it costs the same decode plus a write).
        cache_dir: with ``cache``: keep the caches under ``<cache_dir>/<benchmark>/<task>/`` instead of
            ``<task folder>/.visadapt_cache/`` (for data folders that are not writable).
        cache_workers: with ``cache``: decode processes for a build (default: the CPUs available, at most 16).

    Without ``cache`` both datasets are :class:`ImageListDataset` (``num_classes``, ``targets``, ``len()``)
    yielding float tensors; every listed image has been checked to exist. With ``cache`` both are
    :class:`~visadapt.data.cache.CachedImageDataset` with the same samples, labels and order, yielding
    ``uint8 (3, H, W)`` tensors; their ``device_transform`` (applied by the engine to each batch on the
    device) does the scaling, the normalisation and, for FGVC training, the flip.
    """
    benchmark_tasks(benchmark)  # unknown benchmark -> error listing the known ones
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)} "
                         "(final: train on train+val, evaluate on test; tune: train on train, evaluate on val)")
    if isinstance(normalization, str):
        normalization = resolve_normalization(normalization)
    if not cache and (cache_dir is not None or cache_workers is not None):
        raise ValueError("cache_dir and cache_workers only apply to the decoded-image cache; pass cache=True "
                         "as well (on the command line --cache-dir enables the cache)")
    if cache not in (True, False, "train"):
        raise ValueError(f"cache={cache!r}: use True (every split), 'train' (the training split only) or False")
    kind = "fgvc" if benchmark == "fgvc" else "vtab"
    train_split, eval_split = PROTOCOLS[protocol][kind]

    def cached(split, train: bool) -> Dataset:
        # Imported here: visadapt.data.cache imports this package's vtab and fgvc modules.
        from visadapt.data.cache import load_cached_split

        return load_cached_split(benchmark, data_root, task, split, train=train, input_size=input_size,
                                 normalization=normalization, cache_dir=cache_dir, workers=cache_workers)

    if kind == "fgvc":
        train_tf, eval_tf = fgvc_transforms(input_size, normalization)
        train = cached(train_split, True) if cache else fgvc.load_split(data_root, task, train_split, train_tf)
        evaluation = cached(eval_split, False) if cache is True else fgvc.load_split(data_root, task, eval_split,
                                                                                      eval_tf)
        return train, evaluation
    tf = vtab_transform(input_size, normalization)
    train = cached(train_split, True) if cache else vtab.load_split(data_root, benchmark, task, train_split, tf)
    evaluation = (cached(eval_split, False) if cache is True
                  else vtab.load_split(data_root, benchmark, task, eval_split, tf))
    return train, evaluation
