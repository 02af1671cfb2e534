"""Procedural images: the mini-VTAB suite and the drawing helpers the other procedural sets share.

Everything here is drawn with numpy from a seed, so the embedded default needs no download and is the
same on every machine. Images are 32x32 RGB, rendered at 2x and box-filtered down (anti-aliased edges).
The embedded backbones are pretrained on :mod:`visadapt.data.upstream` (scenes of shapes and glyphs, with
:data:`UPSTREAM_SHAPES` and :data:`UPSTREAM_FILLS` from here).

* **Mini-VTAB** (:func:`generate_mini_vtab`): seven downstream tasks in the three VTAB groups, written to
  disk in the NOAH VTAB-1k layout so that the real folder loader is what reads them:

  ============  ===========  =======  ==========================================================
  task          group        classes  what decides the label
  ============  ===========  =======  ==========================================================
  digits        Natural      10       a seven-segment digit on a textured background (SVHN-like)
  textures      Natural      8        the kind of texture filling the image (DTD-like)
  cells         Specialized  2        whether one of the stained cells is abnormal (Camelyon-like)
  landcover     Specialized  6        aerial-like scene type (EuroSAT-like)
  count         Structured   6        how many objects (1-6) are in the image (CLEVR-count-like)
  position      Structured   8        horizontal position bin of one object (dSprites-loc-like)
  orientation   Structured   8        orientation bin (over 180 degrees) of one bar (dSprites-ori-like)
  ============  ===========  =======  ==========================================================

The structured tasks ask where, how many and which way, labels the upstream objective never trains (its
layout target does keep where objects are in the pooled feature: README, "The embedded default"), which is
why adapting the frozen backbone beats a linear probe on its pooled feature there, as on real VTAB-1k.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from visadapt.data.tasks import MINI_VTAB_TASKS
from visadapt.progress import Progress, announce

IMAGE_SIZE = 32
_SUPERSAMPLE = 2
# Bump when the drawing code changes so cached folders from an older version are not reused.
GENERATOR_VERSION = 1

# ---------------------------------------------------------------------------------------------- geometry


def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each ``(S*size, S*size)``, in output-pixel units."""
    n = size * _SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(axis, axis)


_GX, _GY = _grid()


def _downsample(img: np.ndarray) -> np.ndarray:
    """``(S*H, S*W, ...)`` -> ``(H, W, ...)`` by averaging each SxS cell (anti-aliasing)."""
    s = _SUPERSAMPLE
    h, w = img.shape[0] // s, img.shape[1] // s
    return img.reshape(h, s, w, s, *img.shape[2:]).mean(axis=(1, 3))


def _local(cx: float, cy: float, size: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates in an object's frame: centred on (cx, cy), rotated by -angle, unit = ``size``."""
    dx, dy = _GX - cx, _GY - cy
    c, s = math.cos(angle), math.sin(angle)
    return (c * dx + s * dy) / size, (-s * dx + c * dy) / size


def _polygon(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test over a grid; ``verts`` in the object's unit frame."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star(points: int = 5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in the unit frame (roughly inside the unit disc)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":
        return _polygon(u, v, _regular(3, 1.0, -math.pi / 2))
    if shape == "diamond":
        return np.abs(u) / 0.7 + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "star":
        return _polygon(u, v, _star())
    if shape == "hexagon":
        return _polygon(u, v, _regular(6))
    if shape == "ell":
        return ((u >= -0.8) & (u <= -0.2) & (np.abs(v) <= 0.9)) | ((v >= 0.3) & (v <= 0.9) & (np.abs(u) <= 0.8))
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.55)
    if shape == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22)
    raise KeyError(shape)


UPSTREAM_SHAPES = ("circle", "ring", "square", "triangle", "diamond", "cross", "star", "hexagon", "ell", "crescent")
UPSTREAM_FILLS = ("solid", "stripes", "checker", "dots", "gradient", "noise")

