"""Every GPU figure the README leaves unmeasured, in one prepared call: one JSON and one markdown table.

Run it first on any machine with a GPU (an H100: under 9 minutes, all parts), then copy the tables into the README
sections each part names:

    python eval/bench/gpu_suite.py --out runs/gpu-suite          # CUDA required; writes gpu_suite.{json,md}
    python eval/bench/gpu_suite.py --dry-run --out /tmp/gs       # CPU: the same code paths, tiny sizes (CI)
    python eval/bench/gpu_suite.py --list                        # the parts, their README sections and time caps
    python eval/bench/gpu_suite.py --only train,loader           # some parts (the data they need is prepared)

Parts, in the order they run (each calls the bench script that owns the measurement; nothing is re-implemented):

* ``prepare``: the synthetic VTAB-1k suite (``synthetic_vtab.py``: real JPEGs at each task's stored size) that
  ``train``, ``loader`` and ``vtab`` read; written once into ``--work-dir`` and reused by later runs, not a figure.
* ``train``: ``train_throughput.py``'s variants, each in its own process through ``visadapt.engine.fit``: the
  reference style (fp32, eager attention, JPEGs decoded every epoch), visadapt's default (bf16 autocast, SDPA,
  the decoded-image cache), and one change at a time: fp32, eager attention, xformers (when its kernels run
  here, else skipped with the probe's reason), ``--compile``; PEFT LoRA at the nearest budget; the linear probe.
* ``loader``: ``dataloader.py``'s loader alone (decode every epoch vs the cache, several worker counts) and its
  ratio to the fastest AdaptFormer training rate ``train`` measured (above 1: the GPU, not the loader, limits).
* ``diffusers``: ``diffusers_overhead.py`` on the SD1.5 UNet built from its config (random weights, nothing
  downloaded), bf16, 512 px, batch 2: base / visadapt unfused, fused / PEFT unfused, fused, three scenarios.
* ``vtab``: ``vtab_wallclock.py`` reduced: all 19 tasks through ``train/vtab.py`` as a user runs it (start-up and
  cache builds included), ViT-B/16 at 224, 3 epochs, test splits x 0.01, evaluated once at the end; the
  100-epoch figure is given as a labelled linear estimate next to the measured one.
* ``vpr``: ``selavpr.py``'s re-ranking of the top k with the official 61x61x128 local maps on the GPU, per query.
* ``lora_overhead``: ``overhead.py`` on CUDA: LoRA merged vs unmerged inference, visadapt vs PEFT training steps.

Each part has a time cap (``--list``; ``--cap PART=SECONDS`` changes one) and the whole run one (``--total-cap``).
A cap ends the part where it is: the unit running is stopped (a child process with its whole process group), the
units left are recorded as skipped with the reason, and the next part starts. The JSON and the markdown are
rewritten after every unit, so a run stopped from outside still leaves everything measured so far. Every figure
carries the README section it fills; both files carry the machine, GPU, driver, CUDA, torch and the date.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval" / "bench"))

import torch
from machine import cpu_name

SPEED_SECTION = "Benchmarks > Speed: training, data loading and adapter overhead"
JSON_NAME, MARKDOWN_NAME = "gpu_suite.json", "gpu_suite.md"
DRY_RUN_NOTE = ("DRY RUN on the CPU: tiny models and 1-2 iterations, to keep the script working; these numbers "
                "measure nothing")


class PartTimeCap(BaseException):
    """A part's time cap passed. A BaseException, so that library code catching ``Exception`` cannot swallow it."""


@dataclasses.dataclass
class Unit:
    """One measurement of a part: ``measure()`` returns its figures (one row named ``name``) or a list of
    ``(row name, figures)``; ``skip`` set means it is not run, for that reason."""

    name: str
    measure: Callable[[], dict | list[tuple[str, dict]]] | None = None
    skip: str | None = None


@dataclasses.dataclass
class Column:
    """A markdown column: ``header`` and ``cell(figures) -> str`` (a missing figure shows as "-")."""

    header: str
    cell: Callable[[dict], str]


def number(key: str, digits: int = 1, suffix: str = "") -> Callable[[dict], str]:
    """A cell showing ``figures[key]`` with thousands separators and ``digits`` decimals."""
    def cell(figures: dict) -> str:
        value = figures.get(key)
        return "-" if value is None else f"{value:,.{digits}f}{suffix}"
    return cell


def text(key: str) -> Callable[[dict], str]:
    def cell(figures: dict) -> str:
        value = figures.get(key)
        return "-" if value is None else str(value).replace("|", "/")
    return cell


