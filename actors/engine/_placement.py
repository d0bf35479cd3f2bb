"""The scheduler's core: runnable queues, node bookkeeping, the placement index, ``why``.

Pure and synchronous (the SchedulerActor wraps it), so it is tested with tables and benchmarked
without any I/O.  Two things keep a cycle's cost to what changed plus what it places:

- **Live views.** The policy's ``FarmView`` (every node, every live job, what runs where) is
  the core's own bookkeeping, updated in place as tasks are queued, placed, progress and end.
  Nothing is rebuilt per cycle; a placement updates the node's free resources and the job's
  counts at once, so later decisions in the same cycle see it.
- **The fit index.** For each distinct (request, requirements) in the queue, the set of nodes
  that accept work, satisfy the requirements and have room for it now, updated only for the
  node whose free resources or health just changed.  A placement looks at the nodes that fit
  (at most the policy's ``max_candidates`` of them), never at every node times every job.

Every policy hook is called through :meth:`SchedulerCore._guarded`: a policy that raises holds
the job it was deciding about (``policy error: ...``, logged once with the traceback) and
everything else keeps scheduling.
"""

from __future__ import annotations

import bisect
import re
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from time import perf_counter
from typing import Any, TypeVar

import msgspec

from actors._errors import SpecError
from runtime import get_logger

from ._events import JobState
from ._fit import never_fits
from ._graph import DependencyGraph, GraphUpdate, Outcome, TaskRef
from ._policy import (
    Failure,
    FarmView,
    FifoPolicy,
    Hold,
    JobView,
    NodeAction,
    NodeView,
    Observation,
    Policy,
    Preemption,
    RetryDecision,
    RunningView,
    TaskView,
    default_retry,
    parse_labels,
)
from ._resources import ResourcePool, Resources, add, fits, shortfall, subtract
from ._spec import SubmitJob
from ._summaries import NodeSummary

__all__ = ["NodeHealth", "Placement", "SchedulerCore"]

_log = get_logger("actors.scheduler")

NodeHealth = str  # "online" | "draining" | "sleeping" | "quarantined"
T = TypeVar("T")

# How many unplaceable tasks a cycle offers to the policy's preemption hook.
_MAX_BLOCKED = 16
_TASK_LABEL = re.compile(r"([^\s\[\]]+)\[(\d+)\]")  # the graph's label of a task: job[index]
_HEALTHS = frozenset({"online", "draining", "sleeping", "quarantined"})
_REACHABLE = frozenset({"connected", "unreachable", "offline"})