# --------------------------------------------------------------------------------------------- patterns


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise in [0, 1] at grid resolution: a random ``cells x cells`` lattice, bilinearly upsampled."""
    lattice = rng.random((cells + 1, cells + 1))
    n = _GX.shape[0]
    t = np.linspace(0, cells, n, endpoint=False) + cells / (2 * n)
    i = np.floor(t).astype(int)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _stripes(angle: float, period: float, phase: float) -> np.ndarray:
    proj = _GX * math.cos(angle) + _GY * math.sin(angle)
    return (np.sin(2 * math.pi * proj / period + phase) > 0).astype(float)


def _pattern(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A ``[0, 1]`` pattern over the whole grid; the mask of an object selects the part that shows."""
    if kind == "solid":
        return np.ones_like(_GX)
    if kind == "stripes":
        return _stripes(rng.uniform(0, math.pi), rng.uniform(3, 6), rng.uniform(0, 2 * math.pi))
    if kind == "checker":
        cell = rng.uniform(2.5, 4.5)
        a = rng.uniform(0, math.pi / 2)
        u, v = _local(0, 0, cell, a)
        return ((np.floor(u) + np.floor(v)) % 2 == 0).astype(float)
    if kind == "dots":
        cell = rng.uniform(3.0, 5.0)
        u, v = _local(rng.uniform(0, 5), rng.uniform(0, 5), cell, rng.uniform(0, math.pi))
        return (((u - np.round(u)) ** 2 + (v - np.round(v)) ** 2) < 0.09).astype(float)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        proj = (_GX - 16) * math.cos(a) + (_GY - 16) * math.sin(a)
        return np.clip(0.5 + proj / 16, 0, 1)
    if kind == "noise":
        return (_smooth_noise(rng, 10) > 0.5).astype(float)
    raise KeyError(kind)


def _color(rng: np.random.Generator, light: bool | None = None) -> np.ndarray:
    c = rng.random(3)
    if light is True:
        c = 0.55 + 0.45 * c
    elif light is False:
        c = 0.45 * c
    return c


