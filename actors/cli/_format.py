"""What ``status``, ``status --watch``, ``status --json`` and ``nodes`` show an operator.

Pure functions of the summaries the coordinator sends (and its time, ``as_of``), so tables
test them without a farm.  Tasks are shown as the spec named them (``stage-2``, a chunk
``11-20``), with their frames, node, attempt, and progress; a running task that reports no
progress shows how long it has run (``running 0:41``) instead of a 0 % that never moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from actors.cluster import JobUsageNow
from actors.engine import JobSummary, NodeSummary, TaskSummary, format_size

from ._parsing import format_elapsed

__all__ = [
    "FINISHED",
    "EtaEstimator",
    "elapsed_s",
    "format_counts",
    "format_jobs",
    "format_nodes",
    "format_progress",
    "jobs_json",
    "watch_counts",
]

FINISHED = ("completed", "failed", "cancelled")
"""The statuses of a job that has ended."""
# The counts an operator watches first, in this order; any other status follows.
_COUNT_ORDER = ("running", "assigned", "pending", "blocked", "held", "completed", "failed")


def elapsed_s(task: TaskSummary, as_of: datetime | None) -> float | None:
    """Return how long a running task's attempt has run at ``as_of`` (None: not running, or
    its start is unknown, as for an attempt in doubt after a restart)."""
    if task.status != "running" or task.started_at is None or as_of is None:
        return None
    started = datetime.fromisoformat(task.started_at)
    return max(0.0, (as_of - started).total_seconds())


def format_progress(task: TaskSummary, as_of: datetime | None) -> str:
    """Return a task's PROGRESS cell: a percentage, or ``running 0:41`` for a running task
    that reports no progress."""
    if task.status == "running" and task.progress <= 0.0:
        elapsed = elapsed_s(task, as_of)
        return "running" if elapsed is None else f"running {format_elapsed(elapsed)}"
    return f"{task.progress:.0%}"


def format_counts(counts: dict[str, int]) -> str:
    """Return task counts as ``2 running, 5 pending, 1 blocked, 3 completed``."""
    order = [s for s in _COUNT_ORDER if counts.get(s)]
    order += sorted(s for s in counts if s not in _COUNT_ORDER and counts[s])
    return ", ".join(f"{counts[s]} {s}" for s in order) or "no tasks"


def watch_counts(job: JobSummary) -> str:
    """Return what a watcher needs at a glance: what runs, what waits its turn, what waits
    on another task, and how many are done (``2 running, 5 pending, 1 blocked, 3/11 done``)."""
    counts = job.task_counts
    running = counts.get("running", 0) + counts.get("assigned", 0)
    parts = [
        f"{running} running",
        f"{counts.get('pending', 0)} pending",
        f"{counts.get('blocked', 0)} blocked",
    ]
    parts += [f"{counts[s]} {s}" for s in ("held", "failed") if counts.get(s)]
    parts.append(f"{counts.get('completed', 0)}/{job.tasks_total} done")
    return ", ".join(parts)


def _frames(task: TaskSummary) -> str:
    if task.frames is None:
        return ""
    first, last = task.frames
    return str(first) if first == last else f"{first}-{last}"


def _metrics(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in sorted(values.items()))


def _task_lines(tasks: Sequence[TaskSummary], as_of: datetime | None) -> list[str]:
    # A FRAMES column only when it says more than the names (chunks are named by their frames).
    show_frames = any(t.frames is not None and t.name != _frames(t) for t in tasks)
    width = max([len("TASK"), *(len(t.name or str(t.index)) for t in tasks)])
    width = min(width, 32)
    header = f"    {'TASK':<{width}} "
    if show_frames:
        header += f"{'FRAMES':<11} "
    header += f"{'STATUS':<10} {'NODE':<16} {'ATTEMPT':>7}  PROGRESS"
    lines = [header]
    for task in tasks:
        line = f"    {(task.name or str(task.index)):<{width}} "
        if show_frames:
            line += f"{_frames(task) or '-':<11} "
        line += (
            f"{task.status:<10} {task.node or '-':<16} {task.attempt:>7}  "
            f"{format_progress(task, as_of)}"
        )
        lines.append(line)
        notes = []
        if task.held_reason and task.status == "held":
            notes.append(f"held: {task.held_reason}")
        elif task.last_error and task.status != "completed":
            notes.append(f"last error: {task.last_error}")
        if task.preview:
            notes.append(f"preview: {task.preview}")
        if task.metrics:
            notes.append(f"metrics: {_metrics(task.metrics)}")
        lines.extend(f"    {'':<{width}}   {note}" for note in notes)
    return lines


def format_jobs(jobs: Iterable[JobSummary], *, as_of: datetime | None = None) -> str:
    """Render job summaries as a table: each job, its policy's columns, its latest metrics,
    and its tasks when the summary has them."""
    lines = [f"{'JOB':<24} {'STATUS':<11} {'PRIORITY':<9} {'PROGRESS':>8}  TASKS"]
    for job in jobs:
        lines.append(
            f"{job.job_id:<24} {job.status:<11} {job.priority:<9} {job.progress:>7.0%}  "
            f"{format_counts(job.task_counts)}"
        )
        if job.reason:
            lines.append(f"    reason: {job.reason}")
        lines.extend(f"    {key}: {value}" for key, value in job.domain.items())
        if job.metrics:
            lines.append(f"    metrics: {_metrics(job.metrics)}")
        if job.tasks:
            lines.extend(_task_lines(job.tasks, as_of))
    return "\n".join(lines)


def jobs_json(
    jobs: Iterable[JobSummary],
    *,
    as_of: datetime | None,
    with_tasks: bool,
    usage: Iterable[JobUsageNow] | None = None,
) -> list[dict[str, Any]]:
    """Return job summaries as JSON-able data.  Without ``with_tasks`` the ``tasks`` and
    ``metric_series`` keys are left out (rather than shown empty, which would read as "no
    tasks"); with it, every running task carries ``elapsed_s``.  With ``usage`` (measured
    usage of running attempts), every job has a ``usage`` key: its running attempts' usage as
    last sampled, or null when none was sampled."""
    result = []
    measured = {u.job_id: u for u in usage} if usage is not None else None
    for job in jobs:
        data: dict[str, Any] = msgspec.to_builtins(job)
        if measured is not None:
            now = measured.get(job.job_id)
            data["usage"] = None
            if now is not None:
                data["usage"] = msgspec.to_builtins(now)
                data["usage"].pop("job_id", None)
        if not with_tasks:
            data.pop("tasks", None)
            data.pop("metric_series", None)
        else:
            for task, task_data in zip(job.tasks, data["tasks"], strict=True):
                elapsed = elapsed_s(task, as_of)
                if elapsed is not None:
                    task_data["elapsed_s"] = round(elapsed, 3)
        result.append(data)
    return result


def format_nodes(nodes: Iterable[NodeSummary]) -> str:
    """Render node summaries as a table (with why a node has its health, when it says)."""
    header = ("NODE", "HEALTH", "RUNNING", "CORES FREE", "MEMORY FREE")
    lines = [
        f"{header[0]:<20} {header[1]:<12} {header[2]:>7}  {header[3]:>12}  {header[4]:>18}  LABELS"
    ]
    for node in nodes:
        cores = f"{node.free.cores:g}/{node.capacity.cores:g}"
        memory = f"{format_size(node.free.memory)}/{format_size(node.capacity.memory)}"
        lines.append(
            f"{node.name:<20} {node.health:<12} {node.running:>7}  {cores:>12}  {memory:>18}  "
            f"{','.join(node.labels)}"
        )
        notes = []
        if node.drain_at:
            notes.append(f"drains at {node.drain_at}")
        if node.reason:
            notes.append(node.reason)
        if node.by and notes:
            notes[-1] += f" (by {node.by})"
        if notes:
            lines.append(f"    {'; '.join(notes)}")
    return "\n".join(lines)


@dataclass
class EtaEstimator:
    """Estimate when jobs finish from the progress seen while watching: the rate since the
    first sample in which a job had progress left (the coordinator's clock, not ours)."""

    _first: dict[str, tuple[datetime, float]] = field(default_factory=dict)

    def eta_s(self, job: JobSummary, as_of: datetime | None) -> float | None:
        """Return the seconds left (None: unknown yet, or the job has finished)."""
        if as_of is None or job.status in FINISHED:
            return None
        first = self._first.setdefault(job.job_id, (as_of, job.progress))
        seconds = (as_of - first[0]).total_seconds()
        done = job.progress - first[1]
        if done <= 0 or seconds <= 0:
            return None
        return (1.0 - job.progress) * seconds / done

    def describe(self, job: JobSummary, as_of: datetime | None) -> str:
        """Return ``ETA 3:20``, ``ETA -`` (unknown yet) or ``done``."""
        if job.status in FINISHED:
            return job.status
        eta = self.eta_s(job, as_of)
        return "ETA -" if eta is None else f"ETA {format_elapsed(eta)}"
