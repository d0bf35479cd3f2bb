"""Usage per project per day: allocated (a projection of the journal) and measured (the
coordinator's usage store, when there is one).

An attempt is allocated from its start (``TaskStarted``) to its end (completed, failed,
requeued or cancelled), its cores times its nodes; a running attempt counts until the last
event of the journal.  Each attempt is split over the UTC days it spans.

Measured usage is what the processes really used: the CPU seconds agents sampled, which the
coordinator keeps per job, node and minute (then hour) in ``<journal>.usage.db``.  It is read
as CPU core-hours per day (CPU seconds / 3,600), each job's under the project the journal gives
it.  The store keeps minutes for a day and hours for a year (``taskfarm serve
--keep-usage-*``), and samples only exist since agents sent them, so measured usage may cover
fewer days than the journal; allocations are what is forecast (they are complete, and they are
what a grant is charged), measured core-hours are reported beside them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import msgspec

from actors import (
    JobFinished,
    JobPaused,
    JobReopened,
    JobResumed,
    JobSubmitted,
    SubmitJob,
    TaskAssigned,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskRequeued,
    TaskSkipped,
    TaskStarted,
)
from persistence import Journal, RecordedEvent, UsageRow, open_usage_store

from ._backlog import Ledger, StagePlan
from ._model import SimulationMetadata

__all__ = ["CLUSTER", "Usage", "add_measured", "daily_usage", "read_measured", "read_usage"]

CLUSTER = "(cluster)"


@dataclass
class Usage:
    """Core-hours per project per UTC day, from ``first`` to ``last``."""

    first: date | None = None
    last: date | None = None
    by_project: dict[str, dict[date, float]] = field(default_factory=dict)
    # Measured CPU core-hours per project per day; None: no usage store was read.
    measured: dict[str, dict[date, float]] | None = None
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> project, from the journal
    # Every simulation's stages and attempts: the queue and the arrivals as of any moment.
    ledger: Ledger = field(default_factory=Ledger)

    def days(self) -> list[date]:
        """Return every day from the first to the last."""
        if self.first is None or self.last is None:
            return []
        return [self.first + timedelta(days=k) for k in range((self.last - self.first).days + 1)]

    def series(self, project: str = CLUSTER) -> list[float]:
        """Return one value per day (0 where nothing ran); ``CLUSTER`` sums every project."""
        days = self.days()
        if project == CLUSTER:
            return [sum(p.get(d, 0.0) for p in self.by_project.values()) for d in days]
        table = self.by_project.get(project, {})
        return [table.get(d, 0.0) for d in days]

    def measured_series(self, project: str = CLUSTER) -> list[float] | None:
        """Return measured CPU core-hours per day, like :meth:`series` (None: not measured)."""
        if self.measured is None:
            return None
        days = self.days()
        if project == CLUSTER:
            return [sum(p.get(d, 0.0) for p in self.measured.values()) for d in days]
        table = self.measured.get(project, {})
        return [table.get(d, 0.0) for d in days]

    def queue_and_arrivals(
        self, project: str, origin: int, horizon: int, *, window: int = 28, stale: float = 7.0
    ) -> list[float]:
        """Forecast ``horizon`` days from day ``origin`` (counted from ``first``) as known
        then: the queue's work plus expected arrivals (see ``_backlog``).  The moment is the
        start of day ``origin``, or, for the day after the last, the last event (now)."""
        if self.first is None or horizon <= 0:
            return [0.0] * max(0, horizon)
        start = self.first + timedelta(days=origin)
        midnight = datetime(start.year, start.month, start.day, tzinfo=UTC)
        at = midnight
        if origin >= len(self.days()) and self.ledger.last is not None:
            # Now: just after the last event (so that it is known), within the last day.
            now = self.ledger.last + timedelta(seconds=1)
            at = min(max(now, midnight - timedelta(days=1)), midnight)
        days = [start + timedelta(days=k) for k in range(horizon)]
        who = None if project == CLUSTER else project
        known = self.ledger.known(who, at, days, window=window, stale=stale)
        expected = self.ledger.arrivals(who, at, days, first=self.first, window=window)
        return [k + e for k, e in zip(known, expected, strict=True)]

    def projects(self) -> list[str]:
        """Return the projects that used anything, sorted."""
        return sorted(self.by_project)

    def monthly(
        self, project: str = CLUSTER, *, per_node_cores: float | None = None
    ) -> dict[str, float]:
        """Return core-hours (or node-hours, given the cores of a node) per ``YYYY-MM``."""
        return _months(self.days(), self.series(project), per_node_cores)

    def measured_monthly(
        self, project: str = CLUSTER, *, per_node_cores: float | None = None
    ) -> dict[str, float] | None:
        """Return measured CPU core-hours (or node-hours) per ``YYYY-MM`` (None: not measured)."""
        series = self.measured_series(project)
        return None if series is None else _months(self.days(), series, per_node_cores)


def _months(
    days: list[date], series: list[float], per_node_cores: float | None
) -> dict[str, float]:
    months: dict[str, float] = defaultdict(float)
    for day, value in zip(days, series, strict=True):
        months[f"{day.year:04d}-{day.month:02d}"] += value / (per_node_cores or 1.0)
    return dict(months)


def _span(usage: Usage, day: date) -> None:
    usage.first = day if usage.first is None else min(usage.first, day)
    usage.last = day if usage.last is None else max(usage.last, day)


def _add(usage: Usage, project: str, cores: float, start: datetime, end: datetime) -> None:
    table = usage.by_project.setdefault(project, {})
    at = start
    while at < end:
        day = at.astimezone(UTC).date()
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        until = min(end, midnight)
        table[day] = table.get(day, 0.0) + cores * (until - at).total_seconds() / 3600.0
        at = until
    for day in (start.astimezone(UTC).date(), end.astimezone(UTC).date()):
        _span(usage, day)


def daily_usage(records: Iterable[RecordedEvent]) -> Usage:
    """Fold journal records (in order) into core-hours per project per day."""
    usage = Usage()
    projects: dict[str, str] = {}
    cores: dict[str, list[float]] = {}
    nodes: dict[tuple[str, int], int] = {}
    started: dict[tuple[str, int], datetime] = {}
    last: datetime | None = None
    ledger = usage.ledger
    for record in records:
        last = ledger.last = record.timestamp
        if not record.stream_id.startswith("job:"):
            continue
        job_id = record.stream_id[4:]
        event = record.event
        at = record.timestamp
        match event:
            case JobSubmitted(job=spec):
                try:
                    metadata = spec.metadata_as(SimulationMetadata)
                except msgspec.ValidationError:
                    metadata = SimulationMetadata()
                project = metadata.project or "default"
                projects[job_id] = usage.jobs[job_id] = project
                cores[job_id] = [spec.task_resources(i).cores for i in range(len(spec.tasks))]
                ledger.submitted(job_id, project, at, _plans(spec, metadata))
            case TaskAssigned(task=task, nodes=gang):
                nodes[(job_id, task)] = max(1, len(gang))
                if job_id in cores:
                    ledger.widened(job_id, task, cores[job_id][task] * max(1, len(gang)))
            case TaskStarted(task=task, at=began):
                # When it started (its event may be journaled a moment later).
                started[(job_id, task)] = began or at
                ledger.started(job_id, task, began or at)
            case (
                TaskCompleted(task=task)
                | TaskFailed(task=task)
                | TaskRequeued(task=task)
                | TaskCancelled(task=task)
            ):
                begin = started.pop((job_id, task), None)
                if begin is not None and job_id in projects:
                    width = cores[job_id][task] * nodes.get((job_id, task), 1)
                    _add(usage, projects[job_id], width, begin, at)
                again = isinstance(event, TaskRequeued) or (
                    isinstance(event, TaskFailed) and (event.retry_at is not None or event.held)
                )
                ledger.stopped(job_id, task, at, final=not again)
            case TaskSkipped(task=task):
                ledger.stopped(job_id, task, at, final=True)
            case JobFinished():
                ledger.finished(job_id, at)
            case JobPaused():
                ledger.paused(job_id, at)
            case JobResumed():
                ledger.resumed(job_id, at)
            case JobReopened(tasks=tasks):
                ledger.reopened(job_id, tasks, at)
            case _:
                pass
    if last is not None:
        for (job_id, task), begin in started.items():
            if job_id in projects and last > begin:
                width = cores[job_id][task] * nodes.get((job_id, task), 1)
                _add(usage, projects[job_id], width, begin, last)
        if usage.first is not None:
            # The history runs to today even if nothing ran today: what was submitted
            # today is in the queue the forecast starts from.
            _span(usage, last.astimezone(UTC).date())
    return usage


def _plans(spec: SubmitJob, metadata: SimulationMetadata) -> list[StagePlan]:
    """Each task of a job as the ledger plans it: width (its cores x nodes), the
    simulation's estimate, the walltime, and the tasks of the same job it waits on."""
    parents: dict[int, list[int]] = {}
    for dependency in spec.dependencies:
        child, parent = dependency.child_task, dependency.parent_task
        if dependency.parent == spec.job_id and child is not None and parent is not None:
            parents.setdefault(child, []).append(parent)
    return [
        StagePlan(
            name=task.name,
            width=spec.task_resources(i).cores * spec.task_nodes(i),
            estimate=metadata.estimates.get(task.name),
            walltime=task.max_runtime,
            parents=tuple(sorted(parents.get(i, []))),
        )
        for i, task in enumerate(spec.tasks)
    ]


