"""FGVC (CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) in the VPT JSON layout.

On disk, with the split files VPT distributes::

    <root>/<dataset>/
        train.json  val.json  test.json       each {"<image path relative to the image dir>": <class id>}
        <image dir>/...

The image directory differs per dataset (VPT ``json_dataset.py``): ``images/`` for CUB and NABirds,
``Images/`` for Stanford Dogs, the dataset folder itself for Oxford Flowers and Stanford Cars. Class ids in
the JSON files are arbitrary integers (often 1-based or sparse); like VPT we map them to ``0..C-1`` in
sorted order, over the union of all split files present so that train, val and test agree.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from visadapt.data.errors import DatasetError
from visadapt.data.tasks import resolve_task
from visadapt.data.vtab import ImageListDataset, find_task_dir

SPLITS = ("train", "val", "test")
# Image directory relative to the dataset folder, keyed by canonical task name ("" = the folder itself).
IMAGE_DIRS = {"cub": "images", "nabirds": "images", "stanford_dogs": "Images",
              "oxford_flowers": "", "stanford_cars": ""}

_FIX = ("Download the VPT split files (train/val/test.json; mirror: huggingface.co/datasets/XiN0919/FGVC) "
        "into the dataset folder next to the original images")


def _read_split_json(path: Path) -> dict[str, int]:
    """``{relative image path: raw class id}`` from one split file, with every key and value checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); expected an object "
                           f"{{\"<relative image path>\": <class id>}}. {_FIX}") from err
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not a UTF-8 text file ({err}). {_FIX}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path} holds a JSON {type(data).__name__}, not an object "
                           f"{{\"<relative image path>\": <class id>}}. {_FIX}")
    if not data:
        raise DatasetError(f"{path} lists no images (an empty JSON object). {_FIX}")
    for key, value in data.items():
        # bool is an int subclass in Python; a true/false class id is a broken file, not class 1/0.
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{path}: key {key!r} has class id {value!r} ({type(value).__name__}); "
                               f"class ids must be JSON integers. {_FIX}")
        if not key.strip():
            raise DatasetError(f"{path}: empty image path (key {key!r}) with class id {value}. {_FIX}")
    return data


def load_split(root: str | os.PathLike, task: str, splits: str | Sequence[str],
               transform: Callable | None = None) -> ImageListDataset:
    """One FGVC split, or several concatenated (``("train", "val")`` for final runs), as one dataset.

    Args:
        root: the folder holding the dataset folders (``<root>/cub/train.json``, ...).
        task: dataset name or alias (``cub``, ``CUB_200_2011``, ``stanford_cars``, ...).
        splits: ``train``, ``val``, ``test``, or a sequence of them; samples keep that order.
        transform: applied to each RGB PIL image.

    Class ids are remapped to ``0..C-1`` by sorting the distinct ids of all split files present (not only
    the ones asked for), and their number must equal the task's class count.
    """
    wanted = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown or not wanted:
        raise DatasetError(f"unknown FGVC split(s) {unknown or wanted!r}; choose from {', '.join(SPLITS)}")
    info = resolve_task("fgvc", task)
    task_dir = find_task_dir(root, info)
    files = {s: task_dir / f"{s}.json" for s in SPLITS}
    for split in wanted:
        if not files[split].is_file():
            found = sorted(p.name for p in task_dir.glob("*.json"))
            raise DatasetError(
                f"split file {files[split]} does not exist (found: {', '.join(found) or 'no .json files'}); "
                f"expected the VPT layout {task_dir}/{{{','.join(SPLITS)}}}.json, each "
                f"{{\"<image path relative to {task_dir / IMAGE_DIRS[info.name]}>\": <class id>}}. {_FIX}"
            )
    tables = {s: _read_split_json(f) for s, f in files.items() if f.is_file()}
    ids = sorted({v for table in tables.values() for v in table.values()})
    if len(ids) != info.num_classes:
        raise DatasetError(
            f"{', '.join(str(files[s]) for s in tables)} together hold {len(ids)} distinct class ids but "
            f"{info.name!r} has {info.num_classes} classes; the files belong to another dataset or are "
            f"incomplete. {_FIX}"
        )
    remap = {raw: i for i, raw in enumerate(ids)}
    image_dir = task_dir / IMAGE_DIRS[info.name]
    samples: list[tuple[Path, int]] = []
    origins: list[str] = []
    for split in wanted:
        for key, raw in tables[split].items():
            samples.append((image_dir / key, remap[raw]))
            origins.append(f"{files[split]} key {key!r}")
    dataset = ImageListDataset(samples, info.num_classes, origins, transform,
                               name=f"{info.name}/{'+'.join(wanted)}")
    dataset.check_files(f"JSON keys are paths relative to {image_dir}; check the data root, or restore the "
                        "original images of the dataset there")
    return dataset
