"""Progress of long work (evaluation, cache builds, data generation, sampling, export), shown the same way everywhere.

One building block, :class:`Progress` (made by :func:`progress`), over tqdm (a dependency of huggingface_hub):

* **On a terminal** (the stream's ``isatty()``): a tqdm bar; in Jupyter, tqdm's notebook widget (``tqdm.notebook``).
* **Off a terminal** (a log file, a pipe, CI): no bar and no carriage returns. A line when the work starts, one
  at most every :data:`LINE_INTERVAL_S` seconds while it runs, and one when it ends with the count, the time and
  the rate. Work marked ``leave=False`` (transient: an evaluation inside a training run) writes only the periodic
  lines, so a short one adds nothing to the log and a long one is still visible.
* **Only the main process** of a launch prints (Accelerate's ``PartialState`` when one exists, else the ``RANK``
  that ``accelerate launch`` / ``torchrun`` set): ``N`` processes show one bar, not ``N``.
* **Off switch**: ``VISADAPT_NO_PROGRESS=1`` in the environment (any of ``1``, ``true``, ``yes``, ``on``), or the
  ``--no-progress`` flag every visadapt command has (:func:`set_progress_enabled`), silences all of it.

Why not tqdm alone: tqdm redraws with ``\\r`` whatever the stream is, which fills a log file with one long line of
redraws; it has no notion of the main process of a launch; and tqdm's own ``TQDM_DISABLE`` would also silence
other libraries' bars, which a user may want to keep. What tqdm does well (the bar, the notebook widget, the time and
rate formatting of the off-terminal lines) is used as is.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

#: Set to ``1`` (or ``true``/``yes``/``on``) to turn every visadapt progress bar and progress line off.
ENV_VAR = "VISADAPT_NO_PROGRESS"
#: Off a terminal, at most one progress line per this many seconds while work runs (besides start and end).
LINE_INTERVAL_S = 60.0
#: The help text of every ``--no-progress`` flag (the train jobs', ``visadapt-eval``'s, ...).
NO_PROGRESS_HELP = "no progress bars"

_enabled = True  # the process-wide switch of --no-progress (set_progress_enabled)


def set_progress_enabled(enabled: bool) -> None:
    """Turn visadapt's progress output on or off for this process (what ``--no-progress`` does; a command sets it
    from its own flag when it starts). ``VISADAPT_NO_PROGRESS=1`` still wins over ``True``."""
    global _enabled
    _enabled = bool(enabled)


def progress_enabled() -> bool:
    """Whether progress may be shown at all: not switched off by ``--no-progress`` nor by ``VISADAPT_NO_PROGRESS``."""
    return _enabled and os.environ.get(ENV_VAR, "").strip().lower() not in ("1", "true", "yes", "on")


def is_main_process() -> bool:
    """Whether this is the process that shows progress: Accelerate's main process once a ``PartialState`` exists,
    else the process whose ``RANK`` (set by ``accelerate launch`` and ``torchrun``) is 0 or unset.

    Accelerate is consulted only if something already imported it: a process that never did has no state there.
    """
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        return state.PartialState().is_main_process
    return os.environ.get("RANK", "0").strip() in ("", "0")


def shows_progress(enabled: bool = True) -> bool:
    """Whether progress asked for with ``enabled`` is shown here: switched on, and the main process."""
    return enabled and progress_enabled() and is_main_process()


def add_no_progress_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` in the words of every visadapt command; apply it with :func:`apply_no_progress_flag`."""
    parser.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def apply_no_progress_flag(args: argparse.Namespace) -> None:
    """Set the process-wide switch from a parsed ``--no-progress`` (on when the flag is absent or not given)."""
    set_progress_enabled(not getattr(args, "no_progress", False))


def announce(message: str, *, file: IO[str] | None = None) -> None:
    """Print ``message`` as one line on stderr where progress is shown (say what long work starts, and where)."""
    if shows_progress():
        print(message, file=file or sys.stderr, flush=True)


