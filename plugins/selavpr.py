"""SelaVPR: hybrid global/local adaptation of a frozen ViT for visual place recognition (Lu et al., ICLR 2024).

Global adaptation, in every block of the frozen ViT (DINOv2 in the paper; any timm ViT here)::

    a = Attn(LN1(x));  x = x + LS1(a + Adapter_serial(a))                  # site attn_branch
    h = LN2(x);        x = x + LS2(MLP(h) + s * Adapter_parallel(h))       # site mlp_branch, s = 0.2

Both adapters are :class:`visadapt.layers.BottleneckAdapter` (Linear(D, rD), ReLU, Linear(rD, D), biases, r =
0.5, the up-projection zero so the adapted model starts equal to the frozen one). One deliberate difference from
the official code: our down-projection bias starts at zero instead of PyTorch's default uniform init (the
shared block does so for every method; it changes no property the paper relies on).

Local adaptation and the descriptors (:class:`PlaceHead`, held on the model as ``place_head``): the final
normalised patch-token map ``(B, D, h, w)`` goes through ConvTranspose2d(D, 256, 3, s2, p1), ReLU,
ConvTranspose2d(256, 128, 3, s2, p1) to dense local features ``(B, 4h-3, 4w-3, 128)`` (16x16 -> 61x61 for
ViT-L/14 at 224), L2-normalised per location; the global descriptor is GeM (learnable p, init 3) over the
channel-normalised token map, L2-normalised, ``(B, D)``.

Losses: the triplet margin loss (margin 0.1, Euclidean) on global descriptors and the mutual-nearest-neighbour
(MNN) local loss ``max(0, sim(q, n) - sim(q, p) + local_margin)``, each summed over triplets and divided by
batch x negatives. The official local margin is 0 (the default here); on a backbone whose patch tokens do not
already separate places the hinge is met at once and the local head learns nothing, which is why the embedded
recipe of ``train/vpr.py`` uses 0.1 (measured there: re-ranked R@1 14.0 at 0, 22.9 at 0.1).
Retrieval is two-stage: global k-NN, then re-ranking of the top-k candidates by their number of MNN matches with
the query's local features (no RANSAC). The official matcher hard-codes CUDA; everything here runs on any device
and works in chunks, so re-ranking 100 candidates of 3721 features each needs no 5 GB similarity tensor.

Use :class:`PlaceRecognitionModel` (or :func:`place_features`) to get ``(global, local)`` from images; the
adapter file holds the adapters and the place head, so ``load_adapter`` restores everything.

**Position embeddings** (``pos_embed``). The official backbone (DINOv2's ``vision_transformer.py``, copied into
SelaVPR's ``backbone/``) keeps the 37 x 37 embedding of its 518 px pre-training and interpolates it at every
forward to the input's patch grid ``(h, w)`` (16 x 16 at 224 px): bicubic, no antialiasing, and a *scale factor*
``((h + 0.1) / 37, (w + 0.1) / 37)`` rather than an output size (``interpolate_offset=0.1``, a "historical
kludge" kept for compatibility), so the sampling points sit ``0.1`` cells off those of a size-based resize; a
square input on the pre-training grid is used as is. timm instead resamples once, at load, for ``img_size``
(bicubic *with* antialiasing, size-based). ``pos_embed="official"`` (the default) reproduces the official
interpolation: a parameter-free :class:`OfficialPositionEmbedding` on the model's ``patch_embed`` adds the
difference between the official embedding and the one timm adds, so the tokens get exactly the official one.
``pos_embed="timm"`` keeps timm's. Files saved before the field existed were trained with timm's and load so.
The official interpolation needs the embedding at its pre-training grid: create the backbone with
:data:`BACKBONE_ARGUMENTS` (``dynamic_img_size=True``, no ``img_size``) as ``train/vpr.py`` and
``eval/vpr.py`` do; timm's dynamic resampling is then, for ``pos_embed="timm"``, the very resize timm does at
load for ``img_size`` (same function, same arguments). On a model created at another ``img_size`` timm has
already resampled at load, and the official interpolation starts from that grid. Measured official vs timm
(relative difference, ``python eval/bench/selavpr_pos_embed.py``) on the embedded backbone: identical at its
native 32 px (8 x 8 grid, used as is by both, so the embedded recipe is unaffected); at 24 px (6 x 6) the
embedding differs by 26%, the final patch tokens by 7.9% and the global descriptor by 3.3%; at 64 px (16 x 16)
by 8.2%, 3.1% and 0.8%. For DINOv2 ViT-L/14 at 224 px (37 x 37 -> 16 x 16) the embedding differs by 4.6% on a
smooth synthetic embedding (no pretrained weights here). One edge the official code has and this does not: an
image whose sides differ in pixels but give the pre-training grid is still resampled there (by 0.1 / M cell).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from visadapt.inject import held_module, insert
from visadapt.layers import BottleneckAdapter
from visadapt.plugin import (
    AdapterConfig,
    AdapterPlugin,
    check_choice,
    check_dropout,
    check_positive,
    check_positive_int,
    config_field,
)
from visadapt.registry import register_plugin
from visadapt.sites import find_sites, held_site, patch_embed_site, patch_token_map

PLACE_HEAD = "place_head"
#: ``official``: DINOv2's interpolation at every forward (bicubic, no antialias, scale factor (h + 0.1) / M);
#: ``timm``: timm's resampling (bicubic, antialiased, to the grid size)
POS_EMBEDS = ("official", "timm")
#: the site kind of :class:`OfficialPositionEmbedding` (on the model's ``patch_embed``)
POS_EMBED_SITE = "pos_embed"
#: DINOv2's ``interpolate_offset``
DINOV2_INTERPOLATE_OFFSET = 0.1
#: ``timm.create_model`` arguments for a SelaVPR backbone: the position embedding stays at the grid of the
#: pretrained weights and any input size is accepted (the embedding is interpolated per forward)
BACKBONE_ARGUMENTS = {"dynamic_img_size": True}


@dataclass
class SelaVPRConfig(AdapterConfig):
    ratio: float = config_field(0.5, "bottleneck width as a fraction of the model width, both adapters "
                                     "(official 0.5; the class default 0.75 is overridden in the paper's runs)")
    parallel_scale: float = config_field(0.2, "s, the factor on the parallel (MLP) adapter's output")
    serial: bool = config_field(True, "serial adapter after attention (inside LayerScale, with its own skip)")
    parallel: bool = config_field(True, "parallel adapter beside the MLP, fed the MLP's normalised input")
    local_hidden: int = config_field(256, "channels after the first up-convolution of the local head")
    local_dim: int = config_field(128, "channels of the dense local features")
    gem_p: float = config_field(3.0, "initial GeM exponent p (learnt)")
    gem_eps: float = config_field(1e-6, "GeM clamp: features below it are raised to it before the power")
    dropout: float = config_field(0.0, "dropout inside the adapters (official: none)")
    blocks: tuple[int, ...] | None = config_field(None, "indices of the blocks to adapt; None = all (official)")
    pos_embed: str = config_field("official", "position embedding interpolation: official (DINOv2's, at every "
                                              "forward: bicubic, no antialias, scale (h + 0.1) / M) or timm "
                                              "(antialiased resize)")

    @classmethod
    def saved_file_values(cls, values: dict) -> dict:
        # files written before pos_embed existed ran timm's position embedding
        values.setdefault("pos_embed", "timm")
        return values

    def validate(self) -> None:
        check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        if not 0.0 < self.ratio <= 4.0:
            raise ValueError(f"config field ratio={self.ratio!r} is out of range: it must be in (0, 4]")
        check_positive("parallel_scale", self.parallel_scale, allow_zero=True)
        check_positive_int("local_hidden", self.local_hidden)
        check_positive_int("local_dim", self.local_dim)
        if self.gem_p < 1.0:
            raise ValueError(f"config field gem_p={self.gem_p!r} is out of range: it must be >= 1 (1 = mean "
                             f"pooling, larger values approach max pooling)")
        check_positive("gem_eps", self.gem_eps)
        check_dropout("dropout", self.dropout)


class GeM(nn.Module):
    """Generalised-mean pooling ``(mean_hw clamp(x, eps)^p)^(1/p)`` with learnable ``p``: ``(B, C, H, W) -> (B, C)``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class PlaceHead(nn.Module):
    """Global descriptor and dense local features from a patch-token map.

    Input ``tokens`` ``(B, D, h, w)``; returns ``global_desc`` ``(B, D)`` (unit norm) and ``local``
    ``(B, 4h-3, 4w-3, local_dim)`` (unit norm per location).
    """

    def __init__(self, width: int, hidden: int = 256, local_dim: int = 128, gem_p: float = 3.0,
                 gem_eps: float = 1e-6) -> None:
        super().__init__()
        # k3 s2 p1 up-convolutions: h -> 2h-1 -> 4h-3 (16 -> 31 -> 61), the official map size
        self.local = nn.Sequential(
            nn.ConvTranspose2d(width, hidden, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, local_dim, kernel_size=3, stride=2, padding=1),
        )
        self.gem = GeM(gem_p, gem_eps)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        global_desc = F.normalize(self.gem(F.normalize(tokens, dim=1)), dim=-1)
        local = F.normalize(self.local(tokens).permute(0, 2, 3, 1), dim=-1)
        return global_desc, local


