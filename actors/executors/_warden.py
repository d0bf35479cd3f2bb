"""The warden: kills an executor's processes when the process that owns it dies.

Every process a subprocess executor starts carries ``TASKFARM_EXECUTOR_ID=<id>`` in its
environment, and so does whatever it starts in turn (environments are inherited).  The
executor also starts one warden process (this file, run as a script: it imports nothing of
taskfarm) and keeps the write end of the warden's stdin.  When the owner dies, however it dies
(SIGKILL, the OOM killer, a crash), the kernel closes that descriptor, the warden reads end of
file, and it SIGKILLs every process that carries the id, with its process group (which catches
descendants that dropped the variable but stayed in the group), then exits.  An orderly close
of the executor closes the pipe too; by then nothing is left to kill.

Why a warden per executor rather than ``prctl(PR_SET_PDEATHSIG)`` in each child:

- a parent-death signal needs code between fork and exec (a ``preexec_fn``), which rules out
  ``vfork``/``posix_spawn`` and costs a full fork of the owner per task;
- it reaches only the direct child, not the grandchildren a renderer or an MPI launcher starts;
- it fires when the *thread* that forked the child exits, not the process: a child started from
  a worker thread would be killed when the thread pool retires that thread.

The warden costs one small process per executor and nothing per task.  It runs in its own
session, so a signal to the owner's process group (Ctrl-C in a terminal) does not take it down
with the owner.  :func:`kill_marked` is also what a restarted agent uses to kill what its
previous incarnation left: the id of an agent's executor is derived from its work directory,
which one agent at a time may use (the agent holds a lock on it).
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["EXECUTOR_ID_VARIABLE", "kill_marked"]

EXECUTOR_ID_VARIABLE = "TASKFARM_EXECUTOR_ID"

# A process may fork while its group is being killed: look again, a few times at most.
_ROUNDS = 5


def _marked(entry: bytes) -> list[int]:
    """Return the pids of the processes whose environment holds ``entry`` exactly."""
    found = []
    own = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                data = environ.read()
        except OSError:
            continue  # gone, or not ours to read
        if entry in data.split(b"\0"):
            found.append(int(name))
    return found


def kill_marked(executor_id: str) -> int:
    """SIGKILL every process (and its process group) that carries ``executor_id``; return how
    many distinct processes were found.

    A pid that was recycled by an unrelated process does not carry the id and is left alone.
    A zombie's environment reads empty, so a process that is already dead is not counted.
    """
    entry = f"{EXECUTOR_ID_VARIABLE}={executor_id}".encode()
    spared = {os.getpgrp(), 0, 1}
    seen: set[int] = set()
    for _ in range(_ROUNDS):
        pids = _marked(entry)
        if not pids:
            break
        seen.update(pids)
        for pid in pids:
            try:
                group = os.getpgid(pid)
            except OSError:
                continue
            try:
                if group not in spared:
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone meanwhile, or not ours
    return len(seen)


def main(argv: list[str]) -> int:
    """Wait for end of file on stdin, then kill the processes marked with ``argv[0]``."""
    (executor_id,) = argv
    # The owner never writes: end of file (or an error) means it closed the pipe or died.
    for name in ("SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    kill_marked(executor_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
