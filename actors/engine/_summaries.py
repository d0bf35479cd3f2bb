"""What ``status`` and ``nodes`` show of jobs, tasks and nodes (also sent over the wire)."""

from __future__ import annotations

import msgspec

from ._resources import Resources

__all__ = ["JobSummary", "NodeSummary", "RecoverySummary", "TaskSummary"]


class TaskSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One task, as ``taskfarm status JOB`` shows it."""

    index: int
    status: str
    attempt: int = 0
    node: str | None = None
    progress: float = 0.0
    checkpoint: str | None = None
    last_error: str | None = None
    name: str = ""
    frames: tuple[int, int] | None = None
    preview: str | None = None
    metrics: dict[str, float] = {}
    runtime_s: float = 0.0
    cpu_s: float | None = None  # measured CPU seconds of its ended attempts (None: unmeasured)
    peak_rss: int = 0  # the largest resident memory one of them reached (bytes)
    nodes: tuple[str, ...] = ()  # the node of every attempt, in order
    held_reason: str | None = None
    started_at: str | None = None  # of the running attempt (ISO), when known
    # the checkpoints the task keeps (oldest first), and why its last resume fell back
    checkpoints: tuple[str, ...] = ()
    resume_note: str | None = None


class JobSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One job, as ``taskfarm status`` shows it."""

    job_id: str
    name: str
    status: str
    priority: str
    submitted_at: str
    finished_at: str | None = None
    tasks_total: int = 0
    task_counts: dict[str, int] = {}
    progress: float = 0.0
    reason: str | None = None
    tasks: tuple[TaskSummary, ...] = ()
    metrics: dict[str, float] = {}  # the latest value of each metric its tasks reported
    domain: dict[str, str] = {}  # the policy's columns (``Policy.describe``)
    owner: str | None = None  # who submitted it (None: unknown, or the join token)
    # every metric value its tasks reported, in report order: name -> ((task, value), ...)
    # (with the tasks only: it grows with the job)
    metric_series: dict[str, tuple[tuple[int, float], ...]] = {}


class NodeSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One node, as ``taskfarm nodes`` shows it."""

    name: str
    health: str
    capacity: Resources
    free: Resources
    running: int = 0
    labels: tuple[str, ...] = ()
    remote: bool = False
    consecutive_failures: int = 0
    drain_at: str | None = None
    reason: str = ""  # why it has its health (quarantined after ..., draining for ...)
    by: str | None = None  # the operator who set that health, when a client credential did


class RecoverySummary(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine rebuilt from its journal when it opened (all zero for a new journal)."""

    jobs: int = 0  # every job in the journal, finished ones included
    unfinished: int = 0  # jobs that still have work to do
    in_doubt: int = 0  # attempts that were out on a node when the previous process stopped
    nodes: int = 0  # nodes the journal knows
    orphans: int = 0  # jobs ended because their parent was never journaled
