"""Ranking-aware adapter: text-driven image ordering on a frozen CLIP (Yu et al., ICLR 2025).

One instruction ("Rank the numbers of cats.") and a list of images in; one score per image out; the list is
ordered by score. Both CLIP towers stay frozen; the adapter reads token-level features from stock open_clip::

    image tokens  V = ln_post(patch tokens) @ proj                    ViT       (N, P, D)   D = CLIP embed_dim
                  V = head_norm(final ConvNeXt map) @ W + b           ConvNeXt  (N, h*w, D)
    text tokens   T = ln_final(text transformer output), every position         (N, L, W)   (W != D: @ text_projection)
    keys/values   C = [prompt tokens (K, D) ; T]                                (N, K + L, D)
    fusion        z = V; L times: z = SelfBlock(z); z = CrossBlock(z, C); z = ln(z) @ proj
    Z'            = TransformerEncoder(z)   (2 layers, ffn D, dropout 0.1)      (N, P, D)
    score         s_i = MLP(sum_p LN(Z'_i))                                     (N,)        the inference score

and, for training only, a relational branch over ordered pairs of images of one list: 16 learnt queries attend
jointly over the 2P tokens of both images, per head ``A = softmax(q [K_i; K_j]^T / sqrt(d))``, read out as the
*difference* ``r_ij = A_i V_i - A_j V_j`` (K = V = LN(Linear(Z'))); ``sum_q OutProj(r_ij)`` then a 4-layer head
gives the logit that image i ranks above j. Losses (:class:`RankingLoss`): RankNet BCE on the pair logits
against ``1[y_i > y_j]`` (weight 1), ``log(1 + SmoothL1(s, y))`` (weight 0.2), optionally BCE of ``s`` against
``1[y != 0]`` (off in the official recipe).

As the official code by default: the ViT projection ``proj`` trains (the official training re-enables
``visual.proj`` after locking the image tower; here a trainable copy initialised from it lives in the adapter,
``image_proj="train"``, so the CLIP itself is left as it was); ConvNeXt towers (the released results use
``convnext_large_d_320``) give their final feature map after the head norm, projected by a 1x1 map ``W, b`` of
timm's random init that stays frozen (the official config leaves it out of every checkpoint and the tower lock
freezes it), :func:`image_token_features`; the fusion MLPs use QuickGELU on ``quick_gelu`` CLIP models; and
:func:`official_param_groups` gives the official AdamW groups (no decay on gains and biases, amsgrad, betas and
eps per tower). Files written before ``image_proj`` / ``activation`` existed load as trained (frozen
``visual.proj``, GELU).

Choices that differ from the official code, each documented where it lives:

* The text tower is really frozen. The official code trains CLIP's token embedding, positional embedding and
  final text norm by accident (it only freezes the text blocks); here nothing of CLIP changes.
* Prompt tokens are full ``(K, D)`` vectors by default; ``prompt_form="scalar"`` gives the official form, one
  scalar per token broadcast over the width (each token a constant vector ``c_k * 1``).
* The pair branch is computed without materialising the ``N^2`` concatenated token sets. A softmax over
  ``[K_i; K_j]`` splits into per-image partial sums (max ``m_i``, normaliser ``Z_i``, numerator ``U_i``,
  computed once per image in O(N P)); a pair then costs O(R D): ``r_ij = (U_i a_i - U_j a_j) / (Z_i a_i + Z_j
  a_j)`` with ``a = exp(m - max(m_i, m_j))``. Same numbers as the literal form (tested), about 2P/R times less
  memory, and ``r_ji = -r_ij``, ``r_ii = 0`` hold exactly. ``pair_partners=k`` trains on k random partners
  per image instead of all N^2 pairs (linear in the list size; see ``eval/bench/ranking_pairs.py``).
* No stock open_clip is modified or monkeypatched: features come from ``forward_intermediates`` (ViT, text) and
  timm's ``forward_features`` (ConvNeXt).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visadapt.inject import held_module, insert
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
from visadapt.sites import held_site, model_family

RANKING_ADAPTER = "ranking_adapter"
PROMPT_FORMS = ("full", "scalar")
IMAGE_PROJ_CHOICES = ("auto", "train", "frozen")
ACTIVATIONS = ("auto", "gelu", "quick_gelu")


@dataclass
class RankingCLIPConfig(AdapterConfig):
    num_layers: int = config_field(2, "fusion layers, each self-attention on image tokens then cross-attention "
                                      "to the text tokens")
    num_heads: int = config_field(8, "attention heads in every attention of the adapter (must divide CLIP's "
                                     "embed_dim)")
    mlp_ratio: float = config_field(4.0, "MLP width of the fusion blocks as a multiple of embed_dim")
    prompt_tokens: int = config_field(32, "learnable key/value tokens prepended to the text tokens (0 = none)")
    prompt_form: str = config_field("full", "'full': a (prompt_tokens, D) matrix; 'scalar': the official form, "
                                            "one scalar per token broadcast over D")
    post_layers: int = config_field(2, "layers of the transformer encoder after the fusion")
    dropout: float = config_field(0.1, "dropout of that encoder (official 0.1)")
    relational_tokens: int = config_field(16, "learnt queries of the relational (pair) attention")
    image_proj: str = config_field(
        "auto", "projection of the image tokens into D. ViT: 'train' = a trainable copy of CLIP's visual.proj (the "
                "official code re-enables visual.proj), 'frozen' = CLIP's visual.proj as it is; ConvNeXt: a 1x1 "
                "projection of the head-normed final map, random init as timm, 'frozen' (official) or 'train'. "
                "'auto' = the official choice for the tower, resolved at attach (files record the result)")
    activation: str = config_field(
        "auto", "MLP activation of the fusion blocks: 'gelu', 'quick_gelu', or 'auto' = QuickGELU when the CLIP "
                "itself uses it (official: the adapter follows the model's quick_gelu), resolved at attach")

    @classmethod
    def saved_file_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        # Files written before these fields existed kept visual.proj frozen and used GELU.
        values.setdefault("image_proj", "frozen")
        values.setdefault("activation", "gelu")
        return values

    def validate(self) -> None:
        check_positive_int("num_layers", self.num_layers)
        check_positive_int("num_heads", self.num_heads)
        check_positive("mlp_ratio", self.mlp_ratio)
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 0:
            raise ValueError(f"config field prompt_tokens={self.prompt_tokens!r} must be an integer >= 0")
        check_choice("prompt_form", self.prompt_form, PROMPT_FORMS)
        if not isinstance(self.post_layers, int) or self.post_layers < 0:
            raise ValueError(f"config field post_layers={self.post_layers!r} must be an integer >= 0")
        check_dropout("dropout", self.dropout)
        check_positive_int("relational_tokens", self.relational_tokens)
        check_choice("image_proj", self.image_proj, IMAGE_PROJ_CHOICES)
        check_choice("activation", self.activation, ACTIVATIONS)


# ------------------------------------------------------------------------------------------------ modules


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections on PyTorch SDPA: ``(N, Lq, D), (N, Lk, D) -> (N, Lq, D)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, lq, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2)  # (N, H, L, d/H)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)))
        return self.out(y.transpose(1, 2).reshape(n, lq, d))


class FusionBlock(nn.Module):
    """Pre-norm residual block (as open_clip's ``ResidualAttentionBlock``): ``x + Attn(LN(x), LN(c))``, then
    ``x + MLP(LN(x))``. Self-attention when no context is given. ``x`` ``(N, P, D)``, ``context`` ``(N, L, D)``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross: bool,
                 activation: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.ln_1_kv = nn.LayerNorm(width) if cross else None
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = max(1, round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.ln_1(x)
        kv = q if self.ln_1_kv is None else self.ln_1_kv(context)
        x = x + self.attn(q, kv)
        return x + self.mlp(self.ln_2(x))


def _mlp_head(width: int, depth: int, input_norm: bool) -> nn.Sequential:
    """``[LN] -> (Linear, LN, ReLU) x depth -> Linear(D, 1)``: weights Xavier-normal as the official init, biases
    zero (the official code keeps PyTorch's default uniform bias init there)."""
    layers: list[nn.Module] = [nn.LayerNorm(width)] if input_norm else []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class RelationalAttention(nn.Module):
    """The relational ranking-aware attention: ``Z'`` ``(N, P, D)`` and ordered pairs ``(M, 2)`` -> ``(M, D)``.

    Per head, learnt queries ``q = LN(W_q Q0)`` ``(R, d)`` attend over both images' tokens jointly; the readout
    is ``A_i V_i - A_j V_j``, summed over the R queries after the output projection. See the module docstring
    for the factorised computation; :meth:`literal` is the formula as written, kept as the test reference.
    """

    def __init__(self, width: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(tokens, width) * width ** -0.5)
        self.q_proj, self.q_norm = nn.Linear(width, width), nn.LayerNorm(width)
        self.kv_proj, self.kv_norm = nn.Linear(width, width), nn.LayerNorm(width)  # one projection: K = V
        self.out = nn.Linear(width, width)

    def _queries_and_values(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, d = self.heads, z.shape[-1] // self.heads
        q = self.q_norm(self.q_proj(self.queries)).unflatten(-1, (h, d)).transpose(0, 1)  # (H, R, d)
        kv = self.kv_norm(self.kv_proj(z)).unflatten(-1, (h, d)).transpose(1, 2)          # (N, H, P, d)
        return q, kv

    def readout(self, z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """``r_ij`` summed over the queries, before the output projection: ``(M, D)``; exactly antisymmetric."""
        q, kv = self._queries_and_values(z)
        scores = torch.einsum("hrd,nhpd->nhrp", q, kv) / math.sqrt(q.shape[-1])           # (N, H, R, P)
        peak = scores.amax(dim=-1)                                                          # (N, H, R)
        weights = torch.exp(scores - peak.unsqueeze(-1))
        norm = weights.sum(dim=-1)                                                          # (N, H, R)
        numer = weights @ kv                                                                # (N, H, R, d)
        i, j = pairs[:, 0], pairs[:, 1]
        top = torch.maximum(peak[i], peak[j])
        a_i, a_j = torch.exp(peak[i] - top), torch.exp(peak[j] - top)                      # (M, H, R)
        r = (numer[i] * a_i.unsqueeze(-1) - numer[j] * a_j.unsqueeze(-1)) / (
            norm[i] * a_i + norm[j] * a_j).unsqueeze(-1)                                    # (M, H, R, d)
        return r.sum(dim=2).flatten(1)                                                      # (M, D)

    def forward(self, z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        # sum_q (W r_q + b) = W sum_q r_q + R b
        return F.linear(self.readout(z, pairs), self.out.weight) + self.queries.shape[0] * self.out.bias

    def literal(self, z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """The official computation: concatenate each pair's ``2P`` tokens, one softmax, split, subtract."""
        q, kv = self._queries_and_values(z)
        p = z.shape[1]
        both = torch.cat([kv[pairs[:, 0]], kv[pairs[:, 1]]], dim=2)                         # (M, H, 2P, d)
        attn = torch.softmax(torch.einsum("hrd,mhpd->mhrp", q, both) / math.sqrt(q.shape[-1]), dim=-1)
        r = attn[..., :p] @ both[:, :, :p] - attn[..., p:] @ both[:, :, p:]                 # (M, H, R, d)
        r = r.transpose(1, 2).flatten(2)                                                    # (M, R, D)
        return self.out(r).sum(dim=1)


class TokenProjection(nn.Module):
    """Image tokens into the adapter's width: ``(N, P, C) -> (N, P, D)``, ``x @ weight (+ bias)``, ``weight``
    ``(C, D)`` as open_clip stores ``visual.proj``. Trainable parameters, or persistent buffers when frozen (a
    frozen random projection must still travel in the adapter file)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, trainable: bool) -> None:
        super().__init__()
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is None:
                setattr(self, name, None)
            elif trainable:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = tokens @ self.weight.to(tokens.dtype)
        return out if self.bias is None else out + self.bias.to(tokens.dtype)


class RankingAdapter(nn.Module):
    """Everything the method trains, held on the CLIP model as ``ranking_adapter``.

    :meth:`fuse` ``(N, P, D), (N, L, D) -> Z' (N, P, D)``; :meth:`score` ``Z' -> (N,)``; :meth:`pair_logits`
    ``Z', pairs (M, 2) -> (M,)`` (logit of "image ``pairs[m, 0]`` ranks above ``pairs[m, 1]``").
    ``image_proj`` maps the tower's image tokens to D; ``None`` means CLIP's own ``visual.proj`` (ViT, frozen).
    """

    def __init__(self, width: int, config: RankingCLIPConfig, image_proj: TokenProjection | None = None,
                 activation: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.image_proj = image_proj
        if width % config.num_heads:
            raise ValueError(f"config field num_heads={config.num_heads} does not divide the CLIP embed_dim {width}; "
                             f"pick a divisor of {width}")
        self.width = width
        shape = (config.prompt_tokens, width) if config.prompt_form == "full" else (config.prompt_tokens, 1)
        self.prompts = nn.Parameter(torch.randn(*shape) * (shape[-1] if config.prompt_form == "full"
                                                            else config.prompt_tokens) ** -0.5)
        self.fusion = nn.ModuleList()
        for _ in range(config.num_layers):
            for cross in (False, True):
                self.fusion.append(FusionBlock(width, config.num_heads, config.mlp_ratio, cross, activation))
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.projection.weight, std=width ** -0.5)
        self.post = (nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, config.num_heads, dim_feedforward=width, dropout=config.dropout,
                                       batch_first=True),
            config.post_layers, enable_nested_tensor=False) if config.post_layers else nn.Identity())
        self.score_norm = nn.LayerNorm(width)
        self.score_head = _mlp_head(width, depth=2, input_norm=False)
        self.relational = RelationalAttention(width, config.num_heads, config.relational_tokens)
        self.pair_head = _mlp_head(width, depth=3, input_norm=True)

    def fuse(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        n = image_tokens.shape[0]
        prompts = self.prompts.expand(-1, self.width) if self.prompts.shape[-1] == 1 else self.prompts
        context = torch.cat([prompts.unsqueeze(0).expand(n, -1, -1).to(text_tokens.dtype), text_tokens], dim=1)
        z = image_tokens
        for block in self.fusion:
            z = block(z, context if block.ln_1_kv is not None else None)
        return self.post(self.projection(self.ln_final(z)))

    def score(self, fused: torch.Tensor) -> torch.Tensor:
        return self.score_head(self.score_norm(fused).sum(dim=1)).squeeze(-1)

    def pair_logits(self, fused: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.pair_head(self.relational(fused, pairs)).squeeze(-1)


# ------------------------------------------------------------------------------------------------- plugin


def _is_convnext_tower(visual: nn.Module) -> bool:
    from open_clip.timm_model import TimmModel
    from timm.models.convnext import ConvNeXt

    return isinstance(visual, TimmModel) and isinstance(visual.trunk, ConvNeXt)


def _vision_kind(model: nn.Module) -> str:
    """``"vit"`` or ``"convnext"``: the image towers whose tokens the adapter reads; ValueError for others."""
    if model_family(model) != "open_clip" or not hasattr(model, "visual") or not hasattr(model, "forward_intermediates"):
        raise ValueError("the ranking-aware adapter attaches to a whole open_clip CLIP / CustomTextCLIP model "
                         "(open_clip.create_model(...)), not to one of its towers")
    from open_clip.transformer import VisionTransformer

    if _is_convnext_tower(model.visual):
        return "convnext"
    if not isinstance(model.visual, VisionTransformer):
        # ValueError like every unsupported-model refusal of attach(), which callers catch as bad input
        raise ValueError(  # noqa: TRY004
            f"the ranking adapter reads ViT patch tokens or a ConvNeXt's final feature map; this CLIP's image tower "
            f"is {type(model.visual).__name__}"
            + (f" with a {type(model.visual.trunk).__name__} trunk" if hasattr(model.visual, "trunk") else "")
            + " (ResNet and other timm towers are not supported). Use a CLIP with a ViT or ConvNeXt image tower, "
              "e.g. open_clip.create_model('convnext_large_d_320', ...) (the released results) or 'ViT-L-14'")
    if getattr(model.visual, "attn_pool", None) is not None:
        raise ValueError("this open_clip vision tower pools with attention (CoCa-style); its patch tokens are not "
                         "the ln_post tokens the ranking adapter reads. Use a CLIP with a plain ViT tower")
    return "vit"


def clip_embed_dim(model: nn.Module) -> int:
    """CLIP's joint embedding width ``D`` (the adapter's width)."""
    proj = getattr(model.visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        return proj.shape[1]
    if getattr(model.visual, "output_dim", None):
        return int(model.visual.output_dim)
    text_proj = model.text.text_projection if hasattr(model, "text") else model.text_projection
    return text_proj.out_features if isinstance(text_proj, nn.Linear) else text_proj.shape[1]


def uses_quick_gelu(model: nn.Module) -> bool:
    """True when an open_clip model was built with ``quick_gelu`` (``-quickgelu`` names, OpenAI weights): its
    transformer MLPs use open_clip's ``QuickGELU`` (timm towers keep GELU, the text tower shows it)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _image_projection(model: nn.Module, kind: str, width: int, trainable: bool) -> TokenProjection | None:
    """The adapter's image-token projection for ``model``'s tower (see :class:`RankingCLIPConfig.image_proj`)."""
    if kind == "vit":
        # the official code trains visual.proj itself; a copy keeps the CLIP usable as it was (zero-shot
        # baseline, other adapters) and lets the trained projection travel in the adapter file. The adapter reads
        # visual.proj nowhere else and the official contrastive loss is 0, so training the copy is the same.
        return TokenProjection(model.visual.proj.detach().clone(), None, True) if trainable else None
    # The official ConvNeXt config (timm_pool "", timm_proj "") builds the trunk with num_classes=D and no
    # pooling, so timm's head ends in a 1x1 conv C -> D that no open_clip checkpoint holds: it keeps timm's init
    # (trunc. normal, std 0.02; zero bias) and stays frozen with the trunk (lock_image_tower). Same here.
    channels = model.visual.trunk.num_features
    ref = model.visual.trunk.head.norm.weight if hasattr(model.visual.trunk.head.norm, "weight") else None
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    weight = nn.init.trunc_normal_(torch.empty(channels, width, **factory), std=0.02)
    return TokenProjection(weight, torch.zeros(width, **factory), trainable)


@register_plugin("ranking_clip")
class RankingCLIPPlugin(AdapterPlugin):
    Config = RankingCLIPConfig
    families = ("open_clip",)
    mergeable = False
    merge_refusal = "the ranking adapter is a network of its own on top of CLIP; there is nothing to fold"

    def attach(self, model: nn.Module, config: RankingCLIPConfig, adapter_name: str) -> None:
        kind = _vision_kind(model)
        width = clip_embed_dim(model)
        # "auto" becomes the official choice for this model; the config is the record saved with the adapter,
        # so a file states what it was trained with and loads the same on any model
        if config.image_proj == "auto":
            config.image_proj = "train" if kind == "vit" else "frozen"
        if config.activation == "auto":
            config.activation = "quick_gelu" if uses_quick_gelu(model) else "gelu"
        from open_clip.transformer import QuickGELU

        activation = QuickGELU if config.activation == "quick_gelu" else nn.GELU
        projection = _image_projection(model, kind, width, trainable=config.image_proj == "train")
        insert(held_site(model, RANKING_ADAPTER, width, 1), adapter_name,
               RankingAdapter(width, config, projection, activation))


def ranking_adapter(model: nn.Module, adapter_name: str | None = None) -> RankingAdapter:
    """The :class:`RankingAdapter` attached to ``model`` (the only one, or that of ``adapter_name``)."""
    return held_module(model, RANKING_ADAPTER, adapter_name, what="ranking adapter", plugin="ranking_clip")


def image_token_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image tokens the adapter reads, before their projection: ``(N, 3, H, W) -> (N, P, C)``.

    ViT: the ``ln_post`` patch tokens (class token dropped), ``C`` = tower width. ConvNeXt: the final stage's
    feature map after the head's norm (``trunk.norm_pre`` then ``trunk.head.norm``, the LayerNorm2d timm applies
    before its classifier), flattened row-major to ``h * w`` tokens of ``C = trunk.num_features`` channels; the
    official config (no pooling) feeds exactly this map to its 1x1 classifier conv.
    """
    if _is_convnext_tower(model.visual):
        trunk = model.visual.trunk
        feature_map = trunk.head.norm(trunk.forward_features(images))                    # (N, C, h, w)
        return feature_map.flatten(2).transpose(1, 2)
    out = model.forward_intermediates(image=images, image_indices=1, normalize_intermediates=True,
                                      intermediates_only=True, image_output_fmt="NLC")
    return out["image_intermediates"][-1]


def clip_tokens(model: nn.Module, images: torch.Tensor, text: torch.Tensor,
                adapter: RankingAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level features of stock open_clip: ``images`` ``(N, 3, H, W)`` -> ``(N, P, D)``
    (:func:`image_token_features` through the adapter's ``image_proj``, or CLIP's ``visual.proj`` when the
    adapter has none); ``text`` ids ``(N, L)`` -> ``(N, L, D)`` (every position after ``ln_final``; through
    ``text_projection`` only where the text width differs from ``D``). ``adapter``: default, the only one.

    The towers run without autograd unless some CLIP parameter is trainable (another adapter on the towers):
    frozen towers then cost no activation memory; a trainable image projection still gets its gradient.
    """
    adapter = adapter if adapter is not None else ranking_adapter(model)
    # held modules (this adapter) live under the model's own "visadapt_adapters."; anything else trainable
    # sits inside the towers
    needs_grad = torch.is_grad_enabled() and any(
        p.requires_grad for name, p in model.named_parameters() if not name.startswith("visadapt_adapters."))
    with torch.set_grad_enabled(needs_grad):
        features = image_token_features(model, images)
        text_tokens = model.forward_intermediates(text=text, text_indices=1, normalize_intermediates=True,
                                                  intermediates_only=True)["text_intermediates"][-1]
        if text_tokens.shape[-1] != adapter.width:
            text_proj = model.text.text_projection if hasattr(model, "text") else model.text_projection
            text_tokens = text_proj(text_tokens) if isinstance(text_proj, nn.Linear) else text_tokens @ text_proj
        if adapter.image_proj is None:
            return features @ model.visual.proj, text_tokens
    return adapter.image_proj(features), text_tokens


def all_pairs(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every ordered pair ``(i, j)`` of ``n`` images, ``i == j`` included as in the official loss: ``(n*n, 2)``."""
    idx = torch.arange(n, device=device)
    return torch.cartesian_prod(idx, idx)


def sampled_pairs(n: int, partners: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``partners`` random partners ``j != i`` for every image ``i`` (with replacement): ``(n*partners, 2)``."""
    if n < 2:
        return all_pairs(n, device)
    i = torch.arange(n).repeat_interleave(partners)
    # an offset in 1..n-1 never lands on i itself
    j = (i + torch.randint(1, n, (n * partners,), generator=generator)) % n
    return torch.stack([i, j], dim=1).to(device)


class RankingModel(nn.Module):
    """Scores (and, in training, pair logits) of lists of images under their instruction.

    ``forward(images, text)``: ``images`` ``([L,] N, 3, H, W)``, ``text`` token ids ``([L,] N, C)`` (one list of
    N images per leading index; ``forward((images, text))`` also works, as the training engine calls it).
    Returns ``{"scores": ([L,] N), "pair_logits": ([L,] M), "pairs": (M, 2)}``; pairs are taken within each list
    (all ``N^2`` ordered pairs, or ``pair_partners`` random partners per image), and only while training or
    with ``with_pairs=True`` — inference needs the scores alone.
    """

    def __init__(self, clip: nn.Module, adapter_name: str | None = None, pair_partners: int | None = None) -> None:
        super().__init__()
        if pair_partners is not None and pair_partners < 1:
            raise ValueError(f"pair_partners={pair_partners} must be >= 1, or None for all N^2 pairs")
        self.clip = clip
        self.adapter_name = adapter_name
        self.pair_partners = pair_partners
        ranking_adapter(clip, adapter_name)  # fail now, not at the first batch

    def forward(self, images, text: torch.Tensor | None = None, with_pairs: bool | None = None) -> dict:
        if text is None:
            images, text = images
        listed = images.dim() == 5
        if not listed:
            images, text = images.unsqueeze(0), text.unsqueeze(0)
        if text.shape[:2] != images.shape[:2]:
            raise ValueError(f"images {tuple(images.shape)} and text ids {tuple(text.shape)} disagree on the list "
                             f"layout; pass one row of token ids per image")
        lists, n = images.shape[:2]
        adapter = ranking_adapter(self.clip, self.adapter_name)
        image_tokens, text_tokens = clip_tokens(self.clip, images.flatten(0, 1), text.flatten(0, 1), adapter)
        fused = adapter.fuse(image_tokens, text_tokens)                                    # (L*N, P, D)
        out = {"scores": adapter.score(fused).view(lists, n)}
        if self.training if with_pairs is None else with_pairs:
            pairs = (all_pairs(n, fused.device) if self.pair_partners is None
                     else sampled_pairs(n, self.pair_partners, device=fused.device))
            offsets = (torch.arange(lists, device=fused.device) * n).view(-1, 1, 1)
            flat = (pairs.unsqueeze(0) + offsets).flatten(0, 1)                             # (L*M, 2)
            out["pair_logits"] = adapter.pair_logits(fused, flat).view(lists, -1)
            out["pairs"] = pairs
        if not listed:
            out = {k: (v.squeeze(0) if k != "pairs" else v) for k, v in out.items()}
        return out


@dataclasses.dataclass
class RankingLoss:
    """``rank_weight * BCE(pair logits, 1[y_i > y_j]) + regression_weight * log(1 + SmoothL1(s, y))
    + zero_weight * BCE(s, 1[y != 0])`` on the outputs of :class:`RankingModel` and targets ``([L,] N)``.

    Defaults are the official recipe (``--loss-components regression rank``): 1.0, 0.2 and 0 (the zero-target
    BCE has weight 1.0 in the official code when it is switched on). Pair targets treat ties, and ``i == j``,
    as 0, as the official loss does.
    """

    rank_weight: float = 1.0
    regression_weight: float = 0.2
    zero_weight: float = 0.0

    def __call__(self, outputs: dict, targets: torch.Tensor) -> torch.Tensor:
        scores = outputs["scores"]
        targets = targets.to(scores.dtype).view_as(scores)
        loss = self.regression_weight * torch.log1p(F.smooth_l1_loss(scores, targets))
        if self.rank_weight:
            if "pair_logits" not in outputs:
                raise ValueError("RankingLoss with rank_weight > 0 needs pair logits: call the RankingModel in "
                                 "training mode or with with_pairs=True")
            pairs = outputs["pairs"]
            y = targets.view(-1, targets.shape[-1])
            above = (y[:, pairs[:, 0]] > y[:, pairs[:, 1]]).to(scores.dtype)
            loss = loss + self.rank_weight * F.binary_cross_entropy_with_logits(
                outputs["pair_logits"].view_as(above), above)
        if self.zero_weight:
            loss = loss + self.zero_weight * F.binary_cross_entropy_with_logits(scores, (targets != 0).to(scores.dtype))
        return loss


# ------------------------------------------------------------------------------------------------ optimiser

#: AdamW betas and eps of the official training: open_clip's ``get_default_params`` (CLIP paper values).
VIT_ADAMW = {"betas": (0.9, 0.98), "eps": 1e-6}
OTHER_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}


def _official_no_decay(name: str, tensor: torch.Tensor) -> bool:
    """The official rule (``training/main.py``): gains and biases, i.e. tensors of fewer than 2 dims and names
    containing ``bn``, ``ln``, ``bias`` or ``logit_scale``, get no weight decay."""
    return tensor.ndim < 2 or any(tag in name for tag in ("bn", "ln", "bias", "logit_scale"))


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the official training for the trainable parameters of ``model`` (a CLIP with
    the adapter attached, or a :class:`RankingModel`): ``[no-decay group, decay group]``.

    As the official ``training/main.py``: weight decay 0 for norm gains, biases and every tensor of fewer than 2
    dims (:func:`_official_no_decay`, applied to the parameter's name inside its adapter, so that an adapter
    name cannot change it), ``weight_decay`` for the rest (prompt tokens, relational queries and the image
    projection included: they are 2-D), ``amsgrad=True``; betas ``(0.9, 0.98)`` and eps ``1e-6`` for ViT image
    towers, ``(0.9, 0.999)`` and ``1e-8`` otherwise (ConvNeXt). The official code picks the betas by the model
    name containing ``vit`` (``get_default_params``); here the tower's class decides, which agrees on every
    official adapter config (``ViT-*-adapter`` vs ``convnext_*-adapter``, ``RN*-adapter``).
    """
    clip = model.clip if isinstance(model, RankingModel) else model
    settings = VIT_ADAMW if _vision_kind(clip) == "vit" else OTHER_ADAMW
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            inner = re.sub(r"visadapt_adapters\.[^.]+\.", "", name)
            (no_decay if _official_no_decay(inner, param) else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0, "amsgrad": True, **settings},
            {"params": decay, "weight_decay": weight_decay, "amsgrad": True, **settings}]


# ---------------------------------------------------------------------------------------------- inference


def default_tokenizer(model: nn.Module) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's BPE tokenizer (shipped with the package, no download) at the model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and vocab != 49408:
        raise ValueError(f"this CLIP has a {vocab}-token vocabulary, not the 49408 BPE tokens of open_clip's "
                         f"SimpleTokenizer; pass tokenizer= (e.g. open_clip.get_tokenizer(<model name>))")
    return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


@torch.no_grad()
def rank(model: nn.Module, images: torch.Tensor | Sequence[torch.Tensor], instruction: str, *,
         tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None, batch_size: int = 64,
         adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Order ``images`` (``(N, 3, H, W)`` or a list of ``(3, H, W)``, preprocessed for the CLIP) by the
    instruction. Returns ``(order, scores)``: ``order`` ``(N,)`` indices, highest score first (ties keep the
    input order), ``scores`` ``(N,)`` in input order. Each score depends on its image and the instruction only,
    so scores from separate calls or batches compare directly.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("rank() got no images")
        images = torch.stack(list(images))
    if images.dim() != 4:
        raise ValueError(f"images must be (N, 3, H, W) or a list of (3, H, W) tensors, got {tuple(images.shape)}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string, e.g. 'Rank the numbers of cats.'")
    clip = model.clip if isinstance(model, RankingModel) else model
    adapter_name = model.adapter_name if isinstance(model, RankingModel) else adapter_name
    adapter = ranking_adapter(clip, adapter_name)
    was_training = adapter.training
    adapter.eval()
    try:
        device = next(adapter.parameters()).device
        ids = (tokenizer or default_tokenizer(clip))([instruction]).to(device)
        scores = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(device)
            image_tokens, text_tokens = clip_tokens(clip, chunk, ids.expand(chunk.shape[0], -1), adapter)
            scores.append(adapter.score(adapter.fuse(image_tokens, text_tokens)).float().cpu())
    finally:
        adapter.train(was_training)
    scores = torch.cat(scores)
    return torch.sort(scores, descending=True, stable=True).indices, scores
