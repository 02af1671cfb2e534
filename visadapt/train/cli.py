"""``visadapt-train COMMAND [options]``: one entry point for every training job of :mod:`visadapt.train`.

``visadapt-train --help`` lists the commands; ``visadapt-train vtab --help`` shows that job's options. Arguments
after the command are the job's own, exactly as ``train/<command>.py`` takes them.
"""
from __future__ import annotations

import sys

from visadapt.train import COMMANDS, run


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: visadapt-train COMMAND [options]   (also: python -m visadapt.train COMMAND ...)\n\n"
            "Train with visadapt; `visadapt-train COMMAND --help` shows a command's options.\n\ncommands:\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{usage()}\nerror: unknown command {command!r}{hint} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    return run(command, rest)
