"""Overhead of visadapt's ``lora`` plugin, measured side by side in one run on a randomly initialised timm ViT.

1. Inference latency of the same LoRA model unmerged (hooks add the low-rank path) vs merged (folded into
   ``attn.qkv``), with the plain base model as a reference.
2. Training-step time (forward + backward + AdamW step) and memory of visadapt ``lora`` vs PEFT LoRA at the
   same rank. PEFT cannot target the q/v row slices of timm's fused ``attn.qkv`` Linear, so its comparable
   set-up is LoRA on all of ``qkv``; visadapt is run both on ``q,v`` (its default) and on ``qkv`` (the same
   shapes as PEFT's), and the trainable-parameter count of each configuration is printed.

Memory: PyTorch exposes no allocator peak on CPU, so on every device the script reports the bytes of tensors
saved for backward in one step (once per storage, parameters excluded) plus trainable params, grads and AdamW
state; on CUDA it adds the peak of ``torch.cuda.max_memory_allocated`` during one step above what was resident.
With rank r on a width-d ViT, LoRA on q and v (4rd per block) has exactly as many parameters as LoRA on qkv.

Run from the repository root:  python eval/bench/overhead.py [--model vit_small_patch16_224 --img-size 96 ...]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import peft
import timm
import torch
import torch.nn.functional as F
from machine import describe

import visadapt

MB = 2**20
TRAIN_CONFIGS = ("visadapt lora q,v", "visadapt lora qkv", "peft lora qkv")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=96, help="small default keeps a 2-core CPU run short")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed repeats per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats per configuration")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--record", action="store_true",
                   help="also write the README table (block overhead) into eval/results/overhead.json; then "
                        "readme_figures.py --write")
    return p.parse_args(argv)


def timed(device: torch.device, fn, *args) -> float:
    """Wall seconds of ``fn(*args)``; synchronised before and after so queued GPU work lands in the right call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def build(args: argparse.Namespace, config: str, device: torch.device) -> torch.nn.Module:
    """A fresh model; the same seed makes every configuration start from the same base weights."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img_size)
    alpha = float(args.rank)  # scaling alpha / rank = 1 in both libraries
    if config.startswith("visadapt"):
        targets = ("q", "v") if config.endswith("q,v") else ("qkv",)
        visadapt.attach(model, "lora", rank=args.rank, alpha=alpha, targets=targets, head="head")
    elif config.startswith("peft"):
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=["qkv"], modules_to_save=["head"])
        model = peft.get_peft_model(model, cfg)
    return model.to(device)


def bench_latency(args, device, x) -> dict[str, float]:
    """Median ms of one no-grad forward: base model, LoRA unmerged, LoRA merged (same LoRA model, toggled)."""
    base = build(args, "base", device).eval()
    lora = build(args, "visadapt lora q,v", device).eval()
    # B starts at zero, which would make the merge check trivial: give the LoRA a non-zero update first
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "visadapt_adapters" in name and name.endswith("B.weight"):
                param.normal_(0.0, 0.02)
        unmerged_out = lora(x)
        visadapt.merge(lora)
        merged_out = lora(x)
        visadapt.unmerge(lora)
    diff = (merged_out - unmerged_out).abs().max().item()
    assert diff <= 1e-4, f"merged and unmerged outputs differ by {diff:.2e} (> 1e-4)"

    def run(state: str) -> float:
        # merging/unmerging is a weight copy done outside the timed forward
        if state == "merged":
            visadapt.merge(lora)
        with torch.no_grad():
            seconds = timed(device, base if state == "base" else lora, x)
        if state == "merged":
            visadapt.unmerge(lora)
        return seconds

    states = ["base", "unmerged", "merged"]
    times = {s: [] for s in states}
    for i in range(args.warmup + args.steps):
        order = states if i % 2 == 0 else states[::-1]  # alternate the order so no state always runs first
        for state in order:
            seconds = run(state)
            if i >= args.warmup:
                times[state].append(seconds)
    return {s: 1e3 * statistics.median(t) for s, t in times.items()} | {"max_abs_diff": diff}


def train_step(model, optimizer, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_plus_state_bytes(model, optimizer, x, y) -> int:
    """Bytes of tensors saved for backward in one step (once per storage, parameters excluded) plus
    trainable params, their grads and the optimizer state."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()  # views of one storage keep just that storage alive
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    nbytes = sum(t.numel() * t.element_size() for t in trainable + [p.grad for p in trainable] + state)
    optimizer.zero_grad(set_to_none=True)
    return sum(saved.values()) + nbytes


