"""The engine's settings (a module of its own: every actor reads them, none owns them)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["EngineSettings"]


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Engine-wide knobs (every one has a default a real farm can start with)."""

    snapshot_every: int = 200
    blocklist_after: int = 2  # failures of one job on one node before it avoids that node
    blocklist_for: float = 600.0
    quarantine_after: int = 3  # failed attempts in a row before a node is quarantined ...
    quarantine_distinct_jobs: int = 2  # ... from at least this many different jobs
    cancel_grace: float = 5.0
    preempt_grace: float = 60.0  # how long a preempted attempt has to checkpoint before it stops
    report_timeout: float = 30.0
    restart_grace: float = 30.0  # how long agents have to re-claim their attempts after a restart
    ask_timeout: float = 30.0
    # Farm-wide licence counters (``{"nuke": 10}``), enforced across every node; counters not
    # named here are node-local (an agent's ``--counter NAME=N``).
    counters: Mapping[str, int] = field(default_factory=dict)
    # The ports multi-node attempts' ranks meet on: gang_port_base + [0, gang_port_span).
    gang_port_base: int = 29_500
    gang_port_span: int = 10_000

    def gang_port(self, job_id: str, task: int, token: int) -> int:
        """Return the port the ranks of a multi-node attempt meet on (its leader listens):
        derived from the attempt, so every rank and every retry computes the same one."""
        digest = zlib.crc32(f"{job_id}/{task}/{token}".encode())
        return self.gang_port_base + digest % self.gang_port_span

    def snapshot_interval(self, tasks: int) -> int:
        """Return how many events a job of ``tasks`` tasks journals between snapshots (0: none).

        A snapshot holds every task: with one every N events, a job of T tasks would write
        O(T^2 / N) bytes of snapshots.  Snapshotting every 4*T events keeps it O(events).
        """
        every = self.snapshot_every
        return max(every, 4 * tasks) if every else 0