def _paint(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """Composite ``color`` (``(3,)`` or ``(H, W, 3)``) onto ``canvas`` where ``mask`` is set."""
    canvas[mask] = color if color.ndim == 1 else color[mask]


def _two_tone(pattern: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pattern[..., None] * a + (1 - pattern[..., None]) * b


def _background(rng: np.random.Generator, light: bool | None = None) -> np.ndarray:
    """A low-contrast textured background, ``(S*H, S*W, 3)`` floats in [0, 1]."""
    base = _color(rng, light)
    kind = rng.choice(["flat", "noise", "gradient", "stripes"])
    if kind == "flat":
        tex = np.full_like(_GX, 0.5)
    elif kind == "noise":
        tex = _smooth_noise(rng, int(rng.integers(2, 6)))
    elif kind == "gradient":
        tex = _pattern("gradient", rng)
    else:
        tex = 0.5 + 0.5 * _stripes(rng.uniform(0, math.pi), rng.uniform(4, 10), rng.uniform(0, 6))
    amp = rng.uniform(0.05, 0.25)
    return np.clip(base + amp * (tex[..., None] - 0.5), 0, 1)


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """Downsample, add pixel noise and quantise: ``(H, W, 3)`` uint8."""
    img = _downsample(canvas) + rng.normal(0, noise, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _contrasting(rng: np.random.Generator, against: np.ndarray, min_dist: float = 0.45) -> np.ndarray:
    for _ in range(20):
        c = rng.random(3)
        if np.abs(c - against).sum() >= min_dist * 3 / 2:
            return c
    return 1.0 - against


def _object(rng, canvas, shape: str, fill: str, cx, cy, size, angle, bg_mean) -> None:
    u, v = _local(cx, cy, size, angle)
    mask = _shape_mask(shape, u, v)
    a = _contrasting(rng, bg_mean)
    b = _contrasting(rng, a, 0.4)
    _paint(canvas, mask, _two_tone(_pattern(fill, rng), a, b))


# -------------------------------------------------------------------------------------------- mini-VTAB

_SEGMENTS = {  # seven-segment layout: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g mid
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg",
    9: "abcdfg",
}


def _digit_mask(digit: int, cx, cy, height, thickness, slant) -> np.ndarray:
    w, h = height * 0.55, height
    x = _GX - cx + slant * (_GY - cy)
    y = _GY - cy
    t = thickness / 2
    hx, hy = w / 2, h / 2

    def hseg(y0):
        return (np.abs(y - y0) <= t) & (np.abs(x) <= hx)

    def vseg(x0, top):
        y_lo, y_hi = (-hy, 0) if top else (0, hy)
        return (np.abs(x - x0) <= t) & (y >= y_lo - t) & (y <= y_hi + t)

    parts = {"a": hseg(-hy), "d": hseg(hy), "g": hseg(0), "b": vseg(hx, True), "c": vseg(hx, False),
             "e": vseg(-hx, False), "f": vseg(-hx, True)}
    mask = np.zeros_like(x, dtype=bool)
    for seg in _SEGMENTS[digit]:
        mask |= parts[seg]
    return mask


def _render_digits(rng, label):
    canvas = _background(rng)
    bg = canvas.mean(axis=(0, 1))
    # Neighbouring digits cut by the border, as in SVHN crops.
    for side in (-1, 1):
        if rng.random() < 0.5:
            mask = _digit_mask(int(rng.integers(10)), 16 + side * rng.uniform(17, 21), 16, 18, 2.5, 0.1)
            _paint(canvas, mask, _contrasting(rng, bg))
    height = rng.uniform(14, 22)
    mask = _digit_mask(label, 16 + rng.uniform(-3, 3), 16 + rng.uniform(-3, 3), height,
                       rng.uniform(1.8, 3.2), rng.uniform(-0.25, 0.1))
    _paint(canvas, mask, _contrasting(rng, bg, 0.5))
    return canvas


_TEXTURES = ("horizontal", "vertical", "diagonal", "checker", "dots", "rings", "blobs", "grain")


def _render_textures(rng, label):
    kind = _TEXTURES[label]
    jitter = rng.uniform(-0.2, 0.2)
    period = rng.uniform(3.5, 7)
    if kind == "horizontal":
        pat = _stripes(math.pi / 2 + jitter, period, rng.uniform(0, 6))
    elif kind == "vertical":
        pat = _stripes(jitter, period, rng.uniform(0, 6))
    elif kind == "diagonal":
        pat = _stripes(rng.choice([math.pi / 4, 3 * math.pi / 4]) + jitter, period, rng.uniform(0, 6))
    elif kind == "checker":
        pat = _pattern("checker", rng)
    elif kind == "dots":
        pat = _pattern("dots", rng)
    elif kind == "rings":
        r = np.hypot(_GX - rng.uniform(0, 32), _GY - rng.uniform(0, 32))
        pat = (np.sin(2 * math.pi * r / period) > 0).astype(float)
    elif kind == "blobs":
        pat = (_smooth_noise(rng, int(rng.integers(3, 6))) > 0.5).astype(float)
    else:
        pat = (_smooth_noise(rng, 24) > 0.5).astype(float)
    a = _color(rng)
    b = _contrasting(rng, a, 0.3)
    return _two_tone(pat, a, b)


def _render_cells(rng, label):
    pink = np.array([0.93, 0.75, 0.85]) + rng.uniform(-0.08, 0.05, 3)
    canvas = np.clip(pink + 0.08 * (_smooth_noise(rng, 6)[..., None] - 0.5), 0, 1)
    purple = np.array([0.5, 0.3, 0.65]) + rng.uniform(-0.08, 0.08, 3)
    n = int(rng.integers(5, 12))
    abnormal = int(rng.integers(n)) if label == 1 else -1
    for k in range(n):
        size = rng.uniform(2.0, 3.0)
        color = purple
        if k == abnormal:  # enlarged, dark, irregular nucleus
            size = rng.uniform(3.8, 5.0)
            color = purple * 0.55
        u, v = _local(rng.uniform(3, 29), rng.uniform(3, 29), size, rng.uniform(0, math.pi))
        wobble = 1 + (0.25 if k == abnormal else 0.05) * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6))
        _paint(canvas, (u / 1.0) ** 2 + (v / 0.75) ** 2 <= wobble ** 2, color + rng.uniform(-0.05, 0.05, 3))
    return canvas


_LANDCOVER = ("water", "forest", "farmland", "urban", "desert", "highway")


def _render_landcover(rng, label):
    kind = _LANDCOVER[label]
    shift = rng.uniform(-0.12, 0.12, 3)
    if kind == "water":
        base, tex = np.array([0.15, 0.3, 0.55]), _smooth_noise(rng, 3)
        img = base + 0.15 * (tex[..., None] - 0.5)
    elif kind == "forest":
        tex = _smooth_noise(rng, 16)
        img = np.array([0.12, 0.35, 0.12]) + 0.35 * (tex[..., None] - 0.5)
    elif kind == "farmland":
        img = np.zeros((*_GX.shape, 3))
        a = rng.uniform(0, math.pi)
        stripes = _stripes(a, rng.uniform(2.5, 4), 0)
        fields = _smooth_noise(rng, 3) > 0.5
        c1, c2 = np.array([0.5, 0.6, 0.2]), np.array([0.75, 0.7, 0.35])
        img[:] = np.where(fields[..., None], c1, c2) * (0.85 + 0.15 * stripes[..., None])
    elif kind == "urban":
        cell = rng.uniform(4, 7)
        u, v = _local(rng.uniform(0, 8), rng.uniform(0, 8), cell, rng.uniform(0, math.pi / 2))
        roofs = (np.abs(u - np.round(u)) < 0.3) & (np.abs(v - np.round(v)) < 0.3)
        img = np.where(roofs[..., None], np.array([0.65, 0.5, 0.45]), np.array([0.45, 0.45, 0.45]))
    elif kind == "desert":
        tex = _smooth_noise(rng, 2)
        img = np.array([0.8, 0.7, 0.5]) + 0.12 * (tex[..., None] - 0.5)
    else:
        img = np.array([0.35, 0.45, 0.3]) + 0.15 * (_smooth_noise(rng, 8)[..., None] - 0.5)
        u, v = _local(rng.uniform(8, 24), rng.uniform(8, 24), 1.0, rng.uniform(0, math.pi))
        img = np.where((np.abs(v) < rng.uniform(1.5, 2.5))[..., None], np.array([0.55, 0.55, 0.55]), img)
    return np.clip(img + shift, 0, 1)


def _random_shape(rng):
    return str(rng.choice(UPSTREAM_SHAPES[:8]))


def _render_count(rng, label):
    canvas = _background(rng)
    bg = canvas.mean(axis=(0, 1))
    placed: list[tuple[float, float]] = []
    while len(placed) < label + 1:  # non-overlapping objects, so the count is visible
        x, y = rng.uniform(4, 28), rng.uniform(4, 28)
        if all((x - px) ** 2 + (y - py) ** 2 > 64 for px, py in placed):
            placed.append((x, y))
    for x, y in placed:
        _object(rng, canvas, _random_shape(rng), "solid", x, y, rng.uniform(2.8, 3.8), rng.uniform(0, 6.3), bg)
    return canvas


def _render_position(rng, label):
    canvas = _background(rng)
    bins = MINI_VTAB_TASKS["position"].num_classes
    x = (label + rng.uniform(0.05, 0.95)) * IMAGE_SIZE / bins
    _object(rng, canvas, _random_shape(rng), "solid", x, rng.uniform(5, 27), rng.uniform(3.0, 5.0),
            rng.uniform(0, 6.3), canvas.mean(axis=(0, 1)))
    return canvas


def _render_orientation(rng, label):
    canvas = _background(rng)
    bins = MINI_VTAB_TASKS["orientation"].num_classes
    angle = (label + rng.uniform(0.1, 0.9)) * math.pi / bins  # a bar looks the same turned by 180 degrees
    _object(rng, canvas, "bar", "solid", rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(8, 12), angle,
            canvas.mean(axis=(0, 1)))
    return canvas


_RENDERERS = {
    "digits": _render_digits, "textures": _render_textures, "cells": _render_cells,
    "landcover": _render_landcover, "count": _render_count, "position": _render_position,
    "orientation": _render_orientation,
}
assert set(_RENDERERS) == set(MINI_VTAB_TASKS)

SPLIT_SIZES = {"train800": 800, "val200": 200, "test": 500}


def render_task_image(task: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """One mini-VTAB image ``(32, 32, 3)`` uint8 of ``task`` with class ``label``."""
    return _finish(_RENDERERS[task](rng, label), rng)


def _balanced_labels(num_classes: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.resize(np.arange(num_classes), count))


def default_data_root(seed: int = 0) -> Path:
    """Where the generated mini-VTAB lives: ``$VISADAPT_CACHE`` (or ``~/.cache/visadapt``)/mini-vtab-v*-seed*."""
    base = os.environ.get("VISADAPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "visadapt")
    return Path(base) / f"mini-vtab-v{GENERATOR_VERSION}-seed{seed}"


MANIFEST = "mini_vtab.json"


def _complete(root: Path, wanted: dict, explicit_sizes: bool) -> bool:
    """Whether ``root`` holds a complete mini-VTAB as ``wanted`` (its manifest is written last, so it exists only
    in a complete folder). Without explicit sizes, any complete folder of this seed and generator version is
    reused."""
    try:
        found = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):  # absent, unreadable or a broken manifest: not complete
        return False
    if not isinstance(found, dict):
        return False
    return found == wanted or (not explicit_sizes and {**found, "split_sizes": wanted["split_sizes"]} == wanted)


def _write_suite(folder: Path, seed: int, sizes: dict[str, int], wanted: dict, bar: Progress) -> None:
    """Render every task into ``folder`` (fresh, private to this call), counting each image on ``bar``; the
    manifest is written last."""
    for task_index, (task, info) in enumerate(MINI_VTAB_TASKS.items()):
        task_dir = folder / task
        lines: dict[str, list[str]] = {}
        for split_index, (split, count) in enumerate(sizes.items()):
            (task_dir / "images" / split).mkdir(parents=True)
            labels = _balanced_labels(info.num_classes, count, np.random.default_rng([seed, task_index, split_index]))
            lines[split] = []
            for i, label in enumerate(labels):
                rng = np.random.default_rng([seed, task_index, split_index, i, 1])
                rel = f"images/{split}/{i:06d}.png"
                Image.fromarray(render_task_image(task, int(label), rng)).save(task_dir / rel, compress_level=1)
                lines[split].append(f"{rel} {int(label)}\n")
                bar.update(1)
        lines["train800val200"] = lines.get("train800", []) + lines.get("val200", [])
        for split, rows in lines.items():
            (task_dir / f"{split}.txt").write_text("".join(rows))
    (folder / MANIFEST).write_text(json.dumps(wanted, indent=1))


def _install(built: Path, root: Path) -> None:
    """Put the complete suite ``built`` at ``root``. Called with the generation lock held.

    ``root`` absent or empty: one ``rename`` (atomic: ``root`` appears complete). ``root`` holding other things
    (a folder the user also keeps other data in, or an older suite): only what the generator owns is replaced --
    the manifest is removed first (lock-free readers then see an incomplete folder and wait for the lock), each
    task folder is swapped in by rename, and the manifest comes last. Nothing else in ``root`` is touched.
    """
    try:
        os.rename(built, root)  # POSIX replaces an empty directory; fails on a non-empty one
        return
    except OSError:
        if not root.is_dir():
            raise
    (root / MANIFEST).unlink(missing_ok=True)
    trash = built.with_name(built.name + ".old")
    trash.mkdir()
    for task in MINI_VTAB_TASKS:
        if (root / task).exists() or (root / task).is_symlink():
            os.rename(root / task, trash / task)
        os.rename(built / task, root / task)
    os.replace(built / MANIFEST, root / MANIFEST)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(built, ignore_errors=True)


# Images one idle CPU core renders and writes per second, for the rough duration the first run announces: about
# half of what a 2-core AMD EPYC measured (10,500 images in 11.3 s, 2026-12-02), so that slower disks stay within
# the estimate. A machine busy with other work takes longer (the same one, shared by 7 jobs: 2 min 34 s), which is
# why progress follows the estimate.
_IMAGES_PER_SECOND = 500


def _seconds_estimate(images: int) -> str:
    """``"a minute"``-style wording of how long rendering ``images`` takes on one core."""
    seconds = images / _IMAGES_PER_SECOND
    if seconds < 90:
        return "a minute" if seconds >= 40 else f"{max(5, round(seconds, -1)):.0f} s"
    return f"{round(seconds / 60):.0f} minutes"


def generate_mini_vtab(root: str | os.PathLike | None = None, seed: int = 0,
                       split_sizes: dict[str, int] | None = None) -> Path:
    """Write the mini-VTAB suite to ``root`` in the NOAH VTAB-1k layout and return ``root``.

    Per task: ``images/{train800,val200,test}/NNNNNN.png`` and ``{train800,val200,train800val200,test}.txt``
    with lines ``<relative path> <label>``; ``train800val200.txt`` lists the train800 and val200 images (the
    same union NOAH's dump re-writes as copies). Labels are balanced per split. An existing complete folder
    (recognised by the ``mini_vtab.json`` manifest written last) is reused when it has the same seed, and
    the same sizes when ``split_sizes`` is given.

    Safe under concurrency (any number of processes on one machine, every rank of a multi-process launch):
    generation holds a lock file next to ``root`` (``.<root name>.lock``, ``filelock``) and re-checks for a
    complete folder once it has it, so one process generates and the others wait, then reuse its folder (on a
    filesystem without lock support, NFS without lockd, a soft lock file instead: see
    :func:`visadapt.data.generated.generation_lock`). The
    suite is built aside in ``.<root name>.gen-<pid>-<random>.tmp`` beside ``root`` and then renamed into place
    (see :func:`_install`), so a killed run leaves no half-written suite at ``root``; its temporary folder is
    removed by the next generation.
    """
    from visadapt.data.generated import generation_lock

    root = Path(root) if root is not None else default_data_root(seed)
    sizes = dict(SPLIT_SIZES if split_sizes is None else split_sizes)
    wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "split_sizes": sizes,
              "tasks": list(MINI_VTAB_TASKS)}
    if _complete(root, wanted, split_sizes is not None):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    fix = ("Put the generated data on a local disk: set VISADAPT_CACHE to a local folder (or pass a local "
           "data root)")
    with generation_lock(root.parent / f".{root.name}.lock", fix):
        if _complete(root, wanted, split_sizes is not None):  # another process generated it while we waited
            return root
        # Leftovers of a killed generation (only a lock holder writes these, and we hold the lock).
        for leftover in root.parent.glob(f".{root.name}.gen-*.tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
        built = root.parent / f".{root.name}.gen-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        images = len(MINI_VTAB_TASKS) * sum(sizes.values())
        # A first run spends this time before anything else happens: say what it is, where, and for how long.
        announce(f"generating the embedded mini-VTAB data once ({len(MINI_VTAB_TASKS)} tasks, {images} images of "
                 f"32x32 px, about {_seconds_estimate(images)} on an idle CPU core) into {root}; later runs reuse it")
        try:
            built.mkdir()
            with Progress(total=images, desc="mini-VTAB", unit="images") as bar:
                _write_suite(built, seed, sizes, wanted, bar)
            _install(built, root)
        finally:
            shutil.rmtree(built, ignore_errors=True)
    return root