def dinov2_position_embedding(patch_pos_embed: torch.Tensor, grid: tuple[int, int],
                              offset: float = DINOV2_INTERPOLATE_OFFSET) -> torch.Tensor:
    """The patch position embedding DINOv2's ``interpolate_pos_encoding`` gives for a ``grid = (h, w)`` of patches.

    ``patch_pos_embed`` ``(1, M * M, D)``: the embedding of a square ``M x M`` pre-training grid (prefix tokens
    removed). Returns ``(1, h * w, D)``: unchanged when ``(h, w) == (M, M)``, else bicubic, no antialiasing, with
    ``scale_factor = ((h + offset) / M, (w + offset) / M)`` (computed in float32, returned in the input dtype).
    """
    tokens, dim = patch_pos_embed.shape[1:]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"the official interpolation needs a square position-embedding grid; this one has {tokens} "
                         f"patch positions; use pos_embed='timm'")
    if tuple(grid) == (side, side):
        return patch_pos_embed
    square = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((grid[0] + offset) / side, (grid[1] + offset) / side),
                            mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != tuple(grid):  # cannot happen for offset < 1: floor(M * (h + offset) / M) = h
        raise ValueError(f"interpolating a {side}x{side} grid with offset {offset} gave {tuple(resized.shape[-2:])}, "
                         f"not {tuple(grid)}")
    return resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos_embed.dtype)