def _stream_is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _notebook_tqdm():
    """tqdm's notebook widget class inside a Jupyter kernel, else ``None``: the test ``tqdm.autonotebook`` makes,
    done without importing IPython where nothing imported it (a plain run never pays for that import)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return None
    try:
        import ipywidgets  # noqa: F401 - tqdm's widget fails at its first bar without it
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:  # no ipywidgets: the plain bar or lines
        return None
    return notebook_tqdm


class Progress:
    """Progress of one piece of work: iterate it over ``iterable``, or call :meth:`update` as work gets done.

    ``total``: the amount of work (default ``len(iterable)`` when it has one); ``initial``: the part already done
    (a resumed job); ``unit``: what is counted (``"images"``); ``leave=False``: transient work (the bar disappears
    when done; off a terminal only the periodic lines). ``enabled=False`` (or the off switch, or a process other
    than the main one) makes it silent; it still iterates and counts. Use it as a context manager or call
    :meth:`close`, which ends the bar or writes the end line once.
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, enabled: bool = True,
                 file: IO[str] | None = None, line_interval: float = LINE_INTERVAL_S):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = int(initial)
        self._initial, self._leave, self._line_interval = int(initial), leave, line_interval
        self._file = file if file is not None else sys.stderr
        self._bar = None
        self._lines = False
        self._periodic = False  # whether a periodic line was written (then a transient one writes its end too)
        self._closed = False
        self._start = self._last_line = time.monotonic()
        if not shows_progress(enabled):
            return
        notebook = _notebook_tqdm() if file is None else None
        if notebook is not None or _stream_is_terminal(self._file):
            from tqdm.std import tqdm

            self._bar = (notebook or tqdm)(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                                           file=None if notebook else self._file, dynamic_ncols=True)
        else:
            self._lines = True
            if leave:
                amount = f"{total} {unit}" if total is not None else unit
                done = f", {initial} done earlier" if initial else ""
                self._write(f"{desc}: started ({amount}{done})")

    @property
    def active(self) -> bool:
        """Whether anything is shown (a bar or lines) for this work."""
        return self._bar is not None or self._lines

    def _write(self, line: str) -> None:
        print(line, file=self._file, flush=True)

    def _counts(self) -> tuple[str, float, float]:
        """``"n/total"`` (or ``"n"``), the seconds since the start, and the rate of this run (units per second)."""
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        return (f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"), elapsed, rate

    def _meter(self) -> str:
        """A periodic line: ``desc: 500/1000 images [01:00<01:00, 8.33 images/s]`` (tqdm's time format)."""
        from tqdm.std import tqdm

        amount, elapsed, rate = self._counts()
        remaining = (f"<{tqdm.format_interval((self.total - self.n) / rate)}"
                     if rate > 0 and self.total is not None else "")
        return f"{self.desc}: {amount} {self.unit} [{tqdm.format_interval(elapsed)}{remaining}, {rate:.3g} {self.unit}/s]"

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units of work done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last_line >= self._line_interval:
            self._last_line = time.monotonic()
            self._periodic = True
            self._write(self._meter())

    def write(self, message: str, file: IO[str] | None = None) -> None:
        """Print ``message`` as a line of its own on ``file`` (default: this work's stream), above the bar on a
        terminal (tqdm clears the bar, prints, and draws it again below). Printed whether progress is shown or
        not: it is a message, not progress."""
        file = file if file is not None else self._file
        if self._bar is not None:
            self._bar.write(message, file=file)
        else:
            print(message, file=file, flush=True)

    def set_description(self, desc: str) -> None:
        """Rename the work (e.g. the file now being evaluated)."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        """End the bar, or off a terminal write the end line (count, time, rate; ``stopped`` instead of ``done`` when
        fewer than ``total`` units were counted: the work failed or was cut short); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines and (self._leave or self._periodic):
            from tqdm.std import tqdm

            amount, elapsed, rate = self._counts()
            ended = "done" if self.total is None or self.n >= self.total else "stopped"
            self._write(f"{self.desc}: {ended}, {amount} {self.unit} in {tqdm.format_interval(elapsed)} "
                        f"({rate:.3g} {self.unit}/s)")

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress has no iterable; call update() as work gets done")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, **options: Any) -> Progress:
    """A :class:`Progress` (same arguments): ``for batch in progress(loader, desc="evaluating", unit="batches")``."""
    return Progress(iterable, **options)

