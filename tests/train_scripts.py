"""The scripts under ``train/`` as modules: they are run as files, not installed with the package."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TRAIN_DIR = Path(__file__).resolve().parents[1] / "train"


def load_train_script(name: str) -> ModuleType:
    """``train/<name>.py`` imported afresh (``vtab``, ``vpr``, ``rank``)."""
    spec = importlib.util.spec_from_file_location(f"train_{name}", TRAIN_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses defined in the script look their module up
    spec.loader.exec_module(module)
    return module
