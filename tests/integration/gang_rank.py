"""One rank of a two-node task, run by real agents: ``gang_rank.py OUT [--hold-first]``.

Rank 0 listens on ``$TASKFARM_LEADER:$TASKFARM_PORT``; every other rank finds it through the
host list (``TASKFARM_NODES``, leader first) and sends ``hello from rank R``; rank 0 answers
``ack`` and writes what it received to ``OUT/exchange-ATTEMPT.txt``.  Every rank writes its pid
to ``OUT/rank-ATTEMPT-RANK.pid``.  With ``--hold-first`` the first attempt's ranks stay running
after the exchange (an attempt to break mid-run); later attempts exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path


def report(line: str) -> None:
    print(f"@taskfarm {line}", flush=True)


def main(out: str, *flags: str) -> int:
    rank = int(os.environ["TASKFARM_NODE_RANK"])
    count = int(os.environ["TASKFARM_NUM_NODES"])
    hosts = os.environ["TASKFARM_NODES"].split(",")
    port = int(os.environ["TASKFARM_PORT"])
    attempt = int(os.environ["TASKFARM_ATTEMPT"])
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{attempt}-{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:
        with socket.create_server((hosts[0], port)) as server:
            server.settimeout(60)
            heard = []
            for _ in range(count - 1):
                peer, _address = server.accept()
                with peer:
                    heard.append(peer.makefile().readline().strip())
                    peer.sendall(b"ack\n")
        (folder / f"exchange-{attempt}.txt").write_text("\n".join(sorted(heard)) + "\n")
        report(f"progress 0.5 heard {len(heard)} rank(s)")
    else:
        # The leader may not listen yet: retry, as an MPI or torchrun worker does.
        deadline = time.monotonic() + 60
        while True:
            try:
                peer = socket.create_connection((hosts[0], port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with peer:
            peer.sendall(f"hello from rank {rank}\n".encode())
            if peer.makefile().readline().strip() != "ack":
                return 3
    if "--hold-first" in flags and attempt == 1:
        while True:
            signal.pause()
    report("progress 1.0 done")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
