"""Multi-task dense prediction data: procedural scenes (the embedded default), PASCAL-Context (MTLoRA layout),
and the joint transforms that keep image, label maps and surface normals consistent.

Every dataset here yields the same sample dict (the interface the dense heads, losses and metrics share)::

    {"image": float32 (3, H, W) normalised,
     "semseg": int64 (H, W) class ids, 255 = ignore,
     "human_parts": int64 (H, W) part ids, 255 = ignore (an image without a person is all 255),
     "sal": int64 (H, W) in {0, 1}, 255 = ignore,
     "normals": float32 (3, H, W) unit vectors, 255.0 in all three channels where ignored}

restricted to the dataset's ``tasks``; ``task_outputs`` gives each task's prediction channels.

**Normal vectors** are in the image frame: x points right (image columns), y points *down* (image rows), z
points towards the viewer. A horizontal flip therefore negates x, and an on-screen counter-clockwise rotation
by ``a`` maps ``(x, y)`` to ``(x cos a + y sin a, -x sin a + y cos a)``: the rule MTLoRA's ``ScaleNRotate``
applies to PASCAL's distilled normals.

The procedural world (:class:`ProceduralDenseScenes`, :func:`render_dense_scene`)
---------------------------------------------------------------------------------
A scene is a relief lit by one distant light, rendered with numpy at 2x supersampling and box-filtered down:

* **Background**: a rolling terrain (a plane tilted by at most 8 degrees plus two sinusoidal undulations of
  16-48 px wavelength at 64 px, each 5-25 degrees steep) with a muted, faintly mottled colour.
* **Objects**: 2-6 shapes standing on it, each a *height field* whose analytic normals are the ground truth:

  ==========  =====  ==========================================================================
  class       id     silhouette and relief
  ==========  =====  ==========================================================================
  background  0      the terrain
  disc        1      a disc: dome, cone, half-cylinder or tilted slab (ramp)
  box         2      a square: pillow dome, four-sided pyramid, half-cylinder or ramp
  tent        3      an upright triangle: dome, three-sided pyramid, half-cylinder or ramp
  star        4      a five-pointed star: half-cylinder or ramp
  person      5      an upright figure (rotated by at most 15 degrees) built of parts: a
                     hemispherical head, an ellipsoidal torso, two arms and two legs (cylinders)
  ==========  =====  ==========================================================================

* **Shading**: colour = albedo x (ambient + (1 - ambient) max(0, n . l)), with the light ``l`` coming from the
  upper left (azimuth 135 +- 35 degrees, elevation 35-60 degrees) and ambient 0.25-0.4. Albedo is the object's
  colour times a faint texture (value noise or stripes, at most +-15%), so shading carries the normals.
* **Saliency** marks the *hero*: in each image exactly one object is drawn much larger than the others
  (at 64 px, a shape 14-19 px in radius against 5.5-9.5 px, a person 16-20 px in half-height against 9-12 px;
  every length scales with the image size), in a saturated colour while the others are greyish, towards the
  centre and in front of everything. ``sal`` is 1 on it and 0 elsewhere, so it is what draws the eye.
* **Human parts** are labelled inside the person class only, by which part of the figure a pixel shows:
  1 head, 2 torso, 3 arms, 4 legs; 0 elsewhere. Half the images hold a person; an image in which no person
  pixel is visible is all 255 (unlabelled), as PASCAL images without people are.
* **Labels at pixel level**: each output pixel covers 2x2 rendered samples; its labels (class, part, saliency,
  normal) are those of one of them: the sample whose object covers most of the pixel, ties going to the
  object in front. All four tasks therefore describe the same surface point, and the normal of a pixel is an
  exact analytic normal (stored as int8, i.e. to within 0.4 degrees), never a blend across an edge.

Each scene is drawn from ``numpy.random.default_rng([tag, seed, split, index])``: the same seed and index give
the same scene on every machine, and train and val draw from different streams, so they are disjoint.

PASCAL-Context multi-task (:class:`PascalContextMultiTask`)
-----------------------------------------------------------
The ``PASCAL_MT.tgz`` archive of ASTMT / MTLoRA, extracted under ``root``::

    JPEGImages/<id>.jpg
    ImageSets/Context/{train,val}.txt                   one image id per line
    semseg/VOC12/<id>.png  (else semseg/pascal-context/<id>.png)    21 classes, 255 = ignore
    human_parts/<id>.mat                                PASCAL-Part annotation (person = class 15)
    normals_distill/<id>.png                            RGB, decoded 2 v / 255 - 1
    pascal-context/trainval/<id>.mat                    ``LabelMap`` of the 459 context classes (normals mask)
    sal_distill/<id>.png                                grey, foreground where v / 255 > 0.5

MTLoRA also reads three ``data/db_info/*.json`` files that are not in the archive. visadapt needs only two
facts from them, written into this module: the six person-part groups (:data:`PASCAL_PERSON_PART_GROUPS`,
MTLoRA's ``HUMAN_PART[6]``) and the context classes on which distilled normals are kept
(:data:`PASCAL_NORMALS_VALID_CLASSES`: the NYU classes that are also context classes, plus ``tvmonitor``).
MTLoRA's ``ImageSets/Parts/*.txt`` cache (which images hold a person) is not needed: the part file is read
anyway. Reading ``.mat`` files (human parts, and the normals mask) needs scipy, an optional dependency.
"""
from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from visadapt.data.errors import DatasetError
from visadapt.data.procedural import _polygon, _regular, _star, default_data_root
from visadapt.data.transforms import resolve_normalization
from visadapt.data.vtab import decode_image
from visadapt.names import DENSE_TASKS
from visadapt.progress import Progress

IGNORE_INDEX = 255

# ------------------------------------------------------------------------------------------ label tables

SCENE_CLASSES = ("background", "disc", "box", "tent", "star", "person")
SCENE_PERSON_CLASS = SCENE_CLASSES.index("person")
SCENE_PARTS = ("background", "head", "torso", "arms", "legs")
SCENE_TASK_OUTPUTS = {"semseg": len(SCENE_CLASSES), "human_parts": len(SCENE_PARTS), "sal": 1, "normals": 3}
SCENE_SPLIT_SIZES = {"train": 2000, "val": 500}

PASCAL_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                  "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                  "train", "tvmonitor")
PASCAL_PERSON_CLASS = PASCAL_CLASSES.index("person")  # 15, the class_ind of persons in PASCAL-Part
PASCAL_PARTS = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")
PASCAL_TASK_OUTPUTS = {"semseg": len(PASCAL_CLASSES), "human_parts": len(PASCAL_PARTS), "sal": 1, "normals": 3}
PASCAL_SPLITS = ("train", "val")
PASCAL_MT_URL = "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz"

