"""What every training job checks before any work, and how a failed task leaves its output folder.

A job's ``main`` checks its cheap inputs first (flags, recipe, task and adapter names, the data folder,
output folders already holding a run) and reports the first problem in one ``error:`` line with exit code 2,
before it builds a model or contacts the hub. A task's output folder is created when the task starts
(:func:`task_output_dir`); if the task then fails, the folders it created are removed again when they hold no
file, so a failed run leaves no empty ``<output>/<task>/`` behind.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path


def check_data_root(data_root: str | os.PathLike, layout: str, flag: str = "--data-root") -> Path:
    """``data_root`` as a ``Path`` if it is a folder this process can list; else ``ValueError`` naming it, the
    ``flag`` that gave it and ``layout`` (what the folder should hold, e.g. ``"one directory per task"``)."""
    root = Path(data_root)
    if not root.exists():
        raise ValueError(f"{flag} {root} does not exist; pass the folder holding {layout}")
    if not root.is_dir():
        raise ValueError(f"{flag} {root} is a file, not a folder; pass the folder holding {layout}")
    try:
        next(os.scandir(root), None)
    except OSError as err:
        raise ValueError(f"{flag} {root} cannot be read ({err.strerror or err}); check its "
                         f"permissions") from None
    return root


def refuse_existing_runs(folders: Iterable[Path], *, resume: bool, overwrite: bool) -> None:
    """``FileExistsError`` when any of ``folders`` (the output folders of the tasks a run will train)
    already holds files and the run neither resumes nor overwrites: checked for every task before the first
    one trains; :func:`visadapt.engine.prepare_output_dir` refuses a task's folder through it as well."""
    if resume or overwrite:
        return
    taken = [folder for folder in folders if folder.is_dir() and any(folder.iterdir())]
    if taken:
        more = f" (and {len(taken) - 1} more task folders)" if len(taken) > 1 else ""
        raise FileExistsError(f"{taken[0]} already holds a run{more}; pass --resume to continue it or "
                              f"--overwrite to replace it")


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove each of ``folders`` that holds no file: its empty subfolders first, then itself. A folder with
    any file in it stays as it is (``rmdir`` removes only empty folders, so nothing a run wrote is lost)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for path, _, _ in os.walk(folder, topdown=False):
            with contextlib.suppress(OSError):  # not empty, or another process of the launch removed it
                os.rmdir(path)


@contextlib.contextmanager
def task_output_dir(out: Path, *, resume: bool, overwrite: bool, state) -> Iterator[Path]:
    """:func:`visadapt.engine.prepare_output_dir` for one task, undone on failure: when the body raises,
    ``out`` and the parent folders this call created are removed if they hold no file, then the error
    propagates."""
    from visadapt.engine import prepare_output_dir

    created_parents = [parent for parent in out.parents if not parent.exists()]  # innermost first
    prepare_output_dir(out, resume=resume, overwrite=overwrite, state=state)
    try:
        yield out
    except BaseException:
        remove_empty_folders([out, *created_parents])
        raise


def report_error(err: BaseException, state=None) -> int:
    """Print ``error: <err>`` on one line (on the main process only when ``state``, a ``PartialState``, is
    given) and return the exit code 2."""
    if state is None or state.is_main_process:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)
    return 2
