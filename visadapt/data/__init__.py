"""Benchmark data: the VTAB-1k and FGVC folder datasets, the procedural mini-VTAB and the transforms."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from visadapt.data import fgvc, vtab
from visadapt.data.errors import DatasetError
from visadapt.data.tasks import benchmark_tasks
from visadapt.data.transforms import fgvc_transforms, resolve_normalization, vtab_transform
from visadapt.data.vtab import ImageListDataset

__all__ = ["PROTOCOLS", "DatasetError", "ImageListDataset", "build_datasets", "resolve_normalization"]

# Which splits train and evaluate under each protocol: "final" reports test accuracy after training on
# train+val (VTAB-1k: the 1000-image train800val200); "tune" is the hyper-parameter search split.
PROTOCOLS = {
    "final": {"vtab": ("train800val200", "test"), "fgvc": (("train", "val"), "test")},
    "tune": {"vtab": ("train800", "val200"), "fgvc": ("train", "val")},
}


def build_datasets(benchmark: str, data_root: str | os.PathLike, task: str, *, protocol: str = "final",
                   input_size: int, normalization=None) -> tuple[Dataset, Dataset]:
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

    Both datasets are :class:`ImageListDataset` (``num_classes``, ``targets``, ``len()``); every listed image
    has been checked to exist.
    """
    benchmark_tasks(benchmark)  # unknown benchmark -> error listing the known ones
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)} "
                         "(final: train on train+val, evaluate on test; tune: train on train, evaluate on val)")
    if isinstance(normalization, str):
        normalization = resolve_normalization(normalization)
    if benchmark == "fgvc":
        train_split, eval_split = PROTOCOLS[protocol]["fgvc"]
        train_tf, eval_tf = fgvc_transforms(input_size, normalization)
        return (fgvc.load_split(data_root, task, train_split, train_tf),
                fgvc.load_split(data_root, task, eval_split, eval_tf))
    train_split, eval_split = PROTOCOLS[protocol]["vtab"]
    tf = vtab_transform(input_size, normalization)
    return (vtab.load_split(data_root, benchmark, task, train_split, tf),
            vtab.load_split(data_root, benchmark, task, eval_split, tf))
