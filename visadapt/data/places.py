"""Visual place recognition (VPR) data: the benchmark folder layout, training triplets, and mini-places.

**The folder layout** is the one of the Visual Geo-localization Benchmark (Berton et al.), which SelaVPR
reads for Pitts30k, MSLS and the others::

    <root>/images/<split>/database/@<utm_east>@<utm_north>@<anything>@.jpg     split: train, val, test
    <root>/images/<split>/queries/@<utm_east>@<utm_north>@<anything>@.jpg

A query's *positives* are the database images within a radius (25 m for evaluation) in UTM metres.
:class:`PlaceSplit` reads one split; :class:`TripletDataset` serves ``[query, positive, negatives...]``
tuples for training, with the positive and the negatives either the geographic defaults or mined outside
(the hardest in descriptor space).

**Mini-places** (:func:`generate_mini_places`) is a procedural world in that layout, 32x32 PNGs, so the VPR
method has an embedded benchmark like mini-VTAB:

* Each split is its own "city" (origins 20 km apart): places on a street grid, ~50 m apart along a serpentine
  route, so a query's positives within 25 m are only its own place's database image.
* A place is a scene: a background (street with sky and ground, a facade with windows, or brick) and 3-5
  landmarks (shapes of :mod:`visadapt.data.procedural` filled with a two-tone texture), plus 1-3 small marks.
* The database holds one reference view per place. A query (one or two per place) sees the same scene from a
  changed viewpoint (shifted 5-12% of the image, zoomed 0.9-1.1x) under changed appearance (brightness,
  contrast, hue rotation, channel gains; sometimes "night"), with pixel noise, and is taken a few metres
  (< 8 m) from the place.

*Why re-ranking helps.* Places come in **families** of ``family_size`` (consecutive places along the route,
like a street of similar houses): a family shares the background style and colours, the landmark shapes and
colours and roughly their layout; its members differ only in local detail: each landmark's fill texture
(every member gets a different texture kind for a landmark), the position of the small landmarks and the
small marks. Fills cover about half of a landmark in either colour, so the mean colour of family members is
nearly equal, and queries are recoloured, so a pooled global descriptor (mean/GeM: no layout, colour
sensitive) confuses the members of a family (perceptual aliasing), while dense local features matched
between query and candidate (mutual nearest neighbours) find the shared textures and marks of the true
place. Global retrieval should get the family right and re-ranking the member.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visadapt.data.errors import DatasetError
from visadapt.data.generated import write_generated
from visadapt.data.procedural import (
    _SUPERSAMPLE,
    UPSTREAM_SHAPES,
    _color,
    _contrasting,
    _downsample,
    _paint,
    _shape_mask,
    _two_tone,
    default_data_root,
)
from visadapt.data.transforms import pil_to_tensor
from visadapt.data.vtab import decode_image
from visadapt.progress import Progress

PLACE_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NAME_PATTERN = "@<utm_east>@<utm_north>@<anything>@.jpg (e.g. '@0543256.96@4178906.70@37.75@-122.51@.jpg')"
LAYOUT = "<root>/images/<split>/database/<name>.jpg and <root>/images/<split>/queries/<name>.jpg"
# How many unparsable names or offending queries a message lists before summarising the rest as a count.
_SHOWN = 10
# Query-database pairs per chunk of the radius search: bounds its memory (~64 MB of float64 differences)
# on real datasets (Pitts30k: 10k database x 7.6k queries).
_PAIRS_PER_CHUNK = 1 << 22


def parse_utm(name: str) -> tuple[float, float]:
    """``(utm_east, utm_north)`` in metres from a benchmark file name ``@<east>@<north>@...@.jpg``.

    ``name`` may be a path; only its last component is read. Raises :class:`DatasetError` naming the file and
    the expected pattern when the name does not start with ``@`` followed by two finite numbers.
    """
    base = Path(name).name
    fields = base.split("@")
    try:
        if len(fields) < 4 or fields[0] != "":
            raise ValueError
        east, north = float(fields[1]), float(fields[2])
        if not (math.isfinite(east) and math.isfinite(north)):
            raise ValueError
    except ValueError:
        raise DatasetError(f"cannot read UTM coordinates from file name {str(name)!r}; expected "
                           f"{NAME_PATTERN}, the Visual Geo-localization Benchmark naming") from None
    return east, north


def _image_files(folder: Path) -> list[Path]:
    # Hidden files are skipped: archives made on macOS carry "._<name>" companions that are not images.
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


class PlaceSplit:
    """One split of a VPR benchmark folder: database and query images with their UTM positions.

    Attributes:
        root, split: where it was read from.
        database_paths, query_paths: image files in sorted (file name) order, so indices are reproducible.
        database_utm: ``(N_db, 2)`` float64 tensor of (east, north) metres, row ``i`` for ``database_paths[i]``.
        query_utm: ``(N_q, 2)`` float64 tensor, likewise for the queries.
        transform: applied to each RGB PIL image by :meth:`load_database`/:meth:`load_query`; ``None`` gives a
            ``(3, H, W)`` float tensor in [0, 1].

    Missing folders, empty folders and file names without coordinates are all reported in one
    :class:`DatasetError`; an unreadable image is reported when it is loaded.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        if split not in PLACE_SPLITS:
            raise DatasetError(f"unknown place-recognition split {split!r}; choose one of {', '.join(PLACE_SPLITS)}")
        if not self.root.is_dir():
            raise DatasetError(f"data root {self.root} does not exist or is not a directory; expected {LAYOUT}")
        split_dir = self.root / "images" / split
        problems: list[str] = []
        files: dict[str, list[Path]] = {}
        utm: dict[str, list[tuple[float, float]]] = {}
        for kind in ("database", "queries"):
            folder = split_dir / kind
            if not folder.is_dir():
                problems.append(f"folder {folder} does not exist")
                continue
            files[kind] = _image_files(folder)
            if not files[kind]:
                problems.append(f"folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
                continue
            bad: list[str] = []
            utm[kind] = []
            for path in files[kind]:
                try:
                    utm[kind].append(parse_utm(path.name))
                except DatasetError:
                    bad.append(path.name)
            if bad:
                listing = "\n".join(f"      {name}" for name in bad[:_SHOWN])
                more = f"\n      ... and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
                problems.append(f"{len(bad)} of {len(files[kind])} file names in {folder} carry no UTM "
                                f"coordinates (expected {NAME_PATTERN}):\n{listing}{more}")
        if problems:
            raise DatasetError(f"place-recognition split {split!r} under {self.root} is not usable:\n"
                               + "\n".join(f"  - {p}" for p in problems)
                               + f"\nExpected layout: {LAYOUT}{self._layout_hint()}")
        self.database_paths = files["database"]
        self.query_paths = files["queries"]
        self.database_utm = torch.tensor(utm["database"], dtype=torch.float64)
        self.query_utm = torch.tensor(utm["queries"], dtype=torch.float64)

    def _layout_hint(self) -> str:
        if (self.root / MANIFEST).is_file():
            return f". This is a mini-places folder: re-create it with generate_mini_places({str(self.root)!r})"
        if (self.root / self.split).is_dir() and not (self.root / "images").is_dir():
            return f". {self.root} looks like the images/ folder itself: pass its parent as the root"
        if self.root.name == self.split:
            return f". {self.root} looks like a split folder: pass the folder that holds images/ as the root"
        return ""

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    def __repr__(self) -> str:
        return f"PlaceSplit({str(self.root)!r}, {self.split!r}: {self.num_database} database, {self.num_queries} queries)"

    def positives(self, radius_m: float = 25.0) -> list[torch.Tensor]:
        """Per query, the sorted int64 indices of the database images within ``radius_m`` metres (Euclidean
        in UTM, boundary included); an empty tensor where there is none."""
        if not radius_m >= 0:
            raise ValueError(f"radius_m must be >= 0 metres, got {radius_m}")
        # Direct coordinate differences (not torch.cdist's matrix-product form): UTM values are ~1e6, where
        # |a|^2 + |b|^2 - 2ab cancels catastrophically.
        chunk = max(1, _PAIRS_PER_CHUNK // max(1, self.num_database))
        out: list[torch.Tensor] = []
        for start in range(0, self.num_queries, chunk):
            diff = self.query_utm[start:start + chunk, None, :] - self.database_utm[None, :, :]
            within = diff.square().sum(-1) <= radius_m * radius_m  # (chunk, N_db)
            hits = within.nonzero()  # row-major, so each query's database indices come out sorted
            out.extend(torch.split(hits[:, 1], within.sum(1).tolist()))
        return out

    def _load(self, path: Path, kind: str, index: int) -> torch.Tensor:
        img = decode_image(path, f"{kind} image {index} of split {self.split!r}", fix="replace or remove it")
        return self.transform(img) if self.transform is not None else pil_to_tensor(img)

    def load_database(self, index: int) -> torch.Tensor:
        """Database image ``index`` through ``transform`` (default: ``(3, H, W)`` float in [0, 1])."""
        return self._load(self.database_paths[index], "database", index)

    def load_query(self, index: int) -> torch.Tensor:
        """Query image ``index`` through ``transform`` (default: ``(3, H, W)`` float in [0, 1])."""
        return self._load(self.query_paths[index], "query", index)

    def database_dataset(self) -> Dataset:
        """The database as a Dataset of ``(image, database index)`` (for computing descriptors)."""
        return _PlaceImages(self.load_database, self.num_database, f"{self.split}/database")

    def query_dataset(self) -> Dataset:
        """The queries as a Dataset of ``(image, query index)``."""
        return _PlaceImages(self.load_query, self.num_queries, f"{self.split}/queries")


class _PlaceImages(Dataset):
    """A view of one side of a :class:`PlaceSplit`; item ``i`` is ``(load(i), i)``."""

    def __init__(self, load: Callable[[int], torch.Tensor], length: int, name: str):
        self._load = load
        self._length = length
        self.name = name

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} images of {self.name}")
        index = index % self._length
        return self._load(index), index

    def __repr__(self) -> str:
        return f"PlaceImages({self.name!r}, {self._length} images)"


class TripletDataset(Dataset):
    """Training tuples of one split: item ``i`` is ``(images, i)`` with ``images`` a
    ``(2 + negatives_per_query, 3, H, W)`` tensor stacked as ``[query, positive, negative_1, ...]``.

    Only *usable* queries take part: those with at least one database image within ``positive_radius_m``;
    ``dropped`` counts the others (report it, the drop is never silent). ``i`` indexes the usable queries,
    ``query_indices[i]`` is the query's index in ``split``.

    Until :meth:`set_mined` is called the positive is the geographically nearest database image and the
    negatives are drawn, distinct, from the database images farther than ``negative_radius_m`` with a
    generator seeded by ``(seed, epoch)`` (:meth:`set_epoch` re-draws them). A miner picks its own from
    ``candidate_positives[i]`` and :meth:`negative_mask`, e.g. the hardest in descriptor space.

    Attributes:
        query_indices: ``(n_usable,)`` int64, split query index of each usable query.
        candidate_positives: per usable query, the sorted int64 database indices within ``positive_radius_m``.
        positive_indices: ``(n_usable,)`` int64, the current positive of each usable query.
        negative_indices: ``(n_usable, negatives_per_query)`` int64, the current negatives.
        mined: whether the current choices came from :meth:`set_mined`.
    """

    def __init__(self, split: PlaceSplit, positive_radius_m: float = 10.0, negative_radius_m: float = 25.0,
                 negatives_per_query: int = 2, seed: int = 0):
        if not 0 <= positive_radius_m <= negative_radius_m:
            raise ValueError(f"need 0 <= positive_radius_m <= negative_radius_m, got {positive_radius_m} and "
                             f"{negative_radius_m} (a negative must be farther than any positive)")
        if negatives_per_query < 1:
            raise ValueError(f"negatives_per_query must be >= 1, got {negatives_per_query}")
        self.split = split
        self.positive_radius_m = positive_radius_m
        self.negative_radius_m = negative_radius_m
        self.negatives_per_query = negatives_per_query
        self.seed = seed
        self.epoch = 0
        within_positive = split.positives(positive_radius_m)
        usable = [q for q, found in enumerate(within_positive) if len(found)]
        self.dropped = split.num_queries - len(usable)
        if not usable:
            raise DatasetError(f"no query of {split!r} has a database image within {positive_radius_m} m, so there "
                               "is nothing to train on; check the UTM coordinates in the file names or raise "
                               "positive_radius_m")
        self.query_indices = torch.tensor(usable, dtype=torch.int64)
        self.candidate_positives = [within_positive[q] for q in usable]
        # Database images that are neither positives nor negatives stay out of both; storing the few within
        # negative_radius per query (not a dense mask) keeps memory linear on real datasets.
        within_negative = split.positives(negative_radius_m)
        self._not_negative = [within_negative[q] for q in usable]
        short = [i for i in range(len(usable))
                 if split.num_database - len(self._not_negative[i]) < negatives_per_query]
        if short:
            raise DatasetError(
                f"{len(short)} usable queries of {split!r} have fewer than {negatives_per_query} database images "
                f"farther than {negative_radius_m} m to draw negatives from (first: {self._describe(short[0])}); "
                "lower negatives_per_query or negative_radius_m")
        nearest = []
        for q, candidates in zip(usable, self.candidate_positives):
            dist2 = (split.database_utm[candidates] - split.query_utm[q]).square().sum(-1)
            nearest.append(candidates[int(dist2.argmin())])
        self.default_positives = torch.stack(nearest)
        self.mined = False
        self._draw_defaults()

    def __len__(self) -> int:
        return len(self.query_indices)

    def _describe(self, i: int) -> str:
        q = int(self.query_indices[i])
        return f"usable query {i} (query {q}, {self.split.query_paths[q].name})"

    def negative_mask(self, i: int) -> torch.Tensor:
        """``(N_db,)`` bool: the database images farther than ``negative_radius_m`` from usable query ``i``."""
        mask = torch.ones(self.split.num_database, dtype=torch.bool)
        mask[self._not_negative[i]] = False
        return mask

    def _draw_defaults(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        negatives = np.empty((len(self), self.negatives_per_query), dtype=np.int64)
        for i in range(len(self)):
            allowed = np.flatnonzero(self.negative_mask(i).numpy())
            negatives[i] = rng.choice(allowed, size=self.negatives_per_query, replace=False)
        self.positive_indices = self.default_positives.clone()
        self.negative_indices = torch.from_numpy(negatives)

    def set_epoch(self, epoch: int) -> None:
        """Record ``epoch``; unless mined choices are in place, re-draw the random negatives for it."""
        self.epoch = epoch
        if not self.mined:
            self._draw_defaults()

    def set_mined(self, positive: torch.Tensor, negatives: torch.Tensor) -> None:
        """Use externally mined choices: ``positive`` ``(n_usable,)`` and ``negatives``
        ``(n_usable, negatives_per_query)`` database indices, in usable-query order.

        Raises ValueError for wrong shapes or indices, a positive farther than ``positive_radius_m`` or a
        negative within ``negative_radius_m``, naming the offending queries.
        """
        positive = torch.as_tensor(positive)
        negatives = torch.as_tensor(negatives)
        n, k = len(self), self.negatives_per_query
        if positive.shape != (n,) or negatives.shape != (n, k):
            raise ValueError(f"set_mined expects positive of shape ({n},) and negatives of shape ({n}, {k}) "
                             f"(one row per usable query), got {tuple(positive.shape)} and {tuple(negatives.shape)}")
        if positive.is_floating_point() or negatives.is_floating_point():
            raise ValueError(f"set_mined expects integer database indices, got {positive.dtype} and {negatives.dtype}")
        positive, negatives = positive.long().cpu(), negatives.long().cpu()
        n_db = self.split.num_database
        problems = []
        for i in range(n):
            p, negs = int(positive[i]), negatives[i]
            if not 0 <= p < n_db or bool(((negs < 0) | (negs >= n_db)).any()):
                problems.append(f"{self._describe(i)}: database index out of range [0, {n_db})")
            elif not bool((self.candidate_positives[i] == p).any()):
                problems.append(f"{self._describe(i)}: positive {p} is not within {self.positive_radius_m} m")
            elif not bool(self.negative_mask(i)[negs].all()):
                close = [int(j) for j in negs if bool((self._not_negative[i] == j).any())]
                problems.append(f"{self._describe(i)}: negatives {close} are within {self.negative_radius_m} m")
        if problems:
            more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
            raise ValueError(f"{len(problems)} mined tuples are invalid:\n"
                             + "\n".join(f"  {p}" for p in problems[:_SHOWN]) + more)
        self.positive_indices = positive.clone()
        self.negative_indices = negatives.clone()
        self.mined = True

    def clear_mined(self) -> None:
        """Go back to the geographic positive and the random negatives of the current epoch."""
        self.mined = False
        self._draw_defaults()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} usable queries")
        images = [self.split.load_query(int(self.query_indices[i])),
                  self.split.load_database(int(self.positive_indices[i]))]
        images += [self.split.load_database(int(j)) for j in self.negative_indices[i]]
        return torch.stack(images), i


# ============================================================================================ mini-places

# Bump when the drawing code or the world changes so cached folders from an older version are not reused.
PLACES_GENERATOR_VERSION = 2
MANIFEST = "mini_places.json"
# A large test city: R@1 over ~600 queries moves by 0.2 points per query, so a re-ranking gain is not luck;
# val stays small because it is evaluated (with re-ranking) after every epoch.
DEFAULT_NUM_PLACES = {"train": 360, "val": 100, "test": 400}

# Each split is its own city, 20 km apart: no query of one split has a positive in another.
_CITY_ORIGINS = {"train": (500_000.0, 4_500_000.0), "val": (520_000.0, 4_500_000.0),
                 "test": (540_000.0, 4_500_000.0)}
_PLACE_SPACING_M = 50.0  # along a street
_STREET_SPACING_M = 60.0  # between parallel streets
_PLACES_PER_STREET = 10
# Place jitter +-4 m and query offset < 8 m keep a query >= 50 - 8 - 8 = 34 m from any other place (> 25 m),
# and within 8 m (< 10 m, the training positive radius) of its own.
_PLACE_JITTER_M = 4.0
_QUERY_OFFSET_M = 8.0

# Scene coordinates: the reference (database) view spans [0, 1] x [0, 1]. Query views reach at most
# 0.5 / 0.8 + 0.2 beyond the centre, well inside this extent, where texture lattices are defined.
_WORLD = (-1.0, 2.0)
_SHAPES = tuple(s for s in UPSTREAM_SHAPES if s != "ring")  # a ring's fill shows too little to tell apart
_FILLS = ("stripes", "checker", "dots", "rings", "blobs", "zigzag")
_MARK_SHAPES = ("circle", "square", "diamond", "cross", "triangle")
_BACKGROUNDS = ("street", "facade", "brick")


def default_places_root(seed: int = 0) -> Path:
    """Where the generated mini-places live: next to mini-VTAB, ``<cache>/mini-places-v*-seed*``."""
    return default_data_root(seed).parent / f"mini-places-v{PLACES_GENERATOR_VERSION}-seed{seed}"


def _lattice_noise(lattice: np.ndarray, x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Value noise in [0, 1] at arbitrary points: ``lattice`` ``(c+1, c+1)`` spans ``[lo, hi]^2``, smoothstep
    bilinear interpolation in between (a function of position, so every view sees the same texture)."""
    cells = lattice.shape[0] - 1

    def split(t):
        t = np.clip((t - lo) / (hi - lo) * cells, 0, cells - 1e-9)
        i = np.floor(t).astype(int)
        f = t - i
        return i, f * f * (3 - 2 * f)

    ix, fx = split(x)
    iy, fy = split(y)
    top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
    bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _frame(x: np.ndarray, y: np.ndarray, cx: float, cy: float, size: float, angle: float):
    """Scene points in an object's frame: centred on (cx, cy), rotated by -angle, unit = ``size``."""
    dx, dy = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    return (c * dx + s * dy) / size, (-s * dx + c * dy) / size


# Landmark fills, in the landmark's own frame (so they move and scale with it). Each covers about half of the
# landmark in either colour, so which fill a place has barely changes its mean colour, only local texture.

def _fill_params(kind: str, rng: np.random.Generator) -> dict:
    if kind == "stripes":
        return {"angle": rng.uniform(0, math.pi), "period": rng.uniform(0.55, 0.85), "phase": rng.uniform(0, 6.3)}
    if kind == "checker":
        return {"angle": rng.uniform(0, math.pi / 2), "cell": rng.uniform(0.4, 0.6)}
    if kind == "dots":
        return {"angle": rng.uniform(0, math.pi), "cell": rng.uniform(0.55, 0.75), "offset": rng.uniform(0, 1, 2)}
    if kind == "rings":
        return {"centre": rng.uniform(-0.4, 0.4, 2), "period": rng.uniform(0.5, 0.75)}
    if kind == "blobs":
        return {"lattice": rng.random((6, 6))}
    if kind == "zigzag":
        return {"angle": rng.uniform(0, math.pi), "period": rng.uniform(0.6, 0.9), "wave": rng.uniform(0.6, 1.0)}
    raise KeyError(kind)


def _fill(kind: str, p: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A ``[0, 1]`` texture at object-frame points ``(u, v)``."""
    if kind == "stripes":
        proj = u * math.cos(p["angle"]) + v * math.sin(p["angle"])
        return (np.sin(2 * math.pi * proj / p["period"] + p["phase"]) > 0).astype(float)
    if kind == "checker":
        a, b = _frame(u, v, 0.0, 0.0, p["cell"], p["angle"])
        return ((np.floor(a) + np.floor(b)) % 2 == 0).astype(float)
    if kind == "dots":
        a, b = _frame(u, v, p["offset"][0], p["offset"][1], p["cell"], p["angle"])
        return ((a - np.round(a)) ** 2 + (b - np.round(b)) ** 2 < 0.14).astype(float)  # pi r^2 ~ 0.44
    if kind == "rings":
        r = np.hypot(u - p["centre"][0], v - p["centre"][1])
        return (np.sin(2 * math.pi * r / p["period"]) > 0).astype(float)
    if kind == "blobs":
        return (_lattice_noise(p["lattice"], u, v, -1.3, 1.3) > 0.5).astype(float)
    if kind == "zigzag":
        a, b = _frame(u, v, 0.0, 0.0, 1.0, p["angle"])
        tri = np.abs((b / p["wave"]) % 2 - 1)  # triangle wave across the stripes
        return (np.sin(2 * math.pi * (a + 0.35 * tri) / p["period"]) > 0).astype(float)
    raise KeyError(kind)


@dataclass
class _Landmark:
    shape: str
    cx: float
    cy: float
    size: float  # scene units (fraction of the reference image)
    angle: float
    colors: tuple[np.ndarray, np.ndarray]
    fill: str = "stripes"
    fill_params: dict | None = None


@dataclass
class _Family:
    """What the places of one family share: background style and colours, landmarks (shape, colours, rough
    layout) and which fill each member gets per landmark."""

    background: str
    bg_params: dict
    landmarks: list[_Landmark]
    small: list[bool]  # small landmarks are placed anew for every member
    fill_order: list[np.ndarray]  # per landmark, a permutation of _FILLS indices over the members
    bg_mean: np.ndarray


@dataclass
class _Scene:
    background: str
    bg_params: dict
    bg_noise: np.ndarray
    landmarks: list[_Landmark]
    marks: list[tuple[str, float, float, float, float, np.ndarray]]  # shape, cx, cy, size, angle, colour


def _background(style: str, p: dict, noise: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The background at scene points: ``(*x.shape, 3)`` floats."""
    tex = _lattice_noise(noise, x, y, *_WORLD)[..., None] - 0.5
    if style == "street":
        t = np.clip(y / p["horizon"], 0, 1)[..., None]
        sky = p["sky_top"] + (p["sky_horizon"] - p["sky_top"]) * t
        ground = p["ground"] + 0.15 * tex
        return np.where((y < p["horizon"])[..., None], sky, ground)
    if style == "facade":
        wall = p["wall"] + 0.08 * tex
        fx = ((x - p["offset"][0]) / p["period"][0]) % 1
        fy = ((y - p["offset"][1]) / p["period"][1]) % 1
        window = (fx < p["window"][0]) & (fy < p["window"][1])
        return np.where(window[..., None], p["glass"] + 0.05 * tex, wall)
    if style == "brick":
        row = np.floor(y / p["course"])
        fx = ((x / p["length"]) + 0.5 * (row % 2)) % 1
        mortar = ((y / p["course"]) % 1 < 0.2) | (fx < 0.1)
        return np.where(mortar[..., None], p["mortar"], p["brick"] + 0.2 * tex)
    raise KeyError(style)


def _background_params(style: str, rng: np.random.Generator) -> dict:
    if style == "street":
        return {"horizon": rng.uniform(0.35, 0.6), "sky_top": _color(rng, light=True),
                "sky_horizon": _color(rng, light=True), "ground": _color(rng, light=False) + 0.15}
    if style == "facade":
        return {"wall": _color(rng), "glass": _color(rng, light=False), "offset": rng.uniform(0, 0.3, 2),
                "period": rng.uniform(0.22, 0.34, 2), "window": rng.uniform(0.4, 0.6, 2)}
    if style == "brick":
        return {"brick": _color(rng), "mortar": _color(rng, light=True), "course": rng.uniform(0.09, 0.13),
                "length": rng.uniform(0.2, 0.3)}
    raise KeyError(style)


def _make_family(rng: np.random.Generator, members: int) -> _Family:
    style = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    bg_params = _background_params(style, rng)
    probe = np.linspace(0.05, 0.95, 16)
    px, py = np.meshgrid(probe, probe)
    bg_mean = _background(style, bg_params, np.full((2, 2), 0.5), px, py).reshape(-1, 3).mean(0)
    count = int(rng.integers(3, 6))
    n_small = 1 if count == 3 else 2
    # Large landmarks sit in distinct cells of a 3x2 layout, so they overlap little and each stays visible.
    slots = rng.permutation(6)[:count - n_small]
    landmarks, small = [], []
    for k in range(count):
        is_small = k >= count - n_small
        if is_small:
            cx = cy = 0.5  # re-drawn for every member
            size = rng.uniform(0.08, 0.11)
        else:
            col, row = divmod(int(slots[k]), 2)
            cx = 0.2 + 0.3 * col + rng.uniform(-0.05, 0.05)
            cy = 0.3 + 0.4 * row + rng.uniform(-0.05, 0.05)
            size = rng.uniform(0.15, 0.2)
        a = _contrasting(rng, bg_mean)
        b = _contrasting(rng, a, 0.4)
        landmarks.append(_Landmark(str(rng.choice(_SHAPES)), cx, cy, size, rng.uniform(0, 2 * math.pi), (a, b)))
        small.append(is_small)
    fill_order = [np.resize(rng.permutation(len(_FILLS)), members) for _ in range(count)]
    return _Family(style, bg_params, landmarks, small, fill_order, bg_mean)


def _make_place(family: _Family, member: int, rng: np.random.Generator) -> _Scene:
    """Member ``member`` of ``family``: the shared template with its own fills, small-landmark positions,
    layout jitter and marks."""
    landmarks = []
    for k, (base, is_small) in enumerate(zip(family.landmarks, family.small)):
        fill = _FILLS[int(family.fill_order[k][member])]
        if is_small:
            cx, cy = rng.uniform(0.12, 0.88, 2)
        else:
            cx, cy = base.cx + rng.uniform(-0.025, 0.025), base.cy + rng.uniform(-0.025, 0.025)
        landmarks.append(_Landmark(base.shape, float(cx), float(cy), base.size * rng.uniform(0.95, 1.05),
                                   base.angle + rng.uniform(-0.15, 0.15), base.colors, fill, _fill_params(fill, rng)))
    marks = []
    for _ in range(int(rng.integers(1, 4))):
        shape = str(rng.choice(_MARK_SHAPES))
        cx, cy = rng.uniform(0.1, 0.9, 2)
        marks.append((shape, float(cx), float(cy), rng.uniform(0.045, 0.065), rng.uniform(0, math.pi),
                      _contrasting(rng, family.bg_mean, 0.5)))
    return _Scene(family.background, family.bg_params, rng.random((19, 19)), landmarks, marks)


@dataclass
class _View:
    """A camera: scene = (image - 0.5) / zoom + 0.5 - shift, then an appearance change on the colours."""

    shift: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0
    gains: np.ndarray = field(default_factory=lambda: np.ones(3))  # (3,) per channel
    hue: float = 0.0  # rotation about the grey axis, radians
    brightness: float = 1.0
    contrast: float = 1.0
    noise: float = 0.02


def _query_view(rng: np.random.Generator) -> _View:
    # Moderate changes: the embedded 0.5 M-parameter backbone, pretrained on 32 px shapes, must be able to learn
    # them from a few hundred tuples on a CPU; colour still varies enough that it is not a reliable cue.
    direction = rng.uniform(0, 2 * math.pi)
    magnitude = rng.uniform(0.05, 0.12)
    night = rng.random() < 0.1
    return _View(shift=(magnitude * math.cos(direction), magnitude * math.sin(direction)),
                 zoom=float(math.exp(rng.uniform(math.log(0.9), math.log(1.1)))),
                 gains=(np.array([0.85, 0.9, 1.1]) if night else np.ones(3)) * rng.uniform(0.9, 1.1, 3),
                 hue=rng.uniform(-0.35, 0.35),
                 brightness=rng.uniform(0.55, 0.75) if night else rng.uniform(0.85, 1.15),
                 contrast=rng.uniform(0.8, 1.2), noise=rng.uniform(0.015, 0.03))


def _hue_rotation(angle: float) -> np.ndarray:
    """``(3, 3)`` rotation of RGB about the grey diagonal (Rodrigues): changes hue, keeps grey grey."""
    k = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _render_place(scene: _Scene, view: _View, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """``scene`` seen through ``view``: ``(image_size, image_size, 3)`` uint8, drawn at 2x and box-filtered."""
    n = image_size * _SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(axis, axis)
    x = (gx - 0.5) / view.zoom + 0.5 - view.shift[0]
    y = (gy - 0.5) / view.zoom + 0.5 - view.shift[1]
    canvas = np.clip(_background(scene.background, scene.bg_params, scene.bg_noise, x, y), 0, 1)
    for lm in scene.landmarks:
        u, v = _frame(x, y, lm.cx, lm.cy, lm.size, lm.angle)
        mask = _shape_mask(lm.shape, u, v)
        _paint(canvas, mask, _two_tone(_fill(lm.fill, lm.fill_params, u, v), *lm.colors))
    for shape, cx, cy, size, angle, colour in scene.marks:
        _paint(canvas, _shape_mask(shape, *_frame(x, y, cx, cy, size, angle)), colour)
    img = _downsample(canvas) @ _hue_rotation(view.hue).T * view.gains
    mean = img.mean(axis=(0, 1))
    img = ((img - mean) * view.contrast + mean) * view.brightness
    img = img + rng.normal(0, view.noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _route(num_places: int, rng: np.random.Generator) -> np.ndarray:
    """``(num_places, 2)`` metres from the city origin: a serpentine over parallel streets, jittered."""
    k = np.arange(num_places)
    street, along = np.divmod(k, _PLACES_PER_STREET)
    along = np.where(street % 2 == 0, along, _PLACES_PER_STREET - 1 - along)
    xy = np.stack([along * _PLACE_SPACING_M, street * _STREET_SPACING_M], axis=1).astype(float)
    return xy + rng.uniform(-_PLACE_JITTER_M, _PLACE_JITTER_M, xy.shape)


def _utm_name(east: float, north: float, *tags: str) -> str:
    return "@" + "@".join([f"{east:.2f}", f"{north:.2f}", *tags]) + "@.png"


def _write_split(folder: Path, split: str, split_index: int, num_places: int, seed: int, family_size: int,
                 queries_per_place: tuple[int, int], image_size: int, bar: Progress) -> dict[str, int]:
    (folder / "database").mkdir(parents=True)
    (folder / "queries").mkdir(parents=True)
    origin = np.array(_CITY_ORIGINS[split])
    positions = origin + _route(num_places, np.random.default_rng([seed, split_index, 0]))
    num_queries = 0
    for family_index, start in enumerate(range(0, num_places, family_size)):
        members = min(family_size, num_places - start)
        family = _make_family(np.random.default_rng([seed, split_index, 1, family_index]), members)
        for member in range(members):
            place = start + member
            rng = np.random.default_rng([seed, split_index, 2, place])
            scene = _make_place(family, member, rng)
            east, north = positions[place]
            img = _render_place(scene, _View(), rng, image_size)
            name = _utm_name(east, north, split, f"place{place:04d}", "database")
            Image.fromarray(img).save(folder / "database" / name, compress_level=1)
            for q in range(int(rng.integers(queries_per_place[0], queries_per_place[1] + 1))):
                q_rng = np.random.default_rng([seed, split_index, 3, place, q])
                img = _render_place(scene, _query_view(q_rng), q_rng, image_size)
                r, a = _QUERY_OFFSET_M * math.sqrt(q_rng.uniform(0, 0.99)), q_rng.uniform(0, 2 * math.pi)
                name = _utm_name(east + r * math.cos(a), north + r * math.sin(a), split, f"place{place:04d}",
                                 f"query{q}")
                Image.fromarray(img).save(folder / "queries" / name, compress_level=1)
                num_queries += 1
            bar.update(1)
    return {"database": num_places, "queries": num_queries}


def generate_mini_places(root: str | os.PathLike | None = None, seed: int = 0,
                         num_places: int | Mapping[str, int] | None = None, family_size: int = 5,
                         queries_per_place: int | tuple[int, int] = (1, 2), image_size: int = 32) -> Path:
    """Write the mini-places benchmark to ``root`` in the VPR folder layout and return ``root``.

    Args:
        root: target folder; default :func:`default_places_root` (``$VISADAPT_CACHE`` or ``~/.cache/visadapt``).
        seed: everything is drawn from it; the same arguments give the same bytes.
        num_places: places per split, a mapping over ``train``/``val``/``test`` or one count for all three;
            default 360/100/400. Each place has one database image.
        family_size: places per look-alike family (the last family of a split may be smaller).
        queries_per_place: ``(min, max)`` queries per place, inclusive, or one count.
        image_size: side of the square PNGs (the embedded backbone takes 32).

    An existing folder with the same arguments (recognised by its ``mini_places.json`` manifest) is reused.
    The splits are written to a temporary sibling folder that is renamed into place, so an interrupted run
    leaves nothing half-written; a stale mini-places folder (other arguments or generator version) is
    replaced, any other non-empty folder is refused.
    """
    root = Path(root) if root is not None else default_places_root(seed)
    if num_places is None:
        sizes = dict(DEFAULT_NUM_PLACES)
    elif isinstance(num_places, Mapping):
        unknown = set(num_places) - set(PLACE_SPLITS)
        if unknown:
            raise ValueError(f"num_places has unknown splits {sorted(unknown)}; use {', '.join(PLACE_SPLITS)}")
        sizes = {split: int(num_places[split]) for split in PLACE_SPLITS if split in num_places}
    else:
        sizes = {split: int(num_places) for split in PLACE_SPLITS}
    queries = (queries_per_place, queries_per_place) if isinstance(queries_per_place, int) else queries_per_place
    queries = (int(queries[0]), int(queries[1]))
    if any(count < 1 for count in sizes.values()) or not sizes:
        raise ValueError(f"every split needs at least one place, got num_places={sizes}")
    if family_size < 1 or not 1 <= queries[0] <= queries[1] or image_size < 8:
        raise ValueError(f"need family_size >= 1, 1 <= min <= max queries_per_place and image_size >= 8; got "
                         f"{family_size}, {queries_per_place}, {image_size}")
    wanted = {"generator_version": PLACES_GENERATOR_VERSION, "seed": seed, "num_places": sizes,
              "family_size": family_size, "queries_per_place": list(queries), "image_size": image_size}

    def write(tmp: Path) -> dict:
        with Progress(total=sum(sizes.values()), desc="mini-places", unit="places") as bar:
            return {"images": {split: _write_split(tmp / "images" / split, split, PLACE_SPLITS.index(split), count,
                                                   seed, family_size, queries, image_size, bar)
                               for split, count in sizes.items()}}

    return write_generated(root, MANIFEST, wanted, write, "mini-places benchmark")
