"""Train SELMA skill experts (one LoRA per skill dataset) on a frozen text-to-image pipeline, then merge them.

The job lives in the package (``visadapt.train.selma``), so an installed visadapt runs it without this checkout:
``visadapt-train selma ...`` or ``python -m visadapt.train selma ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("selma"))
