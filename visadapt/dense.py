"""Multi-task dense prediction on a frozen hierarchical backbone: per-task decoders, the model, the losses.

The layout follows the MTLoRA protocol for Swin on PASCAL-Context (scale-lab/MTLoRA; the only fully public
setup of this benchmark, see ``polyhistor_details.md`` sections 4-5), scaled to any Swin width:

* the backbone's four stage maps (before patch merging, timm ``forward_intermediates``), each through a
  per-task LayerNorm (Polyhistor's ``norm_{task}_{i}``; the backbone's own final norm is not used);
* per task, one :class:`DenseDecoder` (MTLoRA's ``hrnet`` head): a 1x1 convolution per stage to a small
  width, everything upsampled to the stage-1 resolution and concatenated, 1x1 conv -> BatchNorm -> ReLU ->
  1x1 conv to the task's channels, bilinearly upsampled to the input size;
* the task losses of MTLoRA's ``mtl_loss_schemes.py`` and its loss weights (:data:`MTLORA_LOSS_WEIGHTS`).

Task-conditioned adapters (Polyhistor's task embeddings, or one plain adapter per task) need the backbone to
run once per task: :class:`MultiTaskDenseModel` calls ``select_task(task)`` before each of those passes.
Tasks and sample format are those shared by the dense datasets and metrics: ``semseg``, ``human_parts``,
``sal``, ``normals``; label 255 (255.0 in all three channels for normals) marks ignored pixels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from visadapt.data.dense import IGNORE_INDEX  # ignored pixels (255.0 in all three channels for normals)
from visadapt.names import DENSE_METHODS  # the set-ups train/dense.py compares (attach_dense_method)
from visadapt.progress import Progress

#: the task weights of the total loss in MTLoRA's ``main.py`` (scale-lab/MTLoRA; Polyhistor's own weights
#: are not public): semseg 1, human_parts 2, sal 5, normals 10
MTLORA_LOSS_WEIGHTS: dict[str, float] = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0}

# MTLoRA's decoder widths for Swin-T (stages of 96/192/384/768 channels) are 18/36/72/144: 3/16 of each stage.
_WIDTH_FRACTION = (3, 16)
#: MTLoRA's HighResolutionHead widens the concatenated maps 4x (270 -> 1080 channels) before its last layer
HIDDEN_RATIO = 4


def default_decoder_widths(stage_channels: Sequence[int]) -> tuple[int, ...]:
    """MTLoRA's per-stage decoder widths scaled to a backbone: ``ceil(3 * C_s / 16)``, at least 1.

    Swin-T ``(96, 192, 384, 768)`` gives MTLoRA's ``(18, 36, 72, 144)``; the embedded
    ``visadapt_procswin_tiny`` ``(24, 48, 96, 192)`` gives ``(5, 9, 18, 36)``.
    """
    numerator, denominator = _WIDTH_FRACTION
    return tuple(max(1, math.ceil(numerator * int(c) / denominator)) for c in stage_channels)


class DenseDecoder(nn.Module):
    """One task's head over a feature pyramid: MTLoRA's ``hrnet`` head with its per-task downsampler.

    ``stage_channels``: channels ``C_s`` of the incoming maps, finest first. ``widths``: the output channels
    of each stage's 1x1 projection (default :func:`default_decoder_widths`); their sum ``W`` is widened to
    ``hidden_ratio * W`` before the output layer. The projections have no bias (MTLoRA's ``Downsampler``),
    the two later convolutions have one.

    Shapes: ``forward(features, output_size)`` takes maps ``(B, C_s, H_s, W_s)`` and returns logits
    ``(B, num_outputs, *output_size)``.
    """

    def __init__(self, stage_channels: Sequence[int], num_outputs: int, widths: Sequence[int] | None = None,
                 hidden_ratio: int = HIDDEN_RATIO) -> None:
        super().__init__()
        stage_channels = tuple(int(c) for c in stage_channels)
        if not stage_channels or min(stage_channels) < 1:
            raise ValueError(f"stage_channels={stage_channels} must list at least one positive channel count")
        widths = default_decoder_widths(stage_channels) if widths is None else tuple(int(w) for w in widths)
        if len(widths) != len(stage_channels) or min(widths) < 1:
            raise ValueError(f"widths={widths} must give one positive width per stage of {stage_channels}")
        if int(num_outputs) < 1 or int(hidden_ratio) < 1:
            raise ValueError(f"num_outputs={num_outputs} and hidden_ratio={hidden_ratio} must be positive")
        self.stage_channels, self.widths, self.num_outputs = stage_channels, widths, int(num_outputs)
        self.projections = nn.ModuleList(nn.Conv2d(c, w, kernel_size=1, bias=False)
                                         for c, w in zip(stage_channels, widths, strict=True))
        fused = sum(widths)
        hidden = int(hidden_ratio) * fused
        self.fuse = nn.Sequential(nn.Conv2d(fused, hidden, kernel_size=1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.output = nn.Conv2d(hidden, self.num_outputs, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        if len(features) != len(self.projections):
            raise ValueError(f"the decoder was built for {len(self.projections)} stages "
                             f"{self.stage_channels}; got {len(features)} feature maps")
        # Project first, then upsample, as MTLoRA does: the upsampled maps then have the small widths.
        target = features[0].shape[-2:]
        maps = []
        for projection, feature in zip(self.projections, features, strict=True):
            mapped = projection(feature)
            if mapped.shape[-2:] != target:
                mapped = F.interpolate(mapped, size=target, mode="bilinear", align_corners=False)
            maps.append(mapped)
        logits = self.output(self.fuse(torch.cat(maps, dim=1)))
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)


def backbone_stage_channels(backbone: nn.Module) -> tuple[int, ...]:
    """Channels of each stage map of ``forward_intermediates``, read from timm's ``feature_info``."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(backbone).__name__} has no timm feature_info to read its stage widths from; "
                         f"pass stage_channels=(C1, C2, ...) to MultiTaskDenseModel")
    if hasattr(info, "channels"):  # timm's FeatureInfo object (features_only models)
        return tuple(int(c) for c in info.channels())
    return tuple(int(stage["num_chs"]) for stage in info)


