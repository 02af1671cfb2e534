"""Polyhistor and Polyhistor-Lite: hypernetwork adapters for multi-task dense prediction on Swin.

Liu, Ma, Tian, He and Kira, "Polyhistor: Parameter-Efficient Multi-Task Adaptation for Dense Vision Tasks",
NeurIPS 2022 (arXiv 2210.03265). No official code is public. Sources, as tagged in the project's spec
``polyhistor_details.md`` (which decided every value below that the paper's text does not give):

* **[paper]** the abstract, the Figure-2 caption and the project page: *Decomposed HyperNetworks* (Sec. 4.1),
  *Layer-wise Scaling Kernels* (Sec. 4.2), Polyhistor-Lite = both together (Sec. 4.3).
* **[code]** a public repository signed ``YC:`` that derives from Hyperformer, probably the authors' benchmark
  code (not verified): ``hyperlowrank++`` (one decomposed hypernetwork per Swin stage) is taken as Polyhistor,
  ``hyperlowrank`` as its per-block form, ``hyperlowrank_kron`` as Polyhistor-Lite. Its configs were not
  found, so its class defaults (inherited from Hyperformer / Compacter) fill the gaps.

What is generated (every adapted block, for the task selected with :func:`set_task`)::

    e = LayerNorm(W2 relu(W1 [task; layer (; position)] + b1) + b2)      # hyper-embedding (d_p,)
    A, B = split(G e + g)    A (n_out, r), B (r, n_in)                   # decomposed generator
    W = A @ B,  b = H e + h                                              # down: (C/rho, C), up: (C, C/rho)
    adapter(x) = s * (post_ln(W_up act(W_down pre_ln(x) + b_down) + b_up) + x)

* **Task embeddings** (one ``d_t`` vector per task, ``randn`` init [code]) are the only per-task parameters.
* **Polyhistor** (``variant="polyhistor"``): one hypernetwork (hyper-MLP + LayerNorm + down/up generators) per
  Swin stage, shared by all tasks and by the blocks of the stage; each block owns a layer embedding (``d_t``).
  ``per_block_hypernet=True`` is the per-block form: every block owns its hyper-MLP and generators, fed the
  task embedding alone (no layer embedding). With attention adapters on, a block's FFN and attention adapters
  share its layer embedding (or its hyper-MLP in the per-block form) and are told apart by a learnt position
  embedding (shared forms) or by their own generators (per-block form), as in [code].
* **Polyhistor-Lite** (``variant="lite"``): ONE hypernetwork at the template size (stage-1 width ``C1``,
  bottleneck ``C1 // rho``). A block of stage scale ``k = C / C1`` owns ``k`` layer-embedding rows, which give
  ``k`` template adapters; its *layer-wise scaling kernels* stretch them to the stage width::

      W_l = sum_i S_l[i] (x) W_i        S_l (k, k, k): k matrices k x k   (Kronecker product (x))
      b_l = sum_i c_l[i] (x) b_i        c_l (k, k): k column vectors of length k

  so ``W_down`` is ``(k C1/rho, k C1) = (C/rho, C)``. The same ``S_l`` and ``c_l`` serve the down- and the
  up-projection; adapter LayerNorm gains/biases get their own ``k x k`` coefficients. Stage 1 (``k = 1``) uses
  the template directly and has no kernel. ``kernel_front=False`` flips every product to ``W_i (x) S_l[i]``.

Placement on timm Swin (sites from :mod:`visadapt.sites`): ``serial`` adapts the MLP branch output before
drop-path and the residual add (site ``mlp_out``; ``attention=True`` adds site ``attn_out`` on the attention
branch); ``parallel`` feeds the adapter the MLP sub-block's residual input ``h`` and uses its output (which
already holds ``h``) as the shortcut: ``x_out = MLP(LN(h)) + adapter(h)`` (site ``mlp``).

Layout: the shared hypernetworks and the task embeddings are ONE module held at the model root
(:class:`PolyhistorHyperNetworks`, ``visadapt_adapters.<name>.polyhistor_hypernetworks``); each adapted site holds
a :class:`PolyhistorAdapter` with its block's own parts (layer embedding, scaling kernels, per-block
hypernetwork). Site modules reach the shared module through a plain attribute, not a registered submodule, so
every tensor is in the state dict once and ``copy.deepcopy`` keeps the sharing.

Not mergeable: the generated adapter has a non-linearity (and optional LayerNorms) between its projections.
:func:`visadapt.save_adapter` / :func:`visadapt.load_adapter` store everything; the task names travel in the config.
:func:`parameter_count` gives the trainable parameters per part from the formula alone (Swin-T in no time).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visadapt.inject import attached, held_module, insert
from visadapt.layers import ACTIVATIONS, make_activation
from visadapt.plugin import (
    AdapterConfig,
    AdapterPlugin,
    check_choice,
    check_positive,
    check_positive_int,
    config_field,
)
from visadapt.registry import register_plugin
from visadapt.sites import Site, find_sites, held_site

#: the held site of the shared module on the model root
HYPERNETWORKS = "polyhistor_hypernetworks"
VARIANTS = ("polyhistor", "lite")
PLACEMENTS = ("serial", "parallel")
#: which adapter LayerNorms are generated: name -> (pre, post)
ADAPTER_LAYER_NORMS = {"none": (False, False), "pre": (True, False), "post": (False, True), "both": (True, True)}
#: index of each adapter position in the position embeddings ([code]: 0 = FFN, 1 = attention)
POSITIONS = {"ffn": 0, "attention": 1}
#: eps of the hyper-embedding LayerNorm ([code]: layer_norm_epsilon = 1e-6)
HYPER_LAYER_NORM_EPS = 1e-6


@dataclass
class PolyhistorConfig(AdapterConfig):
    """Polyhistor / Polyhistor-Lite. The paper's text fixes none of the sizes below: every default is [code]'s
    class default (Hyperformer / Compacter lineage) unless its help names another source (see the module
    docstring and ``polyhistor_details.md``)."""

    tasks: tuple[str, ...] = config_field((), "task names, one learnt embedding each (e.g. semseg, human_parts, "
                                              "sal, normals); required at attach")
    variant: str = config_field("polyhistor", "polyhistor (one decomposed hypernetwork per Swin stage) or lite "
                                              "(one template-size hypernetwork + layer-wise scaling kernels)")
    per_block_hypernet: bool = config_field(False, "polyhistor only: one hypernetwork per block fed the task "
                                                   "embedding alone ([code] hyperlowrank) instead of per stage")
    reduction_factor: int = config_field(16, "rho: adapter bottleneck = width // rho (lite: k * (C1 // rho)); "
                                             "[code] default 16, the paper does not fix it")
    rank: int = config_field(1, "r of W = A @ B; negative v means max(min(n_out, n_in) // |v|, 1); [code] "
                                "default 1")
    task_embedding_dim: int = config_field(512, "d_t, size of task, layer and position embeddings; [code] default")
    hidden_dim: int = config_field(128, "hidden width of the hyper-MLP; [code] default (task_hidden_dim)")
    projected_dim: int = config_field(64, "d_p, the hyper-embedding the generators read; [code] default")
    activation: str = config_field("silu", f"adapter non-linearity ({', '.join(ACTIVATIONS)}); [code] default "
                                           f"'swish' = silu (the hyper-MLP always uses relu, as [code])")
    placement: str = config_field("serial", "serial (on the MLP branch output, before drop-path) or parallel "
                                            "(fed the MLP sub-block's input, output used as its shortcut); the "
                                            "paper does not say; serial as Hyperformer")
    attention: bool = config_field(False, "also adapt the attention branch (serial only); off as [code]'s Lite "
                                          "controller ('not using now')")
    adapter_layer_norm: str = config_field("post", "task-conditioned LayerNorms of the adapter, generated like "
                                                   "its weights: none, pre, post, both; [code] default post")
    output_scale: float = config_field(1.0, "s in s * (adapter(x) + x); the paper does not fix it, 1.0 = plain "
                                            "adapter")
    kernel_front: bool = config_field(True, "Kronecker order S (x) W (True) or W (x) S; not found in any source, "
                                            "True is the PHM/Compacter order (small factor first)")
    init_std: float = config_field(0.01, "std of the normal init of hypernetwork weights (biases 0); [code]")

    def validate(self) -> None:
        if isinstance(self.tasks, str):
            # ValueError like every config refusal, which callers catch as bad input
            raise ValueError(  # noqa: TRY004
                f"config field tasks={self.tasks!r} must be a tuple of task names, e.g. ('semseg', 'normals'), "
                f"not one string")
        for task in self.tasks:
            if not isinstance(task, str) or not task:
                raise ValueError(f"config field tasks={self.tasks!r}: every task name must be a non-empty string")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"config field tasks={self.tasks!r} names a task twice; name each task once")
        check_choice("variant", self.variant, VARIANTS)
        check_choice("placement", self.placement, PLACEMENTS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("adapter_layer_norm", self.adapter_layer_norm, ADAPTER_LAYER_NORMS)
        if self.per_block_hypernet and self.variant != "polyhistor":
            raise ValueError("config field per_block_hypernet=True applies to variant='polyhistor'; Lite has one "
                             "template hypernetwork by definition")
        if self.attention and self.placement == "parallel":
            raise ValueError("attention=True needs placement='serial': a parallel attention adapter is fed the "
                             "block input ahead of the attention branch, which visadapt.sites offers no site for "
                             "on Swin; use placement='serial', or attention=False")
        for name in ("reduction_factor", "task_embedding_dim", "hidden_dim", "projected_dim"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.rank, int) or self.rank == 0:
            raise ValueError(f"config field rank={self.rank!r} must be a non-zero integer (r, or -v for "
                             f"min(n_out, n_in) // v)")
        check_positive("output_scale", self.output_scale)
        check_positive("init_std", self.init_std)

    @property
    def layer_norms(self) -> tuple[bool, bool]:
        """(pre, post): which adapter LayerNorms are generated."""
        return ADAPTER_LAYER_NORMS[self.adapter_layer_norm]

    @property
    def positions(self) -> tuple[str, ...]:
        """Adapted positions of each block, in forward order."""
        return ("attention", "ffn") if self.attention else ("ffn",)

    @property
    def shared_hypernetworks(self) -> bool:
        """True when hypernetworks are shared by blocks (fed layer embeddings), False for the per-block form."""
        return not self.per_block_hypernet


def resolve_rank(rank: int, out_features: int, in_features: int) -> int:
    """r of the decomposition ``W (out, in) = A (out, r) @ B (r, in)``: ``rank``, or for a negative ``rank = -v``
    ``max(min(out, in) // v, 1)`` ([code] ``low_rank_rank``)."""
    return rank if rank > 0 else max(min(out_features, in_features) // -rank, 1)


def _linear(in_features: int, out_features: int, init_std: float) -> nn.Linear:
    # [code] linear_layer: weights N(0, std^2), biases 0
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=init_std)
    nn.init.zeros_(layer.bias)
    return layer


# ------------------------------------------------------------------------------------------------- layers


@dataclasses.dataclass
class GeneratedAdapter:
    """The weights of one adapter, generated for one task. With ``R`` template rows (Lite, before the scaling
    kernels) every tensor has a leading ``(R,)``. Norms are ``(gain, bias)``, each ``(..., width)``, or None."""

    down_weight: torch.Tensor  # (..., bottleneck, width)
    down_bias: torch.Tensor  # (..., bottleneck)
    up_weight: torch.Tensor  # (..., width, bottleneck)
    up_bias: torch.Tensor  # (..., width)
    pre_norm: tuple[torch.Tensor, torch.Tensor] | None = None
    post_norm: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def width(self) -> int:
        return self.down_weight.shape[-1]

    @property
    def bottleneck(self) -> int:
        return self.down_weight.shape[-2]


class DecomposedLinearGenerator(nn.Module):
    """Hyper-embedding ``e (R, d_p)`` -> a linear layer ``W (R, out, in) = A @ B`` and ``b (R, out)``.

    One Linear emits ``A (out, r)`` and ``B (r, in)`` side by side (``out * r + r * in`` values instead of
    Hyperformer's ``out * in``), a second one the bias ([code] ``AdapterLayersHyperNet``, low-rank form).
    """

    def __init__(self, embedding_dim: int, out_features: int, in_features: int, rank: int, init_std: float) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.rank = resolve_rank(rank, out_features, in_features)
        self.factors = _linear(embedding_dim, out_features * self.rank + self.rank * in_features, init_std)
        self.bias = _linear(embedding_dim, out_features, init_std)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factors = self.factors(embedding)
        split = self.out_features * self.rank
        a = factors[..., :split].unflatten(-1, (self.out_features, self.rank))
        b = factors[..., split:].unflatten(-1, (self.rank, self.in_features))
        return a @ b, self.bias(embedding)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, rank={self.rank}"


class LayerNormGenerator(nn.Module):
    """Hyper-embedding ``(R, d_p)`` -> LayerNorm gain and bias, each ``(R, width)`` ([code] ``LayerNormHyperNet``:
    both start near zero, so a generated post-LayerNorm starts the adapter near the identity)."""

    def __init__(self, embedding_dim: int, width: int, init_std: float) -> None:
        super().__init__()
        self.gain = _linear(embedding_dim, width, init_std)
        self.bias = _linear(embedding_dim, width, init_std)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gain(embedding), self.bias(embedding)


class AdapterGenerator(nn.Module):
    """Hyper-embedding ``(R, d_p)`` -> a :class:`GeneratedAdapter` of ``width`` and ``bottleneck`` (batched over R):
    the down ``(bottleneck, width)`` and up ``(width, bottleneck)`` generators, and the LayerNorm generators."""

    def __init__(self, config: PolyhistorConfig, width: int, bottleneck: int) -> None:
        super().__init__()
        d_p, rank, std = config.projected_dim, config.rank, config.init_std
        self.down = DecomposedLinearGenerator(d_p, bottleneck, width, rank, std)
        self.up = DecomposedLinearGenerator(d_p, width, bottleneck, rank, std)
        pre, post = config.layer_norms
        self.pre_norm = LayerNormGenerator(d_p, width, std) if pre else None
        self.post_norm = LayerNormGenerator(d_p, width, std) if post else None

    def forward(self, embedding: torch.Tensor) -> GeneratedAdapter:
        down_weight, down_bias = self.down(embedding)
        up_weight, up_bias = self.up(embedding)
        return GeneratedAdapter(
            down_weight, down_bias, up_weight, up_bias,
            self.pre_norm(embedding) if self.pre_norm is not None else None,
            self.post_norm(embedding) if self.post_norm is not None else None,
        )


class HyperEmbedding(nn.Module):
    """The task/layer hyper-MLP: conditions ``(R, in_features)`` -> ``(R, d_p)``, Linear -> ReLU -> Linear ->
    LayerNorm ([code] ``TaskHyperNet`` + ``unique_hyper_net_layer_norm``)."""

    def __init__(self, in_features: int, config: PolyhistorConfig) -> None:
        super().__init__()
        std = config.init_std
        self.mlp = nn.Sequential(_linear(in_features, config.hidden_dim, std), nn.ReLU(),
                                 _linear(config.hidden_dim, config.projected_dim, std))
        self.norm = nn.LayerNorm(config.projected_dim, eps=HYPER_LAYER_NORM_EPS)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(conditions))