# PASCAL-Part person part name -> one of the 6 groups of PASCAL_PARTS (MTLoRA/ASTMT's 6-part setting).
PASCAL_PERSON_PART_GROUPS = {
    "hair": 1, "head": 1, "lear": 1, "rear": 1, "lebrow": 1, "rebrow": 1, "leye": 1, "reye": 1, "nose": 1,
    "mouth": 1,
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5,
    "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}

# Context classes (ids of the 459-class LabelMap) on which the distilled normals are kept: the classes of
# MTLoRA's data/db_info/nyu_classes.json that are also in context_classes.json ("unknown" excepted), plus
# tvmonitor. Everywhere else the normals target is ignored (the distillation teacher was trained on NYUD).
_NYU_COMPATIBLE_CONTEXT_CLASSES = {
    3: "air conditioner", 4: "antenna", 6: "ashtray", 9: "bag", 10: "ball", 11: "balloon", 13: "barrel",
    15: "basket", 17: "bathtub", 18: "bed", 22: "bench", 23: "bicycle", 29: "blackboard", 30: "board",
    33: "book", 34: "bottle", 36: "bowl", 37: "box", 38: "bracelet", 39: "brick", 41: "broom",
    43: "bucket", 46: "cabinet", 49: "cake", 50: "calculator", 51: "calendar", 53: "camera", 55: "can",
    56: "candle", 59: "car", 61: "cart", 62: "case", 65: "cat", 66: "cd", 68: "ceiling", 69: "cell phone",
    72: "chair", 73: "chessboard", 78: "clock", 83: "coffee machine", 84: "comb", 85: "computer",
    87: "cone", 88: "container", 95: "corkscrew", 96: "counter", 101: "crate", 104: "cup", 105: "curtain",
    107: "cutting board", 111: "dishwasher", 113: "dog", 115: "door", 122: "drum", 124: "duck",
    135: "envelope", 141: "fan", 142: "faucet", 143: "fax machine", 146: "fire extinguisher",
    150: "fish tank", 154: "flag", 157: "flashlight", 158: "floor", 159: "flower", 165: "fork",
    172: "fruit", 174: "furnace", 181: "glass", 183: "globe", 184: "glove", 191: "guitar", 193: "hammer",
    195: "handle", 197: "hanger", 199: "hat", 202: "heater", 213: "ipod", 215: "ironing board", 216: "jar",
    219: "key", 220: "keyboard", 223: "knife", 225: "ladder", 228: "laptop", 230: "lid", 232: "light",
    233: "light bulb", 238: "lock", 239: "machine", 242: "map", 243: "mask", 246: "mattress",
    250: "microphone", 251: "microwave", 252: "mirror", 255: "money", 260: "mouse", 261: "mouse pad",
    263: "napkin", 269: "oven", 272: "pan", 273: "paper", 275: "paper cutter", 281: "pen", 283: "pencil",
    284: "person", 285: "photo", 286: "piano", 287: "picture", 288: "pig", 290: "pillow", 291: "pipe",
    292: "pitcher", 293: "plant", 295: "plate", 304: "pool table", 307: "pot", 309: "printer",
    310: "projector", 314: "radiator", 315: "radio", 319: "range hood", 323: "remote control", 329: "rope",
    330: "rug", 331: "ruler", 336: "scale", 342: "sculpture", 345: "sewing machine", 349: "shelves",
    350: "shoe", 351: "shopping cart", 352: "shovel", 355: "sign", 357: "sink", 368: "sofa", 370: "spatula",
    371: "speaker", 374: "spoon", 379: "stapler", 380: "stick", 383: "stool", 384: "stove", 397: "table",
    401: "tape", 403: "telephone", 405: "tent", 407: "toaster", 408: "toilet", 411: "toothbrush",
    412: "towel", 413: "toy", 414: "toy car", 417: "trampoline", 419: "tray", 421: "tricycle",
    423: "trophy", 427: "tvmonitor", 429: "typewriter", 430: "umbrella", 432: "vacuum cleaner", 440: "wall",
    441: "wallet", 442: "wardrobe", 443: "washing machine", 444: "watch", 446: "water dispenser",
    454: "window", 457: "wire",
}
PASCAL_NORMALS_VALID_CLASSES = tuple(sorted(_NYU_COMPATIBLE_CONTEXT_CLASSES))


def resolve_tasks(tasks: Iterable[str] | None, available: Sequence[str] = DENSE_TASKS) -> tuple[str, ...]:
    """``tasks`` as a tuple in the canonical order of ``available`` (all of them for ``None``)."""
    if tasks is None:
        return tuple(available)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.replace(",", " ").split() if t]
    wanted = list(tasks)
    if not wanted:
        raise ValueError(f"no dense task given; choose among {', '.join(available)}")
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ValueError(f"unknown dense task(s) {', '.join(map(str, unknown))}; choose among {', '.join(available)}")
    return tuple(t for t in available if t in wanted)


# ------------------------------------------------------------------------------------ joint transforms


