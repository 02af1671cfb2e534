"""Ranking metrics and evaluation of text-driven image ordering (the ranking-aware CLIP adapter).

Metrics over a test set: PLCC (Pearson), SRCC (Spearman, average ranks for ties) and MAE, with the formulas of
the official evaluation (``learn_to_compare/utils.py: evaluate_clip_on_count``; the official script applies it
per category, ``per_category`` here), and two pairwise ordering accuracies:

* ``pair_acc_official`` (:func:`official_pair_accuracy`): the official ``accuracy``, exactly. It compares
  ``y_j - y_i >= 0`` with ``s_j - s_i >= 0`` over the entries ``(i, j)`` of ``numpy.tril_indices(n, k=1)``: the
  lower triangle, the diagonal (always agreeing) and the first superdiagonal, so it depends on the row order,
  counts every pair of tied targets as agreeing whenever the scores are ordered ``>=`` in that direction, and
  never reaches 0 (the diagonal is ``n`` of its ``n(n+1)/2 + n - 1`` entries).
* ``pair_acc_strict`` (:func:`pairwise_accuracy`): over the unordered pairs of images with *different* targets,
  the share that the scores order the same way (a tie in the scores counts half); independent of the row order.
  Files written before the split call this one ``pair_acc``.

On the tied example of ``tests/test_ranking_clip.py`` (targets ``[1, 2, 2, 3, 3, 3, 4]``) the official one is
0.794 and the strict one 0.882; listing the same images in reverse order makes the official one 0.824.
For ordinal targets (age groups, decades) ``accuracy``: share of scores that round to the target. (The official
script, with ``is_ordinal_regression``, instead rounds the scores before computing every metric; here the other
metrics keep the raw scores.)
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt.progress import Progress

# relative: eval/ is installed as visadapt.eval (see eval/cli.py)
from .tables import read_run_record

METRIC_NAMES = ("plcc", "srcc", "mae", "pair_acc_official", "pair_acc_strict")


def plcc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Pearson linear correlation of ``(N,)`` scores and targets; NaN when either is constant."""
    x, y = scores.double() - scores.double().mean(), targets.double() - targets.double().mean()
    denom = x.norm() * y.norm()
    return float((x @ y) / denom) if denom > 0 else float("nan")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of ``(N,)`` values, tied values sharing the mean of their ranks (as scipy's ``rankdata``)."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    # group equal values: first index of each run of equal sorted values
    new_run = torch.ones_like(sorted_values, dtype=torch.bool)
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    positions = torch.arange(1, len(values) + 1, dtype=torch.double)
    run_mean = torch.zeros(int(run_id[-1]) + 1, dtype=torch.double).index_add_(0, run_id, positions)
    run_mean /= torch.bincount(run_id).double()
    ranks[order] = run_mean[run_id]
    return ranks


def srcc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return plcc(average_ranks(scores), average_ranks(targets))


def pairwise_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """``pair_acc_strict``: share of the unordered pairs of ``(N,)`` targets that differ which the ``(N,)``
    scores order as the targets do (score ties: half); NaN when every target is equal."""
    ds = scores.double()[:, None] - scores.double()[None, :]
    dt = targets.double()[:, None] - targets.double()[None, :]
    upper = torch.triu(torch.ones_like(dt, dtype=torch.bool), diagonal=1) & (dt != 0)
    if not upper.any():
        return float("nan")
    agree = (torch.sign(ds) == torch.sign(dt)).double() + 0.5 * (ds == 0).double()
    return float(agree[upper].mean())


def official_pair_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """``pair_acc_official``: the official evaluation's ``accuracy`` of ``(N,)`` scores against targets.

    With ``u[i, j] = y_j - y_i`` and ``v[i, j] = s_j - s_i``, the share of the entries ``(i, j)`` with
    ``j <= i + 1`` (``tril_indices(N, k=1)``: lower triangle, diagonal, first superdiagonal) where
    ``u >= 0`` and ``v >= 0`` agree. Depends on the order of the rows (the superdiagonal pairs neighbours).
    """
    s, y = scores.double().flatten(), targets.double().flatten()
    rows, cols = torch.tril_indices(len(s), len(s), offset=1)
    return float(((y[cols] - y[rows] >= 0) == (s[cols] - s[rows] >= 0)).double().mean())


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ordinal: bool = False) -> dict[str, float]:
    """``{"plcc", "srcc", "mae", "pair_acc_official", "pair_acc_strict"[, "accuracy"]}`` of ``(N,)`` scores
    against targets, in the order given (``pair_acc_official`` depends on it)."""
    scores, targets = scores.flatten().double(), targets.flatten().double()
    if scores.shape != targets.shape or scores.numel() < 2:
        raise ValueError(f"ranking metrics need as many scores as targets, at least 2; got {scores.numel()} scores "
                         f"and {targets.numel()} targets")
    out = {"plcc": plcc(scores, targets), "srcc": srcc(scores, targets),
           "mae": float((scores - targets).abs().mean()),
           "pair_acc_official": official_pair_accuracy(scores, targets),
           "pair_acc_strict": pairwise_accuracy(scores, targets)}
    if ordinal:
        out["accuracy"] = float((scores.round() == targets).double().mean())
    return out


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def score_table(score_fn: Callable[[torch.Tensor, str], torch.Tensor], table, batch_size: int = 64
                ) -> torch.Tensor:
    """Scores ``(N,)`` of every row of a :class:`visadapt.data.ranking.RankingTable` under its own
    instruction; ``score_fn(images (B, 3, H, W), instruction) -> (B,)``."""
    scores = torch.empty(len(table))
    by_title: dict[str, list[int]] = {}
    for i, row in enumerate(table.rows):
        by_title.setdefault(row.title, []).append(i)
    with Progress(total=len(table), desc="scoring images", unit="images", leave=False) as bar:
        for title, rows in by_title.items():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                scores[chunk] = score_fn(torch.stack([table.load(i) for i in chunk]), title).float().cpu()
                bar.update(len(chunk))
    return scores