class DecomposedHyperNetwork(nn.Module):
    """A hypernetwork shared by blocks: ``[task; layer (; position)]`` -> :class:`GeneratedAdapter`.

    Input rows are ``(R, 2 d_t)``, or ``(R, 3 d_t)`` with attention adapters, whose position embeddings
    (``(2, d_t)``: FFN, attention) live here. Output: adapters of ``width`` / ``bottleneck``, batched over R.
    """

    def __init__(self, config: PolyhistorConfig, width: int, bottleneck: int) -> None:
        super().__init__()
        d_t = config.task_embedding_dim
        self.position_embeddings = nn.Parameter(torch.randn(len(POSITIONS), d_t)) if config.attention else None
        parts = 3 if config.attention else 2
        self.embedding = HyperEmbedding(parts * d_t, config)
        self.generator = AdapterGenerator(config, width, bottleneck)

    def forward(self, task: torch.Tensor, layer: torch.Tensor, position: str) -> GeneratedAdapter:
        """``task (d_t,)``, ``layer (R, d_t)`` -> adapters batched over the R layer-embedding rows."""
        rows = layer.shape[0]
        parts = [task.expand(rows, -1), layer]
        if self.position_embeddings is not None:
            parts.append(self.position_embeddings[POSITIONS[position]].expand(rows, -1))
        return self.generator(self.embedding(torch.cat(parts, dim=-1)))


