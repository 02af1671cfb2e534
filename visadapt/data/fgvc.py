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
from visadapt.data.vtab import ImageListDataset, confined_image_path, find_task_dir

SPLITS = ("train", "val", "test")
# Image directory relative to the dataset folder, keyed by canonical task name ("" = the folder itself).
IMAGE_DIRS = {"cub": "images", "nabirds": "images", "stanford_dogs": "Images",
              "oxford_flowers": "", "stanford_cars": ""}

_FIX = ("Download the VPT split files (train/val/test.json; mirror: huggingface.co/datasets/XiN0919/FGVC) "
        "into the dataset folder next to the original images")


def _key_line(text: str, key: str) -> int | None:
    """1-based line of the first occurrence of JSON key ``key`` in ``text`` (``None`` if not found verbatim)."""
    for encoded in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        at = text.find(encoded + ":")
        if at < 0:
            at = text.find(encoded)
        if at >= 0:
            return text.count("\n", 0, at) + 1
    return None


def read_split_json(path: Path, problems: list[tuple[Path, int | None, str]] | None = None,
                    image_dir: Path | None = None, root: Path | None = None) -> dict[str, int]:
    """``{relative image path: raw class id}`` from one split file, with every key and value checked.

    ``image_dir``, ``root``: the folder the keys are relative to and the data root; when both are given, a key
    leading outside ``root`` is a defect (:func:`visadapt.data.vtab.confined_image_path`).

    ``problems``: ``None`` raises :class:`DatasetError` at the first defect (what the loader wants). A list
    collects every defect as ``(path, line number or None, message)`` and drops the bad entries instead, so
    that ``visadapt-data verify`` reports them all in one run.
    """
    def bad(lineno: int | None, message: str, sep: str = " ") -> None:
        if problems is None:
            raise DatasetError(f"{path}:{lineno}: {message}" if lineno else f"{path}{sep}{message}")
        problems.append((path, lineno, message))

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except json.JSONDecodeError as err:
        bad(err.lineno, f"not valid JSON ({err.msg}); expected an object "
                        f"{{\"<relative image path>\": <class id>}}. {_FIX}")
        return {}
    except UnicodeDecodeError as err:
        bad(None, f"is not a UTF-8 text file ({err}). {_FIX}")
        return {}
    if not isinstance(data, dict):
        bad(None, f"holds a JSON {type(data).__name__}, not an object "
                  f"{{\"<relative image path>\": <class id>}}. {_FIX}")
        return {}
    if not data:
        bad(None, f"lists no images (an empty JSON object). {_FIX}")
    good: dict[str, int] = {}
    for key, value in data.items():
        # bool is an int subclass in Python; a true/false class id is a broken file, not class 1/0.
        if not isinstance(value, int) or isinstance(value, bool):
            where = None if problems is None else _key_line(text, key)
            bad(where, f"key {key!r} has class id {value!r} ({type(value).__name__}); "
                       f"class ids must be JSON integers. {_FIX}", sep=": ")
        elif not key.strip():
            where = None if problems is None else _key_line(text, key)
            bad(where, f"empty image path (key {key!r}) with class id {value}. {_FIX}", sep=": ")
        elif (escape := _escape(root, image_dir, key)) is not None:
            bad(_key_line(text, key), f"image path {key!r} {escape}; keys are paths relative to {image_dir} "
                                      "that stay inside the data root. Fix the key or remove the entry", sep=": ")
        else:
            good[key] = value
    return good


def _escape(root: Path | None, image_dir: Path | None, key: str) -> str | None:
    """Why ``key`` leads outside the data root ``root`` (``None`` if it does not, or nothing to check against)."""
    if root is None or image_dir is None:
        return None
    try:
        confined_image_path(root, image_dir, key)
    except ValueError as err:
        return str(err)
    return None


def class_id_map(tables: Sequence[dict[str, int]]) -> dict[int, int]:
    """``{raw class id: contiguous label}``: the distinct ids of all ``tables`` in sorted order (as VPT)."""
    return {raw: i for i, raw in enumerate(sorted({v for table in tables for v in table.values()}))}


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
    image_dir = task_dir / IMAGE_DIRS[info.name]
    tables = {s: read_split_json(f, image_dir=image_dir, root=Path(root)) for s, f in files.items() if f.is_file()}
    remap = class_id_map(list(tables.values()))
    if len(remap) != info.num_classes:
        raise DatasetError(
            f"{', '.join(str(files[s]) for s in tables)} together hold {len(remap)} distinct class ids but "
            f"{info.name!r} has {info.num_classes} classes; the files belong to another dataset or are "
            f"incomplete. {_FIX}"
        )
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