FitKey = tuple[Resources, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Placement:
    """A decision: run ``task`` of ``job_id`` on ``node`` (on ``nodes``, leader first, for a
    multi-node task), checkpointing every ``checkpoint_interval`` seconds when the policy asks
    for it."""

    job_id: str
    task: int
    node: str
    request: Resources
    nodes: tuple[str, ...] = ()
    checkpoint_interval: float | None = None


@dataclass(slots=True, eq=False)
class _Job:
    view: JobView
    tasks: list[TaskView]
    keys: list[FitKey]  # per task: what the fit index knows it by
    ready: dict[int, None] = field(default_factory=dict)  # runnable, in index order
    running: dict[int, str] = field(default_factory=dict)  # task -> node (a gang's leader)
    gangs: dict[int, tuple[str, ...]] = field(default_factory=dict)  # task -> its nodes
    held: dict[int, str] = field(default_factory=dict)  # task -> why (on_failure hold)
    finished: set[int] = field(default_factory=set)
    blocklist: dict[str, datetime] = field(default_factory=dict)
    hold: Hold | None = None  # the policy's job-level hold, until hold.until
    deferred: str | None = None  # the policy's last reason to hold a task back
    policy_error: str | None = None
    distinct: set[FitKey] = field(default_factory=set)  # its tasks' distinct keys
    # failure signature (kind, exit code) -> nodes where this job failed that way
    signatures: dict[tuple[str, int | None], set[str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # last value its tasks reported
    progress_sum: float = 0.0  # sum of the progress of unfinished tasks


@dataclass(slots=True, eq=False)
class _Node:
    view: NodeView
    running: dict[tuple[str, int], RunningView] = field(default_factory=dict)
    # failed attempts since its last success that count against it: (job, signature)
    recent_failures: list[tuple[str, tuple[str, int | None]]] = field(default_factory=list)


class SchedulerCore:
    """Queues, nodes, live views and placement; see the module docstring."""

    def __init__(
        self,
        policy: Policy,
        *,
        counters: Mapping[str, int] | None = None,
        exhaustive: bool = False,
        time_decisions: bool = False,
    ) -> None:
        """``counters`` are the farm-wide licence counters (``{"nuke": 10}``), enforced across
        every node; counters not named here are node-local (an agent's ``--counter``).
        ``exhaustive`` scores every node for every task, without the fit index (the
        benchmark's brute-force baseline); ``time_decisions`` records each placement
        decision's latency in ``decision_seconds``."""
        self.policy = policy
        self.exhaustive = exhaustive
        self.decision_seconds: list[float] | None = [] if time_decisions else None
        self.graph = DependencyGraph()
        self.pool = ResourcePool(counters or {})
        self._jobs: dict[str, _Job] = {}
        self._nodes: dict[str, _Node] = {}
        self.farm = FarmView(
            nodes={},
            jobs={},
            running={},
            placements={},
            counters=self.pool.limits,
            counters_free=dict(self.pool.limits),
        )
        # key -> {node name: None} for nodes that accept work, satisfy and fit it right now
        self._fit_index: dict[FitKey, dict[str, None]] = {}
        self._index_refs: dict[FitKey, int] = {}
        self._split: dict[Resources, tuple[Resources, dict[str, int]]] = {}
        self.placements_made = 0
        self.cycles = 0
        # FIFO's rank never changes with time or the farm: keep the order instead of sorting
        # every cycle (a policy that overrides ``rank`` is ranked from scratch each cycle).
        self._static_order: list[tuple[Any, str]] | None = (
            [] if type(policy).rank is FifoPolicy.rank else None
        )
        # Tasks the last cycle could not place (for the policy's preemption hook) and the
        # attempts already asked to yield (victim -> the task it yields to).
        self.blocked: list[tuple[JobView, TaskView]] = []
        self.preempting: dict[tuple[str, int], tuple[str, int]] = {}
        self._logged_errors: set[tuple[str, str]] = set()
        # Times at which held or deferred work becomes placeable again (job holds).
        self.hold_wakeups: list[datetime] = []
        # Nodes held this cycle for a waiting multi-node task: node -> (job, task).  Recomputed
        # from scratch every cycle, so a hold never outlives the gang's rank.
        self.held_nodes: dict[str, tuple[str, int]] = {}
        self.on_unreachable: Callable[[str, list[int], str], None] | None = None
        # Tasks a conditional branch skipped: the owner tells their job (job, tasks, reason).
        self.on_skipped: Callable[[str, list[int], str], None] | None = None
        # Attempts the policy wants checkpointed periodically: (job, task) -> the time since
        # which none was taken (start, last checkpoint or last request); and the earliest due.
        self._checkpoint_since: dict[tuple[str, int], datetime] = {}
        self._checkpoint_due: datetime | None = None
        self._drains: dict[str, datetime] = {}  # node -> planned drain time
        self.unsent_skips: list[tuple[str, list[int], str]] = []

    # -- the policy, guarded ------------------------------------------------------------------

    def _guarded(self, job: _Job | None, fallback: Any, hook: Callable[..., T], *args: Any) -> T:
        """Call a policy hook; on an exception hold ``job`` (if any) and return ``fallback``."""
        try:
            return hook(*args)
        except Exception as error:
            name = getattr(hook, "__name__", "hook")
            self._policy_failed(job, name, error)
            result: T = fallback
            return result

    def _policy_failed(self, job: _Job | None, hook: str, error: Exception) -> None:
        """Hold the job (if any) with the error, and log it once with its traceback."""
        reason = f"policy error: {hook}: {type(error).__name__}: {error}"
        key = (job.view.job_id if job else "", f"{hook}:{type(error).__name__}:{error}")
        if key not in self._logged_errors:
            self._logged_errors.add(key)
            _log.error(
                "policy_error",
                hook=hook,
                job_id=job.view.job_id if job else None,
                error=str(error),
                traceback="".join(traceback.format_exception(error)),
            )
        if job is not None:
            job.policy_error = reason

    def node_actions(self, now: datetime) -> Sequence[NodeAction]:
        """Return the policy's node health changes that it may make now (the operator's and
        the engine's decisions win: only nodes online or in a health the policy gave them)."""
        actions = self._guarded(None, (), self.policy.node_actions, self.farm, now)
        allowed = []
        for action in actions:
            view = self.node_view(action.node)
            if view is None or (view.health != "online" and view.health_by != "policy"):
                continue
            if view.health == action.health and view.drain_at == action.at:
                continue
            allowed.append(action)
        return allowed

    def next_wakeup(self, now: datetime) -> datetime | None:
        """Return when the policy wants its next cycle (None: no need)."""
        return self._guarded(None, None, self.policy.next_wakeup, now)

    def cycle_events(self, now: datetime) -> Sequence[Any]:
        """Return the facts the policy decided by itself this cycle (to journal and apply);
        a policy without the hook has none."""
        hook = getattr(self.policy, "cycle_events", None)
        if hook is None:
            return ()
        return self._guarded(None, (), hook, self.farm, now)

    def apply_policy_event(self, event: Any) -> None:
        """Fold one of the policy's journaled events into it (an error is logged, not raised)."""
        self._guarded(None, None, self.policy.apply, event)

    def observe(self, observation: Observation) -> None:
        """Hand a fact to the policy (an error is logged once, never raised)."""
        self._guarded(None, None, self.policy.observe, observation)

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
            return  # held, visibly, until a node that fits joins (see ``never_fits``)
        checked: set[tuple[Resources, tuple[str, ...]]] = set()
        for spec in specs:
            for index in range(len(spec.tasks)):
                key = (spec.task_resources(index), spec.task_requires(index))
                if key in checked:
                    continue  # a 10,000-task job has a handful of distinct requests
                checked.add(key)
                problem = self.never_fits(spec, index)
                if problem is not None:
                    raise SpecError(
                        path=source or spec.source,
                        field=f"jobs.{spec.name}.resources",
                        problem=f"task {spec.tasks[index].name}: {problem}",
                    )

    def never_fits(self, spec: SubmitJob, index: int) -> str | None:
        """Return why no node the farm has (had) could ever run the task, or None.

        Farm-wide counters are checked against their limits; with no node at all, the answer
        is "no node has joined yet" (the job is held, visibly, until one that fits joins).
        """
        node_part, pool_part = self._split_request(spec.task_resources(index))
        for name, count in pool_part.items():
            limit = self.pool.limits.get(name, 0)
            if count > limit:
                return f"it needs {count} {name} licence(s); the farm has {limit}"
        requires = spec.task_requires(index)
        able = sum(
            1
            for n in self._nodes.values()
            if fits(node_part, n.view.capacity) and n.view.satisfies(requires) is None
        )
        wanted = spec.task_nodes(index)
        if able >= wanted:
            return None
        if able:
            return f"it needs {wanted} nodes at once and only {able} of the farm's could fit it"
        fitting = [n for n in self._nodes.values() if fits(node_part, n.view.capacity)]
        if fitting:
            return f"no node has {_missing_labels(fitting, requires)}"
        return never_fits(node_part, {n.view.name: n.view.capacity for n in self._nodes.values()})

    def add_job(
        self,
        spec: SubmitJob,
        *,
        submitted_at: datetime,
        state: JobState | None = None,
    ) -> list[TaskRef]:
        """Track a job, new or recovered (``state`` is its journaled state).

        Returns the tasks of other jobs that became ready (a recovered job's progress can
        release a threshold dependant).
        """
        added = None
        # First: it may refuse (an orphaned parent).
        if spec.job_id not in self.graph:
            added = self.graph.add_jobs([spec.graph_job()])
        metadata = self._decode_metadata(spec)
        view = JobView(
            job_id=spec.job_id,
            spec=spec,
            submitted_at=submitted_at,
            total=len(spec.tasks),
            metadata=metadata,
            parents=tuple(sorted({d.parent for d in spec.dependencies} - {spec.job_id})),
        )
        tasks: list[TaskView] = []
        keys: list[FitKey] = []
        for i, task_spec in enumerate(spec.tasks):
            request = spec.task_resources(i)
            requires = spec.task_requires(i)
            frames = (
                (task_spec.start, task_spec.end)
                if task_spec.start is not None and task_spec.end is not None
                else None
            )
            tasks.append(
                TaskView(
                    job_id=spec.job_id,
                    index=i,
                    request=request,
                    name=task_spec.name,
                    frames=frames,
                    requires=requires,
                    nodes=spec.task_nodes(i),
                )
            )
            keys.append((self._split_request(request)[0], requires))
        job = _Job(view=view, tasks=tasks, keys=keys, distinct=set(keys))
        if state is not None:
            job.blocklist = dict(state.blocklist)
            if state.status == "paused":
                view.status = "paused"
            elif state.status == "cancelling":
                view.status = "cancelling"
        self._jobs[spec.job_id] = job
        self.farm.jobs[spec.job_id] = view  # type: ignore[index]
        self._order_add(job)
        for parent in view.parents:
            parent_job = self._jobs.get(parent)
            if parent_job is not None:
                parent_job.view.children = (*parent_job.view.children, spec.job_id)
        for i, task in enumerate(tasks):
            recovered = state.tasks[i] if state is not None and i < len(state.tasks) else None
            if recovered is not None:
                if recovered.status not in ("completed", "failed", "cancelled", "skipped"):
                    task.progress = recovered.progress
                    job.progress_sum += recovered.progress
                task.attempt, task.failures = recovered.attempt, recovered.failures
                task.lost, task.last_node = recovered.lost, recovered.last_node
                task.not_before, task.preemptions = recovered.retry_at, recovered.preemptions
                task.checkpoint_at = recovered.checkpoint_at
                latest = recovered.checkpoints[-1] if recovered.checkpoints else None
                if latest is not None and latest.manifest is not None:
                    task.checkpoint_bytes = latest.manifest.size
                task.last_outcome = recovered.last_outcome
                if recovered.avoid:
                    task.avoid = tuple(recovered.avoid)
                if recovered.resources is not None:
                    task.request = recovered.resources
                    job.keys[i] = (self._split_request(task.request)[0], task.requires)
                    job.distinct.add(job.keys[i])
                status = recovered.status
                if status == "completed":
                    self._finish_task(
                        job,
                        i,
                        Outcome.SUCCEEDED,
                        runtime=recovered.runtime_s,
                        metrics=recovered.metrics,
                    )
                    continue
                if status in ("failed", "cancelled", "skipped"):
                    outcome = {
                        "failed": Outcome.FAILED,
                        "cancelled": Outcome.CANCELLED,
                        "skipped": Outcome.SKIPPED,
                    }[status]
                    self._finish_task(job, i, outcome, runtime=None)
                    continue
                if status == "held":
                    job.held[i] = recovered.held_reason or "held"
                    continue
                if status in ("assigned", "running"):
                    continue  # the engine marks it running (in doubt) next
            if self.graph.is_ready(TaskRef(spec.job_id, i)):
                self._enqueue(job, i)
        self._refresh_progress(job)
        if added is not None:
            # A branch decided at once (its parent had already ended): skip those tasks.
            skipped = [
                (ref, why)
                for ref, why in zip(added.newly_skipped, added.skip_reasons, strict=True)
                if ref.index not in job.finished
            ]
            self._report_skipped(
                GraphUpdate(
                    newly_skipped=tuple(ref for ref, _ in skipped),
                    skip_reasons=tuple(why for _, why in skipped),
                )
            )
        return self._record_progress(job)

    def _decode_metadata(self, spec: SubmitJob) -> Any:
        target = self.policy.metadata_type
        if target is None:
            return None
        try:
            return spec.metadata_as(target)
        except msgspec.ValidationError:
            return None  # refused at submission; an old journal's job keeps running

    def check_metadata(self, spec: SubmitJob) -> None:
        """Refuse a job whose metadata does not fit the policy's ``metadata_type``.

        Raises:
            SpecError: naming the metadata field at fault.
        """
        target = self.policy.metadata_type
        if target is None:
            return
        try:
            spec.metadata_as(target)
        except msgspec.ValidationError as error:
            text = str(error)
            field_path = text.rpartition(" - at `$")[2].rstrip("`") if "- at `$" in text else ""
            raise SpecError(
                path=spec.source or "<submission>",
                field=f"jobs.{spec.name}.metadata{field_path}",
                problem=text.partition(" - at ")[0],
            ) from None

    def wakeups(self, now: datetime) -> list[datetime]:
        """Return the future times at which queued work becomes placeable (retry backoffs,
        blocklist expiries, job holds), sorted: the scheduler arms its timer with them."""
        times: set[datetime] = set()
        for job in self._jobs.values():
            for index in job.ready:
                not_before = job.tasks[index].not_before
                if not_before is not None and not_before > now:
                    times.add(not_before)
            times.update(until for until in job.blocklist.values() if until > now)
            if job.hold is not None and job.hold.until is not None and job.hold.until > now:
                times.add(job.hold.until)
        return sorted(times)

    def has_job(self, job_id: str) -> bool:
        """Return whether the job is tracked (not finished)."""
        return job_id in self._jobs

    def job_view(self, job_id: str) -> JobView | None:
        """Return a live job's view (None when finished or unknown)."""
        job = self._jobs.get(job_id)
        return job.view if job else None

    def task_view(self, job_id: str, index: int) -> TaskView | None:
        """Return a live job's task view."""
        job = self._jobs.get(job_id)
        if job is None or not 0 <= index < len(job.tasks):
            return None
        return job.tasks[index]

    def mark_running(
        self,
        job_id: str,
        index: int,
        node: str,
        attempt: int,
        *,
        started_at: datetime | None,
        nodes: Sequence[str] = (),
    ) -> None:
        """Record a recovered attempt as running on ``node`` (on ``nodes`` for a multi-node
        task), reserving its resources."""
        job = self._jobs[job_id]
        self._dequeue(job, index)
        job.tasks[index].attempt = attempt
        if len(nodes) > 1:
            self._reserve_gang(job, index, tuple(nodes), started_at=started_at)
        else:
            self._reserve(job, index, node, started_at=started_at)
        if started_at is not None:
            self._track_checkpoints(job, index, started_at)

    # -- task and job ends ----------------------------------------------------------------------

    def task_ended(
        self,
        job_id: str,
        index: int,
        *,
        outcome: Outcome | None,
        retry_at: datetime | None = None,
        failure: Failure | None = None,
        attempt_outcome: str | None = None,
        runtime_s: float | None = None,
        lost: bool = False,
        held: str | None = None,
        avoid_node: str | None = None,
        resources: Resources | None = None,
        checkpoint_at: datetime | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> list[TaskRef]:
        """An attempt ended: free its node, then requeue (``outcome`` None), hold (``held``)
        or record the task's final outcome (with the ``metrics`` it reported, which
        conditional dependants decide on).

        Returns the tasks (of any job) that became ready.
        """
        self.preempting.pop((job_id, index), None)
        job = self._jobs.get(job_id)
        if job is None:
            return []
        node_name = job.running.get(index)
        self._release(job, index)
        task = job.tasks[index]
        if attempt_outcome is not None:
            task.last_outcome = attempt_outcome
        if checkpoint_at is not None:
            task.checkpoint_at = checkpoint_at
        node = self._nodes.get(node_name) if node_name else None
        if node is not None:
            self._count_node_outcome(node, job, failure, attempt_outcome)
        if node_name is not None:
            task.last_node = node_name
        if failure is not None:
            task.failures += 1
        if lost:
            task.lost += 1
        if outcome is None:
            task.not_before = retry_at
            if avoid_node is not None and avoid_node not in task.avoid:
                task.avoid = (*task.avoid, avoid_node)
            if resources is not None and resources != task.request:
                self._dequeue(job, index)
                task.request = resources
                job.keys[index] = (self._split_request(resources)[0], task.requires)
                job.distinct.add(job.keys[index])
            if held is not None:
                self._dequeue(job, index)
                job.held[index] = held
                return []
            if self.graph.is_ready(TaskRef(job_id, index)):
                self._enqueue(job, index)
            return []
        self._dequeue(job, index)
        job.held.pop(index, None)
        return self._finish_task(job, index, outcome, runtime=runtime_s, metrics=metrics)

    def _finish_task(
        self,
        job: _Job,
        index: int,
        outcome: Outcome,
        *,
        runtime: float | None,
        metrics: Mapping[str, float] | None = None,
    ) -> list[TaskRef]:
        if index in job.finished:
            return []
        if metrics:
            job.metrics.update(metrics)
        job.finished.add(index)
        task = job.tasks[index]
        view = job.view
        job.progress_sum -= task.progress
        if outcome is Outcome.SUCCEEDED:
            view.completed += 1
            task.progress = 1.0
            if runtime is not None:
                view.runtime.add(runtime)
        elif outcome is Outcome.FAILED:
            view.failed += 1
        elif outcome is Outcome.SKIPPED:
            view.skipped += 1
        else:
            view.cancelled += 1
        self._refresh_progress(job)
        update = self.graph.record_outcome(TaskRef(view.job_id, index), outcome, metrics=metrics)
        ready = self._release_ready(update.newly_ready)
        self._report_unreachable(update.newly_unreachable)
        self._report_skipped(update)
        return ready + self._record_progress(job)

    def _report_skipped(self, update: GraphUpdate) -> None:
        if not update.newly_skipped:
            return
        by_job: dict[tuple[str, str], list[int]] = {}
        for ref, reason in zip(update.newly_skipped, update.skip_reasons, strict=True):
            by_job.setdefault((ref.job, reason), []).append(ref.index)
        for (job_id, reason), indices in sorted(by_job.items()):
            job = self._jobs.get(job_id)
            if job is not None:
                for index in indices:
                    self._dequeue(job, index)
                if self.on_skipped is None:
                    self.unsent_skips.append((job_id, indices, reason))  # recovery: no actors yet
                else:
                    self.on_skipped(job_id, indices, reason)

    def task_progressed(self, job_id: str, index: int, fraction: float) -> list[TaskRef]:
        """A running attempt reported progress: update the views (and threshold dependants)."""
        job = self._jobs.get(job_id)
        if job is None or index in job.finished:
            return []
        task = job.tasks[index]
        fraction = min(1.0, max(0.0, fraction))
        job.progress_sum += fraction - task.progress
        task.progress = fraction
        running = self._running_view(job, index)
        if running is not None:
            running.progress = fraction
        self._refresh_progress(job)
        return self._record_progress(job)

    def task_checkpointed(self, job_id: str, index: int, at: datetime, size: int = 0) -> None:
        """A running attempt reported a checkpoint of ``size`` bytes by its verified manifest
        (0: without one) (views only)."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.tasks[index].checkpoint_at = at
        job.tasks[index].checkpoint_bytes = size
        running = self._running_view(job, index)
        if running is not None:
            running.checkpoint_at = at

    def task_preempted(self, job_id: str, index: int) -> None:
        """A running attempt was asked to yield (views only)."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.tasks[index].preemptions += 1
        job.view.preemptions += 1
        running = self._running_view(job, index)
        if running is not None:
            running.preemptions += 1
            running.yielding = True

    def _running_view(self, job: _Job, index: int) -> RunningView | None:
        node_name = job.running.get(index)
        node = self._nodes.get(node_name) if node_name else None
        return node.running.get((job.view.job_id, index)) if node else None

    def _refresh_progress(self, job: _Job) -> None:
        view = job.view
        view.progress = min(1.0, (view.completed + view.skipped + job.progress_sum) / view.total)

    def _record_progress(self, job: _Job) -> list[TaskRef]:
        if not job.view.children:
            return []
        update = self.graph.record_progress(job.view.job_id, job.view.progress)
        return self._release_ready(update.newly_ready)

    def _report_unreachable(self, refs: Sequence[TaskRef]) -> None:
        if not refs or self.on_unreachable is None:
            return
        by_job: dict[str, list[int]] = {}
        for ref in refs:
            by_job.setdefault(ref.job, []).append(ref.index)
        for job_id, indices in sorted(by_job.items()):
            job = self._jobs.get(job_id)
            if job is None:
                continue
            cancel = [
                i
                for i in indices
                if self._unreachable_policy(job_id, i) == "cancel" and i not in job.finished
            ]
            if cancel:
                reason = self.graph.unreachable(TaskRef(job_id, cancel[0])) or "dependency failed"
                self.on_unreachable(job_id, cancel, reason)

    def _unreachable_policy(self, job_id: str, index: int) -> str:
        for blocker in self.graph.blockers(TaskRef(job_id, index)):
            if blocker.unreachable:
                return blocker.on_parent_failure
        return "cancel"

    def job_ended(self, job_id: str, outcome: Outcome) -> list[TaskRef]:
        """The job is over: drop its queues and views (its reservations are released)."""
        job = self._jobs.get(job_id)
        if job is None:
            return []
        self._order_remove(job)
        del self._jobs[job_id]
        del self.farm.jobs[job_id]  # type: ignore[attr-defined]
        for victim in [v for v in self.preempting if v[0] == job_id]:
            del self.preempting[victim]
        for index in list(job.ready):
            self._dequeue(job, index)
        for index in list(job.running):
            self._release(job, index)
        for parent in job.view.parents:
            parent_job = self._jobs.get(parent)
            if parent_job is not None:
                parent_job.view.children = tuple(c for c in parent_job.view.children if c != job_id)
        update = self.graph.record_outcome(job_id, outcome, metrics=job.metrics)
        ready = self._release_ready(update.newly_ready)
        self._report_unreachable(update.newly_unreachable)
        self._report_skipped(update)
        self.graph.remove_job(job_id)
        return ready

    def is_running_on(self, task: tuple[str, int], node: str) -> bool:
        """Return whether the task's attempt holds resources on ``node`` (any rank's)."""
        job = self._jobs.get(task[0])
        if job is None:
            return False
        return job.running.get(task[1]) == node or node in job.gangs.get(task[1], ())

    def unplace(self, job_id: str, index: int) -> None:
        """Undo a placement the job refused (the task was no longer pending)."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._release(job, index)

    def add_finished_job(
        self,
        spec: SubmitJob,
        outcome: Outcome,
        task_outcomes: Sequence[Outcome | None],
        *,
        metrics: Mapping[int, Mapping[str, float]] | None = None,
    ) -> None:
        """Record a job that finished before a restart, so its dependants see its outcome
        (and, for conditional ones, the ``metrics`` its tasks reported; -1: the job's)."""
        if spec.job_id in self.graph:
            return
        self.graph.add_passivated(spec.graph_job(), outcome, task_outcomes, metrics=metrics)

    def block_node(self, job_id: str, node: str, until: datetime) -> None:
        """Keep the job's tasks off ``node`` until ``until``."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.blocklist[node] = until

    def set_job_status(self, job_id: str, status: str) -> None:
        """Pause, resume or mark a job as cancelling (only ``active`` jobs get new work)."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.view.status = status  # type: ignore[assignment]

    def amend_job(self, spec: SubmitJob) -> None:
        """Replace a live job's spec (priority or metadata amended)."""
        job = self._jobs.get(spec.job_id)
        if job is not None:
            self._order_remove(job)
            job.view.spec = spec
            job.view.metadata = self._decode_metadata(spec)
            job.hold = None
            self._order_add(job)

    def release_held(self, job_id: str, indices: Iterable[int] | None = None) -> list[int]:
        """Release held tasks of a live job (all when ``indices`` is None); return them."""
        job = self._jobs.get(job_id)
        if job is None:
            return []
        chosen = list(job.held) if indices is None else [i for i in indices if i in job.held]
        for index in chosen:
            del job.held[index]
            job.tasks[index].not_before = None
            if self.graph.is_ready(TaskRef(job_id, index)):
                self._enqueue(job, index)
        return chosen

    def _release_ready(self, refs: Iterable[TaskRef]) -> list[TaskRef]:
        released = []
        for ref in refs:
            job = self._jobs.get(ref.job)
            if (
                job is not None
                and ref.index not in job.running
                and ref.index not in job.held
                and ref.index not in job.finished
            ):
                self._enqueue(job, ref.index)
                released.append(ref)
        return released

    def decide_failure(
        self, job_id: str, index: int, failure: Failure, now: datetime
    ) -> tuple[RetryDecision, Failure]:
        """Classify a failed attempt and decide what follows (the policy's ``on_failure``).

        A failure is the job's fault (and never counts against a node) when its command could
        not start, or when this job already failed the same way on another node.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return RetryDecision(action="fail", reason="the job is over"), failure
        signature = (failure.kind, failure.exit_code)
        places = job.signatures.setdefault(signature, set())
        if failure.node is not None:
            places.add(failure.node)
        job_fault = failure.job_fault or failure.kind == "start" or len(places) > 1
        if job_fault and not failure.job_fault:
            failure = Failure(
                kind=failure.kind,
                node=failure.node,
                attempt=failure.attempt,
                error=failure.error,
                exit_code=failure.exit_code,
                job_fault=True,
            )
            self._forgive_nodes(job_id, signature)
        task = job.tasks[index]
        default = default_retry(job.view.spec, task, failure)
        decision = self._guarded(
            job, default, self.policy.on_failure, job.view, task, failure, default, now
        )
        return decision, failure

    def _forgive_nodes(self, job_id: str, signature: tuple[str, int | None]) -> None:
        for node in self._nodes.values():
            node.recent_failures = [f for f in node.recent_failures if f != (job_id, signature)]
            node.view.failures = len(node.recent_failures)

    def _count_node_outcome(
        self, node: _Node, job: _Job, failure: Failure | None, attempt_outcome: str | None
    ) -> None:
        if attempt_outcome == "completed":
            node.recent_failures.clear()
        elif failure is not None and not failure.job_fault and failure.kind != "lost":
            node.recent_failures.append((job.view.job_id, (failure.kind, failure.exit_code)))
        node.view.failures = len(node.recent_failures)

    def quarantine_due(self, name: str, *, after: int, distinct_jobs: int) -> str | None:
        """Return why ``name`` should be quarantined now (enough failures from enough jobs)."""
        node = self._nodes.get(name)
        if node is None or node.view.health != "online":
            return None
        failures = node.recent_failures
        jobs = {job for job, _ in failures}
        if len(failures) >= after and len(jobs) >= distinct_jobs:
            return (
                f"{len(failures)} failed attempts in a row from {len(jobs)} jobs "
                f"({', '.join(sorted(jobs)[:3])})"
            )
        return None

    # -- nodes ----------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        capacity: Resources,
        *,
        labels: tuple[str, ...] = (),
        health: str = "online",
        reachable: str = "connected",
    ) -> None:
        """Add (or refresh) a node; a known node keeps its running reservations."""
        node = self._nodes.get(name)
        if node is None:
            view = NodeView(
                name=name,
                capacity=capacity,
                free=capacity,
                labels=labels,
                health=health,
                reachable=reachable,
                label_map=parse_labels(labels),
            )
            node = self._nodes[name] = _Node(view=view)
            self.farm.nodes[name] = view  # type: ignore[index]
            self.farm.running[name] = node.running  # type: ignore[index]
        else:
            free = capacity
            for running in node.running.values():
                part = self._split_request(running.request)[0]
                free = subtract(free, part) if fits(part, free) else free
            view = node.view
            view.capacity, view.free, view.labels = capacity, free, labels
            view.label_map = parse_labels(labels)
            view.health, view.reachable = health, reachable
        self._reindex_node(node)

    def set_health(
        self, name: str, health: NodeHealth, *, reason: str = "", by: str = "engine"
    ) -> None:
        """Change a node's health (only ``online`` nodes get new work)."""
        node = self._nodes[name]
        node.view.health = health
        node.view.health_reason = reason
        node.view.health_by = by
        if health != "quarantined":
            node.recent_failures.clear()
            node.view.failures = 0
        self._reindex_node(node)

    def set_reachable(self, name: str, reachable: str) -> None:
        """Change a node's connection state (only ``connected`` nodes get new work)."""
        node = self._nodes[name]
        node.view.reachable = reachable
        self._reindex_node(node)

    def set_drain_at(self, name: str, when: datetime | None) -> None:
        """Plan a drain: work that cannot finish before ``when`` is not placed there."""
        self._nodes[name].view.drain_at = when
        if when is None:
            self._drains.pop(name, None)
        else:
            self._drains[name] = when

    @property
    def planned_drains(self) -> dict[str, datetime]:
        """Return the nodes whose drain is planned, with its time (read-only use)."""
        return self._drains

    def node_health(self, name: str) -> NodeHealth | None:
        """Return a node's health, or None if unknown."""
        node = self._nodes.get(name)
        return node.view.health if node else None

    def node_view(self, name: str) -> NodeView | None:
        """Return a node's view, or None if unknown."""
        node = self._nodes.get(name)
        return node.view if node else None

    def running_on(self, name: str) -> list[tuple[str, int]]:
        """Return the (job, task) attempts running on a node."""
        node = self._nodes.get(name)
        return sorted(node.running) if node else []

    def node_summaries(self) -> list[NodeSummary]:
        """Describe every node, by name."""
        return [
            NodeSummary(
                name=node.view.name,
                health=_display_health(node.view),
                capacity=node.view.capacity,
                free=node.view.free,
                running=len(node.running),
                labels=node.view.labels,
                consecutive_failures=node.view.failures,
                drain_at=node.view.drain_at.isoformat() if node.view.drain_at else None,
                reason=node.view.health_reason,
            )
            for node in sorted(self._nodes.values(), key=lambda n: n.view.name)
        ]

    # -- placement ------------------------------------------------------------------------------

    def place(self, now: datetime, *, limit: int | None = None) -> list[Placement]:
        """Run one placement cycle: rank jobs, place runnable tasks onto fitting nodes."""
        policy = self.policy
        farm = self.farm
        self.cycles += 1
        self.blocked = []
        self.held_nodes = {}
        if not any(self._fit_index.values()) and not self.exhaustive:
            # No queued request fits anywhere now: nothing to place, nothing to rank.
            self._note_unplaceable(now)
            return []
        keyed = self._ranked(now)
        if keyed is None:
            return []
        placements: list[Placement] = []
        timing = self.decision_seconds
        fit_index = self._fit_index
        for _, job in keyed:
            view = job.view
            if not self.exhaustive:
                if not any(fit_index.values()):
                    # The farm is full for every queued request: the rest only wait (they
                    # are still offered to preemption, in rank order).
                    if len(self.blocked) < _MAX_BLOCKED:
                        self._note_blocked(job, next(iter(job.ready)))
                        continue
                    break
                if not any(fit_index.get(k) for k in job.distinct):
                    self._note_blocked(job, next(iter(job.ready)))
                    continue
            hold = self._guarded(job, None, policy.admit_job, view, farm, now)
            if _held_by_error(job):
                continue
            job.hold = hold
            if hold is not None:
                if hold.until is not None and hold.until > now:
                    self.hold_wakeups.append(hold.until)
                continue
            job.deferred = None
            unplaceable: set[FitKey] = set()
            for index in list(job.ready):
                task = job.tasks[index]
                if task.not_before is not None and task.not_before > now:
                    continue
                key = job.keys[index]
                if key in unplaceable:
                    continue
                began = perf_counter() if timing is not None else 0.0
                reason = self._guarded(job, None, policy.admit, view, task, farm, now)
                if _held_by_error(job):
                    break
                if reason is not None:
                    job.deferred = reason
                    continue
                if task.nodes > 1:
                    gang = self._choose_gang(job, task, now)
                    if timing is not None:
                        timing.append(perf_counter() - began)
                    if gang is None:
                        self._note_blocked(job, index)
                        unplaceable.add(key)
                        if len(unplaceable) >= len(job.distinct):
                            break
                        continue
                    self._dequeue(job, index)
                    self._reserve_gang(job, index, gang, started_at=now)
                    interval = self._track_checkpoints(job, index, now)
                    placements.append(
                        Placement(
                            view.job_id,
                            index,
                            gang[0],
                            task.request,
                            nodes=gang,
                            checkpoint_interval=interval,
                        )
                    )
                    if limit is not None and len(placements) >= limit:
                        self.placements_made += len(placements)
                        return placements
                    continue
                node = self._choose_node(job, task, now)
                if timing is not None:
                    timing.append(perf_counter() - began)
                if node is None:
                    self._note_blocked(job, index)
                    unplaceable.add(key)
                    if len(unplaceable) >= len(job.distinct):
                        break  # the rest of its queue would be skipped one by one
                    continue
                self._dequeue(job, index)
                self._reserve(job, index, node.view.name, started_at=now)
                interval = self._track_checkpoints(job, index, now)
                placements.append(
                    Placement(
                        view.job_id,
                        index,
                        node.view.name,
                        task.request,
                        checkpoint_interval=interval,
                    )
                )
                if limit is not None and len(placements) >= limit:
                    self.placements_made += len(placements)
                    return placements
        self.placements_made += len(placements)
        return placements

    def _candidates(self, now: datetime) -> Iterator[_Job]:
        for job in self._jobs.values():
            if not job.ready or job.view.status != "active":
                continue
            if job.hold is not None and job.hold.until is not None and job.hold.until > now:
                continue
            job.policy_error = None
            yield job

    def _ranked(self, now: datetime) -> list[tuple[Any, _Job]] | None:
        """Return this cycle's candidate jobs in rank order (None: a policy bug in ``rank``).

        A policy whose ``rank`` is FIFO's (a pure function of the job, never of time or the
        farm) is served from an order kept up to date as jobs come, go and are amended:
        ranking every job each cycle would cost more than placing a freed slot's task.
        """
        if self._static_order is not None:
            jobs = self._jobs
            ranked = []
            for key, job_id in self._static_order:
                job = jobs[job_id]
                if not job.ready or job.view.status != "active":
                    continue
                if job.hold is not None and job.hold.until is not None and job.hold.until > now:
                    continue
                job.policy_error = None
                ranked.append((key, job))
            return ranked
        keyed: list[tuple[Any, _Job]] = []
        for job in self._candidates(now):
            key = self._guarded(job, None, self.policy.rank, job.view, self.farm, now)
            if key is not None:
                keyed.append((key, job))
        try:
            keyed.sort(key=lambda item: item[0])
        except TypeError as error:  # keys of different shapes: a policy bug
            for _, job in keyed:
                job.policy_error = f"policy error: rank: {error}"
            return None
        return keyed

    def _order_add(self, job: _Job) -> None:
        if self._static_order is not None:
            key = self.policy.rank(job.view, self.farm, job.view.submitted_at)
            bisect.insort(self._static_order, (key, job.view.job_id))

    def _order_remove(self, job: _Job) -> None:
        if self._static_order is not None:
            key = self.policy.rank(job.view, self.farm, job.view.submitted_at)
            index = bisect.bisect_left(self._static_order, (key, job.view.job_id))
            if index < len(self._static_order) and self._static_order[index][1] == job.view.job_id:
                del self._static_order[index]

    def _note_unplaceable(self, now: datetime) -> None:
        """Offer the top-ranked waiting tasks to preemption although nothing fits now."""
        if type(self.policy).preemptions is FifoPolicy.preemptions:
            return  # no preemption: nobody to offer them to
        ranked = self._ranked(now) or []
        for _, job in ranked[:_MAX_BLOCKED]:
            self._note_blocked(job, next(iter(job.ready)))

    # -- periodic checkpoints -------------------------------------------------------------------

    def _track_checkpoints(self, job: _Job, index: int, now: datetime) -> float | None:
        """Ask the policy how often this attempt must checkpoint; track it if at all."""
        if not job.view.spec.checkpointable:
            return None
        task = job.tasks[index]
        interval = self._guarded(job, None, self.policy.checkpoint_interval, job.view, task, now)
        if interval is None or not interval > 0:
            return None
        interval = min(float(interval), 365 * 86400.0)
        running = self._running_view(job, index)
        if running is not None:
            running.checkpoint_interval = interval
        key = (job.view.job_id, index)
        self._checkpoint_since[key] = now
        due = now + timedelta(seconds=interval)
        if self._checkpoint_due is None or due < self._checkpoint_due:
            self._checkpoint_due = due
        return interval

    def checkpoint_requests(self, now: datetime) -> list[tuple[str, int, str]]:
        """Return the attempts whose checkpoint interval passed without a checkpoint, as
        (job, task, reason); each is asked again only after another interval."""
        due = self._checkpoint_due
        if due is None or due > now:
            return []
        asked: list[tuple[str, int, str]] = []
        earliest: datetime | None = None
        for key, since in list(self._checkpoint_since.items()):
            running = self._running(key)
            if running is None or running.checkpoint_interval is None:
                del self._checkpoint_since[key]
                continue
            if running.checkpoint_at is not None and running.checkpoint_at > since:
                since = self._checkpoint_since[key] = running.checkpoint_at
            step = timedelta(seconds=running.checkpoint_interval)
            if since + step <= now and not running.yielding:
                asked.append(
                    (
                        key[0],
                        key[1],
                        f"no checkpoint for {running.checkpoint_interval:.0f} s "
                        "(its checkpoint interval)",
                    )
                )
                since = self._checkpoint_since[key] = now
            if earliest is None or since + step < earliest:
                earliest = since + step
        self._checkpoint_due = earliest
        return asked

    @property
    def next_checkpoint_due(self) -> datetime | None:
        """Return when the next periodic checkpoint request may be due (None: none)."""
        return self._checkpoint_due

    def _running(self, key: tuple[str, int]) -> RunningView | None:
        job = self._jobs.get(key[0])
        return self._running_view(job, key[1]) if job is not None else None

    def yield_choices(self, now: datetime) -> list[Preemption]:
        """Return the policy's ``yields`` that are valid now: the victim runs where the
        policy says and is not already yielding."""
        chosen: list[Preemption] = []
        for choice in self._guarded(None, (), self.policy.yields, self.farm, now):
            victim = (choice.victim_job, choice.victim_task)
            if victim in self.preempting or not self.is_running_on(victim, choice.node):
                continue
            self.preempting[victim] = ("", -1)  # yields to no task in particular
            chosen.append(choice)
        return chosen

    def _note_blocked(self, job: _Job, index: int) -> None:
        if len(self.blocked) < _MAX_BLOCKED:
            self.blocked.append((job.view, job.tasks[index]))

    def preemption_choices(self, now: datetime) -> list[tuple[tuple[str, int], Preemption]]:
        """Offer the tasks the last cycle could not place to the policy's preemption hook.

        Returns (the waiting task, a preemption) pairs that are still valid: the victim runs
        where the policy says, and is not already yielding.
        """
        if not self.blocked:
            return []
        waiting_for = set(self.preempting.values())
        chosen: list[tuple[tuple[str, int], Preemption]] = []
        for job_view, task_view in self.blocked:
            blocked = (job_view.job_id, task_view.index)
            job = self._jobs.get(job_view.job_id)
            if blocked in waiting_for or job is None:
                continue
            choices = self._guarded(
                job, (), self.policy.preemptions, job_view, task_view, self.farm, now
            )
            for choice in choices:
                victim = (choice.victim_job, choice.victim_task)
                if victim in self.preempting or not self.is_running_on(victim, choice.node):
                    continue
                self.preempting[victim] = blocked
                waiting_for.add(blocked)
                chosen.append((blocked, choice))
        return chosen

    def _choose_node(self, job: _Job, task: TaskView, now: datetime) -> _Node | None:
        node_part, pool_part = self._split_request(task.request)
        if pool_part and not self.pool.can_acquire(pool_part):
            return None
        if self.exhaustive:
            names: Iterable[str] = self._nodes
        else:
            found = self._fit_index.get(job.keys[task.index])
            if not found:
                return None
            names = found
        policy = self.policy
        view = job.view
        best: _Node | None = None
        best_score = 0.0
        looked = 0
        runtime = view.spec.task_max_runtime(task.index)
        for name in names:
            node = self._nodes[name]
            node_view = node.view
            if self.exhaustive and (
                not node_view.accepts_work
                or not fits(node_part, node_view.free)
                or node_view.satisfies(task.requires) is not None
            ):
                continue
            if not self._usable(job, task, name, node_view, runtime, now):
                continue
            drain_at = node_view.drain_at
            if (
                drain_at is not None
                and runtime is not None
                and now + timedelta(seconds=runtime) > drain_at
            ):
                continue
            score = self._guarded(job, None, policy.node_score, view, task, node_view, now)
            if score is None:
                continue
            if best is None or score > best_score:
                best, best_score = node, score
            looked += 1
            if looked >= policy.max_candidates and not self.exhaustive:
                break
        return best

    def _usable(
        self,
        job: _Job,
        task: TaskView,
        name: str,
        view: NodeView,
        runtime: float | None,
        now: datetime,
    ) -> bool:
        """Whether ``task`` may go to node ``name`` now, beyond fitting: not blocklisted for
        its job, not avoided by the task, not held for another waiting gang, and (with a known
        walltime) not drained before it could finish."""
        until = job.blocklist.get(name)
        if until is not None and until > now:
            return False
        if task.avoid and name in task.avoid and len(task.avoid) < len(self._nodes):
            return False
        holder = self.held_nodes.get(name)
        if holder is not None and holder != (job.view.job_id, task.index):
            return False
        drain_at = view.drain_at
        return not (
            drain_at is not None
            and runtime is not None
            and now + timedelta(seconds=runtime) > drain_at
        )

    def _choose_gang(self, job: _Job, task: TaskView, now: datetime) -> tuple[str, ...] | None:
        """Choose ``task.nodes`` distinct nodes for a multi-node task, all or nothing.

        The best-scoring usable nodes that fit it now win (ties by name).  When too few are
        free, the policy's ``gang_holds`` keeps some for it (by default: every node that fits
        now), so that lower-ranked work does not take them while the gang waits.
        """
        node_part, pool_part = self._split_request(task.request)
        if pool_part and not self.pool.can_acquire(pool_part):
            return None
        if self.exhaustive:
            names: Iterable[str] = [
                n
                for n, node in self._nodes.items()
                if node.view.accepts_work
                and fits(node_part, node.view.free)
                and node.view.satisfies(task.requires) is None
            ]
        else:
            names = self._fit_index.get(job.keys[task.index]) or ()
        runtime = job.view.spec.task_max_runtime(task.index)
        view = job.view
        scored: list[tuple[float, str]] = []
        # As for one node, the best of the first candidates wins: scoring every node of a
        # large farm for each gang would cost more than the placement is worth.
        enough = max(self.policy.max_candidates, task.nodes)
        for name in names:
            node_view = self._nodes[name].view
            if not self._usable(job, task, name, node_view, runtime, now):
                continue
            score = self._guarded(job, None, self.policy.node_score, view, task, node_view, now)
            if score is not None:
                scored.append((-score, name))
                if len(scored) >= enough and not self.exhaustive:
                    break
        scored.sort()
        if len(scored) >= task.nodes:
            return tuple(name for _, name in scored[: task.nodes])
        candidates = [name for _, name in scored]
        holds = self._guarded(
            job, candidates, self.policy.gang_holds, view, task, candidates, self.farm, now
        )
        for name in holds:
            if name in candidates:
                self.held_nodes[name] = (view.job_id, task.index)
        return None

    def _reserve_gang(
        self, job: _Job, index: int, nodes: tuple[str, ...], *, started_at: datetime | None
    ) -> None:
        for name in nodes:
            self._reserve(job, index, name, started_at=started_at, member=True)
        job.running[index] = nodes[0]
        job.gangs[index] = nodes
        job.view.running += 1
        places = self.farm.placements.setdefault(job.view.job_id, {})  # type: ignore[attr-defined]
        places[index] = nodes[0]

    def _reserve(
        self,
        job: _Job,
        index: int,
        node_name: str,
        *,
        started_at: datetime | None,
        member: bool = False,
    ) -> None:
        node = self._nodes[node_name]
        task = job.tasks[index]
        node_part, pool_part = self._split_request(task.request)
        if pool_part:
            holder = f"{job.view.job_id}/{index}"
            self.pool.release(holder)
            self.pool.try_acquire(holder, pool_part)
            self._refresh_counters()
        view = node.view
        view.free = subtract(view.free, node_part) if fits(node_part, view.free) else view.free
        node.running[(job.view.job_id, index)] = RunningView(
            job_id=job.view.job_id,
            task=index,
            request=task.request,
            node=node_name,
            attempt=task.attempt + 1,
            started_at=started_at,
            progress=task.progress,
            checkpoint_at=task.checkpoint_at,
            preemptions=task.preemptions,
            job=job.view,
        )
        view.running = len(node.running)
        self._reindex_node(node)
        if member:
            return  # the gang's books are kept by ``_reserve_gang``
        job.running[index] = node_name
        job.view.running += 1
        placements = self.farm.placements
        placements.setdefault(job.view.job_id, {})[index] = node_name  # type: ignore[attr-defined]

    def _release(self, job: _Job, index: int) -> None:
        node_name = job.running.pop(index, None)
        if node_name is None:
            return
        members = job.gangs.pop(index, (node_name,))
        job.view.running -= 1
        job_places = self.farm.placements.get(job.view.job_id)
        if job_places is not None:
            job_places.pop(index, None)  # type: ignore[attr-defined]
            if not job_places:
                del self.farm.placements[job.view.job_id]  # type: ignore[attr-defined]
        holder = f"{job.view.job_id}/{index}"
        if self.pool.release(holder):
            self._refresh_counters()
        for name in members:
            node = self._nodes.get(name)
            if node is None:
                continue
            running = node.running.pop((job.view.job_id, index), None)
            node.view.running = len(node.running)
            if running is None:
                continue
            part = self._split_request(running.request)[0]
            node.view.free = add(node.view.free, part, capacity=node.view.capacity)
            self._reindex_node(node)

    def _refresh_counters(self) -> None:
        free = self.farm.counters_free
        for name in self.pool.limits:
            free[name] = self.pool.available(name)  # type: ignore[index]

    def _split_request(self, request: Resources) -> tuple[Resources, dict[str, int]]:
        split = self._split.get(request)
        if split is None:
            split = self._split[request] = (
                self.pool.split(request) if request.counters else (request, {})
            )
        return split

    def _enqueue(self, job: _Job, index: int) -> None:
        if index in job.ready:
            return
        job.ready[index] = None
        job.view.queued += 1
        key = job.keys[index]
        refs = self._index_refs.get(key, 0)
        self._index_refs[key] = refs + 1
        if refs == 0:
            request, requires = key
            self._fit_index[key] = {
                name: None
                for name, node in self._nodes.items()
                if node.view.accepts_work
                and fits(request, node.view.free)
                and node.view.satisfies(requires) is None
            }

    def _dequeue(self, job: _Job, index: int) -> None:
        if index not in job.ready:
            return
        del job.ready[index]
        job.view.queued -= 1
        key = job.keys[index]
        refs = self._index_refs[key] - 1
        if refs:
            self._index_refs[key] = refs
        else:
            del self._index_refs[key]
            del self._fit_index[key]

    def _reindex_node(self, node: _Node) -> None:
        view = node.view
        accepts = view.accepts_work
        name = view.name
        free = view.free
        for (request, requires), members in self._fit_index.items():
            if accepts and fits(request, free) and view.satisfies(requires) is None:
                members[name] = None
            else:
                members.pop(name, None)

    # -- explanations ---------------------------------------------------------------------------

    def _placement_failure(self, job: _Job, index: int, now: datetime) -> str:
        task = job.tasks[index]
        if task.nodes > 1:
            gang = self._gang_failure(job, task, now)
            if gang is not None:
                return gang
        node_part, pool_part = self._split_request(task.request)
        if pool_part and not self.pool.can_acquire(pool_part):
            short = [
                f"{name} ({self.pool.available(name)} of {self.pool.limits[name]} free)"
                for name, count in sorted(pool_part.items())
                if self.pool.available(name) < count
            ]
            return "waiting for farm-wide licence " + ", ".join(short)
        never = self.never_fits(job.view.spec, index)
        if never is not None:
            return never
        accepting = [n for n in self._nodes.values() if n.view.accepts_work]
        if not accepting:
            states = sorted({_display_health(n.view) for n in self._nodes.values()})
            return f"no node is online (nodes are {', '.join(states)})"
        able = [
            n
            for n in accepting
            if fits(node_part, n.view.capacity) and n.view.satisfies(task.requires) is None
        ]
        if not able:
            sized = [n for n in accepting if fits(node_part, n.view.capacity)]
            if sized:
                return f"no online node has {_missing_labels(sized, task.requires)}"
            biggest = max(accepting, key=lambda n: _size(n.view.capacity))
            lacks = "; ".join(str(s) for s in shortfall(node_part, biggest.view.capacity))
            return f"no online node is big enough (largest, {biggest.view.name}, lacks {lacks})"
        allowed = [n for n in able if not (job.blocklist.get(n.view.name, now) > now)]
        if not allowed:
            return f"every node that fits is blocklisted for this job ({len(able)} nodes)"
        runtime = job.view.spec.task_max_runtime(index)
        if runtime is not None:
            ends = now + timedelta(seconds=runtime)
            before = [n for n in allowed if n.view.drain_at is None or ends <= n.view.drain_at]
            if not before:
                first = min(n.view.drain_at for n in allowed if n.view.drain_at is not None)
                return (
                    f"every node that fits drains before it could finish (max_runtime "
                    f"{runtime:.0f} s; first drain at {first.isoformat()})"
                )
            allowed = before
        return f"all {len(allowed)} nodes that fit are busy"

    def _gang_failure(self, job: _Job, task: TaskView, now: datetime) -> str | None:
        never = self.never_fits(job.view.spec, task.index)
        if never is not None:
            return never
        held = sorted(n for n, h in self.held_nodes.items() if h == (job.view.job_id, task.index))
        free = self._fit_index.get(job.keys[task.index]) or {}
        if held:
            return (
                f"needs {task.nodes} nodes at once; holding {len(held)} of {task.nodes} "
                f"({', '.join(held[:8])}) for it until the rest are free"
            )
        return f"needs {task.nodes} nodes at once; {len(free)} that fit are free now"

    def why(self, job_id: str, now: datetime) -> list[str]:
        """Explain, line by line, why a job's unfinished tasks are not running."""
        job = self._jobs.get(job_id)
        if job is None:
            return [f"job {job_id} is not waiting (unknown or finished)"]
        view = job.view
        lines = [self._guarded(job, "", self.policy.explain_rank, view, now)]
        described = self._guarded(job, {}, self.policy.describe, view, now)
        lines.extend(f"{key}: {value}" for key, value in described.items())
        if view.status != "active":
            lines.append(f"the job is {view.status}")
        if job.policy_error:
            lines.append(f"held: {job.policy_error}")
        if job.hold is not None and (job.hold.until is None or job.hold.until > now):
            until = f" until {job.hold.until.isoformat()}" if job.hold.until else ""
            lines.append(f"held by policy{until}: {job.hold.reason}")
        if job.running:
            lines.append(f"{len(job.running)} task(s) running")
        waiting: dict[str, list[int]] = {}
        for index in range(len(job.tasks)):
            if index in job.running or index in job.finished:
                continue
            reason = self._task_reason(job, index, now)
            waiting.setdefault(reason, []).append(index)
        for reason, indices in waiting.items():
            lines.append(f"{self._task_names(job, indices)}: {reason}")
        return [line for line in lines if line]

    def _task_names(self, job: _Job, indices: list[int]) -> str:
        names = [job.tasks[i].name for i in indices]
        if all(name.isdigit() or "-" in name for name in names) and all(
            job.tasks[i].frames for i in indices
        ):
            frames: list[int] = []
            for i in indices:
                first, last = job.tasks[i].frames or (0, 0)
                frames.extend(range(first, last + 1))
            return f"frame(s) {_ranges(frames)}"
        if all(name == str(i) for name, i in zip(names, indices, strict=True)):
            return f"task(s) {_ranges(indices)}"
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return f"task(s) {shown}"

    def _task_reason(self, job: _Job, index: int, now: datetime) -> str:
        if index in job.held:
            return f"held: {job.held[index]} (taskfarm retry releases it)"
        if index not in job.ready:
            ref = TaskRef(job.view.job_id, index)
            unreachable = self.graph.unreachable(ref)
            if unreachable is not None:
                return f"can no longer run: {self._named(unreachable)}"
            blocked = self.graph.blockers(ref)
            if blocked:
                return "; ".join(self._named(b.reason) for b in blocked)
            return "waiting to be dispatched"
        task = job.tasks[index]
        if task.not_before is not None and task.not_before > now:
            return f"retry backoff until {task.not_before.isoformat()}"
        if job.view.status != "active":
            return f"the job is {job.view.status}"
        if job.policy_error:
            return job.policy_error
        if job.hold is not None and (job.hold.until is None or job.hold.until > now):
            return f"held by policy: {job.hold.reason}"
        if job.deferred:
            return f"deferred by policy: {job.deferred}"
        return self._placement_failure(job, index, now)

    def _named(self, text: str) -> str:
        """Name the tasks the graph labels by index (``sim[1]``) as their spec did
        (``sim[stage-2]``), for the live jobs this core knows."""

        def name(match: re.Match[str]) -> str:
            job = self._jobs.get(match.group(1))
            index = int(match.group(2))
            if job is None or not 0 <= index < len(job.tasks):
                return match.group(0)
            task_name = job.tasks[index].name
            return match.group(0) if task_name == str(index) else f"{match.group(1)}[{task_name}]"

        return _TASK_LABEL.sub(name, text)

    def task_status(self, job_id: str, index: int) -> str | None:
        """Return ``blocked`` or ``held`` for a pending task that cannot run yet, else None."""
        job = self._jobs.get(job_id)
        if job is None or index in job.running or index in job.finished:
            return None
        if index in job.held:
            return "held"
        if index not in job.ready:
            return "blocked"
        return None

    def describe(self, job_id: str, now: datetime) -> tuple[dict[str, str], dict[int, str]]:
        """Return a live job's policy columns and the status of its tasks that cannot run
        yet (``blocked`` on a dependency, ``held`` for an operator)."""
        job = self._jobs.get(job_id)
        if job is None:
            return {}, {}
        view = job.view
        domain = dict(self._guarded(job, {}, self.policy.describe, view, now))
        statuses: dict[int, str] = {}
        for index in range(len(job.tasks)):
            status = self.task_status(job_id, index)
            if status is not None:
                statuses[index] = status
        return domain, statuses

    def policy_wants_history(self) -> bool:
        """Return whether the policy rebuilds learned state from the journal on start."""
        return bool(getattr(self.policy, "history", False))

    def statistics(self) -> dict[str, int]:
        """Return queue and node counts."""
        return {
            "jobs": len(self._jobs),
            "queued": sum(len(j.ready) for j in self._jobs.values()),
            "running": sum(len(j.running) for j in self._jobs.values()),
            "nodes": len(self._nodes),
            "placements": self.placements_made,
            "cycles": self.cycles,
            "index_shapes": len(self._fit_index),
        }


def _missing_labels(nodes: Sequence[_Node], requires: tuple[str, ...]) -> str:
    """Name the required labels the closest node lacks (``the label 'os=linux' (required:
    gpu, os=linux)``)."""
    best: list[str] | None = None
    for node in nodes:
        missing = [r for r in requires if node.view.satisfies((r,)) is not None]
        if best is None or len(missing) < len(best):
            best = missing
    missing = best or list(requires)
    noun = "the label" if len(missing) == 1 else "the labels"
    return f"{noun} {', '.join(repr(m) for m in missing)} (required: {', '.join(requires)})"


def _held_by_error(job: _Job) -> bool:
    return job.policy_error is not None


def _display_health(view: NodeView) -> str:
    if view.reachable != "connected" and view.health in ("online", "draining"):
        return view.reachable if view.health == "online" else f"draining ({view.reachable})"
    return view.health


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
