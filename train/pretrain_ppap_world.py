"""Reproduce the embedded PPAP world in ``assets/``: a tiny pixel diffusion model and the classifier that judges it.

The job lives in the package (``visadapt.train.pretrain_ppap_world``), so an installed visadapt runs it without this checkout:
``visadapt-train pretrain-ppap-world ...`` or ``python -m visadapt.train pretrain-ppap-world ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("pretrain-ppap-world"))