@dataclasses.dataclass
class Part:
    """One group of figures: where they go in the README, its time caps, how its units are planned, the table."""

    name: str
    readme: str                    # the README section (and table) the figures fill
    description: str
    cap_s: float                   # time cap on a GPU
    dry_cap_s: float               # time cap of --dry-run
    plan: Callable[[PartRun], list[Unit]]
    columns: list[Column]
    needs_data: bool = False
    finish: Callable[[PartRun], None] | None = None   # derived figures (ratios) after the units ran


class PartRun:
    """A part while it runs: its settings, the suite's shared state, the time left, and its results
    (``self.result``, the part's entry in the JSON)."""

    def __init__(self, suite: Suite, part: Part, cap_s: float):
        self.suite, self.part, self.cap_s = suite, part, cap_s
        self.settings: dict = dict(SETTINGS[suite.mode].get(part.name, {}))
        self.deadline = time.monotonic() + cap_s
        self.cleanup: Callable[[], None] | None = None  # frees what the part's units shared (models on the GPU)
        self.result: dict = {"readme_section": part.readme, "description": part.description, "cap_s": cap_s,
                             "settings": self.settings, "status": "running", "reason": None, "wall_s": None, "cpu_s": None,
                             "rows": [], "notes": []}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def rows(self, status: str = "measured") -> dict[str, dict]:
        return {row["name"]: row["figures"] for row in self.result["rows"] if row["status"] == status}

    def add_row(self, name: str, status: str, figures: dict | None = None, reason: str | None = None) -> None:
        self.result["rows"].append({"name": name, "status": status, "reason": reason, "figures": figures or {}})

    def note(self, line: str) -> None:
        self.result["notes"].append(line)


@contextlib.contextmanager
def alarm_after(seconds: float):
    """Raise :class:`PartTimeCap` in this (main) thread once ``seconds`` have passed inside the block."""
    def fire(_signum, _frame):
        raise PartTimeCap
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def run_part(run: PartRun, save: Callable[[], None]) -> None:
    """Run ``run``'s units under its time cap, recording each (measured, skipped with its reason, or failed with
    its error) and calling ``save`` after each; a cap stops the part and records the units left as skipped."""
    started, cpu_started = time.monotonic(), os.times()
    cap_reason = f"the part's time cap of {run.cap_s:.0f} s was reached"
    pending: list[Unit] = []
    try:
        with alarm_after(run.remaining()):
            pending = list(run.part.plan(run))
            while pending:
                unit = pending[0]
                if unit.skip:
                    run.add_row(unit.name, "skipped", reason=unit.skip)
                else:
                    try:
                        measured = unit.measure()
                    except subprocess.TimeoutExpired:  # a child process ran into the cap: the same as the alarm
                        raise PartTimeCap from None
                    except PartTimeCap:
                        raise
                    except Exception as err:  # noqa: BLE001 - one failed measurement must not cost the others
                        run.add_row(unit.name, "failed", reason=first_line(err),
                                    figures={"traceback": traceback.format_exc()[-3000:]})
                    else:
                        for name, figures in (measured if isinstance(measured, list) else [(unit.name, measured)]):
                            run.add_row(name, "measured", figures)
                pending.pop(0)
                save()
        failed = [row["name"] for row in run.result["rows"] if row["status"] == "failed"]
        run.result.update(status="failed" if failed else "complete",
                          reason=f"failed: {', '.join(failed)}" if failed else None)
    except PartTimeCap:
        if pending:
            run.add_row(pending[0].name, "stopped", reason=f"{cap_reason} during this measurement")
        for left in pending[1:]:
            run.add_row(left.name, "skipped", reason=left.skip or cap_reason)
        run.result.update(status="partial", reason=cap_reason)
    except Exception as err:  # noqa: BLE001 - planning failed (e.g. a library is missing): the next part runs
        run.result.update(status="failed", reason=first_line(err))
        run.note(traceback.format_exc()[-3000:])
    finally:
        if run.part.finish is not None:
            try:
                run.part.finish(run)
            except Exception as err:  # noqa: BLE001 - derived figures are extras; the measured ones stand
                run.note(f"derived figures failed: {first_line(err)}")
        if run.cleanup is not None:
            run.cleanup()
        run.result["wall_s"] = round(time.monotonic() - started, 2)
        cpu = [now - before for now, before in zip(os.times(), cpu_started, strict=False)][:4]
        run.result["cpu_s"] = round(sum(cpu), 2)  # user + system, of this process and its finished children
        save()


# ------------------------------------------------------------------------------------------------ settings

def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


TRAIN_ORDER = ("visadapt", "reference style", "visadapt --compile", "PEFT LoRA", "visadapt fp32", "visadapt eager",
               "visadapt xformers", "linear probe")
