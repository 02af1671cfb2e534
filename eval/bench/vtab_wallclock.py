"""Wall-clock time of the whole VTAB-1k protocol for one method, end to end, on a synthetic suite.

The suite (``eval/bench/synthetic_vtab.py``: the NOAH layout, real JPEGs at the tasks' usual stored sizes,
1,000 training images per task and VTAB-1k's test split sizes, about 388k test images at ``--scale 1``) is
generated beforehand and not timed. Then ``train/vtab.py`` runs as a user runs it, in its own process, over all
19 tasks (train800val200 -> test, ``--epochs`` each), and the clock covers everything that process does: start-up,
building the decoded-image caches (a fresh cache folder per run, so the builds are always included; a test split
is cached only when the run evaluates it more than once), training, and evaluating the test split — once at the
end (the final-epoch protocol), then again with ``--eval-every 10`` on a GPU (the best-of-evaluations convention,
ten passes over every test split at 100 epochs) or every epoch of the CPU default's 2.

    python eval/bench/vtab_wallclock.py                          # 2-core CPU: embedded tiny ViT, --scale 0.01
    python eval/bench/vtab_wallclock.py --device cuda --scale 1  # GPU: ViT-B/16 at 224, 100 epochs, --compile
    python eval/bench/vtab_wallclock.py --device cpu --record    # also writes the README table (the CPU run)

Printed: the wall time of each run, the part spent in each task's ``fit`` (``metrics.json`` ``wall_time_s``),
the rest (start-up, cache builds, writing results), and training images per second over the whole run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval" / "bench"))
from children import ChildFailed, output_tail, run_child
from machine import describe
from synthetic_vtab import VTAB1K_TEST_SIZES, make_synthetic_vtab, suite_size

# What each device runs by default: the protocol's model and resolution on a GPU; the embedded tiny ViT at its
# own 32 px on a CPU, where ViT-B/16 at 224 would take days.
DEVICE_DEFAULTS = {
    "cuda": {"model": "vit_base_patch16_224.augreg_in21k", "pretrained": "none", "input_size": 224,
             "epochs": 100, "scale": 1.0, "batch_size": 64, "eval_every": "end,10"},
    "cpu": {"model": "visadapt_procvit_tiny", "pretrained": "default", "input_size": 32, "epochs": 2,
            "scale": 0.01, "batch_size": 64, "eval_every": "end,1"},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--root", default=None, help="where the synthetic suite is (generated if missing; default: "
                                                "/tmp/visadapt-synthetic-vtab-<scale>)")
    p.add_argument("--scale", type=float, default=None, help="test split sizes x scale (training stays 1,000 "
                                                              "images per task); default 1 on cuda, 0.01 on cpu")
    p.add_argument("--tasks", default="all", help="comma-separated VTAB-1k tasks, or all (the protocol)")
    p.add_argument("--model", default=None)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="default 100 on cuda (the protocol), 2 on cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--adapter", default="adapter", help="the method (default: AdaptFormer-style adapter)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="train with --compile (default on cuda)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--eval-every", default=None,
                   help="comma-separated runs: 'end' evaluates once at the end; N every N epochs (default "
                        "end,10 on cuda: the protocol's 10 evaluations in 100 epochs; end,1 on cpu, whose 2 epochs "
                        "then evaluate twice)")
    p.add_argument("--output-dir", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--workers", type=int, default=None, help="processes generating the suite")
    p.add_argument("--record", action="store_true",
                   help="also write the README table (block vtab-wallclock: evaluation at the end and every "
                        "epoch) into eval/results/vtab_wallclock.json; then readme_figures.py --write")
    args = p.parse_args(argv)
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile is None:
        args.compile = args.device == "cuda"
    args.root = Path(args.root or f"/tmp/visadapt-synthetic-vtab-{args.scale:g}")
    return args


def run_protocol(args: argparse.Namespace, tasks: list[str], eval_every: int, out: Path,
                 timeout: float | None = None) -> dict:
    """One end-to-end ``train/vtab.py`` run in its own process; returns timings from the clock and metrics.json.
    Raises :class:`children.ChildFailed` when the run fails, ``subprocess.TimeoutExpired`` after ``timeout`` s."""
    cache = out / "cache"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(ROOT / "train" / "vtab.py"), "--benchmark", "vtab", "--data-root", str(args.root),
               "--task", *tasks, "--model", args.model, "--pretrained", args.pretrained,
               "--input-size", str(args.input_size), "--adapter", args.adapter, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--eval-every", str(eval_every), "--output-dir", str(out / "run"),
               "--cache-dir", str(cache), "--no-progress"]
    if args.compile:
        command.append("--compile")
    env = {**os.environ}
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    start = time.perf_counter()
    done = run_child(command, timeout, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise ChildFailed(f"train/vtab.py failed ({done.returncode}):\n{output_tail(done)}")
    metrics = [json.loads((out / "run" / task / "metrics.json").read_text()) for task in tasks]
    return {"wall_s": wall, "fit_s": sum(m["wall_time_s"] for m in metrics),
            "train_images": sum(m["images"]["train800val200"]["images"] for m in metrics) * args.epochs,
            "test_images": sum(m["eval_samples"] for m in metrics), "precision": metrics[0]["precision"],
            "evaluations": len([h for h in metrics[0]["history"] if "accuracy" in h]),
            "mean_accuracy": sum(m["accuracy_final"] for m in metrics) / len(metrics)}


def main(argv=None) -> None:
    args = parse_args(argv)
    tasks = list(VTAB1K_TEST_SIZES) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(VTAB1K_TEST_SIZES))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(VTAB1K_TEST_SIZES)} or all")
    runs = []
    for item in args.eval_every.split(","):
        item = item.strip()
        if item != "end" and not (item.isdigit() and int(item) > 0):
            raise SystemExit(f"--eval-every item {item!r}: use 'end' or a positive number of epochs")
        runs.append((item, args.epochs if item == "end" else int(item)))

    start = time.perf_counter()
    make_synthetic_vtab(args.root, scale=args.scale, tasks=tasks, workers=args.workers)
    print(f"synthetic suite at {args.root}: {suite_size(args.scale, tasks):,} images "
          f"(ready in {time.perf_counter() - start:.0f} s, not timed)")
    out_root = Path(args.output_dir) if args.output_dir else Path(f"/tmp/visadapt-vtab-wallclock-{os.getpid()}")
    results = []
    try:
        for label, every in runs:
            print(f"running {len(tasks)} tasks x {args.epochs} epochs, evaluation {label} ...", flush=True)
            try:
                results.append((label, every, run_protocol(args, tasks, every, out_root / f"eval_{label}")))
            except ChildFailed as err:
                raise SystemExit(str(err)) from None
    finally:
        if not args.output_dir:
            shutil.rmtree(out_root, ignore_errors=True)

    print(f"\nVTAB-1k protocol, {len(tasks)} tasks, {args.adapter} on {args.model} at {args.input_size} px, "
          f"{args.epochs} epochs, batch {args.batch_size}, test x {args.scale:g}"
          f"{', --compile' if args.compile else ''}")
    print(f"{describe()}; {datetime.date.today()}")
    print("\n| evaluation | evaluations | wall s | in fit s | start-up + caches + writing s | train imgs/s (whole run) "
          "| test images per evaluation | precision | vs 'end' |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    base = results[0][2]["wall_s"]
    for label, every, r in results:
        name = "once at the end" if label == "end" else f"every {every} epochs"
        print(f"| {name} | {r['evaluations']} | {r['wall_s']:.1f} | {r['fit_s']:.1f} | {r['wall_s'] - r['fit_s']:.1f} | "
              f"{r['train_images'] / r['wall_s']:,.0f} | {r['test_images']:,} | {r['precision']} | "
              f"{r['wall_s'] / base:.2f}x |")
    print(f"\n(mean final accuracy {results[0][2]['mean_accuracy']:.1f}%: the synthetic images are not meant to be "
          "learnable; the figure only shows every task ran to the end)")
    if args.record:
        import readme_figures  # beside this script (eval/bench/), imported only to record

        # README row ids: "end", "every-N"; the cells after the label as printed above, without precision
        readme_figures.record_table("vtab-wallclock", [
            {"id": "end" if label == "end" else f"every-{every}",
             "values": [r["evaluations"], r["wall_s"], r["fit_s"], r["wall_s"] - r["fit_s"],
                        r["train_images"] / r["wall_s"], r["test_images"], r["wall_s"] / base]}
            for label, every, r in results],
            readme_figures.bench_command("vtab_wallclock.py", sys.argv[1:] if argv is None else argv),
            readme_figures.machine_phrase(args.device))


if __name__ == "__main__":
    main()
