"""Adapter file bytes of the bitadapter plugin vs fp32 vs the bit limit, side by side in one run.

    python eval/bench/bitadapter_size.py                  # ViT-B/16, 100 classes, dim 32 (nothing downloaded)
    python eval/bench/bitadapter_size.py --record         # the same, written to eval/results/bitadapter_size.json

For each method and bit width it writes a real adapter file (random-init backbone; only shapes matter) and
prints its size next to the fp32 size of the same adapter and the information limit: adapter parameters x
bits / 8 plus the fp32 head and the per-matrix mean/std. The ratio file / limit shows the format overhead.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import timm
import torch

import visadapt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--record", action="store_true",
                        help="also write the README table's rows (block bitadapter-size) into "
                             "eval/results/bitadapter_size.json; then readme_figures.py --write")
    args = parser.parse_args(argv)
    rows = []
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    head = sum(p.numel() for p in model.head.parameters())
    print(f"{args.model}, {args.classes} classes, dim {args.dim}; fp32 head of {head:,} params in every file")
    print(f"{'method':<12}{'bits':>5}{'adapter params':>16}{'file bytes':>12}{'fp32 bytes':>12}{'limit':>10}"
          f"{'file/limit':>11}{'fp32/file':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("adaptformer", "lora"):
            for bits in (1, 2, 4, 8, 32):
                visadapt.attach(model, "bitadapter", method=method, dim=args.dim, bits=bits, head="head")
                matrices = [m for n, m in model.named_modules() if "visadapt_" in n and isinstance(m, torch.nn.Linear)]
                params = sum(m.weight.numel() for m in matrices)
                size = os.path.getsize(visadapt.save_adapter(model, os.path.join(tmp, "a.safetensors")))
                fp32 = (params + head) * 4
                limit = params * bits // 8 + head * 4 + (8 * len(matrices) if bits < 32 else 0)
                print(f"{method:<12}{bits:>5}{params:>16,}{size:>12,}{fp32:>12,}{limit:>10,}"
                      f"{size / limit:>11.3f}{fp32 / size:>9.1f}x")
                # row ids of eval/results/bitadapter_size.json (the README's method labels, slugged)
                row_id = f"{'adaptformer' if method == 'adaptformer' else 'lora-q-v'}-{bits}"
                rows.append({"id": row_id, "values": [bits, params, size, fp32, limit, size / limit, fp32 / size]})
                visadapt.detach(model)
    if args.record:
        import readme_figures  # beside this script (eval/bench/), imported only to record

        command = readme_figures.bench_command("bitadapter_size.py", sys.argv[1:] if argv is None else argv)
        readme_figures.record_table("bitadapter-size", rows, command)


if __name__ == "__main__":
    main()