DRY_RUN_TRAIN = ("visadapt", "reference style")
# The tests' tiny SD-layout UNet (tests/tiny_models.py): the dry run's stand-in for SD1.5.
TINY_UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16, "attention_head_dim": 8, "norm_num_groups": 8,
}
SETTINGS = {
    "gpu": {
        "prepare": {"tasks": "all", "scale": 0.01, "image_size": "native"},
        "train": {"model": "vit_base_patch16_224", "input_size": 224, "batch_size": 128, "train_images": 1000,
                  "epochs": 6, "workers": min(8, _cores()), "task": "oxford_iiit_pet", "bottleneck": 8,
                  "variants": list(TRAIN_ORDER)},
        "loader": {"task": "oxford_iiit_pet", "workers": sorted({0, min(8, _cores()), min(16, _cores())}),
                   "batch_size": 128, "input_size": 224, "epochs": 3, "repeats": 1},
        "diffusers": {"unet": "SD1.5 config (UNet2DConditionModel())", "size": 512, "dtype": "bf16", "batch": 2,
                      "repeats": 30, "warmup": 5, "scenarios": ["attn", "attn+conv", "resadapter"]},
        "vtab": {"tasks": "all", "model": "vit_base_patch16_224.augreg_in21k", "pretrained": "none",
                 "input_size": 224, "epochs": 3, "batch_size": 64, "eval_every": "end", "compile": False,
                 "adapter": "adapter"},
        "vpr": {"database": 10_000, "dim": 1024, "map_side": 61, "local_dim": 128, "ks": [10, 20, 50, 100],
                "queries": 2, "rounds": 5},
        "lora_overhead": {"model": "vit_base_patch16_224", "img_size": 224, "batch_size": 64, "rank": 8,
                          "steps": 20, "warmup": 5},
    },
    "dry-run": {
        "prepare": {"tasks": "oxford_iiit_pet,svhn", "scale": 0.001, "image_size": 16},
        "train": {"model": "vit_tiny_patch16_224", "input_size": 32, "batch_size": 8, "train_images": 16,
                  "epochs": 3, "workers": 0, "task": "oxford_iiit_pet", "bottleneck": 4,
                  "variants": list(TRAIN_ORDER)},
        "loader": {"task": "svhn", "workers": [0], "batch_size": 16, "input_size": 32, "epochs": 1, "repeats": 1},
        "diffusers": {"unet": "tiny SD layout (16/32)", "size": 64, "dtype": "fp32", "batch": 2, "repeats": 1,
                      "warmup": 1, "scenarios": ["attn", "attn+conv", "resadapter"]},
        "vtab": {"tasks": "svhn", "model": "visadapt_procvit_tiny", "pretrained": "default", "input_size": 32,
                 "epochs": 1, "batch_size": 64, "eval_every": "end", "compile": False, "adapter": "adapter"},
        "vpr": {"database": 64, "dim": 16, "map_side": 4, "local_dim": 8, "ks": [2, 4], "queries": 2, "rounds": 1},
        "lora_overhead": {"model": "vit_tiny_patch16_224", "img_size": 32, "batch_size": 2, "rank": 2,
                          "steps": 1, "warmup": 1},
    },
}


# ------------------------------------------------------------------------------------------------ the parts

def plan_prepare(run: PartRun) -> list[Unit]:
    from synthetic_vtab import make_synthetic_vtab, suite_size

    s = run.settings

    def measure() -> dict:
        started = time.perf_counter()
        make_synthetic_vtab(run.suite.data_root, scale=s["scale"], image_size=s["image_size"], tasks=s["tasks"])
        run.suite.data_ready = True
        return {"images": suite_size(s["scale"], s["tasks"]), "seconds": time.perf_counter() - started,
                "folder": str(run.suite.data_root)}
    return [Unit("synthetic VTAB-1k suite", measure)]


def _train_args(run: PartRun, device: str) -> argparse.Namespace:
    import train_throughput

    s = run.settings
    return train_throughput.parse_args([
        f"--device={device}", f"--model={s['model']}", f"--input-size={s['input_size']}",
        f"--batch-size={s['batch_size']}", f"--train-images={s['train_images']}", f"--epochs={s['epochs']}",
        f"--workers={s['workers']}", f"--bottleneck={s['bottleneck']}", f"--task={s['task']}",
        f"--root={run.suite.data_root}"])