class OfficialPositionEmbedding(nn.Module):
    """Makes a timm ViT add DINOv2's interpolated position embedding (:func:`dinov2_position_embedding`) instead
    of timm's. Sits on the output of ``patch_embed`` and adds ``official - timm`` for the current patch grid; the
    model's own ``_pos_embed`` then adds timm's (resampled per forward with ``dynamic_img_size``, or as stored),
    so the patch tokens carry exactly the official embedding. Prefix tokens (class, registers) get the same
    embedding either way. No parameters: it reads the model's ``pos_embed`` at every call.

    Input ``patch_tokens`` ``(B, h, w, D)`` (``dynamic_img_size``) or ``(B, h * w, D)`` at the model's own grid;
    returns the correction broadcastable to it: ``(1, h, w, D)`` or ``(1, h * w, D)``, or a zero scalar when the
    two embeddings coincide (a square input on the pre-training grid).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        # the model itself, held outside the module tree (no cycle, nothing saved); deepcopy keeps the pairing
        object.__setattr__(self, "_vit", vit)
        grid = tuple(vit.patch_embed.grid_size)
        if vit.pos_embed is None or grid[0] != grid[1]:
            raise ValueError(f"config field pos_embed='official' needs a learnt position embedding on a square grid "
                             f"(this model: {'none' if vit.pos_embed is None else grid}); use pos_embed='timm'")

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        vit = self._vit
        source_grid = tuple(vit.patch_embed.grid_size)
        grid = tuple(patch_tokens.shape[1:3]) if patch_tokens.dim() == 4 else source_grid
        if grid == source_grid:
            return patch_tokens.new_zeros(())
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        source = vit.pos_embed[:, prefix:]
        official = dinov2_position_embedding(source, grid)
        # what timm's _pos_embed adds (dynamic_img_size): its resample, with its own defaults
        timm_added = resample_abs_pos_embed(source, new_size=list(grid), old_size=list(source_grid), num_prefix_tokens=0)
        return (official - timm_added).reshape(1, *patch_tokens.shape[1:]).to(patch_tokens.dtype)


@register_plugin("selavpr")
class SelaVPRPlugin(AdapterPlugin):
    Config = SelaVPRConfig
    families = ("timm_vit",)
    mergeable = False
    merge_refusal = ("SelaVPR's adapters have a ReLU between their projections and its place head is a "
                     "network of its own; neither folds into base weights")

    def attach(self, model: nn.Module, config: SelaVPRConfig, adapter_name: str) -> None:
        kinds = (["attn_branch"] if config.serial else []) + (["mlp_branch"] if config.parallel else [])
        width = model.embed_dim
        if kinds:
            for site in find_sites(model, kinds, config.blocks):
                scale = config.parallel_scale if site.kind == "mlp_branch" else 1.0
                insert(site, adapter_name, BottleneckAdapter(
                    site.in_features, max(1, round(site.in_features * config.ratio)), site.out_features,
                    activation="relu", dropout=config.dropout, scale=scale))
        insert(held_site(model, PLACE_HEAD, width, config.local_dim), adapter_name,
               PlaceHead(width, config.local_hidden, config.local_dim, config.gem_p, config.gem_eps))
        if config.pos_embed == "official":
            insert(patch_embed_site(model, POS_EMBED_SITE), adapter_name, OfficialPositionEmbedding(model))


def place_head(model: nn.Module, adapter_name: str | None = None) -> PlaceHead:
    """The :class:`PlaceHead` attached to ``model`` (the only one, or that of ``adapter_name``)."""
    return held_module(model, PLACE_HEAD, adapter_name, what="SelaVPR place head", plugin="selavpr")


def place_features(model: nn.Module, images: torch.Tensor, adapter_name: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global (B, D), local (B, h', w', C))`` of images ``(B, 3, H, W)`` through the adapted ViT."""
    return place_head(model, adapter_name)(patch_token_map(model, images))