@dataclasses.dataclass
class DenseParameterCounts:
    """Trainable parameters of a :class:`MultiTaskDenseModel`, a tensor shared by several tasks counted once.

    ``adapter``: those in the backbone (the adapters once :func:`visadapt.attach` froze the rest; the whole
    backbone when nothing froze it); ``stage_norms``: the per-task LayerNorms; ``decoders``: the task heads.
    """

    adapter: int
    stage_norms: int
    decoders: int

    @property
    def total(self) -> int:
        return self.adapter + self.stage_norms + self.decoders

    def __str__(self) -> str:
        return (f"trainable params: {self.total:,} (adapter {self.adapter:,}, stage norms "
                f"{self.stage_norms:,}, decoders {self.decoders:,})")


class MultiTaskDenseModel(nn.Module):
    """A backbone with a feature pyramid and one decoder per task: ``forward(images) -> {task: logits}``.

    ``backbone``: a timm hierarchical model with ``forward_intermediates`` (a Swin), with its adapters
    attached by :func:`visadapt.attach`, which froze the rest. ``task_outputs``: task -> prediction channels
    (a dense dataset's ``task_outputs``). ``select_task``: ``None`` runs the backbone once and feeds every
    head from that pass (a task-agnostic adapter, or none); a callable ``select_task(task) -> None`` is called
    before each task's own backbone pass, for task-conditioned adapters: ``lambda t:
    visadapt.plugins.polyhistor.set_task(backbone, t)``, or ``lambda t: visadapt.set_active_adapters(backbone,
    t)`` for one plain adapter per task. The backbone stays as the last task selected it.

    ``stage_norms``: a LayerNorm per task and stage on the backbone's maps (Polyhistor's
    ``norm_{task}_{i}``). ``decoder_widths``: the :class:`DenseDecoder` ``widths``. ``stage_channels``: the
    backbone's stage widths, for a backbone without timm's ``feature_info``.

    Trainable: whatever requires grad in the backbone, plus the stage norms and decoders (all trainable when
    built). Shapes: ``images (B, 3, H, W)`` -> ``{task: (B, task_outputs[task], H, W)}``.
    """

    def __init__(self, backbone: nn.Module, task_outputs: Mapping[str, int],
                 select_task: Callable[[str], None] | None = None, *, stage_norms: bool = True,
                 decoder_widths: Sequence[int] | None = None,
                 stage_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if not task_outputs:
            raise ValueError("task_outputs is empty: give {task: prediction channels}, e.g. a dense "
                             "dataset's task_outputs")
        if not hasattr(backbone, "forward_intermediates"):
            raise TypeError(f"{type(backbone).__name__} has no forward_intermediates; use a timm model with "
                            f"a feature pyramid, such as a SwinTransformer")
        if select_task is not None and not callable(select_task):
            raise TypeError(f"select_task must be a callable select_task(task) -> None, got "
                            f"{type(select_task).__name__}")
        self.backbone = backbone
        self.task_outputs = {str(task): int(n) for task, n in task_outputs.items()}
        self.select_task = select_task
        channels = backbone_stage_channels(backbone) if stage_channels is None else stage_channels
        self.stage_channels = tuple(int(c) for c in channels)
        # Torch's LayerNorm eps (that of Swin's own norms), over the channels of NCHW maps.
        self.stage_norms = nn.ModuleDict({
            task: nn.ModuleList(LayerNorm2d(c, eps=1e-5) for c in self.stage_channels)
            for task in self.task_outputs
        }) if stage_norms else None
        self.decoders = nn.ModuleDict({task: DenseDecoder(self.stage_channels, n, decoder_widths)
                                       for task, n in self.task_outputs.items()})

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task_outputs)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's stage maps ``[(B, C_s, H_s, W_s)]``, finest first, under the current task."""
        maps = self.backbone.forward_intermediates(images, intermediates_only=True)
        if [m.shape[1] for m in maps] != list(self.stage_channels):
            raise RuntimeError(f"the backbone gave maps of {[m.shape[1] for m in maps]} channels; the heads "
                               f"were built for {list(self.stage_channels)}")
        return maps

    def decode(self, task: str, features: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        """``task``'s logits ``(B, C_t, *output_size)`` from the stage maps of :meth:`features`."""
        if self.stage_norms is not None:
            features = [norm(f) for norm, f in zip(self.stage_norms[task], features, strict=True)]
        return self.decoders[task](features, output_size)

    def forward(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: (B, C_t, H, W)}`` for every task, or for ``tasks`` only (in that order)."""
        if tasks is None:
            tasks = self.tasks
        else:
            unknown = [t for t in tasks if t not in self.task_outputs]
            if unknown:
                raise KeyError(f"tasks {unknown} have no decoder; this model predicts {list(self.tasks)}")
        size = images.shape[-2:]
        if self.select_task is None:
            shared = self.features(images)
            return {task: self.decode(task, shared, size) for task in tasks}
        predictions = {}
        for task in tasks:
            self.select_task(task)
            predictions[task] = self.decode(task, self.features(images), size)
        return predictions

    def trainable_parameter_counts(self) -> DenseParameterCounts:
        """Trainable parameters split into backbone (adapter), stage norms and decoders."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)

        return DenseParameterCounts(adapter=count(self.backbone), stage_norms=count(self.stage_norms),
                                    decoders=count(self.decoders))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything outside the backbone (stage norms and decoders, BatchNorm statistics included): what a
        run saves next to its adapter file to predict again; ``load_state_dict(state, strict=False)`` loads
        it."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}


# -------------------------------------------------------------------------------------------------- losses


def _check_shapes(task: str, prediction: torch.Tensor, target: torch.Tensor, channels: int | None) -> None:
    if prediction.ndim != 4 or (channels is not None and prediction.shape[1] != channels):
        expected = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(f"{task} prediction has shape {tuple(prediction.shape)}; expected {expected}")
    if target.shape[0] != prediction.shape[0] or target.shape[-2:] != prediction.shape[-2:]:
        raise ValueError(f"{task} target {tuple(target.shape)} does not fit prediction "
                         f"{tuple(prediction.shape)}: predictions must be at the targets' (input) resolution")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, task: str = "semseg") -> torch.Tensor:
    """Cross-entropy over the labelled pixels (semseg, human_parts): MTLoRA's ``SoftMaxwithLoss``.

    ``logits (B, K, H, W)``; ``target (B, H, W)`` int64 class ids, :data:`IGNORE_INDEX` ignored. The mean
    runs over labelled pixels; a batch without any (human_parts on images without people) gives 0, not NaN.
    """
    _check_shapes(task, logits, target, None)
    target = target.to(device=logits.device, dtype=torch.long)
    labelled = (target != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.clamp(min=1)


def saliency_loss(logits: torch.Tensor, target: torch.Tensor, task: str = "sal") -> torch.Tensor:
    """Class-balanced binary cross-entropy on logits: MTLoRA's ``BalancedCrossEntropyLoss`` (HED weighting).

    ``logits (B, 1, H, W)``; ``target (B, H, W)`` in {0, 1}, :data:`IGNORE_INDEX` ignored. Salient pixels are
    weighted by the fraction ``w`` of background pixels among the labelled ones, background pixels by
    ``1 - w``; the sum is divided by the number of labelled pixels (MTLoRA divides by all pixels, the same
    number there: its saliency targets have no ignored pixels). No labelled pixel gives 0.
    """
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    _check_shapes(task, logits, target, 1)
    target = target.to(logits.device)
    labelled = target != IGNORE_INDEX
    if bool(((target != 0) & (target != 1) & labelled).any()):
        raise ValueError(f"{task} targets must be 0, 1 or {IGNORE_INDEX} (ignored); got the values "
                         f"{torch.unique(target).tolist()[:8]}")
    positive = ((target == 1) & labelled).float()
    negative = ((target == 0) & labelled).float()
    count = labelled.sum().clamp(min=1)
    weight_positive = negative.sum() / count
    per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0].float(), positive, reduction="none")
    balanced = (weight_positive * (per_pixel * positive).sum()
                + (1 - weight_positive) * (per_pixel * negative).sum())
    return balanced / count


