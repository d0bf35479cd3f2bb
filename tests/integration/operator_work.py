"""A program for the operator-verb tests, run by real agents: ``operator_work.py MODE [ARG]``.

- ``quiet``: prints a line and runs until stopped, reporting nothing (no progress);
- ``report VALUE``: reports a preview, the metric ``psnr`` = VALUE and 50 % progress, resumes
  from ``$TASKFARM_RESUME_FROM`` (saying so), checkpoints on SIGUSR1, runs until stopped;
- ``fail-once MARKER``: fails (exit 3) the first time, creating MARKER; succeeds after;
- ``metric VALUE``: reports the metric ``psnr`` = VALUE and exits 0.

Report lines are flushed at once (stdout is a pipe).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType


def report(line: str) -> None:
    print(f"@taskfarm {line}", flush=True)


def wait_for_signals() -> int:
    while True:
        signal.pause()


def main(mode: str, argument: str = "") -> int:
    print(f"{mode} started, attempt {os.environ.get('TASKFARM_ATTEMPT')}", flush=True)
    if mode == "quiet":
        return wait_for_signals()
    if mode == "report":
        resumed = os.environ.get("TASKFARM_RESUME_FROM")
        if resumed:
            print(f"resumed from {resumed}", flush=True)
        checkpoints = 0

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            nonlocal checkpoints
            checkpoints += 1
            path = Path(os.environ["TASKFARM_CHECKPOINT_DIR"], f"state-{checkpoints}")
            path.write_text(str(checkpoints))
            report(f"checkpoint {path}")

        signal.signal(signal.SIGUSR1, on_usr1)
        report(f"preview /previews/{os.environ['TASKFARM_TASK_ID']}.png")
        report(f"metric psnr {argument}")
        report("progress 0.5 half way")
        return wait_for_signals()
    if mode == "fail-once":
        marker = Path(argument)
        if marker.exists():
            return 0
        marker.write_text("failed once")
        return 3
    if mode == "metric":
        report(f"metric psnr {argument}")
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
