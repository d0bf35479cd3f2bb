"""A child program for the subprocess executor tests: ``child.py MODE [ARGS]``.

Each mode exercises one part of the attempt protocol (report lines, signals, the environment).
Report lines are flushed at once: stdout is a pipe, so it is block-buffered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn


def report(line: str) -> None:
    print(f"@taskfarm {line}", flush=True)


def hang() -> NoReturn:
    while True:
        time.sleep(60)


def main(mode: str, *args: str) -> int:
    if mode == "exit":
        print("hello from stdout", flush=True)
        print("first stderr line", file=sys.stderr, flush=True)
        print("last stderr line", file=sys.stderr, flush=True)
        sys.stdout.write("a partial line")
        return int(args[0])
    if mode == "report":
        print("plain log line", flush=True)
        report("progress 0.5 half way there")
        report("checkpoint ck-1")
        report("preview /previews/frame 12.png")
        report("metric frame_time 1.5")
        report("checkpoint ck-2")
        return 0
    if mode == "malformed":
        for line in ["progress lots", "progress 1.5", "bogus x", "metric x", "checkpoint", ""]:
            report(line)
        print("@taskfarmer is a log line", flush=True)
        report("progress 1.0 done")
        return 0
    if mode == "env":
        names = [name for name in os.environ if name.startswith("TASKFARM_")] + ["CUSTOM"]
        values = {name: os.environ.get(name) for name in names}
        values["cwd"] = os.getcwd()
        Path(os.environ["TASKFARM_OUTPUT_DIR"], "env.json").write_text(json.dumps(values))
        return 0
    if mode == "checkpoint-on-signal":
        requested = False

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            nonlocal requested
            requested = True

        signal.signal(signal.SIGUSR1, on_usr1)
        report("progress 0.0 ready")
        while not requested:
            signal.pause()
        path = Path(os.environ["TASKFARM_CHECKPOINT_DIR"], "state.json")
        path.write_text("{}")
        report(f"checkpoint {path}")
        return 0
    if mode == "spawn":
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        report(f"metric grandchild_pid {grandchild.pid}")
        hang()
    if mode == "report-sigterm":

        def on_term(signum: int, frame: FrameType | None) -> None:
            report("metric sigterm 1")

        signal.signal(signal.SIGTERM, on_term)
        report("progress 0.0 ready")
        hang()
    if mode == "hang":
        report("progress 0.1 started")
        hang()
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
