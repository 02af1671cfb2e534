"""``python -m visadapt.train COMMAND ...``: the same as ``visadapt-train COMMAND ...``."""
import sys

from visadapt.train.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m visadapt.train"))