def plan_train(run: PartRun) -> list[Unit]:
    import train_throughput

    from visadapt.attention import xformers_usable

    device = run.suite.device
    args = _train_args(run, device)
    xformers_ok, xformers_reason = xformers_usable(device, torch.bfloat16 if device == "cuda" else None)
    run.note(f"xformers probe on {device}: {xformers_reason}")

    def measure(name: str) -> Callable[[], dict]:
        def go() -> dict:
            row = train_throughput.run_variant_in_child(args, name, timeout=run.remaining())
            spec = train_throughput.VARIANTS[name]
            return {"imgs_per_s": row["imgs_per_s"], "trainable": row["trainable"], "precision": row["precision"],
                    "attention": ", ".join(f"{k} {v}" for k, v in row["attention"].items()) or "-",
                    "compiled": row["compiled"], "loader": "cache" if spec["cache"] else "decode",
                    "method": spec["method"], "lora_rank": row["rank"], "peak_gib": row["peak_bytes"] / 2**30,
                    "peak_kind": "CUDA max allocated" if device == "cuda" else "process peak RSS",
                    "epoch_s": row["epoch_s"]}
        return go

    units = []
    for name in run.settings["variants"]:
        skip = None
        if name == "visadapt xformers" and not xformers_ok:
            skip = f"xformers kernels do not run here ({xformers_reason})"
        elif run.suite.dry_run and name not in DRY_RUN_TRAIN:
            skip = (f"dry run: {len(DRY_RUN_TRAIN)} of the {len(run.settings['variants'])} variants run (each is "
                    "the same run_variant in its own process)")
        units.append(Unit(name, measure(name), skip))
    return units


def finish_train(run: PartRun) -> None:
    rows = run.rows()
    reference, lora = rows.get("reference style"), rows.get("PEFT LoRA")
    for figures in rows.values():
        if reference:
            figures["vs_reference"] = figures["imgs_per_s"] / reference["imgs_per_s"]
        if lora:
            figures["vs_peft_lora"] = figures["imgs_per_s"] / lora["imgs_per_s"]


def fastest_adapter_rate(suite: Suite) -> tuple[str, float] | None:
    """The fastest AdaptFormer variant ``train`` measured in this run: ``(name, imgs/s)``, or None."""
    train = suite.results["parts"].get("train", {})
    rates = [(row["name"], row["figures"]["imgs_per_s"]) for row in train.get("rows", [])
             if row["status"] == "measured" and row["figures"].get("method") == "adapter"]
    return max(rates, key=lambda item: item[1]) if rates else None


def plan_loader(run: PartRun) -> list[Unit]:
    import dataloader

    from visadapt.data import cache as data_cache
    from visadapt.data.transforms import resolve_normalization

    s = run.settings
    device = torch.device(run.suite.device)
    args = dataloader.parse_args([f"--batch-size={s['batch_size']}", f"--input-size={s['input_size']}",
                                  f"--epochs={s['epochs']}", f"--repeats={s['repeats']}"])
    consumer = fastest_adapter_rate(run.suite)
    if consumer:
        run.note(f"GPU step rate: {consumer[1]:,.0f} imgs/s, the fastest AdaptFormer variant of `train` "
                 f"({consumer[0]}) in this run")
    else:
        run.note("no GPU step rate: `train` measured no AdaptFormer variant in this run, so no loader/GPU ratio")
    cache_workers = data_cache.default_workers()

    def measure(workers: int, first: bool) -> Callable[[], list[tuple[str, dict]]]:
        def go() -> list[tuple[str, dict]]:
            args.keep_cache = not first  # the first unit times a fresh cache build; the others reuse it
            build, rows = dataloader.measure_task(run.suite.data_root, s["task"], args, [workers], device,
                                                  resolve_normalization("imagenet"), cache_workers)
            _task, images, _w, decode, cached, raw = rows[0]
            figures = {"images": images, "decode_imgs_per_s": decode, "cache_imgs_per_s": cached,
                       "cache_uint8_imgs_per_s": raw, "cache_vs_decode": cached / decode}
            if consumer:
                figures.update(decode_vs_gpu=decode / consumer[1], cache_vs_gpu=cached / consumer[1])
            out = [(f"{workers} workers", figures)]
            if first:
                _task, n, build_s, open_s, mib = build
                out.insert(0, ("cache build (once) and re-open", {
                    "images": n, "build_s": build_s, "build_imgs_per_s": n / build_s, "reopen_s": open_s,
                    "cache_mib": mib, "build_processes": cache_workers}))
            return out
        return go

    return [Unit(f"{w} workers", measure(w, i == 0)) for i, w in enumerate(s["workers"])]


DIFFUSERS_VARIANTS = ("base", "visadapt unfused", "visadapt fused", "PEFT unfused", "PEFT fused")


