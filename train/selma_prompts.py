"""SELMA's prompt-generation step: an instruction-tuned text generator writes prompts for one skill, and a ROUGE-L

The job lives in the package (``visadapt.train.selma_prompts``), so an installed visadapt runs it without this checkout:
``visadapt-train selma-prompts ...`` or ``python -m visadapt.train selma-prompts ...``. ``--help`` lists the options.
"""
import sys

from visadapt.train import run

if __name__ == "__main__":
    sys.exit(run("selma-prompts"))
