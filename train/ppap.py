"""Train PPAP noise-range experts data-free on a frozen classifier, then measure what their guidance does.

The job lives in the package (``visadapt.train.ppap``), so an installed visadapt runs it without this checkout:
``visadapt-train ppap ...`` or ``python -m visadapt.train ppap ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("ppap"))