def plan_diffusers(run: PartRun) -> list[Unit]:
    import copy

    import diffusers_overhead
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    s = run.settings
    device = torch.device(run.suite.device)
    dtype = diffusers_overhead.DTYPES[s["dtype"]]
    state: dict = {}

    def build() -> dict:
        started = time.perf_counter()
        sd15 = not run.suite.dry_run
        state["base_cpu"] = diffusers_overhead.build_unet(sd15, None if sd15 else TINY_UNET_CONFIG).eval()
        state["base"] = copy.deepcopy(state["base_cpu"]).to(device, dtype)
        state["inputs"] = diffusers_overhead.unet_inputs(state["base"].config.cross_attention_dim, s["size"],
                                                         s["batch"], device, dtype)
        return {"parameters_m": sum(p.numel() for p in state["base"].parameters()) / 1e6,
                "seconds": time.perf_counter() - started}

    def scenario(name: str) -> Callable[[], dict]:
        def go() -> dict:
            measured = diffusers_overhead.measure_scenario(state["base_cpu"], state["base"], name, state["inputs"],
                                                           device, dtype, s["repeats"], s["warmup"])
            median = measured["median"]
            figures = {f"{v} ms": median[v] for v in DIFFUSERS_VARIANTS}
            figures.update({f"{v} x base": None if median[v] is None else median[v] / median["base"]
                            for v in DIFFUSERS_VARIANTS})
            figures.update(best_ms=measured["best"], adapted_modules=measured["adapted_modules"],
                           max_abs_differences=measured["max_abs_differences"])
            return figures
        return go

    def release() -> None:
        state.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    run.cleanup = release
    return [Unit("UNet built from its config", build)] + [
        Unit(name, scenario(name)) for name in s["scenarios"]]


def _vtab_args(run: PartRun) -> argparse.Namespace:
    import vtab_wallclock

    s = run.settings
    return vtab_wallclock.parse_args([
        f"--device={run.suite.device}", f"--root={run.suite.data_root}", f"--scale={SETTINGS[run.suite.mode]['prepare']['scale']}",
        f"--tasks={s['tasks']}", f"--model={s['model']}", f"--pretrained={s['pretrained']}",
        f"--input-size={s['input_size']}", f"--epochs={s['epochs']}", f"--batch-size={s['batch_size']}",
        f"--adapter={s['adapter']}", "--compile" if s["compile"] else "--no-compile",
        f"--eval-every={s['eval_every']}"])


def plan_vtab(run: PartRun) -> list[Unit]:
    import vtab_wallclock
    from synthetic_vtab import VTAB1K_TEST_SIZES

    s = run.settings
    args = _vtab_args(run)
    tasks = list(VTAB1K_TEST_SIZES) if s["tasks"] == "all" else s["tasks"].split(",")
    out = Path(run.suite.work_dir) / "vtab-runs"
    run.note(f"the 100-epoch estimate is start-up + cache builds once, plus the measured time in fit x 100 / "
             f"{args.epochs}; it leaves out the full test splits (387,904 images; here x {args.scale:g}), which the "
             "protocol evaluates at least once: a linear estimate, not a measurement")

    def measure() -> dict:
        try:
            r = vtab_wallclock.run_protocol(args, tasks, args.epochs, out / "eval_end", timeout=run.remaining())
        finally:
            shutil.rmtree(out, ignore_errors=True)
        overhead = r["wall_s"] - r["fit_s"]
        return {"tasks": len(tasks), "epochs": args.epochs, "wall_s": r["wall_s"], "fit_s": r["fit_s"],
                "startup_caches_writing_s": overhead, "train_imgs_per_s": r["train_images"] / r["wall_s"],
                "test_images": r["test_images"], "precision": r["precision"], "evaluations": r["evaluations"],
                # a linear estimate, not a measurement: start-up and caches once, training x 100 / epochs
                "estimate_100_epochs_min": (overhead + r["fit_s"] * 100 / args.epochs) / 60}
    return [Unit(f"{len(tasks)} tasks x {args.epochs} epochs, evaluated at the end", measure)]


def plan_vpr(run: PartRun) -> list[Unit]:
    import selavpr

    s = run.settings

    def measure(k: int) -> Callable[[], dict]:
        def go() -> dict:
            args = argparse.Namespace(**{key: s[key] for key in ("database", "dim", "map_side", "local_dim",
                                                                    "queries", "rounds")},
                                      ks=[k], device=run.suite.device)
            found = selavpr.rerank_vs_global(args)
            return {"k": k, "global_knn_ms": found["global_knn_ms"], "rerank_ms": found["rerank_ms"][k],
                    "rerank_vs_global": found["rerank_ms"][k] / found["global_knn_ms"]}
        return go
    return [Unit(f"re-rank top {k}", measure(k)) for k in s["ks"]]


