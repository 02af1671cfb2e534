"""Train a ResAdapter (ResCLoRA + ResENorm) on a frozen text-to-image pipeline with multi-resolution batches.

The job lives in the package (``visadapt.train.resadapter``), so an installed visadapt runs it without this checkout:
``visadapt-train resadapter ...`` or ``python -m visadapt.train resadapter ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("resadapter"))
