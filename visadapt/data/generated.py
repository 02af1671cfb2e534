"""Writing a generated dataset folder once, atomically, recognised again by its manifest."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from visadapt.data.errors import DatasetError


def manifest_parameters(root: Path, manifest: str) -> dict | None:
    """The ``parameters`` recorded in ``root/manifest``, or None when there is no readable manifest."""
    try:
        return json.loads((root / manifest).read_text()).get("parameters")
    except (OSError, ValueError, AttributeError):
        return None


def write_generated(root: Path, manifest: str, parameters: dict, write: Callable[[Path], dict], what: str) -> Path:
    """Make ``root`` hold the dataset ``write`` generates for ``parameters``, and return ``root``.

    A folder whose manifest records the same ``parameters`` is reused as it is. Otherwise ``write(tmp)`` fills a
    temporary sibling folder and returns extra manifest fields; the manifest is written last and the folder
    renamed into place, so an interrupted run leaves nothing half-written. A stale folder of the same kind
    (another manifest) or an empty one is replaced; any other non-empty folder or a file is refused. ``what``
    names the dataset in errors.
    """
    if manifest_parameters(root, manifest) == parameters:
        return root
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file; pass a new or empty folder for the {what}")
    if root.exists() and not (root / manifest).is_file() and any(root.iterdir()):
        raise DatasetError(f"{root} exists, is not empty and holds no {manifest}: not replacing it with the {what}; "
                           f"pass a new or empty folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        extra = write(tmp)
        (tmp / manifest).write_text(json.dumps({"parameters": parameters, **extra}, indent=1))
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished the same folder between our check and the rename: use theirs.
            if manifest_parameters(root, manifest) != parameters:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
