"""Pretrain an embedded backbone on the procedural upstream task, writing ``assets/proc*_tiny.safetensors``.

The job lives in the package (``visadapt.train.pretrain_backbone``), so an installed visadapt runs it without this checkout:
``visadapt-train pretrain-backbone ...`` or ``python -m visadapt.train pretrain-backbone ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("pretrain-backbone"))
