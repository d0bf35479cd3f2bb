"""A checkpointing program for the checkpoint tests: ``stepper.py --steps N --every K ...``.

It evolves a state one step at a time (a SHA-256 chain: deterministic, so a resumed run must end
exactly where an uninterrupted one does), and every K steps writes a checkpoint folder
``$TASKFARM_CHECKPOINT_DIR/step-NNNNNN`` (``state.json`` and a ``data.bin`` derived from the
state), then its manifest, and reports it with ``@taskfarm checkpoint --manifest``.  Resumed
(``TASKFARM_RESUME_FROM``), it starts from that folder's state.  The result goes to
``--output`` as JSON.

Test knobs: ``--pause-at S`` blocks after the checkpoint of step S when it started fresh (an
attempt to kill mid-run); ``--tear-at S`` truncates that checkpoint's data after writing its
manifest (a torn checkpoint); ``--hold`` waits for SIGUSR1 before exiting; ``--env FILE``
writes the TASKFARM_* environment it started with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from actors.executors import write_manifest


def report(line: str) -> None:
    print(f"@taskfarm {line}", flush=True)


def advance(state: str, step: int) -> str:
    return hashlib.sha256(f"{state}:{step}".encode()).hexdigest()


def data_of(state: str, size: int) -> bytes:
    return hashlib.shake_256(state.encode()).digest(size)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--tear-at", type=int)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--env")
    args = parser.parse_args()
    signalled = False

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        nonlocal signalled
        signalled = True

    signal.signal(signal.SIGUSR1, on_usr1)
    if args.hold:
        # Blocked until sigwait: a request that comes early is kept, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    if args.env:
        values = {k: v for k, v in os.environ.items() if k.startswith("TASKFARM_")}
        Path(args.env).write_text(json.dumps(values))
    resume = os.environ.get("TASKFARM_RESUME_FROM")
    step, state = 0, "start"
    if resume:
        saved = json.loads(Path(resume, "state.json").read_text())
        step, state = saved["step"], saved["state"]
        print(f"resuming at step {step} from {resume}", flush=True)
    root = Path(os.environ["TASKFARM_CHECKPOINT_DIR"])
    while step < args.steps:
        step += 1
        state = advance(state, step)
        if step % args.every == 0:
            folder = root / f"step-{step:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "data.bin").write_bytes(data_of(state, args.size))
            (folder / "state.json").write_text(json.dumps({"step": step, "state": state}))
            manifest = write_manifest(folder)
            if step == args.tear_at:
                with (folder / "data.bin").open("r+b") as file:
                    file.truncate(args.size // 2)
            report(f"progress {step / args.steps:.4f} step {step}")
            report(f"checkpoint --manifest {manifest}")
            if step == args.pause_at and not resume:
                while True:
                    signal.pause()
    Path(args.output).write_text(json.dumps({"step": step, "state": state}))
    report("progress 1 done")
    if args.hold and not signalled:
        signal.sigwait({signal.SIGUSR1})
    return 0


if __name__ == "__main__":
    sys.exit(main())