class PlaceRecognitionModel(nn.Module):
    """A module whose forward returns place features, for training loops and distributed wrappers.

    ``images`` ``(B, 3, H, W)`` or ``(B, T, 3, H, W)`` (tuples: query, positive, negatives); the outputs keep
    the leading dimensions: ``global`` ``(B[, T], D)``, ``local`` ``(B[, T], h', w', C)``.
    """

    def __init__(self, backbone: nn.Module, adapter_name: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter_name = adapter_name
        place_head(backbone, adapter_name)  # fail now, not at the first batch

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = images.shape[:-3]
        global_desc, local = place_features(self.backbone, images.reshape(-1, *images.shape[-3:]),
                                            self.adapter_name)
        return global_desc.reshape(*lead, -1), local.reshape(*lead, *local.shape[1:])


# --------------------------------------------------------------------------------------------- matching


def mutual_nearest_neighbours(query: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours between two sets of unit local features, batched.

    ``query`` ``(..., N, C)``, ``other`` ``(..., M, C)``. Returns ``mutual`` ``(..., M)`` (bool: point ``i`` of
    ``other`` and its best match in ``query`` choose each other) and ``match`` ``(..., M)`` (index in
    ``query`` of each point's best match), from the similarity ``S = other @ query^T``.
    """
    similarity = other @ query.transpose(-1, -2)                       # (..., M, N)
    match = similarity.argmax(dim=-1)                                  # (..., M): best query point per other point
    best_other = similarity.argmax(dim=-2)                             # (..., N): best other point per query point
    mutual = best_other.gather(-1, match) == torch.arange(other.shape[-2], device=other.device)
    return mutual, match


def mnn_similarity(query: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """SelaVPR's local similarity: the mean dot product over mutual-nearest-neighbour pairs,
    ``(..., N, C), (..., M, C) -> (...)``; the gradient flows through the matched dot products.

    The official code falls back to the mean over aligned positions when no pair is mutual; that cannot happen
    (the largest entry of the similarity matrix is always a mutual pair), so there is no fallback here.
    """
    with torch.no_grad():
        mutual, match = mutual_nearest_neighbours(query, other)
    matched = query.gather(-2, match.unsqueeze(-1).expand(*match.shape, query.shape[-1]))   # (..., M, C)
    pair_sim = (matched * other).sum(dim=-1)                                                # (..., M)
    return (pair_sim * mutual).sum(dim=-1) / mutual.sum(dim=-1)


def mnn_match_count(query: torch.Tensor, candidates: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Number of mutual-nearest-neighbour matches between one query and each candidate.

    ``query`` ``(N, C)``, ``candidates`` ``(K, M, C)`` -> ``(K,)`` int64. Works ``chunk`` candidates at a time
    (a ``(chunk, M, N)`` similarity tensor), in float32 whatever the stored dtype.
    """
    query = query.float()
    counts = [mutual_nearest_neighbours(query, block.float())[0].sum(dim=-1)
              for block in torch.split(candidates, chunk)]
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long, device=query.device)


# ------------------------------------------------------------------------------------------------ losses


def global_triplet_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                        margin: float = 0.1) -> torch.Tensor:
    """``sum max(0, |q - p| - |q - n| + margin) / (B * K)``: ``query``/``positive`` ``(B, D)``, ``negatives``
    ``(B, K, D)`` (Euclidean distances with PyTorch's triplet eps, as the official TripletMarginLoss)."""
    batch, k = negatives.shape[:2]
    d_pos = F.pairwise_distance(query, positive).unsqueeze(1)                       # (B, 1)
    d_neg = F.pairwise_distance(query.unsqueeze(1).expand_as(negatives), negatives)  # (B, K)
    return (d_pos - d_neg + margin).clamp(min=0).sum() / (batch * k)


def local_mnn_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                   margin: float = 0.0) -> torch.Tensor:
    """``sum max(0, sim(q, n) - sim(q, p) + margin) / (B * K)`` with :func:`mnn_similarity`: ``query``/``positive``
    ``(B, N, C)``, ``negatives`` ``(B, K, N, C)``. The official loss has ``margin = 0``."""
    batch, k = negatives.shape[:2]
    sim_pos = mnn_similarity(query, positive).unsqueeze(1)                                      # (B, 1)
    sim_neg = mnn_similarity(query.unsqueeze(1).expand(-1, k, -1, -1), negatives)               # (B, K)
    return (sim_neg - sim_pos + margin).clamp(min=0).sum() / (batch * k)


