"""MoSA side by side in one run: trainer memory of the one-tensor form vs a plain adapter vs the N-copy form,
and inference latency of the merged MoSA adapter vs a plain adapter (and the unmerged eval path).

    python eval/bench/mosa.py                          # ViT-B/16 shapes for memory, ViT-S/16 at 96 px for time
    python eval/bench/mosa.py --record                 # also writes the README's two tables (eval/results/mosa_*.json)

1. **Trainer memory**: bytes of trainable parameters, AdamW state after one step and the adapter's buffers
   (masks, frozen initial values), for the three official recipes on ViT-B/16 (random init: only shapes
   matter). "N-copy" is the official layout, rebuilt here: N full copies of each split matrix and of its bias,
   N float masks of the matrix's shape and a merged copy (``vit_mosa.py`` keeps ``adapter_up[i]`` with a
   ``.mask`` each plus ``adapter_up_merge``). Activation memory is the same in all three (one module per pass).
2. **Latency**: median ms of one no-grad forward: the backbone alone, a plain adapter of the same shape,
   MoSA in eval mode without merging (merged weights computed on the fly each call) and MoSA after
   :func:`visadapt.merge` (a plain adapter: the ratio to the plain adapter should be 1.00).
3. **Training step**: forward + backward + AdamW of MoSA (two passes for the consistency term, the official
   default) and with ``consistency_weight=0``, against the plain adapter.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import visadapt
from visadapt.plugins.mosa import SparseModulesLinear

RECIPES = {  # official scripts: scripts/mosa/vit/{VTAB,FGVC}/*.sh
    "VTAB-1k (r 16, N 4, split up)": {"dim": 16, "num_modules": 4, "split": ("up",)},
    "FGVC (r 64, N 4, split up)": {"dim": 64, "num_modules": 4, "split": ("up",)},
    "multi-task (r 64, N 2, split both)": {"dim": 64, "num_modules": 2, "split": ("down", "up")},
}
# row ids of the README tables (eval/results/mosa_memory.json, mosa_timing.json)
RECIPE_ROWS = dict(zip(RECIPES, ("vtab-1k", "fgvc", "multi-task")))
LATENCY_ROWS = {"backbone": "inference-backbone", "plain adapter": "inference-plain",
                "MoSA merged": "inference-mosa-merged", "MoSA eval, unmerged": "inference-mosa-unmerged"}
STEP_ROWS = {"plain adapter": "step-plain", "MoSA, consistency 1.0": "step-mosa-consistency-1",
             "MoSA, consistency 0": "step-mosa-consistency-0"}


class OfficialNCopyLinear(nn.Module):
    """The official memory layout of one split layer: N weight and bias copies, N float masks, a merged copy."""

    def __init__(self, layer: SparseModulesLinear):
        super().__init__()
        n = layer.num_modules
        self.weights = nn.ParameterList([nn.Parameter(layer.module_weight(i).detach().clone()) for i in range(n)])
        self.biases = nn.ParameterList([nn.Parameter(layer.bias_modules[i].detach().clone()) for i in range(n)])
        self.register_buffer("masks", torch.stack([(layer.owner == i).float() for i in range(n)]))
        self.merged = nn.Linear(layer.in_features, layer.out_features).requires_grad_(False)
        self.index = 0

    def forward(self, x):
        if not self.training:
            return self.merged(x)
        self.index = (self.index + 1) % len(self.weights)
        return F.linear(x, self.weights[self.index], self.biases[self.index])


def _to_n_copy(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SparseModulesLinear):
                setattr(module, name, OfficialNCopyLinear(child))
    return model


def trainer_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(trainable parameter bytes, AdamW state bytes, adapter buffer bytes) after one training step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    buffers = [b for n, b in model.named_buffers() if "visadapt_" in n]
    head = sum(p.numel() * 4 for p in model.get_submodule("head").parameters())
    return nbytes(params) - head, nbytes(state) - 2 * head, nbytes(buffers)


def memory_table(args) -> dict[str, tuple[float, float, float]]:
    """Prints and returns the MB of (plain adapter, MoSA, N-copy) per recipe."""
    print(f"\n1. trainer memory, {args.memory_model} (MB; trainable params + AdamW state + adapter buffers, "
          f"head excluded)")
    print(f"{'recipe':<36}{'plain adapter':>14}{'MoSA (visadapt)':>17}{'N-copy (official)':>19}"
          f"{'visadapt/plain':>16}{'N-copy/visadapt':>17}")
    x = torch.randn(1, 3, 224, 224)
    table = {}
    for label, recipe in RECIPES.items():
        totals = []
        for form in ("plain", "mosa", "n-copy"):
            torch.manual_seed(0)
            model = timm.create_model(args.memory_model, pretrained=False, num_classes=10)
            if form == "plain":
                visadapt.attach(model, "adapter", bottleneck=recipe["dim"], activation="gelu", layer_norm=True,
                                head="head")
            else:
                visadapt.attach(model, "mosa", head="head", **recipe)
                if form == "n-copy":
                    _to_n_copy(model)
            totals.append(sum(trainer_bytes(model, x)) / 2**20)
        plain, mosa, ncopy = totals
        print(f"{label:<36}{plain:>14.2f}{mosa:>17.2f}{ncopy:>19.2f}{mosa / plain:>16.2f}{ncopy / mosa:>16.2f}x")
        table[label] = (plain, mosa, ncopy)
    return table


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def interleaved_ms(calls: dict, args, repeats: int) -> dict[str, float]:
    """Median ms per call of each ``calls[name]()``, after ``args.warmup`` untimed calls each; timed in
    ``args.rounds`` interleaved rounds so drift in machine speed hits every configuration alike."""
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    timings = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            timings[name].append(_median_ms(call, repeats))
    return {name: statistics.median(values) for name, values in timings.items()}


def print_against(medians: dict[str, float], reference: str, digits: int) -> None:
    for name, ms in medians.items():
        print(f"{name:<24}{ms:>9.{digits}f} ms   vs {reference} {ms / medians[reference]:>5.2f}")


def latency_table(args) -> dict[str, float]:
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    calls = {}
    for name in ("backbone", "plain adapter", "MoSA eval, unmerged", "MoSA merged"):
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img_size)
        if name == "plain adapter":
            visadapt.attach(model, "adapter", bottleneck=args.dim, activation="gelu", layer_norm=True)
        elif name.startswith("MoSA"):
            visadapt.attach(model, "mosa", dim=args.dim)
            if name == "MoSA merged":
                visadapt.merge(model)
        model.eval()
        calls[name] = lambda m=model: m(x)
    with torch.inference_mode():
        medians = interleaved_ms(calls, args, args.repeats)
    print(f"\n2. inference latency, {args.model} at {args.img_size} px, batch {args.batch_size}, dim {args.dim} "
          f"(median ms of {args.rounds} x {args.repeats} forwards)")
    print_against(medians, "plain adapter", digits=2)
    return medians


def step_table(args) -> dict[str, float]:
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    configs = {"plain adapter": None, "MoSA, consistency 1.0": 1.0, "MoSA, consistency 0": 0.0}
    calls = {}
    for name, weight in configs.items():
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img_size)
        if weight is None:
            config = visadapt.attach(model, "adapter", bottleneck=args.dim, activation="gelu", layer_norm=True,
                                     head="head")
        else:
            config = visadapt.attach(model, "mosa", dim=args.dim, consistency_weight=weight, head="head")
        plugin = visadapt.api.get_record(model, "default").plugin
        optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=1e-3)
        model.train()

        def step(model=model, plugin=plugin, optimizer=optimizer, config=config):
            plugin.training_loss(model, config, x, y, F.cross_entropy).backward()
            optimizer.step()
            optimizer.zero_grad()

        calls[name] = step
    medians = interleaved_ms(calls, args, max(1, args.repeats // 2))
    print(f"\n3. training step (forward + backward + AdamW), {args.model} at {args.img_size} px, batch "
          f"{args.batch_size}")
    print_against(medians, "plain adapter", digits=1)
    return medians


def record(memory: dict, latency: dict, steps: dict, argv: list[str]) -> None:
    """The README's two MoSA tables (blocks mosa-memory, mosa-timing) from one run."""
    import readme_figures  # beside this script (eval/bench/), imported only to record

    command = readme_figures.bench_command("mosa.py", argv)
    readme_figures.record_table("mosa-memory", [
        {"id": RECIPE_ROWS[label], "values": [plain, mosa, ncopy, mosa / plain, ncopy / mosa]}
        for label, (plain, mosa, ncopy) in memory.items()], command)
    rows = [{"id": LATENCY_ROWS[name], "values": [ms, ms / latency["plain adapter"]]} for name, ms in latency.items()]
    rows += [{"id": STEP_ROWS[name], "values": [ms, ms / steps["plain adapter"]]} for name, ms in steps.items()]
    readme_figures.record_table("mosa-timing", rows, command)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-model", default="vit_base_patch16_224")
    p.add_argument("--model", default="vit_small_patch16_224", help="model for the timings")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--record", action="store_true",
                   help="also write the README's two tables into eval/results/mosa_memory.json and "
                        "mosa_timing.json (not with --skip-memory); then readme_figures.py --write")
    args = p.parse_args(argv)
    if args.record and args.skip_memory:
        p.error("--record writes the memory table too; drop --skip-memory")
    print(f"visadapt MoSA benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    memory = memory_table(args) if not args.skip_memory else {}
    latency = latency_table(args)
    steps = step_table(args)
    if args.record:
        record(memory, latency, steps, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
