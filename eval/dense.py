"""Multi-task dense prediction metrics (the MTLoRA protocol on PASCAL-Context), the relative metric Δm, and the
multi-task table.

Meters accumulate over batches on any device and report percentages (degrees for normals):

* :class:`SegmentationMeter` (semantic segmentation, human parts): one confusion matrix over the whole set,
  pixels labelled 255 ignored; per-class IoU = TP / (TP + FP + FN); **mIoU** = the mean over the classes that
  occur in the ground truth or the prediction. MTLoRA averages over all classes, an absent one counting 0; the
  two agree whenever every class occurs in the evaluation set (PASCAL val), and the form here does not punish a
  small set for classes it lacks.
* :class:`SaliencyMeter`: sigmoid of the logits, 15 thresholds ``linspace(0.2, 0.9)``; per image and threshold
  IoU, precision and recall, averaged over images. **mIoU** = max over thresholds of the mean IoU; **maxF** =
  max over thresholds of ``2PR / (P + R)`` with the mean precision P and mean recall R. An image without
  foreground counts as MTLoRA's ``jaccard`` / ``precision_recall`` count it: IoU 1 if nothing is predicted
  either, else 0; its recall is 0, and its precision 0 too when nothing is predicted, so it lowers mean P/R
  even when predicted perfectly. Pixels labelled 255 are left out (MTLoRA's data has none).
* :class:`NormalsMeter`: predictions L2-normalised; the angle to the ground truth in degrees over the pixels
  whose ground truth is not 255; **mean** over all valid pixels of the set (the number Δm uses; MTLoRA's
  "rmse" column is the same mean), plus the median, the true root mean square, and the share of pixels within
  11.25, 22.5 and 30 degrees.

``Δm = (100 / T) Σ_t s_t (M_t - M_ref,t) / M_ref,t`` with ``s_t = -1`` where lower is better (normals error):
the mean relative gain over the single-task references, in percent (:func:`delta_m`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from visadapt.data.dense import DENSE_TASKS, IGNORE_INDEX

# relative: eval/ is installed as visadapt.eval (see eval/cli.py)
from .tables import MISSING, format_millions

SALIENCY_THRESHOLDS = tuple(0.2 + 0.7 * k / 14 for k in range(15))  # numpy.linspace(0.2, 0.9, 15), as MTLoRA
NORMAL_ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
_MEDIAN_BINS_PER_DEGREE = 100  # the normals median is read from a histogram of 0.01-degree bins


def _as_label_map(target: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, H, W)`` from ``(B, H, W)`` or ``(B, 1, H, W)``."""
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"{name} targets must be (B, H, W) label maps, got shape {tuple(target.shape)}")
    return target


def _check_same_size(prediction: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if prediction.shape[0] != target.shape[0] or prediction.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{name} prediction {tuple(prediction.shape)} does not match its target {tuple(target.shape)} in batch "
            "or spatial size; predictions are evaluated at label resolution: upsample them first "
            "(F.interpolate(pred, size=target.shape[-2:], mode='bilinear', align_corners=False))")