@dataclasses.dataclass
class SelaVPRLoss:
    """Total loss ``global_weight * triplet + local_weight * local`` of tuples ``[query, positive, negs...]``.

    Called with the outputs of :class:`PlaceRecognitionModel` on ``(B, 2 + K, 3, H, W)`` tuples. ``margin`` is
    the triplet margin of the global loss (official 0.1), ``local_margin`` that of the local hinge (official 0:
    enough where the backbone's patch tokens already tell places apart, as DINOv2's do; on a backbone whose
    tokens do not, the hinge is met within an epoch and teaches the local head nothing, so the embedded
    recipe of ``train/vpr.py`` sets 0.1).
    """

    margin: float = 0.1
    global_weight: float = 1.0
    local_weight: float = 1.0
    local_margin: float = 0.0

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], _labels: torch.Tensor | None = None
                 ) -> torch.Tensor:
        global_desc, local = outputs
        if global_desc.dim() != 3 or global_desc.shape[1] < 3:
            raise ValueError(f"SelaVPRLoss takes features of (B, 2 + K, ...) tuples [query, positive, negatives], "
                             f"got global descriptors of shape {tuple(global_desc.shape)}")
        loss = self.global_weight * global_triplet_loss(global_desc[:, 0], global_desc[:, 1], global_desc[:, 2:],
                                                        self.margin)
        if self.local_weight:
            flat = local.flatten(2, 3)                                                          # (B, T, N, C)
            loss = loss + self.local_weight * local_mnn_loss(flat[:, 0], flat[:, 1], flat[:, 2:],
                                                             self.local_margin)
        return loss


