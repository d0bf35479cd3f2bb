"""The deadline forecast: a list-scheduling simulation of the queue -- pure.

Jobs are taken in rank order and each remaining task in task order; a task goes to the fitting
node where it can start earliest (then finish earliest, then by name).  A node is modelled as
its cores and GPUs, each free from some time: a task needing c cores starts when c of them are
free, and holds them for its estimated duration on that node (frames x the job's per-frame
estimate, measured once frames finish, over the node's speed).  Running attempts hold theirs
until their estimated end; a sleeping node is available once it has woken up.  The result is
each job's estimated completion, and from it the verdict: will meet (with the margin to spare),
at risk (it meets the deadline but eats into the margin), will miss.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from actors import NodeView, Resources, fits

__all__ = ["ForecastJob", "ForecastNode", "ForecastTask", "Slot", "forecast", "forecast_verdict"]


@dataclass(frozen=True, slots=True)
class ForecastTask:
    """A task still to run: its request, its requirements and its work in seconds on a node
    of speed 1."""

    index: int
    request: Resources
    requires: tuple[str, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class ForecastJob:
    """A job in rank order: its remaining tasks, and when its work may start (a deferral)."""

    job_id: str
    tasks: Sequence[ForecastTask]
    not_before: datetime | None = None


@dataclass(slots=True)
class ForecastNode:
    """A node: its view, when it is available, and the end times of what runs there."""

    view: NodeView
    available_at: float  # seconds from now
    running: list[tuple[Resources, float]] = field(default_factory=list)  # (request, ends in s)


@dataclass(frozen=True, slots=True)
class Slot:
    """A planned run (for the Gantt chart)."""

    job_id: str
    task: int
    node: str
    start: datetime
    end: datetime


class _Units:
    """One node's cores (or GPUs): the time from which each is free, sorted."""

    __slots__ = ("free",)

    def __init__(self, count: int, available: float) -> None:
        self.free = [available] * count

    def start_for(self, count: int) -> float:
        return self.free[count - 1] if count else 0.0

    def take(self, count: int, until: float) -> None:
        del self.free[:count]
        for _ in range(count):
            bisect.insort(self.free, until)


def forecast(
    jobs: Sequence[ForecastJob],
    nodes: Sequence[ForecastNode],
    now: datetime,
    speed: Callable[[str, str], float],
) -> tuple[dict[str, datetime], list[Slot]]:
    """Return each job's estimated completion and the planned slots.

    ``speed(node, job_id)`` is the node's relative speed for the job (1.0: as estimated).
    """
    cores: dict[str, _Units] = {}
    gpus: dict[str, _Units] = {}
    for node in nodes:
        capacity = node.view.capacity
        count = max(1, capacity.millicores // 1000)
        cores[node.view.name] = _Units(count, node.available_at)
        gpus[node.view.name] = _Units(capacity.gpus, node.available_at)
        for request, ends in node.running:
            need = min(count, max(1, request.millicores // 1000))
            _take_earliest(cores[node.view.name], need, max(ends, node.available_at))
            if request.gpus:
                _take_earliest(gpus[node.view.name], min(capacity.gpus, request.gpus), ends)
    completion: dict[str, datetime] = {}
    slots: list[Slot] = []
    for job in jobs:
        floor = max(0.0, (job.not_before - now).total_seconds()) if job.not_before else 0.0
        done = 0.0
        fitting = [
            n
            for n in nodes
            if job.tasks
            and fits(job.tasks[0].request, n.view.capacity)
            and n.view.satisfies(job.tasks[0].requires) is None
        ]
        for task in job.tasks:
            if task.request != job.tasks[0].request or task.requires != job.tasks[0].requires:
                fitting = [
                    n
                    for n in nodes
                    if fits(task.request, n.view.capacity)
                    and n.view.satisfies(task.requires) is None
                ]
            best: tuple[float, float, str] | None = None
            for node in fitting:
                name = node.view.name
                need = min(len(cores[name].free), max(1, task.request.millicores // 1000))
                start = max(floor, cores[name].start_for(need))
                if task.request.gpus:
                    start = max(start, gpus[name].start_for(task.request.gpus))
                end = start + task.seconds / max(1e-6, speed(name, job.job_id))
                if best is None or (start, end, name) < best:
                    best = (start, end, name)
            if best is None:
                continue  # fits nowhere (yet): the engine says why
            start, end, name = best
            need = min(len(cores[name].free), max(1, task.request.millicores // 1000))
            cores[name].take(need, end)
            if task.request.gpus:
                gpus[name].take(task.request.gpus, end)
            done = max(done, end)
            slots.append(
                Slot(
                    job_id=job.job_id,
                    task=task.index,
                    node=name,
                    start=now + timedelta(seconds=start),
                    end=now + timedelta(seconds=end),
                )
            )
        completion[job.job_id] = now + timedelta(seconds=done)
    return completion, slots


def _take_earliest(units: _Units, count: int, until: float) -> None:
    if count <= 0 or not units.free:
        return
    units.take(min(count, len(units.free)), until)


def forecast_verdict(completion: datetime, deadline: datetime | None, margin_s: float) -> str:
    """Return ``will meet``, ``at risk`` or ``will miss`` for an estimated completion."""
    if deadline is None:
        return "no deadline"
    if completion > deadline:
        return "will miss"
    if completion + timedelta(seconds=margin_s) > deadline:
        return "at risk"
    return "will meet"
