"""Polyhistor side by side in one run: trainable parameters and training step time against one bottleneck
adapter per task, for the same four dense tasks.

    python eval/bench/polyhistor.py                 # Swin-T counts (formula) + embedded Swin step time on CPU
    python eval/bench/polyhistor.py --batch 32 --steps 10 --device cuda
    python eval/bench/polyhistor.py --record        # also writes the README's two tables (eval/results/polyhistor_*.json)

1. **Parameters at Swin-T scale** (stages 96/192/384/768, depths 2/2/6/2, 4 tasks, rho 16; nothing is built):
   the adapters of Polyhistor and Polyhistor-Lite from :func:`visadapt.plugins.polyhistor.parameter_count`,
   against 4 x a plain adapter (``adapter`` plugin, Pfeiffer placement, bottleneck = width // 16), at the
   probable authors' code defaults (d_t 512, hidden 128, d_p 64) and with 64-wide embeddings. The paper's claim:
   about 10% of the trainable parameters of the methods it matches.
2. **Measured on the embedded Swin** (``visadapt_procswin_tiny``, 64 px, the train/dense.py recipe for it):
   trainable parameters (adapter / all, decoders included) and the median time of one training step (forward of
   every task, weighted loss, backward, AdamW) of :class:`visadapt.dense.MultiTaskDenseModel` for each method,
   with ratios to the per-task adapters measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from visadapt.backbones import EMBEDDED_SWIN, create_backbone
from visadapt.data.dense import SCENE_TASK_OUTPUTS
from visadapt.dense import (
    MTLORA_LOSS_WEIGHTS,
    MultiTaskDenseModel,
    attach_dense_method,
    benchmark_plugin_fields,
    dense_loss,
)
from visadapt.plugins.adapter import BottleneckAdapterConfig
from visadapt.plugins.polyhistor import PolyhistorConfig, parameter_count

SWIN_T = {"stage_widths": (96, 192, 384, 768), "depths": (2, 2, 6, 2)}
TASKS = tuple(SCENE_TASK_OUTPUTS)
METHODS = ("per-task", "lite", "polyhistor", "shared", "decoder")


def per_task_adapter_count(widths, depths, rho: int, num_tasks: int) -> int:
    """Parameters of ``num_tasks`` plain adapters (down + up with biases, no LayerNorm) after every block's MLP."""
    config = BottleneckAdapterConfig(style="pfeiffer", reduction_factor=rho)
    assert config.bias and not config.layer_norm  # the formula below assumes the plugin's defaults
    per_task = sum(depth * (2 * width * (width // rho) + width // rho + width) for width, depth in zip(widths, depths))
    return num_tasks * per_task


def swin_t_table() -> tuple[str, list[dict]]:
    """The Swin-T count table as markdown, and its rows for ``--record`` (ids of the README's table)."""
    baseline = per_task_adapter_count(SWIN_T["stage_widths"], SWIN_T["depths"], 16, len(TASKS))
    lines = ["| Swin-T, 4 tasks, rho 16 | adapter params | vs 4 x adapter |", "|---|---:|---:|",
             f"| 4 x adapter (per task) | {baseline:,} | 1.000 |"]
    rows = [{"id": "per-task", "values": [baseline, 1.0]}]
    for label, fields in (("code defaults (d_t 512)", {}), ("d_t 64", {"task_embedding_dim": 64})):
        for variant in ("polyhistor", "lite"):
            config = PolyhistorConfig(tasks=TASKS, variant=variant, **fields)
            total = parameter_count(config, SWIN_T["stage_widths"], SWIN_T["depths"], len(TASKS))["total"]
            name = "Polyhistor" if variant == "polyhistor" else "Polyhistor-Lite"
            lines.append(f"| {name}, {label} | {total:,} | {total / baseline:.3f} |")
            rows.append({"id": f"{variant}-{config.task_embedding_dim}", "values": [total, total / baseline]})
    return "\n".join(lines), rows


def build(method: str, device: torch.device) -> MultiTaskDenseModel:
    backbone = create_backbone(EMBEDDED_SWIN, "default", num_classes=0)
    # train/dense.py's plugin fields for the embedded Swin (the scenes benchmark)
    select, _ = attach_dense_method(backbone, method, TASKS, benchmark_plugin_fields(method, TASKS, "scenes", {}))
    return MultiTaskDenseModel(backbone, SCENE_TASK_OUTPUTS, select).to(device)


def stepper(model: MultiTaskDenseModel, batch: dict):
    """A function that runs one training step of ``model`` on ``batch`` (forward of every task, weighted loss,
    backward, AdamW) and returns its seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def step() -> float:
        if batch["image"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = dense_loss(model(batch["image"]), batch, MTLORA_LOSS_WEIGHTS)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if batch["image"].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def random_batch(size: int, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=g), dim=1)
    sample = {"image": torch.randn(batch, 3, size, size, generator=g),
              "semseg": torch.randint(0, SCENE_TASK_OUTPUTS["semseg"], (batch, size, size), generator=g),
              "human_parts": torch.randint(0, SCENE_TASK_OUTPUTS["human_parts"], (batch, size, size), generator=g),
              "sal": torch.randint(0, 2, (batch, size, size), generator=g), "normals": normals}
    return {k: v.to(device) for k, v in sample.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to time (per-task, the reference of the ratios, is always included)")
    parser.add_argument("--record", action="store_true",
                        help="also write the README's two tables into eval/results/polyhistor_size.json and "
                             "polyhistor_timing.json (all methods); then readme_figures.py --write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    table, size_rows = swin_t_table()
    print(table)
    batch = random_batch(64, args.batch, device)
    counts, steppers = {}, {}
    for method in ["per-task"] + [m for m in args.methods if m != "per-task"]:
        torch.manual_seed(0)
        model = build(method, device)
        counts[method] = model.trainable_parameter_counts()
        steppers[method] = stepper(model, batch)
    # the methods take turns step by step, so load from other processes hits them alike
    for _ in range(args.warmup):
        for step in steppers.values():
            step()
    samples: dict[str, list[float]] = {method: [] for method in steppers}
    for _ in range(args.steps):
        for method, step in steppers.items():
            samples[method].append(step())
    rows = {method: (counts[method].adapter, counts[method].total, statistics.median(samples[method]))
            for method in steppers}
    base_adapter, _, base_time = rows["per-task"]
    print(f"\n| embedded Swin, 64 px, batch {args.batch} | adapter params | vs per-task | all trainable | "
          f"step ms | vs per-task |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, (adapter, total, seconds) in rows.items():
        ratio = f"{adapter / base_adapter:.3f}" if base_adapter else "-"
        print(f"| {method} | {adapter:,} | {ratio} | {total:,} | {1000 * seconds:.1f} | {seconds / base_time:.2f} |")
    if args.record:
        import readme_figures  # beside this script (eval/bench/), imported only to record

        command = readme_figures.bench_command("polyhistor.py", sys.argv[1:] if argv is None else argv)
        readme_figures.record_table("polyhistor-size", size_rows, command)
        readme_figures.record_table("polyhistor-timing", [
            {"id": method, "values": [adapter, adapter / base_adapter if base_adapter else None, total,
                                      1000 * seconds, seconds / base_time]}
            for method, (adapter, total, seconds) in rows.items()], command,
            readme_figures.machine_phrase(args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"\n{device.type} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{datetime.date.today()}; median of {args.steps} steps after {args.warmup} warm-up, methods interleaved")


if __name__ == "__main__":
    main()