async def read_usage(journal: Journal) -> Usage:
    """Read the whole journal and return its allocated usage."""

    async def records() -> AsyncIterator[RecordedEvent]:
        async for batch in journal.read_all(until_position=await journal.last_position()):
            for record in batch:
                yield record

    collected = [record async for record in records()]
    return daily_usage(collected)


def add_measured(usage: Usage, rows: Iterable[UsageRow]) -> None:
    """Fold a usage store's rows into ``usage.measured``: each job row's CPU seconds, as
    core-hours, on its bucket's UTC day under the job's project (``default`` for a job the
    journal does not know); host rows (no job) carry no CPU and are skipped."""
    measured = usage.measured if usage.measured is not None else {}
    usage.measured = measured
    for row in rows:
        if not row.job or row.cpu_s <= 0:
            continue
        day = datetime.fromtimestamp(row.bucket, UTC).date()
        table = measured.setdefault(usage.jobs.get(row.job, "default"), {})
        table[day] = table.get(day, 0.0) + row.cpu_s / 3600.0
        _span(usage, day)


async def read_measured(path: str | Path, usage: Usage) -> None:
    """Add the measured usage in the usage store at ``path`` to ``usage``: every hour it keeps,
    and the minutes after its last hour (the ones not rolled up yet, so nothing counts twice).

    Raises:
        JournalFileError: the file is not a usage store.
    """
    async with open_usage_store(path) as store:
        hours = await store.query("hour", since=0)
        # Minutes are rolled up an hour at a time, from the oldest on: every minute before the
        # end of the last hour held is in the hours already.
        since = hours[-1].bucket + 3600 if hours else 0
        minutes = await store.query("minute", since=since)
    add_measured(usage, [*hours, *minutes])