def kronecker_sum(kernels: torch.Tensor, templates: torch.Tensor, kernel_front: bool = True) -> torch.Tensor:
    """``sum_i kernels[i] (x) templates[i]`` (or ``templates[i] (x) kernels[i]`` when not ``kernel_front``).

    ``kernels (k, p, q)``, ``templates (k, m, n)`` -> ``(p m, q n)``: a PHM-style sum of k Kronecker products in
    one einsum (equal to summing ``torch.kron`` over i).
    """
    kernels = kernels.to(templates.dtype)
    p, q = kernels.shape[-2:]
    m, n = templates.shape[-2:]
    if kernel_front:
        return torch.einsum("ipq,imn->pmqn", kernels, templates).reshape(p * m, q * n)
    return torch.einsum("ipq,imn->mpnq", kernels, templates).reshape(m * p, n * q)


def _kronecker_vector_sum(coefficients: torch.Tensor, templates: torch.Tensor, kernel_front: bool) -> torch.Tensor:
    """``sum_i c[i] (x) v[i]`` for column vectors: ``coefficients (k, k)``, ``templates (k, n)`` -> ``(k n,)``."""
    return kronecker_sum(coefficients.unsqueeze(-1), templates.unsqueeze(-1), kernel_front).squeeze(-1)


def _split_rows(weights: GeneratedAdapter, sizes: Sequence[int]) -> list[GeneratedAdapter]:
    """Cut a :class:`GeneratedAdapter` batched over ``sum(sizes)`` rows into one per block (``sizes[i]`` rows)."""
    def cut(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(t, list(sizes))

    def cut_norm(pair):
        return [None] * len(sizes) if pair is None else list(zip(cut(pair[0]), cut(pair[1])))

    return [GeneratedAdapter(*fields) for fields in zip(cut(weights.down_weight), cut(weights.down_bias),
                                                        cut(weights.up_weight), cut(weights.up_bias),
                                                        cut_norm(weights.pre_norm), cut_norm(weights.post_norm))]


class _GeneratedCache:
    """Per-task generated adapters of every position, with the key they were made under. A copy (``deepcopy``,
    pickling) starts empty: the entries may hold autograd graphs, and a copy regenerates on its first forward."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple, list[GeneratedAdapter | None]]] = {}
        self.slots: list[tuple[dict, str]] | None = None  # (a module's _parameters, name) of every tensor read

    def __deepcopy__(self, memo) -> _GeneratedCache:
        return _GeneratedCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class PolyhistorHyperNetworks(nn.Module):
    """What every adapted block shares, held once at the model root.

    ``task_embeddings``: one ``(d_t,)`` parameter per task, in ``tasks`` order (a list, so a task left out of a
    step gets no gradient at all and no weight decay). ``stages``: one :class:`DecomposedHyperNetwork` per Swin
    stage (Polyhistor), or ``template``: one at the stage-1 width (Lite); neither in the per-block form.
    ``active_task`` is the task the next forward generates adapters for (set with :func:`set_task`).

    The forward pass generates the adapters of every position at once (:meth:`generated`): the template rows of
    all blocks that share a hypernetwork go through it as ONE batch, and the result is kept while the parameters
    are unchanged. With gradients on, each position takes its weights once, so every forward pass builds its own
    graph (one batched generation per forward instead of one per position); without gradients (evaluation,
    inference) the weights are reused until an optimizer step or a load changes a parameter (their ``_version``
    counters and storage are the key). ``cache_generated = False`` generates per position on every call, the
    plain path the cached one is tested against.
    """

    def __init__(self, config: PolyhistorConfig, stage_widths: Sequence[int]) -> None:
        super().__init__()
        self.tasks = tuple(config.tasks)
        self.task_embeddings = nn.ParameterList(
            [nn.Parameter(torch.randn(config.task_embedding_dim)) for _ in self.tasks])
        self.stages = self.template = None
        if config.variant == "lite":
            width = stage_widths[0]
            self.template = DecomposedHyperNetwork(config, width, width // config.reduction_factor)
        elif config.shared_hypernetworks:
            self.stages = nn.ModuleList(DecomposedHyperNetwork(config, width, width // config.reduction_factor)
                                        for width in stage_widths)
        self.active_task: str | None = None
        self.cache_generated = True
        # plain attributes: the positions are registered under their hosts, the cache is no state
        self.__dict__["positions"] = []  # every PolyhistorAdapter of this adapter, in attachment (forward) order
        self.__dict__["_cache"] = _GeneratedCache()

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}: this Polyhistor adapter was attached for tasks "
                             f"{', '.join(map(repr, self.tasks))}")
        return self.tasks.index(task)

    def task_embedding(self, task: str | None = None) -> torch.Tensor:
        """The ``(d_t,)`` embedding of ``task`` (default: the active task)."""
        task = self.active_task if task is None else task
        if task is None:
            raise RuntimeError(f"no task is selected for this Polyhistor adapter: call "
                               f"visadapt.plugins.polyhistor.set_task(model, task) before the forward pass "
                               f"(tasks: {', '.join(self.tasks)})")
        return self.task_embeddings[self.task_index(task)]

    def hypernetwork(self, stage: int) -> DecomposedHyperNetwork:
        return self.template if self.template is not None else self.stages[stage]

    def _key(self, task: str) -> tuple:
        cache = self._cache
        if cache.slots is None:
            modules = [self] + self.positions
            cache.slots = [(m._parameters, name) for module in modules for m in module.modules()
                           for name in m._parameters if m._parameters[name] is not None]
        device = self.task_embeddings[0].device.type
        modes = (task, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                 torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return modes + tuple((params[name]._version, params[name].data_ptr()) for params, name in cache.slots)

    def generate_all(self, task: str | None = None) -> list[GeneratedAdapter]:
        """The adapters of every position (:attr:`positions` order) for ``task`` (default: the active task),
        equal to each position's :meth:`PolyhistorAdapter.generate`: blocks sharing a hypernetwork are generated
        as one batch of template rows (their layer embeddings stacked), then each block applies its kernels."""
        task = self.active_task if task is None else task
        embedding = self.task_embedding(task)
        templates: list[GeneratedAdapter | None] = [None] * len(self.positions)
        groups: dict[tuple[int, str], list[int]] = {}
        for index, position in enumerate(self.positions):
            if position.generator is not None:  # per-block hypernetwork: nothing to share
                templates[index] = position.templates(task)
            else:
                groups.setdefault((position.stage if self.stages is not None else 0, position.position),
                                  []).append(index)
        for (stage, where), indices in groups.items():
            layers = [self.positions[i]._owner().layer_embedding for i in indices]
            batch = self.hypernetwork(stage)(embedding, torch.cat(layers), where)
            for i, part in zip(indices, _split_rows(batch, [layer.shape[0] for layer in layers])):
                templates[i] = part
        return [position.compose(t) for position, t in zip(self.positions, templates)]

    def generated(self, position: PolyhistorAdapter) -> GeneratedAdapter:
        """The adapter of ``position`` for the active task, from the batched, kept generation (see the class)."""
        if not self.cache_generated:
            return position.generate()
        task = self.active_task
        self.task_embedding(task)  # refuses a missing or unknown task before anything is built
        key = self._key(task)
        entry = self._cache.entries.get(task)
        index = position.position_index
        if entry is None or entry[0] != key or entry[1][index] is None:
            entry = (key, self.generate_all(task))
            self._cache.entries[task] = entry
        weights = entry[1][index]
        if torch.is_grad_enabled():
            entry[1][index] = None  # taken: the next forward builds a graph of its own
        return weights

    def clear_generated(self) -> None:
        """Drop the kept generated adapters (they are rebuilt on the next forward pass)."""
        self._cache.entries.clear()
        self._cache.slots = None

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, active_task={self.active_task!r}"


class PolyhistorAdapter(nn.Module):
    """One adapted position (FFN or attention) of one block: ``x (..., width)`` -> the delta its site adds.

    Holds this block's own parts: the layer embedding (``(1, d_t)``; Lite ``(k, d_t)``), Lite's scaling kernels
    (``weight_kernel (k, k, k)``, ``bias_kernel (k, k)``, ``pre/post_norm_kernel (k, k)``; none at ``k = 1``),
    the per-block hyper-MLP and generators. A block's second position (attention adapters on) reads the layer
    embedding / hyper-MLP of its first through ``block_owner``. Neither the shared module nor the owner is a
    registered submodule, so their tensors are stored once.
    """

    def __init__(self, config: PolyhistorConfig, shared: PolyhistorHyperNetworks, *, width: int, bottleneck: int,
                 stage: int, scale: int, position: str, block_owner: PolyhistorAdapter | None = None) -> None:
        super().__init__()
        self.width, self.bottleneck, self.stage, self.scale, self.position = width, bottleneck, stage, scale, position
        self.lite = config.variant == "lite"
        self.kernel_front = config.kernel_front
        self.output_scale = config.output_scale
        self.act = make_activation(config.activation)
        d_t = config.task_embedding_dim
        self.layer_embedding = self.hyper_embedding = None
        if block_owner is None:  # the block's first position owns what its positions share
            if config.shared_hypernetworks:
                self.layer_embedding = nn.Parameter(torch.randn(scale if self.lite else 1, d_t))
            else:
                self.hyper_embedding = HyperEmbedding(d_t, config)
        self.generator = None if config.shared_hypernetworks else AdapterGenerator(config, width, bottleneck)
        self.weight_kernel = self.bias_kernel = self.pre_norm_kernel = self.post_norm_kernel = None
        if self.lite and scale > 1:
            # [code] initialises every kernel and coefficient with randn
            self.weight_kernel = nn.Parameter(torch.randn(scale, scale, scale))
            self.bias_kernel = nn.Parameter(torch.randn(scale, scale))
            pre, post = config.layer_norms
            self.pre_norm_kernel = nn.Parameter(torch.randn(scale, scale)) if pre else None
            self.post_norm_kernel = nn.Parameter(torch.randn(scale, scale)) if post else None
        # plain attributes, not submodules: shared tensors stay in the state dict once, deepcopy keeps sharing
        self.__dict__["shared"] = shared
        self.__dict__["block_owner"] = block_owner
        self.position_index = len(shared.positions)
        shared.positions.append(self)
        shared.clear_generated()

    def _owner(self) -> PolyhistorAdapter:
        return self.block_owner if self.block_owner is not None else self

    def templates(self, task: str | None = None) -> GeneratedAdapter:
        """Lite: the ``k`` template adapters ``(k, ...)`` of this block before the scaling kernels (``k = 1``
        in the other forms), for ``task`` (default: the active task)."""
        task_embedding = self.shared.task_embedding(task)
        owner = self._owner()
        if self.generator is not None:  # per-block hypernetwork, fed the task embedding alone
            return self.generator(owner.hyper_embedding(task_embedding.unsqueeze(0)))
        return self.shared.hypernetwork(self.stage)(task_embedding, owner.layer_embedding, self.position)

    def generate(self, task: str | None = None) -> GeneratedAdapter:
        """This position's adapter for ``task`` (default: the active task): ``down_weight (C/rho, C)`` etc.,
        generated now, on its own (the forward pass takes it from the shared batched generation instead)."""
        return self.compose(self.templates(task))

    def compose(self, t: GeneratedAdapter) -> GeneratedAdapter:
        """The adapter from this block's templates ``t`` (:meth:`templates`): Lite's scaling kernels applied, or
        the single template row taken."""
        if self.weight_kernel is None:
            return GeneratedAdapter(t.down_weight[0], t.down_bias[0], t.up_weight[0], t.up_bias[0],
                                    None if t.pre_norm is None else (t.pre_norm[0][0], t.pre_norm[1][0]),
                                    None if t.post_norm is None else (t.post_norm[0][0], t.post_norm[1][0]))
        front = self.kernel_front

        def norm(pair: tuple[torch.Tensor, torch.Tensor] | None, kernel: torch.Tensor | None):
            # [code] combines gain and bias with the same coefficients
            if pair is None:
                return None
            return (_kronecker_vector_sum(kernel, pair[0], front), _kronecker_vector_sum(kernel, pair[1], front))

        return GeneratedAdapter(
            kronecker_sum(self.weight_kernel, t.down_weight, front),
            _kronecker_vector_sum(self.bias_kernel, t.down_bias, front),
            kronecker_sum(self.weight_kernel, t.up_weight, front),
            _kronecker_vector_sum(self.bias_kernel, t.up_bias, front),
            norm(t.pre_norm, self.pre_norm_kernel),
            norm(t.post_norm, self.post_norm_kernel),
        )

    def adapter(self, x: torch.Tensor, weights: GeneratedAdapter) -> torch.Tensor:
        """``post_ln(W_up act(W_down pre_ln(x) + b_down) + b_up)`` for ``x (..., width)``, without the skip."""
        if weights.pre_norm is not None:
            x = F.layer_norm(x, (self.width,), *weights.pre_norm)
        out = F.linear(self.act(F.linear(x, weights.down_weight, weights.down_bias)), weights.up_weight,
                       weights.up_bias)
        if weights.post_norm is not None:
            out = F.layer_norm(out, (self.width,), *weights.post_norm)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the site computes x + delta; [code]'s block uses s * (adapter(x) + x), so delta = s adapter + (s - 1) x
        # generated for every position at once and kept while unchanged (PolyhistorHyperNetworks.generated)
        core = self.adapter(x, self.shared.generated(self))
        s = self.output_scale
        return core if s == 1.0 else s * core + (s - 1.0) * x

    def extra_repr(self) -> str:
        return (f"width={self.width}, bottleneck={self.bottleneck}, stage={self.stage}, scale={self.scale}, "
                f"position={self.position}")


# ------------------------------------------------------------------------------------------------- plugin


def _stages(sites: Sequence[Site]) -> list[tuple[int, list[int]]]:
    """``(width, [block indices])`` per stage: consecutive blocks of one width (Swin doubles it per stage)."""
    stages: list[tuple[int, list[int]]] = []
    for site in sites:
        if stages and stages[-1][0] == site.in_features:
            if site.block not in stages[-1][1]:
                stages[-1][1].append(site.block)
        else:
            stages.append((site.in_features, [site.block]))
    return stages


def _check_widths(config: PolyhistorConfig, stage_widths: Sequence[int]) -> None:
    """Refuse widths the config cannot serve, naming the width and the fix."""
    base = stage_widths[0]
    for width in stage_widths:
        if config.variant == "lite" and width % base:
            raise ValueError(f"Polyhistor-Lite scales the stage-1 template (width {base}) by whole factors; a stage "
                             f"of width {width} is no multiple of it: use variant='polyhistor'")
        smallest = base if config.variant == "lite" else width
        if smallest // config.reduction_factor < 1:
            raise ValueError(f"reduction_factor={config.reduction_factor} leaves no hidden unit at width {smallest}: "
                             f"use a reduction_factor <= {smallest}")


@register_plugin("polyhistor")
class PolyhistorPlugin(AdapterPlugin):
    Config = PolyhistorConfig
    families = ("timm_swin",)
    mergeable = False
    merge_refusal = ("Polyhistor's adapters are generated per task and have a non-linearity (and optional "
                     "LayerNorms) between their projections, so no base weight can absorb them")

    def attach(self, model: nn.Module, config: PolyhistorConfig, adapter_name: str) -> None:
        if not config.tasks:
            raise ValueError("config field tasks is empty: name the tasks the adapter serves, e.g. "
                             "tasks=('semseg', 'human_parts', 'sal', 'normals')")
        kind = {"serial": "mlp_out", "parallel": "mlp"}[config.placement]
        kinds = ["attn_out", kind] if config.attention else [kind]
        sites = find_sites(model, kinds)
        ffn_sites = [s for s in sites if s.kind == kind]
        stages = _stages(ffn_sites)
        stage_widths = [width for width, _ in stages]
        _check_widths(config, stage_widths)
        shared = PolyhistorHyperNetworks(config, stage_widths)
        insert(held_site(model, HYPERNETWORKS, stage_widths[0], stage_widths[0]), adapter_name, shared)
        stage_of = {block: s for s, (_, blocks) in enumerate(stages) for block in blocks}
        owners: dict[int, PolyhistorAdapter] = {}
        for site in sites:  # forward order: a block's attention site comes before its FFN site
            stage = stage_of[site.block]
            width = site.in_features
            if config.variant == "lite":
                scale = width // stage_widths[0]
                bottleneck = scale * (stage_widths[0] // config.reduction_factor)
            else:
                scale, bottleneck = 1, width // config.reduction_factor
            module = PolyhistorAdapter(config, shared, width=width, bottleneck=bottleneck, stage=stage, scale=scale,
                                       position="attention" if site.kind == "attn_out" else "ffn",
                                       block_owner=owners.get(site.block))
            owners.setdefault(site.block, module)
            insert(site, adapter_name, module)


# ---------------------------------------------------------------------------------------- task switching


def hypernetworks(model: nn.Module, adapter_name: str = "default") -> PolyhistorHyperNetworks:
    """The shared :class:`PolyhistorHyperNetworks` of Polyhistor adapter ``adapter_name`` on ``model``."""
    try:
        return held_module(model, HYPERNETWORKS, adapter_name, what="Polyhistor adapter", plugin="polyhistor")
    except ValueError:
        names = [item.adapter_name for item in attached(model) if item.kind == HYPERNETWORKS]
        if names:
            raise ValueError(f"no Polyhistor adapter named {adapter_name!r} is attached; the Polyhistor adapters "
                             f"here are {', '.join(map(repr, names))}: pass adapter_name=") from None
        raise


def set_task(model: nn.Module, task: str, adapter_name: str = "default") -> None:
    """Generate the adapters of ``task`` from the next forward pass on (the backbone runs once per task)."""
    shared = hypernetworks(model, adapter_name)
    shared.task_index(task)  # refuses an unknown task, naming the known ones
    shared.active_task = task


def get_task(model: nn.Module, adapter_name: str = "default") -> str | None:
    """The task the adapters are generated for now (None before the first :func:`set_task`)."""
    return hypernetworks(model, adapter_name).active_task


@contextlib.contextmanager
def use_task(model: nn.Module, task: str, adapter_name: str = "default") -> Iterator[None]:
    """``with use_task(model, "normals"): ...`` runs the block with ``task`` selected, then restores the previous."""
    shared = hypernetworks(model, adapter_name)
    previous = shared.active_task
    set_task(model, task, adapter_name)
    try:
        yield
    finally:
        shared.active_task = previous


def generated_adapters(model: nn.Module, task: str | None = None,
                       adapter_name: str = "default") -> dict[str, GeneratedAdapter]:
    """``{"<host path>:<site kind>": GeneratedAdapter}`` for every adapted position, for ``task`` (default: the
    active task), in forward order."""
    hypernetworks(model, adapter_name)
    return {f"{item.host_path}:{item.kind}": item.module.generate(task)
            for item in attached(model, adapter_name) if isinstance(item.module, PolyhistorAdapter)}


# ------------------------------------------------------------------------------------------ parameter count


def parameter_count(config: PolyhistorConfig, stage_widths: Sequence[int], depths: Sequence[int],
                    num_tasks: int) -> dict[str, int]:
    """Trainable parameters per part, from the formula (nothing is built), for a Swin with ``stage_widths``
    (e.g. 96, 192, 384, 768) and ``depths`` (2, 2, 6, 2) and ``num_tasks`` tasks; ``"total"`` sums them.

    Parts: ``task_embeddings``, ``position_embeddings`` (attention adapters on), ``hyper_mlp`` (its two Linears),
    ``hyper_layer_norm``, ``weight_generators`` (down/up factor and bias heads), ``norm_generators`` (adapter
    LayerNorm gain/bias heads), ``layer_embeddings``, ``scaling_kernels`` (Lite: weight kernels, bias and norm
    coefficients).
    """
    if len(stage_widths) != len(depths) or not stage_widths:
        raise ValueError(f"stage_widths {tuple(stage_widths)} and depths {tuple(depths)} must name the same, "
                         f"non-zero number of stages")
    _check_widths(config, stage_widths)
    d_t, hidden, d_p = config.task_embedding_dim, config.hidden_dim, config.projected_dim
    norms = sum(config.layer_norms)
    positions = len(config.positions)
    conditions = (3 if config.attention else 2) * d_t

    def hyper_mlp(in_features: int) -> int:
        return in_features * hidden + hidden + hidden * d_p + d_p

    def linear_generator(out_features: int, in_features: int) -> int:
        r = resolve_rank(config.rank, out_features, in_features)
        return (d_p + 1) * (out_features * r + r * in_features) + (d_p + 1) * out_features

    def adapter_generator(width: int, bottleneck: int) -> tuple[int, int]:
        weights = linear_generator(bottleneck, width) + linear_generator(width, bottleneck)
        return weights, norms * 2 * (d_p + 1) * width

    count = dict.fromkeys(("task_embeddings", "position_embeddings", "hyper_mlp", "hyper_layer_norm",
                           "weight_generators", "norm_generators", "layer_embeddings", "scaling_kernels"), 0)
    count["task_embeddings"] = num_tasks * d_t

    def add_shared_hypernetwork(width: int, bottleneck: int) -> None:
        count["position_embeddings"] += len(POSITIONS) * d_t if config.attention else 0
        count["hyper_mlp"] += hyper_mlp(conditions)
        count["hyper_layer_norm"] += 2 * d_p
        weights, norm_heads = adapter_generator(width, bottleneck)
        count["weight_generators"] += weights
        count["norm_generators"] += norm_heads

    if config.variant == "lite":
        base = stage_widths[0]
        add_shared_hypernetwork(base, base // config.reduction_factor)
        for width, depth in zip(stage_widths, depths):
            k = width // base
            count["layer_embeddings"] += depth * k * d_t
            if k > 1:
                count["scaling_kernels"] += depth * positions * (k ** 3 + k ** 2 + norms * k ** 2)
    elif config.shared_hypernetworks:
        for width, depth in zip(stage_widths, depths):
            add_shared_hypernetwork(width, width // config.reduction_factor)
            count["layer_embeddings"] += depth * d_t
    else:
        for width, depth in zip(stage_widths, depths):
            weights, norm_heads = adapter_generator(width, width // config.reduction_factor)
            count["hyper_mlp"] += depth * hyper_mlp(d_t)
            count["hyper_layer_norm"] += depth * 2 * d_p
            count["weight_generators"] += depth * positions * weights
            count["norm_generators"] += depth * positions * norm_heads
    count["total"] = sum(count.values())
    return count
