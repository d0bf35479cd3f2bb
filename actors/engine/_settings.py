"""The engine's settings (a module of its own: every actor reads them, none owns them)."""

from __future__ import annotations

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

    def snapshot_interval(self, tasks: int) -> int:
        """Return how many events a job of ``tasks`` tasks journals between snapshots (0: none).

        A snapshot holds every task: with one every N events, a job of T tasks would write
        O(T^2 / N) bytes of snapshots.  Snapshotting every 4*T events keeps it O(events).
        """
        every = self.snapshot_every
        return max(every, 4 * tasks) if every else 0
