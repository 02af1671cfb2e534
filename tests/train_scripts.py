"""The training jobs of ``visadapt.train`` (what ``train/<name>.py`` and ``visadapt-train <name>`` run) as modules,
each imported afresh so that a test's changes to module globals stay within that test."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TRAIN_DIR = Path(__file__).resolve().parents[1] / "visadapt" / "train"


def load_train_script(name: str) -> ModuleType:
    """``visadapt/train/<name>.py`` imported afresh (``vtab``, ``vpr``, ``rank``)."""
    spec = importlib.util.spec_from_file_location(f"train_{name}", TRAIN_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses defined in the script look their module up
    spec.loader.exec_module(module)
    return module
