"""Known and expected work per project and day: the queue's floor plus expected arrivals.

A capacity planner does not forecast a cluster's next weeks from its history alone: the queue
already holds work (running stages, stages waiting on them, simulations not started yet) with
its estimates and widths, which no model of the daily totals can see.  The
``queue_and_arrivals`` forecast method is the sum of two parts, both computed as of a moment
``at`` from the journal's events before it only (so that it can be backtested honestly):

- **Known work** (the queue).  Each unfinished, unpaused simulation's stages are laid out in
  dependency order: a running stage for what is left of its duration (its estimate, else its
  walltime times the median share of their walltime finished stages used, else the median
  runtime of finished stages of the same name; minus the time it has run, over all its
  attempts, since a restart resumes from a checkpoint); a stage whose parents are done but
  which has not started after the median queue wait of recent submissions; every other stage
  when its parents end.  Each stage counts its cores x nodes over the days it spans.
- **Expected arrivals** (work not submitted yet).  ``G(a)``, the core-hours used on day ``a``
  after their submission day by the simulations submitted on one day, averaged over the
  ``window`` most recent submission days whose day ``a`` is complete; a future day ``D`` then
  expects ``sum(G(D - c))`` over the future submission days ``c <= D``.  This is arrivals
  (how many simulations a day) times their size and shape (how wide, for how long, after what
  wait) in one empirical kernel, learned per project, with no assumption about either.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

__all__ = ["Ledger", "StagePlan"]

_DAY = timedelta(days=1)


@dataclass
class _Stage:
    name: str
    width: float  # cores x nodes
    estimate: float | None  # seconds, the simulation's own estimate
    walltime: float | None  # seconds
    parents: tuple[int, ...]
    runs: list[tuple[datetime, datetime | None]] = field(default_factory=list)
    # When it ended for good (completed, skipped, cancelled, failed without a retry: True)
    # or became runnable again (a new attempt, a retry: False), in order; read as of a moment
    # so that a backtest sees only what was known then.
    ends: list[tuple[datetime, bool]] = field(default_factory=list)

    def ended(self, at: datetime) -> datetime | None:
        """Return when the stage ended for good, as known at ``at`` (None: it had not)."""
        state = [(when, final) for when, final in self.ends if when < at]
        return state[-1][0] if state and state[-1][1] else None


@dataclass
class _Job:
    project: str
    submitted: datetime
    stages: list[_Stage]
    ends: list[tuple[datetime, bool]] = field(default_factory=list)  # finished / reopened

    def finished(self, at: datetime) -> bool:
        """Return whether the simulation had finished, as known at ``at``."""
        state = [final for when, final in self.ends if when < at]
        return bool(state) and state[-1]

    pauses: list[tuple[datetime, datetime | None]] = field(default_factory=list)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _spread(table: dict[date, float], width: float, start: datetime, end: datetime) -> None:
    """Add ``width`` cores from ``start`` to ``end`` to ``table`` as core-hours per UTC day."""
    at = start
    while at < end:
        day = at.astimezone(UTC).date()
        until = min(end, _midnight(day) + _DAY)
        table[day] = table.get(day, 0.0) + width * (until - at).total_seconds() / 3600.0
        at = until


class Ledger:
    """Every simulation's stages and attempts, folded from the journal (by ``daily_usage``),
    from which the queue and the arrivals can be read as of any moment."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}
        self.last: datetime | None = None  # the last event folded
        self._plans: dict[tuple[datetime, int, float, int, datetime | None], _Plan] = {}

    # -- folding (the caller matches the events; see ``_usage.daily_usage``) ----------------

    def submitted(
        self, job_id: str, project: str, at: datetime, stages: Sequence[StagePlan]
    ) -> None:
        """Record a submission: each stage's name, width, estimate, walltime and parents."""
        self.jobs[job_id] = _Job(
            project=project,
            submitted=at,
            stages=[
                _Stage(
                    name=s.name,
                    width=s.width,
                    estimate=s.estimate,
                    walltime=s.walltime,
                    parents=s.parents,
                )
                for s in stages
            ],
        )

    def widened(self, job_id: str, task: int, width: float) -> None:
        """Record an attempt's real width (its cores x the nodes it was given)."""
        stage = self._stage(job_id, task)
        if stage is not None:
            stage.width = width

    def started(self, job_id: str, task: int, at: datetime) -> None:
        """Record an attempt's start (a later attempt re-opens a stage that failed)."""
        stage = self._stage(job_id, task)
        if stage is not None:
            stage.runs.append((at, None))
            stage.ends.append((at, False))

    def stopped(self, job_id: str, task: int, at: datetime, *, final: bool) -> None:
        """Record an attempt's end; ``final``: the stage will not run again."""
        stage = self._stage(job_id, task)
        if stage is None:
            return
        if stage.runs and stage.runs[-1][1] is None:
            stage.runs[-1] = (stage.runs[-1][0], at)
        if final:
            stage.ends.append((at, True))

    def finished(self, job_id: str, at: datetime) -> None:
        """Record the simulation's end."""
        if job_id in self.jobs:
            self.jobs[job_id].ends.append((at, True))

    def reopened(self, job_id: str, tasks: Sequence[int], at: datetime) -> None:
        """Record that a finished simulation's ``tasks`` run again (``taskfarm retry``)."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.ends.append((at, False))
        for task in tasks:
            if 0 <= task < len(job.stages):
                job.stages[task].ends.append((at, False))

    def paused(self, job_id: str, at: datetime) -> None:
        """Record a pause (no new attempts until resumed)."""
        if job_id in self.jobs:
            self.jobs[job_id].pauses.append((at, None))

    def resumed(self, job_id: str, at: datetime) -> None:
        """Record a resumption."""
        job = self.jobs.get(job_id)
        if job is not None and job.pauses and job.pauses[-1][1] is None:
            job.pauses[-1] = (job.pauses[-1][0], at)

    def _stage(self, job_id: str, task: int) -> _Stage | None:
        job = self.jobs.get(job_id)
        if job is None or not 0 <= task < len(job.stages):
            return None
        return job.stages[task]

    # -- reading --------------------------------------------------------------------------

    def _of(self, project: str | None, at: datetime) -> list[_Job]:
        return [
            j
            for j in self.jobs.values()
            if j.submitted < at and (project is None or j.project == project)
        ]

    def known(
        self,
        project: str | None,
        at: datetime,
        days: Sequence[date],
        *,
        window: int = 28,
        stale: float = 7.0,
    ) -> list[float]:
        """Return the core-hours the queue as of ``at`` holds for each of ``days``
        (``project`` None: every project's); a stage ready for more than ``stale`` days
        without starting is held, and not counted."""
        jobs = self._of(project, at)
        plan = self._plan(at, window, stale)
        table: dict[date, float] = {}
        for job in jobs:
            if job.finished(at):
                continue
            if any(start < at and (end is None or end >= at) for start, end in job.pauses):
                continue  # paused: when (or whether) it resumes is not known
            ends: list[datetime | None] = []
            for stage in job.stages:
                begin, end = _project(stage, job, ends, at, plan)
                ends.append(end)
                if end is not None and end > begin:
                    _spread(table, stage.width, begin, end)
        return [table.get(day, 0.0) for day in days]

    def _plan(self, at: datetime, window: int, stale: float) -> _Plan:
        """What every project's queue shares as of ``at`` (once per moment: each series of a
        forecast, and each backtest origin, asks for the same ones)."""
        key = (at, window, stale, len(self.jobs), self.last)
        plan = self._plans.get(key)
        if plan is None:
            everyone = self._of(None, at)
            plan = self._plans[key] = _Plan(
                walltime_share=_walltime_share(everyone, at),
                typical=_typical_runtimes(everyone, at),
                wait=timedelta(seconds=_queue_wait(everyone, at, window)),
                stale=timedelta(days=stale),
            )
        return plan

    def arrivals(
        self,
        project: str | None,
        at: datetime,
        days: Sequence[date],
        *,
        first: date,
        window: int = 28,
    ) -> list[float]:
        """Return the core-hours expected on each of ``days`` (consecutive, from the first day
        whose submissions are not known at ``at``) from simulations not submitted yet, by the
        kernel ``G`` learned from the submissions of ``first`` up to ``at``."""
        if not days:
            return []
        complete = at.astimezone(UTC).date()  # the days before it are complete at ``at``
        by_day: dict[date, list[dict[date, float]]] = {}
        for job in self._of(project, at):
            used: dict[date, float] = {}
            for stage in job.stages:
                for start, end in stage.runs:
                    if start < at:
                        _spread(used, stage.width, start, min(end or at, at))
            by_day.setdefault(job.submitted.astimezone(UTC).date(), []).append(used)
        ages = (days[-1] - days[0]).days + 1
        kernel: list[float] = []
        for age in range(ages):
            # The ``window`` latest submission days whose day ``age`` is complete.
            latest = complete - timedelta(days=age + 1)
            span = [latest - timedelta(days=k) for k in range(window)]
            span = [c for c in span if c >= first]
            if not span:
                kernel.append(0.0)
                continue
            total = sum(
                used.get(c + timedelta(days=age), 0.0) for c in span for used in by_day.get(c, [])
            )
            kernel.append(total / len(span))
        # Day D expects the kernel at every age D - c, over the submission days c up to D.
        totals = [0.0]
        for value in kernel:
            totals.append(totals[-1] + value)
        return [totals[(day - days[0]).days + 1] for day in days]


@dataclass(frozen=True)
class StagePlan:
    """A stage as submitted: its name, cores x nodes, estimate and walltime (seconds) and the
    indexes of the stages it waits on."""

    name: str
    width: float
    estimate: float | None
    walltime: float | None
    parents: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    walltime_share: float  # of a stage without an estimate, the share of its walltime it runs
    typical: dict[str, float]  # median runtime by stage name
    wait: timedelta  # from ready to started, usually
    stale: timedelta  # ready for longer than this without starting: held


def _ran(stage: _Stage, at: datetime) -> float:
    """Seconds the stage has run before ``at``, over all its attempts."""
    return sum(
        (min(end or at, at) - start).total_seconds() for start, end in stage.runs if start < at
    )


def _done(stage: _Stage, at: datetime) -> bool:
    return stage.ended(at) is not None


def _walltime_share(jobs: Sequence[_Job], at: datetime) -> float:
    """The median share of its walltime a finished stage without an estimate ran (1 if none)."""
    shares = [
        _ran(s, at) / s.walltime
        for j in jobs
        for s in j.stages
        if _done(s, at) and s.walltime and s.runs
    ]
    return statistics.median(shares) if shares else 1.0


def _typical_runtimes(jobs: Sequence[_Job], at: datetime) -> dict[str, float]:
    """The median runtime of finished stages, by stage name."""
    runtimes: dict[str, list[float]] = {}
    for job in jobs:
        for stage in job.stages:
            if _done(stage, at) and stage.runs:
                runtimes.setdefault(stage.name, []).append(_ran(stage, at))
    return {name: statistics.median(values) for name, values in runtimes.items()}


def _queue_wait(jobs: Sequence[_Job], at: datetime, window: int) -> float:
    """The median seconds from submission to the first start, over the simulations submitted
    in the last ``window`` days that started before ``at`` (0 if none)."""
    since = at - timedelta(days=window)
    waits = [
        (j.stages[0].runs[0][0] - j.submitted).total_seconds()
        for j in jobs
        if j.submitted >= since and j.stages and j.stages[0].runs and j.stages[0].runs[0][0] < at
    ]
    return statistics.median(waits) if waits else 0.0


def _project(
    stage: _Stage,
    job: _Job,
    ends: Sequence[datetime | None],
    at: datetime,
    plan: _Plan,
) -> tuple[datetime, datetime | None]:
    """Return when the stage is expected to run from and to, as known at ``at``: an empty span
    for a stage that is done, and no end for one that is not expected to run (held, or after
    a held one)."""
    if _done(stage, at):
        return at, at
    if stage.estimate is not None:
        duration = stage.estimate
    elif stage.walltime is not None:
        duration = stage.walltime * plan.walltime_share
    else:
        duration = plan.typical.get(stage.name, 0.0)
    left = timedelta(seconds=max(0.0, duration - _ran(stage, at)))
    if any(start < at and (end is None or end >= at) for start, end in stage.runs):
        return at, at + left
    parents = [p for p in stage.parents if p < len(ends)]
    known = [ends[p] for p in parents]
    if any(end is None for end in known):
        return at, None
    if all(_done(job.stages[p], at) for p in parents):
        # Ready and waiting: for the usual queue wait, unless it has waited so much longer
        # that something holds it (an operator, a policy's pruning) and nothing says when
        # it will go.
        ready = max([job.submitted, *(job.stages[p].ended(at) or at for p in parents)])
        if at - ready > plan.stale:
            return at, None
        begin = max(at, ready + plan.wait)
    else:
        begin = max([at, *(end for end in known if end is not None)])
    return begin, begin + left
