"""The ranking adapter's pair branch: time and memory against the list size N, side by side in one run.

    python eval/bench/ranking_pairs.py               # ViT-B/32-like shapes: D 512, 49 tokens, 8 heads, 16 queries
    python eval/bench/ranking_pairs.py --record      # also writes the README table (eval/results/ranking_pairs.json)

The relational attention scores every ordered pair of a list: N^2 pairs. Three ways, each a forward and
backward pass of the branch (relational attention + pair head) on fused tokens ``(N, P, D)``:

* **literal, all pairs**: the official computation, concatenating each pair's 2P tokens (``RelationalAttention.
  literal``): memory ~ N^2 * 2P * D.
* **factorised, all pairs**: visadapt's default, per-image softmax partial sums combined per pair: same numbers,
  memory ~ N^2 * R * D (R = 16 queries) plus N * P * D.
* **k partners**: ``pair_partners=k`` (k = 4), k random partners per image: N * k pairs, linear in N.

Memory is what autograd keeps for the backward pass (bytes of the saved tensors, counted with
``torch.autograd.graph.saved_tensors_hooks``), which is the part that grows with N and is the same on any
device. Time: median of interleaved rounds, on whatever device runs it (``--device``).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from visadapt.plugins.ranking_clip import RelationalAttention, _mlp_head, all_pairs, sampled_pairs


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn()`` builds the graph (storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--tokens", type=int, default=49, help="P, tokens per image (ViT-B/32 at 224: 7x7)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--partners", type=int, default=4)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--literal-max", type=int, default=64, help="largest N for the literal form (its memory)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--record", action="store_true",
                   help="also write the rows into eval/results/ranking_pairs.json (README block ranking-pairs); "
                        "then readme_figures.py --write")
    args = p.parse_args(argv)
    rows = []
    device = torch.device(args.device)
    torch.manual_seed(0)
    attention = RelationalAttention(args.width, args.heads, args.queries).to(device)
    head = _mlp_head(args.width, depth=3, input_norm=True).to(device)

    def run(z: torch.Tensor, pairs: torch.Tensor, literal: bool):
        def step():
            feats = (attention.literal if literal else attention)(z, pairs)
            return head(feats).sum()
        return step

    def timed(step) -> float:
        def once():
            z_grad = step()
            z_grad.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        once()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    print(f"# ranking pair branch, D {args.width}, P {args.tokens}, {args.heads} heads, {args.queries} queries; "
          f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {datetime.date.today()}")
    print(f"{'N':>4} {'pairs':>6} | {'literal ms':>10} {'MB':>8} | {'factorised ms':>13} {'MB':>8} "
          f"{'x less mem':>10} | {f'{args.partners} partners ms':>13} {'MB':>7}")
    for n in args.sizes:
        z = torch.randn(n, args.tokens, args.width, device=device, requires_grad=True)
        pairs = all_pairs(n, device)
        sampled = sampled_pairs(n, args.partners, device=device)
        fact_ms = timed(run(z, pairs, False))
        fact_mb = saved_bytes(run(z, pairs, False)) / 2**20
        part_ms = timed(run(z, sampled, False))
        part_mb = saved_bytes(run(z, sampled, False)) / 2**20
        lit_ms = lit_mb = None
        if n <= args.literal_max:
            lit_ms = timed(run(z, pairs, True))
            lit_mb = saved_bytes(run(z, pairs, True)) / 2**20
            literal = f"{lit_ms:>10.1f} {lit_mb:>8.1f}"
            ratio = f"{lit_mb / fact_mb:>10.1f}"
        else:
            literal, ratio = f"{'-':>10} {'-':>8}", f"{'-':>10}"
        # row id of the README table: "N (pairs)" slugged, e.g. 32-1-024 for "32 (1,024)"
        rows.append({"id": f"{n}-{n * n:,}".replace(",", "-"),
                     "values": [lit_ms, lit_mb, fact_ms, fact_mb, lit_mb / fact_mb if lit_mb else None, part_ms,
                                part_mb]})
        print(f"{n:>4} {n * n:>6} | {literal} | {fact_ms:>13.1f} {fact_mb:>8.1f} {ratio} | "
              f"{part_ms:>13.1f} {part_mb:>7.1f}")
    if args.record:
        import readme_figures  # beside this script (eval/bench/), imported only to record

        command = readme_figures.bench_command("ranking_pairs.py", sys.argv[1:] if argv is None else argv)
        readme_figures.record_table("ranking-pairs", rows, command,
                                    machine=readme_figures.machine_phrase(args.device))


if __name__ == "__main__":
    main()
