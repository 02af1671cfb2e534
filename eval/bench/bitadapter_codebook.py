"""Quantisation error of the two codebook starts of the k-bit quantiser, side by side in one run.

    python eval/bench/bitadapter_codebook.py               # 4,000,000 N(0, 1) samples, bits 1, 2, 4, 8

The official code (JieShibo/PETL-ViT binary_adapter/utils.py ``QLinear.quantize``) starts its 500 Lloyd-style
iterations from all-zero codewords (``codebook_start="zero"``); visadapt starts from normal quantiles
(``"quantile"``, the default). Both quantise standardised weights, which the codebook assumes are N(0, 1): the
mean squared error on N(0, 1) samples is the error per standardised weight. Also printed: how many levels lie
within +-0.1 (a converged 8-bit codebook has 20; an unconverged one crowds its levels at 0) and the largest
difference between the two codebooks.
"""
from __future__ import annotations

import argparse

import torch

from visadapt.layers import fake_quantize, normal_codebook


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    z = torch.randn(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print(f"mean squared quantisation error on {args.samples:,} N(0, 1) samples (seed {args.seed})")
    print(f"{'bits':>4}{'official zero start':>21}{'visadapt quantile':>19}{'zero/quantile':>15}"
          f"{'levels |c|<0.1 (zero, quantile)':>33}{'max |codebook diff|':>21}")
    for bits in (1, 2, 4, 8):
        errors, crowded = {}, {}
        for start in ("zero", "quantile"):
            errors[start] = (fake_quantize(z, bits, start=start)[0] - z).square().mean().item()
            crowded[start] = int((normal_codebook(bits, start=start)[0].abs() < 0.1).sum())
        diff = (normal_codebook(bits, start="zero")[0] - normal_codebook(bits)[0]).abs().max().item()
        print(f"{bits:>4}{errors['zero']:>21.4e}{errors['quantile']:>19.4e}{errors['zero'] / errors['quantile']:>15.2f}"
              f"{crowded['zero']:>17}, {crowded['quantile']:<14}{diff:>21.2e}")


if __name__ == "__main__":
    main()