def plan_lora_overhead(run: PartRun) -> list[Unit]:
    import overhead

    s = run.settings
    device = torch.device(run.suite.device)
    args = overhead.parse_args([f"--model={s['model']}", f"--img-size={s['img_size']}",
                                f"--batch-size={s['batch_size']}", f"--rank={s['rank']}", f"--steps={s['steps']}",
                                f"--warmup={s['warmup']}", f"--device={device.type}"])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)

    def inference() -> list[tuple[str, dict]]:
        lat = overhead.bench_latency(args, device, x)
        return [(f"inference: {'base model' if state == 'base' else 'lora q,v ' + state}",
                 {"ms": lat[state], "vs_base": lat[state] / lat["base"], "max_abs_diff": lat["max_abs_diff"]})
                for state in ("base", "unmerged", "merged")]

    def training() -> list[tuple[str, dict]]:
        res = overhead.bench_training(args, device, x, y)
        peft_ms = res["peft lora qkv"]["step_ms"]
        return [(f"training step: {config}", {"ms": r["step_ms"], "vs_peft": r["step_ms"] / peft_ms,
                                              "trainable": r["trainable"], "saved_state_mb": r["saved_state_mb"],
                                              "cuda_peak_mb": r.get("cuda_peak_mb")})
                for config, r in res.items()]
    return [Unit("inference", inference), Unit("training step", training)]


PARTS = {part.name: part for part in [
    Part("prepare", "(input of train, loader and vtab; not a README figure)",
         "synthetic VTAB-1k suite (synthetic_vtab.py), written once into --work-dir", 90, 60, plan_prepare,
         [Column("images", number("images", 0)), Column("seconds", number("seconds")),
          Column("folder", text("folder"))]),
    Part("train", f"{SPEED_SECTION}: the `train_throughput.py` table (imgs/s, vs reference, vs PEFT LoRA, peak GiB)",
         "training throughput, ViT-B/16 at 224, batch 128, variants one setting apart", 240, 120, plan_train,
         [Column("trainable params", number("trainable", 0)), Column("precision", text("precision")),
          Column("attention", text("attention")), Column("compiled", text("compiled")),
          Column("loader", text("loader")), Column("imgs/s", number("imgs_per_s")),
          Column("vs reference", number("vs_reference", 2, "x")), Column("vs PEFT LoRA", number("vs_peft_lora", 2, "x")),
          Column("peak GiB", number("peak_gib", 2))],
         needs_data=True, finish=finish_train),
    Part("loader", f"{SPEED_SECTION}: the `dataloader.py` table (loader imgs/s, cache/decode, loader/GPU)",
         "loader alone vs the GPU's training rate, 500x375 JPEGs, 224 px", 45, 60, plan_loader,
         [Column("decode imgs/s", number("decode_imgs_per_s", 0)), Column("cache imgs/s", number("cache_imgs_per_s", 0)),
          Column("cache uint8 imgs/s", number("cache_uint8_imgs_per_s", 0)),
          Column("cache/decode", number("cache_vs_decode", 1, "x")),
          Column("decode/GPU step", number("decode_vs_gpu", 2, "x")),
          Column("cache/GPU step", number("cache_vs_gpu", 2, "x")),
          Column("build s", number("build_s", 2)), Column("re-open s", number("reopen_s", 3))],
         needs_data=True),
    Part("diffusers", f"{SPEED_SECTION}: the `diffusers_overhead.py` paragraph (UNet call ms, ratio to the base UNet)",
         "SD1.5 UNet call (random weights), bf16, 512 px, batch 2, median ms (x base)", 120, 60, plan_diffusers,
         [Column("params M", number("parameters_m"))]
         + [Column(v, lambda f, v=v: "-" if f.get(f"{v} ms") is None
                   else f"{f[f'{v} ms']:.1f} ({f[f'{v} x base']:.2f}x)") for v in DIFFUSERS_VARIANTS]),
    Part("vtab", f"{SPEED_SECTION}: the `vtab_wallclock.py` table (the 19-task GPU wall clock, target under 15 "
                 "minutes for 100 epochs)",
         "VTAB-1k protocol reduced: 19 tasks x 3 epochs, test x 0.01, through train/vtab.py", 150, 90, plan_vtab,
         [Column("wall s", number("wall_s")), Column("in fit s", number("fit_s")),
          Column("start-up + caches + writing s", number("startup_caches_writing_s")),
          Column("train imgs/s (whole run)", number("train_imgs_per_s", 0)),
          Column("test images", number("test_images", 0)), Column("precision", text("precision")),
          Column("100-epoch estimate, min (linear, not measured)", number("estimate_100_epochs_min"))],
         needs_data=True),
    Part("vpr", "Benchmarks: the `selavpr.py` tables (re-ranking ms per query; the paper: 18 ms for the top 20 "
                "on a GPU)",
         "SelaVPR MNN re-ranking, 61x61x128 local maps (float16 stored), 10,000 x 1024 global k-NN", 30, 30,
         plan_vpr,
         [Column("global k-NN ms/query", number("global_knn_ms", 3)), Column("re-rank ms/query", number("rerank_ms", 2)),
          Column("re-rank / global", number("rerank_vs_global", 1, "x"))]),
    Part("lora_overhead", f"{SPEED_SECTION}: the `overhead.py` table (LoRA merged/unmerged, visadapt vs PEFT)",
         "visadapt lora vs PEFT LoRA, ViT-B/16 at 224, batch 64, rank 8, fp32", 45, 60, plan_lora_overhead,
         [Column("ms", number("ms", 2)), Column("vs base", number("vs_base", 2, "x")),
          Column("vs PEFT", number("vs_peft", 2, "x")), Column("trainable", number("trainable", 0)),
          Column("saved + state MB", number("saved_state_mb")), Column("CUDA step peak MB", number("cuda_peak_mb"))]),
]}