def _normal_validity(normals: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: pixels whose normal is a target (no channel holds the ignore value)."""
    return (normals != IGNORE_INDEX).all(dim=0)


def hflip_sample(sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mirror every map of a dense sample left-right; normals also get their x component negated.

    Works on any subset of the keys ``image`` ``(3, H, W)``, label maps ``(H, W)`` and ``normals`` ``(3, H, W)``
    (ignored normal pixels keep 255 in every channel).
    """
    out = {}
    for key, value in sample.items():
        flipped = value.flip(-1)  # a copy, safe to edit
        if key == "normals":
            flipped[0] = torch.where(_normal_validity(flipped), -flipped[0], flipped[0])
        out[key] = flipped
    return out


def _sample_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an ``(H, W)`` integer map; pixels that come from outside become ignore."""
    # Shifted by one so that grid_sample's zero padding marks "outside" distinctly from class 0.
    warped = F.grid_sample((labels.double() + 1)[None, None], grid.double(), mode="nearest",
                           padding_mode="zeros", align_corners=False)[0, 0].round().long()
    return torch.where(warped == 0, torch.full_like(warped, IGNORE_INDEX), warped - 1)


def _finish_normals(vectors: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Unit-length ``(3, H, W)`` normals from interpolated ``vectors``; ignore where ``support`` < 0.5 or the
    interpolated vector vanished."""
    norm = vectors.norm(dim=0)
    valid = (support >= 0.5) & (norm > 1e-6)
    unit = vectors / norm.clamp_min(1e-12)
    return torch.where(valid[None], unit, torch.full_like(unit, float(IGNORE_INDEX)))


def scale_rotate_sample(sample: Mapping[str, torch.Tensor], angle: float, scale: float) -> dict[str, torch.Tensor]:
    """Rotate a dense sample by ``angle`` degrees (counter-clockwise on screen) and zoom it by ``scale`` about
    the image centre, keeping its size (as OpenCV's ``getRotationMatrix2D`` + ``warpAffine`` in MTLoRA).

    The image is resampled bicubically (clamped to [0, 1], zeros where it comes from outside), label maps by
    nearest neighbour (ignore where they come from outside: MTLoRA pads them with 0, i.e. background), and
    normals bilinearly over valid pixels, renormalised, with their in-plane part turned by ``angle``.
    """
    ref = next(iter(sample.values()))
    height, width = ref.shape[-2:]
    rad = math.radians(angle)
    cos, sin = math.cos(rad) / scale, math.sin(rad) / scale
    # Output -> input in normalised coordinates; the aspect factors keep the rotation rigid in pixels.
    theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]])
    grid = F.affine_grid(theta[None], [1, 1, height, width], align_corners=False)
    out = {}
    for key, value in sample.items():
        if key == "image":
            warped = F.grid_sample(value[None].float(), grid, mode="bicubic", padding_mode="zeros",
                                   align_corners=False)[0]
            out[key] = warped.clamp_(0.0, 1.0)
        elif key == "normals":
            valid = _normal_validity(value)
            vec = torch.where(valid[None], value, torch.zeros_like(value)).float()
            c, s = math.cos(rad), math.sin(rad)
            turned = torch.stack([vec[0] * c + vec[1] * s, -vec[0] * s + vec[1] * c, vec[2]])
            moved = F.grid_sample(turned[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
            support = F.grid_sample(valid[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                    align_corners=False)[0, 0]
            out[key] = _finish_normals(moved, support)
        else:
            out[key] = _sample_labels(value, grid)
    return out


def resize_sample(sample: Mapping[str, torch.Tensor], size: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resize every map of a dense sample to ``size`` (``(H, W)`` or a side): the image bicubically with
    anti-aliasing, label maps by nearest neighbour (pixel centres), normals bilinearly over valid pixels and
    renormalised (MTLoRA renormalises after resizing too). A sample already at ``size`` is returned as is."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    ref = next(iter(sample.values()))
    if tuple(ref.shape[-2:]) == target:
        return dict(sample)
    out = {}
    for key, value in sample.items():
        if key == "image":
            out[key] = F.interpolate(value[None].float(), size=target, mode="bicubic", align_corners=False,
                                     antialias=True)[0].clamp_(0.0, 1.0)
        elif key == "normals":
            valid = _normal_validity(value)
            vec = torch.where(valid[None], value, torch.zeros_like(value)).float()
            moved = F.interpolate(vec[None], size=target, mode="bilinear", align_corners=False, antialias=True)[0]
            support = F.interpolate(valid[None, None].float(), size=target, mode="nearest-exact")[0, 0]
            out[key] = _finish_normals(moved, support)
        else:
            out[key] = F.interpolate(value[None, None].float(), size=target, mode="nearest-exact")[0, 0].long()
    return out


class DenseTransform:
    """MTLoRA's PASCAL-Context pre-processing for a dense sample, then image normalisation.

    Training (``train=True``): horizontal flip with probability 0.5, rotation uniform in
    ``[-rotation, rotation]`` degrees and zoom uniform in ``scale_range`` about the centre
    (:func:`scale_rotate_sample`), then :func:`resize_sample` to ``size``. Evaluation: the resize only.
    Random draws use torch's generator, so ``torch.manual_seed`` and DataLoader worker seeding govern them.

    Input: a sample whose ``image`` is ``(3, H, W)`` float in [0, 1]; output: the same keys at
    ``(size, size)`` with the image normalised by ``normalization`` (``(mean, std)``, ``None`` or a choice
    string of :func:`~visadapt.data.transforms.resolve_normalization`).
    """

    def __init__(self, size: int, train: bool, normalization="imagenet", rotation: float = 20.0,
                 scale_range: tuple[float, float] = (0.75, 1.25), flip: bool = True):
        self.size = int(size)
        self.train = bool(train)
        self.normalization = resolve_normalization(normalization) if isinstance(normalization, str) else normalization
        if self.normalization is not None and (len(self.normalization) != 2 or len(self.normalization[0]) != 3):
            raise ValueError(f"normalization must be (mean, std) with 3 values each, None or a choice string; "
                             f"got {normalization!r}")
        self.rotation = float(rotation)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip

    def __call__(self, sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(sample)
        if self.train:
            if self.flip and float(torch.rand(())) < 0.5:
                out = hflip_sample(out)
            angle = (2 * float(torch.rand(())) - 1) * self.rotation
            low, high = self.scale_range
            scale = low + (high - low) * float(torch.rand(()))
            if angle != 0.0 or scale != 1.0:
                out = scale_rotate_sample(out, angle, scale)
        out = resize_sample(out, self.size)
        if self.normalization is not None:
            mean, std = self.normalization
            out["image"] = (out["image"] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return out

    def __repr__(self) -> str:
        mode = (f"train: flip, rotate +-{self.rotation:g} deg, scale {self.scale_range[0]:g}-{self.scale_range[1]:g}"
                if self.train else "eval")
        return f"DenseTransform(size={self.size}, {mode}, normalization={self.normalization})"


# ------------------------------------------------------------------------------- procedural rendering

DENSE_GENERATOR_VERSION = 1  # bump when the drawing changes, so cached scenes of an older version are not reused
_SUPERSAMPLE = 2
_STREAM_TAG = 0xD3  # keeps these draws apart from the other generators' streams of the same seed
_SPLIT_STREAM = {"train": 0, "val": 1}
_NORMAL_QUANT = 127  # normals are cached as int8: round(n * 127)

_TRIANGLE = _regular(3, 1.0, -math.pi / 2)  # apex up (y points down)
_TRIANGLE_FACETS = np.array([[math.cos(a), math.sin(a)] for a in (-math.pi / 6, math.pi / 2, 7 * math.pi / 6)])
_TRIANGLE_APOTHEM = 0.5
_STAR_VERTICES = _star()
_BOX_HALF = 0.8
# (centre, half extent) of each silhouette along its local v axis: the cross-section of a half-cylinder.
_V_EXTENT = {"disc": (0.0, 1.0), "box": (0.0, _BOX_HALF),
             "tent": ((-1.0 + 0.5) / 2, (0.5 + 1.0) / 2),
             "star": ((min(v for _, v in _STAR_VERTICES) + max(v for _, v in _STAR_VERTICES)) / 2,
                      (max(v for _, v in _STAR_VERTICES) - min(v for _, v in _STAR_VERTICES)) / 2)}
_RELIEFS = {"disc": ("dome", "pyramid", "cylinder", "ramp"), "box": ("dome", "pyramid", "cylinder", "ramp"),
            "tent": ("dome", "pyramid", "cylinder", "ramp"), "star": ("cylinder", "ramp")}
_SHAPES = ("disc", "box", "tent", "star")
_OBJECT_RADIUS = 1.2  # every object lies within this many units of its centre (for its bounding box)


@dataclasses.dataclass(frozen=True)
class DenseScene:
    """One procedural scene at output resolution (numpy, ``H = W = size``).

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        semseg: ``(H, W)`` uint8 class ids of :data:`SCENE_CLASSES`.
        human_parts: ``(H, W)`` uint8 part ids of :data:`SCENE_PARTS`, all 255 when no person is visible.
        sal: ``(H, W)`` uint8, 1 on the hero object.
        normals: ``(H, W, 3)`` float32 unit normals (x right, y down, z towards the viewer).
        instances: ``(H, W)`` uint8, 0 = background, k = the k-th object drawn (the hero is drawn last).
        hero: the instance id of the salient object.
        light: ``(3,)`` unit vector towards the light.
    """

    image: np.ndarray
    semseg: np.ndarray
    human_parts: np.ndarray
    sal: np.ndarray
    normals: np.ndarray
    instances: np.ndarray
    hero: int
    light: np.ndarray


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled sample centres (x, y), each ``(S*size, S*size)`` float32, in output-pixel units."""
    axis = ((np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE).astype(np.float32)
    gx, gy = np.meshgrid(axis, axis)
    gx.flags.writeable = gy.flags.writeable = False
    return gx, gy


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _value_noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, period: float, extent: float) -> np.ndarray:
    """Smooth value noise in [0, 1] at points ``(x, y)`` (pixel units), one lattice cell per ``period`` px."""
    cells = math.ceil(extent / period) + 2
    lattice = rng.random((cells + 1, cells + 1)).astype(np.float32)
    fx, fy = x / period, y / period
    ix, iy = np.clip(np.floor(fx).astype(int), 0, cells - 1), np.clip(np.floor(fy).astype(int), 0, cells - 1)
    tx, ty = fx - ix, fy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    top = lattice[iy, ix] * (1 - tx) + lattice[iy, ix + 1] * tx
    bottom = lattice[iy + 1, ix] * (1 - tx) + lattice[iy + 1, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


def _texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, scale: float, extent: float) -> np.ndarray:
    """A faint multiplicative albedo texture around 1 (at most +-15%)."""
    amplitude = rng.uniform(0.0, 0.3)
    if rng.random() < 0.5:
        pattern = _value_noise(rng, x, y, rng.uniform(3.0, 8.0) * scale, extent)
    else:
        angle, period = rng.uniform(0, math.pi), rng.uniform(3.0, 6.0) * scale
        pattern = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period
                                     + rng.uniform(0, 2 * math.pi))
    return 1.0 + amplitude * (pattern - 0.5)


def _unit(nx: np.ndarray, ny: np.ndarray, nz: np.ndarray) -> np.ndarray:
    """Stack and normalise to ``(..., 3)`` float32 unit vectors."""
    nx, ny, nz = np.broadcast_arrays(nx, ny, nz)
    inverse = 1.0 / np.maximum(np.sqrt(nx * nx + ny * ny + nz * nz), 1e-12)
    out = np.empty((*nx.shape, 3), dtype=np.float32)
    out[..., 0], out[..., 1], out[..., 2] = nx * inverse, ny * inverse, nz * inverse
    return out


def _convex_gauge(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(g, gu, gv)``: the silhouette's gauge ``g`` (``g <= 1`` inside, 0 at the centre) and its gradient in
    the local frame scaled by the inradius, which is the unit outward direction of the nearest facet."""
    if shape == "disc":
        r = np.hypot(u, v)
        safe = np.maximum(r, 1e-6)
        return r, u / safe, v / safe
    if shape == "box":
        across = np.abs(u) >= np.abs(v)
        g = np.maximum(np.abs(u), np.abs(v)) / _BOX_HALF
        return g, np.where(across, np.sign(u), 0.0), np.where(across, 0.0, np.sign(v))
    if shape == "tent":
        proj = u[..., None] * _TRIANGLE_FACETS[:, 0] + v[..., None] * _TRIANGLE_FACETS[:, 1]
        facet = proj.argmax(axis=-1)
        return proj.max(axis=-1) / _TRIANGLE_APOTHEM, _TRIANGLE_FACETS[facet, 0], _TRIANGLE_FACETS[facet, 1]
    raise KeyError(f"{shape} has no convex gauge")


def _silhouette(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "box":
        return (np.abs(u) <= _BOX_HALF) & (np.abs(v) <= _BOX_HALF)
    if shape == "tent":
        return _polygon(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon(u, v, _STAR_VERTICES)
    raise KeyError(shape)


def _shape_relief(rng: np.random.Generator, shape: str, u: np.ndarray, v: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mask and normals ``(h, w, 3)`` in the local frame (u right, v down, z up) of one shape's height field."""
    mask = _silhouette(shape, u, v)
    relief = _RELIEFS[shape][int(rng.integers(len(_RELIEFS[shape])))]
    if relief == "dome":  # h = A * sqrt(1 - g^2): n ~ (A g grad g, sqrt(1 - g^2))
        g, gu, gv = _convex_gauge(shape, u, v)
        flatness = rng.uniform(0.6, 1.0)
        g = np.minimum(g, 1.0)
        normals = _unit(flatness * g * gu, flatness * g * gv, np.sqrt(1.0 - g * g))
    elif relief == "pyramid":  # h = tan(b) * (1 - g): planar facets tilted by b
        _, gu, gv = _convex_gauge(shape, u, v)
        slope = math.tan(math.radians(rng.uniform(25.0, 50.0)))
        normals = _unit(slope * gu, slope * gv, np.ones_like(u))
    elif relief == "cylinder":  # a half-cylinder lying along u: n ~ (0, A t, sqrt(1 - t^2))
        centre, half = _V_EXTENT[shape]
        t = np.clip((v - centre) / half, -1.0, 1.0)
        height = rng.uniform(0.6, 1.0)
        normals = _unit(np.zeros_like(u), height * t, np.sqrt(1.0 - t * t))
    else:  # ramp: a slab whose top is a plane tilted by b towards a random direction
        slope, direction = math.tan(math.radians(rng.uniform(15.0, 45.0))), rng.uniform(0, 2 * math.pi)
        normals = _unit(np.full_like(u, slope * math.cos(direction)), np.full_like(u, slope * math.sin(direction)),
                        np.ones_like(u))
    return mask, normals


def _limb(u, v, start, end, half_width) -> tuple[np.ndarray, np.ndarray]:
    """Mask and local-frame normals of a cylinder (arm, leg) from ``start`` to ``end``."""
    du, dv = end[0] - start[0], end[1] - start[1]
    length = math.hypot(du, dv)
    au, av = du / length, dv / length
    along = (u - start[0]) * au + (v - start[1]) * av
    t = ((u - start[0]) * -av + (v - start[1]) * au) / half_width
    mask = (along >= 0) & (along <= length) & (np.abs(t) <= 1.0)
    t = np.clip(t, -1.0, 1.0)
    return mask, _unit(-av * t, au * t, np.sqrt(1.0 - t * t))


def _person_relief(rng: np.random.Generator, u: np.ndarray, v: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask, part ids ``(h, w)`` and local-frame normals of an upright figure (unit: half its height)."""
    mask = np.zeros(u.shape, dtype=bool)
    parts = np.zeros(u.shape, dtype=np.uint8)
    normals = np.zeros((*u.shape, 3), dtype=np.float32)

    def paint(part_mask, part_normals, part_id):
        mask[part_mask] = True
        parts[part_mask] = part_id
        normals[part_mask] = part_normals[part_mask]

    for side in (-1.0, 1.0):  # back to front: legs, arms, torso, head
        foot = (side * rng.uniform(0.1, 0.32), rng.uniform(0.95, 1.02))
        paint(*_limb(u, v, (side * 0.12, 0.2), foot, 0.11), SCENE_PARTS.index("legs"))
    for side in (-1.0, 1.0):
        hand = (side * rng.uniform(0.4, 0.62), rng.uniform(-0.15, 0.3))
        paint(*_limb(u, v, (side * 0.22, -0.4), hand, 0.09), SCENE_PARTS.index("arms"))
    half_w, half_h, centre = 0.25, 0.36, -0.1  # torso: an ellipsoid cap
    eu, ev = u / half_w, (v - centre) / half_h
    g2 = np.minimum(eu * eu + ev * ev, 1.0)
    paint(eu * eu + ev * ev <= 1.0, _unit(0.7 * eu, 0.7 * ev * half_w / half_h, np.sqrt(1.0 - g2)),
          SCENE_PARTS.index("torso"))
    radius, centre = 0.19, -0.72  # head: a hemisphere
    hu, hv = u / radius, (v - centre) / radius
    h2 = np.minimum(hu * hu + hv * hv, 1.0)
    paint(hu * hu + hv * hv <= 1.0, _unit(hu, hv, np.sqrt(1.0 - h2)), SCENE_PARTS.index("head"))
    return mask, parts, normals


def _background_normals(rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray, scale: float) -> np.ndarray:
    """Normals ``(n, n, 3)`` of a slightly tilted plane plus two sinusoidal undulations (analytic gradient).

    The undulations carry most of the relief because their shading varies across the image and so reveals them;
    a uniform tilt only changes the overall brightness, which an unknown albedo explains as well."""
    tilt, tilt_dir = math.tan(math.radians(rng.uniform(0.0, 8.0))), rng.uniform(0, 2 * math.pi)
    grad_x = np.full_like(gx, tilt * math.cos(tilt_dir))
    grad_y = np.full_like(gx, tilt * math.sin(tilt_dir))
    for _ in range(2):
        wavelength, direction = rng.uniform(16.0, 48.0) * scale, rng.uniform(0, 2 * math.pi)
        kx, ky = 2 * math.pi / wavelength * math.cos(direction), 2 * math.pi / wavelength * math.sin(direction)
        steepness = math.tan(math.radians(rng.uniform(5.0, 25.0)))  # the undulation's steepest slope
        # height = steepness / k * sin(k . p + phase): its gradient is k / |k| * steepness * cos(k . p + phase)
        wave = steepness * np.cos(kx * gx + ky * gy + rng.uniform(0, 2 * math.pi)) * (wavelength / (2 * math.pi))
        grad_x += kx * wave
        grad_y += ky * wave
    return _unit(-grad_x, -grad_y, np.ones_like(gx))


def _pick_samples(instances: np.ndarray, size: int) -> np.ndarray:
    """For each output pixel, which of its SxS rendered samples gives its labels: one of the object covering
    most of the pixel, ties going to the front-most object. Returns ``(size, size)`` indices in [0, S*S)."""
    s = _SUPERSAMPLE
    blocks = instances.reshape(size, s, size, s).transpose(0, 2, 1, 3).reshape(size, size, s * s).astype(np.int32)
    votes = (blocks[..., :, None] == blocks[..., None, :]).sum(axis=-1)
    return (votes * 256 + blocks).argmax(axis=-1)


def _gather(field: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """The rendered-sample values ``field`` ``(S*size, S*size, ...)`` picked by ``choice`` ``(size, size)``."""
    size = choice.shape[0]
    rows = np.arange(size)[:, None] * _SUPERSAMPLE + choice // _SUPERSAMPLE
    cols = np.arange(size)[None, :] * _SUPERSAMPLE + choice % _SUPERSAMPLE
    return field[rows, cols]


def render_dense_scene(rng: np.random.Generator, size: int = 64) -> DenseScene:
    """Draw one procedural multi-task scene of ``size x size`` pixels (the world is described in the module
    docstring); the same ``rng`` state gives the same scene."""
    scale = size / 64.0
    gx, gy = _pixel_grid(size)
    n = size * _SUPERSAMPLE

    azimuth, elevation = math.radians(-135.0 + rng.uniform(-35.0, 35.0)), math.radians(rng.uniform(35.0, 60.0))
    light = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                      math.sin(elevation)], dtype=np.float32)
    ambient = rng.uniform(0.25, 0.4)

    normals = _background_normals(rng, gx, gy, scale)
    background = _hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.65))
    albedo = background * (1.0 + 0.25 * (_value_noise(rng, gx, gy, rng.uniform(6, 16) * scale, size) - 0.5))[..., None]
    instances = np.zeros((n, n), dtype=np.uint8)
    classes = np.zeros((n, n), dtype=np.uint8)
    parts = np.zeros((n, n), dtype=np.uint8)

    n_others = int(rng.integers(1, 6))
    person_slot = int(rng.integers(n_others + 1)) if rng.random() < 0.5 else -1
    for slot in range(n_others + 1):  # distractors first, the hero (last slot) on top of everything
        hero = slot == n_others
        is_person = slot == person_slot
        shape = "person" if is_person else _SHAPES[int(rng.integers(len(_SHAPES)))]
        if hero:
            unit = rng.uniform(16.0, 20.0) if is_person else rng.uniform(14.0, 19.0)
            cx, cy = rng.uniform(0.3, 0.7, size=2) * size
            colour = _hsv(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        else:
            unit = rng.uniform(9.0, 12.0) if is_person else rng.uniform(5.5, 9.5)
            cx, cy = rng.uniform(0.1, 0.9, size=2) * size
            colour = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.45, 0.9))
        unit *= scale
        angle = math.radians(rng.uniform(-15.0, 15.0)) if is_person else rng.uniform(0, 2 * math.pi)
        reach = _OBJECT_RADIUS * unit
        r0, r1 = max(0, int((cy - reach) * _SUPERSAMPLE)), min(n, math.ceil((cy + reach) * _SUPERSAMPLE))
        c0, c1 = max(0, int((cx - reach) * _SUPERSAMPLE)), min(n, math.ceil((cx + reach) * _SUPERSAMPLE))
        if r0 >= r1 or c0 >= c1:
            continue
        x, y = gx[r0:r1, c0:c1], gy[r0:r1, c0:c1]
        c, s = math.cos(angle), math.sin(angle)
        u, v = (c * (x - cx) + s * (y - cy)) / unit, (-s * (x - cx) + c * (y - cy)) / unit
        texture = _texture(rng, x, y, scale, size)[..., None]
        if is_person:
            mask, part_ids, local = _person_relief(rng, u, v)
            skin = _hsv(rng.uniform(0.02, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.95))
            trousers = _hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.2, 0.45))
            palette = np.stack([colour, skin, colour, colour, trousers])  # indexed by part id
            colours = palette[part_ids] * texture
        else:
            mask, local = _shape_relief(rng, shape, u, v)
            part_ids = None
            colours = colour * texture
        # Local frame -> image frame: the in-plane components turn with the object.
        world = np.stack([c * local[..., 0] - s * local[..., 1], s * local[..., 0] + c * local[..., 1],
                          local[..., 2]], axis=-1)
        window = (slice(r0, r1), slice(c0, c1))
        instances[window][mask] = slot + 1
        classes[window][mask] = SCENE_CLASSES.index(shape)
        parts[window][mask] = part_ids[mask] if part_ids is not None else 0
        normals[window][mask] = world[mask]
        albedo[window][mask] = colours[mask]
    hero_id = n_others + 1

    shading = ambient + (1.0 - ambient) * np.clip(normals @ light, 0.0, None)
    rendered = albedo * shading[..., None]
    image = sum(rendered[i::_SUPERSAMPLE, j::_SUPERSAMPLE] for i in range(_SUPERSAMPLE)
                for j in range(_SUPERSAMPLE)) / _SUPERSAMPLE ** 2
    image = image + rng.normal(0.0, 0.012, image.shape)
    image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)

    choice = _pick_samples(instances, size)
    semseg = _gather(classes, choice)
    human_parts = _gather(parts, choice)
    if not (semseg == SCENE_PERSON_CLASS).any():
        human_parts = np.full_like(human_parts, IGNORE_INDEX)
    picked_instances = _gather(instances, choice)
    return DenseScene(image=image, semseg=semseg, human_parts=human_parts,
                      sal=(picked_instances == hero_id).astype(np.uint8),
                      normals=_gather(normals, choice).astype(np.float32), instances=picked_instances,
                      hero=hero_id, light=light)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: train and val draw from different streams."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r} for procedural dense scenes; choose one of {', '.join(_SPLIT_STREAM)}")
    return np.random.default_rng([_STREAM_TAG, int(seed), _SPLIT_STREAM[split], int(index)])


def render_dense_scenes(split: str, size: int, num_samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Render scenes ``0 .. num_samples - 1`` of ``split`` into compact arrays: ``image`` ``(N, H, W, 3)``
    uint8, ``semseg`` / ``human_parts`` / ``sal`` ``(N, H, W)`` uint8, ``normals`` ``(N, H, W, 3)`` int8
    (``round(n * 127)``)."""
    arrays = {"image": np.empty((num_samples, size, size, 3), np.uint8),
              "semseg": np.empty((num_samples, size, size), np.uint8),
              "human_parts": np.empty((num_samples, size, size), np.uint8),
              "sal": np.empty((num_samples, size, size), np.uint8),
              "normals": np.empty((num_samples, size, size, 3), np.int8)}
    for index in Progress(range(num_samples), desc=f"dense scenes ({split})", unit="scenes"):
        scene = render_dense_scene(scene_rng(seed, split, index), size)
        arrays["image"][index] = scene.image
        arrays["semseg"][index] = scene.semseg
        arrays["human_parts"][index] = scene.human_parts
        arrays["sal"][index] = scene.sal
        arrays["normals"][index] = np.round(scene.normals * _NORMAL_QUANT).astype(np.int8)
    return arrays


def default_scene_cache_dir() -> Path:
    """``$VISADAPT_CACHE`` (or ``~/.cache/visadapt``)/dense-scenes-v<generator version>."""
    return default_data_root().parent / f"dense-scenes-v{DENSE_GENERATOR_VERSION}"


def _load_cached(path: Path, split: str, size: int, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """The cached arrays at ``path``, or freshly rendered ones written there (atomically) first."""
    shapes = {"image": (num_samples, size, size, 3), "semseg": (num_samples, size, size),
              "human_parts": (num_samples, size, size), "sal": (num_samples, size, size),
              "normals": (num_samples, size, size, 3)}
    if path.is_file():
        try:
            with np.load(path) as stored:
                arrays = {key: stored[key] for key in shapes}
            if all(arrays[key].shape == shape for key, shape in shapes.items()):
                return arrays
            reason = "its arrays have other shapes"
        except (OSError, ValueError, KeyError) as err:
            reason = str(err)
        warnings.warn(f"ignoring the unreadable scene cache {path} ({reason}); rendering the scenes again",
                      stacklevel=3)
    arrays = render_dense_scenes(split, size, num_samples, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.npz"
    try:
        np.savez_compressed(tmp, **arrays)  # half the raw size: 2,500 scenes of 64 px take ~45 MB
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return arrays


class ProceduralDenseScenes(Dataset):
    """The embedded multi-task dense benchmark: procedural scenes with ground truth for all four tasks.

    Args:
        split: ``train`` or ``val`` (disjoint: drawn from different random streams).
        size: image side in pixels (the world scales with it; 64 by default).
        num_samples: how many scenes; default 2000 for train, 500 for val. Scene ``i`` does not depend on it.
        seed: world seed; the same ``(seed, split, i)`` is the same scene on every machine.
        tasks: a subset of :data:`DENSE_TASKS` (default all); samples hold only those targets.
        normalization: image normalisation, ``(mean, std)``, ``None`` (inputs in [0, 1]) or a choice string
            of :func:`~visadapt.data.transforms.resolve_normalization` (default ``imagenet``, as MTLoRA).
        augment: apply MTLoRA's training augmentation (:class:`DenseTransform`); off by default, since more
            scenes are cheaper than augmented ones.
        cache: all scenes are rendered once at construction and kept as uint8/int8 arrays in memory (36 KB
            per 64 px scene: 90 MB for 2,500). ``True`` also stores them as one compressed ``.npz`` (~18 KB a
            scene) under :func:`default_scene_cache_dir` and loads it next time instead of rendering; a folder
            path stores it there; ``False`` keeps them in memory only.

    Items are dicts as described in :mod:`visadapt.data.dense`; ``tasks``, ``task_outputs`` and
    ``label_names`` (class / part names per segmentation task) describe them.
    """

    def __init__(self, split: str = "train", size: int = 64, num_samples: int | None = None, seed: int = 0,
                 tasks: Iterable[str] | None = None, normalization="imagenet", augment: bool = False,
                 cache: bool | str | os.PathLike = True):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(_SPLIT_STREAM)}")
        if size < 16:
            raise ValueError(f"size {size} is too small to draw scenes in; use at least 16 pixels")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.num_samples = SCENE_SPLIT_SIZES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.tasks = resolve_tasks(tasks)
        self.task_outputs = {task: SCENE_TASK_OUTPUTS[task] for task in self.tasks}
        self.label_names = {"semseg": SCENE_CLASSES, "human_parts": SCENE_PARTS}
        self.transform = DenseTransform(self.size, train=augment, normalization=normalization)
        if cache is False:
            self.cache_path = None
            self._arrays = render_dense_scenes(split, self.size, self.num_samples, self.seed)
        else:
            folder = default_scene_cache_dir() if cache is True else Path(cache)
            self.cache_path = folder / f"{split}-size{self.size}-n{self.num_samples}-seed{self.seed}.npz"
            self._arrays = _load_cached(self.cache_path, split, self.size, self.num_samples, self.seed)

    def __len__(self) -> int:
        return self.num_samples

    def raw_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Item ``index`` before the transform: image ``(3, H, W)`` float in [0, 1], targets as documented."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} scenes")
        arrays = self._arrays
        sample = {"image": torch.from_numpy(arrays["image"][index]).permute(2, 0, 1).float().div_(255)}
        for task in ("semseg", "human_parts", "sal"):
            if task in self.tasks:
                sample[task] = torch.from_numpy(arrays[task][index].astype(np.int64))
        if "normals" in self.tasks:
            normals = torch.from_numpy(arrays["normals"][index]).permute(2, 0, 1).float()
            sample["normals"] = F.normalize(normals, dim=0)
        return sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.transform(self.raw_sample(index))

    def __repr__(self) -> str:
        return (f"ProceduralDenseScenes(split={self.split!r}, {self.num_samples} scenes of {self.size}px, "
                f"seed={self.seed}, tasks={self.tasks})")


# ------------------------------------------------------------------------------- PASCAL-Context (MTLoRA)

_SHOWN = 5  # missing files listed per kind before the rest is summarised as a count


def _require_scipy_io(tasks: Sequence[str]):
    try:
        import scipy.io
    except ImportError:
        needing = [t for t in tasks if t in ("human_parts", "normals")]
        raise ImportError(
            f"PASCAL-Context task(s) {', '.join(needing)} read MATLAB .mat files (human_parts/<id>.mat, "
            f"pascal-context/trainval/<id>.mat), which needs scipy: pip install 'visadapt[pascal]' (or scipy) "
            f"(or leave them out, e.g. tasks=('semseg', 'sal'))") from None
    return scipy.io


class PascalContextMultiTask(Dataset):
    """PASCAL-Context for multi-task dense prediction, in the layout and protocol of MTLoRA (see the module
    docstring for the files): 21-class semantic segmentation, 7-class human parts (background + 6 groups of
    person class 15), distilled saliency and distilled surface normals.

    Args:
        root: the extracted ``PASCAL_MT`` folder (holding ``JPEGImages``, ``ImageSets``, ...).
        split: ``train`` (4,998 images) or ``val`` (5,105), read from ``ImageSets/Context/<split>.txt``.
        size: side of the square output (MTLoRA: 448); aspect ratio is not kept, as in MTLoRA.
        tasks: a subset of :data:`DENSE_TASKS` (default all).
        train: augment (flip, +-20 degrees, 0.75-1.25 zoom) as MTLoRA's training; default: ``split == "train"``.
        normalization: as :class:`DenseTransform` (default ImageNet mean/std, as MTLoRA).

    Targets as MTLoRA builds them: ``human_parts`` is all 255 when no person in the image has part
    annotations, else 0 outside the annotated parts (a person without parts next to one with them is
    background); ``normals`` are kept only on :data:`PASCAL_NORMALS_VALID_CLASSES` and ignored elsewhere;
    ``sal`` is 1 where the distilled map exceeds 0.5. A label map of another size than its image is resized to
    it (nearest neighbour), as MTLoRA does. Differences: regions a rotation brings in from outside are ignored
    (MTLoRA fills label maps with 0 there), and the image is resized with anti-aliasing.

    Every listed file is checked to exist at construction and all missing ones are reported together;
    :meth:`verify` also decodes every file and reports all unreadable ones at once.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 448,
                 tasks: Iterable[str] | None = None, train: bool | None = None, normalization="imagenet"):
        self.root = Path(root)
        self.split = split
        self.size = int(size)
        self.tasks = resolve_tasks(tasks)
        self.task_outputs = {task: PASCAL_TASK_OUTPUTS[task] for task in self.tasks}
        self.label_names = {"semseg": PASCAL_CLASSES, "human_parts": PASCAL_PARTS}
        self.transform = DenseTransform(self.size, train=split == "train" if train is None else train,
                                        normalization=normalization)
        if split not in PASCAL_SPLITS:
            raise DatasetError(f"unknown PASCAL-Context split {split!r}; choose one of {', '.join(PASCAL_SPLITS)}")
        self._sio = _require_scipy_io(self.tasks) if {"human_parts", "normals"} & set(self.tasks) else None
        fix = (f"download {PASCAL_MT_URL} and extract it so that {self.root}/JPEGImages, {self.root}/ImageSets, ... "
               "exist (pass the folder that holds them as root)")
        if not self.root.is_dir():
            raise DatasetError(f"PASCAL-Context root {self.root} does not exist or is not a directory; {fix}")
        split_file = self.root / "ImageSets" / "Context" / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.name for p in split_file.parent.glob("*.txt")) if split_file.parent.is_dir() else []
            raise DatasetError(f"split file {split_file} does not exist (ImageSets/Context holds: "
                               f"{', '.join(found) or 'nothing'}); it lists one image id per line. {fix}")
        self.split_file = split_file
        self.ids = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.ids:
            raise DatasetError(f"split file {split_file} lists no image ids; restore it from the archive: {fix}")
        self.files = self._find_files(fix)

    def _find_files(self, fix: str) -> list[dict[str, Path]]:
        """Per id, the path of each file its tasks need; one error lists every missing file, by kind."""
        listing: dict[Path, set[str]] = {}

        def exists(path: Path) -> bool:  # one directory listing per folder instead of a stat per file
            if path.parent not in listing:
                listing[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
            return path.name in listing[path.parent]

        kinds = {"image": ("JPEGImages/{}.jpg",)}
        if "semseg" in self.tasks:
            kinds["semseg"] = ("semseg/VOC12/{}.png", "semseg/pascal-context/{}.png")
        if "human_parts" in self.tasks:
            kinds["human_parts"] = ("human_parts/{}.mat",)
        if "normals" in self.tasks:
            kinds["normals"] = ("normals_distill/{}.png",)
            kinds["context_labels"] = ("pascal-context/trainval/{}.mat",)
        if "sal" in self.tasks:
            kinds["sal"] = ("sal_distill/{}.png",)
        files: list[dict[str, Path]] = []
        missing: dict[str, list[str]] = {kind: [] for kind in kinds}
        for image_id in self.ids:
            entry = {}
            for kind, patterns in kinds.items():
                candidates = [self.root / pattern.format(image_id) for pattern in patterns]
                found = next((p for p in candidates if exists(p)), None)
                if found is None:
                    missing[kind].append(" or ".join(str(p) for p in candidates))
                else:
                    entry[kind] = found
            files.append(entry)
        report = []
        for kind, paths in missing.items():
            if paths:
                more = f"\n    ... and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
                report.append(f"  {kind}: {len(paths)} missing, e.g.\n    " + "\n    ".join(paths[:_SHOWN]) + more)
        if report:
            raise DatasetError(
                f"{self.split_file} lists {len(self.ids)} images, but files are missing:\n" + "\n".join(report)
                + f"\nRe-extract the archive ({fix}), or leave out the tasks whose files you lack "
                f"(tasks=...)")
        return files

    def __len__(self) -> int:
        return len(self.ids)

    def _read_png(self, path: Path, mode: str | None = None) -> np.ndarray:
        return np.array(decode_image(path, f"a label map of {self.split_file}", mode,
                                     fix=f"replace it from {PASCAL_MT_URL}"))

    def _read_mat(self, path: Path) -> dict:
        try:
            return self._sio.loadmat(str(path))
        except Exception as err:  # scipy raises several types (ValueError, MatReadError, TypeError) for bad files
            raise DatasetError(f"cannot read MATLAB file {path} ({type(err).__name__}: {err}); replace it from "
                               f"{PASCAL_MT_URL}") from err

    def _human_parts(self, path: Path, shape: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` part groups of PASCAL-Part annotation ``path``; all 255 when no person has parts."""
        mat = self._read_mat(path)
        target = None
        try:
            objects = mat["anno"][0, 0]["objects"][0]
            for obj in objects:
                parts = obj["parts"]
                if int(np.asarray(obj["class_ind"]).ravel()[0]) != PASCAL_PERSON_CLASS or parts.size == 0:
                    continue
                if target is None:
                    target = np.zeros(np.asarray(obj["mask"]).shape, dtype=np.int64)
                for part in parts.ravel():
                    name = str(np.asarray(part["part_name"]).ravel()[0])
                    if name not in PASCAL_PERSON_PART_GROUPS:
                        raise DatasetError(f"{path}: unknown person part {name!r}; PASCAL-Part person parts are "
                                           f"{', '.join(sorted(PASCAL_PERSON_PART_GROUPS))}")
                    target[np.asarray(part["mask"]).astype(bool)] = PASCAL_PERSON_PART_GROUPS[name]
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise DatasetError(f"{path} is not a PASCAL-Part annotation (expected a struct 'anno' with "
                               f"'objects' holding 'class_ind', 'mask' and 'parts' of 'part_name' and 'mask'): "
                               f"{type(err).__name__}: {err}. Replace it from {PASCAL_MT_URL}") from err
        if target is None:
            return np.full(shape, IGNORE_INDEX, dtype=np.int64)
        return target

    def _normals(self, path: Path, labels_path: Path) -> np.ndarray:
        """``(H, W, 3)`` unit normals from the distilled PNG, 255 outside the NYU-compatible classes."""
        encoded = self._read_png(path, "RGB").astype(np.float32)
        normals = 2.0 * encoded / 255.0 - 1.0
        mat = self._read_mat(labels_path)
        if "LabelMap" not in mat:
            keys = ", ".join(key for key in mat if not key.startswith("__")) or "none"
            raise DatasetError(f"{labels_path} holds no 'LabelMap' (its variables: {keys}); it should be the "
                               f"PASCAL-Context annotation. Replace it from {PASCAL_MT_URL}")
        context = np.asarray(mat["LabelMap"])
        if context.shape != normals.shape[:2]:
            raise DatasetError(f"{labels_path} LabelMap is {context.shape}, but {path} is {normals.shape[:2]}; "
                               f"the two files belong to different images")
        valid = np.isin(context, PASCAL_NORMALS_VALID_CLASSES)
        norm = np.linalg.norm(normals, axis=-1, keepdims=True)
        unit = normals / np.maximum(norm, 1e-12)
        return np.where(valid[..., None] & (norm > 0), unit, np.float32(IGNORE_INDEX)).astype(np.float32)

    def raw_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Item ``index`` at its own resolution, before the transform (image float in [0, 1])."""
        files = self.files[index]
        image = np.array(decode_image(files["image"], f"id {self.ids[index]!r} of {self.split_file}",
                                      fix=f"replace it from {PASCAL_MT_URL}"))
        shape = image.shape[:2]
        sample = {"image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255)}
        maps: dict[str, np.ndarray] = {}
        if "semseg" in self.tasks:
            semseg = self._read_png(files["semseg"])
            bad = np.unique(semseg[(semseg >= len(PASCAL_CLASSES)) & (semseg != IGNORE_INDEX)])
            if semseg.ndim != 2 or bad.size:
                raise DatasetError(f"{files['semseg']} is not a 21-class label map (shape {semseg.shape}, values "
                                   f"{bad[:5].tolist()} outside 0-20 and 255); replace it from {PASCAL_MT_URL}")
            maps["semseg"] = semseg.astype(np.int64)
        if "human_parts" in self.tasks:
            maps["human_parts"] = self._human_parts(files["human_parts"], shape)
        if "sal" in self.tasks:
            maps["sal"] = (self._read_png(files["sal"], "L").astype(np.float32) / 255.0 > 0.5).astype(np.int64)
        for task, label_map in maps.items():
            tensor = torch.from_numpy(label_map)
            if label_map.shape != shape:
                tensor = F.interpolate(tensor[None, None].float(), size=shape, mode="nearest-exact")[0, 0].long()
            sample[task] = tensor
        if "normals" in self.tasks:
            normals = torch.from_numpy(self._normals(files["normals"], files["context_labels"])).permute(2, 0, 1)
            sample["normals"] = resize_sample({"normals": normals}, shape)["normals"]
        return sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.transform(self.raw_sample(index))

    def verify(self) -> None:
        """Decode every file of every image and raise one :class:`DatasetError` listing all that fail."""
        failures = []
        for index in range(len(self)):
            try:
                self.raw_sample(index)
            except DatasetError as err:
                failures.append(f"  {self.ids[index]}: {err}")
        if failures:
            raise DatasetError(f"{len(failures)} of {len(self)} images of {self.split_file} cannot be read:\n"
                               + "\n".join(failures))

    def __repr__(self) -> str:
        return f"PascalContextMultiTask({str(self.root)!r}, split={self.split!r}, {len(self)} images, tasks={self.tasks})"