def normals_loss(prediction: torch.Tensor, target: torch.Tensor, task: str = "normals") -> torch.Tensor:
    """L1 between the L2-normalised prediction and the unit target normals, averaged over the components of
    labelled pixels: MTLoRA's ``NormalsLoss(normalize=True)``.

    ``prediction (B, 3, H, W)`` unnormalised; ``target (B, 3, H, W)`` unit vectors, 255.0 in all three
    channels where ignored. No labelled pixel gives 0.
    """
    _check_shapes(task, prediction, target, 3)
    if target.ndim != 4 or target.shape[1] != 3:
        raise ValueError(f"{task} target has shape {tuple(target.shape)}; expected (B, 3, H, W)")
    target = target.to(device=prediction.device, dtype=torch.float32)
    labelled = (target != IGNORE_INDEX).all(dim=1, keepdim=True)
    unit = F.normalize(prediction.float(), p=2, dim=1, eps=1e-12)
    # Ignored pixels hold 255.0: zero them in the target so that only labelled components reach the sum.
    error = ((unit - torch.where(labelled, target, torch.zeros_like(target))).abs() * labelled).sum()
    return error / (3 * labelled.sum()).clamp(min=1)


#: the loss of each task of the shared dense interface
TASK_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "semseg": segmentation_loss, "human_parts": segmentation_loss, "sal": saliency_loss,
    "normals": normals_loss,
}


