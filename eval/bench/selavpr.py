"""SelaVPR retrieval cost side by side in one run: global k-NN vs re-ranking, its growth with k and with the
number of local features, and k-NN search in torch vs faiss.

    python eval/bench/selavpr.py                 # official shapes: 1024-d globals, 61x61x128 local maps
    python eval/bench/selavpr.py --record        # also writes the README's three tables (eval/results/selavpr_*.json)

1. **Re-ranking vs global-only** per query: global k-NN over ``--database`` descriptors, then MNN re-ranking
   of the top k (10, 20, 50, 100) candidates with the official local map (61 x 61 = 3721 features of 128
   channels, stored float16 as :func:`visadapt.eval.vpr.evaluate_places` keeps them). Ratio to global-only.
2. **Growth with the number of local features**: re-ranking the top 20 with maps of 13x13, 29x29 (the embedded
   default's) and 61x61 features: the cost grows with the square of the count (an N x N similarity per pair).
3. **k-NN search**: exact search of ``--queries-knn`` queries over 1k / 10k / 100k database descriptors with
   :func:`global_knn` in torch (chunked ``cdist`` + ``topk``) and with faiss ``IndexFlatL2`` when installed.

Random unit features: only shapes matter for time. Medians over interleaved rounds.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from visadapt.plugins.selavpr import global_knn, rerank


def median_ms(fn, rounds: int, per_call: int = 1, device: str = "cpu") -> float:
    """Median milliseconds of ``fn()`` over ``rounds`` calls after one warm-up, divided by ``per_call``; CUDA is
    synchronised around each call, so queued kernels land in the call that launched them."""
    cuda = torch.device(device).type == "cuda"
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / per_call)
    return 1000 * statistics.median(times)


def unit(*shape: int, dtype=torch.float32, device: str = "cpu") -> torch.Tensor:
    """Random unit vectors along the last dimension, drawn on the CPU (the same numbers on every device)."""
    return F.normalize(torch.randn(*shape), dim=-1).to(device, dtype)


def rerank_vs_global(args) -> dict:
    """Prints and returns ``{"global_knn_ms": float, "rerank_ms": {k: float}}`` per query on ``args.device``."""
    device = getattr(args, "device", "cpu")
    q_global, db_global = unit(args.queries, args.dim, device=device), unit(args.database, args.dim, device=device)
    side = args.map_side
    q_local = unit(args.queries, side, side, args.local_dim, dtype=torch.float16, device=device)
    max_k = max(args.ks)
    # Only the candidates' local maps are touched: keep max_k of them instead of the whole database in memory.
    db_local = unit(max_k, side, side, args.local_dim, dtype=torch.float16, device=device)
    candidates = torch.stack([torch.randperm(max_k) for _ in range(args.queries)])
    global_ms = median_ms(lambda: global_knn(q_global, db_global, max_k), args.rounds, args.queries, device)
    print(f"\n1. per query: global k-NN over {args.database} x {args.dim} vs re-ranking the top k "
          f"({side}x{side}={side * side} local features x {args.local_dim}), {device}")
    print(f"{'stage':<28}{'ms/query':>12}{'vs global':>12}")
    print(f"{'global k-NN':<28}{global_ms:>12.2f}{1.0:>12.1f}")
    rerank_ms = {}
    for k in args.ks:
        ms = median_ms(lambda k=k: rerank(q_local, db_local, candidates[:, :k]), args.rounds, args.queries, device)
        rerank_ms[k] = ms
        print(f"{f'+ re-rank top {k}':<28}{ms:>12.1f}{ms / global_ms:>12.1f}")
    return {"global_knn_ms": global_ms, "rerank_ms": rerank_ms}


def rerank_vs_features(args) -> dict[int, float]:
    """Prints and returns the re-ranking ms per query of the top 20 by local map side (13, 29, 61)."""
    k = 20
    print(f"\n2. re-ranking the top {k} per query vs local features per image ({args.local_dim} channels)")
    print(f"{'local map':<16}{'features':>10}{'ms/query':>12}{'vs smallest':>14}")
    base, found = None, {}
    for side in (13, 29, 61):
        q_local = unit(args.queries, side, side, args.local_dim, dtype=torch.float16)
        db_local = unit(k, side, side, args.local_dim, dtype=torch.float16)
        candidates = torch.stack([torch.randperm(k) for _ in range(args.queries)])
        ms = median_ms(lambda q=q_local, d=db_local, c=candidates: rerank(q, d, c), args.rounds, args.queries)
        base = base or ms
        print(f"{f'{side}x{side}':<16}{side * side:>10}{ms:>12.2f}{ms / base:>14.1f}")
        found[side] = ms
    return found


def knn_backends(args) -> dict[int, dict[str, float]]:
    """Prints and returns the k-NN ms per query by database size and backend (torch; faiss when installed)."""
    try:
        import faiss  # noqa: F401
        backends = ("torch", "faiss")
    except ImportError:
        backends = ("torch",)
        print("\n(faiss is not installed: pip install faiss-cpu, or the visadapt[faiss] extra, to compare it)")
    print(f"\n3. exact k-NN (k=100) of {args.queries_knn} queries, {args.dim}-d, ms per query")
    print(f"{'database':>10}" + "".join(f"{b:>12}" for b in backends)
          + (f"{'faiss/torch':>14}" if len(backends) == 2 else ""))
    table = {}
    for size in (1_000, 10_000, 100_000):
        database, queries = unit(size, args.dim), unit(args.queries_knn, args.dim)
        found = {b: median_ms(lambda b=b, q=queries, d=database: global_knn(q, d, 100, backend=b), args.rounds,
                              args.queries_knn) for b in backends}
        row = f"{size:>10}" + "".join(f"{found[b]:>12.3f}" for b in backends)
        if len(backends) == 2:
            row += f"{found['faiss'] / found['torch']:>14.2f}"
        print(row)
        table[size] = found
    return table


def record(args, argv: list[str], retrieval: dict, features: dict[int, float], knn: dict) -> None:
    """The three README tables (blocks selavpr-rerank, selavpr-local-features, selavpr-faiss) from one run."""
    import readme_figures  # beside this script (eval/bench/), imported only to record

    if any("faiss" not in found for found in knn.values()):
        raise SystemExit("--record: faiss is not installed, and the k-NN table compares it with torch; "
                         "pip install faiss-cpu")
    command = readme_figures.bench_command("selavpr.py", argv)
    machine = readme_figures.machine_phrase(args.device)
    global_ms = retrieval["global_knn_ms"]
    rows = [{"id": "global-knn", "values": [global_ms, 1]}]
    rows += [{"id": f"rerank-{k}", "values": [ms, ms / global_ms]} for k, ms in retrieval["rerank_ms"].items()]
    readme_figures.record_table("selavpr-rerank", rows, command, machine)
    base = features[13]
    readme_figures.record_table("selavpr-local-features", [
        {"id": "ms-per-query", "values": [features[13], features[29], features[61]]},
        {"id": "vs-13x13", "values": [1, features[29] / base, features[61] / base]}], command, machine)
    # this part always runs on the CPU (see --device)
    readme_figures.record_table("selavpr-faiss", [
        {"id": str(size), "values": [found["torch"], found["faiss"], found["faiss"] / found["torch"]]}
        for size, found in knn.items()], command, readme_figures.machine_phrase())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database", type=int, default=10_000, help="database descriptors for global search")
    p.add_argument("--dim", type=int, default=1024, help="global descriptor width (ViT-L: 1024)")
    p.add_argument("--map-side", type=int, default=61, help="local map side (official 61)")
    p.add_argument("--local-dim", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--queries", type=int, default=2, help="queries per timed call (re-ranking)")
    p.add_argument("--queries-knn", type=int, default=100, help="queries per timed call (k-NN search)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="where part 1 runs (cpu or cuda); parts 2 and 3 stay on the CPU")
    p.add_argument("--record", action="store_true",
                   help="also write the README's three tables into eval/results/selavpr_*.json; then "
                        "readme_figures.py --write")
    args = p.parse_args(argv)
    print(f"visadapt SelaVPR retrieval benchmark, {datetime.date.today()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    torch.manual_seed(0)
    retrieval = rerank_vs_global(args)
    features = rerank_vs_features(args)
    knn = knn_backends(args)
    if args.record:
        record(args, sys.argv[1:] if argv is None else argv, retrieval, features, knn)


if __name__ == "__main__":
    main()
