"""PPAP (Go et al., CVPR 2023, "Towards Practical Plug-and-Play Diffusion Models"): noise-range experts.

N experts (default 5) split the training timesteps ``[0, T)`` uniformly in timestep index; expert ``i`` covers
``[floor(i*T/N), floor((i+1)*T/N))`` and a timestep routes to the expert whose range holds it (``min(N-1,
floor(t*N/T))`` when N divides T; :func:`expert_index`), on the train-scale ``t`` diffusers schedulers pass to
their UNet.

**Routing at the range boundaries** (``routing``): the official sampler (``MultiExpertWrapper`` in
``guided_diffusion/multi_expert_helper.py``) picks the first expert ``i`` with ``b_i <= t <= b_{i+1}``,
``b_i = int(i*T/N)``: an *inclusive* test, so a boundary timestep ``t = b_i`` (200, 400, 600, 800 for N = 5,
T = 1000) goes to expert ``i - 1``, which was trained on ``[b_{i-1}, b_i)`` and never saw it. visadapt's default
``routing="range"`` sends every timestep to the expert trained on it, a deliberate departure at exactly those
N - 1 timesteps (every other ``t`` in ``[0, T)`` routes the same). ``routing="official"`` reproduces the
inclusive test. Samplers that hit the boundaries: the official ADM ``ddim25`` respacing (stride 40: 0, 40, ...,
960) and diffusers' DDIM / DDPM schedulers with 25 steps and ``steps_offset=0`` hit all four; with
``steps_offset=1`` (961, 921, ..., 1) or ``timestep_spacing="trailing"`` none.

Each expert is a parameter-efficient copy of ONE frozen guidance model (a timm classifier), made of:

* LoRA (:class:`visadapt.layers.LoRA`) on the spec's layers: ViT/DeiT attention ``qkv`` and ``proj``; ResNet
  stem convolution and every block's ``conv1`` / ``conv2``. ``scaling = alpha / rank`` is applied in the
  forward (the official code forgets it in its unmerged linear forward but applies it in merges and in its conv
  LoRA; with its defaults r=16, alpha=8 the factor is 0.5). Defaults r=16, alpha=8 as in the official README.
* per-expert biases (``train_biases``): a bias delta on every adapted layer that has a bias, and on ViTs on the
  MLP ``fc1``/``fc2`` and the head too (the official DeiT experts train all biases; LayerNorm biases are the one
  part not reproduced). timm ResNet convolutions have no bias, so there the option adds nothing.
* per-expert BatchNorm (``train_norms``, ResNets): each expert holds its own affine *and its own running
  statistics* (activations of x_t at t=900 and at t=50 have very different statistics; the official code keeps
  a full state dict per expert, running statistics included). ViTs have no BatchNorm, so there the option adds
  nothing.

Memory: the backbone exists once. Every adapted layer holds a small module with the N experts' tensors and an
active index (:func:`use_expert`); only the active expert computes. Base tensors are never written: biases and
affines are deltas / replacements held at the site, and a BatchNorm host's running statistics, which its own
forward updates in training mode, are put back from a snapshot after every call, so :func:`visadapt.detach`
restores the model bit for bit.

Merging is refused: which expert runs depends on the timestep of each call, so no single set of weights
represents the adapter (fold one expert by hand if a fixed-noise model is wanted).

Guidance (:func:`guide`) is a context manager over a diffusers pipeline; see its docstring for the formulas.
The guidance model is not a pipeline component, so the experts are loaded onto it directly::

    classifier = timm.create_model("deit_small_patch16_224", pretrained=True)
    visadapt.load_adapter(classifier, "ppap_experts.safetensors")
    with guide(pipe, classifier, target=torch.tensor([207, 360]), scale=7.5):
        images = pipe(batch_size=2, num_inference_steps=25).images

``pipe.load_visadapt`` loads adapters into the pipeline's own components (its UNet, text encoder); attaching
a foreign model to the pipeline object would make ``pipe.to``/``save_pretrained`` carry it, so the classifier
stays the caller's object and :func:`guide` borrows it for the duration of the ``with`` block.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from visadapt import api, inject
from visadapt.io import save_adapter
from visadapt.layers import LoRA
from visadapt.plugin import (
    AdapterConfig,
    AdapterPlugin,
    check_choice,
    check_positive,
    check_positive_int,
    config_field,
)
from visadapt.registry import register_plugin
from visadapt.sites import Site, all_sites, find_sites, model_family

#: LoRA site kinds per family when ``targets`` is None (spec section 2)
DEFAULT_TARGETS = {"timm_vit": ("qkv", "proj"), "timm_resnet": ("stem", "conv1", "conv2")}
#: ViT layers that get a per-expert bias delta (without LoRA) besides the LoRA targets
_VIT_BIAS_KINDS = ("qkv", "proj", "fc1", "fc2", "head")
#: the metadata key :func:`save_experts` writes the expert ranges under
RANGES_METADATA = "ppap.expert_ranges"
#: ``range``: the expert trained on t (visadapt); ``official``: the official sampler's inclusive test, which sends
#: each range boundary t = int(i*T/N), 0 < i < N, to the lower expert i - 1
ROUTINGS = ("range", "official")


# ------------------------------------------------------------------------------------------------ routing


def expert_ranges(num_experts: int, num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """Half-open timestep ranges ``[(lo, hi), ...]`` of the experts, uniform in timestep index.

    ``expert_ranges(5, 1000) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]``; expert 0 sees the
    least noise.
    """
    check_positive_int("num_experts", num_experts)
    check_positive_int("num_train_timesteps", num_train_timesteps)
    if num_experts > num_train_timesteps:
        raise ValueError(f"num_experts={num_experts} > num_train_timesteps={num_train_timesteps}: some experts "
                         f"would own no timestep")
    return [(i * num_train_timesteps // num_experts, (i + 1) * num_train_timesteps // num_experts)
            for i in range(num_experts)]


def expert_index(t: float | torch.Tensor, num_experts: int, num_train_timesteps: int = 1000,
                 routing: str = "range"):
    """The expert that guides at train-scale timestep ``t``.

    ``routing="range"`` (default): the expert whose training range (:func:`expert_ranges`) holds ``t``. When N
    divides T (the default 5 and 1000) this is ``min(N-1, floor(t*N/T))``. Otherwise that formula disagrees with
    the integer ranges at their edges (N=3, T=1000: t=333 opens expert 1's range ``[333, 666)`` but
    ``floor(333*3/1000) = 0``), so the index is computed from the ranges themselves: the largest ``i`` with
    ``floor(i*T/N) <= t``, i.e. ``ceil((t+1)*N/T) - 1``. Float timesteps (Euler-type schedulers) are floored first.

    ``routing="official"``: the official sampler's rule, the first ``i`` with ``b_i <= t <= b_{i+1}``,
    ``b_i = int(i*T/N)``, on ``t`` as given. It differs from ``"range"`` only at ``t = b_i`` for ``0 < i < N``
    (200, 400, 600, 800 for N = 5, T = 1000), which it sends to expert ``i - 1``.

    ``t`` is an int/float (returns an int) or a tensor of any shape (returns a LongTensor of that shape). Raises
    ``ValueError`` for ``t`` outside ``[0, T)`` or an unknown ``routing``.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing={routing!r} is not one of {list(ROUTINGS)}: 'range' (the expert trained on t) or "
                         f"'official' (the official sampler's inclusive test)")
    n, big_t = num_experts, num_train_timesteps
    if isinstance(t, torch.Tensor):
        tf = t.detach()
        if tf.numel() and (tf.min() < 0 or tf.max() >= big_t):
            raise ValueError(f"timesteps {t.tolist()} fall outside [0, {big_t}); pass train-scale "
                             f"timesteps (those in scheduler.timesteps)")
        if routing == "official":
            # b_1 .. b_N; the first i with t <= b_{i+1} is the number of those boundaries strictly below t
            upper = torch.tensor([i * big_t // n for i in range(1, n + 1)], dtype=torch.float64, device=tf.device)
            return torch.searchsorted(upper, tf.double().contiguous(), side="left")
        step = torch.floor(tf.double()).long()
        return torch.clamp(torch.div((step + 1) * n + big_t - 1, big_t, rounding_mode="floor") - 1, max=n - 1)
    if not 0 <= t < big_t:
        raise ValueError(f"timestep {t} falls outside [0, {big_t}); pass a train-scale timestep "
                         f"(one of scheduler.timesteps)")
    if routing == "official":
        return sum(1 for i in range(1, n + 1) if i * big_t // n < t)
    return min(n - 1, ((math.floor(t) + 1) * n + big_t - 1) // big_t - 1)


# ------------------------------------------------------------------------------------------------- config


@dataclass
class PPAPConfig(AdapterConfig):
    num_experts: int = config_field(5, "N, experts over the timestep range, uniform in timestep index")
    num_train_timesteps: int = config_field(1000, "T, the diffusion model's training timesteps (not the sampling "
                                                  "steps)")
    rank: int = config_field(16, "LoRA rank r of every expert (official --gamma 16)")
    alpha: float = config_field(8.0, "LoRA alpha; deltas are scaled by alpha / rank (official --lora_alpha 8)")
    targets: tuple[str, ...] | None = config_field(
        None, "LoRA site kinds; None = the spec's: ViT qkv, proj; ResNet stem, conv1, conv2")
    train_biases: bool = config_field(True, "per-expert bias deltas on the adapted layers (ViT: also fc1, fc2, "
                                            "head)")
    train_norms: bool = config_field(True, "per-expert BatchNorm affine and running statistics (ResNets)")
    routing: str = config_field("range", "expert of each timestep when guiding: range (the expert trained on t) or "
                                         "official (inclusive test: t = 200/400/600/800 go to the lower expert)")

    def validate(self) -> None:
        check_choice("routing", self.routing, ROUTINGS)
        check_positive_int("rank", self.rank)
        check_positive("alpha", self.alpha)
        expert_ranges(self.num_experts, self.num_train_timesteps)  # validates both
        if self.targets is not None and not self.targets:
            raise ValueError("config field targets is empty: name site kinds, or leave it None for the spec's")

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return expert_ranges(self.num_experts, self.num_train_timesteps)


# ------------------------------------------------------------------------------------------------ modules


class _ExpertSwitch(nn.Module):
    """Base of the per-site modules: ``num_experts`` expert states and the index of the one that runs."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # a plain attribute, not a buffer: routing state, never saved
        self.active_expert: int | None = 0

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, active_expert={self.active_expert}"


class ExpertLinearDelta(_ExpertSwitch):
    """The delta a linear / convolution host gains from the active expert: ``LoRA_i(x) + bias_i``.

    ``x`` is the host's input, ``(..., in_features)`` or ``(N, C_in, H, W)``; the result is shaped like the
    host's output (the bias term broadcasts over it). ``active_expert = None`` gives a zero delta (the frozen
    base model). Every expert starts from the same state (identical A, B = 0, bias 0).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float, *,
                 conv: nn.Conv2d | None, lora: bool, bias: bool) -> None:
        super().__init__(num_experts)
        if not (lora or bias):
            raise ValueError("an expert delta needs LoRA, a bias, or both")
        self.is_conv = conv is not None
        self.experts = None
        if lora:
            first = LoRA(in_features, out_features, rank, alpha, conv=conv)
            rest = [LoRA(in_features, out_features, rank, alpha, conv=conv) for _ in range(num_experts - 1)]
            for expert in rest:
                expert.load_state_dict(first.state_dict())
            self.experts = nn.ModuleList([first, *rest])
        # one Parameter per expert (not one (N, out) tensor): an optimiser then never touches the rows of
        # experts that got no gradient (AdamW's decay and momentum would move a stacked tensor's other rows)
        self.bias_deltas = (nn.ParameterList([nn.Parameter(torch.zeros(out_features)) for _ in range(num_experts)])
                            if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.active_expert
        if i is None:
            return x.new_zeros(())
        delta = self.experts[i](x) if self.experts is not None else None
        if self.bias_deltas is not None:
            bias = self.bias_deltas[i]
            bias = bias.view(-1, 1, 1) if self.is_conv else bias
            delta = bias if delta is None else delta + bias
        return delta

    def expert_parameters(self, index: int) -> list[nn.Parameter]:
        params = list(self.experts[index].parameters()) if self.experts is not None else []
        return params + ([self.bias_deltas[index]] if self.bias_deltas is not None else [])


class ExpertBatchNorm(_ExpertSwitch):
    """Replaces a ``BatchNorm2d``'s output with the active expert's BatchNorm: its own affine and running stats.

    ``x`` is the host's input ``(N, C, H, W)``. In training mode the batch statistics normalise and update the
    active expert's running statistics (momentum and eps of the host); in eval mode its running statistics
    normalise. ``active_expert = None`` reproduces the host exactly. The host's own forward (which runs before
    this module, see :mod:`visadapt.inject`) updates the host's running statistics in training mode; they are
    put back from a snapshot taken at attach time, so the base model is never modified.
    """

    def __init__(self, num_experts: int, host: nn.BatchNorm2d) -> None:
        super().__init__(num_experts)
        self.__dict__["host"] = host  # not a submodule: the host owns this module, not the other way round
        self.weights = nn.ParameterList([nn.Parameter(host.weight.detach().clone()) for _ in range(num_experts)])
        self.biases = nn.ParameterList([nn.Parameter(host.bias.detach().clone()) for _ in range(num_experts)])
        self.track = host.track_running_stats and host.running_mean is not None
        if self.track:
            self.register_buffer("running_mean", host.running_mean.detach().clone().repeat(num_experts, 1))
            self.register_buffer("running_var", host.running_var.detach().clone().repeat(num_experts, 1))
            self.register_buffer("num_batches_tracked", torch.zeros(num_experts, dtype=torch.long))
            self.register_buffer("_host_running_mean", host.running_mean.detach().clone(), persistent=False)
            self.register_buffer("_host_running_var", host.running_var.detach().clone(), persistent=False)
            self.register_buffer("_host_num_batches", host.num_batches_tracked.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        host, i = self.host, self.active_expert
        if self.track and host.training:
            with torch.no_grad():  # undo the update the host's own forward just made
                host.running_mean.copy_(self._host_running_mean)
                host.running_var.copy_(self._host_running_var)
                host.num_batches_tracked.copy_(self._host_num_batches)
        if i is None:
            if self.track and not self.training:
                return F.batch_norm(x, host.running_mean, host.running_var, host.weight, host.bias, False, 0.0,
                                    host.eps)
            return F.batch_norm(x, None, None, host.weight, host.bias, True, 0.0, host.eps)
        weight, bias = self.weights[i], self.biases[i]
        if not self.track:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, host.eps)
        if not self.training:
            return F.batch_norm(x, self.running_mean[i], self.running_var[i], weight, bias, False, 0.0, host.eps)
        with torch.no_grad():
            self.num_batches_tracked[i] += 1
        momentum = host.momentum if host.momentum is not None else 1.0 / float(self.num_batches_tracked[i])
        # rows of the (N, C) buffers are contiguous views: batch_norm updates them in place
        return F.batch_norm(x, self.running_mean[i], self.running_var[i], weight, bias, True, momentum, host.eps)

    def expert_parameters(self, index: int) -> list[nn.Parameter]:
        return [self.weights[index], self.biases[index]]

    @torch.no_grad()
    def copy_expert(self, source: int, target: int) -> None:
        if self.track:
            self.running_mean[target].copy_(self.running_mean[source])
            self.running_var[target].copy_(self.running_var[source])
            self.num_batches_tracked[target].copy_(self.num_batches_tracked[source])


# ------------------------------------------------------------------------------------------------- plugin


@register_plugin("ppap")
class PPAPPlugin(AdapterPlugin):
    """N noise-range experts on one frozen timm classifier (ViT/DeiT or ResNet)."""

    Config = PPAPConfig
    families = ("timm_vit", "timm_resnet")
    mergeable = False
    merge_refusal = ("PPAP routes every call to the expert of its timestep, so no single set of weights holds "
                     "the adapter; use visadapt.plugins.ppap.use_expert to pick an expert instead")

    def attach(self, model: nn.Module, config: PPAPConfig, adapter_name: str) -> None:
        family = model_family(model)
        targets = config.targets or DEFAULT_TARGETS[family]
        lora_sites = find_sites(model, targets)
        for site in lora_sites:
            if site.how != "linear":
                raise ValueError(f"ppap puts LoRA on linear/convolution layers; site {site.name} is an {site.how} "
                                 f"site: choose targets among {DEFAULT_TARGETS[family]}")
            self._insert_delta(site, adapter_name, config, lora=True)
        if config.train_biases and family == "timm_vit":
            adapted = {s.path for s in lora_sites}
            for site in all_sites(model):
                if site.kind in _VIT_BIAS_KINDS and site.rows is None and site.path not in adapted:
                    # the head is a "replace" site for modules that substitute the classifier; a bias delta
                    # adds to its output like any linear-site delta
                    self._insert_delta(replace(site, how="linear"), adapter_name, config, lora=False)
        if config.train_norms:
            for site in all_sites(model):
                if site.kind == "bn":
                    inject.insert(site, adapter_name, ExpertBatchNorm(config.num_experts, site.host))
        for module in _modules_of(model, adapter_name):
            module.num_train_timesteps = config.num_train_timesteps

    @staticmethod
    def _insert_delta(site: Site, adapter_name: str, config: PPAPConfig, lora: bool) -> None:
        host_bias = getattr(site.host, "bias", None)
        bias = config.train_biases and host_bias is not None
        if not (lora or bias):
            return
        conv = site.host if isinstance(site.host, nn.Conv2d) else None
        inject.insert(site, adapter_name, ExpertLinearDelta(config.num_experts, site.in_features, site.out_features,
                                                            config.rank, config.alpha, conv=conv, lora=lora,
                                                            bias=bias))


def _modules_of(model: nn.Module, adapter_name: str | None = None) -> list[_ExpertSwitch]:
    return [item.module for item in inject.attached(model, adapter_name) if isinstance(item.module, _ExpertSwitch)]


def ppap_adapter_names(model: nn.Module) -> list[str]:
    """Names of the PPAP adapters attached to ``model``."""
    return [name for name, record in api.records(model).items() if isinstance(record.plugin, PPAPPlugin)]


def ppap_config(model: nn.Module, adapter_name: str | None = None) -> PPAPConfig:
    """The config of the PPAP adapter on ``model`` (the only one, or ``adapter_name``)."""
    return api.get_record(model, _one_adapter(model, adapter_name)).config


def _one_adapter(model: nn.Module, adapter_name: str | None) -> str:
    names = ppap_adapter_names(model)
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"no PPAP adapter named {adapter_name!r} is attached (PPAP adapters: {names or 'none'})")
        return adapter_name
    if not names:
        raise ValueError("no PPAP experts are attached to this model: visadapt.attach(model, 'ppap') or "
                         "visadapt.load_adapter(model, 'ppap_experts.safetensors') first")
    if len(names) > 1:
        raise ValueError(f"several PPAP adapters are attached ({names}); pass adapter_name")
    return names[0]


class use_expert:
    """Route every PPAP module of ``model`` to expert ``index`` (``None``: the frozen base model).

    Takes effect at once; as a context manager it restores the previous routing on exit::

        use_expert(student, 2)              # from now on
        with use_expert(classifier, 0): ... # for this block only
    """

    def __init__(self, model: nn.Module, index: int | None, adapter_name: str | None = None) -> None:
        name = _one_adapter(model, adapter_name)
        num = api.get_record(model, name).config.num_experts
        if index is not None and not (isinstance(index, int) and 0 <= index < num):
            raise ValueError(f"expert index {index!r} is out of range: this adapter has experts 0..{num - 1}")
        self._modules = _modules_of(model, name)
        self._previous = [m.active_expert for m in self._modules]
        for module in self._modules:
            module.active_expert = index

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for module, previous in zip(self._modules, self._previous):
            module.active_expert = previous


def active_expert(model: nn.Module, adapter_name: str | None = None) -> int | None:
    """The expert the PPAP modules of ``model`` currently run (``None``: the base model)."""
    modules = _modules_of(model, _one_adapter(model, adapter_name))
    return modules[0].active_expert if modules else None


def expert_parameters(model: nn.Module, index: int, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The trainable tensors of expert ``index`` only: what an optimiser for that expert should get."""
    name = _one_adapter(model, adapter_name)
    num = api.get_record(model, name).config.num_experts
    if not 0 <= index < num:
        raise ValueError(f"expert index {index} is out of range: this adapter has experts 0..{num - 1}")
    return [p for module in _modules_of(model, name) for p in module.expert_parameters(index)]


@torch.no_grad()
def copy_expert(model: nn.Module, source: int, target: int, adapter_name: str | None = None) -> None:
    """Overwrite expert ``target`` with expert ``source`` (parameters and BatchNorm running statistics): the
    official code's sequential warm start, where expert i+1 starts from trained expert i."""
    name = _one_adapter(model, adapter_name)
    for src, dst in zip(expert_parameters(model, source, name), expert_parameters(model, target, name)):
        dst.copy_(src)
    for module in _modules_of(model, name):
        if isinstance(module, ExpertBatchNorm):
            module.copy_expert(source, target)


def save_experts(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """:func:`visadapt.save_adapter` of all experts in ONE file, with their timestep ranges in the metadata
    (``"ppap.expert_ranges"``: JSON ``[[lo, hi), ...]``; the config holds N and T they derive from)."""
    name = _one_adapter(model, adapter_name)
    extra = {RANGES_METADATA: json.dumps(ppap_config(model, name).ranges)}
    extra.update(metadata or {})
    return save_adapter(model, path, adapter_name=name, metadata=extra)


# ------------------------------------------------------------------------------------------------- losses


def classifier_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 temperature: float = 0.25) -> torch.Tensor:
    """KL(p_T || q_S) of the official PPAP classifier distillation, a scalar.

    ``student_logits``/``teacher_logits`` are ``(B, K)``: the student on noisy x_t, the teacher on clean x0.
    ``p_T = softmax(teacher / temperature)`` (0.25 sharpens), ``q_S = softmax(student)`` (no temperature), and
    the pointwise ``p_T * (log p_T - log q_S)`` is averaged over the K classes, then over the batch (the
    official ``KLDivLoss(reduction="none")(...).mean(-1).mean()``; i.e. the KL divided by K).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must both be (batch, classes)")
    check_positive("temperature", temperature)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_q_student = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_q_student)).mean(dim=-1).mean()


def dense_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's prediction on x_t and the teacher's on x0 (e.g. depth maps),
    both ``(B, ...)`` of one shape; a scalar."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ "
                         f"in shape")
    return F.mse_loss(student.float(), teacher.detach().float())


# ----------------------------------------------------------------------------------------------- guidance


def _scheduler_kind(scheduler) -> str:
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    if "DDPMScheduler" in names:
        return "ddpm"
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: PPAP guidance needs a variance-"
                         f"preserving scheduler (DDPM, DDIM, PNDM, DPM-Solver, Euler, ...)")
    return "score"


def _epsilon_to_output(delta_eps: torch.Tensor, prediction_type: str, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The change of the model output that changes the scheduler's epsilon by ``delta_eps`` at fixed x_t.

    epsilon: itself. v = sqrt(abar) eps - sqrt(1-abar) x0 with x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar), so
    dv/deps = 1/sqrt(abar). sample (x0): dx0/deps = -sqrt(1-abar)/sqrt(abar).
    """
    if prediction_type == "epsilon":
        return delta_eps
    if prediction_type == "v_prediction":
        return delta_eps / alpha_bar.sqrt()
    if prediction_type == "sample":
        return -delta_eps * (1 - alpha_bar).sqrt() / alpha_bar.sqrt()
    raise ValueError(f"scheduler prediction_type {prediction_type!r} is not epsilon, v_prediction or sample")


class guide:
    """Classifier (or dense-model) guidance of a diffusers pipeline by PPAP experts, as a context manager::

        with guide(pipe, classifier, target=torch.tensor([3, 1]), scale=7.5):
            images = pipe(batch_size=2, num_inference_steps=25).images

    A forward hook on ``pipe.unet`` sees every call's noisy input x_t and train-scale timestep t, routes the
    guidance model to the expert of t (:func:`expert_index` with the adapter's ``routing``), takes ``g = d/dx_t sum_b log p(target_b | x_t)`` and
    returns an adjusted model output, so the stock scheduler then takes the guided step (no scheduler is
    modified, and the pipeline code is unchanged):

    * DDIM-family schedulers (everything but DDPM: DDIM, PNDM, DPM-Solver, Euler, ...): the noise-prediction
      form of Dhariwal & Nichol, ``eps' = eps - s * sqrt(1 - abar_t) * g``.
    * ``DDPMScheduler``: the mean-shift form ``mu' = mu + s * sigma_t^2 * g``. The step's posterior mean is
      ``mu = c0 * x0_hat + ct * x_t`` with ``x0_hat = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)`` and
      ``c0 = sqrt(abar_prev) beta_t / (1 - abar_t)``, so at fixed x_t ``d mu / d eps = -c0 sqrt(1-abar_t) /
      sqrt(abar_t) = -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))``; the mean moves by ``s sigma^2 g`` when ``eps' = eps - s * sigma_t^2 * g * sqrt(alpha_t) * sqrt(1 - abar_t) / beta_t``
      (``alpha_t = abar_t / abar_prev``, ``beta_t = 1 - alpha_t`` for the step actually taken, respaced or not;
      ``sigma_t^2`` the step's variance: fixed_small / fixed_small_log -> posterior variance, fixed_large(_log)
      -> beta_t, learned_range -> from the model's variance channels). Exact when the scheduler does not clip
      x0_hat (``clip_sample=False``, no thresholding); with clipping, the shift passes through the clip as the
      model's own prediction does.
    * ``v_prediction`` / ``sample`` models: the same epsilon change, converted to their parameterisation.

    Args:
        pipe: a diffusers pipeline with ``unet`` and ``scheduler``: pixel space (``DDPMPipeline``,
            ``DDIMPipeline``) or latent (with a ``vae``: the guidance model then sees the decoded image
            ``vae.decode(z_t / scaling_factor)`` and the gradient flows through the decoder). Classifier-free
            guidance batches (``[uncond, cond]`` halves of identical latents) get the gradient of one half added
            to both, which shifts the combined prediction by exactly the same amount.
        guidance_model: the classifier (or dense regressor) with PPAP experts attached or loaded
            (:func:`visadapt.load_adapter`), taking images in the pipeline's [-1, 1] range after ``preprocess``.
        target: ``kind="class"``: class indices, an int or a LongTensor ``(B,)``; ``kind="dense"``: the target
            map ``(B, ...)`` (or ``(...)``, broadcast) with the model output's shape; objective
            ``-mean((f(x_t) - target)^2)`` per sample.
        scale: guidance scale s (official default 7.5); 0 leaves the pipeline's output bit for bit unchanged.
        kind: ``"class"`` or ``"dense"``.
        rescale: norm-matched gradient (the DeepFloyd variant in the official code): ``g <- g / ||g|| *
            ||ref[:1]||`` before the scale, ``ref`` the step's posterior mean (DDPM) or x_t (other schedulers).
        naive: guide with the frozen model itself, experts off (the paper's off-the-shelf baseline); works on a
            model without PPAP experts too.
        preprocess: differentiable map from [-1, 1] images ``(B, 3, H, W)`` to the model's input (resize,
            normalisation); identity by default. Use the one the experts were trained with.
        adapter_name: which PPAP adapter, when several are attached.
        routing: ``"range"`` or ``"official"`` (:func:`expert_index`); None: the adapter config's ``routing``.

    The model is put in eval mode and its routing restored on exit. The hook records the expert of each call in
    ``self.routed`` (list of ``(t, expert)``).
    """

    def __init__(self, pipe, guidance_model: nn.Module, target, scale: float = 7.5, kind: str = "class",
                 rescale: bool = False, naive: bool = False,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 adapter_name: str | None = None, routing: str | None = None) -> None:
        if kind not in ("class", "dense"):
            raise ValueError(f"kind={kind!r}: use 'class' (classifier, target = labels) or 'dense' (regressor, "
                             f"target = a map)")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale}")
        for attr in ("unet", "scheduler"):
            if getattr(pipe, attr, None) is None:
                raise ValueError(f"pipeline {type(pipe).__name__} has no {attr}; guide() needs a UNet pipeline")
        self.pipe, self.model, self.scale, self.kind = pipe, guidance_model, float(scale), kind
        self.rescale, self.naive = rescale, naive
        self.preprocess = preprocess or (lambda images: images)
        self.target = target if isinstance(target, torch.Tensor) else torch.tensor(target)
        if kind == "class" and self.target.is_floating_point():
            raise ValueError("kind='class' needs integer class labels as target")
        self.form = _scheduler_kind(pipe.scheduler)
        self.adapter_name = None
        self.num_experts = self.num_train_timesteps = None
        if routing is not None and routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r} is not one of {list(ROUTINGS)} (None: the adapter's own)")
        self.routing = routing
        if not naive:
            self.adapter_name = _one_adapter(guidance_model, adapter_name)
            config = ppap_config(guidance_model, self.adapter_name)
            self.num_experts, self.num_train_timesteps = config.num_experts, config.num_train_timesteps
            self.routing = routing or config.routing
            sched_t = pipe.scheduler.config.num_train_timesteps
            if sched_t != self.num_train_timesteps:
                raise ValueError(f"the experts were made for T={self.num_train_timesteps} training timesteps; this "
                                 f"pipeline's scheduler has num_train_timesteps={sched_t}")
        self.routed: list[tuple[float, int | None]] = []
        self._handle = None

    # -- context manager
    def __enter__(self) -> Self:
        self._was_training = self.model.training
        self.model.eval()
        if self.adapter_name is not None:  # restores the caller's routing on exit
            self._routings = [use_expert(self.model, active_expert(self.model, self.adapter_name),
                                         self.adapter_name)]
        else:  # naive: every PPAP adapter off, the frozen model guides
            self._routings = [use_expert(self.model, None, name) for name in ppap_adapter_names(self.model)]
        self._handle = self.pipe.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        for routing in self._routings:
            routing.__exit__()
        self.model.train(self._was_training)

    # -- the guidance gradient
    def _decode(self, sample: torch.Tensor) -> torch.Tensor:
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return sample
        latents = sample / vae.config.scaling_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def _targets(self, batch: int, device) -> torch.Tensor:
        target = self.target.to(device)
        if self.kind == "class":
            target = target.reshape(-1)
            if target.numel() == 1:
                return target.expand(batch)
            if target.numel() != batch:
                raise ValueError(f"target holds {target.numel()} labels for a batch of {batch} images")
            return target
        return target

    def log_prob(self, sample: torch.Tensor) -> torch.Tensor:
        """``log p(target | x_t)`` per sample ``(B,)`` under the current routing (differentiable)."""
        output = self.model(self.preprocess(self._decode(sample)))
        if self.kind == "class":
            labels = self._targets(output.shape[0], output.device)
            return F.log_softmax(output.float(), dim=-1).gather(1, labels[:, None])[:, 0]
        target = self.target.to(output.device, output.dtype)
        if target.shape != output.shape:
            if target.shape != output.shape[1:]:
                raise ValueError(f"dense target {tuple(target.shape)} fits neither the model output "
                                 f"{tuple(output.shape)} nor one sample of it")
            target = target.expand_as(output)
        return -((output.float() - target.float()) ** 2).flatten(1).mean(dim=1)

    def gradient(self, sample: torch.Tensor, t: float) -> torch.Tensor:
        """``g = d/dx_t sum_b log p(target_b | x_t)``, shaped like ``sample``, from the expert of ``t``."""
        expert = None if self.naive else expert_index(t, self.num_experts, self.num_train_timesteps, self.routing)
        self.routed.append((t, expert))
        unique, copies = self._deduplicate(sample)
        with torch.enable_grad():
            x_in = unique.detach().float().requires_grad_(True)
            if expert is None:
                log_p = self.log_prob(x_in)
            else:
                with use_expert(self.model, expert, self.adapter_name):
                    log_p = self.log_prob(x_in)
            (grad,) = torch.autograd.grad(log_p.sum(), x_in)
        return grad.repeat(copies, *([1] * (grad.dim() - 1))).to(sample.dtype)

    def _deduplicate(self, sample: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(one copy, copies)``: classifier-free guidance repeats the latents (``[uncond, cond]``, 3 copies in
        InstructPix2Pix); the gradient of one copy serves all, so it is computed once."""
        labels = self.target.numel() if self.kind == "class" and self.target.numel() > 1 else None
        for copies in (3, 2):
            size = sample.shape[0] // copies
            if sample.shape[0] % copies or (labels is not None and labels != size):
                continue
            chunks = sample.split(size)
            if all(torch.equal(chunks[0], chunk) for chunk in chunks[1:]):
                return chunks[0], copies
        return sample, 1

    # -- the hook
    def _hook(self, unet: nn.Module, args: tuple, kwargs: dict, output):
        if self.scale == 0.0:
            return output
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t_values = torch.as_tensor(timestep).reshape(-1)
        if not torch.all(t_values == t_values[0]):
            raise ValueError(f"guide() needs one timestep per UNet call, got {t_values.tolist()}")
        t = t_values[0].item()
        model_output = output[0] if isinstance(output, tuple) else output.sample
        channels = sample.shape[1]
        eps, variance_channels = model_output[:, :channels], model_output[:, channels:]
        adjusted = eps + self.output_shift(sample, eps, variance_channels, t).to(eps.dtype)
        new = torch.cat([adjusted, variance_channels], dim=1) if variance_channels.shape[1] else adjusted
        if isinstance(output, tuple):
            return (new, *output[1:])
        return type(output)(sample=new)

    def output_shift(self, sample: torch.Tensor, eps: torch.Tensor, variance_channels: torch.Tensor,
                     t: float) -> torch.Tensor:
        """The change of the model output (in its own parameterisation) that applies the guidance at step ``t``."""
        scheduler = self.pipe.scheduler
        prediction_type = scheduler.config.prediction_type
        t_index = int(t)
        alphas_cumprod = scheduler.alphas_cumprod.to(sample.device, torch.float32)
        abar = alphas_cumprod[t_index]
        g = self.gradient(sample, t).float()
        if self.form == "score":
            if self.rescale:
                g = g / g.norm().clamp_min(1e-12) * sample[:1].float().norm()
            delta_eps = -self.scale * (1 - abar).sqrt() * g
            return _epsilon_to_output(delta_eps, prediction_type, abar)
        # DDPM mean shift
        prev_t = int(scheduler.previous_timestep(t_index))
        abar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.ones((), device=sample.device)
        alpha = abar / abar_prev
        beta = 1 - alpha
        posterior_var = (1 - abar_prev) / (1 - abar) * beta
        variance_type = scheduler.config.variance_type
        if variance_type in ("fixed_small", "fixed_small_log"):
            sigma2 = posterior_var.clamp_min(1e-20)
        elif variance_type in ("fixed_large", "fixed_large_log"):
            sigma2 = beta
        elif variance_type == "learned_range" and variance_channels.shape[1]:
            frac = (variance_channels.float() + 1) / 2
            sigma2 = torch.exp(frac * beta.log() + (1 - frac) * posterior_var.clamp_min(1e-20).log())
        else:
            raise ValueError(f"DDPM variance_type {variance_type!r} is not supported by guide() (fixed_small, "
                             f"fixed_small_log, fixed_large, fixed_large_log, learned_range with variance channels)")
        if self.rescale:
            x0_hat = (sample.float() - (1 - abar).sqrt() * self._epsilon(eps, sample, abar)) / abar.sqrt()
            mean = abar_prev.sqrt() * beta / (1 - abar) * x0_hat + alpha.sqrt() * (1 - abar_prev) / (1 - abar) * sample
            g = g / g.norm().clamp_min(1e-12) * mean[:1].norm()
        mean_shift = self.scale * sigma2 * g
        delta_eps = -mean_shift * alpha.sqrt() * (1 - abar).sqrt() / beta
        return _epsilon_to_output(delta_eps, prediction_type, abar)

    def _epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        prediction_type = self.pipe.scheduler.config.prediction_type
        out, x = model_output.float(), sample.float()
        if prediction_type == "epsilon":
            return out
        if prediction_type == "v_prediction":
            return abar.sqrt() * out + (1 - abar).sqrt() * x
        return (x - abar.sqrt() * out) / (1 - abar).sqrt()