def dense_loss(predictions: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
               weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted multi-task loss over the tasks in ``predictions``: ``(total, {task: unweighted loss})``.

    ``predictions``: ``{task: (B, C_t, H, W)}``, a :class:`MultiTaskDenseModel`'s output; ``batch``: collated
    dense samples holding every predicted task's target; ``weights``: task -> factor (default
    :data:`MTLORA_LOSS_WEIGHTS`). Every loss is computed in float32 whatever the autocast dtype. ``total`` is
    ``sum_t weights[t] * loss_t``; the per-task losses keep their graph (``.item()`` them to log).
    """
    weights = MTLORA_LOSS_WEIGHTS if weights is None else weights
    if not predictions:
        raise ValueError("predictions is empty: there is nothing to compute a loss for")
    per_task: dict[str, torch.Tensor] = {}
    for task, prediction in predictions.items():
        if task not in TASK_LOSSES:
            raise KeyError(f"no loss for task {task!r}; the dense tasks are {', '.join(TASK_LOSSES)}")
        if task not in batch:
            raise KeyError(f"the batch has no {task!r} target (it holds {', '.join(map(str, batch))})")
        if task not in weights:
            raise KeyError(f"weights has no entry for {task!r} (it has {', '.join(weights)})")
        per_task[task] = TASK_LOSSES[task](prediction, batch[task], task=task)
    total = sum(float(weights[task]) * loss for task, loss in per_task.items())
    return total, per_task


# ------------------------------------------------------------------------------------ training and evaluation

# Plugin defaults per method that differ from the plugin's own: the per-task baseline is Polyhistor's placement
# (serial after the MLP, "pfeiffer") with a width-proportional bottleneck, as the paper's Adapter baseline.
_METHOD_PLUGIN = {"lite": ("polyhistor", {"variant": "lite"}), "polyhistor": ("polyhistor", {"variant": "polyhistor"}),
                  "per-task": ("adapter", {"style": "pfeiffer", "reduction_factor": 16}),
                  "shared": ("adapter", {"style": "pfeiffer", "reduction_factor": 16})}


# Plugin fields per train/dense.py benchmark, under the user's (applied where the method's plugin has the field).
# scenes: the 24-wide embedded Swin needs smaller bottlenecks and hypernetworks than the code defaults made for
# Swin-T (rho 16 leaves 24 // 16 = 1 hidden unit; d_t 512 would make the hypernetwork larger than the backbone's
# adapters): rho 4 and 32-wide embeddings keep Polyhistor-Lite at a few % of the per-task adapters, as on Swin-T.
DENSE_PLUGIN_DEFAULTS = {
    "scenes": {"reduction_factor": 4, "task_embedding_dim": 32, "hidden_dim": 32, "projected_dim": 32},
    "pascal": {},
}


def benchmark_plugin_fields(method: str, tasks: Sequence[str], benchmark: str, given: Mapping) -> dict:
    """The fields a ``benchmark`` run of ``method`` attaches with: the fields of :data:`DENSE_PLUGIN_DEFAULTS`
    that the method's plugin has, then ``given`` (the user's)."""
    from visadapt.registry import get_plugin

    plugin, _ = method_plugin_fields(method, tasks, {})
    if plugin is None:
        return dict(given)
    known = {field.name for field in dataclasses.fields(get_plugin(plugin).Config)}
    return {**{k: v for k, v in DENSE_PLUGIN_DEFAULTS[benchmark].items() if k in known}, **given}


def method_plugin_fields(method: str, tasks: Sequence[str], fields: Mapping) -> tuple[str | None, dict]:
    """``(plugin name, config fields)`` of a :data:`DENSE_METHODS` entry: the method's defaults, then ``fields``
    (a field the plugin lacks is dropped only when it came from a benchmark-wide default, see train/dense.py)."""
    if method not in DENSE_METHODS:
        raise ValueError(f"unknown dense method {method!r}; choose one of {', '.join(DENSE_METHODS)}")
    if method in ("decoder", "full"):
        if fields:
            raise ValueError(f"method {method!r} attaches no adapter, so plugin fields {sorted(fields)} do not apply")
        return None, {}
    plugin, defaults = _METHOD_PLUGIN[method]
    values = {**defaults, **fields}
    if plugin == "polyhistor":
        values["tasks"] = tuple(tasks)
    return plugin, values


def attach_dense_method(backbone: nn.Module | None, method: str, tasks: Sequence[str], fields: Mapping
                        ) -> tuple[Callable[[str], None] | None, dict]:
    """Prepare ``backbone`` for ``method`` and return ``(select_task, {adapter name: config})``.

    ``lite`` / ``polyhistor``: Polyhistor(-Lite) adapters, ``select_task`` sets the task embedding;
    ``per-task``: one ``adapter`` per task named by it, ``select_task`` = :func:`visadapt.set_active_adapters`;
    ``shared``: one ``adapter`` for all tasks (no ``select_task``: one backbone pass feeds every head);
    ``decoder``: the backbone frozen, nothing attached; ``full``: every backbone parameter trains.
    ``backbone=None`` only builds and checks the configs (a bad field fails before any work).
    """
    from visadapt import api
    from visadapt.registry import get_plugin

    plugin_name, values = method_plugin_fields(method, tasks, fields)
    if plugin_name is None:
        if backbone is not None:
            for param in backbone.parameters():
                param.requires_grad_(method == "full")
        return None, {}
    plugin = get_plugin(plugin_name)()
    config = plugin.Config.from_dict(values)
    names = list(tasks) if method == "per-task" else ["default"]
    if backbone is None:
        return None, dict.fromkeys(names, config)
    for name in names:
        api.attach(backbone, plugin, config, adapter_name=name)
    if method == "per-task":
        def select_task(task: str) -> None:
            api.set_active_adapters(backbone, task)
        return select_task, dict.fromkeys(names, config)
    if plugin_name == "polyhistor":
        from visadapt.plugins.polyhistor import set_task

        return (lambda task: set_task(backbone, task)), {"default": config}
    return None, {"default": config}


class DenseTargets(torch.utils.data.Dataset):
    """A dense dataset as ``(image (3, H, W), {task: target})`` pairs, the form :func:`visadapt.engine.fit`
    batches (its ``loss_fn(predictions, targets)`` then gets the collated target dict)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.tasks = tuple(dataset.tasks)
        self.task_outputs = dict(dataset.task_outputs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return sample["image"], {task: sample[task] for task in self.tasks}


def _selection_score(results: Mapping[str, Mapping[str, float]]) -> float:
    """One higher-is-better number to pick a 'best' evaluation by (bookkeeping only; tables use the per-task
    metrics and Δm): the mean over tasks of mIoU in % and, for normals, ``100 * (1 - mean error / 90°)``."""
    from visadapt.eval.dense import DENSE_METRICS, headline

    scores = []
    for task, result in results.items():
        value = headline(task, result)
        scores.append(value if DENSE_METRICS[task].higher_is_better else 100.0 * (1.0 - value / 90.0))
    return sum(scores) / len(scores)


def evaluate_dense(model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int = 64,
                   device: torch.device | str | None = None, autocast=None) -> dict[str, dict]:
    """Every task's metrics (:class:`visadapt.eval.dense.DenseMeters`) of ``model`` over the whole ``dataset``,
    in eval mode without gradients; the model's train/eval mode is put back after."""
    from visadapt.eval.dense import DenseMeters

    device = torch.device(device) if device is not None else next(model.parameters()).device
    meters = DenseMeters(dataset.task_outputs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), (autocast() if autocast is not None else contextlib.nullcontext()):
            for batch in Progress(loader, desc="evaluating dense tasks", unit="batches", leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                predictions = model(batch["image"])
                meters.update({k: v.float() for k, v in predictions.items()}, batch)
    finally:
        model.train(was_training)
    return meters.compute()


def dense_evaluator(dataset: torch.utils.data.Dataset, batch_size: int = 64) -> Callable:
    """An ``evaluator(model, accelerator)`` for :func:`visadapt.engine.fit`: :func:`evaluate_dense` on the
    whole ``dataset`` in every process (exact metrics, no sharding), flattened to ``{"<task>/<key>": value}``
    plus ``score`` (:func:`_selection_score`) and ``samples``. The full results of the latest evaluation (per-class
    IoU lists included) stay on ``evaluator.last_results``."""

    def evaluator(model: nn.Module, accelerator) -> dict[str, float]:
        bare = accelerator.unwrap_model(model)
        results = evaluate_dense(bare, dataset, batch_size=batch_size, device=accelerator.device,
                                 autocast=accelerator.autocast)
        evaluator.last_results = results
        flat = {f"{task}/{key}": float(value) for task, result in results.items()
                for key, value in result.items() if isinstance(value, (int, float))}
        return {**flat, "score": _selection_score(results), "samples": len(dataset)}

    return evaluator


def unflatten_results(entry: Mapping[str, float], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{"semseg/mIoU": 40.1, ...}`` (a :func:`dense_evaluator` history entry) -> ``{"semseg": {"mIoU": 40.1}}``."""
    results: dict[str, dict[str, float]] = {task: {} for task in tasks}
    for key, value in entry.items():
        task, sep, name = key.partition("/")
        if sep and task in results:
            results[task][name] = value
    return results


def save_dense_adapters(model: MultiTaskDenseModel, method: str, folder, run: Mapping | None = None) -> list[str]:
    """Write what a run trained into ``folder``: the adapter file(s) (``adapter.safetensors``; ``per-task``: one
    ``adapter-<task>.safetensors`` each; ``full``: ``backbone.safetensors``) and ``heads.safetensors`` (stage norms
    and decoders, with the task outputs in its metadata). Returns the file names."""
    from safetensors.torch import save_file

    from visadapt import api
    from visadapt.io import TRAIN_METADATA, save_adapter

    folder = Path(folder)
    meta = {TRAIN_METADATA: json.dumps({"method": method, **(run or {})}, sort_keys=True)}
    written = []
    names = list(api.records(model.backbone))
    for name in names:
        file = f"adapter-{name}.safetensors" if method == "per-task" else "adapter.safetensors"
        save_adapter(model.backbone, folder / file, adapter_name=name, metadata=meta)
        written.append(file)
    if method == "full":
        save_file({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()},
                  str(folder / "backbone.safetensors"), metadata=meta)
        written.append("backbone.safetensors")
    heads = {k: v.detach().cpu().contiguous() for k, v in model.head_state_dict().items()}
    save_file(heads, str(folder / "heads.safetensors"),
              metadata={**meta, "task_outputs": json.dumps(model.task_outputs)})
    written.append("heads.safetensors")
    return written
