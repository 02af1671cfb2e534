"""Child processes of a benchmark, run with a time limit that ends the whole process group when it is hit.

``subprocess.run(timeout=...)`` kills only the direct child; a training child's DataLoader workers (and a
``train/vtab.py`` run's cache-building processes) would go on decoding images on the cores the next measurement
needs. The child here starts its own session, and on a timeout, or on any exception in the waiting process
(``gpu_suite.py``'s time-cap alarm included), the whole group is killed before the error is passed on.
"""
from __future__ import annotations

import os
import signal
import subprocess


class ChildFailed(RuntimeError):
    """A benchmark child exited with an error status; the message ends with the tail of its output."""


def run_child(command: list[str], timeout: float | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session and return its completed process (stdout/stderr as text).

    ``timeout`` (seconds, None: no limit): when it passes, the child's whole process group is killed and
    :class:`subprocess.TimeoutExpired` is raised, as ``subprocess.run`` raises it. A non-zero exit status is
    returned, not raised (the caller says what failed).
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen_kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:  # a timeout, Ctrl-C or a time-cap alarm of the caller: nothing of the child survives
        _kill_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    process.communicate()  # reap it and close the pipes


def output_tail(done: subprocess.CompletedProcess, chars: int = 3000) -> str:
    """The last ``chars`` characters of a finished child's stdout and stderr, for an error message."""
    return f"{(done.stdout or '')[-chars:]}\n{(done.stderr or '')[-chars:]}"