# ------------------------------------------------------------------------------------------------ the suite

def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def machine_info() -> dict:
    """The machine the figures belong to: CPU, cores, GPU, driver, CUDA, library versions, commit."""
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "cpu": cpu_name(), "cores_usable": _cores(), "cores_total": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0, "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        **{name: _version(name) for name in ("timm", "diffusers", "peft", "accelerate", "xformers", "visadapt")},
        "commit": _git_commit(),
    }


@dataclasses.dataclass
class Suite:
    """One run of the suite: where it writes, what it measured so far (``results``, the JSON)."""

    out: Path
    work_dir: Path
    dry_run: bool
    total_cap_s: float
    results: dict = dataclasses.field(default_factory=dict)
    data_ready: bool = False
    _started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def mode(self) -> str:
        return "dry-run" if self.dry_run else "gpu"

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def data_root(self) -> Path:
        return self.work_dir / "synthetic-vtab"

    def save(self) -> None:
        """Write the JSON and the markdown (each replaced atomically, so a reader never sees half a file)."""
        self.results["wall_s"] = round(time.monotonic() - self._started, 1)
        for name, content in ((JSON_NAME, json.dumps(self.results, indent=1, default=str) + "\n"),
                              (MARKDOWN_NAME, render_markdown(self.results))):
            partial = self.out / f".{name}.partial"
            partial.write_text(content)
            os.replace(partial, self.out / name)

    def run(self, names: list[str], caps: dict[str, float], argv: list[str]) -> dict:
        self._started = time.monotonic()
        self.results = {
            "suite": "visadapt GPU measurements (eval/bench/gpu_suite.py)", "dry_run": self.dry_run,
            "note": DRY_RUN_NOTE if self.dry_run else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python eval/bench/gpu_suite.py " + " ".join(argv), "total_cap_s": self.total_cap_s,
            "machine": machine_info(), "wall_s": None, "parts": {}}
        self.out.mkdir(parents=True, exist_ok=True)
        self.save()
        total_deadline = self._started + self.total_cap_s
        for name in names:
            part = PARTS[name]
            cap = min(caps[name], total_deadline - time.monotonic())
            run = PartRun(self, part, max(cap, 0.0))
            self.results["parts"][name] = run.result
            if cap <= 0:
                run.result.update(status="skipped", reason=f"the suite's total time cap of {self.total_cap_s:.0f} "
                                                           "s was reached before this part")
            elif part.needs_data and not self.data_ready:
                run.result.update(status="skipped", reason="the synthetic suite it reads was not prepared (see "
                                                           "part 'prepare')")
            else:
                print(f"[gpu_suite] {name}: cap {cap:.0f} s ...", flush=True)
                run_part(run, self.save)
                print(f"[gpu_suite] {name}: {run.result['status']} in {run.result['wall_s']:.0f} s"
                      + (f" ({run.result['reason']})" if run.result["reason"] else ""), flush=True)
            self.save()
        return self.results


# ------------------------------------------------------------------------------------------------ markdown

