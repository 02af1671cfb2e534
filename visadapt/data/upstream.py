"""The upstream corpus of the embedded backbones: broad procedural scenes with free labels.

An image (32x32 RGB, deterministic from its ``rng``) is a scene of one to four objects drawn from
:data:`CATEGORIES` (10 geometric shapes, the digits 0-9 and 12 letters in a stroke font of random thickness,
slant, aspect and per-vertex jitter, so every glyph comes in many styles), each filled with one of six patterns
in random colours, at any position and scale (partly outside the frame too), overlapping (later objects occlude
earlier ones), on a background that is flat, value noise at one of several scales, a gradient, stripes, a checker
or dots, then lit by a smooth brightness field with a colour cast, and finished with pixel noise of random
strength. The label is the multi-hot presence vector over the categories, so that the supervised part of the
upstream objective names *what* is in a scene, while the masked-image part (``train/pretrain_backbone.py``)
keeps *where* and *how it looks*.

The downstream mini-VTAB tasks (:mod:`visadapt.data.procedural`) are drawn by their own code: seven-segment
digits, not this stroke font; no count, position or orientation label is ever trained upstream.
"""
from __future__ import annotations

import math
from itertools import pairwise

import numpy as np

from visadapt.data.procedural import (
    _GX,
    UPSTREAM_FILLS,
    UPSTREAM_SHAPES,
    _color,
    _contrasting,
    _downsample,
    _local,
    _pattern,
    _shape_mask,
    _smooth_noise,
    _stripes,
    _two_tone,
)

#: bump when the drawing changes: a backbone's file records the version of the corpus it was trained on
UPSTREAM_VERSION = 2

# Glyphs as polylines in a unit box x in [-0.5, 0.5], y in [-1, 1] (y down). Straight strokes only: curves come
# from the jitter, the slant and the rotation rather than from a second font.
_DIGIT_STROKES = {
    "0": [[(-0.45, -0.7), (0.0, -1.0), (0.45, -0.7), (0.45, 0.7), (0.0, 1.0), (-0.45, 0.7), (-0.45, -0.7)]],
    "1": [[(-0.25, -0.65), (0.05, -1.0), (0.05, 1.0)], [(-0.3, 1.0), (0.35, 1.0)]],
    "2": [[(-0.45, -0.6), (-0.15, -1.0), (0.3, -1.0), (0.5, -0.6), (-0.5, 1.0), (0.5, 1.0)]],
    "3": [[(-0.5, -1.0), (0.45, -1.0), (-0.05, -0.1), (0.45, 0.3), (0.3, 1.0), (-0.5, 0.9)]],
    "4": [[(0.2, 1.0), (0.2, -1.0), (-0.5, 0.4), (0.5, 0.4)]],
    "5": [[(0.45, -1.0), (-0.4, -1.0), (-0.5, -0.05), (0.3, -0.1), (0.5, 0.5), (0.2, 1.0), (-0.5, 0.9)]],
    "6": [[(0.4, -1.0), (-0.4, -0.2), (-0.5, 0.6), (0.0, 1.0), (0.5, 0.6), (0.3, 0.1), (-0.45, 0.2)]],
    "7": [[(-0.5, -1.0), (0.5, -1.0), (-0.1, 1.0)]],
    "8": [[(0.0, -0.1), (-0.4, -0.55), (0.0, -1.0), (0.4, -0.55), (0.0, -0.1), (-0.5, 0.5), (0.0, 1.0),
           (0.5, 0.5), (0.0, -0.1)]],
    "9": [[(0.45, -0.2), (-0.3, -0.1), (-0.5, -0.6), (0.0, -1.0), (0.5, -0.6), (0.45, -0.2), (-0.3, 1.0)]],
}
_LETTER_STROKES = {
    "A": [[(-0.5, 1.0), (0.0, -1.0), (0.5, 1.0)], [(-0.25, 0.25), (0.25, 0.25)]],
    "E": [[(0.5, -1.0), (-0.5, -1.0), (-0.5, 1.0), (0.5, 1.0)], [(-0.5, 0.0), (0.3, 0.0)]],
    "F": [[(0.5, -1.0), (-0.5, -1.0), (-0.5, 1.0)], [(-0.5, 0.0), (0.3, 0.0)]],
    "H": [[(-0.5, -1.0), (-0.5, 1.0)], [(0.5, -1.0), (0.5, 1.0)], [(-0.5, 0.0), (0.5, 0.0)]],
    "K": [[(-0.5, -1.0), (-0.5, 1.0)], [(0.5, -1.0), (-0.5, 0.1), (0.5, 1.0)]],
    "L": [[(-0.5, -1.0), (-0.5, 1.0), (0.5, 1.0)]],
    "M": [[(-0.5, 1.0), (-0.5, -1.0), (0.0, 0.2), (0.5, -1.0), (0.5, 1.0)]],
    "N": [[(-0.5, 1.0), (-0.5, -1.0), (0.5, 1.0), (0.5, -1.0)]],
    "T": [[(-0.5, -1.0), (0.5, -1.0)], [(0.0, -1.0), (0.0, 1.0)]],
    "V": [[(-0.5, -1.0), (0.0, 1.0), (0.5, -1.0)]],
    "X": [[(-0.5, -1.0), (0.5, 1.0)], [(0.5, -1.0), (-0.5, 1.0)]],
    "Y": [[(-0.5, -1.0), (0.0, 0.0), (0.5, -1.0)], [(0.0, 0.0), (0.0, 1.0)]],
}
GLYPHS = {**_DIGIT_STROKES, **_LETTER_STROKES}
#: what a scene's label vector counts: presence of each shape and each glyph
CATEGORIES = tuple(UPSTREAM_SHAPES) + tuple(f"glyph-{g}" for g in GLYPHS)
NUM_CATEGORIES = len(CATEGORIES)
_BACKGROUNDS = ("flat", "noise", "gradient", "stripes", "checker", "dots")


