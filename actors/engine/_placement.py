"""The scheduler's core: runnable queues, node bookkeeping, the placement index, ``why``.

Pure and synchronous (the SchedulerActor wraps it), so it is tested with tables and benchmarked
without any I/O.  Placement is incremental: for each distinct resource request in the queue,
the index keeps the set of nodes where it currently fits, updated only for the node whose free
resources just changed.  A placement therefore looks at the nodes that fit (at most the
policy's ``max_candidates`` of them), never at every node times every job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from time import perf_counter

from actors._errors import SpecError

from ._graph import DependencyGraph, Outcome, TaskRef
from ._policy import FarmView, JobView, NodeView, Policy, RunningView, TaskView
from ._resources import Resources, add, fits, shortfall, subtract
from ._spec import SubmitJob
from ._summaries import NodeSummary

__all__ = ["NodeHealth", "Placement", "SchedulerCore"]

NodeHealth = str  # "online" | "draining" | "sleeping" | "quarantined" | "unreachable" | "offline"


# How many unplaceable tasks a cycle offers to the policy's preemption hook.
_MAX_BLOCKED = 16


@dataclass(frozen=True, slots=True)
class Placement:
    """A decision: run ``task`` of ``job_id`` on ``node``."""

    job_id: str
    task: int
    node: str
    request: Resources


@dataclass(slots=True)
class _Task:
    request: Resources
    attempt: int = 0
    failures: int = 0
    last_node: str | None = None
    not_before: datetime | None = None


@dataclass(slots=True)
class _Job:
    job_id: str
    spec: SubmitJob
    submitted_at: datetime
    tasks: list[_Task]
    ready: dict[int, None] = field(default_factory=dict)  # runnable, in index order
    running: dict[int, str] = field(default_factory=dict)  # task -> node
    completed: int = 0
    blocklist: dict[str, datetime] = field(default_factory=dict)
    deferred: str | None = None  # the policy's last reason to hold it back
    shapes: int = 1  # distinct requests among its tasks (a cycle stops once none fits)


@dataclass(slots=True)
class _Node:
    name: str
    capacity: Resources
    free: Resources
    labels: tuple[str, ...]
    health: NodeHealth = "online"
    running: dict[tuple[str, int], Resources] = field(default_factory=dict)
    consecutive_failures: int = 0
    view: NodeView | None = None  # cached for policies; rebuilt when the node changes


class SchedulerCore:
    """Queues, nodes and placement; see the module docstring."""

    def __init__(
        self, policy: Policy, *, exhaustive: bool = False, time_decisions: bool = False
    ) -> None:
        """``exhaustive`` scores every online node for every task, without the fit index (the
        benchmark's brute-force baseline); ``time_decisions`` records each placement
        decision's latency in ``decision_seconds`` (for the benchmark)."""
        self.policy = policy
        self.exhaustive = exhaustive
        self.decision_seconds: list[float] | None = [] if time_decisions else None
        self.graph = DependencyGraph()
        self._jobs: dict[str, _Job] = {}
        self._nodes: dict[str, _Node] = {}
        # request -> {node name: None} for online nodes where the request fits right now
        self._fit_index: dict[Resources, dict[str, None]] = {}
        self._index_refs: dict[Resources, int] = {}
        self.placements_made = 0
        # Tasks the last cycle could not place (for the policy's preemption hook), the farm
        # view it saw, and the attempts already asked to yield (victim -> the task it yields to).
        self.blocked: list[tuple[JobView, TaskView]] = []
        self.last_farm: FarmView | None = None
        self.preempting: dict[tuple[str, int], tuple[str, int]] = {}

    # -- submission ---------------------------------------------------------------------------

    def check_submission(self, specs: Sequence[SubmitJob], *, source: str = "") -> None:
        """Reject a submission before anything is written: duplicates, dependencies, fit.

        Raises:
            SpecError: a job id is taken, or no node the farm has ever had could fit a task.
            UnknownDependencyError, DependencyCycleError: as the dependency graph says.
        """
        seen: set[str] = set()
        for spec in specs:
            if spec.job_id in self._jobs or spec.job_id in self.graph or spec.job_id in seen:
                raise SpecError(
                    path=source or spec.source,
                    field=f"job {spec.job_id!r}",
                    problem="a job with this id already exists",
                )
            seen.add(spec.job_id)
        self.graph.check_new(spec.graph_job() for spec in specs)
        if not self._nodes:
            return  # an empty farm cannot judge fit: `why` will say nothing fits yet
        for spec in specs:
            for index in range(len(spec.tasks)):
                request = spec.task_resources(index)
                if not any(fits(request, node.capacity) for node in self._nodes.values()):
                    biggest = max(self._nodes.values(), key=lambda n: _size(n.capacity))
                    missing = "; ".join(str(s) for s in shortfall(request, biggest.capacity))
                    raise SpecError(
                        path=source or spec.source,
                        field=f"jobs.{spec.name}.resources",
                        problem=f"no node could ever fit task {index}: largest node "
                        f"{biggest.name} lacks {missing}",
                    )

    def add_job(
        self,
        spec: SubmitJob,
        *,
        submitted_at: datetime,
        pending: Iterable[tuple[int, int, int, str | None, datetime | None]] | None = None,
        finished: Iterable[tuple[int, Outcome]] = (),
        blocklist: dict[str, datetime] | None = None,
    ) -> None:
        """Track a job (new or recovered).

        ``pending`` lists the tasks still to run as ``(index, attempt, failures, last_node,
        not_before)``; None means every task.  ``finished`` gives recovered task outcomes.
        """
        tasks = [_Task(request=spec.task_resources(i)) for i in range(len(spec.tasks))]
        job = _Job(spec.job_id, spec, submitted_at, tasks, blocklist=dict(blocklist or {}))
        job.shapes = len({task.request for task in tasks})
        self._jobs[spec.job_id] = job
        if spec.job_id not in self.graph:
            self.graph.add_jobs([spec.graph_job()])
        for index, outcome in finished:
            if outcome is Outcome.SUCCEEDED:
                job.completed += 1
            if self.graph.outcome(TaskRef(spec.job_id, index)) is None:
                self.graph.record_outcome(TaskRef(spec.job_id, index), outcome)
        pending_list = (
            [(i, 0, 0, None, None) for i in range(len(tasks))] if pending is None else pending
        )
        for index, attempt, failures, last_node, not_before in pending_list:
            task = tasks[index]
            task.attempt, task.failures = attempt, failures
            task.last_node, task.not_before = last_node, not_before
            if self.graph.is_ready(TaskRef(spec.job_id, index)):
                self._enqueue(job, index)

    def wakeups(self, now: datetime) -> list[datetime]:
        """Return the future times at which queued work becomes placeable (retry backoffs,
        blocklist expiries), sorted: a recovered scheduler arms its timer with them."""
        times: set[datetime] = set()
        for job in self._jobs.values():
            for index in job.ready:
                not_before = job.tasks[index].not_before
                if not_before is not None and not_before > now:
                    times.add(not_before)
            times.update(until for until in job.blocklist.values() if until > now)
        return sorted(times)

    def has_job(self, job_id: str) -> bool:
        """Return whether the job is tracked (not finished)."""
        return job_id in self._jobs

    def mark_running(self, job_id: str, index: int, node: str, attempt: int) -> None:
        """Record a recovered attempt as running on ``node`` (reserving its resources)."""
        job = self._jobs[job_id]
        self._dequeue(job, index)
        job.tasks[index].attempt = attempt
        self._reserve(job, index, node)

    # -- task and job ends ----------------------------------------------------------------------

    def task_ended(
        self,
        job_id: str,
        index: int,
        *,
        outcome: Outcome | None,
        retry_at: datetime | None = None,
        failed_on_node: bool = False,
    ) -> list[TaskRef]:
        """An attempt ended: free its node; requeue (``outcome`` None) or record the outcome.

        Returns the tasks (of any job) that became ready.
        """
        self.preempting.pop((job_id, index), None)
        job = self._jobs.get(job_id)
        if job is None:
            return []
        node_name = job.running.get(index)
        self._release(job, index)
        task = job.tasks[index]
        node = self._nodes.get(node_name) if node_name else None
        if node is not None:
            node.consecutive_failures = node.consecutive_failures + 1 if failed_on_node else 0
        if outcome is None:
            if failed_on_node:
                task.failures += 1
            task.last_node = node_name
            task.not_before = retry_at
            self._enqueue(job, index)
            return []
        if outcome is Outcome.SUCCEEDED:
            job.completed += 1
        self._dequeue(job, index)
        update = self.graph.record_outcome(TaskRef(job_id, index), outcome)
        return self._release_ready(update.newly_ready)

    def job_ended(self, job_id: str, outcome: Outcome) -> list[TaskRef]:
        """The job is over: drop its queues (its node reservations are already released)."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return []
        for victim in [v for v in self.preempting if v[0] == job_id]:
            del self.preempting[victim]
        for index in list(job.ready):
            self._dequeue(job, index)
        for index in list(job.running):
            self._release(job, index)
        update = self.graph.record_outcome(job_id, outcome)
        ready = self._release_ready(update.newly_ready)
        self.graph.remove_job(job_id)
        return ready

    def is_running_on(self, task: tuple[str, int], node: str) -> bool:
        """Return whether the task's attempt holds resources on ``node``."""
        job = self._jobs.get(task[0])
        return job is not None and job.running.get(task[1]) == node

    def unplace(self, job_id: str, index: int) -> None:
        """Undo a placement the job refused (the task was no longer pending)."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._release(job, index)

    def add_finished_job(
        self, spec: SubmitJob, outcome: Outcome, task_outcomes: Sequence[Outcome | None]
    ) -> None:
        """Record a job that finished before a restart, so its dependants see its outcome."""
        if spec.job_id in self.graph:
            return
        self.graph.add_passivated(spec.graph_job(), outcome, task_outcomes)

    def node_summaries(self) -> list[NodeSummary]:
        """Describe every node, by name."""
        return [
            NodeSummary(
                name=node.name,
                health=node.health,
                capacity=node.capacity,
                free=node.free,
                running=len(node.running),
                labels=node.labels,
                consecutive_failures=node.consecutive_failures,
            )
            for node in sorted(self._nodes.values(), key=lambda n: n.name)
        ]

    def block_node(self, job_id: str, node: str, until: datetime) -> None:
        """Keep the job's tasks off ``node`` until ``until``."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.blocklist[node] = until

    def _release_ready(self, refs: Iterable[TaskRef]) -> list[TaskRef]:
        released = []
        for ref in refs:
            job = self._jobs.get(ref.job)
            if job is not None and ref.index not in job.running:
                self._enqueue(job, ref.index)
                released.append(ref)
        return released

    # -- nodes ----------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        capacity: Resources,
        *,
        labels: tuple[str, ...] = (),
        health: str = "online",
    ) -> None:
        """Add (or refresh) a node; a known node keeps its running reservations."""
        node = self._nodes.get(name)
        if node is None:
            node = self._nodes[name] = _Node(name, capacity, capacity, labels, health)
        else:
            used = list(node.running.values())
            free = capacity
            for request in used:
                free = subtract(free, request) if fits(request, free) else free
            node.capacity, node.free, node.labels, node.health = capacity, free, labels, health
        self._reindex_node(node)

    def set_health(self, name: str, health: NodeHealth) -> None:
        """Change a node's health (only ``online`` nodes get new work)."""
        node = self._nodes[name]
        node.health = health
        self._reindex_node(node)

    def node_health(self, name: str) -> NodeHealth | None:
        """Return a node's health, or None if unknown."""
        node = self._nodes.get(name)
        return node.health if node else None

    def running_on(self, name: str) -> list[tuple[str, int]]:
        """Return the (job, task) attempts running on a node."""
        node = self._nodes.get(name)
        return sorted(node.running) if node else []

    def consecutive_failures(self, name: str) -> int:
        """Return how many attempts failed in a row on a node."""
        node = self._nodes.get(name)
        return node.consecutive_failures if node else 0

    # -- placement ------------------------------------------------------------------------------

    def place(self, now: datetime, *, limit: int | None = None) -> list[Placement]:
        """Run one placement cycle: rank jobs, place runnable tasks onto fitting nodes."""
        policy = self.policy
        views = {job_id: self._job_view(job) for job_id, job in self._jobs.items() if job.ready}
        self.blocked = []
        if not views:
            return []
        order = sorted(views, key=lambda job_id: policy.rank(views[job_id], now))
        farm = self.last_farm = self._farm_view(views)
        placements: list[Placement] = []
        for job_id in order:
            job = self._jobs[job_id]
            view = views[job_id]
            job.deferred = None
            unplaceable: set[Resources] = set()
            for index in list(job.ready):
                task = job.tasks[index]
                if task.not_before is not None and task.not_before > now:
                    continue
                if task.request in unplaceable:
                    continue
                began = perf_counter() if self.decision_seconds is not None else 0.0
                task_view = self._task_view(job, index)
                reason = policy.admit(view, task_view, farm, now)
                if reason is not None:
                    job.deferred = reason
                    continue
                node = self._choose_node(job, view, task_view, now)
                if self.decision_seconds is not None and node is None:
                    self.decision_seconds.append(perf_counter() - began)
                if node is None:
                    if len(self.blocked) < _MAX_BLOCKED:
                        self.blocked.append((view, task_view))
                    unplaceable.add(task.request)
                    if len(unplaceable) >= job.shapes:
                        break  # the rest of its queue would be skipped one by one
                    continue
                self._dequeue(job, index)
                self._reserve(job, index, node.name)
                if self.decision_seconds is not None:
                    self.decision_seconds.append(perf_counter() - began)
                placements.append(Placement(job_id, index, node.name, task.request))
                if limit is not None and len(placements) >= limit:
                    self.placements_made += len(placements)
                    return placements
        self.placements_made += len(placements)
        return placements

    def _choose_node(self, job: _Job, view: JobView, task: TaskView, now: datetime) -> _Node | None:
        if self.exhaustive:
            return self._choose_node_exhaustively(job, view, task, now)
        candidates = self._fit_index.get(task.request)
        if not candidates:
            return None
        policy = self.policy
        best: _Node | None = None
        best_score = 0.0
        looked = 0
        for name in candidates:
            until = job.blocklist.get(name)
            if until is not None and until > now:
                continue
            node = self._nodes[name]
            node_view = node.view
            if node_view is None:
                node_view = node.view = self._node_view(node)
            score = policy.node_score(view, task, node_view, now)
            if score is None:
                continue
            if best is None or score > best_score:
                best, best_score = node, score
            looked += 1
            if looked >= policy.max_candidates:
                break
        return best

    def _choose_node_exhaustively(
        self, job: _Job, view: JobView, task: TaskView, now: datetime
    ) -> _Node | None:
        best: _Node | None = None
        best_score = 0.0
        for node in self._nodes.values():
            if node.health != "online" or not fits(task.request, node.free):
                continue
            until = job.blocklist.get(node.name)
            if until is not None and until > now:
                continue
            node_view = node.view
            if node_view is None:
                node_view = node.view = self._node_view(node)
            score = self.policy.node_score(view, task, node_view, now)
            if score is not None and (best is None or score > best_score):
                best, best_score = node, score
        return best

    def _reserve(self, job: _Job, index: int, node_name: str) -> None:
        node = self._nodes[node_name]
        request = job.tasks[index].request
        node.free = subtract(node.free, request) if fits(request, node.free) else node.free
        node.running[(job.job_id, index)] = request
        job.running[index] = node_name
        self._reindex_node(node)

    def _release(self, job: _Job, index: int) -> None:
        node_name = job.running.pop(index, None)
        if node_name is None:
            return
        node = self._nodes.get(node_name)
        if node is None:
            return
        request = node.running.pop((job.job_id, index), None)
        if request is not None:
            node.free = add(node.free, request, capacity=node.capacity)
        self._reindex_node(node)

    # -- the placement index ----------------------------------------------------------------------

    def _enqueue(self, job: _Job, index: int) -> None:
        if index in job.ready or index in job.running:
            return
        job.ready[index] = None
        request = job.tasks[index].request
        refs = self._index_refs.get(request, 0)
        self._index_refs[request] = refs + 1
        if refs == 0:
            self._fit_index[request] = {
                name: None
                for name, node in self._nodes.items()
                if node.health == "online" and fits(request, node.free)
            }

    def _dequeue(self, job: _Job, index: int) -> None:
        if index not in job.ready:
            return
        del job.ready[index]
        request = job.tasks[index].request
        refs = self._index_refs[request] - 1
        if refs:
            self._index_refs[request] = refs
        else:
            del self._index_refs[request]
            del self._fit_index[request]

    def _reindex_node(self, node: _Node) -> None:
        node.view = None
        online = node.health == "online"
        for request, members in self._fit_index.items():
            if online and fits(request, node.free):
                members[node.name] = None
            else:
                members.pop(node.name, None)

    # -- views and explanations -----------------------------------------------------------------

    def _job_view(self, job: _Job) -> JobView:
        return JobView(
            job_id=job.job_id,
            spec=job.spec,
            submitted_at=job.submitted_at,
            running=len(job.running),
            queued=len(job.ready),
            completed=job.completed,
            total=len(job.tasks),
        )

    def _task_view(self, job: _Job, index: int) -> TaskView:
        task = job.tasks[index]
        return TaskView(
            job_id=job.job_id,
            index=index,
            request=task.request,
            attempt=task.attempt,
            failures=task.failures,
            last_node=task.last_node,
        )

    @staticmethod
    def _node_view(node: _Node) -> NodeView:
        return NodeView(
            name=node.name,
            capacity=node.capacity,
            free=node.free,
            labels=node.labels,
            running=len(node.running),
            health=node.health,
        )

    def _farm_view(self, views: dict[str, JobView]) -> FarmView:
        jobs = self._jobs
        return FarmView(
            nodes={name: self._node_view(node) for name, node in self._nodes.items()},
            jobs=views,
            placements={job_id: list(job.running.values()) for job_id, job in jobs.items()},
            running={
                name: [
                    RunningView(
                        job_id=job_id,
                        task=index,
                        request=request,
                        priority=jobs[job_id].spec.priority,
                        preemptible=jobs[job_id].spec.preemptible
                        and (job_id, index) not in self.preempting,
                    )
                    for (job_id, index), request in node.running.items()
                    if job_id in jobs
                ]
                for name, node in self._nodes.items()
                if node.running
            },
        )

    def _placement_failure(self, job: _Job, request: Resources, now: datetime) -> str:
        online = [n for n in self._nodes.values() if n.health == "online"]
        if not self._nodes:
            return "no node has joined the farm yet"
        if not online:
            return "no node is online"
        able = [n for n in online if fits(request, n.capacity)]
        if not able:
            biggest = max(online, key=lambda n: _size(n.capacity))
            missing = "; ".join(str(s) for s in shortfall(request, biggest.capacity))
            return f"no online node is big enough (largest, {biggest.name}, lacks {missing})"
        allowed = [n for n in able if not (job.blocklist.get(n.name, now) > now)]
        if not allowed:
            return f"every node that fits is blocklisted for this job ({len(able)} nodes)"
        return f"all {len(allowed)} nodes that fit are busy"

    def why(self, job_id: str, now: datetime) -> list[str]:
        """Explain, line by line, why a job's unfinished tasks are not running."""
        job = self._jobs.get(job_id)
        if job is None:
            return [f"job {job_id} is not waiting (unknown or finished)"]
        lines = [self.policy.explain_rank(self._job_view(job), now)]
        if job.running:
            lines.append(f"{len(job.running)} task(s) running")
        waiting: dict[str, list[int]] = {}
        for index, task in enumerate(job.tasks):
            if index in job.running or self.graph.outcome(TaskRef(job_id, index)) is not None:
                continue
            reason = self._task_reason(job, index, task, now)
            waiting.setdefault(reason, []).append(index)
        for reason, indices in waiting.items():
            lines.append(f"task(s) {_ranges(indices)}: {reason}")
        return lines

    def _task_reason(self, job: _Job, index: int, task: _Task, now: datetime) -> str:
        if index not in job.ready:
            blocked = self.graph.blockers(TaskRef(job.job_id, index))
            if blocked:
                return "waiting on " + "; ".join(b.reason for b in blocked)
            return "waiting to be dispatched"
        if task.not_before is not None and task.not_before > now:
            return f"retry backoff until {task.not_before.isoformat()}"
        if job.deferred:
            return f"deferred by policy: {job.deferred}"
        return self._placement_failure(job, task.request, now)

    def statistics(self) -> dict[str, int]:
        """Return queue and node counts."""
        return {
            "jobs": len(self._jobs),
            "queued": sum(len(j.ready) for j in self._jobs.values()),
            "running": sum(len(j.running) for j in self._jobs.values()),
            "nodes": len(self._nodes),
            "placements": self.placements_made,
            "index_shapes": len(self._fit_index),
        }


def _size(capacity: Resources) -> tuple[int, int, int]:
    return (capacity.gpus, capacity.millicores, capacity.memory)


def _ranges(indices: list[int]) -> str:
    parts: list[str] = []
    start = prev = indices[0]
    for value in [*indices[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(parts)
