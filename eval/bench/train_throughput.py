"""Training throughput (imgs/s) and peak memory of one adapter run five ways, side by side in one run.

Every variant trains through :func:`visadapt.engine.fit` (the loop ``train/vtab.py`` runs) on the same images
of one task of the synthetic VTAB-1k suite (``synthetic_vtab.py``: real JPEGs at the task's usual size, written
once, not timed), with the same model, batch and optimiser settings:

* ``reference style``: AdaptFormer, fp32, eager attention (``fused_attn=False``), JPEGs decoded every epoch
  (``ImageListDataset`` + ``vtab_transform``): how the reference PETL code runs;
* ``visadapt``: the same AdaptFormer with visadapt's defaults: ``--precision auto`` (bf16 autocast on a GPU
  that has it, fp32 on a CPU), PyTorch SDPA, the decoded-image cache with normalisation on the device;
* ``visadapt --compile``: the same, compiled once with ``torch.compile``;
* ``PEFT LoRA``: PEFT's LoRA on ``qkv`` at the rank whose trainable budget is closest to the adapter's, run as
  its users run it (same precision, SDPA, eager PyTorch) on the same cached loader;
* ``linear probe``: the head alone (the ceiling of a frozen-backbone step).

Three more variants, run when named in ``--variants`` (``gpu_suite.py`` runs them), change one setting of
``visadapt`` each: ``visadapt fp32`` (no autocast), ``visadapt eager`` (unfused attention), ``visadapt xformers``
(xformers attention where its kernels run, else SDPA with a notice; the row's attention column says which ran).

Each variant runs in its own process (Accelerate keeps a process's first precision; memory peaks stay apart).
An epoch's time is taken between the starts of consecutive epochs (``fit``'s ``before_epoch``); the first epoch
(warm-up, compilation) and the last (which evaluates) are not counted. Memory: ``torch.cuda.max_memory_allocated``
on a GPU; on a CPU the process's peak resident set (includes Python and torch themselves).

    python eval/bench/train_throughput.py                                  # 2-core CPU: ViT-Ti/16 at 64 px
    python eval/bench/train_throughput.py --device cuda                    # GPU: ViT-B/16 at 224, batch 128
    python eval/bench/train_throughput.py --device cpu --record     # also writes the README table (CPU run)
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval" / "bench"))
from children import ChildFailed, output_tail, run_child
from machine import describe
from synthetic_vtab import make_synthetic_vtab

VARIANTS = {
    "reference style": {"method": "adapter", "precision": "fp32", "attention": "eager", "cache": False,
                        "compile": False},
    "visadapt": {"method": "adapter", "precision": "auto", "attention": "sdpa", "cache": True, "compile": False},
    "visadapt --compile": {"method": "adapter", "precision": "auto", "attention": "sdpa", "cache": True,
                           "compile": True},
    "PEFT LoRA": {"method": "peft", "precision": "auto", "attention": "sdpa", "cache": True, "compile": False},
    "linear probe": {"method": "linear", "precision": "auto", "attention": "sdpa", "cache": True, "compile": False},
    "visadapt fp32": {"method": "adapter", "precision": "fp32", "attention": "sdpa", "cache": True,
                      "compile": False},
    "visadapt eager": {"method": "adapter", "precision": "auto", "attention": "eager", "cache": True,
                       "compile": False},
    "visadapt xformers": {"method": "adapter", "precision": "auto", "attention": "xformers", "cache": True,
                          "compile": False},
}
DEFAULT_VARIANTS = ("reference style", "visadapt", "visadapt --compile", "PEFT LoRA", "linear probe")
DEVICE_DEFAULTS = {
    "cuda": {"model": "vit_base_patch16_224", "input_size": 224, "batch_size": 128, "train_images": 1000,
             "epochs": 4, "workers": 8},
    "cpu": {"model": "vit_tiny_patch16_224", "input_size": 64, "batch_size": 32, "train_images": 256,
            "epochs": 4, "workers": 1},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default=None, help="timm model, random init (default: ViT-B/16 cuda, ViT-Ti/16 cpu)")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--train-images", type=int, default=None, help="images per epoch (<= 1000, the task's split)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per variant; the first and last are not timed")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--bottleneck", type=int, default=8, help="AdaptFormer width")
    p.add_argument("--task", default="oxford_iiit_pet", help="task of the synthetic suite (500x375 photos)")
    p.add_argument("--root", default="/tmp/visadapt-synthetic-vtab-throughput")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated variants (default: {', '.join(DEFAULT_VARIANTS)}; also: "
                        f"{', '.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)})")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--record", action="store_true",
                   help="also write the README table (block train-throughput) into "
                        "eval/results/train_throughput.json (the default variants); then readme_figures.py --write")
    args = p.parse_args(argv)
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 3:
        p.error("--epochs must be at least 3 (the first and the last epoch are not timed)")
    return args


def peft_rank(budget: int, model, rank_max: int = 64) -> int:
    """The LoRA rank on every ``qkv`` whose parameter count is closest to ``budget``."""
    per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules() if name.endswith("attn.qkv"))
    return min(range(1, rank_max + 1), key=lambda r: abs(r * per_rank - budget))


def run_variant(args: argparse.Namespace, name: str) -> dict:
    """Train one variant in this process; returns its figures."""
    import timm

    import visadapt
    from visadapt.data import build_datasets
    from visadapt.engine import TrainConfig, fit, make_accelerator

    spec = VARIANTS[name]
    cuda = args.device == "cuda"
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_every=args.epochs, warmup_epochs=1,
                         num_workers=args.workers, progress=False, precision=spec["precision"],
                         compile=spec["compile"], attention=spec["attention"])
    accelerator = make_accelerator(None, precision=spec["precision"])
    train_set, eval_set = build_datasets("vtab", args.root, args.task, input_size=args.input_size,
                                         normalization="imagenet", cache=spec["cache"])
    if args.train_images > len(train_set):
        raise SystemExit(f"--train-images {args.train_images} exceeds the {len(train_set)} images of the split")
    # fit looks through a Subset for the cached dataset's device_transform
    train_set = torch.utils.data.Subset(train_set, range(args.train_images))
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=train_set.dataset.num_classes,
                              img_size=args.input_size)
    rank = None
    if spec["method"] == "adapter":
        visadapt.attach(model, "adapter", {"bottleneck": args.bottleneck}, head="head")
    elif spec["method"] == "linear":
        visadapt.attach(model, "linear", head="head")
    else:
        import peft

        probe = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.input_size)
        visadapt.attach(probe, "adapter", {"bottleneck": args.bottleneck})
        budget = sum(p.numel() for p in probe.parameters() if p.requires_grad)
        rank = peft_rank(budget, model)
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"],
                                                           modules_to_save=["head"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    starts: list[float] = []

    def stamp(_model, _epoch: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        starts.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = fit(model, train_set, eval_set, config, accelerator=accelerator, before_epoch=stamp)
    epoch_times = [b - a for a, b in itertools.pairwise(starts[1:])]
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    return {"variant": name, "trainable": trainable, "imgs_per_s": args.train_images * len(epoch_times)
            / sum(epoch_times), "epoch_s": epoch_times, "peak_bytes": peak, "precision": result.precision,
            "compiled": result.compiled, "attention": result.attention,
            "rank": rank}


def run_variant_in_child(args: argparse.Namespace, name: str, timeout: float | None = None) -> dict:
    """Train variant ``name`` in a fresh process (:func:`run_variant`) and return its figures; raises
    :class:`children.ChildFailed` when it fails, ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("child", "variants", "record") and v is not None]
    done = run_child([sys.executable, __file__, *forwarded, f"--child={name}"], timeout, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise ChildFailed(f"variant {name!r} failed (exit status {done.returncode}):\n{output_tail(done)}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(args, args.child)), flush=True)
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    make_synthetic_vtab(args.root, scale=0.001, tasks=[args.task])
    rows = []
    for name in names:
        print(f"running {name} ...", flush=True)
        try:
            rows.append(run_variant_in_child(args, name))
        except ChildFailed as err:
            raise SystemExit(str(err)) from None

    by_name = {row["variant"]: row for row in rows}
    reference = by_name.get("reference style")
    lora = by_name.get("PEFT LoRA")
    print(f"\n{args.model} (random init) at {args.input_size} px, batch {args.batch_size}, {args.train_images} "
          f"images per epoch x {args.epochs - 2} timed epochs, {args.workers} loader workers, AdaptFormer "
          f"bottleneck {args.bottleneck}; task {args.task} of the synthetic suite")
    print(f"{describe()}; {datetime.date.today()}")
    memory = "peak GiB (CUDA allocated)" if args.device == "cuda" else "peak RSS GiB (whole process)"
    print(f"\n| variant | trainable params | precision | attention | imgs/s | vs reference | vs PEFT LoRA | {memory} |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for row in rows:
        vs_ref = f"{row['imgs_per_s'] / reference['imgs_per_s']:.2f}x" if reference else "-"
        vs_lora = f"{row['imgs_per_s'] / lora['imgs_per_s']:.2f}x" if lora else "-"
        name = row["variant"] + (f" (r={row['rank']})" if row["rank"] else "")
        attention = ", ".join(f"{k} {v}" for k, v in row["attention"].items()) or "-"
        print(f"| {name} | {row['trainable']:,} | {row['precision']} | {attention} | {row['imgs_per_s']:,.1f} | "
              f"{vs_ref} | {vs_lora} | {row['peak_bytes'] / 2**30:.2f} |")
    if args.record:
        record(rows, reference, lora, args, sys.argv[1:] if argv is None else argv)


def record(rows: list[dict], reference: dict | None, lora: dict | None, args, argv: list[str]) -> None:
    """The README's throughput table (block train-throughput): rows by variant, the ratios of this run."""
    import readme_figures  # beside this script (eval/bench/), imported only to record

    if reference is None or lora is None:
        raise SystemExit("--record: the table's ratios need the 'reference style' and 'PEFT LoRA' variants")
    readme_figures.record_table("train-throughput", [
        {"id": row["variant"].replace(" --", " ").replace(" ", "-").lower(),
         "values": [row["trainable"], row["precision"], ", ".join(row["attention"]) or "-", row["imgs_per_s"],
                    row["imgs_per_s"] / reference["imgs_per_s"], row["imgs_per_s"] / lora["imgs_per_s"],
                    row["peak_bytes"] / 2**30]} for row in rows],
        readme_figures.bench_command("train_throughput.py", argv), readme_figures.machine_phrase(args.device))


if __name__ == "__main__":
    main()
