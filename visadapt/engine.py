"""The Accelerate training loop every ``train/`` script shares: one place for devices, precision and resume.

One :class:`accelerate.Accelerator` does the devices (one CPU, one GPU, several GPUs, several CPU processes)
and mixed precision: ``TrainConfig.precision`` / ``--precision`` (``auto``: the launch's ``--mixed_precision``
when it set one, else bf16 on a CUDA device that has it, else fp32); trainable parameters and the optimiser
state stay fp32 and the forward runs under autocast. :func:`fit` trains the trainable parameters of an
adapted model with the optimiser timm's ``create_optimizer_v2`` builds (AdamW by default, ``--optimizer``) and a
``timm.scheduler`` learning rate: a linear warm-up followed by a cosine (default), linear or constant schedule
(``lr_schedule``, ``--lr-schedule``; :func:`build_lr_scheduler`), optionally stopping after ``max_steps`` optimiser steps (mid-epoch too) or
after ``patience`` evaluations without improvement, evaluates with ``gather_for_metrics``
(exact under any number of processes: padded duplicates are dropped and the count is checked), and
checkpoints so that a killed run resumed with ``resume=True`` ends with the same numbers as one that was
never interrupted.

Conventions that matter for reproducibility:

* ``batch_size`` is the global batch (Accelerate's ``split_batches=True``): one process with 64 and two
  processes with 32 each take the same optimisation steps, so results do not depend on the process count.
* The training order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so it is known again
  after a restart; a mid-epoch resume skips exactly the batches already seen.
* Checkpoints hold only the trainable tensors (adapter and head), the optimiser, scheduler and RNG states,
  never the frozen backbone: a checkpoint of a ViT-B adapter run is a few MB, not a few hundred.
* A checkpoint is written into a hidden staging folder, fsynced and renamed into place whole, so a killed run
  leaves complete checkpoints only; resume skips a damaged one (with a notice) for the newest complete one, and
  refuses one without its RNG state unless ``--allow-rng-reset`` says to go on with other random draws. Under
  several processes the main process makes that choice and every rank follows it: one notice, or one ``error:``
  line and exit code 2 on every rank (:func:`run_script`); each rank gets its own RNG state and running loss back.

Speed (the run flags of :func:`add_run_flags`, defined in :mod:`visadapt.train.flags`): timm attention runs
PyTorch SDPA (``--attention``, see :mod:`visadapt.attention`), AdamW is the fused kernel on CUDA, ``--compile`` compiles the adapted model once
with ``torch.compile`` (plugins keep their per-step state in tensors, so steps do not recompile), evaluation
runs under ``torch.inference_mode()`` with a large batch, and a dataset's ``device_transform`` (uint8 images
decoded once, normalised on the device) is applied to every batch as it reaches the device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, parse_flag_from_env, set_seed
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SCALER_NAME, SCHEDULER_NAME
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from visadapt import api
from visadapt.attention import BACKENDS as ATTENTION_BACKENDS
from visadapt.attention import attention_report, set_attention
from visadapt.io import AdapterFileError, parse_header, read_adapter_metadata
from visadapt.tracking import (
    DEFAULT_LOG_EVERY,
    LOGS_DIR,
    METRICS_LOG,
    MetricsLog,
    TrainingLog,
    resolve_report_to,
    tag_prefix,
    tracker_config,
)
from visadapt.train.flags import (  # noqa: F401 - add_run_flags & co. are this module's API too
    LR_SCHEDULES,
    MOMENTUM_OPTIMIZERS,
    OPTIMIZERS,
    PRECISIONS,
    RESUME_LATEST,
    SCHED_ON,
    add_run_flags,
    finish_run_args,
    run_options,
    run_script,
)

CHECKPOINTS_DIR = "checkpoints"
#: seconds between two redraws of the training bar (tqdm's default); its postfix is refreshed as often
BAR_MININTERVAL_S = 0.1
_PROGRESS = "progress.json"
_TRAINABLE = "trainable.safetensors"
# The trainable state at the best evaluation so far (``fit(keep_best=True)``), carried in every checkpoint.
_SELECTED = "selected.safetensors"
# History key of the accuracy on ``fit``'s ``test_dataset``: recorded at every evaluation, never used to choose.
TEST_METRIC = "test_accuracy"


def default_eval_batch_size() -> int:
    """512 where CUDA is available, else 256. Evaluation keeps no activations for backward (inference mode), so
    a GPU takes far larger batches than training does: 512 ViT-B/16 images at 224 need a few GB in bf16 and keep
    an H100 busy, while CPU runs and tests keep the smaller batch (and their earlier numbers)."""
    return 512 if torch.cuda.is_available() else 256


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings of one run. Defaults are the common VTAB-1k recipe (NOAH, PETL-ViT, V-PETL)."""

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64                # global batch, split across processes
    eval_batch_size: int = dataclasses.field(default_factory=default_eval_batch_size)  # 512 with CUDA, else 256
    warmup_epochs: float = 10
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    eval_every: int = 1                 # evaluate every N epochs (and always after the last)
    checkpoint_every_steps: int = 0     # also checkpoint mid-epoch every N optimiser steps (0 = epoch ends only)
    keep_checkpoints: int = 1
    num_workers: int = 0
    progress: bool = True
    precision: str = "auto"             # auto | bf16 | fp16 | fp32 (see resolve_precision); autocast only
    compile: bool = False               # torch.compile the adapted model once, for training and evaluation
    compile_backend: str | Callable = "inductor"  # torch.compile backend; tests pass "aot_eager" or a counter
    attention: str = "sdpa"             # timm attention path: sdpa | eager (reference code) | xformers
    allow_rng_reset: bool = False       # resume a checkpoint lacking its RNG state (other random draws; warned)
    lr_schedule: str = "cosine"         # cosine | constant | linear after the linear warm-up (build_lr_scheduler)
    max_steps: int = 0                  # stop after this many optimiser steps, mid-epoch too (0: all epochs)
    patience: int | None = None         # stop after this many evaluations without a better metric (None: never)
    optimizer: str = "adamw"            # timm.optim.create_optimizer_v2 name: adamw | adam | sgd | momentum | lamb
    momentum: float = 0.9               # sgd / momentum only (timm's default)
    warmup_lr: float = 0.0              # lr the warm-up starts from (timm's warmup_lr_init)
    min_lr: float = 0.0                 # lr cosine / linear end at (timm's lr_min)
    sched_on: str = "steps"             # steps | epochs: the unit the schedule is stepped in (build_lr_scheduler)
    log_every: int = DEFAULT_LOG_EVERY  # log loss, lr, images/s every N optimiser steps (--log-every)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "eval_every",
                     "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError(f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                             f"warmup_epochs={self.warmup_epochs} >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ValueError(f"max_steps={self.max_steps!r} must be an integer >= 0 (0: run every epoch)")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise ValueError(f"patience={self.patience!r} must be a positive integer (or None: no early stopping)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.momentum < 0 or (self.optimizer == "sgd" and self.momentum == 0):
            raise ValueError(f"momentum={self.momentum} must be > 0 for sgd (Nesterov) and >= 0 otherwise")
        if self.sched_on not in SCHED_ON:
            raise ValueError(f"sched_on={self.sched_on!r} must be one of {', '.join(SCHED_ON)}")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise ValueError(f"warmup_lr={self.warmup_lr} and min_lr={self.min_lr} must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 (None: no clipping)")


class EpochPermutation(Sampler[int]):
    """Indices ``0..n-1`` in an order drawn from ``(seed, epoch)`` only; call :meth:`set_epoch` each epoch."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def build_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], config: TrainConfig, *,
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names, built by timm's ``create_optimizer_v2``.

    ``params`` is a list of tensors or of parameter groups (``{"params": [...], "weight_decay": ...}``: timm
    passes groups through, each group's own settings winning over ``config``). ``config.lr``,
    ``config.weight_decay`` and, for ``sgd`` / ``momentum``, ``config.momentum`` are passed on; timm applies no
    weight-decay filtering to a list of tensors, so every tensor decays alike, as torch's own optimisers do.
    On CUDA, AdamW and Adam run their fused kernel (one launch for every tensor); on CPU the default (foreach)
    path is kept, so CPU runs stay bit-identical to earlier releases and across process counts.
    """
    from timm.optim import create_optimizer_v2

    extra = {"fused": True} if torch.device(device).type == "cuda" and config.optimizer in ("adamw", "adam") else {}
    if config.optimizer in MOMENTUM_OPTIMIZERS:
        extra["momentum"] = config.momentum
    return create_optimizer_v2(params, opt=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                               **extra)


class TimmScheduleLR(torch.optim.lr_scheduler.LRScheduler):
    """A ``timm.scheduler`` schedule behind torch's ``LRScheduler`` interface: every learning rate is timm's.

    Why a wrapper: Accelerate prepares, steps (skipping an fp16 step whose gradients overflowed) and checkpoints
    (``scheduler.bin``, read back with ``weights_only``) torch schedulers only; timm's are not one, and Accelerate's
    route for other objects (``register_for_checkpointing``) unpickles them with ``weights_only=False`` on resume.
    ``step()`` counts optimiser steps (torch's ``last_epoch``) and hands the count to timm's own protocol:
    ``step_update(num_updates=step)`` for a per-step schedule, ``step(epoch=step // steps_per_epoch)`` for a
    per-epoch one (timm's ``t_in_epochs``), exactly as timm's ``train.py`` calls them.

    The checkpointed state is the step count alone; the schedule is rebuilt from the run's settings, so a
    resumed run follows them (as the ``LambdaLR`` of earlier releases did; its ``scheduler.bin`` loads too).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Any, steps_per_epoch: int):
        self.schedule = schedule  # a timm.scheduler.Scheduler over ``optimizer``
        self.steps_per_epoch = max(1, steps_per_epoch)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = max(self.last_epoch, 0)
        if self.schedule.t_in_epochs:
            self.schedule.step(epoch=step // self.steps_per_epoch)
        else:
            self.schedule.step_update(num_updates=step)
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self._last_lr = self.get_lr()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int,
                       total_steps: int) -> TimmScheduleLR:
    """The learning-rate schedule of ``config``, from ``timm.scheduler``, for a run of ``total_steps`` optimiser
    steps of which ``steps_per_epoch`` make an epoch. Call its ``step()`` after every optimiser step.

    A linear warm-up from ``config.warmup_lr`` over ``config.warmup_epochs``, then ``config.lr_schedule``:
    ``cosine`` (``CosineLRScheduler``) or ``linear`` (``PolyLRScheduler`` with power 1) down to
    ``config.min_lr``, or ``constant`` (``StepLRScheduler`` that never decays, as timm's factory builds it).
    ``config.sched_on``:

    * ``steps`` (default): timm's ``t_in_epochs=False``, one learning rate per optimiser step; the warm-up takes
      ``round(warmup_epochs * steps_per_epoch)`` steps and the decay spans the steps after it
      (``warmup_prefix=True``), ending at ``total_steps`` (``max_steps`` shortens it). This is diffusers'
      ``get_scheduler`` convention: step ``s`` of the warm-up trains at ``warmup_lr + s * (lr - warmup_lr) / W``.
    * ``epochs``: timm's ``train.py`` convention (``t_in_epochs=True``, ``warmup_prefix=False``): one learning
      rate per epoch, the cosine spanning all epochs and the warm-up overriding its first ``warmup_epochs``.
      NOAH's VTAB-1k schedule is ``epochs=100, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5`` with this.
    """
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler

    if config.sched_on == "epochs":
        length = math.ceil(total_steps / max(1, steps_per_epoch))  # epochs the run trains (max_steps counted)
        warmup, prefix, span = config.warmup_epochs, False, max(1, length)
    else:
        warmup = round(config.warmup_epochs * steps_per_epoch)
        prefix, span = True, max(1, total_steps - warmup)
    shared = {"warmup_t": warmup, "warmup_lr_init": config.warmup_lr, "warmup_prefix": prefix,
              "t_in_epochs": config.sched_on == "epochs"}
    if config.lr_schedule == "cosine":
        schedule = CosineLRScheduler(optimizer, t_initial=span, lr_min=config.min_lr, **shared)
    elif config.lr_schedule == "linear":
        schedule = PolyLRScheduler(optimizer, t_initial=span, power=1.0, lr_min=config.min_lr, **shared)
    elif config.lr_schedule == "constant":
        schedule = StepLRScheduler(optimizer, decay_t=1, decay_rate=1.0, **shared)
    else:
        raise ValueError(f"lr_schedule={config.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
    return TimmScheduleLR(optimizer, schedule, steps_per_epoch)


def evaluations_without_improvement(history: Sequence[Mapping[str, float]], metric: str, best_epoch: int) -> int:
    """How many evaluations in ``history`` came after the best one (epoch ``best_epoch``; 0: none yet): the count
    early stopping compares with ``TrainConfig.patience`` (the official SelaVPR ``not_improved_num``)."""
    return sum(1 for entry in history if metric in entry and entry["epoch"] > best_epoch)


def _initialized_precision() -> str | None:
    """The mixed precision of this process's AcceleratorState, if an Accelerator already made one."""
    from accelerate.state import AcceleratorState

    return AcceleratorState._shared_state.get("_mixed_precision")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Accelerate's ``mixed_precision`` (``"no"``, ``"bf16"``, ``"fp16"``, ...) for ``precision`` on ``device``.

    ``"fp32"`` -> ``"no"``; ``"bf16"`` / ``"fp16"`` as given. ``"auto"``: the precision an earlier Accelerator
    of this process already fixed (Accelerate keeps a process's first one), else what ``accelerate launch
    --mixed_precision`` (or ``ACCELERATE_MIXED_PRECISION``) set when that is not ``"no"``, else bf16 on a CUDA
    device with native bf16 (Ampere and later), else fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return "no" if precision == "fp32" else precision
    earlier = _initialized_precision()
    if earlier is not None:
        return earlier
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if launched not in ("", "no"):
        return launched
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "no"


def precision_name(mixed_precision: str) -> str:
    """Accelerate's ``mixed_precision`` as a ``--precision`` value: ``"no"`` -> ``"fp32"``."""
    return "fp32" if mixed_precision == "no" else mixed_precision


def make_accelerator(output_dir: str | os.PathLike | None = None, *, grad_accum_steps: int = 1,
                     log_with: str | Sequence[str] | None = "auto", cpu: bool = False,
                     precision: str = "auto", logging_dir: str | os.PathLike | None = None) -> Accelerator:
    """An Accelerator with visadapt's conventions; devices come from ``accelerate launch``, the precision from
    ``precision`` (see :func:`resolve_precision`).

    The precision is passed to Accelerate explicitly, which beats the ``ACCELERATE_MIXED_PRECISION`` that
    ``accelerate launch`` always sets. Accelerate keeps the precision of a process's first Accelerator: asking
    for another one later raises ``ValueError`` (run it in a new process).
    ``log_with`` is ``--report-to`` (:func:`visadapt.tracking.resolve_report_to`): ``"auto"`` is TensorBoard
    when it is installed, else no tracker; a tracker named but not installed raises
    :class:`~visadapt.tracking.TrackerUnavailableError`. Trackers write under ``logging_dir`` (default
    ``output_dir/logs``; TensorBoard into ``<logging_dir>/<project name of init_trackers>/``); with neither
    ``output_dir`` nor ``logging_dir`` there is no tracker. Pass ``**tracking_options(args)`` for the flags.
    """
    from accelerate import PartialState
    from accelerate.utils import ProjectConfiguration

    trackers = resolve_report_to(log_with)
    if logging_dir is None and output_dir is not None:
        logging_dir = Path(output_dir) / LOGS_DIR
    project = ProjectConfiguration(project_dir=str(output_dir) if output_dir is not None else None,
                                   logging_dir=str(logging_dir) if logging_dir is not None else None)
    # the device the Accelerator will pick (AcceleratorState reads ACCELERATE_USE_CPU itself; PartialState does not)
    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
    mixed = resolve_precision(precision, PartialState(cpu=cpu).device)
    earlier = _initialized_precision()
    if earlier is not None and earlier != mixed:
        raise ValueError(f"precision {precision!r} means mixed_precision={mixed!r}, but this process already runs "
                         f"{earlier!r} (Accelerate keeps the precision of a process's first Accelerator); run it in "
                         f"a new process")
    return Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=trackers or None if logging_dir is not None else None,
        project_config=project,
        cpu=cpu,
        mixed_precision=mixed,
    )


def _eval_batch_size(batch: int, accelerator: Accelerator) -> int:
    """``batch`` rounded down to a multiple of the process count (at least one sample per process).

    The evaluation batch changes no result, so it is rounded rather than refused as the training batch is.
    """
    n = accelerator.num_processes
    return max(n, batch - batch % n)


def _check_divisible(batch: int, accelerator: Accelerator, name: str) -> None:
    if batch % accelerator.num_processes:
        raise ValueError(f"{name}={batch} is the global batch and must divide evenly over "
                         f"{accelerator.num_processes} processes; choose a multiple of {accelerator.num_processes}")


def device_transform(dataset: Dataset | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``dataset.device_transform`` when it has one: a callable ``images (B, 3, H, W) uint8 on the device ->
    (B, 3, H, W) float32`` (normalisation, and for training the random crops and flips, done on the device)
    that :func:`fit` applies to every batch of the dataset right after it reaches the device. A
    :class:`~torch.utils.data.Subset` without one of its own takes its dataset's (its items are that dataset's)."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "device_transform"):
        dataset = dataset.dataset
    transform = getattr(dataset, "device_transform", None)
    if transform is not None and not callable(transform):
        raise TypeError(f"{type(dataset).__name__}.device_transform is a {type(transform).__name__}, not a callable "
                        f"images -> images; set it to a function or to None")
    return transform


@torch.inference_mode()  # cheaper than no_grad: no version counters, no views tracked
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, expected: int,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *, progress: bool = True,
             desc: str = "evaluating") -> dict[str, float]:
    """Top-1 accuracy (%) over every sample exactly once, whatever the number of processes.

    ``loader`` must be prepared by ``accelerator``; ``expected`` is ``len(dataset)``, checked against the
    gathered count so that a sharding mistake can never inflate or deflate the metric silently. ``transform``
    (the dataset's :func:`device_transform`) maps each batch of images on the device before the model.
    ``progress``: a transient bar of batches named ``desc`` on the main process (:mod:`visadapt.progress`).
    """
    from visadapt.progress import Progress

    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    seen = 0
    for images, labels in Progress(loader, desc=desc, unit="batches", leave=False, enabled=progress):
        if transform is not None:
            images = transform(images)
        predictions = model(images).argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum()
        seen += labels.numel()
    model.train(was_training)
    if seen != expected:
        raise RuntimeError(f"evaluation saw {seen} samples but the dataset has {expected}")
    return {"accuracy": 100.0 * correct.item() / max(seen, 1), "samples": seen}


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint needs: trainable parameters, the buffers of adapter modules, and the buffers of
    any module whose own parameters train (a trainable head's BatchNorm running statistics)."""
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # non-persistent buffers (a plugin's per-step draw state, snapshots taken at attach) are rebuilt, never loaded
    state.update({f"{prefix}.{name}" if prefix else name: b for prefix, module in model.named_modules()
                  for name, b in module.named_buffers(recurse=False)
                  if "visadapt_" in f"{prefix}.{name}" and name not in module._non_persistent_buffers_set})
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            state.update({f"{prefix}.{name}" if prefix else name: b
                          for name, b in module.named_buffers(recurse=False)
                          if name not in module._non_persistent_buffers_set})  # those are rebuilt, never loaded
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _training_loss(records: dict[str, api.AttachedAdapter], loss_fn: Callable) -> Callable:
    """``(model, images, labels) -> loss``: the plain task loss, or the one plugin's own training loss."""
    from visadapt.plugin import AdapterPlugin

    own = [(name, r) for name, r in records.items()
           if type(r.plugin).training_loss is not AdapterPlugin.training_loss]
    if len(own) > 1:
        raise ValueError(f"adapters {', '.join(repr(n) for n, _ in own)} each define their own training loss "
                         f"({', '.join(r.plugin.name for _, r in own)}); train them one at a time")
    if own:
        record = own[0][1]
        return lambda model, images, labels: record.plugin.training_loss(model, record.config, images, labels,
                                                                         loss_fn)
    return lambda model, images, labels: loss_fn(model(images), labels)


# A checkpoint is written into a hidden staging folder next to the others and renamed into place once every
# file in it is fsynced, so a name ``step_N`` only ever holds a whole checkpoint. Folders with this prefix are
# leftovers of a run killed while writing; the next save or resume removes them.
_STAGING_PREFIX = ".tmp-"
_STEP_NAME = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed as asked (every one is broken, or one lacks its RNG state)."""


def _end_process_group() -> None:
    """Destroy the default process group if this process joined one (Accelerate's teardown, which leaves the group of
    a notebook fork launch alone)."""
    from accelerate import PartialState

    if PartialState._shared_state and torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` folder under ``root`` (complete or not), oldest first."""
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoints holding their progress file, oldest first (whether each is readable: :func:`checkpoint_problem`)."""
    return [p for p in _step_dirs(root) if (p / _PROGRESS).is_file()]


def remove_stale_staging(root: Path) -> list[Path]:
    """Delete the staging folders a killed checkpoint write left under ``root``; returns what was removed."""
    stale = [p for p in root.glob(f"{_STAGING_PREFIX}*")] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def rng_state_files(num_processes: int) -> list[str]:
    """The RNG state files Accelerate's ``save_state`` writes, one per process: ``random_states_<rank>.pkl``."""
    return [f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(num_processes)]


def _read_progress(path: Path) -> dict[str, Any]:
    """``progress.json`` of a checkpoint, checked field by field (``ValueError`` naming what is wrong)."""
    try:
        progress = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{_PROGRESS} is not valid JSON, half-written or corrupt ({error})") from None
    if not isinstance(progress, dict):
        raise ValueError(f"{_PROGRESS} holds a JSON {type(progress).__name__}, not an object")  # noqa: TRY004
    for key, kind in (("epoch", int), ("batch", int), ("step", int), ("history", list), ("best", list)):
        if not isinstance(progress.get(key), kind) or isinstance(progress.get(key), bool):
            raise ValueError(f"{_PROGRESS} field {key!r} is {repr(progress.get(key))[:60]}, not {kind.__name__}")  # noqa: TRY004
    if len(progress["best"]) != 2:
        raise ValueError(f"{_PROGRESS} field 'best' is {progress['best']!r}, not [score, epoch]")

    def real(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    # the epoch's running loss of a mid-epoch checkpoint (absent in older ones: a fresh epoch then)
    if "loss_sums" in progress and not (isinstance(progress["loss_sums"], list)
                                        and all(real(value) for value in progress["loss_sums"])):
        raise ValueError(f"{_PROGRESS} field 'loss_sums' is {repr(progress['loss_sums'])[:60]}, not a list of "
                         f"numbers (one per process)")
    if "loss_sum" in progress and not real(progress["loss_sum"]):
        raise ValueError(f"{_PROGRESS} field 'loss_sum' is {repr(progress['loss_sum'])[:60]}, not a number")
    count = progress.get("loss_count", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{_PROGRESS} field 'loss_count' is {repr(count)[:60]}, not a count")
    return progress


def _resumed_loss_sum(progress: Mapping[str, Any], rank: int, num_processes: int) -> float:
    """This process's summed batch losses of the current epoch up to the checkpoint in ``progress``.

    A checkpoint keeps every process's own sum (``loss_sums``): the epoch's train loss is their mean at the
    epoch end, so each rank must get its own back for a resumed run to report the uninterrupted run's loss.
    Resumed with another process count, every process takes their mean, which keeps that epoch mean (up to
    rounding). Checkpoints written before ``loss_sums`` hold one ``loss_sum`` (the main process's own).
    """
    sums = progress.get("loss_sums")
    if sums is None:
        return float(progress.get("loss_sum", 0.0))
    if not sums:
        return 0.0
    return float(sums[rank]) if len(sums) == num_processes else sum(sums) / len(sums)


def checkpoint_problem(path: Path, num_processes: int = 1, *, needs_scaler: bool = False) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed (a phrase naming the file), or ``None`` if it can.

    Reads every file a resume loads, with the loader that will load it: ``progress.json`` (JSON, fields and
    types), ``trainable.safetensors`` and ``selected.safetensors`` (safetensors, which checks the data length the
    header declares), the optimiser and scheduler states and each present RNG state file (Accelerate's ``load``,
    ``weights_only=True`` on torch >= 2.4). A missing RNG state file is not a problem here: :func:`fit` refuses it
    unless ``TrainConfig.allow_rng_reset``.
    """
    try:
        from accelerate.utils import load as accelerate_load  # what load_state reads these files with
    except ImportError:  # Accelerate before its load(): its load_state unpickles these files in full anyway
        def accelerate_load(file: str) -> Any:
            return torch.load(file, map_location="cpu", weights_only=False)

    def readable(name: str, loader: Callable[[str], Any]) -> str | None:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            loader(str(file))
        except Exception as error:  # noqa: BLE001 - each reader has its own: safetensors, unpickling, zip, EOF
            return f"{name} is unreadable, truncated or corrupt ({type(error).__name__}: {str(error)[:120]})"
        return None

    try:
        _read_progress(path / _PROGRESS)
    except FileNotFoundError:
        return f"{_PROGRESS} is missing"
    except OSError as error:  # a folder in its place, no read permission, an I/O error
        return f"{_PROGRESS} is unreadable ({type(error).__name__}: {str(error)[:120]})"
    except ValueError as error:
        return str(error)
    required = [(_TRAINABLE, load_file), (f"{OPTIMIZER_NAME}.bin", accelerate_load),
                (f"{SCHEDULER_NAME}.bin", accelerate_load)]
    if needs_scaler:
        required.append((SCALER_NAME, accelerate_load))
    if (path / _SELECTED).exists():
        required.append((_SELECTED, load_file))
    required += [(name, accelerate_load) for name in rng_state_files(num_processes) if (path / name).exists()]
    for name, loader in required:
        problem = readable(name, loader)
        if problem:
            return problem
    return None


def _write_checkpoint_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write ``tensors`` as a safetensors file into a staging checkpoint folder (fsynced and renamed whole later),
    created with the umask like the checkpoint's other files: safetensors' ``save_file`` creates 0600 files."""
    with open(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors))


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_checkpoint(staging: Path, target: Path) -> None:
    """Make the complete checkpoint ``staging`` appear as ``target`` in one rename, after fsyncing every file.

    A folder already named ``target`` (a broken checkpoint left by an earlier attempt at the same step) is moved
    aside first and deleted after, so that at every moment ``target`` is either absent or complete."""
    for file in staging.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(staging)
    replaced = None
    if target.exists():
        replaced = target.with_name(f"{_STAGING_PREFIX}replaced-{target.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(target, replaced)
    os.replace(staging, target)
    _fsync(target.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _choose_resume_checkpoint(root: Path, num_processes: int, *, needs_scaler: bool,
                              requested: Path | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint under ``root`` to resume, and the notices to print.

    By default the newest one that :func:`checkpoint_problem` passes, with one notice per newer broken one;
    ``(None, [])`` when there is no ``step_N`` folder at all (a fresh start); ``CheckpointError`` naming the folder
    and each checkpoint's problem when there are some and none is complete. ``requested`` (``--resume PATH``)
    inside ``root``: that checkpoint or ``CheckpointError`` naming its problem (no other is taken in its place);
    outside ``root``: it belongs to another task or stage of the run, and this one resumes its newest, with a notice.
    """
    notices, problems = [], []
    if requested is not None:
        if root.resolve() in requested.resolve().parents:
            problem = (f"{requested} is not a step_N folder of {root}" if requested.resolve().parent != root.resolve()
                       else checkpoint_problem(requested, num_processes, needs_scaler=needs_scaler))
            if problem is not None:
                raise CheckpointError(f"--resume {requested} cannot be resumed: {problem}; pass another checkpoint "
                                      f"of {root}, or --resume alone for the newest complete one")
            return requested, notices
        notices.append(f"notice: --resume {requested} belongs to another task or stage; {root.parent} resumes from "
                       f"its newest checkpoint, if it has one")
    for candidate in reversed(_step_dirs(root)):
        problem = checkpoint_problem(candidate, num_processes, needs_scaler=needs_scaler)
        if problem is None:
            return candidate, notices
        problems.append(f"{candidate.name}: {problem}")
        notices.append(f"notice: skipping broken checkpoint {candidate}: {problem}; resuming from an older one "
                       f"(the broken one is replaced or removed at the next checkpoint)")
    if problems:
        raise CheckpointError(f"no complete checkpoint to resume in {root} ({'; '.join(problems)}); delete those "
                              f"folders to start this run over, or start with --overwrite")
    return None, notices


def _prepare_attention(model: nn.Module, backend: str, accelerator: Accelerator) -> dict[str, int]:
    """Put the timm attention modules of ``model`` on ``backend``; returns the path counts.

    Checks first that they are still fused after the adapters were attached: a module found on the unfused
    path (a plugin or the model's own default switched it off; timm leaves Swin's window attention unfused)
    is named in one notice line before it is switched to ``backend``.
    """
    before = attention_report(model)
    unfused = before.paths.get("eager", [])
    if unfused and backend != "eager":
        shown = ", ".join(unfused[:3]) + (f" and {len(unfused) - 3} more" if len(unfused) > 3 else "")
        accelerator.print(f"notice: {len(unfused)} timm attention modules were not fused ({shown}); "
                          f"running them on {backend}")
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    report = set_attention(model, backend, device=accelerator.device, dtype=compute_dtype, notice=accelerator.print)
    return report.counts


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, if there is one."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _compile(model: nn.Module, config: TrainConfig, accelerator: Accelerator):
    """Compile ``model`` in place (``nn.Module.compile``: parameter and state-dict names stay as they are) with
    ``config.compile_backend``; returns what the model had compiled before, for :func:`fit` to put back.

    TorchDynamo's caches are reset first: graphs of an earlier model of this process (the previous task of a
    ``--task all`` run) cannot serve this one, and keeping them would use up the recompile limit (8 per code
    object), after which dynamo silently runs eager. Inductor on CPU needs a C++ compiler; without one the run
    compiles with ``aot_eager`` and says so.
    """
    backend = config.compile_backend
    if backend == "inductor" and accelerator.device.type == "cpu" and _cpp_compiler() is None:
        accelerator.print("notice: torch.compile's inductor backend needs a C++ compiler for CPU code and none was "
                          "found (set CXX); compiling with aot_eager instead (no kernel fusion)")
        backend = "aot_eager"
    torch._dynamo.reset()
    previous = model._compiled_call_impl
    model.compile(backend=backend)
    return previous


def validation_selected(history: Sequence[Mapping[str, float]], metric: str = "accuracy") -> Mapping[str, float] | None:
    """The evaluation a validation-selected protocol reports: the ``history`` entry with the highest ``metric``.

    Of equal scores the earliest evaluation wins (the rule :func:`fit` applies when it keeps the best state).
    Entries without ``metric`` (epochs that were not evaluated) are passed over; ``None`` if none has it.
    """
    selected = None
    for entry in history:
        if metric in entry and (selected is None or entry[metric] > selected[metric]):
            selected = entry
    return selected


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` measured: ``metric`` (top-1 accuracy in percent unless an ``evaluator`` said
    otherwise) after the last epoch and at its best evaluation.

    With a ``test_dataset``: ``test_final`` is its accuracy at the last evaluation, ``test_at_best`` at the
    evaluation with the best ``metric`` (the validation-selected number), ``test_best`` the highest seen
    (optimistic: picked on the test set itself). ``restored_best`` says the model was given back the trainable
    state of the best evaluation (``keep_best=True``) instead of the last epoch's. ``precision`` is the one the
    run used (``fp32``, ``bf16``, ``fp16``), ``compiled`` whether it ran under ``torch.compile``, ``attention``
    how many timm attention modules ran which path (``{"sdpa": 12}``).
    """

    score_final: float
    score_best: float
    best_epoch: int
    eval_samples: int
    history: list[dict[str, float]]
    wall_time_s: float
    resumed_from: str | None
    metric: str = "accuracy"
    test_final: float | None = None
    test_at_best: float | None = None
    test_best: float | None = None
    restored_best: bool = False
    precision: str = "fp32"
    compiled: bool = False
    attention: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped_early: bool = False         # TrainConfig.patience ended the run before TrainConfig.epochs


def _checked_groups(param_groups: list[dict[str, Any]] | None, params: list[nn.Parameter]) -> list:
    """``param_groups`` after checking that they hold each trainable parameter once and nothing else."""
    if param_groups is None:
        return params
    grouped = [p for group in param_groups for p in group["params"]]
    if len(grouped) != len({id(p) for p in grouped}) or {id(p) for p in grouped} != {id(p) for p in params}:
        raise ValueError(f"param_groups hold {len(grouped)} tensors ({len({id(p) for p in grouped})} distinct); they "
                         f"must hold each of the model's {len(params)} trainable parameters exactly once")
    return param_groups


def fit(model: nn.Module, train_dataset: Dataset, eval_dataset: Dataset | None, config: TrainConfig, *,
        accelerator: Accelerator | None = None, output_dir: str | os.PathLike | None = None,
        resume: bool | str | os.PathLike = False, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        evaluator: Callable[[nn.Module, Accelerator], dict[str, float]] | None = None, metric: str = "accuracy",
        before_epoch: Callable[[nn.Module, int], None] | None = None, log_prefix: str = "",
        batch_sampler: Sampler[list] | None = None, test_dataset: Dataset | None = None,
        keep_best: bool = False, param_groups: list[dict[str, Any]] | None = None) -> FitResult:
    """Train the parameters of ``model`` that require grad; evaluate on ``eval_dataset``.

    ``model`` maps images ``(B, C, H, W)`` to logits ``(B, num_classes)``; datasets yield ``(image, label)``.
    Other tasks (place recognition: tuples of images in, descriptors out) pass their ``loss_fn(outputs,
    labels)``, an ``evaluator(model, accelerator) -> metrics`` used instead of top-1 accuracy on
    ``eval_dataset`` (then ``None``), the ``metric`` key that picks the best epoch, and ``before_epoch(model,
    epoch)``, called at the start of every epoch (also a resumed one) before its first batch, e.g. to mine
    hard negatives with the current model.
    Checkpoints go to ``output_dir/checkpoints/step_N`` at each epoch end (and every
    ``checkpoint_every_steps`` optimiser steps), each written aside, fsynced and renamed into place whole;
    ``resume=True`` (or ``"latest"``) continues from the newest complete one (starting fresh when there is none);
    ``resume=PATH`` from the checkpoint folder PATH when it lies in this run's checkpoints folder (a broken one
    is an error; the newer ones are removed at the next checkpoint), else from the newest (PATH then belongs to
    another task or stage of the same job, which calls fit once per task). A broken newer
    checkpoint (half-written ``progress.json``, truncated tensors, a missing file) is skipped with a notice naming
    it and why; :class:`CheckpointError` when every one is broken, or when the chosen one lacks a process's RNG
    state and ``config.allow_rng_reset`` is off. Plugins attached with :func:`visadapt.attach` get their
    ``on_step(model, step)`` hook before training and after every optimiser step, and a plugin that defines
    its own :meth:`~visadapt.plugin.AdapterPlugin.training_loss` computes the loss of each batch.
    ``batch_sampler`` replaces the default shuffled batches of ``config.batch_size`` (e.g.
    :class:`visadapt.diffusion.BucketBatchSampler`: one resolution per batch). Its batches are global batches,
    its ``batch_size`` attribute must divide over the processes, its length must not change between epochs, and
    its ``set_epoch(epoch)`` is called before every epoch so that its order can depend on the epoch alone.

    The optimiser is ``config.optimizer`` from timm's ``create_optimizer_v2`` (:func:`build_optimizer`), the
    learning rate follows ``timm.scheduler`` (:func:`build_lr_scheduler`: linear warm-up, then
    ``config.lr_schedule`` cosine, linear or constant, per step or per epoch), the gradient norm of the trained
    tensors is clipped to ``config.max_grad_norm`` before each optimiser step when set, ``config.max_steps`` stops
    the run after that many optimiser steps (mid-epoch too; that epoch is then evaluated and checkpointed), and
    ``config.patience`` stops training once that many evaluations in a row have not beaten the best ``metric``
    (SelaVPR's official early stopping on R@5); ``FitResult.stopped_early`` says it did, and a resumed run that
    had stopped does not train further.

    The validation-selected protocol: ``eval_dataset`` is the validation split, ``test_dataset`` the test split
    (its top-1 accuracy is recorded as ``test_accuracy`` at every evaluation and never used to choose
    anything), and ``keep_best=True`` keeps the trainable state of the evaluation with the best ``metric`` (the
    earliest of equals, see :func:`validation_selected`), in memory and in every checkpoint, and loads it back
    into ``model`` before returning: the model then holds the adapter whose test accuracy is
    ``FitResult.test_at_best``, not the last epoch's.

    ``param_groups`` (optimiser parameter groups: ``{"params": [...], "weight_decay": ..., "betas": ..., ...}``)
    sets per-group optimiser settings, e.g. a method's official AdamW ones (:func:`visadapt.plugins.ranking_clip.
    official_param_groups`); together they must hold every trainable parameter exactly once. Default: one group
    with ``config.weight_decay`` and the optimiser's defaults.

    Logging (:mod:`visadapt.tracking`): every ``config.log_every`` optimiser steps the mean loss, the learning
    rate(s) and images/s, and at every epoch end the history entry, go to the accelerator's trackers
    (``accelerator.log``; started here with the config as settings if the caller did not start them) and to
    ``output_dir/metrics.jsonl`` on the main process, which a resumed run continues from its checkpoint's step.
    The training bar (``config.progress``, main process, only when stderr is a terminal) shows the epoch's running
    loss, the learning rate and images/s; every epoch also prints one summary line.
    """
    accelerator = accelerator or make_accelerator(output_dir, grad_accum_steps=config.grad_accum_steps,
                                                  precision=config.precision)
    if config.precision != "auto":
        wanted = resolve_precision(config.precision, accelerator.device)
        if accelerator.mixed_precision != wanted:
            raise ValueError(f"TrainConfig.precision={config.precision!r}, but the accelerator given to fit runs "
                             f"mixed_precision={accelerator.mixed_precision!r}: build it with "
                             f"make_accelerator(..., precision={config.precision!r})")
    _check_divisible(config.batch_size, accelerator, "batch_size")
    params = api.trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters: attach an adapter (visadapt.attach) or pass a head")
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, label_smoothing=config.label_smoothing))
    start_time = time.time()

    # A private generator keeps DataLoader start-up from consuming the global RNG, which resume restores.
    sampler = None
    if batch_sampler is not None:
        _check_divisible(getattr(batch_sampler, "batch_size", config.batch_size), accelerator,
                         "batch_sampler.batch_size")
        train_loader = DataLoader(train_dataset, batch_sampler=batch_sampler, num_workers=config.num_workers,
                                  generator=torch.Generator().manual_seed(config.seed))
    else:
        sampler = EpochPermutation(len(train_dataset), config.seed)
        train_loader = DataLoader(train_dataset, batch_size=config.batch_size, sampler=sampler,
                                  num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed))
    if evaluator is None and eval_dataset is None:
        raise ValueError("fit needs an eval_dataset (top-1 accuracy) or an evaluator")
    if test_dataset is not None and evaluator is not None:
        raise ValueError("test_dataset is measured by top-1 accuracy next to eval_dataset; with an evaluator, "
                         "measure the test split inside the evaluator instead")
    eval_loader = None if evaluator is not None else DataLoader(
        eval_dataset, batch_size=_eval_batch_size(config.eval_batch_size, accelerator), shuffle=False,
        num_workers=config.num_workers)
    test_loader = None if test_dataset is None else DataLoader(
        test_dataset, batch_size=_eval_batch_size(config.eval_batch_size, accelerator), shuffle=False,
        num_workers=config.num_workers)
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = build_optimizer(_checked_groups(param_groups, params), config, device=accelerator.device)
    scheduler = build_lr_scheduler(optimizer, config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if eval_loader is None:
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
        run_evaluation = evaluator
    elif test_loader is None:
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler)
    else:
        model, optimizer, train_loader, eval_loader, test_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, test_loader, scheduler)
    train_transform, eval_transform, test_transform = (device_transform(d)
                                                       for d in (train_dataset, eval_dataset, test_dataset))
    if eval_loader is not None:
        def run_evaluation(model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
            return evaluate(model, eval_loader, accelerator, len(eval_dataset), eval_transform,
                            progress=config.progress, desc=f"{log_prefix}evaluating")
    bare = accelerator.unwrap_model(model)
    attention = _prepare_attention(bare, config.attention, accelerator)
    compiled_before = _compile(bare, config, accelerator) if config.compile else None

    # Checkpoints carry the trainable tensors only; the frozen backbone is rebuilt from its own weights.
    def save_trainable(models, weights, directory):
        weights.clear()
        if accelerator.is_main_process:  # the trainable state is the same on every process: one writer
            _write_checkpoint_tensors(_trainable_state(bare), os.path.join(directory, _TRAINABLE))

    def load_trainable(models, directory):
        models.clear()
        state = load_file(os.path.join(directory, _TRAINABLE))
        missing = set(_trainable_state(bare)) - set(state)
        if missing:
            raise RuntimeError(f"checkpoint {directory} lacks {sorted(missing)[:5]}: it belongs to another "
                               f"adapter configuration; start a fresh output directory")
        bare.load_state_dict(state, strict=False)

    hooks = [accelerator.register_save_state_pre_hook(save_trainable),
             accelerator.register_load_state_pre_hook(load_trainable)]
    ckpt_root = Path(output_dir) / CHECKPOINTS_DIR if output_dir is not None else None
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": (-1.0, 0)}
    resumed_from = None
    selected: dict[str, torch.Tensor] | None = None  # trainable state at the best evaluation (keep_best)
    requested = None if resume in (None, False, True, RESUME_LATEST) else Path(resume)
    if resume and ckpt_root is not None:
        # The main process decides (which checkpoint, which notices, which RNG files are missing, or the error) and
        # broadcasts the decision; every process follows it. Letting each rank read the files itself could split
        # the ranks: a file can change or appear between two ranks' reads (a checkpoint published, a staging
        # folder removed, a network file system's cache), and ranks that chose differently would load different
        # states or wait in different collectives. One reader also reads the files once, not once per rank.
        # Whatever the main process meets while deciding reaches the others through the broadcast, so none is
        # left waiting in it.
        decision, failure = None, None
        if accelerator.is_main_process:
            try:
                remove_stale_staging(ckpt_root)
                chosen, notices = _choose_resume_checkpoint(ckpt_root, accelerator.num_processes,
                                                            needs_scaler=accelerator.scaler is not None,
                                                            requested=requested)
                missing_rng = [name for name in rng_state_files(accelerator.num_processes)
                               if chosen is not None and not (chosen / name).is_file()]
                decision = (str(chosen) if chosen is not None else None, notices, missing_rng, None)
            except CheckpointError as error:
                decision = (None, [], [], str(error))
            except Exception as error:  # noqa: BLE001 - re-raised below, once the other ranks know
                failure = error
                told = (f"the main process failed while choosing the checkpoint to resume in {ckpt_root} "
                        f"({type(error).__name__}: {error}); its traceback says where")
                decision = (None, [], [], told)
        chosen, notices, missing_rng, error = broadcast_object_list([decision])[0]
        if failure is not None:
            raise failure
        if error is not None:
            raise CheckpointError(error)
        for notice in notices:
            accelerator.print(f"{log_prefix}{notice}")
        if chosen is not None:
            latest = Path(chosen)
            if missing_rng and not config.allow_rng_reset:
                raise CheckpointError(
                    f"checkpoint {latest} lacks {', '.join(missing_rng)} (the random number state of "
                    f"{'that process' if len(missing_rng) == 1 else 'those processes'}): resumed without it, the run "
                    f"would draw other dropout masks and stochastic adapter choices than the interrupted one did. "
                    f"Pass --allow-rng-reset (TrainConfig.allow_rng_reset=True) to continue anyway, or delete "
                    f"{latest} to resume from the checkpoint before it")
            accelerator.load_state(str(latest))  # after checkpoint_problem read every file it loads
            progress = _read_progress(latest / _PROGRESS)
            progress["best"] = tuple(progress["best"])
            if missing_rng:
                # Seeded from (seed, step), the same on every process as seed_everything is: a second resume of
                # the same checkpoint draws the same numbers again. Every process is reseeded, also one whose own
                # file was there (random_states_0.pkl when only rank 1's is missing): seed_everything gave all
                # ranks one stream, and reseeding only the ranks without a file would split them (a plugin
                # drawing from the global generator would then pick different modules per rank).
                set_seed(config.seed * 100_003 + progress["step"])
                accelerator.print(
                    f"{log_prefix}warning: checkpoint {latest} lacks {', '.join(missing_rng)}; continuing with "
                    f"the random state reseeded from (seed {config.seed}, step {progress['step']}) as "
                    f"--allow-rng-reset asks. From here on the dropout masks, stochastic adapter choices (e.g. "
                    f"MoSA's module draws) and random augmentations differ from the interrupted run's, so the final "
                    f"adapter and metrics will not equal an uninterrupted run's; the data order (drawn from seed "
                    f"and epoch) and every restored tensor are unchanged")
            if keep_best and progress["best"][1] > 0:
                if not (latest / _SELECTED).is_file():
                    raise RuntimeError(f"checkpoint {latest} holds no {_SELECTED} (it was written by a run that did "
                                       f"not keep its best state, e.g. another --split); start a fresh output "
                                       f"directory")
                selected = load_file(str(latest / _SELECTED))
            resumed_from = str(latest)
            accelerator.print(f"{log_prefix}resuming from {latest} (epoch {progress['epoch'] + 1}, "
                              f"batch {progress['batch']}, step {progress['step']})")

    def checkpoint() -> None:
        """Write ``step_N`` atomically: every process saves into a staging folder, the main process adds its
        files, fsyncs them all and renames the folder into place, then prunes old checkpoints."""
        if ckpt_root is None:
            return
        name = f"step_{progress['step']:08d}"
        staging = ckpt_root / f"{_STAGING_PREFIX}{name}"
        if accelerator.is_main_process:
            remove_stale_staging(ckpt_root)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))  # every process writes its own RNG state here
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if selected is not None:
                _write_checkpoint_tensors(selected, str(staging / _SELECTED))
            (staging / _PROGRESS).write_text(json.dumps(progress))
            _publish_checkpoint(staging, ckpt_root / name)
            # Keep the newest complete ones; any other step folder (older, or a broken one from an earlier
            # attempt) goes.
            kept = [p for p in _step_dirs(ckpt_root) if int(p.name.split("_")[1]) <= progress["step"]
                    and (p / _PROGRESS).is_file()][-config.keep_checkpoints:]
            for old in _step_dirs(ckpt_root):
                if old not in kept:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    records = api.records(bare)
    compute_loss = _training_loss(records, loss_fn)
    for record in records.values():  # the step count is state a resumed run must hand back to the plugins
        record.plugin.on_step(bare, progress["step"])
    # A caller that did not start the trackers gets them started with the run's TrainConfig as its settings.
    if accelerator.log_with and not accelerator.trackers:
        accelerator.init_trackers(tag_prefix(log_prefix) or "visadapt",
                                  config=tracker_config(dataclasses.asdict(config)))
    # The JSON lines log restarts at the resumed step: what a killed run logged after its checkpoint reruns.
    metrics_log = MetricsLog(Path(output_dir) / METRICS_LOG) if output_dir is not None else None
    if metrics_log is not None and accelerator.is_main_process:
        metrics_log.restart_at(progress["step"])
    training_log = TrainingLog(accelerator, metrics_log, log_every=config.log_every,
                               prefix=tag_prefix(log_prefix))
    from visadapt.progress import shows_progress

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; the loop works without it anyway
        tqdm = None
    model.train()
    stopped_early = False
    for epoch in range(progress["epoch"], config.epochs):
        if config.max_steps and progress["step"] >= config.max_steps:
            break
        # Checked before each epoch, so that a resumed run that had already stopped stays stopped.
        if config.patience is not None and evaluations_without_improvement(
                progress["history"], metric, progress["best"][1]) >= config.patience:
            stopped_early = True
            accelerator.print(f"{log_prefix}early stop: {config.patience} evaluations without a better {metric} "
                              f"(best {progress['best'][0]:.2f} at epoch {progress['best'][1]})")
            break
        loader = train_loader
        if progress["batch"]:
            loader = accelerator.skip_first_batches(train_loader, progress["batch"])
        # Through the prepared loader: Accelerate re-sets the sampler's epoch from its own counter on
        # every pass, which after a resume would not be the true epoch.
        loader.set_epoch(epoch)
        # And directly: Accelerate's wrappers do not always pass set_epoch on. Under several processes the
        # resume-skipping wrapper sits on the process shard, one level deeper than DataLoaderShard.set_epoch
        # looks, so a mid-epoch resume after the first epoch would replay epoch 0's order.
        for own in (sampler, batch_sampler):
            if own is not None and hasattr(own, "set_epoch"):
                own.set_epoch(epoch)
        if before_epoch is not None:
            before_epoch(model, epoch)
            model.train()
        bar = None
        if tqdm is not None and shows_progress(config.progress):  # main process, no VISADAPT_NO_PROGRESS
            # disable=None: tqdm's own rule, no bar when stderr is not a terminal (a log file gets the one
            # line per epoch printed below, not carriage-return redraws); its notebook widget still shows
            bar = tqdm(total=batches_per_epoch, initial=progress["batch"], leave=False, disable=None,
                       mininterval=BAR_MININTERVAL_S, desc=f"{log_prefix}epoch {epoch + 1}/{config.epochs}")
        training_log.start_epoch()
        # Carried in the checkpoint so that a mid-epoch resume reports the whole epoch's mean loss.
        loss_sum = torch.tensor(_resumed_loss_sum(progress, accelerator.process_index, accelerator.num_processes),
                                device=accelerator.device)
        loss_count = progress.get("loss_count", 0)
        for images, labels in loader:
            if train_transform is not None:
                images = train_transform(images)
            with accelerator.accumulate(model):
                loss = compute_loss(model, images, labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            training_log.add_batch(loss, images)
            progress["batch"] += 1
            if bar is not None:
                training_log.update_bar(bar, loss_sum, loss_count, optimizer)
                bar.update(1)
            if accelerator.sync_gradients:
                progress["step"] += 1
                for record in records.values():
                    record.plugin.on_step(bare, progress["step"])
                training_log.after_step(progress["step"], epoch + 1, optimizer)
                if config.max_steps and progress["step"] >= config.max_steps:
                    break  # as diffusers' --max_train_steps: the last epoch ends here, evaluated and checkpointed
                if (config.checkpoint_every_steps and progress["step"] % config.checkpoint_every_steps == 0
                        and progress["batch"] < batches_per_epoch):
                    # every process's own sum (a collective: all ranks checkpoint at the same step)
                    progress["loss_sums"] = accelerator.gather(loss_sum.reshape(1)).tolist()
                    progress["loss_count"] = loss_count
                    progress.pop("loss_sum", None)
                    checkpoint()
        if bar is not None:
            bar.close()
        images_per_s = training_log.epoch_images_per_s()  # before the evaluation: training throughput
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
        entry: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
        last_epoch = epoch + 1 == config.epochs or bool(config.max_steps and progress["step"] >= config.max_steps)
        if (epoch + 1) % config.eval_every == 0 or last_epoch:
            metrics = run_evaluation(model, accelerator)
            model.train()
            if metric not in metrics:
                raise KeyError(f"the evaluator returned {sorted(metrics)}, not the metric {metric!r} that picks "
                               f"the best epoch")
            entry.update({k: float(v) for k, v in metrics.items() if k != "samples"})
            progress["eval_samples"] = int(metrics.get("samples", 0))
            if test_loader is not None:
                entry[TEST_METRIC] = float(evaluate(model, test_loader, accelerator, len(test_dataset),
                                                    test_transform, progress=config.progress,
                                                    desc=f"{log_prefix}testing")["accuracy"])
                model.train()
            # Strictly greater: of equal scores the earliest evaluation stays selected (validation_selected).
            if metrics[metric] > progress["best"][0]:
                progress["best"] = (metrics[metric], epoch + 1)
                if keep_best:  # a copy: on CPU the state's tensors share storage with the live parameters
                    selected = {k: v.clone() for k, v in _trainable_state(bare).items()}
        training_log.end_epoch(progress["step"], entry)
        accelerator.print(f"{log_prefix}epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f}  "
                          f"lr {entry['lr']:.3g}  {images_per_s:.1f} imgs/s"
                          + (f"  {metric} {entry[metric]:.2f}" if metric in entry else ""))
        progress["history"].append(entry)
        progress.update(epoch=epoch + 1, batch=0, loss_sums=[], loss_count=0)
        progress.pop("loss_sum", None)
        checkpoint()

    for hook in hooks:
        hook.remove()
    history = progress["history"]
    final = history[-1].get(metric, float("nan")) if history else float("nan")
    eval_samples = len(eval_dataset) if eval_dataset is not None else progress.get("eval_samples", 0)
    test = {}
    if test_loader is not None:
        tested = [entry for entry in history if TEST_METRIC in entry]
        chosen = validation_selected(history, metric)
        test = {"test_final": tested[-1][TEST_METRIC] if tested else None,
                "test_at_best": chosen.get(TEST_METRIC) if chosen is not None else None,
                "test_best": max((entry[TEST_METRIC] for entry in tested), default=None)}
    if keep_best and selected is not None:
        bare.load_state_dict(selected, strict=False)  # the same tensors a checkpoint restores
    if config.compile:
        # The model leaves fit as it came: merging, saving or deep-copying it afterwards meets no compiled code.
        bare._compiled_call_impl = compiled_before
    accelerator.free_memory()
    return FitResult(score_final=final, score_best=progress["best"][0], best_epoch=progress["best"][1],
                     eval_samples=eval_samples, history=history, wall_time_s=time.time() - start_time,
                     resumed_from=resumed_from, metric=metric, restored_best=keep_best and selected is not None,
                     precision=precision_name(accelerator.mixed_precision), compiled=config.compile,
                     attention=attention, stopped_early=stopped_early, **test)


class InitAdapterError(AdapterFileError):
    """``--init-adapter FILE`` cannot start this run: the file is unreadable, or holds another plugin, another
    config, or an adapter for another backbone. Raised before training starts; :func:`run_script` reports it."""


def check_init_adapter(path: str | os.PathLike, plugin: str, config: Mapping[str, Any] | Any) -> None:
    """Refuse ``--init-adapter path`` unless its header holds ``plugin`` with ``config`` (the run's plugin config, a
    Config or its dict). Reads the header only, so a script calls it before building anything.

    Why the configs must be equal: :func:`init_adapter_from_file` loads the file as :func:`visadapt.load_adapter`
    does, i.e. with the file's config; a run whose recipe or ``--set`` asks for another one would otherwise train
    something else than it records.
    """
    try:
        _, file_plugin, file_config = parse_header(path, read_adapter_metadata(path))
    except AdapterFileError as err:
        raise InitAdapterError(f"--init-adapter {path}: {err}") from None
    if file_plugin.name != plugin:
        raise InitAdapterError(f"--init-adapter {path} holds a {file_plugin.name!r} adapter; this run trains "
                               f"{plugin!r}: pass an adapter file of a {plugin!r} run (or --adapter "
                               f"{file_plugin.name} where the script has that flag)")
    wanted = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    wanted = file_plugin.Config.from_dict(wanted).to_dict()  # defaults filled in, as the file's are
    have = file_config.to_dict()
    # A run value "auto" is resolved by the plugin's attach (files record the result): before attach it matches
    # any value; init_adapter_from_file checks again against the attached, resolved config.
    keys = [key for key in sorted(set(have) | set(wanted))
            if have.get(key) != wanted.get(key) and wanted.get(key) != "auto"]
    differing = [f"{key}: file {have.get(key)!r}, run {wanted.get(key)!r}" for key in keys]
    if differing:
        fixes = " ".join(f"--set {key}={json.dumps(have.get(key))}" for key in keys)
        raise InitAdapterError(f"--init-adapter {path}: its {plugin!r} config differs from this run's ("
                               + "; ".join(differing) + f"); train with the file's config ({fixes}) or start "
                               f"without --init-adapter")


def init_adapter_from_file(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Replace the freshly attached adapter ``adapter_name`` of ``model`` by the trained one in ``path``.

    The script attaches its adapter as usual, then calls this before training: the file must hold the same plugin
    and config (:func:`check_init_adapter`), and it is loaded with :func:`visadapt.load_adapter` (base model
    family, depth and width, site widths, tensor shapes and checksum, the classifier head it stores), so its
    tensors, the head included, are where training starts. Any failure raises :class:`InitAdapterError` naming the
    file and leaves the model as it was (the fresh adapter, every tensor equal).
    """
    from visadapt.io import load_adapter

    record = api.get_record(model, adapter_name)
    check_init_adapter(path, record.plugin.name, record.config)
    # Kept to restore the fresh adapter if the load fails: its own tensors and those of the head it trains.
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()
              if "visadapt_" in name or (record.head and name.startswith(f"{record.head}."))}
    # What trains: detach and attach reset it to the adapter (and head) alone, and a script may train more.
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    api.detach(model, adapter_name)
    try:
        load_adapter(model, path, adapter_name)
    except Exception as err:
        api.attach(model, record.plugin, record.config, adapter_name=adapter_name, head=record.head)
        model.load_state_dict(before, strict=False)
        raise InitAdapterError(f"--init-adapter {path}: {err}") from err
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(trains.get(name, param.requires_grad))


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, state) -> None:
    """Make ``out`` ready for a training run on every process of ``state`` (an Accelerate ``PartialState``).

    A folder already holding files is refused (``FileExistsError``) unless the run resumes it or overwrites it;
    with ``overwrite`` the main process empties it while the others wait. Then it exists, on every process.
    """
    from visadapt.train.preflight import refuse_existing_runs

    refuse_existing_runs([out], resume=resume, overwrite=overwrite)
    state.wait_for_everyone()
    if overwrite and state.is_main_process and out.exists():
        shutil.rmtree(out)
    state.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch on every process identically (adapters start equal everywhere)."""
    set_seed(seed)


def evaluate_adapter_file(path: str | os.PathLike, data_root: str | os.PathLike | None, *,
                          benchmark: str | None = None, task: str | None = None, protocol: str = "final",
                          batch_size: int = 128, normalize: str | None = None,
                          precision: str | None = None) -> dict[str, Any]:
    """Rebuild the base model an adapter file was trained on, load the file, and measure its accuracy.

    The file's ``visadapt.train`` metadata (written by ``train/vtab.py``) names the backbone, its weights,
    the benchmark, the task and the input normalisation; arguments given here override it. For the
    embedded ``mini-vtab`` benchmark ``data_root=None`` means the generated default folder. ``precision``
    defaults to the one the run recorded (a bf16-trained file is measured in bf16, an fp32 one in fp32).
    """
    from visadapt.backbones import create_backbone
    from visadapt.data import build_datasets, resolve_normalization
    from visadapt.data.procedural import generate_mini_vtab
    from visadapt.data.tasks import resolve_task
    from visadapt.io import TRAIN_METADATA, TrainingRun, load_adapter, read_adapter_metadata

    meta = read_adapter_metadata(path)  # the header only: load_adapter below reads and checks the tensors
    run = TrainingRun(path, meta)
    if not run.present:
        raise ValueError(f"{path} has no {TRAIN_METADATA!r} metadata (it was not written by a visadapt train/ "
                         f"script), so the backbone and task it belongs to are unknown")
    # Every recorded field is read (and checked) before anything is built from it.
    benchmark = benchmark or run.text("benchmark", required=True)
    info = resolve_task(benchmark, task or run.text("task", required=True))
    model_name, weights, seed = run.text("model", required=True), run.weights(), run.integer("seed", 0)
    data_seed, recorded_size = run.integer("data_seed", 0), run.input_size()
    normalize = normalize or run.text("normalize", "model")
    precision = precision or run.text("precision", "auto")
    if data_root is None:
        if benchmark != "mini-vtab":
            raise ValueError(f"evaluating {path} on {benchmark} needs --data-root (the folder with the task "
                             f"directories)")
        data_root = generate_mini_vtab(seed=data_seed)  # its default folder for that seed
    # Seeded as in training, so a run on a randomly initialised backbone ("none") gets the same backbone back.
    seed_everything(seed)
    model = create_backbone(model_name, weights, num_classes=info.num_classes, input_size=recorded_size)
    load_adapter(model, path)
    normalization = resolve_normalization(normalize, model)
    input_size = recorded_size or model.pretrained_cfg["input_size"][-1]
    _, eval_dataset = build_datasets(benchmark, data_root, info.name, protocol=protocol, input_size=input_size,
                                     normalization=normalization)
    # The precision the run evaluated at (files written before it was recorded: auto, as they were trained).
    accelerator = make_accelerator(None, precision=precision)
    loader = DataLoader(eval_dataset, batch_size=_eval_batch_size(batch_size, accelerator), shuffle=False)
    model, loader = accelerator.prepare(model, loader)
    _prepare_attention(accelerator.unwrap_model(model), "sdpa", accelerator)
    metrics = evaluate(model, loader, accelerator, len(eval_dataset), device_transform(eval_dataset))
    counts = api.summary(accelerator.unwrap_model(model))
    accelerator.free_memory()
    return {
        "benchmark": benchmark, "task": info.name, "accuracy": metrics["accuracy"],
        "eval_samples": metrics["samples"], "trainable_params": counts.trainable_params,
        "adapter_params": counts.trainable_params - counts.head_params, "head_params": counts.head_params,
        "adapter_bytes": os.path.getsize(path),
    }
