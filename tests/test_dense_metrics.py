"""Dense metrics against hand-computed values on tiny tensors: mIoU with ignore, saliency thresholds and empty
images, angular errors of known vectors, Δm signs, and the multi-task table."""
from __future__ import annotations

import math

import pytest
import torch

from visadapt.eval.dense import (
    DENSE_METRICS,
    PASCAL_SINGLE_TASK_REFERENCE,
    SALIENCY_THRESHOLDS,
    DenseMeters,
    DenseRow,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    delta_m,
    format_dense_table,
)

torch.set_num_threads(1)


def test_segmentation_miou_with_ignore_and_absent_classes():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    prediction = torch.tensor([[[0, 1, 1], [1, 1, 3]]])  # the ignored pixel's wrong guess must not count
    meter = SegmentationMeter(num_classes=5)
    meter.update(prediction, target)
    result = meter.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 2/4; class 2: FN 1 -> 0; classes 3, 4: absent -> left out.
    assert result["per_class_iou"][:3] == pytest.approx([50.0, 50.0, 0.0])
    assert math.isnan(result["per_class_iou"][3]) and math.isnan(result["per_class_iou"][4])
    assert result["mIoU"] == pytest.approx(100 / 3)
    assert result["pixel_accuracy"] == pytest.approx(60.0) and result["pixels"] == 5

    # Logits are arg-maxed; two batches accumulate into the same confusion matrix as one.
    logits = torch.nn.functional.one_hot(prediction, 5).permute(0, 3, 1, 2).float()
    split = SegmentationMeter(num_classes=5)
    split.update(logits[:, :, :1], target[:, :1])
    split.update(logits[:, :, 1:], target[:, 1:])
    assert split.compute()["per_class_iou"][:3] == pytest.approx(result["per_class_iou"][:3])

    with pytest.raises(ValueError, match="outside"):
        SegmentationMeter(num_classes=2).update(prediction.clamp(max=1), target)
    with pytest.raises(ValueError, match="upsample"):
        meter.update(logits[..., :2], target)


def test_saliency_thresholds_and_an_empty_image():
    # Image 1: probabilities 0.95, 0.62, 0.27, 0.1 on foreground, foreground, background, background.
    #   t in {0.2, 0.25}: predicts 3 pixels -> IoU 2/3, P 2/3, R 1
    #   t in [0.3, 0.6]:   predicts 2       -> IoU 1,   P 1,   R 1
    #   t in [0.65, 0.9]:  predicts 1       -> IoU 1/2, P 1,   R 1/2
    # Image 2: no foreground and nothing predicted -> IoU 1 (a match), but P = R = 0 (MTLoRA's convention).
    probabilities = torch.tensor([[[0.95, 0.62], [0.27, 0.1]], [[0.01, 0.02], [0.03, 0.04]]])
    logits = torch.logit(probabilities).unsqueeze(1)
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    meter = SaliencyMeter()
    meter.update(logits, target)
    result = meter.compute()
    thresholds = torch.tensor(SALIENCY_THRESHOLDS)
    assert len(thresholds) == 15 and thresholds[0] == pytest.approx(0.2) and thresholds[-1] == pytest.approx(0.9)
    expected_iou = [(2 / 3 + 1) / 2] * 2 + [1.0] * 7 + [(0.5 + 1) / 2] * 6
    assert result["per_threshold"]["iou"] == pytest.approx([100 * v for v in expected_iou])
    assert result["mIoU"] == pytest.approx(100.0) and result["mIoU_threshold"] == pytest.approx(0.3)
    # maxF from the mean precision and recall: at t = 0.3 both are (1 + 0) / 2, so F = 0.5.
    assert result["maxF"] == pytest.approx(50.0)
    f_at_02 = 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)
    assert result["per_threshold"]["f"][0] == pytest.approx(100 * f_at_02)

    # Ignored pixels are left out: the same first image with its two background pixels ignored scores IoU 1 at
    # every threshold up to 0.6.
    ignored = SaliencyMeter()
    ignored.update(logits[:1], torch.tensor([[[1, 1], [255, 255]]]))
    assert ignored.compute()["per_threshold"]["iou"][:9] == pytest.approx([100.0] * 9)
    with pytest.raises(ValueError, match="0, 1 or 255"):
        ignored.update(logits[:1], torch.tensor([[[2, 1], [0, 0]]]))