def bench_training(args, device, x, y) -> dict[str, dict[str, float]]:
    models = {c: build(args, c, device).train() for c in TRAIN_CONFIGS}
    optimizers = {c: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for c, m in models.items()}
    # counted the same way for every configuration (PEFT's frozen original head copy is not trainable)
    results = {c: {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}
               for c, m in models.items()}
    times = {c: [] for c in TRAIN_CONFIGS}
    for i in range(args.warmup + args.steps):
        order = TRAIN_CONFIGS[i % 3:] + TRAIN_CONFIGS[:i % 3]  # rotate so each config takes each slot in turn
        for c in order:
            seconds = timed(device, train_step, models[c], optimizers[c], x, y)
            if i >= args.warmup:
                times[c].append(seconds)
    for c in TRAIN_CONFIGS:
        results[c]["step_ms"] = 1e3 * statistics.median(times[c])
        # measured after warm-up, so AdamW state exists as it would in a real run
        results[c]["saved_state_mb"] = saved_plus_state_bytes(models[c], optimizers[c], x, y) / MB
        if device.type == "cuda":  # every model stays resident, so count only what one step adds
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            timed(device, train_step, models[c], optimizers[c], x, y)  # timed() synchronises after the step
            results[c]["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)  # the same inputs for every configuration
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)

    print(f"# visadapt LoRA overhead — {datetime.date.today()} — {describe()}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, peft {peft.__version__}, "
          f"visadapt {visadapt.__version__}")
    print(f"model {args.model}, img {args.img_size}, batch {args.batch_size}, rank {args.rank}, "
          f"alpha {args.rank}, fp32, {args.warmup} warm-up + {args.steps} timed repeats, median reported\n")

    lat = bench_latency(args, device, x)
    print("## Inference (eval, no_grad), visadapt lora q,v\n")
    print("| model | latency ms |\n|---|---:|")
    for state in ("base", "unmerged", "merged"):
        print(f"| {'base (no adapter)' if state == 'base' else 'lora ' + state} | {lat[state]:.1f} |")
    print(f"\nmerge check: max |merged - unmerged| = {lat['max_abs_diff']:.1e} (<= 1e-4)")
    print(f"merged/unmerged latency: {lat['merged'] / lat['unmerged']:.2f}x")
    print(f"unmerged/base latency: {lat['unmerged'] / lat['base']:.2f}x\n")

    res = bench_training(args, device, x, y)
    cuda = device.type == "cuda"
    print("## Training step (forward + backward + AdamW)\n")
    print("| config | trainable params | step ms | saved-for-backward + trainable state MB"
          + (" | CUDA step peak above resident MB |" if cuda else " |"))
    print("|---|---:|---:|---:|" + ("---:|" if cuda else ""))
    for c, r in res.items():
        print(f"| {c} | {r['trainable']:,} | {r['step_ms']:.1f} | {r['saved_state_mb']:.1f} |"
              + (f" {r['cuda_peak_mb']:.1f} |" if cuda else ""))
    peft_r = res["peft lora qkv"]
    print("\n(saved+state: bytes of tensors saved for backward + trainable params, grads and AdamW state;\n"
          " not an allocator peak, which PyTorch does not expose on CPU)")
    for c in TRAIN_CONFIGS[:2]:
        r = res[c]
        print(f"{c} / peft lora qkv: step time {r['step_ms'] / peft_r['step_ms']:.2f}x, "
              f"saved+state memory {r['saved_state_mb'] / peft_r['saved_state_mb']:.2f}x"
              + (f", CUDA peak {r['cuda_peak_mb'] / peft_r['cuda_peak_mb']:.2f}x" if cuda else "")
              + f", trainable params {r['trainable'] / peft_r['trainable']:.2f}x")
    if args.record:
        record(lat, res, sys.argv[1:] if argv is None else argv, args.device)


def record(lat: dict, res: dict, argv: list[str], device: str) -> None:
    """The README's overhead table (block overhead) from one run's latencies and training results."""
    import readme_figures  # beside this script (eval/bench/), imported only to record

    qv, qkv, peft_qkv = (res[c] for c in TRAIN_CONFIGS)
    rows = [
        {"id": "inference-ms", "values": [[lat["base"], lat["unmerged"], lat["merged"]]]},
        {"id": "merged-vs-unmerged", "values": [lat["merged"] / lat["unmerged"]]},
        {"id": "step-ms", "values": [[qv["step_ms"], qkv["step_ms"], peft_qkv["step_ms"]]]},
        {"id": "step-qv-vs-peft", "values": [qv["step_ms"] / peft_qkv["step_ms"]]},
        {"id": "step-qkv-vs-peft", "values": [qkv["step_ms"] / peft_qkv["step_ms"]]},
        {"id": "memory-vs-peft", "values": [[qv["saved_state_mb"] / peft_qkv["saved_state_mb"],
                                             qv["saved_state_mb"], peft_qkv["saved_state_mb"]]]},
    ]
    readme_figures.record_table("overhead", rows, readme_figures.bench_command("overhead.py", argv),
                                readme_figures.machine_phrase(device))


if __name__ == "__main__":
    main()
