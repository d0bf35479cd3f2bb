"""Run a task's per-frame processes in sequence, as one attempt, resumable frame by frame.

``python -m actors.executors._frame_runner '[["render", "-f", "1"], ["render", "-f", "2"]]'``:
each process's ``@taskfarm progress`` reports are rescaled to the whole task, other lines pass
through, SIGTERM and SIGUSR1 are forwarded to the running process, and the first failure stops
the sequence with its exit code.

Checkpoints name the frames done: after each finished frame the runner reports
``@taskfarm checkpoint taskfarm-frames:<done>/<total>``, and a checkpoint a frame's own process
reports is wrapped as ``taskfarm-frames:<done>/<total>:<its token>``.  Resumed from such a
token (``TASKFARM_RESUME_FROM``), the runner skips the frames already done and hands the frame
process its own token, if any, as *its* ``TASKFARM_RESUME_FROM``.  A token it does not
recognise (another sequence's, a hand-edited one) is ignored: every frame runs again, which is
slower but never wrong.  On SIGUSR1 the runner also reports its own checkpoint at once, so a
sequence can be checkpointed even while a frame's process cannot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import FrameType

PREFIX = "taskfarm-frames:"
_CHECKPOINT = "@taskfarm checkpoint "
_PROGRESS = "@taskfarm progress "


def checkpoint_token(done: int, total: int, inner: str | None = None) -> str:
    """Return the token of a sequence of ``total`` frames with ``done`` finished (and the
    running frame's own checkpoint ``inner``, if any)."""
    token = f"{PREFIX}{done}/{total}"
    return f"{token}:{inner}" if inner else token


def parse_token(token: str | None, total: int) -> tuple[int, str | None]:
    """Return (frames done, the next frame's own checkpoint) from a resume token; (0, None)
    for no token or one of another sequence."""
    if not token or not token.startswith(PREFIX):
        return 0, None
    counts, _, inner = token[len(PREFIX) :].partition(":")
    done_text, _, total_text = counts.partition("/")
    try:
        done, recorded = int(done_text), int(total_text)
    except ValueError:
        return 0, None
    if recorded != total or not 0 <= done <= total:
        return 0, None
    return done, inner or None


class _Sequence:
    """Where the sequence is: frames done, and the running frame's own last checkpoint."""

    def __init__(self, total: int, done: int, inner: str | None) -> None:
        self.total = total
        self.done = done
        self.inner = inner

    def report_checkpoint(self) -> None:
        # A raw write of one short line: safe from a signal handler too (it cannot re-enter
        # the buffered sys.stdout, which is flushed after every line it writes).
        line = f"{_CHECKPOINT}{checkpoint_token(self.done, self.total, self.inner)}\n"
        os.write(sys.stdout.fileno(), line.encode())


def main(argv: list[str]) -> int:
    """Run the processes; return the exit status of the first failure (or 0)."""
    commands = [list(map(str, command)) for command in json.loads(argv[0])]
    total = len(commands)
    resume = os.environ.pop("TASKFARM_RESUME_FROM", None)
    done, inner = parse_token(resume, total)
    if resume and not done and inner is None:
        print(f"frame runner: ignoring a checkpoint of another sequence: {resume}", file=sys.stderr)
    elif done:
        print(f"frame runner: resuming after frame {done}/{total}", file=sys.stderr, flush=True)
    sequence = _Sequence(total, done, inner)
    current: list[subprocess.Popen[str]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        for process in current:
            process.send_signal(signum)
        if signum == signal.SIGTERM:
            raise SystemExit(128 + signum)
        if sequence.done or sequence.inner:
            sequence.report_checkpoint()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    for number in range(done, total):
        command = commands[number]
        env = dict(os.environ)
        if number == done and inner is not None:
            env["TASKFARM_RESUME_FROM"] = inner  # the frame's own checkpoint, for it alone
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        ) as process:
            current[:] = [process]
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(_PROGRESS):
                    parts = line.split(maxsplit=3)
                    try:
                        fraction = (number + float(parts[2])) / total
                    except (IndexError, ValueError):
                        sys.stdout.write(line)
                    else:
                        rest = f" {parts[3].rstrip()}" if len(parts) > 3 else ""
                        sys.stdout.write(f"{_PROGRESS}{min(fraction, 1.0):.4f}{rest}\n")
                    sys.stdout.flush()
                elif line.startswith(_CHECKPOINT) and line[len(_CHECKPOINT) :].strip():
                    sequence.inner = line[len(_CHECKPOINT) :].strip()
                    sequence.report_checkpoint()
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            status = process.wait()
        current.clear()
        if status != 0:
            print(f"frame command {number + 1}/{total} failed: {command}", file=sys.stderr)
            return status if status > 0 else 128 - status
        sequence.done, sequence.inner = number + 1, None
        print(f"{_PROGRESS}{(number + 1) / total:.4f}", flush=True)
        sequence.report_checkpoint()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