class SegmentationMeter:
    """Semantic or part segmentation: a ``(num_classes, num_classes)`` confusion matrix over the whole set.

    ``update(prediction, target)``: ``prediction`` is ``(B, C, H, W)`` logits (arg-maxed over C, which must be
    ``num_classes``) or ``(B, H, W)`` class ids; ``target`` ``(B, H, W)`` ids with ``ignore_index`` ignored.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.confusion: torch.Tensor | None = None  # rows: ground truth, columns: prediction

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        target = _as_label_map(target, "segmentation")
        if prediction.dim() == 4:
            if prediction.shape[1] != self.num_classes:
                raise ValueError(f"segmentation logits have {prediction.shape[1]} channels, the meter "
                                 f"{self.num_classes} classes")
            prediction = prediction.argmax(dim=1)
        _check_same_size(prediction, target, "segmentation")
        valid = target != self.ignore_index
        truth, guess = target[valid].long(), prediction.to(target.device)[valid].long()
        if truth.numel() and (truth.min() < 0 or truth.max() >= self.num_classes):
            bad = truth[(truth < 0) | (truth >= self.num_classes)].unique()[:5].tolist()
            raise ValueError(f"target holds class ids {bad} outside [0, {self.num_classes}) that are not the ignore "
                             f"value {self.ignore_index}; wrong num_classes, or a label map of another dataset")
        if guess.numel() and (guess.min() < 0 or guess.max() >= self.num_classes):
            raise ValueError(f"predicted class ids must lie in [0, {self.num_classes}); got "
                             f"{guess.min().item()}..{guess.max().item()}")
        counts = torch.bincount(truth * self.num_classes + guess, minlength=self.num_classes ** 2)
        counts = counts.reshape(self.num_classes, self.num_classes)
        self.confusion = counts if self.confusion is None else self.confusion + counts.to(self.confusion.device)

    def compute(self) -> dict:
        """``{"mIoU": %, "per_class_iou": [% or nan for a class in neither ground truth nor prediction],
        "pixel_accuracy": %, "pixels": int}``; mIoU is nan when no labelled pixel was seen."""
        confusion = (self.confusion.double().cpu() if self.confusion is not None
                     else torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64))
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp  # TP + FP + FN
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan)) * 100
        present = union > 0
        pixels = int(confusion.sum())
        return {"mIoU": float(iou[present].mean()) if present.any() else math.nan,
                "per_class_iou": iou.tolist(),
                "pixel_accuracy": float(tp.sum() / pixels * 100) if pixels else math.nan,
                "pixels": pixels}


class SaliencyMeter:
    """Saliency as MTLoRA's ``SaliencyMeterWithNoBeta``: per-image IoU / precision / recall at each threshold.

    ``update(logits, target)``: ``logits`` ``(B, 1, H, W)`` or ``(B, H, W)`` (before the sigmoid); ``target``
    ``(B, H, W)`` in {0, 1} with ``ignore_index`` left out. A pixel is predicted salient where
    ``sigmoid(logit) > threshold``.
    """

    def __init__(self, thresholds: Sequence[float] = SALIENCY_THRESHOLDS, ignore_index: int = IGNORE_INDEX):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        n = len(self.thresholds)
        self.iou_sum = torch.zeros(n, dtype=torch.float64)
        self.precision_sum = torch.zeros(n, dtype=torch.float64)
        self.recall_sum = torch.zeros(n, dtype=torch.float64)
        self.images = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        target = _as_label_map(target, "saliency")
        logits = _as_label_map(logits, "saliency logits")
        _check_same_size(logits, target, "saliency")
        probability = logits.float().sigmoid().flatten(1).to(target.device)
        target = target.flatten(1)
        valid = target != self.ignore_index
        if ((target[valid] != 0) & (target[valid] != 1)).any():
            raise ValueError(f"saliency targets must be 0, 1 or {self.ignore_index}; got "
                             f"{target[valid].unique()[:5].tolist()}")
        foreground = (target == 1) & valid
        sums = []
        for threshold in self.thresholds:
            predicted = (probability > threshold) & valid
            tp = (predicted & foreground).sum(1).double()
            fp = (predicted & ~foreground).sum(1).double()
            fn = (~predicted & foreground).sum(1).double()
            union = tp + fp + fn
            iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))  # both empty: a match
            sums.append(torch.stack([iou.sum(), (tp / (tp + fp + 1e-12)).sum(), (tp / (tp + fn + 1e-12)).sum()]))
        sums = torch.stack(sums).cpu()
        self.iou_sum += sums[:, 0]
        self.precision_sum += sums[:, 1]
        self.recall_sum += sums[:, 2]
        self.images += target.shape[0]

    def compute(self) -> dict:
        """``{"mIoU": %, "maxF": %, "mIoU_threshold", "maxF_threshold", "images", "per_threshold": {...}}``
        (nan without images); ``per_threshold`` holds the thresholds and the mean IoU, precision, recall and F
        at each, in percent."""
        if self.images == 0:
            return {"mIoU": math.nan, "maxF": math.nan, "images": 0}
        iou = self.iou_sum / self.images
        precision, recall = self.precision_sum / self.images, self.recall_sum / self.images
        f_measure = 2 * precision * recall / (precision + recall + 1e-12)
        best_iou, best_f = int(iou.argmax()), int(f_measure.argmax())
        return {"mIoU": float(iou[best_iou] * 100), "maxF": float(f_measure[best_f] * 100),
                "mIoU_threshold": self.thresholds[best_iou], "maxF_threshold": self.thresholds[best_f],
                "images": self.images,
                "per_threshold": {"threshold": list(self.thresholds), "iou": (iou * 100).tolist(),
                                  "precision": (precision * 100).tolist(), "recall": (recall * 100).tolist(),
                                  "f": (f_measure * 100).tolist()}}


class NormalsMeter:
    """Surface normals: angular error in degrees between L2-normalised predictions and the ground truth.

    ``update(prediction, target)``: ``prediction`` ``(B, 3, H, W)`` (any length), ``target`` ``(B, 3, H, W)``
    unit vectors with 255 in the channels of ignored pixels. The median is exact to 0.005 degrees (read from a
    0.01-degree histogram; for an even count, the lower of the two middle values, as ``torch.median``).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.angle_sum = 0.0
        self.squared_sum = 0.0
        self.pixels = 0
        self.within = [0] * len(NORMAL_ANGLE_THRESHOLDS)
        self.histogram: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if prediction.dim() != 4 or prediction.shape[1] != 3 or target.shape != prediction.shape:
            raise ValueError(f"normals prediction and target must both be (B, 3, H, W); got "
                             f"{tuple(prediction.shape)} and {tuple(target.shape)} (upsample predictions to the "
                             "label size first)")
        valid = (target != self.ignore_index).all(dim=1)
        unit = F.normalize(prediction.float().to(target.device), dim=1)
        cosine = (unit * target.float()).sum(dim=1).clamp(-1.0, 1.0)
        angles = torch.rad2deg(torch.acos(cosine[valid])).double()
        self.angle_sum += float(angles.sum())
        self.squared_sum += float((angles * angles).sum())
        self.pixels += angles.numel()
        for k, threshold in enumerate(NORMAL_ANGLE_THRESHOLDS):
            self.within[k] += int((angles < threshold).sum())
        bins = 180 * _MEDIAN_BINS_PER_DEGREE
        index = (angles * _MEDIAN_BINS_PER_DEGREE).long().clamp(0, bins - 1)
        counts = torch.bincount(index, minlength=bins).cpu()
        self.histogram = counts if self.histogram is None else self.histogram + counts

    def compute(self) -> dict:
        """``{"mean", "median", "rmse"}`` in degrees, ``{"within_11.25", "within_22.5", "within_30"}`` in
        percent of the valid pixels, and ``"pixels"``; nan without valid pixels."""
        if self.pixels == 0:
            return {"mean": math.nan, "median": math.nan, "rmse": math.nan, "pixels": 0}
        cumulative = self.histogram.cumsum(0)
        median_bin = int(torch.searchsorted(cumulative, torch.tensor((self.pixels + 1) // 2)))
        out = {"mean": self.angle_sum / self.pixels,
               "median": (median_bin + 0.5) / _MEDIAN_BINS_PER_DEGREE,
               "rmse": math.sqrt(self.squared_sum / self.pixels)}
        for threshold, count in zip(NORMAL_ANGLE_THRESHOLDS, self.within):
            out[f"within_{threshold:g}"] = count / self.pixels * 100
        out["pixels"] = self.pixels
        return out


@dataclasses.dataclass(frozen=True)
class DenseMetric:
    """The headline number of one dense task: ``key`` in its meter's results, how tables name it, and its
    direction; ``also`` lists further numbers tables print next to it."""

    key: str
    title: str
    higher_is_better: bool
    also: tuple[str, ...] = ()


DENSE_METRICS = {
    "semseg": DenseMetric("mIoU", "SemSeg mIoU", True),
    "human_parts": DenseMetric("mIoU", "Parts mIoU", True),
    "sal": DenseMetric("mIoU", "Sal mIoU", True, also=("maxF",)),
    "normals": DenseMetric("mean", "Normals mErr", False),
}
assert tuple(DENSE_METRICS) == DENSE_TASKS

# Single-task full fine-tuning of Swin-T on PASCAL-Context (MTLoRA protocol): the Δm references. Source: the
# PAPER_ST_DEFAULTS of compute_delta_m.py in Malygossssss/TADFormer (a fork of scale-lab/MTLoRA), as recorded in
# shared/specs/polyhistor_details.md §6. Semseg / parts / saliency mIoU in %, normals mean angular error in degrees.
PASCAL_SINGLE_TASK_REFERENCE = {"semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97}


def dense_meter(task: str, channels: int) -> SegmentationMeter | SaliencyMeter | NormalsMeter:
    """The meter of ``task`` for a head with ``channels`` outputs (the dataset's ``task_outputs[task]``)."""
    if task in ("semseg", "human_parts"):
        return SegmentationMeter(channels)
    if task == "sal":
        return SaliencyMeter()
    if task == "normals":
        return NormalsMeter()
    raise ValueError(f"unknown dense task {task!r}; choose among {', '.join(DENSE_TASKS)}")


class DenseMeters:
    """One meter per task of a dataset's ``task_outputs``; ``update(predictions, batch)`` feeds each task's
    ``(B, C_t, H, W)`` prediction with the batch's target of the same name."""

    def __init__(self, task_outputs: Mapping[str, int]):
        self.meters = {task: dense_meter(task, channels) for task, channels in task_outputs.items()}

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()

    def update(self, predictions: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        missing = [t for t in self.meters if t not in predictions or t not in batch]
        if missing:
            raise KeyError(f"task(s) {', '.join(missing)} lack a prediction or a target (predictions: "
                           f"{', '.join(predictions)}; batch: {', '.join(batch)})")
        for task, meter in self.meters.items():
            meter.update(predictions[task], batch[task])

    def compute(self) -> dict[str, dict]:
        """Each task's full results."""
        return {task: meter.compute() for task, meter in self.meters.items()}


def headline(task: str, result: float | Mapping[str, float]) -> float:
    """The headline number of ``task`` from a meter's results (or the number itself)."""
    if task not in DENSE_METRICS:
        raise ValueError(f"unknown dense task {task!r}; choose among {', '.join(DENSE_METRICS)}")
    if isinstance(result, Mapping):
        key = DENSE_METRICS[task].key
        if key not in result:
            raise KeyError(f"results of {task} hold no {key!r} (keys: {', '.join(result)})")
        return float(result[key])
    return float(result)


def delta_m(results: Mapping[str, float | Mapping[str, float]],
            references: Mapping[str, float | Mapping[str, float]] = PASCAL_SINGLE_TASK_REFERENCE) -> float:
    """Δm in percent: ``(100 / T) Σ_t s_t (M_t - M_ref,t) / M_ref,t`` over the tasks of ``results``.

    ``s_t`` is +1 where higher is better and -1 where lower is (normals error), so a positive Δm is better than
    the references on average. Values may be headline numbers or a meter's full results.
    """
    if not results:
        raise ValueError("no task results to compute Δm from")
    missing = [t for t in results if t not in references]
    if missing:
        raise KeyError(f"no reference for task(s) {', '.join(missing)}; references cover {', '.join(references)}")
    total = 0.0
    for task, result in results.items():
        value, reference = headline(task, result), headline(task, references[task])
        if reference == 0 or not math.isfinite(reference):
            raise ValueError(f"reference of {task} is {reference}; Δm divides by it")
        sign = 1.0 if DENSE_METRICS[task].higher_is_better else -1.0
        total += sign * (value - reference) / reference
    return 100.0 * total / len(results)


@dataclasses.dataclass
class DenseRow:
    """One row of :func:`format_dense_table`: a method's per-task results (headline numbers or meter results),
    optionally its Δm (computed from the table's references when absent) and trainable parameter count."""

    label: str
    results: Mapping[str, float | Mapping[str, float]]
    delta_m: float | None = None
    trainable_params: int | None = None


def format_dense_table(rows: Sequence[DenseRow | Mapping], references: Mapping | None = None,
                       tasks: Sequence[str] | None = None, caption: str | None = None) -> str:
    """The multi-task table as MTL papers print it, in markdown: per-task metrics (arrows give the better
    direction), Δm (%) and trainable parameters (M).

    ``rows``: :class:`DenseRow` or mappings with its fields. ``references``: per-task reference numbers for Δm
    (rows that carry ``delta_m`` keep theirs; without references the others show a dash). ``tasks``: the
    columns, default every task any row has, in canonical order. Saliency's maxF gets a column when a row has it.
    """
    rows = [row if isinstance(row, DenseRow) else DenseRow(**row) for row in rows]
    if tasks is None:
        tasks = [t for t in DENSE_TASKS if any(t in row.results for row in rows)]
    columns: list[tuple[str, str, str]] = []  # (task, result key, header)
    for task in tasks:
        metric = DENSE_METRICS[task]
        columns.append((task, metric.key, f"{metric.title} {'↑' if metric.higher_is_better else '↓'}"))
        for extra in metric.also:
            if any(isinstance(row.results.get(task), Mapping) and extra in row.results[task] for row in rows):
                columns.append((task, extra, f"{metric.title.split()[0]} {extra} ↑"))
    header = ["Method", *(h for _, _, h in columns), "Δm (%) ↑", "Trainable (M)"]
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [row.label.replace("|", "\\|")]
        for task, key, _ in columns:
            result = row.results.get(task)
            if isinstance(result, Mapping):
                value = result.get(key)
            else:
                value = result if key == DENSE_METRICS[task].key else None
            cells.append(MISSING if value is None or not math.isfinite(float(value)) else f"{float(value):.2f}")
        delta = row.delta_m
        if delta is None and references is not None and all(t in row.results for t in tasks):
            delta = delta_m({t: row.results[t] for t in tasks}, references)
        cells.append(MISSING if delta is None else f"{delta:+.2f}")
        cells.append(format_millions(row.trainable_params))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Δm = mean over the tasks of the relative difference to the single-task reference, in %, with the "
                 "sign flipped for lower-is-better metrics (normals error): positive is better.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ visadapt-eval --benchmark dense

DENSE_BENCHMARKS = ("scenes", "pascal")


def read_dense_run(path: str | Path) -> dict:
    """The ``metrics.json`` of a ``train/dense.py`` output directory (or the file), checked to be one."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} holds no metrics.json; pass a train/dense.py output directory (training may "
                         f"still be running)")
    record = json.loads(file.read_text())
    if record.get("benchmark") not in DENSE_BENCHMARKS or not isinstance(record.get("results"), dict):
        raise ValueError(f"{file} is not a train/dense.py result (no dense 'results'); pass the --benchmark it "
                         f"belongs to")
    return record


def dense_main(paths: Sequence[str], labels: Sequence[str] | None, reference: str | None
               ) -> tuple[str, dict[str, Any]]:
    """The ``visadapt-eval --benchmark dense`` table: one row per ``train/dense.py`` run, Δm against
    ``reference`` (a single-task run directory such as ``train/dense.py --method full --single-task``, or
    ``pascal`` for the published single-task Swin-T numbers; none: no Δm)."""
    runs = []
    for i, item in enumerate(paths):
        record = read_dense_run(item)
        runs.append((labels[i] if labels else Path(item).resolve().name, record))
    benchmarks = {record["benchmark"] for _, record in runs}
    if len(benchmarks) > 1:
        raise ValueError(f"the runs come from different benchmarks ({', '.join(sorted(benchmarks))}); one table "
                         f"compares runs of one benchmark")
    references = None
    caption = None
    if reference == "pascal":
        references = PASCAL_SINGLE_TASK_REFERENCE
        caption = "Δm against single-task full fine-tuning of Swin-T (PASCAL-Context, MTLoRA protocol)"
    elif reference is not None:
        ref = read_dense_run(reference)
        if ref["benchmark"] not in benchmarks:
            raise ValueError(f"reference {reference} is a {ref['benchmark']} run; the table's runs are "
                             f"{', '.join(sorted(benchmarks))}")
        references = ref["results"]
        kind = "one model per task" if ref.get("single_task") else "multi-task"
        caption = f"Δm against {Path(reference).resolve().name} ({ref.get('method')}, {kind})"
    rows = [DenseRow(label, record["results"], None, record.get("trainable_params")) for label, record in runs]
    table = format_dense_table(rows, references, caption=caption)
    extra = [f"{label}: adapter {record.get('adapter_params', 0):,} + stage norms "
             f"{record.get('stage_norm_params', 0):,} + decoders {record.get('decoder_params', 0):,} trainable; "
             f"{record.get('wall_time_s', 0):.0f} s" for label, record in runs if "adapter_params" in record]
    if extra:
        table += "\n" + "\n".join(extra) + "\n"
    return table, {label: record for label, record in runs}
