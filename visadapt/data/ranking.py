"""Text-driven ranking data: the official CSV layout, per-instruction lists, and the mini-counting world.

**The CSV layout** (RankingAwareCLIP's ``CsvDataset``): tab-separated, a header row, columns

    filepath    title                         cname    value    [sample_weights_by_class]
    img/0.png   Rank the numbers of circle.   circle   3

``filepath`` relative to the CSV's folder (or absolute), ``title`` the instruction, ``cname`` the category the
instruction is about, ``value`` the target (a count, an age, a score), the optional last column a sampling
weight within the category. :class:`RankingTable` reads one file and reports every bad row at once.

**Training lists** (:class:`RankingLists`): every item is one list for one instruction, built as the official
sampler does: a random category, ``(1 - negative_ratio) * list_size`` of its images with their values, and
``negative_ratio * list_size`` images of *other* categories that get the instruction of the drawn category and
the value 0 ("images without apples under 'Rank the numbers of apple.'"). The official code rewrites the
negative's own caption by substituting the category name; here the negatives take the drawn category's
instruction itself, which is the same text whenever captions follow one template and stays well defined when
they do not.

**Mini-counting** (:func:`generate_mini_counting`): 32x32 images holding 1-6 copies of one shape (circle,
square, triangle or star; random sizes, angles, colours and textured backgrounds), instruction "Rank the
numbers of <shape>.", value = the count: a procedural stand-in for the paper's COCO counting task.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visadapt.data.errors import DatasetError
from visadapt.data.generated import write_generated
from visadapt.data.procedural import _background, _finish, _object
from visadapt.data.transforms import pil_to_tensor
from visadapt.data.vtab import decode_image
from visadapt.progress import Progress

REQUIRED_COLUMNS = ("filepath", "title", "cname", "value")
WEIGHT_COLUMN = "sample_weights_by_class"
_SHOWN = 8


@dataclass(frozen=True)
class RankingRow:
    path: Path
    title: str
    cname: str
    value: float
    weight: float = 1.0


class RankingTable:
    """One CSV of the official layout: ``rows`` (:class:`RankingRow`), ``categories`` (cname -> row indices,
    in file order), ``instruction(cname)``. ``transform`` maps an RGB PIL image to a tensor (default: ``(3, H,
    W)`` in [0, 1])."""

    def __init__(self, csv_path: str | os.PathLike, transform: Callable | None = None) -> None:
        self.csv_path = Path(csv_path)
        self.transform = transform
        if not self.csv_path.is_file():
            raise DatasetError(f"{self.csv_path} does not exist; pass a tab-separated CSV with columns "
                               f"{', '.join(REQUIRED_COLUMNS)}")
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                hint = " (the file is not tab-separated)" if len(header) == 1 and "," in header[0] else ""
                raise DatasetError(f"{self.csv_path}: header {header} lacks {missing}{hint}; the first line must "
                                   f"name the tab-separated columns {', '.join(REQUIRED_COLUMNS)}")
            rows, problems = [], []
            for line, record in enumerate(reader, start=2):
                try:
                    rows.append(self._row(record))
                except (TypeError, ValueError) as err:
                    problems.append(f"line {line}: {err}")
        base = self.csv_path.parent
        rows = [RankingRow(r.path if r.path.is_absolute() else base / r.path, r.title, r.cname, r.value, r.weight)
                for r in rows]
        absent = [str(r.path) for r in rows if not r.path.is_file()]
        if absent:
            problems.append(f"{len(absent)} image files do not exist, e.g. {', '.join(absent[:3])} (paths are "
                            f"relative to the CSV's folder)")
        if problems:
            more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
            raise DatasetError(f"{self.csv_path}: " + "; ".join(problems[:_SHOWN]) + more)
        if not rows:
            raise DatasetError(f"{self.csv_path} has a header but no rows")
        self.rows: list[RankingRow] = rows
        self.categories: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            self.categories.setdefault(r.cname, []).append(i)

    @staticmethod
    def _row(record: dict) -> RankingRow:
        values = {c: (record.get(c) or "").strip() for c in REQUIRED_COLUMNS}
        empty = [c for c, v in values.items() if not v]
        if empty:
            raise ValueError(f"empty {', '.join(empty)}")
        try:
            value = float(values["value"])
        except ValueError:
            raise ValueError(f"value {values['value']!r} is not a number") from None
        weight_text = (record.get(WEIGHT_COLUMN) or "").strip()
        weight = float(weight_text) if weight_text else 1.0
        if not weight >= 0 or not math.isfinite(value):
            raise ValueError(f"{WEIGHT_COLUMN} must be >= 0 and value finite, got {weight}, {value}")
        return RankingRow(Path(values["filepath"]), values["title"], values["cname"], value, weight)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"RankingTable({self.csv_path}, {len(self.rows)} rows, {len(self.categories)} categories)"

    def instruction(self, cname: str) -> str:
        """The instruction of category ``cname`` (the title of its first row)."""
        return self.rows[self.categories[cname][0]].title

    @property
    def values(self) -> torch.Tensor:
        return torch.tensor([r.value for r in self.rows])

    def load(self, index: int) -> torch.Tensor:
        path = self.rows[index].path
        img = decode_image(path, f"row {index + 2} of {self.csv_path}", fix="replace it or remove its row")
        return self.transform(img) if self.transform is not None else pil_to_tensor(img)


class RankingLists(Dataset):
    """Training lists: item ``i`` of epoch ``e`` is ``((images (B, 3, H, W), text ids (B, C)), values (B,))``,
    drawn from ``(seed, e, i)`` only, so a resumed epoch sees the same lists. Call :meth:`set_epoch`.

    Args:
        table: the training :class:`RankingTable`.
        tokenizer: ``list[str] -> (n, C)`` token ids (open_clip's).
        list_size: images per list (B); the official sampler uses the batch size.
        negative_ratio: share of the list drawn from other categories with value 0 (official 0.2; 0 with a
            single category, where there are no others).
        lists_per_epoch: default ``ceil(len(table) / list_size)``, one pass worth of images.
    """

    def __init__(self, table: RankingTable, tokenizer: Callable[[Sequence[str]], torch.Tensor], list_size: int,
                 negative_ratio: float = 0.2, lists_per_epoch: int | None = None, seed: int = 0) -> None:
        if list_size < 2:
            raise ValueError(f"list_size={list_size}: a ranking list needs at least 2 images")
        if not 0.0 <= negative_ratio < 1.0:
            raise ValueError(f"negative_ratio={negative_ratio} must be in [0, 1)")
        self.table, self.list_size, self.seed = table, list_size, seed
        self.negatives = round(negative_ratio * list_size) if len(table.categories) > 1 else 0
        self.length = lists_per_epoch or math.ceil(len(table) / list_size)
        self.cnames = sorted(table.categories)
        self.epoch = 0
        titles = sorted({table.instruction(c) for c in self.cnames})
        ids = tokenizer(titles)
        self._ids = {t: ids[k] for k, t in enumerate(titles)}
        self._weights = {c: torch.tensor([table.rows[i].weight for i in table.categories[c]], dtype=torch.double)
                         for c in self.cnames}
        for c, w in self._weights.items():
            if not w.sum() > 0:
                raise DatasetError(f"{table.csv_path}: every {WEIGHT_COLUMN} of category {c!r} is 0, so none of its "
                                   f"images can be drawn")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> tuple[str, list[int], list[int]]:
        """``(cname, positive rows, negative rows)`` of list ``index`` in the current epoch."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        cname = self.cnames[int(torch.randint(len(self.cnames), (1,), generator=g))]
        members = self.table.categories[cname]
        k = self.list_size - self.negatives
        picks = torch.multinomial(self._weights[cname], k, replacement=k > len(members), generator=g)
        positives = [members[int(p)] for p in picks]
        others = [i for c in self.cnames if c != cname for i in self.table.categories[c]]
        negatives = []
        if self.negatives:
            chosen = torch.randint(len(others), (self.negatives,), generator=g)
            negatives = [others[int(c)] for c in chosen]
        return cname, positives, negatives

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        cname, positives, negatives = self.draw(index)
        images = torch.stack([self.table.load(i) for i in positives + negatives])
        values = torch.tensor([self.table.rows[i].value for i in positives] + [0.0] * len(negatives))
        ids = self._ids[self.table.instruction(cname)].expand(len(values), -1).clone()
        return (images, ids), values


# ------------------------------------------------------------------------------------------ mini-counting

COUNTING_GENERATOR_VERSION = 1
COUNTING_MANIFEST = "mini_counting.json"
COUNTING_SHAPES = ("circle", "square", "triangle", "star")
COUNT_RANGE = (1, 6)
DEFAULT_COUNTING_SIZES = {"train": 1600, "val": 320, "test": 640}
INSTRUCTION = "Rank the numbers of {}."


def default_counting_root(seed: int = 0) -> Path:
    cache = Path(os.environ.get("VISADAPT_CACHE", Path.home() / ".cache" / "visadapt"))
    return cache / f"mini-counting-v{COUNTING_GENERATOR_VERSION}-seed{seed}"


def render_count(shape: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` non-overlapping copies of ``shape`` on a textured background: ``(32, 32, 3)`` uint8."""
    canvas = _background(rng)
    bg = canvas.mean(axis=(0, 1))
    placed: list[tuple[float, float]] = []
    while len(placed) < count:
        x, y = rng.uniform(4, 28), rng.uniform(4, 28)
        if all((x - px) ** 2 + (y - py) ** 2 > 56 for px, py in placed):
            placed.append((x, y))
    for x, y in placed:
        _object(rng, canvas, shape, "solid", x, y, rng.uniform(2.8, 3.6), rng.uniform(0, 2 * math.pi), bg)
    return _finish(canvas, rng)


def generate_mini_counting(root: str | os.PathLike | None = None, seed: int = 0,
                           sizes: dict[str, int] | None = None) -> Path:
    """Write mini-counting (``train.csv``, ``val.csv``, ``test.csv`` and ``images/``) to ``root``; return it.

    Counts are uniform in 1-6 and shapes uniform over :data:`COUNTING_SHAPES`; the same arguments give the
    same bytes. Written through :func:`visadapt.data.generated.write_generated`: a folder with the same
    arguments (its manifest) is reused, and an interrupted run leaves nothing half-written.
    """
    root = Path(root) if root is not None else default_counting_root(seed)
    sizes = dict(DEFAULT_COUNTING_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(DEFAULT_COUNTING_SIZES)
    if unknown or any(int(n) < 1 for n in sizes.values()):
        raise ValueError(f"sizes must map train/val/test to positive counts, got {sizes}")
    wanted = {"generator_version": COUNTING_GENERATOR_VERSION, "seed": seed, "sizes": sizes}

    def write(tmp: Path) -> dict:
        (tmp / "images").mkdir()
        with Progress(total=sum(sizes.values()), desc="mini-counting", unit="images") as bar:
            for split_index, (split, n) in enumerate(sizes.items()):
                with open(tmp / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                    writer.writerow(REQUIRED_COLUMNS)
                    for k in range(n):
                        rng = np.random.default_rng([seed, split_index, k])
                        shape = COUNTING_SHAPES[int(rng.integers(len(COUNTING_SHAPES)))]
                        count = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
                        name = f"images/{split}_{k:05d}.png"
                        Image.fromarray(render_count(shape, count, rng)).save(tmp / name, compress_level=1)
                        writer.writerow([name, INSTRUCTION.format(shape), shape, count])
                        bar.update(1)
        return {}

    return write_generated(root, COUNTING_MANIFEST, wanted, write, "mini-counting data")