def test_normals_angles_of_known_vectors():
    degrees = [0.0, 20.0, 45.0, 90.0, 180.0]
    prediction = torch.stack([torch.tensor([math.cos(math.radians(a)), math.sin(math.radians(a)), 0.0]) * 3
                              for a in degrees] + [torch.tensor([0.0, 0.0, -1.0])])  # lengths do not matter
    target = torch.tensor([[1.0, 0.0, 0.0]] * 5 + [[255.0, 255.0, 255.0]])  # the last pixel is ignored
    meter = NormalsMeter()
    # Two batches of (B, 3, H, W) = (1, 3, 1, 3).
    meter.update(prediction[:3].T.reshape(1, 3, 1, 3), target[:3].T.reshape(1, 3, 1, 3))
    meter.update(prediction[3:].T.reshape(1, 3, 1, 3), target[3:].T.reshape(1, 3, 1, 3))
    result = meter.compute()
    assert result["pixels"] == 5
    assert result["mean"] == pytest.approx(sum(degrees) / 5, abs=1e-4)
    assert result["median"] == pytest.approx(45.0, abs=0.006)
    assert result["rmse"] == pytest.approx(math.sqrt(sum(a * a for a in degrees) / 5), abs=1e-3)
    assert result["within_11.25"] == pytest.approx(20.0)
    assert result["within_22.5"] == pytest.approx(40.0) and result["within_30"] == pytest.approx(40.0)
    assert math.isnan(NormalsMeter().compute()["mean"])


def test_dense_meters_feed_each_task():
    meters = DenseMeters({"semseg": 3, "sal": 1, "normals": 3})
    target = {"semseg": torch.zeros(2, 4, 4, dtype=torch.long), "sal": torch.ones(2, 4, 4, dtype=torch.long),
              "normals": torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)}
    perfect = {"semseg": torch.zeros(2, 3, 4, 4).index_fill_(1, torch.tensor([0]), 1.0),
               "sal": torch.full((2, 1, 4, 4), 5.0), "normals": target["normals"] * 2}
    meters.update(perfect, target)
    results = meters.compute()
    assert results["semseg"]["mIoU"] == pytest.approx(100.0)
    assert results["sal"]["mIoU"] == pytest.approx(100.0) and results["sal"]["maxF"] == pytest.approx(100.0)
    assert results["normals"]["mean"] == pytest.approx(0.0, abs=1e-2)
    with pytest.raises(KeyError, match="normals"):
        meters.update({"semseg": perfect["semseg"], "sal": perfect["sal"]}, target)


def test_headline_metrics_and_delta_m_signs():
    assert {task: (m.key, m.higher_is_better) for task, m in DENSE_METRICS.items()} == {
        "semseg": ("mIoU", True), "human_parts": ("mIoU", True), "sal": ("mIoU", True), "normals": ("mean", False)}
    assert DENSE_METRICS["sal"].also == ("maxF",)
    assert PASCAL_SINGLE_TASK_REFERENCE == {"semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97}
    assert delta_m(PASCAL_SINGLE_TASK_REFERENCE) == pytest.approx(0.0)
    reference = PASCAL_SINGLE_TASK_REFERENCE
    # 10% better segmentation and a 10% lower normals error both count +10.
    better = {"semseg": reference["semseg"] * 1.1, "normals": reference["normals"] * 0.9}
    assert delta_m(better) == pytest.approx(10.0)
    # A 10% higher normals error counts -10 and cancels the segmentation gain.
    assert delta_m({"semseg": reference["semseg"] * 1.1, "normals": reference["normals"] * 1.1}) == pytest.approx(0.0)
    # Meter results are accepted as they are (their headline key is used).
    assert delta_m({"sal": {"mIoU": 62.35 * 0.8, "maxF": 99.0}}) == pytest.approx(-20.0)
    with pytest.raises(KeyError, match="depth"):
        delta_m({"depth": 1.0}, {"semseg": 1.0})


def test_dense_table_prints_metrics_delta_and_params():
    rows = [
        DenseRow("Polyhistor", {"semseg": 70.0, "human_parts": {"mIoU": 60.0}, "sal": {"mIoU": 62.35, "maxF": 75.5},
                                "normals": 18.5}, trainable_params=2_960_000),
        {"label": "Per-task adapters", "results": {"semseg": 65.0, "human_parts": 58.0, "sal": 60.0, "normals": 19.0},
         "delta_m": -4.2, "trainable_params": 26_500_000},
        DenseRow("Partial", {"semseg": 50.0}),
    ]
    table = format_dense_table(rows, references=PASCAL_SINGLE_TASK_REFERENCE, caption="procedural scenes")
    lines = table.splitlines()
    assert lines[0] == "procedural scenes"
    assert lines[2] == ("| Method | SemSeg mIoU ↑ | Parts mIoU ↑ | Sal mIoU ↑ | Sal maxF ↑ | Normals mErr ↓ | Δm (%) ↑ "
                        "| Trainable (M) |")
    expected = delta_m({"semseg": 70.0, "human_parts": 60.0, "sal": 62.35, "normals": 18.5})
    assert lines[4] == f"| Polyhistor | 70.00 | 60.00 | 62.35 | 75.50 | 18.50 | {expected:+.2f} | 2.96 |"
    assert lines[5] == "| Per-task adapters | 65.00 | 58.00 | 60.00 | — | 19.00 | -4.20 | 26.5 |"
    assert lines[6] == "| Partial | 50.00 | — | — | — | — | — | — |"
