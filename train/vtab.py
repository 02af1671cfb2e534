"""Train an adapter on a frozen backbone for VTAB-1k, FGVC or the embedded mini-VTAB, one task after another.

The job lives in the package (``visadapt.train.vtab``), so an installed visadapt runs it without this checkout:
``visadapt-train vtab ...`` or ``python -m visadapt.train vtab ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("vtab"))
