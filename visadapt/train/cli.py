"""``visadapt-train COMMAND [options]``: one entry point for every training job of :mod:`visadapt.train`.

``visadapt-train --help`` lists the commands; ``visadapt-train vtab --help`` shows that job's options.
Arguments after the command are the job's own, exactly as ``train/<command>.py`` takes them.
"""
from __future__ import annotations

import difflib
import sys

from visadapt.train import COMMANDS, run

#: how the console script is invoked; ``python -m visadapt.train`` passes its own spelling
PROG = "visadapt-train"


def usage(prog: str = PROG) -> str:
    """What ``--help`` prints: the usage line and the command list."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    also = "python -m visadapt.train" if prog == PROG else PROG
    return (f"usage: {prog} COMMAND [options]   (also: {also} COMMAND ...)\n\n"
            f"Train with visadapt; `{prog} COMMAND --help` shows a command's options.\n\ncommands:\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to its command; 2 with one ``error:`` line (and a
    did-you-mean where a command is close) for an unknown or missing command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(prog), end="")
        return 0
    short_usage = f"usage: {prog} COMMAND [options]   ({prog} --help lists the commands)"
    if not argv:  # as argparse does for a missing required argument: the usage line, then one error line
        print(f"{short_usage}\nerror: give a command: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)  # selma_data, vpr.py, vtba find theirs
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{short_usage}\nerror: unknown command {command!r}{hint} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    return run(command, rest, prog=f"{prog} {command}")
