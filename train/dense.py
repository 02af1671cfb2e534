"""Multi-task dense prediction on a frozen Swin: every task trained jointly over one shared backbone.

The job lives in the package (``visadapt.train.dense``), so an installed visadapt runs it without this checkout:
``visadapt-train dense ...`` or ``python -m visadapt.train dense ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("dense"))
