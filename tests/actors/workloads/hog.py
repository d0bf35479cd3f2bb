"""A child program that uses resources, for the usage tests: ``hog.py MB CPU_S CHILDREN THEN``.

It touches ``MB`` MiB of memory (resident, not merely reserved), burns ``CPU_S`` seconds of CPU,
runs ``CHILDREN`` copies of itself (each ``MB`` and ``CPU_S`` too) that it waits for and reaps,
then says ``@taskfarm progress 0.5 ready`` (a report line, and a line a test can wait for) and
either exits (``THEN`` = ``exit``) or waits until it is killed (``hang``).
"""

from __future__ import annotations

import subprocess
import sys
import time


def main(megabytes: int, cpu_s: float, children: int, then: str) -> int:
    hoard = bytearray(b"\x01") * (megabytes * 2**20)  # every page written: resident
    deadline = time.process_time() + cpu_s
    spin = 0
    while time.process_time() < deadline:
        spin += 1
    for _ in range(children):
        subprocess.run(
            [sys.executable, __file__, str(megabytes), str(cpu_s), "0", "exit"], check=True
        )
    print("@taskfarm progress 0.5 ready", flush=True)
    if then == "hang":
        while True:
            time.sleep(60)
    return 0 if hoard and spin >= 0 else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
