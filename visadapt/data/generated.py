"""Writing a generated dataset folder once, atomically, recognised again by its manifest."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from visadapt.data.errors import DatasetError
from visadapt.progress import announce

logger = logging.getLogger("visadapt")

# flock errors of a filesystem without (working) lock support: NFS without lockd gives ENOLCK ("No locks
# available"); filelock itself falls back to a soft lock on ENOSYS only, and raises the others.
_NO_LOCK_SUPPORT = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
# How long a generation waits for another one's soft lock before giving up with a message (a generation takes
# seconds to a few minutes; a soft lock of a holder that died on another host is never released by itself).
SOFT_LOCK_WAIT_SECONDS = 1800.0


@contextlib.contextmanager
def generation_lock(lock_path: Path, fix: str) -> Iterator[None]:
    """Hold ``filelock.FileLock(lock_path)`` (flock) for a generation; on a filesystem without lock support
    (NFS without lockd: ``ENOLCK``) fall back to ``filelock.SoftFileLock`` on ``<lock_path>.soft`` with a warning.

    The soft lock is a marker file: a holder that died on this host is detected by its PID and taken over;
    one left by another host is waited on for at most ``SOFT_LOCK_WAIT_SECONDS``. Failing that, or if the
    folder cannot hold a marker either, :class:`DatasetError` names the folder and ``fix`` (how to put the
    data on a local disk).
    """
    from filelock import FileLock, SoftFileLock, Timeout  # a dependency of torch and huggingface_hub

    lock = FileLock(lock_path)
    try:
        lock.acquire()
    except OSError as err:
        if err.errno not in _NO_LOCK_SUPPORT:
            raise
        logger.warning("the filesystem of %s does not support file locks (%s); generating under a soft lock "
                       "(%s.soft) instead", lock_path.parent, err.strerror or err, lock_path.name)
        soft = SoftFileLock(f"{lock_path}.soft", timeout=SOFT_LOCK_WAIT_SECONDS)
        try:
            soft.acquire()
        except (OSError, Timeout) as soft_err:
            why = (f"waited {SOFT_LOCK_WAIT_SECONDS:.0f} s for {lock_path}.soft (a generation on another host, or "
                   "one that died there: delete the file if no generation runs)") if isinstance(soft_err, Timeout)                 else f"a soft lock failed too ({soft_err})"
            raise DatasetError(f"cannot lock {lock_path.parent} to generate data there: the filesystem does not "
                               f"support file locks ({err.strerror or err}; NFS without lockd?) and {why}. "
                               f"{fix}") from soft_err
        try:
            yield
        finally:
            soft.release()
        return
    try:
        yield
    finally:
        lock.release()


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
    names the dataset in errors, and in the one line a generation announces (:func:`visadapt.progress.announce`:
    a first run says what it is busy with; ``write`` shows its own progress).
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
    announce(f"generating the {what} once into {root}; later runs reuse it")
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
