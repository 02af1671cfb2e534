"""Train SelaVPR (or any adapter plus SelaVPR's place head) for visual place recognition, then test it.

The job lives in the package (``visadapt.train.vpr``), so an installed visadapt runs it without this checkout:
``visadapt-train vpr ...`` or ``python -m visadapt.train vpr ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("vpr"))
