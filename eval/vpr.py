"""Visual place recognition evaluation: Recall@K of global retrieval and of SelaVPR's re-ranking, with timings.

:func:`evaluate_places` extracts global descriptors and dense local features of a split's database and queries,
retrieves each query's top-k by global k-NN, re-ranks them by mutual-nearest-neighbour matches, and reports
Recall@1/5/10 for both stages plus the time per query of each. :func:`vpr_table` prints runs the way the
SelaVPR paper does (one row per method and stage, R@1/R@5/R@10 per dataset, then ms per query).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from visadapt.plugins.selavpr import global_knn, recall_at_k, rerank
from visadapt.progress import Progress

# relative: eval/ is installed as visadapt.eval (see eval/cli.py)
from .tables import read_run_record

RECALL_KS = (1, 5, 10)
# Queries re-ranked per step of the re-ranking progress bar.
_RERANK_BLOCK = 64


@torch.no_grad()
def extract_place_features(model: nn.Module, dataset: Dataset, batch_size: int = 32,
                           device: torch.device | str | None = None, keep_local: bool = True,
                           desc: str = "place features") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of every image of ``dataset`` (items ``(image, index)``), in dataset order, on the CPU.

    ``model`` maps ``(B, 3, H, W)`` to ``(global (B, D), local (B, h, w, C))`` (a
    :class:`~visadapt.plugins.selavpr.PlaceRecognitionModel`). Returns ``global`` ``(N, D)`` float32 and
    ``local`` ``(N, h, w, C)`` float16: half precision halves the memory of the dense features (Pitts30k's
    10k database images at 61x61x128 take 9.5 GB instead of 19 GB); matching converts back to float32.
    ``keep_local=False`` returns ``None`` for the local features (hard-negative mining needs only globals).
    A transient bar of batches named ``desc`` shows on the main process (:mod:`visadapt.progress`).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    globals_, locals_ = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, _ in Progress(loader, desc=desc, unit="batches", leave=False):
        global_desc, local = model(images.to(device))
        globals_.append(global_desc.float().cpu())
        if keep_local:
            locals_.append(local.to(torch.float16).cpu())
    model.train(was_training)
    if not globals_:
        raise ValueError("the dataset is empty: no features to extract")
    return torch.cat(globals_), torch.cat(locals_) if keep_local else None


def evaluate_places(model: nn.Module, split, *, rerank_k: int = 100, positive_radius_m: float = 25.0,
                    batch_size: int = 32, ks: Sequence[int] = RECALL_KS, rerank_chunk: int = 8,
                    device: torch.device | str | None = None) -> dict[str, Any]:
    """Two-stage retrieval on one :class:`visadapt.data.places.PlaceSplit`.

    Returns ``{"global": {K: R@K}, "reranked": {K: R@K}, "top1_fixed", "top1_broken", "queries", "database",
    "rerank_k", "queries_without_positive", "extract_ms_per_image", "global_ms_per_query",
    "rerank_ms_per_query"}`` (recalls in percent; ``R@K`` for ``K > rerank_k`` is that of the global order,
    which re-ranking leaves unchanged beyond the first ``rerank_k``). ``top1_fixed`` / ``top1_broken`` count
    the queries whose first answer re-ranking turned right / wrong: R@1 changes by their difference, and their
    sizes say whether that change is more than a few lucky queries.
    """
    start = time.perf_counter()
    db_global, db_local = extract_place_features(model, split.database_dataset(), batch_size, device,
                                                 desc="database features")
    q_global, q_local = extract_place_features(model, split.query_dataset(), batch_size, device,
                                               desc="query features")
    extract_s = time.perf_counter() - start
    positives = split.positives(positive_radius_m)
    depth = min(max(max(ks), rerank_k), db_global.shape[0])

    start = time.perf_counter()
    ranked = global_knn(q_global, db_global, depth)
    global_s = time.perf_counter() - start

    k = min(rerank_k, depth)
    start = time.perf_counter()
    # Per block of queries, so that a long re-ranking shows progress; rerank treats each query alone, so the
    # blocks give the same order as one call.
    blocks = range(0, ranked.shape[0], _RERANK_BLOCK)
    reranked_head = torch.cat([rerank(q_local[lo:lo + _RERANK_BLOCK], db_local, ranked[lo:lo + _RERANK_BLOCK, :k],
                                      chunk=rerank_chunk)
                               for lo in Progress(blocks, desc="re-ranking", unit="blocks", leave=False)]
                              or [ranked[:, :k]])  # no queries: the empty (0, k)
    rerank_s = time.perf_counter() - start
    reranked = torch.cat([reranked_head, ranked[:, k:]], dim=1)

    n_queries, n_images = q_global.shape[0], q_global.shape[0] + db_global.shape[0]
    right_before = torch.tensor([bool(torch.isin(ranked[i, 0], p)) for i, p in enumerate(positives)])
    right_after = torch.tensor([bool(torch.isin(reranked[i, 0], p)) for i, p in enumerate(positives)])
    return {
        "global": {str(key): value for key, value in recall_at_k(ranked, positives, ks).items()},
        "reranked": {str(key): value for key, value in recall_at_k(reranked, positives, ks).items()},
        "top1_fixed": int((right_after & ~right_before).sum()),
        "top1_broken": int((right_before & ~right_after).sum()),
        "queries": n_queries,
        "database": int(db_global.shape[0]),
        "rerank_k": k,
        "queries_without_positive": sum(int(p.numel() == 0) for p in positives),
        "extract_ms_per_image": 1000.0 * extract_s / n_images,
        "global_ms_per_query": 1000.0 * global_s / n_queries,
        "rerank_ms_per_query": 1000.0 * rerank_s / n_queries,
    }


# ------------------------------------------------------------------------------------------------- table


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def vpr_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table: per run, a ``global`` and a ``+ re-rank (top-k)`` row with R@1/R@5/R@10 per dataset
    and the time per query of the stage (re-rank rows: global search plus re-ranking)."""
    datasets: list[str] = []
    for _, record in runs:
        for name in record["test"]:
            if name not in datasets:
                datasets.append(name)
    header = ["method"] + [f"{d} R@{k}" for d in datasets for k in RECALL_KS] + ["ms/query", "trainable"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, record in runs:
        for stage in ("global", "reranked"):
            ks = {name: (record["test"][name].get("rerank_k") if name in record["test"] else None)
                  for name in datasets}
            k_text = ",".join(sorted({str(k) for k in ks.values() if k is not None}))
            cells = [label if stage == "global" else f"{label} + re-rank (top-{k_text})"]
            times = []
            for name in datasets:
                result = record["test"].get(name)
                for k in RECALL_KS:
                    cells.append(_fmt(result[stage].get(str(k)) if result else None))
                if result:
                    ms = result["global_ms_per_query"] + (result["rerank_ms_per_query"] if stage == "reranked" else 0)
                    times.append(ms)
            cells.append(f"{sum(times) / len(times):.2f}" if times else "-")
            params = record.get("trainable_params")
            cells.append(f"{params / 1e6:.2f}M" if params is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_vpr_adapter_file(path: str | Path, data_root: str | Path, *, split: str = "test",
                              rerank_k: int | None = None, batch_size: int = 32, **kwargs: Any) -> dict[str, Any]:
    """Rebuild the backbone a ``train/vpr.py`` adapter file was trained on, load it, and run
    :func:`evaluate_places` on ``<data_root>/images/<split>`` (``rerank_k`` default: the one training used)."""
    from visadapt.api import summary
    from visadapt.backbones import create_backbone
    from visadapt.data import resolve_normalization
    from visadapt.data.places import PlaceSplit
    from visadapt.data.transforms import vtab_transform
    from visadapt.io import TRAIN_METADATA, TrainingRun, load_adapter, read_adapter_metadata
    from visadapt.plugins.selavpr import BACKBONE_ARGUMENTS, PlaceRecognitionModel

    meta = read_adapter_metadata(path)
    run = TrainingRun(path, meta)
    if not run.present:
        raise ValueError(f"{path} has no {TRAIN_METADATA!r} metadata (not written by train/vpr.py), so the backbone "
                         f"it belongs to is unknown")
    benchmark = run.text("benchmark")
    if benchmark != "vpr":
        raise ValueError(f"{path} was trained on {benchmark!r}, not for place recognition; evaluate it "
                         f"with --benchmark {benchmark}")
    size = run.input_size(required=True)
    backbone = create_backbone(run.text("model", required=True), run.weights(), num_classes=0, **BACKBONE_ARGUMENTS)
    load_adapter(backbone, path)
    model = PlaceRecognitionModel(backbone)
    transform = vtab_transform(size, resolve_normalization(run.text("normalize", "model"), backbone))
    place_split = PlaceSplit(data_root, split, transform)
    k = rerank_k or run.integer("rerank_k", 100, minimum=1, maximum=100_000)
    result = evaluate_places(model, place_split, rerank_k=k, batch_size=batch_size, **kwargs)
    return {"benchmark": "vpr", "dataset": Path(data_root).name, "test": {Path(data_root).name: result},
            "trainable_params": summary(backbone).trainable_params}


def vpr_main(adapters: Sequence[str], labels: Sequence[str] | None, data_root: str | None, split: str,
             rerank_k: int | None, batch_size: int | None) -> tuple[str, dict[str, dict[str, Any]]]:
    """The ``visadapt-eval --benchmark vpr`` table and the records behind it, by label: from each run's
    ``metrics.json``, or, with ``data_root``, by evaluating each run's ``adapter.safetensors`` (or the given
    file) on that dataset again."""
    runs = []
    for i, item in enumerate(adapters):
        path = Path(item)
        if not path.exists():
            raise ValueError(f"{path} does not exist; pass a train/vpr.py output directory or its adapter file")
        label = labels[i] if labels else (path.stem if path.is_file() else path.resolve().name)
        if data_root is None:
            if path.is_file() and path.suffix == ".safetensors":
                raise ValueError(f"{path} is an adapter file; add --data-root DATASET to evaluate it, or pass its "
                                 f"training output directory")
            runs.append((label, read_run_record(path, "vpr", "train/vpr.py")))
        else:
            adapter = path / "adapter.safetensors" if path.is_dir() else path
            if not adapter.is_file():
                raise ValueError(f"{path} holds no adapter.safetensors; pass a finished train/vpr.py run")
            print(f"visadapt-eval: evaluating {adapter} on {data_root}/images/{split}", file=sys.stderr)
            runs.append((label, evaluate_vpr_adapter_file(adapter, data_root, split=split, rerank_k=rerank_k,
                                                          batch_size=batch_size or 32)))
    return vpr_table(runs), dict(runs)
