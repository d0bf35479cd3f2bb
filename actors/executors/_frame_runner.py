"""Run a task's per-frame processes in sequence, as one attempt.

``python -m actors.executors._frame_runner '[["render", "-f", "1"], ["render", "-f", "2"]]'``: each
process's ``@taskfarm progress`` reports are rescaled to the whole task, other lines pass
through, SIGTERM and SIGUSR1 are forwarded to the running process, and the first failure stops
the sequence with its exit code.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    """Run the processes; return the exit status of the first failure (or 0)."""
    commands = [list(map(str, command)) for command in json.loads(argv[0])]
    current: list[subprocess.Popen[str]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        for process in current:
            process.send_signal(signum)
        if signum == signal.SIGTERM:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    total = len(commands)
    for number, command in enumerate(commands):
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as process:
            current[:] = [process]
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith("@taskfarm progress "):
                    parts = line.split(maxsplit=3)
                    try:
                        fraction = (number + float(parts[2])) / total
                    except (IndexError, ValueError):
                        sys.stdout.write(line)
                    else:
                        rest = f" {parts[3].rstrip()}" if len(parts) > 3 else ""
                        sys.stdout.write(f"@taskfarm progress {min(fraction, 1.0):.4f}{rest}\n")
                else:
                    sys.stdout.write(line)
                sys.stdout.flush()
            status = process.wait()
        current.clear()
        if status != 0:
            print(f"frame command {number + 1}/{total} failed: {command}", file=sys.stderr)
            return status if status > 0 else 128 - status
        print(f"@taskfarm progress {(number + 1) / total:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
