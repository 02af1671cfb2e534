"""Labelled sample grids (visadapt.grids): the layout read back from pixels of solid-colour cells, the layout each
Accelerate tracker's ``log_images`` takes, and a tiny ResAdapter run whose grid TensorBoard's own reader finds.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from visadapt.grids import GAP, labelled_grid, log_image

RED, GREEN, BLUE = (230, 30, 30), (30, 200, 60), (40, 80, 240)
ORANGE, CYAN, PINK = (250, 150, 20), (20, 220, 220), (240, 120, 200)


def solid(height, width, color):
    return np.full((height, width, 3), color, dtype=np.uint8)


def box_of(picture: np.ndarray, color) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the pixels of exactly ``color``; they must fill that box."""
    ys, xs = np.nonzero(np.all(picture == np.array(color, dtype=np.uint8), axis=-1))
    assert len(ys), f"{color} is not in the grid"
    top, left, height, width = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert len(ys) == height * width, f"{color} does not fill its box"
    return int(top), int(left), int(height), int(width)


def dark(region: np.ndarray) -> int:
    """How many pixels of ``region`` are text (dark grey to black)."""
    return int(np.sum(region.max(axis=-1) < 120))


def text_lines(region: np.ndarray) -> int:
    """How many lines of text ``region`` holds: runs of pixel rows that contain text."""
    rows = (region.max(axis=-1) < 120).any(axis=1)
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])


def test_grid_places_every_image_in_its_row_and_column_upscaled_and_labels_beside_them():
    # two rows of different resolutions (16x32, then 32x32: height x width), three columns
    cells = [[solid(16, 32, RED), solid(16, 32, GREEN), solid(16, 32, BLUE)],
             [solid(32, 32, ORANGE), solid(32, 32, CYAN), solid(32, 32, PINK)]]
    long_prompt = "a very long prompt that has to wrap over several lines"
    grid = np.asarray(labelled_grid(cells, row_labels=["16x32", "32x32"], column_labels=["a red circle", "two",
                                    long_prompt], title="Samples after epoch 1", row_axis="resolution",
                                    column_axis="prompt"))
    # one factor for all: the largest side 32 is enlarged 3 times (the smallest whole factor reaching 96 px)
    boxes = [[box_of(grid, color) for color in row] for row in ([RED, GREEN, BLUE], [ORANGE, CYAN, PINK])]
    assert {b[2:] for b in boxes[0]} == {(48, 96)} and {b[2:] for b in boxes[1]} == {(96, 96)}
    # columns: same x in both rows, one cell width (96) plus the gap apart; the 48 px row centred in its 96 px cell
    for col in range(3):
        assert boxes[0][col][1] == boxes[1][col][1] == boxes[0][0][1] + col * (96 + GAP)
    assert len({b[0] for b in boxes[0]}) == 1 and len({b[0] for b in boxes[1]}) == 1
    row0_cell_top = boxes[0][0][0] - 24
    assert boxes[1][0][0] == row0_cell_top + 96 + GAP
    # the row labels sit left of the cells, in each row's band
    first_left = boxes[0][0][1]
    for top in (row0_cell_top, boxes[1][0][0]):
        assert dark(grid[top:top + 96, :first_left - 4]) > 20
    # the column labels above each column, wrapped to its width: one line, one line, several
    lines = [text_lines(grid[row0_cell_top - 70:row0_cell_top, box[1]:box[1] + 96]) for box in boxes[0]]
    assert lines[0] == 1 and lines[2] >= 3
    assert dark(grid[row0_cell_top - 20:row0_cell_top, boxes[0][1][1]:boxes[0][1][1] + 96]) > 10
    assert dark(grid[:24]) > 20  # the title


def test_tiny_samples_are_enlarged_with_nearest_so_pixels_stay_sharp():
    checker = np.zeros((4, 4, 3), dtype=np.uint8)
    checker[::2, ::2] = checker[1::2, 1::2] = 255
    grid = np.asarray(labelled_grid([[checker]], row_labels=["r"], column_labels=["c"]))
    # 4 px would need 24x to reach 96 px; MAX_SCALE caps it at 8x: 32 px, each source pixel an 8x8 block
    ys, xs = np.nonzero(np.all(grid == 0, axis=-1))  # text is never pure black (antialiased dark grey)
    cell = grid[ys.min():ys.min() + 32, xs.min():xs.min() + 32]
    assert np.array_equal(cell, np.kron(checker, np.ones((8, 8, 1), dtype=np.uint8)))


def test_bad_grids_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="one image per"):
        labelled_grid([[solid(4, 4, RED)]], row_labels=["a", "b"], column_labels=["c"])
    with pytest.raises(ValueError, match="expected"):
        labelled_grid([[np.zeros((4, 4, 2))]], row_labels=["a"], column_labels=["c"])