def _segment_distance(u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance from each grid point ``(u, v)`` to the segment ``a``-``b`` (same units)."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(u - ax - t * dx, v - ay - t * dy)


def _glyph_mask(glyph: str, rng: np.random.Generator, cx: float, cy: float, height: float,
                angle: float) -> np.ndarray:
    """A glyph of :data:`GLYPHS` in a random style: stroke thickness, slant, aspect and vertex jitter."""
    u, v = _local(cx, cy, height / 2, angle)  # unit = half the glyph's height, so y spans [-1, 1]
    slant = rng.uniform(-0.35, 0.35)
    aspect = rng.uniform(0.7, 1.4)
    u = (u + slant * v) / aspect
    thickness = rng.uniform(0.09, 0.22)
    jitter = rng.uniform(0.0, 0.12)
    mask = np.zeros(u.shape, dtype=bool)
    for line in GLYPHS[glyph]:
        points = [(x + rng.normal(0, jitter), y + rng.normal(0, jitter)) for x, y in line]
        for a, b in pairwise(points):
            mask |= _segment_distance(u, v, a, b) <= thickness
    return mask


def _scene_background(rng: np.random.Generator) -> np.ndarray:
    """``(S*H, S*W, 3)`` floats in [0, 1]: one of :data:`_BACKGROUNDS` in two random colours, any contrast."""
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    if kind == "flat":
        tex = np.full_like(_GX, 0.5)
    elif kind == "noise":
        tex = _smooth_noise(rng, int(rng.choice([2, 4, 8, 16])))
    elif kind == "gradient":
        tex = _pattern("gradient", rng)
    elif kind == "stripes":
        tex = _stripes(rng.uniform(0, math.pi), rng.uniform(3, 12), rng.uniform(0, 6))
    else:
        tex = _pattern(kind, rng)
    a = _color(rng)
    b = np.clip(a + rng.uniform(-0.5, 0.5, 3) * rng.uniform(0.1, 1.0), 0, 1)
    return _two_tone(tex, a, b)


#: side of the per-patch label map: one label per 4x4 patch of the 32x32 image
PATCH_GRID = 8
#: the label of a patch that no object covers the most of
BACKGROUND = NUM_CATEGORIES


def render_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One upstream image ``(32, 32, 3)`` uint8, its presence label ``(NUM_CATEGORIES,)`` float32 in {0, 1} and
    its patch labels ``(PATCH_GRID, PATCH_GRID)`` uint8: the category covering most of each 4x4 patch, else
    :data:`BACKGROUND`."""
    canvas = _scene_background(rng)
    label = np.zeros(NUM_CATEGORIES, dtype=np.float32)
    owner = np.full(_GX.shape, BACKGROUND, dtype=np.int64)
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    for _ in range(count):
        category = int(rng.integers(NUM_CATEGORIES))
        size = rng.uniform(7.0, 16.0) / (1.0 + 0.2 * (count - 1))
        cx, cy = rng.uniform(-0.2, 1.2, 2) * 32  # may be cut by the border, as in a crop of a larger scene
        cx, cy = np.clip([cx, cy], size * 0.3, 32 - size * 0.3)
        angle = rng.uniform(0, 2 * math.pi)
        name = CATEGORIES[category]
        if name.startswith("glyph-"):
            mask = _glyph_mask(name[len("glyph-"):], rng, cx, cy, 2.0 * size, rng.uniform(-0.7, 0.7))
            fill = "solid" if rng.random() < 0.6 else UPSTREAM_FILLS[int(rng.integers(len(UPSTREAM_FILLS)))]
        else:
            mask = _shape_mask(name, *_local(cx, cy, size, angle))
            fill = UPSTREAM_FILLS[int(rng.integers(len(UPSTREAM_FILLS)))]
        if not mask.any():
            continue
        local_mean = canvas[mask].mean(axis=0)
        a = _contrasting(rng, local_mean, rng.uniform(0.2, 0.6))
        b = _contrasting(rng, a, 0.3)
        canvas[mask] = _two_tone(_pattern(fill, rng), a, b)[mask]
        owner[mask] = category
        label[category] = 1.0
    # Lighting: a smooth brightness field and a colour cast over the whole scene.
    light = 0.6 + 0.7 * _smooth_noise(rng, int(rng.integers(1, 4)))
    canvas = canvas * light[..., None] * (1.0 + rng.uniform(-0.15, 0.15, 3))
    img = _downsample(np.clip(canvas, 0, 1)) + rng.normal(0, rng.uniform(0.0, 0.06), (32, 32, 3))
    cell = owner.shape[0] // PATCH_GRID
    votes = owner.reshape(PATCH_GRID, cell, PATCH_GRID, cell).transpose(0, 2, 1, 3).reshape(PATCH_GRID ** 2, -1)
    patches = np.array([np.bincount(v, minlength=NUM_CATEGORIES + 1).argmax() for v in votes], dtype=np.uint8)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label, patches.reshape(PATCH_GRID, PATCH_GRID)
