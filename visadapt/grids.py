"""Labelled sample grids of the diffusion jobs (ResAdapter, SELMA, PPAP), and logging them to Accelerate trackers.

:func:`labelled_grid` lays PIL images out in rows x columns with the row and column labels drawn beside them
(prompt / resolution / adapter weight / guidance on the axes, text wrapped to the cell), a title, and tiny samples
upscaled by a whole factor with NEAREST, so a 24x24 sample shows its pixels instead of a blur. Cells of
different sizes (one row per resolution) keep their relative size: all are scaled by the same factor and centred
in a cell of the largest size.

:func:`log_image` sends one picture to every tracker of an ``accelerate.Accelerator`` in the layout that tracker's
own ``log_images`` expects (they differ: TensorBoard takes an ``NHWC`` array batch, W&B and SwanLab a list, Aim
and ClearML one image); no tracker at all is fine.

torchvision's ``make_grid`` and diffusers' ``make_image_grid`` tile images but draw no labels and need cells of
one size, hence this module.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
CELL_BACKGROUND = (228, 228, 228)  # where a smaller image leaves its cell empty
TEXT = (20, 20, 20)
AXIS_TEXT = (110, 110, 110)  # the axis names, set apart from the labels under them
GAP = 6  # pixels between cells
MARGIN = 8  # pixels around the grid
FONT_SIZE = 13
# Upscaling stops at this factor and this cell side; samples larger than MAX_CELL are shrunk to it (LANCZOS).
MAX_SCALE = 8
MAX_LABEL_WIDTH = 180
MAX_CELL = 384
# Trackers whose log_images takes one image per key rather than a list (see accelerate.tracking).
SINGLE_IMAGE_TRACKERS = ("aim", "clearml")

_warned: set[str] = set()


def _font(size: int = FONT_SIZE, bold: bool = False) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size + (2 if bold else 0))
    except TypeError:  # Pillow < 10.1: no sizes
        return ImageFont.load_default()


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image, an ``(H, W, 3)`` / ``(H, W)`` uint8 array, or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"a grid cell has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def wrap_text(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels in ``font`` (a word longer than that gets its own line
    and is cut by characters)."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, max(k for k in range(1, len(word) + 1) if font.getlength(word[:k]) <= width or k == 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _line_height(font: ImageFont.ImageFont) -> int:
    return font.getbbox("Ag")[3] + 3  # the bottom of the tallest glyphs, plus leading


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], font, box: tuple[int, int, int, int],
                align: str = "center", valign: str = "center", fill: tuple[int, int, int] = TEXT) -> None:
    """``lines`` inside ``box`` (left, top, right, bottom), each centred (or left/right aligned)."""
    left, top, right, bottom = box
    height = _line_height(font) * len(lines)
    y = top + {"top": 0, "center": (bottom - top - height) // 2, "bottom": bottom - top - height}[valign]
    for line in lines:
        width = font.getlength(line)
        x = {"left": left, "center": left + (right - left - width) / 2, "right": right - width}[align]
        draw.text((x, y), line, font=font, fill=fill)
        y += _line_height(font)


def cell_scale(sizes: Sequence[tuple[int, int]], min_cell: int = 96) -> float:
    """The one factor every cell is scaled by: the whole number that makes the largest sample at least
    ``min_cell`` pixels wide or high (at most :data:`MAX_SCALE`), or a shrink to :data:`MAX_CELL` for large ones."""
    largest = max(max(h, w) for h, w in sizes)
    if largest > MAX_CELL:
        return MAX_CELL / largest
    return float(max(1, min(MAX_SCALE, math.ceil(min_cell / largest))))


def labelled_grid(
    cells: Sequence[Sequence[object]],
    *,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str = "",
    row_axis: str = "",
    column_axis: str = "",
    min_cell: int = 96,
) -> Image.Image:
    """``cells[row][column]`` (PIL images or arrays, see :func:`to_pil`; ``None`` leaves a cell empty) as one
    labelled RGB picture.

    Layout, top to bottom: ``title``; ``column_axis`` (e.g. "prompt") over the column labels; then each row:
    its label at the left (``row_axis``, e.g. "resolution", heads that label column), its cells to the right.
    Labels are wrapped to the cell width. Every image is scaled by the same :func:`cell_scale` (NEAREST when
    enlarging, so pixels stay sharp) and centred in a cell as large as the largest scaled image.
    """
    rows, columns = len(row_labels), len(column_labels)
    if rows == 0 or columns == 0:
        raise ValueError("a grid needs at least one row label and one column label")
    if len(cells) != rows or any(len(row) != columns for row in cells):
        raise ValueError(f"a grid of {rows} row labels x {columns} column labels got cells of shape "
                         f"{[len(row) for row in cells]}; give one image per (row, column)")
    images = [[None if cell is None else to_pil(cell) for cell in row] for row in cells]
    sizes = [(image.height, image.width) for row in images for image in row if image is not None]
    if not sizes:
        raise ValueError("a grid needs at least one image")
    scale = cell_scale(sizes, min_cell)

    def scaled(image: Image.Image) -> Image.Image:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)

    images = [[None if image is None else scaled(image) for image in row] for row in images]
    cell_w = max(image.width for row in images for image in row if image is not None)
    cell_h = max(image.height for row in images for image in row if image is not None)
    font, title_font = _font(), _font(bold=True)
    line = _line_height(font)
    # the row labels' column: as wide as the longest label, up to MAX_LABEL_WIDTH (longer ones wrap)
    label_w = int(min(MAX_LABEL_WIDTH, max(60, max(font.getlength(str(label)) for label in [*row_labels, row_axis])
                                       + 14)))
    row_lines = [wrap_text(label, font, label_w - 8) for label in row_labels]
    column_lines = [wrap_text(label, font, cell_w) for label in column_labels]
    axis_lines = wrap_text(row_axis, font, label_w - 8) if row_axis else []
    width = 2 * MARGIN + label_w + columns * cell_w + (columns - 1) * GAP
    title_lines = wrap_text(title, title_font, width - 2 * MARGIN) if title else []
    title_h = _line_height(title_font) * len(title_lines) + (6 if title_lines else 0)
    column_axis_h = line + 6 if column_axis else 0
    header_h = max(line * max(len(lines) for lines in column_lines), line * len(axis_lines)) + 4
    row_h = [max(cell_h, line * len(lines)) for lines in row_lines]
    height = 2 * MARGIN + title_h + column_axis_h + header_h + sum(row_h) + (rows - 1) * GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    _draw_lines(draw, title_lines, title_font, (MARGIN, y, width - MARGIN, y + title_h - 6), valign="top")
    y += title_h
    grid_left = MARGIN + label_w
    if column_axis:
        _draw_lines(draw, [column_axis], font, (grid_left, y, width - MARGIN, y + line), fill=AXIS_TEXT)
        y += column_axis_h
    _draw_lines(draw, axis_lines, font, (MARGIN, y, grid_left - 8, y + header_h - 4), align="left",
                valign="bottom", fill=AXIS_TEXT)
    for col, lines in enumerate(column_lines):
        left = grid_left + col * (cell_w + GAP)
        _draw_lines(draw, lines, font, (left, y, left + cell_w, y + header_h - 4), valign="bottom")
    y += header_h
    for row, lines in enumerate(row_lines):
        _draw_lines(draw, lines, font, (MARGIN, y, grid_left - 8, y + row_h[row]), align="left")
        for col, image in enumerate(images[row]):
            left = grid_left + col * (cell_w + GAP)
            top = y + (row_h[row] - cell_h) // 2
            draw.rectangle((left, top, left + cell_w - 1, top + cell_h - 1), fill=CELL_BACKGROUND)
            if image is not None:
                canvas.paste(image, (left + (cell_w - image.width) // 2, top + (cell_h - image.height) // 2))
        y += row_h[row] + GAP
    return canvas


def log_image(trackers: Sequence[object], tag: str, image: Image.Image, step: int,
              file: str | os.PathLike | None = None) -> list[str]:
    """Log ``image`` under ``tag`` at ``step`` to every tracker (``accelerator.trackers``), each through its own
    ``log_images`` in the layout it documents: TensorBoard a ``(1, H, W, 3)`` uint8 batch with
    ``dataformats="NHWC"``, Aim and ClearML one image, the others (W&B, SwanLab, custom ``GeneralTracker``s) a
    list of images. MLflow has no ``log_images``: ``file`` (the grid written to disk) is logged as an artifact.

    Returns the names of trackers that could take no image (each warned about once per process).
    """
    picture = image.convert("RGB")
    array = np.asarray(picture)
    skipped = []
    for tracker in trackers:
        name = getattr(tracker, "name", type(tracker).__name__)
        if name == "tensorboard":
            tracker.log_images({tag: array[None]}, step=step, dataformats="NHWC")
        elif name in SINGLE_IMAGE_TRACKERS:
            tracker.log_images({tag: picture}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [picture]}, step=step)
        elif name == "mlflow" and file is not None:
            tracker.log_artifact(str(file), artifact_path=str(Path(tag).parent) if "/" in tag else None)
        else:
            skipped.append(name)
            if name not in _warned:
                _warned.add(name)
                logger.warning("tracker %s takes no images; sample grids are only written to disk", name)
    return skipped


def save_and_log(image: Image.Image, path: str | os.PathLike, trackers: Sequence[object], tag: str,
                 step: int) -> Path:
    """Write ``image`` to ``path`` (PNG, folders made) and :func:`log_image` it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    log_image(trackers, tag, image, step, file=path)
    return path