def evaluate_ranking(score_fn: Callable[[torch.Tensor, str], torch.Tensor], table, *, batch_size: int = 64,
                     ordinal: bool = False) -> dict[str, Any]:
    """Metrics over the whole table (``"all"``), per instruction category (``"per_category"``, rows in table
    order) and their mean over categories (``"category_mean"``: the "Mean PLCC / SRCC / MAE" the official
    ``scripts/inference.py`` prints, which evaluates each ``cname`` apart)."""
    scores = score_table(score_fn, table, batch_size)
    targets = table.values
    per = {c: ranking_metrics(scores[rows], targets[rows], ordinal) for c, rows in sorted(table.categories.items())
           if len(rows) > 1}
    mean = {key: sum(m[key] for m in per.values()) / len(per) for key in next(iter(per.values()), {})}
    return {"all": ranking_metrics(scores, targets, ordinal), "per_category": per, "category_mean": mean,
            "images": len(table)}


def adapter_scorer(model: nn.Module, tokenizer=None, adapter_name: str | None = None
                   ) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``score_fn`` of an open_clip model carrying a ranking adapter (its regression-head scores)."""
    from visadapt.plugins.ranking_clip import rank

    def score(images: torch.Tensor, instruction: str) -> torch.Tensor:
        return rank(model, images, instruction, tokenizer=tokenizer, adapter_name=adapter_name,
                    batch_size=len(images))[1]
    return score


def zero_shot_scorer(clip: nn.Module, tokenizer) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """The frozen baseline: a score per image = cosine similarity of its CLIP embedding with the instruction's."""
    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def score(images: torch.Tensor, instruction: str) -> torch.Tensor:
        device = next(clip.parameters()).device
        if instruction not in cache:
            cache[instruction] = clip.encode_text(tokenizer([instruction]).to(device), normalize=True)[0]
        return clip.encode_image(images.to(device), normalize=True) @ cache[instruction]
    return score


# ------------------------------------------------------------------------------------------------ table


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def rank_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown, as the paper's counting table: per run a zero-shot CLIP row (when recorded) and the
    adapter's row, with PLCC / SRCC / MAE, the official and the strict pairwise accuracy on the test set and the
    trainable parameters. Records written before the split hold only the strict one (as ``pair_acc``); their
    official cell shows ``-``."""
    header = ["method", "PLCC", "SRCC", "MAE", "pair acc (official)", "pair acc (strict)", "trainable"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, record in runs:
        rows = []
        if "zero_shot" in record:
            rows.append((f"{label}: zero-shot CLIP", record["zero_shot"]["all"], None))
        rows.append((label, record["test"]["all"], record.get("trainable_params")))
        for name, m, params in rows:
            cells = [name, _fmt(m["plcc"]), _fmt(m["srcc"]), _fmt(m["mae"], 2), _fmt(m.get("pair_acc_official")),
                     _fmt(m.get("pair_acc_strict", m.get("pair_acc"))),
                     f"{params / 1e6:.2f}M" if params is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rank_main(paths: Sequence[str], labels: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
    """The ``visadapt-eval --benchmark rank`` table from ``train/rank.py`` output directories."""
    runs = []
    for i, item in enumerate(paths):
        path = Path(item)
        if not path.exists():
            raise ValueError(f"{path} does not exist; pass a train/rank.py output directory")
        label = labels[i] if labels else path.resolve().name
        runs.append((label, read_run_record(path, "rank", "train/rank.py")))
    print(f"visadapt-eval: {len(runs)} ranking run(s)", file=sys.stderr)
    return rank_table(runs), dict(runs)