class FakeTracker:
    """A tracker recording what it was given, named like one of Accelerate's."""

    def __init__(self, name, images=True):
        self.name, self.calls = name, []
        if images:
            self.log_images = lambda values, step, **kwargs: self.calls.append((values, step, kwargs))

    def log_artifact(self, path, artifact_path=None):
        self.calls.append((path, artifact_path))


def test_each_tracker_gets_the_layout_its_log_images_documents(tmp_path):
    picture = Image.fromarray(solid(5, 7, RED))
    trackers = {name: FakeTracker(name) for name in ("tensorboard", "wandb", "aim", "swanlab", "custom")}
    trackers["mlflow"] = FakeTracker("mlflow", images=False)
    trackers["comet_ml"] = FakeTracker("comet_ml", images=False)
    file = tmp_path / "samples" / "epoch_001.png"
    skipped = log_image(list(trackers.values()), "samples/x", picture, 3, file=file)
    values, step, kwargs = trackers["tensorboard"].calls[0]
    assert values["samples/x"].shape == (1, 5, 7, 3) and values["samples/x"].dtype == np.uint8 and step == 3
    assert kwargs == {"dataformats": "NHWC"}
    for name in ("wandb", "swanlab", "custom"):  # a list of images
        (values, step, _), = trackers[name].calls
        assert isinstance(values["samples/x"], list) and np.array_equal(np.asarray(values["samples/x"][0]),
                                                                         solid(5, 7, RED))
    assert isinstance(trackers["aim"].calls[0][0]["samples/x"], Image.Image)  # one image
    assert trackers["mlflow"].calls == [(str(file), "samples")]
    assert skipped == ["comet_ml"] and log_image([], "x", picture, 0) == []


def test_resadapter_job_writes_a_labelled_grid_that_tensorboard_reads(tmp_path, monkeypatch):
    """A one-epoch embedded run with an Accelerator logging to TensorBoard: the grid PNG under samples/ is the
    image TensorBoard's own EventAccumulator reads back, pixel for pixel."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train_scripts import load_train_script

    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    script = load_train_script("resadapter")
    out = tmp_path / "run"
    assert script.main(["--report-to", "tensorboard", "--images", "4", "--epochs", "1", "--batch-size", "4", "--eval-items", "1", "--buckets",
                        "32x32", "--sample-sizes", "24x24", "32x32", "--steps", "1", "--sample-prompts",
                        "a red circle", "a blue square", "--output-dir", str(out), "--no-progress"]) == 0
    written = np.asarray(Image.open(out / "samples" / "epoch_001.png").convert("RGB"))
    images = []
    for folder in sorted({path.parent for path in out.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"images": 0})
        accumulator.Reload()
        if "samples" in accumulator.Tags()["images"]:
            images += accumulator.Images("samples")
    assert len(images) == 1, f"TensorBoard finds {len(images)} 'samples' images under {out}"
    (event,) = images
    logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert event.step == 1 and (event.height, event.width) == written.shape[:2]
    assert np.array_equal(logged, written)
    # the labelled layout: two resolution rows, two prompt columns, 32 px cells enlarged 3x to 96 px
    assert written.shape[0] > 2 * 96 and written.shape[1] > 2 * 96


def test_selma_grid_columns_are_the_base_and_the_expert_and_the_weight_is_restored():
    """Column "weight 0" is the frozen pipeline, column "weight 1" the expert, from the same seed; the expert's
    weight and the UNet's training mode come back as they were (training continues after the grid)."""
    import torch

    import visadapt
    from tests.train_scripts import load_train_script
    from visadapt.backbones import create_tiny_sd_pipeline

    script = load_train_script("selma")
    pipe = create_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    visadapt.attach(pipe.unet, "selma", rank=4, alpha=4.0, skill="color", adapter_name="color")
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "visadapt_" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    pipe.unet.train()
    prompts = ["a red square", "a blue star"]
    grid = script.expert_grid(pipe, "color", prompts, resolution=32, steps=1, guidance=1.0, seed=0, title="t")
    assert visadapt.get_weight(pipe.unet, "color") == 1.0 and pipe.unet.training

    def sample(weight):
        visadapt.set_weight(pipe.unet, "color", weight)
        pipe.unet.eval()
        images = pipe(prompts, height=32, width=32, num_inference_steps=1, guidance_scale=1.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        return [(np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8) for image in images]

    base, expert = sample(0.0), sample(1.0)
    assert not np.array_equal(base[0], expert[0])  # the expert changes the samples
    expected = labelled_grid([[base[row], expert[row]] for row in range(2)], row_labels=prompts,
                             column_labels=["weight 0 (base)", "weight 1 (expert)"], title="t", row_axis="prompt",
                             column_axis="color expert weight")
    assert np.array_equal(np.asarray(grid), np.asarray(expected))
