"""Train the ranking-aware CLIP adapter on text-driven image ordering, then test it.

The job lives in the package (``visadapt.train.rank``), so an installed visadapt runs it without this checkout:
``visadapt-train rank ...`` or ``python -m visadapt.train rank ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("rank"))
