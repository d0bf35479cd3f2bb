"""The audit: "what happened and why", answered from the journal alone -- a projection.

One pass over the journal's records in order folds the engine's facts (submissions, assignments,
preemptions, losses, failures, previews, node health) and the render farm's own (priority
transitions, deadline verdicts, energy modes, configuration changes) into a timeline and the
farm's figures: utilization, on-time rate, turnaround per client, preemptions, failures and
energy (kWh and cost per job, client and mode).

Energy uses the configuration journaled in ``policy:render-farm`` (node classes and their watts,
a node's own ``watts.*`` labels, the tariffs): a node draws ``idle + (busy - idle) x the share
of its cores in use`` awake and ``sleep`` asleep; an attempt is charged ``busy x its share of
the node's cores`` for its duration, and what no attempt is charged is the farm's idle draw.
A node's outage is not in the journal (it looks idle); a simulation passes its outages.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from actors import (
    JobAmended,
    JobFinished,
    JobSubmitted,
    NodeHealthChanged,
    NodeRegistered,
    Resources,
    TaskAssigned,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskPreempted,
    TaskPreviewed,
    TaskRequeued,
    parse_labels,
)
from persistence import RecordedEvent

from ._config import EnergyMode, FarmConfig
from ._deadline import format_seconds
from ._energy import PriceTimeline
from ._events import (
    DeadlineVerdictChanged,
    EnergyModeChanged,
    FarmConfigChanged,
    PriorityChanged,
)
from ._models import RenderMetadata, node_class_of, node_watts

__all__ = ["AuditEntry", "AuditProjection", "audit_records"]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the timeline."""

    at: datetime
    kind: str
    text: str
    job: str | None = None
    node: str | None = None
    client: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the entry for ``--json``."""
        return {
            "at": self.at.isoformat(),
            "kind": self.kind,
            "job": self.job,
            "node": self.node,
            "client": self.client,
            "text": self.text,
        }


@dataclass(slots=True)
class _Job:
    client: str | None
    deadline: datetime | None
    submitted_at: datetime
    request: Resources
    tasks: list[tuple[int, int] | None]
    preview_tasks: int = 0
    finished_at: datetime | None = None
    outcome: str | None = None
    kwh: float = 0.0
    cost: float = 0.0
    first_preview_at: datetime | None = None
    render_seconds: float = 0.0
    preemptions: int = 0
    failures: int = 0


@dataclass(slots=True)
class _Attempt:
    node: str
    start: float
    millicores: int


@dataclass(slots=True)
class _Node:
    capacity: Resources
    labels: dict[str, str]
    events: list[tuple[float, int, float]] = field(default_factory=list)  # (t, kind, value)


# Node timeline event kinds, in the order they apply at one instant.
_SLEEP, _WAKE, _USE = 0, 1, 2


class AuditProjection:
    """Folds journal records, in order, into the timeline and the figures."""

    def __init__(self, *, config: FarmConfig | None = None, keep_entries: bool = True) -> None:
        self.config = config
        self.keep_entries = keep_entries
        self.entries: list[AuditEntry] = []
        self.jobs: dict[str, _Job] = {}
        self.nodes: dict[str, _Node] = {}
        self.modes: list[tuple[float, EnergyMode]] = []
        self.first: datetime | None = None
        self.last: datetime | None = None
        self.preemptions = 0
        self.failures = 0
        self.lost = 0
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._busy: list[tuple[str, str, float, float, int]] = []  # job, node, start, end, mc

    # -- folding --------------------------------------------------------------------------------

    def feed(self, records: Iterable[RecordedEvent]) -> None:
        """Fold records (in journal order)."""
        for record in records:
            self._fold(record)

    def _note(self, at: datetime, kind: str, text: str, **where: str | None) -> None:
        if self.keep_entries:
            self.entries.append(AuditEntry(at=at, kind=kind, text=text, **where))

    def _fold(self, record: RecordedEvent) -> None:
        at = record.timestamp
        if self.first is None:
            self.first = at
        self.last = at
        stream = record.stream_id
        event = record.event
        kind, _, name = stream.partition(":")
        if kind == "job":
            self._job_event(name, at, event)
        elif kind == "node":
            self._node_event(name, at, event)
        elif stream == "policy:render-farm":
            self._policy_event(at, event)

    def _client(self, job_id: str) -> str | None:
        job = self.jobs.get(job_id)
        return job.client if job is not None else None

    def _job_event(self, job_id: str, at: datetime, event: Any) -> None:
        t = at.timestamp()
        client = self._client(job_id)
        match event:
            case JobSubmitted(job=spec, submitted_at=submitted):
                meta = _metadata(spec.metadata)
                client = meta.render.client if meta is not None else None
                deadline = meta.effective_deadline if meta is not None else None
                plan = meta.render.plan if meta is not None else None
                self.jobs[job_id] = _Job(
                    client=client,
                    deadline=deadline,
                    submitted_at=submitted,
                    request=spec.resources,
                    tasks=[
                        (task.start, task.end)
                        if task.start is not None and task.end is not None
                        else None
                        for task in spec.tasks
                    ],
                    preview_tasks=(len(plan.passes) + plan.strides) if plan is not None else 0,
                )
                due = f", deadline {deadline.isoformat()}" if deadline else ""
                self._note(
                    at,
                    "submitted",
                    f"submitted: {len(spec.tasks)} tasks, priority {spec.priority.value}"
                    f"{f', client {client}' if client else ''}{due}"
                    f"{f', by {spec.owner}' if spec.owner else ''}",
                    job=job_id,
                    client=client,
                )
            case TaskAssigned(task=task, node=node, attempt=attempt, resume_from=resume):
                previous = self._attempts.pop((job_id, task), None)
                if previous is not None:
                    self._end(job_id, previous, t)
                job = self.jobs.get(job_id)
                request = job.request if job is not None else Resources()
                self._attempts[(job_id, task)] = _Attempt(
                    node=node, start=t, millicores=request.millicores
                )
                self._node(node).events.append((t, _USE, request.millicores))
                frames = self._frames(job_id, task)
                self._note(
                    at,
                    "scheduled",
                    f"task {task}{frames} scheduled on {node} (attempt {attempt}"
                    f"{', resuming from ' + resume if resume else ''})",
                    job=job_id,
                    node=node,
                    client=client,
                )
            case TaskCompleted(task=task, runtime_s=runtime):
                self._finish_attempt(job_id, task, t)
                job = self.jobs.get(job_id)
                if job is not None:
                    job.render_seconds += runtime
                    if task < job.preview_tasks and job.first_preview_at is None:
                        job.first_preview_at = at
                        self._note(
                            at,
                            "preview",
                            f"first preview ready (task {task}{self._frames(job_id, task)}) "
                            f"{format_seconds((at - job.submitted_at).total_seconds())} after "
                            "submission",
                            job=job_id,
                            client=client,
                        )
            case TaskFailed(task=task, error=error, outcome=outcome):
                ended = self._finish_attempt(job_id, task, t)
                self.failures += 1
                job = self.jobs.get(job_id)
                if job is not None:
                    job.failures += 1
                self._note(
                    at,
                    "failed",
                    f"task {task} failed ({outcome}): {error or '-'}",
                    job=job_id,
                    node=ended.node if ended else None,
                    client=client,
                )
            case TaskRequeued(task=task, reason=reason, lost=lost):
                ended = self._finish_attempt(job_id, task, t)
                if lost:
                    self.lost += 1
                self._note(
                    at,
                    "node lost" if lost else "requeued",
                    f"task {task} {'lost' if lost else 'requeued'}: {reason}",
                    job=job_id,
                    node=ended.node if ended else None,
                    client=client,
                )
            case TaskPreempted(task=task, node=node, reason=reason):
                self.preemptions += 1
                job = self.jobs.get(job_id)
                if job is not None:
                    job.preemptions += 1
                self._note(
                    at,
                    "preempted",
                    f"task {task} preempted on {node}: {reason}",
                    job=job_id,
                    node=node,
                    client=client,
                )
            case TaskPreviewed(task=task, path=path):
                job = self.jobs.get(job_id)
                if job is not None and job.first_preview_at is None:
                    job.first_preview_at = at
                self._note(
                    at, "preview", f"preview of task {task}: {path}", job=job_id, client=client
                )
            case TaskCancelled(task=task):
                self._finish_attempt(job_id, task, t)
            case JobAmended(changes=changes, metadata=metadata):
                job = self.jobs.get(job_id)
                if metadata is not None and job is not None:
                    meta = _metadata(metadata)
                    if meta is not None:
                        job.deadline = meta.effective_deadline
                self._note(
                    at, "amended", "amended: " + "; ".join(changes), job=job_id, client=client
                )
            case JobFinished(outcome=outcome, reason=reason):
                for key in [k for k in self._attempts if k[0] == job_id]:
                    self._finish_attempt(job_id, key[1], t)
                job = self.jobs.get(job_id)
                verdict = ""
                if job is not None:
                    job.finished_at, job.outcome = at, outcome
                    if job.deadline is not None and outcome == "completed":
                        spare = (job.deadline - at).total_seconds()
                        verdict = (
                            f", {format_seconds(spare)} before the deadline"
                            if spare >= 0
                            else f", LATE by {format_seconds(-spare)}"
                        )
                self._note(
                    at,
                    "finished",
                    f"{outcome}{verdict}{': ' + reason if reason else ''}",
                    job=job_id,
                    client=client,
                )
            case _:
                pass

    def _frames(self, job_id: str, task: int) -> str:
        job = self.jobs.get(job_id)
        if job is None or task >= len(job.tasks) or job.tasks[task] is None:
            return ""
        first, last = job.tasks[task]  # type: ignore[misc]
        return f" (frame {first})" if first == last else f" (frames {first}-{last})"

    def _finish_attempt(self, job_id: str, task: int, t: float) -> _Attempt | None:
        attempt = self._attempts.pop((job_id, task), None)
        if attempt is not None:
            self._end(job_id, attempt, t)
        return attempt

    def _end(self, job_id: str, attempt: _Attempt, t: float) -> None:
        self._node(attempt.node).events.append((t, _USE, -attempt.millicores))
        self._busy.append((job_id, attempt.node, attempt.start, t, attempt.millicores))

    def _node(self, name: str) -> _Node:
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = _Node(capacity=Resources(), labels={})
        return node

    def _node_event(self, name: str, at: datetime, event: Any) -> None:
        t = at.timestamp()
        match event:
            case NodeRegistered(capacity=capacity, labels=labels):
                node = self._node(name)
                node.capacity = capacity
                node.labels = parse_labels(labels)
                self._note(
                    at,
                    "node joined",
                    f"node {name} joined ({capacity}; class "
                    f"{node_class_of(node.labels) or 'default'})",
                    node=name,
                )
            case NodeHealthChanged(
                health=health, reason=reason, by=by, drain_at=drain_at, operator=operator
            ):
                node = self._node(name)
                node.events.append((t, _SLEEP if health == "sleeping" else _WAKE, 0.0))
                kind = "node failed" if health == "quarantined" else "node health"
                when = f" at {drain_at.isoformat()}" if drain_at else ""
                self._note(
                    at,
                    kind,
                    f"node {name} {health}{when} "
                    f"(by {operator or by}{': ' + reason if reason else ''})",
                    node=name,
                )
            case _:
                pass

    def _policy_event(self, at: datetime, event: Any) -> None:
        t = at.timestamp()
        match event:
            case FarmConfigChanged(config=config, changes=changes, by=by):
                first = self.config is None or not self.modes
                self.config = config
                if first and not self.modes:
                    self.modes.append((t, config.energy.mode))
                self._note(at, "config", f"configuration ({by}): " + "; ".join(changes))
            case EnergyModeChanged(mode=mode, previous=previous, reason=reason, by=by):
                self.modes.append((t, mode))
                self._note(at, "mode", f"energy mode {previous} -> {mode} (by {by}: {reason})")
            case PriorityChanged(job_id=job_id, previous=previous, current=current, reason=reason):
                self._note(
                    at,
                    "priority",
                    f"effective priority {previous} -> {current}: {reason}",
                    job=job_id,
                    client=self._client(job_id),
                )
            case DeadlineVerdictChanged(job_id=job_id, verdict=judged, reason=reason):
                self._note(
                    at,
                    "deadline",
                    f"deadline {judged}: {reason}",
                    job=job_id,
                    client=self._client(job_id),
                )
            case _:
                pass

    # -- the figures ----------------------------------------------------------------------------

    def metrics(
        self,
        *,
        outages: Mapping[str, Sequence[tuple[datetime, datetime | None]]] | None = None,
    ) -> dict[str, Any]:
        """Return utilization, on-time rate, turnaround per client, preemptions, failures and
        energy (kWh and cost in total, per client, per mode, and idle)."""
        energy = self._energy(outages or {})
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        due = [j for j in finished if j.deadline is not None and j.outcome == "completed"]
        on_time = [j for j in due if j.finished_at is not None and j.finished_at <= j.deadline]  # type: ignore[operator]
        turnaround: dict[str, list[float]] = defaultdict(list)
        for job in finished:
            if job.outcome == "completed" and job.finished_at is not None:
                turnaround[job.client or "-"].append(
                    (job.finished_at - job.submitted_at).total_seconds()
                )
        return {
            "from": self.first.isoformat() if self.first else None,
            "to": self.last.isoformat() if self.last else None,
            "jobs": len(self.jobs),
            "finished": len(finished),
            "utilization": energy.pop("utilization"),
            "on_time": len(on_time),
            "with_deadline": len(due),
            "on_time_rate": len(on_time) / len(due) if due else None,
            "turnaround_s": {
                client: {
                    "jobs": len(values),
                    "mean": statistics.fmean(values),
                    "median": statistics.median(values),
                }
                for client, values in sorted(turnaround.items())
            },
            "preemptions": self.preemptions,
            "failures": self.failures,
            "lost": self.lost,
            "energy": energy,
        }

    def _watts(self, name: str) -> tuple[float, float, float]:
        node = self.nodes[name]
        config = self.config
        if config is None:
            base = (100.0, 300.0, 5.0)
        else:
            node_class = config.node_class(node_class_of(node.labels))
            base = (node_class.idle_watts, node_class.busy_watts, node_class.sleep_watts)
        idle, busy, sleep = node_watts(node.labels)
        return (
            idle if idle is not None else base[0],
            busy if busy is not None else base[1],
            sleep if sleep is not None else base[2],
        )

    def _energy(
        self, outages: Mapping[str, Sequence[tuple[datetime, datetime | None]]]
    ) -> dict[str, Any]:
        if self.first is None or self.last is None:
            return {"kwh": 0.0, "cost": 0.0, "utilization": None}
        end = self.last.timestamp()
        for (job_id, _task), attempt in self._attempts.items():
            self._busy.append((job_id, attempt.node, attempt.start, end, attempt.millicores))
        self._attempts.clear()
        config = self.config or FarmConfig(clients=())
        prices = PriceTimeline(config, self.first, self.last)
        modes = self.modes or [(self.first.timestamp(), config.energy.mode)]
        by_mode: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        total_kwh = total_cost = 0.0
        busy_core_s = available_core_s = 0.0
        for name, node in self.nodes.items():
            idle, busy, sleep = self._watts(name)
            cores = node.capacity.millicores or 1
            marks = sorted(
                [*node.events, *((t, _WAKE + 10, 0.0) for t, _ in modes)],
                key=lambda e: (e[0], e[1]),
            )
            down = [(a.timestamp(), (b or self.last).timestamp()) for a, b in outages.get(name, ())]
            used = 0.0
            asleep = False
            moment = self.first.timestamp()
            for t, kind, value in [*marks, (end, _WAKE + 20, 0.0)]:
                t = min(max(t, moment), end)
                if t > moment:
                    watts = sleep if asleep else idle + (busy - idle) * min(1.0, used / cores)
                    for a, b in _minus(moment, t, down):
                        kwh, cost = prices.energy(watts, a, b)
                        total_kwh += kwh
                        total_cost += cost
                        mode = _mode_at(modes, a)
                        by_mode[mode][0] += kwh
                        by_mode[mode][1] += cost
                        if not asleep:
                            busy_core_s += used / 1000 * (b - a)
                            available_core_s += cores / 1000 * (b - a)
                    moment = t
                if kind == _SLEEP:
                    asleep = True
                elif kind == _WAKE:
                    asleep = False
                elif kind == _USE:
                    used = max(0.0, used + value)
        per_client: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        attributed_kwh = attributed_cost = 0.0
        for job_id, node_name, start, stop, millicores in self._busy:
            _, busy, _ = self._watts(node_name)
            share = millicores / (self.nodes[node_name].capacity.millicores or 1)
            kwh, cost = prices.energy(busy * min(1.0, share), start, stop)
            job = self.jobs.get(job_id)
            if job is not None:
                job.kwh += kwh
                job.cost += cost
                per_client[job.client or "-"][0] += kwh
                per_client[job.client or "-"][1] += cost
            attributed_kwh += kwh
            attributed_cost += cost
        return {
            "kwh": total_kwh,
            "cost": total_cost,
            "idle_kwh": max(0.0, total_kwh - attributed_kwh),
            "idle_cost": max(0.0, total_cost - attributed_cost),
            "per_client": {c: {"kwh": v[0], "cost": v[1]} for c, v in sorted(per_client.items())},
            "per_mode": {m: {"kwh": v[0], "cost": v[1]} for m, v in sorted(by_mode.items())},
            "utilization": busy_core_s / available_core_s if available_core_s else None,
        }

    def job_figures(self, job_id: str) -> dict[str, Any] | None:
        """Return one job's figures (after ``metrics``)."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        return {
            "client": job.client,
            "submitted_at": job.submitted_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "outcome": job.outcome,
            "deadline": job.deadline.isoformat() if job.deadline else None,
            "first_preview_s": (job.first_preview_at - job.submitted_at).total_seconds()
            if job.first_preview_at
            else None,
            "render_s": job.render_seconds,
            "preemptions": job.preemptions,
            "failures": job.failures,
            "kwh": job.kwh,
            "cost": job.cost,
        }

    def select(
        self,
        *,
        job: str | None = None,
        node: str | None = None,
        client: str | None = None,
        since: datetime | None = None,
    ) -> list[AuditEntry]:
        """Return the timeline entries that match every filter given."""
        return [
            e
            for e in self.entries
            if (job is None or e.job == job)
            and (node is None or e.node == node)
            and (client is None or e.client == client)
            and (since is None or e.at >= since)
        ]


def audit_records(
    records: Iterable[RecordedEvent], *, keep_entries: bool = True
) -> AuditProjection:
    """Fold journal records into an :class:`AuditProjection`."""
    projection = AuditProjection(keep_entries=keep_entries)
    projection.feed(records)
    return projection


def _metadata(raw: bytes) -> RenderMetadata | None:
    try:
        return msgspec.json.decode(raw, type=RenderMetadata)
    except msgspec.ValidationError:
        return None


def _mode_at(modes: Sequence[tuple[float, EnergyMode]], t: float) -> str:
    current = modes[0][1]
    for start, mode in modes:
        if start <= t:
            current = mode
        else:
            break
    return current


def _minus(a: float, b: float, holes: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Return [a, b) without the ``holes``."""
    pieces = [(a, b)]
    for start, stop in holes:
        cut: list[tuple[float, float]] = []
        for x, y in pieces:
            if stop <= x or start >= y:
                cut.append((x, y))
                continue
            if x < start:
                cut.append((x, start))
            if stop < y:
                cut.append((stop, y))
        pieces = cut
    return pieces
