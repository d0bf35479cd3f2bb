"""A stand-in for a power command, run by a real agent or coordinator:
``power_command.py MARKER [--stop-parent | --suspend-parent] ARG...``.

Writes its arguments (one a line) to MARKER, atomically (the test reads either nothing or all
of it); with ``--stop-parent`` it then SIGTERMs its parent process (the agent that ran it), as
a suspended host takes its agent away; with ``--suspend-parent`` it SIGSTOPs it, as a suspended
host freezes its agent with its connection still open.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main(marker: str, *arguments: str) -> int:
    signals = {"--stop-parent": signal.SIGTERM, "--suspend-parent": signal.SIGSTOP}
    parent_signal = signals.get(arguments[0]) if arguments else None
    if parent_signal is not None:
        arguments = arguments[1:]
    path = Path(marker)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(f"{argument}\n" for argument in arguments))
    partial.replace(path)
    if parent_signal is not None:
        os.kill(os.getppid(), parent_signal)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