# --------------------------------------------------------------------------------------------- retrieval


def global_knn(queries: torch.Tensor, database: torch.Tensor, k: int, chunk: int = 1024,
               backend: str = "torch") -> torch.Tensor:
    """Indices ``(Q, k)`` of each query's ``k`` nearest database descriptors (Euclidean), nearest first.

    ``queries`` ``(Q, D)``, ``database`` ``(N, D)``; ``k`` is capped at ``N``. ``backend="faiss"`` searches an
    exact ``IndexFlatL2`` (``pip install faiss-cpu``; the ``visadapt[faiss]`` extra), as the official
    evaluation does; ``"torch"`` computes distances in chunks of ``chunk`` queries. Both are exact; they may
    order equidistant candidates differently.
    """
    k = min(k, database.shape[0])
    if backend == "faiss":
        try:
            import faiss
        except ImportError as err:
            raise ImportError("global_knn(backend='faiss') needs faiss: pip install faiss-cpu (or use "
                              "backend='torch')") from err
        index = faiss.IndexFlatL2(database.shape[1])
        index.add(database.detach().float().cpu().contiguous().numpy())
        _, found = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(found).long()
    if backend != "torch":
        raise ValueError(f"global_knn backend {backend!r} is not one of 'torch', 'faiss'")
    out = [torch.cdist(block.float(), database.float()).topk(k, dim=1, largest=False).indices
           for block in torch.split(queries, chunk)]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def rerank(query_local: torch.Tensor, database_local: torch.Tensor, candidates: torch.Tensor,
           chunk: int = 8) -> torch.Tensor:
    """Candidates re-ordered by their number of MNN local matches with the query, most first.

    ``query_local`` ``(Q, h, w, C)`` (or ``(Q, N, C)``), ``database_local`` ``(N_db, h, w, C)``,
    ``candidates`` ``(Q, k)`` database indices in global order. Ties keep the global order (stable sort).
    Returns ``(Q, k)`` indices.
    """
    out = torch.empty_like(candidates)
    for i, row in enumerate(candidates):
        query = query_local[i].reshape(-1, query_local.shape[-1])
        cands = database_local[row].reshape(row.numel(), -1, database_local.shape[-1])
        counts = mnn_match_count(query, cands.to(query.device), chunk)
        out[i] = row[torch.sort(counts, descending=True, stable=True).indices.to(row.device)]
    return out


def recall_at_k(predictions: torch.Tensor, positives: Sequence[torch.Tensor],
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K in percent: the share of queries with a true positive among their first ``K`` predictions.

    ``predictions`` ``(Q, k)`` database indices; ``positives`` one index tensor per query (database images
    within the positive radius). Queries without any positive count as misses, as in the VPR benchmarks.
    """
    if predictions.shape[0] != len(positives):
        raise ValueError(f"{predictions.shape[0]} prediction rows for {len(positives)} queries")
    hits = torch.zeros(len(positives), predictions.shape[1], dtype=torch.bool)
    for i, pos in enumerate(positives):
        hits[i] = torch.isin(predictions[i].cpu(), pos.cpu())
    first_hit = hits.cummax(dim=1).values  # position j: a positive among the first j + 1
    total = max(len(positives), 1)
    return {k: 100.0 * first_hit[:, min(k, predictions.shape[1]) - 1].sum().item() / total for k in ks}