def _cells(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def render_markdown(results: dict) -> str:
    """The results as markdown: a header naming the machine and date, then one table per part."""
    m = results["machine"]
    lines = [f"# {results['suite']}", ""]
    if results.get("dry_run"):
        lines += [f"**{DRY_RUN_NOTE}.**", ""]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else "none"
    machine_line = (f"Machine: GPU {gpu}, driver {m.get('driver') or '-'}, CUDA {m.get('cuda') or '-'}, cuDNN "
                    f"{m.get('cudnn') or '-'}; CPU {m['cpu']} ({m['cores_usable']} of {m['cores_total']} cores); "
                    f"torch {m['torch']}, timm {m.get('timm') or '-'}, diffusers {m.get('diffusers') or '-'}, peft "
                    f"{m.get('peft') or '-'}, xformers {m.get('xformers') or '-'}; Python {m['python']}; "
                    f"commit {(m.get('commit') or '-')[:12]}.")
    wall = results["wall_s"] if results["wall_s"] is not None else "-"
    run_line = (f"Date: {results['date']}. Command: `{results['command']}`. Wall {wall} s (total cap "
                f"{results['total_cap_s']:.0f} s).")
    lines += [machine_line, run_line, ""]
    for name, part in results["parts"].items():
        spec = PARTS[name]
        lines += [f"## {name}: {part['description']}", "", f"README: {part['readme_section']}.", "",
                  f"Status: **{part['status']}**" + (f" ({part['reason']})" if part["reason"] else "")
                  + f"; {part['wall_s'] if part['wall_s'] is not None else '-'} s (CPU {part['cpu_s'] or '-'} s) "
                  f"of a {part['cap_s']:.0f} s cap. "
                  f"Settings: `{json.dumps(part['settings'], default=str)}`.", ""]
        if part["rows"]:
            lines.append(_cells(["row", "status", *(c.header for c in spec.columns)]))
            lines.append(_cells(["---", "---", *("---" for _ in spec.columns)]))
            for row in part["rows"]:
                status = row["status"] + (f": {row['reason']}" if row["reason"] else "")
                cells = [c.cell(row["figures"]) if row["status"] == "measured" else "-" for c in spec.columns]
                lines.append(_cells([row["name"], status.replace("|", "/"), *cells]))
            lines.append("")
        lines += [f"- {note}" for note in part["notes"] if "\n" not in note]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ command line

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Parts: " + ", ".join(PARTS) + " (--list for their caps and README sections)")
    p.add_argument("--out", default="runs/gpu-suite", help="folder for gpu_suite.json and gpu_suite.md "
                                                           "(default: runs/gpu-suite)")
    p.add_argument("--work-dir", default=None, help="folder for the synthetic data, kept for later runs "
                                                    "(default: <tmp>/visadapt-gpu-suite[-dry-run])")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, 1-2 iterations: the same code "
                                                          "paths, for CI (the figures mean nothing)")
    p.add_argument("--only", action="append", default=None, metavar="PART[,PART]",
                   help="run only these parts (repeatable); 'prepare' is added when a part needs its data")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="change one part's time cap")
    p.add_argument("--total-cap", type=float, default=None,
                   help="seconds for the whole run (default 510 on a GPU: the parts stop in time for a 10-minute "
                        "limit; 400 with --dry-run)")
    p.add_argument("--list", action="store_true", help="print the parts, their time caps and README sections")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """The parts to run in order and each part's cap, from ``--only`` / ``--cap``; command-line mistakes exit 2."""
    names = list(PARTS)
    if args.only:
        wanted = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in PARTS]
        if unknown or not wanted:
            fail(f"--only {','.join(unknown) or '(empty)'}: not a part; choose from {', '.join(PARTS)}")
        if any(PARTS[n].needs_data for n in wanted):
            wanted.append("prepare")
        names = [n for n in PARTS if n in wanted]
    caps = {name: part.dry_cap_s if args.dry_run else part.cap_s for name, part in PARTS.items()}
    for item in args.cap:
        name, sep, seconds = item.partition("=")
        if not sep or name.strip() not in PARTS:
            fail(f"--cap {item!r}: write PART=SECONDS with PART one of {', '.join(PARTS)}")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not value >= 0:
            fail(f"--cap {item!r}: SECONDS must be a number >= 0")
        caps[name.strip()] = value
    if args.total_cap is not None and not args.total_cap > 0:
        fail(f"--total-cap {args.total_cap}: must be > 0 seconds")
    return names, caps


def print_list() -> None:
    print(f"{'part':<15}{'cap s (GPU)':>12}{'cap s (dry)':>12}  README section")
    for part in PARTS.values():
        print(f"{part.name:<15}{part.cap_s:>12.0f}{part.dry_cap_s:>12.0f}  {part.readme}")
    print("\ntotal cap: 510 s on a GPU, 400 s with --dry-run (--total-cap); parts run in the order above")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        print_list()
        return 0
    names, caps = resolve(args)
    if not args.dry_run and not torch.cuda.is_available():
        fail("no CUDA device here; gpu_suite.py measures GPU figures (use --dry-run to check the script on a CPU)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a folder")
    # Nothing is downloaded (random weights, synthetic data): fail at once rather than retry a hub that the
    # offline GPU machine cannot reach.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_run:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        # tiny tensors: one thread each, so that a shared 2-core CI machine is not oversubscribed (two spinning
        # intra-op threads per process made the dry run several times slower there); children inherit it
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / ("visadapt-gpu-suite" + ("-dry-run" if args.dry_run
                                                                                            else "")))
    work_dir.mkdir(parents=True, exist_ok=True)
    suite = Suite(out, work_dir, args.dry_run, args.total_cap or (400.0 if args.dry_run else 510.0))
    results = suite.run(names, caps, argv)
    print(f"\nwrote {out / JSON_NAME} and {out / MARKDOWN_NAME} ({results['wall_s']:.0f} s)")
    for name, part in results["parts"].items():
        print(f"  {name:<14} {part['status']}" + (f": {part['reason']}" if part["reason"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
