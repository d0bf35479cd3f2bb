"""The dependency graph over jobs and their tasks (the only module that imports networkx).

Model
-----
A job has one or more tasks, indexed from 0. Each task covers an inclusive range of *elements*
(frames for a render job; by default task ``i`` covers ``(i, i)``). A ``Dependency`` declared by a
child job is one of:

- **job on job** (no task fields): every task of the child waits until the parent job has an
  outcome that meets the condition, or, with ``threshold``, until the parent's progress reaches
  it (whichever comes first; once met, it stays met even if progress is later reported lower);
- **task on task** (``parent_task`` and/or ``child_task``): one task, or the whole child, waits on
  one task, or on the whole parent;
- **element-wise** (``elementwise=ElementMap(...)``): child task ``c`` covering elements
  ``[s, e]`` waits on every parent task whose range overlaps ``[s + offset - before,
  e + offset + after]``. With equal chunking this is "task i waits on task i"; with different
  chunk sizes, a child chunk of frames 11-20 waits on every parent chunk touching 11-20. A child
  task whose window overlaps no parent task is rejected at submission.

Conditions: ``on_success`` (the parent succeeded), ``on_failure`` (it failed; a cancelled parent
does not count), ``on_any_outcome`` (it finished in any way). Once the parent has an outcome the
edge is decided: satisfied, or *unreachable* (it can never be satisfied). Only final outcomes are
recorded (after the last retry).

Conditional edges (``when = "residual < 1e-3"``, on ``on_success`` edges only) branch on a metric
the parent reported (the task's last value; for a whole job, the last value any task reported):
a parent that succeeds with the condition true satisfies the edge; false (or the metric never
reported) decides the child *skipped*, not unreachable. A skipped task is an outcome of its own
(``Outcome.SKIPPED``): it satisfies ``on_any_outcome`` dependants and skips the others in turn
(a branch not taken is not taken downstream either), and it never fails or cancels its job.

Incremental state
-----------------
Each task keeps a count of its unsatisfied task-level edges and each job a count of its
unsatisfied job-level edges; recording an outcome visits only the finished node's successors, and
a task is ready when both counts reach zero. Every output is sorted.

Rebuilding
----------
Every mutation (``add_jobs``, ``add_dependency``, ``record_outcome``, ``record_progress``,
``remove_job``) is a deterministic method of journaled facts (``JobSubmitted`` carrying its
dependencies, final task and job outcomes, progress milestones, passivation). Replaying the same
facts in journal order rebuilds the same graph; ``snapshot()`` gives a canonical value to check it.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal, NamedTuple, TypeAlias

import msgspec
import networkx as nx

from actors._errors import DependencyCycleError, DependencyError, UnknownDependencyError

__all__ = [
    "Blocker",
    "Condition",
    "Dependency",
    "DependencyGraph",
    "ElementMap",
    "GraphJob",
    "GraphSnapshot",
    "GraphStatistics",
    "GraphUpdate",
    "MetricCondition",
    "OnParentFailure",
    "Outcome",
    "TaskRef",
]


OnParentFailure: TypeAlias = Literal["cancel", "wait"]


class Outcome(enum.Enum):
    """The final outcome of a task or a job."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # a conditional branch not taken (see ``Dependency.when``)


class Condition(enum.Enum):
    """Which parent outcomes satisfy a dependency."""

    ON_SUCCESS = "on_success"
    ON_FAILURE = "on_failure"
    ON_ANY_OUTCOME = "on_any_outcome"

    def satisfied_by(self, outcome: Outcome) -> bool:
        """Return True when ``outcome`` satisfies this condition."""
        if self is Condition.ON_ANY_OUTCOME:
            return True
        if self is Condition.ON_SUCCESS:
            return outcome is Outcome.SUCCEEDED
        return outcome is Outcome.FAILED


_OPERATORS: Final = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_WHEN: Final = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.-]{0,63})\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


class MetricCondition(msgspec.Struct, frozen=True, kw_only=True):
    """A condition on a reported metric: ``metric op value`` (``residual < 1e-3``)."""

    metric: str
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: float

    @classmethod
    def parse(cls, text: str) -> MetricCondition:
        """Parse ``"<metric> <op> <number>"`` (op one of ``< <= > >= == !=``).

        Raises:
            ValueError: the text is not such a condition (the message says what is expected).
        """
        found = _WHEN.match(text) if len(text) <= 200 else None
        if found is None:
            raise ValueError(
                f"{text[:60]!r} is not a metric condition; expected '<metric> <op> <number>' "
                "with op one of <, <=, >, >=, ==, != (e.g. 'residual < 1e-3')"
            )
        value = float(found.group("value"))
        if not math.isfinite(value):
            raise ValueError(f"{text[:60]!r}: the number must be finite")
        return cls(metric=found.group("metric"), op=found.group("op"), value=value)  # type: ignore[arg-type]

    def decide(self, metrics: Mapping[str, float] | None) -> tuple[bool, str]:
        """Return whether the reported ``metrics`` meet the condition, and a readable why."""
        reported = (metrics or {}).get(self.metric)
        if reported is None:
            return False, f"{self} is false: {self.metric} was never reported"
        met = bool(_OPERATORS[self.op](reported, self.value))
        return met, f"{self} is {'true' if met else 'false'} ({self.metric} = {reported:g})"

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class TaskRef(msgspec.Struct, frozen=True, order=True, array_like=True):
    """A task: its job id and its index in the job (hashable, ordered by job then index,
    encoded as ``[job, index]``). Printed as ``job[index]``."""

    job: str
    index: int

    def __str__(self) -> str:
        return f"{self.job}[{self.index}]"


class ElementMap(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The element-wise rule: child elements ``[s, e]`` need parent elements
    ``[s + offset - before, e + offset + after]`` (e.g. ``before=1`` for a motion-blur pass
    that needs the previous frame)."""

    offset: int = 0
    before: Annotated[int, msgspec.Meta(ge=0)] = 0
    after: Annotated[int, msgspec.Meta(ge=0)] = 0

    def window(self, start: int, end: int) -> tuple[int, int]:
        """Return the parent elements needed by child elements ``[start, end]``."""
        return start + self.offset - self.before, end + self.offset + self.after


class Dependency(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One dependency declared by a child job on ``parent`` (a job id); see the module
    docstring for the kinds. Journaled inside ``JobSubmitted``, so fields only ever gain
    defaults."""

    parent: str
    condition: Condition = Condition.ON_SUCCESS
    parent_task: Annotated[int, msgspec.Meta(ge=0)] | None = None
    child_task: Annotated[int, msgspec.Meta(ge=0)] | None = None
    elementwise: ElementMap | None = None
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    # When the parent can no longer satisfy the edge: cancel the dependant (naming the
    # parent), or keep it blocked until the parent is retried.
    on_parent_failure: OnParentFailure = "cancel"
    # A metric condition (``"residual < 1e-3"``): the dependant runs only if the parent
    # succeeded with it true, and is skipped otherwise (see the module docstring).
    when: str | None = None


class GraphJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job as the graph sees it: its id, the element range of each task, its dependencies."""

    job_id: str
    elements: tuple[tuple[int, int], ...]
    dependencies: tuple[Dependency, ...] = ()

    @classmethod
    def with_tasks(
        cls, job_id: str, tasks: int = 1, dependencies: Iterable[Dependency] = ()
    ) -> GraphJob:
        """Build a job of ``tasks`` tasks, task ``i`` covering element ``i``."""
        return cls(
            job_id=job_id,
            elements=tuple((i, i) for i in range(tasks)),
            dependencies=tuple(dependencies),
        )


class GraphUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """What a mutation changed: tasks that became ready, tasks that became unreachable."""

    newly_ready: tuple[TaskRef, ...] = ()
    newly_unreachable: tuple[TaskRef, ...] = ()
    # Tasks a conditional branch decided to skip (each with its reason, in ``skip_reasons``).
    newly_skipped: tuple[TaskRef, ...] = ()
    skip_reasons: tuple[str, ...] = ()


class Blocker(msgspec.Struct, frozen=True, kw_only=True):
    """One thing a job or task waits on, and why (for ``taskfarm why``)."""

    waits_on: str
    condition: Condition
    threshold: float | None = None
    unreachable: bool = False
    reason: str
    on_parent_failure: OnParentFailure = "cancel"
    skip: bool = False  # decided skipped by a conditional branch (not unreachable)


class GraphStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Sizes of the graph."""

    jobs: int
    tasks: int
    ready: int
    edges: int
    passivated: int


class GraphSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A canonical, sorted view of the whole graph state, equal for equal graphs."""

    jobs: tuple[tuple[Any, ...], ...]
    edges: tuple[tuple[Any, ...], ...]
    ready: tuple[TaskRef, ...]
    passivated: tuple[tuple[Any, ...], ...]


# --- internal representation --------------------------------------------------------------------
# networkx nodes: (0, job, -1) is a job's start (job-level edges end there), (2, job, -1) its
# end (job-level edges start there), (1, job, i) a task that has explicit edges. Implicit edges
# start -> end and start -> task -> end make cycles through a job visible to networkx. Plain
# tuples sort and hash fast, and never collide with each other.
_Node: TypeAlias = tuple[int, str, int]
_START: Final = 0
_TASK: Final = 1
_END: Final = 2


def _start(job: str) -> _Node:
    return (_START, job, -1)


def _end(job: str) -> _Node:
    return (_END, job, -1)


def _task(job: str, index: int) -> _Node:
    return (_TASK, job, index)


def _label(node: _Node) -> str:
    return f"{node[1]}[{node[2]}]" if node[0] == _TASK else node[1]


class _Job:
    __slots__ = (
        "blocked",
        "declared",
        "elements",
        "gate",
        "gate_blocker",
        "linked",
        "metrics",
        "outcome",
        "outcomes",
        "pending",
        "progress",
        "task_blockers",
    )

    def __init__(self, elements: tuple[tuple[int, int], ...], declared: GraphJob) -> None:
        self.elements = elements
        self.declared = declared
        # Edges decided unsatisfiable (still counted in gate/pending), with their blocker: a
        # reopened parent (``taskfarm retry``) turns them back into pending edges.
        self.blocked: dict[tuple[_Node, _Node], Blocker] = {}
        self.outcomes: list[Outcome | None] = [None] * len(elements)
        self.pending = [0] * len(elements)
        self.gate = 0
        self.gate_blocker: Blocker | None = None
        self.task_blockers: dict[int, Blocker] = {}
        self.linked: set[int] = set()
        self.outcome: Outcome | None = None
        self.progress = 0.0
        # Metrics reported by finished tasks (by index; -1: the job's), for conditional edges.
        self.metrics: dict[int, dict[str, float]] = {}


class _Passivated(NamedTuple):
    outcome: Outcome
    elements: tuple[tuple[int, int], ...]
    task_outcomes: tuple[Outcome, ...]
    metrics: Mapping[int, Mapping[str, float]] = {}


class _Edge(NamedTuple):
    parent: _Node
    child: _Node
    dependency: Dependency


class _ElementIndex:
    """Parent tasks sorted by first element, for range-overlap lookups."""

    def __init__(self, elements: Sequence[tuple[int, int]]) -> None:
        order = sorted(range(len(elements)), key=lambda i: (elements[i][0], i))
        self._order = order
        self._starts = [elements[i][0] for i in order]
        self._ends = [elements[i][1] for i in order]
        self._monotonic = all(a <= b for a, b in zip(self._ends, self._ends[1:], strict=False))

    def overlapping(self, lo: int, hi: int) -> list[int]:
        stop = bisect.bisect_right(self._starts, hi)
        first = bisect.bisect_left(self._ends, lo, 0, stop) if self._monotonic else 0
        return sorted(self._order[k] for k in range(first, stop) if self._ends[k] >= lo)


class DependencyGraph:
    """Dependencies between jobs and tasks, with incremental readiness (see module docstring).

    Not thread-safe and not async: one actor owns it.
    """

    def __init__(self) -> None:
        self._g: Any = nx.DiGraph()
        self._jobs: dict[str, _Job] = {}
        self._passivated: dict[str, _Passivated] = {}
        self._ready: set[TaskRef] = set()
        # Tasks decided skipped during the current mutation, with why (drained by ``_update``).
        self._skipped: list[tuple[TaskRef, str]] = []

    # --- queries ------------------------------------------------------------------------------

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs or job_id in self._passivated

    def jobs(self) -> tuple[str, ...]:
        """Return the live (not passivated) job ids, sorted."""
        return tuple(sorted(self._jobs))

    def task_count(self, job_id: str) -> int:
        """Return the number of tasks of a job.

        Raises:
            DependencyError: the job is unknown.
        """
        if job_id in self._passivated:
            return len(self._passivated[job_id].elements)
        return len(self._job(job_id).elements)

    def outcome(self, node: str | TaskRef) -> Outcome | None:
        """Return the recorded outcome of a job or task (passivated ones included).

        Raises:
            DependencyError: the job or task is unknown.
        """
        if isinstance(node, TaskRef):
            if node.job in self._passivated:
                dead = self._passivated[node.job]
                self._check_index(node.job, node.index, len(dead.elements))
                return dead.task_outcomes[node.index]
            job = self._job(node.job)
            self._check_index(node.job, node.index, len(job.elements))
            return job.outcomes[node.index]
        if node in self._passivated:
            return self._passivated[node].outcome
        return self._job(node).outcome

    def progress(self, job_id: str) -> float:
        """Return the highest progress fraction recorded for a live job.

        Raises:
            DependencyError: the job is unknown or passivated.
        """
        return self._job(job_id).progress

    def ready_tasks(self) -> tuple[TaskRef, ...]:
        """Return every task whose dependencies are satisfied and that has no outcome, sorted."""
        return tuple(sorted(self._ready))

    def is_ready(self, task: TaskRef) -> bool:
        """Return True when ``task``'s dependencies are satisfied and it has no outcome.

        Raises:
            DependencyError: the task is unknown.
        """
        self.outcome(task)  # validates
        return task in self._ready

    def blockers(self, node: str | TaskRef) -> tuple[Blocker, ...]:
        """Return what a job or task still waits on and why, sorted by what it waits on.

        A job's blockers are its job-level dependencies; a task's add its own task-level ones.
        Decided-unreachable dependencies are included with ``unreachable=True``.

        Raises:
            DependencyError: the job or task is unknown.
        """
        if isinstance(node, TaskRef):
            if self.outcome(node) is not None:
                return ()
            job = self._jobs[node.job]
            found = self._pending_blockers(_start(node.job))
            if job.gate_blocker is not None:
                found.append(job.gate_blocker)
            if node.index in job.linked:
                found.extend(self._pending_blockers(_task(node.job, node.index)))
            if node.index in job.task_blockers:
                found.append(job.task_blockers[node.index])
        else:
            if self.outcome(node) is not None:
                return ()
            job = self._jobs[node]
            found = self._pending_blockers(_start(node))
            if job.gate_blocker is not None:
                found.append(job.gate_blocker)
        return tuple(sorted(found, key=lambda b: (b.waits_on, b.unreachable, b.reason)))

    def unreachable(self, node: str | TaskRef) -> str | None:
        """Return why a job or task can never run as things stand, or None.

        Directly: a dependency's parent has an outcome that fails its condition. Transitively: it
        waits on something that can never finish (until, say, a cascade-cancel records an
        outcome for it). The reason names the parent.

        Raises:
            DependencyError: the job or task is unknown.
        """
        if self.outcome(node) is not None:
            return None
        key = _task(node.job, node.index) if isinstance(node, TaskRef) else _start(node)
        return self._unreachable(key, set())

    def dependencies_of(self, job_id: str) -> tuple[str, ...]:
        """Return the live jobs that ``job_id`` (or any of its tasks) still waits on, sorted.

        Raises:
            DependencyError: the job is unknown or passivated.
        """
        job = self._job(job_id)
        nodes = [_start(job_id), *(_task(job_id, i) for i in job.linked)]
        parents = {
            parent[1]
            for node in nodes
            for parent, data in self._g.pred[node].items()
            if data.get("explicit") and not data["done"] and parent[1] != job_id
        }
        return tuple(sorted(parents))

    def dependants_of(self, job_id: str) -> tuple[str, ...]:
        """Return the live jobs that still wait on ``job_id`` (or any of its tasks), sorted.

        Raises:
            DependencyError: the job is unknown or passivated.
        """
        job = self._job(job_id)
        nodes = [_end(job_id), *(_task(job_id, i) for i in job.linked)]
        children = {
            child[1]
            for node in nodes
            for child, data in self._g.succ[node].items()
            if data.get("explicit") and not data["done"] and child[1] != job_id
        }
        return tuple(sorted(children))

    def statistics(self) -> GraphStatistics:
        """Return the graph's sizes."""
        return GraphStatistics(
            jobs=len(self._jobs),
            tasks=sum(len(j.elements) for j in self._jobs.values()),
            ready=len(self._ready),
            edges=sum(1 for *_, d in self._g.edges(data="explicit") if d),
            passivated=len(self._passivated),
        )

    def snapshot(self) -> GraphSnapshot:
        """Return a canonical view of the whole state (equal graphs give equal snapshots)."""
        jobs = tuple(
            (
                job_id,
                job.elements,
                job.outcome,
                job.progress,
                tuple(job.outcomes),
                tuple(job.pending),
                job.gate,
                job.gate_blocker,
                tuple(sorted(job.task_blockers.items())),
                _canonical_metrics(job.metrics),
            )
            for job_id, job in sorted(self._jobs.items())
        )
        edges = tuple(
            sorted(
                (parent, child, data["dependency"], data["done"])
                for parent, child, data in self._g.edges(data=True)
                if data.get("explicit")
            )
        )
        passivated = tuple(
            (k, *v[:3], _canonical_metrics(v.metrics)) for k, v in sorted(self._passivated.items())
        )
        return GraphSnapshot(
            jobs=jobs, edges=edges, ready=self.ready_tasks(), passivated=passivated
        )

    # --- submission ---------------------------------------------------------------------------

    def check_new(self, jobs: Iterable[GraphJob]) -> None:
        """Validate a submission of new jobs without changing the graph.

        Parents may be live or passivated jobs or jobs of the same submission.

        Raises:
            UnknownDependencyError: a dependency names an unknown job or task index.
            DependencyCycleError: the submission would create a cycle (the path is in it).
            DependencyError: a duplicate job id or dependency, a job without tasks, an empty
                element range, a bad threshold, or an element window no parent task covers.
        """
        self._plan(tuple(jobs))

    def add_jobs(self, jobs: Iterable[GraphJob]) -> GraphUpdate:
        """Add new jobs and their dependencies atomically (all or nothing).

        Raises:
            UnknownDependencyError, DependencyCycleError, DependencyError: as ``check_new``.
        """
        batch = tuple(jobs)
        edges = self._plan(batch)
        for new in batch:
            self._jobs[new.job_id] = _Job(new.elements, new)
            self._g.add_edge(_start(new.job_id), _end(new.job_id), explicit=False)
        unreachable: list[TaskRef] = []
        for edge in edges:
            unreachable.extend(self._add_edge(edge))
        ready: list[TaskRef] = []
        for new in batch:
            job = self._jobs[new.job_id]
            if job.gate == 0 and job.gate_blocker is None:
                ready.extend(self._release(new.job_id, job, range(len(job.elements))))
        return self._update(ready, unreachable)

    def add_job(
        self,
        job_id: str,
        *,
        tasks: int | Sequence[tuple[int, int]] = 1,
        dependencies: Iterable[Dependency] = (),
    ) -> GraphUpdate:
        """Add one job: ``tasks`` is a count, or the element range of each task.

        Raises:
            UnknownDependencyError, DependencyCycleError, DependencyError: as ``check_new``.
        """
        if isinstance(tasks, int):
            new = GraphJob.with_tasks(job_id, tasks, dependencies)
        else:
            new = GraphJob(
                job_id=job_id,
                elements=tuple((s, e) for s, e in tasks),
                dependencies=tuple(dependencies),
            )
        return self.add_jobs([new])

    def add_dependency(self, job_id: str, dependency: Dependency) -> GraphUpdate:
        """Add a dependency to an existing job whose affected tasks are neither ready nor
        finished (a dependency discovered after submission).

        Raises:
            UnknownDependencyError: the parent job or a task index is unknown.
            DependencyCycleError: the new dependency would close a cycle.
            DependencyError: the job is unknown or passivated, an affected task is already
                ready or finished, or the dependency is invalid or a duplicate.
        """
        job = self._job(job_id)
        new = GraphJob(job_id=job_id, elements=job.elements, dependencies=(dependency,))
        edges = self._expand(new, 0, dependency, {})
        for edge in edges:
            affected = (edge.child[2],) if edge.child[0] == _TASK else range(len(job.elements))
            for index in affected:
                if job.outcomes[index] is not None or TaskRef(job_id, index) in self._ready:
                    raise DependencyError(
                        f"cannot add a dependency on {dependency.parent!r} to {job_id}[{index}]: "
                        "it is already ready or finished"
                    )
            if self._g.has_edge(edge.parent, edge.child):
                raise DependencyError(
                    f"{job_id}: duplicate dependency of {_label(edge.child)} "
                    f"on {_label(edge.parent)}"
                )
            self._check_no_cycle(edge)
        unreachable: list[TaskRef] = []
        for edge in edges:
            unreachable.extend(self._add_edge(edge))
        return self._update([], unreachable)

    def _check_no_cycle(self, edge: _Edge) -> None:
        """Refuse a new edge parent -> child between live jobs if child already reaches parent.

        A task without explicit edges is not a networkx node: it reaches what its job's end
        reaches and is reached from its job's start, so those stand in for it.
        """
        parent, child = edge.parent, edge.child
        if parent[1] not in self._jobs or self._jobs[parent[1]].outcome is not None:
            return
        source = child if self._g.has_node(child) else _end(child[1])
        target = parent if self._g.has_node(parent) else _start(parent[1])
        if not nx.has_path(self._g, source, target):
            return
        path = nx.shortest_path(self._g, source, target)
        implicit: dict[str, Any] = {"explicit": False}
        cycle = [(a, b, self._g.edges[a, b]) for a, b in itertools.pairwise(path)]
        if source != child:
            cycle.insert(0, (child, source, implicit))
        if target != parent:
            cycle.append((target, parent, implicit))
        cycle.append((parent, child, {"explicit": True}))
        raise DependencyCycleError(_cycle_labels(cycle))

    # --- facts --------------------------------------------------------------------------------

    def record_outcome(
        self,
        node: str | TaskRef,
        outcome: Outcome,
        *,
        metrics: Mapping[str, float] | None = None,
    ) -> GraphUpdate:
        """Record the final outcome of a task or a job and propagate it to the dependants.

        ``metrics`` are what it reported (last value of each), for conditional edges.
        Recording a job's outcome cancels its tasks that have none (they will not run), so a
        job can only succeed once all its tasks have (skipped ones count as done). Recording
        the same outcome twice is a no-op (replays and duplicate reports are harmless).

        Raises:
            DependencyError: the job or task is unknown or passivated, it already has a
                different outcome, or a job succeeds with unfinished tasks.
        """
        ready: list[TaskRef] = []
        unreachable: list[TaskRef] = []
        if isinstance(node, TaskRef):
            if metrics and node.job in self._jobs:
                self._jobs[node.job].metrics[node.index] = dict(metrics)
            self._record_task(node, outcome, ready, unreachable)
        else:
            job = self._job(node)
            if job.outcome is not None:
                if job.outcome is outcome:
                    return GraphUpdate()
                raise DependencyError(
                    f"job {node!r} already {job.outcome.value}; cannot record {outcome.value}"
                )
            unfinished = [i for i, o in enumerate(job.outcomes) if o is None]
            if unfinished and outcome in (Outcome.SUCCEEDED, Outcome.SKIPPED):
                raise DependencyError(
                    f"job {node!r} cannot succeed with unfinished tasks "
                    f"{', '.join(f'{node}[{i}]' for i in unfinished[:5])}"
                )
            for index in unfinished:
                self._record_task(TaskRef(node, index), Outcome.CANCELLED, ready, unreachable)
            job.outcome = outcome
            if metrics:
                job.metrics[-1] = dict(metrics)
            for child, data in self._explicit_successors(_end(node)):
                self._decide(_end(node), child, data, outcome, ready, unreachable)
        return self._update(ready, unreachable)

    def record_progress(self, job_id: str, fraction: float) -> GraphUpdate:
        """Record a job's progress (0..1) and release dependants whose threshold it reaches.

        Raises:
            DependencyError: the job is unknown or passivated, or ``fraction`` is outside 0..1.
        """
        job = self._job(job_id)
        if not 0.0 <= fraction <= 1.0:
            raise DependencyError(f"progress of {job_id!r} must be within 0..1, got {fraction}")
        job.progress = max(job.progress, fraction)
        ready: list[TaskRef] = []
        if job.outcome is None:
            for child, data in self._explicit_successors(_end(job_id)):
                threshold = data["dependency"].threshold
                if threshold is not None and not data["done"] and job.progress >= threshold:
                    data["done"] = True
                    self._satisfy(child, ready)
        return self._update(ready, [])

    def reopen(self, job: GraphJob, outcomes: Sequence[Outcome | None]) -> GraphUpdate:
        """Bring a passivated job back to life (``taskfarm retry``): its tasks without an
        outcome in ``outcomes`` run again, and live dependants that were blocked on it
        (``on_parent_failure = "wait"``) wait on it again instead.

        Raises:
            DependencyError: the job is not passivated, or the outcomes do not match its tasks.
        """
        job_id = job.job_id
        if job_id not in self._passivated:
            state = "live" if job_id in self._jobs else "unknown"
            raise DependencyError(f"cannot reopen job {job_id!r}: it is {state}", job=job_id)
        if len(outcomes) != len(job.elements):
            raise DependencyError(
                f"job {job_id!r} has {len(job.elements)} tasks, got {len(outcomes)} outcomes",
                job=job_id,
            )
        del self._passivated[job_id]
        update = self.add_jobs([job])
        ready: list[TaskRef] = list(update.newly_ready)
        unreachable: list[TaskRef] = list(update.newly_unreachable)
        for index, outcome in enumerate(outcomes):
            if outcome is not None:
                self._record_task(TaskRef(job_id, index), outcome, ready, unreachable)
        for child_id, child in sorted(self._jobs.items()):
            if child_id != job_id:
                self._relink(job_id, child_id, child)
        return self._update(ready, unreachable)

    def _relink(self, parent_id: str, child_id: str, child: _Job) -> None:
        """Turn the child's edges that were blocked on a reopened parent back into pending."""
        parent_job = self._jobs[parent_id]
        for position, dependency in enumerate(child.declared.dependencies):
            if dependency.parent != parent_id:
                continue
            for edge in self._expand(child.declared, position, dependency, {}):
                key = (edge.parent, edge.child)
                if key not in child.blocked:
                    continue
                parent = edge.parent
                outcome = (
                    parent_job.outcomes[parent[2]] if parent[0] == _TASK else parent_job.outcome
                )
                if outcome is not None:
                    continue  # that part of the parent keeps its outcome
                blocker = child.blocked.pop(key)
                for node in (edge.parent, edge.child):
                    if node[0] == _TASK:
                        owner = self._jobs[node[1]]
                        if node[2] not in owner.linked:
                            owner.linked.add(node[2])
                            self._g.add_edge(_start(node[1]), node, explicit=False)
                            self._g.add_edge(node, _end(node[1]), explicit=False)
                self._g.add_edge(
                    edge.parent, edge.child, explicit=True, dependency=dependency, done=False
                )
                self._unblock(child, edge.child, blocker)

    def _unblock(self, job: _Job, child: _Node, removed: Blocker) -> None:
        """Drop a blocker; another blocked edge of the same child keeps it blocked."""
        others = [b for (_, c), b in sorted(job.blocked.items()) if c == child]
        if child[0] == _START:
            if job.gate_blocker is removed:
                job.gate_blocker = others[0] if others else None
        else:
            index: int = child[2]
            if job.task_blockers.get(index) is removed:
                if others:
                    job.task_blockers[index] = others[0]
                else:
                    del job.task_blockers[index]

    def remove_job(self, job_id: str) -> None:
        """Passivate a finished job: drop its nodes and edges, keep its outcomes (and element
        ranges) so that dependants submitted later still see them.

        Raises:
            DependencyError: the job is unknown, already passivated, or has no outcome.
        """
        job = self._job(job_id)
        if job.outcome is None:
            raise DependencyError(f"cannot passivate job {job_id!r}: it has no outcome yet")
        nodes = [_start(job_id), _end(job_id), *(_task(job_id, i) for i in job.linked)]
        self._g.remove_nodes_from(nodes)
        outcomes = tuple(o if o is not None else job.outcome for o in job.outcomes)
        self._passivated[job_id] = _Passivated(job.outcome, job.elements, outcomes, job.metrics)
        del self._jobs[job_id]

    def add_passivated(
        self,
        job: GraphJob,
        outcome: Outcome,
        task_outcomes: Sequence[Outcome | None],
        *,
        metrics: Mapping[int, Mapping[str, float]] | None = None,
    ) -> None:
        """Record a job that finished before a restart, as ``remove_job`` leaves one.

        ``metrics`` are the metrics its tasks reported (by index; -1 for the job's), which
        conditional edges added later decide on.

        The same result as ``add_jobs``, ``record_outcome`` for it and its tasks, then
        ``remove_job``, without building its nodes: recovery adds many finished jobs at once.

        Raises:
            DependencyError: the job is already known, or the outcomes do not match its tasks.
        """
        if job.job_id in self:
            raise DependencyError(f"job {job.job_id!r} is already known", job=job.job_id)
        if len(task_outcomes) != len(job.elements):
            raise DependencyError(
                f"job {job.job_id!r} has {len(job.elements)} tasks, "
                f"got {len(task_outcomes)} outcomes",
                job=job.job_id,
            )
        unset = outcome if outcome in (Outcome.SUCCEEDED, Outcome.SKIPPED) else Outcome.CANCELLED
        outcomes = tuple(o if o is not None else unset for o in task_outcomes)
        kept = {i: dict(m) for i, m in (metrics or {}).items() if m}
        self._passivated[job.job_id] = _Passivated(outcome, job.elements, outcomes, kept)

    # --- internals ----------------------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            state = "passivated" if job_id in self._passivated else "unknown"
            raise DependencyError(f"job {job_id!r} is {state}") from None

    def _update(self, ready: Iterable[TaskRef], unreachable: Iterable[TaskRef]) -> GraphUpdate:
        # A task may be released, then finished, within one update (a cancelled job's tasks):
        # report only what still holds.
        skipped: dict[TaskRef, str] = {}
        for task, reason in self._skipped:
            if self._jobs[task.job].outcomes[task.index] is None:
                skipped.setdefault(task, reason)
        self._skipped.clear()
        order = sorted(skipped)
        return GraphUpdate(
            newly_ready=tuple(sorted({t for t in ready if t in self._ready})),
            newly_unreachable=tuple(
                sorted(
                    {
                        t
                        for t in unreachable
                        if self._jobs[t.job].outcomes[t.index] is None and t not in skipped
                    }
                )
            ),
            newly_skipped=tuple(order),
            skip_reasons=tuple(skipped[t] for t in order),
        )

    @staticmethod
    def _check_index(job_id: str, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise DependencyError(f"job {job_id!r} has no task {index} (it has {count})")

    def _record_task(
        self, task: TaskRef, outcome: Outcome, ready: list[TaskRef], unreachable: list[TaskRef]
    ) -> None:
        job = self._job(task.job)
        self._check_index(task.job, task.index, len(job.elements))
        previous = job.outcomes[task.index]
        if previous is not None:
            if previous is outcome:
                return
            raise DependencyError(
                f"task {task} already {previous.value}; cannot record {outcome.value}"
            )
        job.outcomes[task.index] = outcome
        self._ready.discard(task)
        if task.index in job.linked:
            node = _task(task.job, task.index)
            for child, data in self._explicit_successors(node):
                self._decide(node, child, data, outcome, ready, unreachable)

    def _explicit_successors(self, node: _Node) -> list[tuple[_Node, dict[str, Any]]]:
        if not self._g.has_node(node):
            return []
        return sorted(
            ((child, data) for child, data in self._g.succ[node].items() if data["explicit"]),
            key=lambda item: item[0],
        )

    def _decide(
        self,
        parent: _Node,
        child: _Node,
        data: dict[str, Any],
        outcome: Outcome,
        ready: list[TaskRef],
        unreachable: list[TaskRef],
    ) -> None:
        if data["done"]:
            return
        data["done"] = True
        dependency: Dependency = data["dependency"]
        verdict, why = self._verdict(parent, dependency, outcome)
        if verdict == "satisfy":
            self._satisfy(child, ready)
        elif verdict == "skip":
            self._skip(child, why)
        else:
            unreachable.extend(self._block(parent, child, dependency, outcome))

    def _verdict(
        self, parent: _Node, dependency: Dependency, outcome: Outcome
    ) -> tuple[Literal["satisfy", "skip", "block"], str]:
        """Decide an edge whose parent has ``outcome``: satisfied, skipped (a branch not
        taken, or a skipped parent), or blocked (unreachable)."""
        if outcome is Outcome.SKIPPED:
            if dependency.condition is Condition.ON_ANY_OUTCOME:
                return "satisfy", ""
            return "skip", f"skipped: {_label(parent)} was skipped"
        if dependency.when is not None and outcome is Outcome.SUCCEEDED:
            met, why = MetricCondition.parse(dependency.when).decide(self._metrics_of(parent))
            return ("satisfy", "") if met else ("skip", f"skipped: {_label(parent)}: {why}")
        if dependency.condition.satisfied_by(outcome):
            return "satisfy", ""
        return "block", ""

    def _metrics_of(self, node: _Node) -> Mapping[str, float] | None:
        index = node[2] if node[0] == _TASK else -1
        live = self._jobs.get(node[1])
        if live is not None:
            return live.metrics.get(index)
        dead = self._passivated.get(node[1])
        return dead.metrics.get(index) if dead is not None else None

    def _skip(self, child: _Node, reason: str) -> None:
        """A conditional branch is not taken: the child's tasks without an outcome are
        skipped (they stay counted, never ready, until their skip is recorded)."""
        job_id = child[1]
        job = self._jobs[job_id]
        blocker = Blocker(waits_on=job_id, condition=Condition.ON_SUCCESS, reason=reason, skip=True)
        if child[0] == _START:
            if job.gate_blocker is None:
                job.gate_blocker = blocker
            indices: Iterable[int] = range(len(job.elements))
        else:
            index: int = child[2]
            job.task_blockers.setdefault(index, blocker)
            indices = (index,)
        for i in indices:
            if job.outcomes[i] is None:
                self._ready.discard(TaskRef(job_id, i))
                self._skipped.append((TaskRef(job_id, i), reason))

    def _satisfy(self, child: _Node, ready: list[TaskRef]) -> None:
        job = self._jobs[child[1]]
        if child[0] == _START:
            job.gate -= 1
            if job.gate == 0 and job.gate_blocker is None:
                ready.extend(self._release(child[1], job, range(len(job.elements))))
        else:
            index: int = child[2]
            job.pending[index] -= 1
            if job.gate == 0 and job.gate_blocker is None:
                ready.extend(self._release(child[1], job, (index,)))

    def _release(self, job_id: str, job: _Job, indices: Iterable[int]) -> list[TaskRef]:
        released = []
        for index in indices:
            if (
                job.pending[index] == 0
                and job.outcomes[index] is None
                and index not in job.task_blockers
            ):
                task = TaskRef(job_id, index)
                self._ready.add(task)
                released.append(task)
        return released

    def _block(
        self, parent: _Node, child: _Node, dependency: Dependency, outcome: Outcome
    ) -> list[TaskRef]:
        job_id = child[1]
        job = self._jobs[job_id]
        blocker = Blocker(
            waits_on=_label(parent),
            condition=dependency.condition,
            threshold=dependency.threshold,
            unreachable=True,
            reason=(
                f"{_label(child)} waits on {_label(parent)} ({dependency.condition.value}), "
                f"but {_label(parent)} {outcome.value}"
            ),
            on_parent_failure=dependency.on_parent_failure,
        )
        job.blocked[(parent, child)] = blocker
        if child[0] == _START:
            if job.gate_blocker is not None:
                return []
            job.gate_blocker = blocker
            indices: Iterable[int] = range(len(job.elements))
        else:
            index: int = child[2]
            if index in job.task_blockers:
                return []
            job.task_blockers[index] = blocker
            indices = (index,) if job.gate_blocker is None else ()
        return [TaskRef(job_id, i) for i in indices if job.outcomes[i] is None]

    def _pending_blockers(self, node: _Node) -> list[Blocker]:
        if not self._g.has_node(node):
            return []
        found = []
        for parent, data in sorted(self._g.pred[node].items(), key=lambda item: item[0]):
            if not data["explicit"] or data["done"]:
                continue
            dependency: Dependency = data["dependency"]
            name = _label(parent)
            if dependency.threshold is not None:
                progress = self._jobs[parent[1]].progress
                reason = (
                    f"waits on {name} to reach {dependency.threshold:.0%} progress "
                    f"(now {progress:.0%}) or to finish ({dependency.condition.value})"
                )
            else:
                reason = f"waits on {name} to finish ({dependency.condition.value})"
            found.append(
                Blocker(
                    waits_on=name,
                    condition=dependency.condition,
                    threshold=dependency.threshold,
                    reason=reason,
                )
            )
        return found

    def _unreachable(self, node: _Node, seen: set[_Node]) -> str | None:
        if node in seen:
            return None
        seen.add(node)
        job_id = node[1]
        job = self._jobs.get(job_id)
        if job is None or job.outcome is not None:
            return None
        if job.gate_blocker is not None:
            return job.gate_blocker.reason
        if node[0] == _TASK:
            index: int = node[2]
            if job.outcomes[index] is not None:
                return None
            if index in job.task_blockers:
                return job.task_blockers[index].reason
            candidates = [_start(job_id), node]
        elif node[0] == _END:
            if job.task_blockers:
                return min(job.task_blockers.items())[1].reason
            candidates = [_start(job_id), *(_task(job_id, i) for i in sorted(job.linked))]
        else:
            candidates = [node]
        for waiting in candidates:
            if waiting != node and waiting[0] == _TASK:
                reason = self._unreachable(waiting, seen)
                if reason is not None:
                    return reason
                continue
            if not self._g.has_node(waiting):
                continue
            for parent, data in sorted(self._g.pred[waiting].items(), key=lambda item: item[0]):
                if not data["explicit"] or data["done"]:
                    continue
                reason = self._unreachable(parent, seen)
                if reason is not None:
                    return (
                        f"{_label(waiting)} waits on {_label(parent)}, "
                        f"which can never finish: {reason}"
                    )
        return None

    def _add_edge(self, edge: _Edge) -> list[TaskRef]:
        """Add a planned edge; decide it at once when the parent already has an outcome."""
        parent, child, dependency = edge
        parent_job = parent[1]
        dead = self._passivated.get(parent_job)
        if dead is not None:
            outcome: Outcome | None = (
                dead.task_outcomes[parent[2]] if parent[0] == _TASK else dead.outcome
            )
        else:
            live = self._jobs[parent_job]
            outcome = live.outcomes[parent[2]] if parent[0] == _TASK else live.outcome
            if (
                outcome is None
                and dependency.threshold is not None
                and live.progress >= dependency.threshold
            ):
                return []  # already past the threshold: satisfied
        child_job = self._jobs[child[1]]
        if outcome is not None:
            verdict, why = self._verdict(parent, dependency, outcome)
            if verdict == "satisfy":
                return []
            # Counted like an edge decided later, so that reopening the parent can turn it
            # back into a pending edge without recounting.
            if child[0] == _START:
                child_job.gate += 1
            else:
                child_job.pending[child[2]] += 1
            if verdict == "skip":
                self._skip(child, why)
                return []
            return self._block(parent, child, dependency, outcome)
        for node in (parent, child):
            if node[0] == _TASK:
                job_id, index = node[1], node[2]
                if index not in self._jobs[job_id].linked:
                    self._jobs[job_id].linked.add(index)
                    self._g.add_edge(_start(job_id), node, explicit=False)
                    self._g.add_edge(node, _end(job_id), explicit=False)
        self._g.add_edge(parent, child, explicit=True, dependency=dependency, done=False)
        if child[0] == _START:
            child_job.gate += 1
        else:
            child_job.pending[child[2]] += 1
        return []

    def _parent_elements(
        self, parent: str, batch: Mapping[str, GraphJob]
    ) -> tuple[tuple[int, int], ...] | None:
        if parent in batch:
            return batch[parent].elements
        if parent in self._jobs:
            return self._jobs[parent].elements
        if parent in self._passivated:
            return self._passivated[parent].elements
        return None

    def _expand(
        self, job: GraphJob, position: int, dependency: Dependency, batch: Mapping[str, GraphJob]
    ) -> list[_Edge]:
        """Turn one declared dependency into edges, validating it."""
        child_id, parent_id = job.job_id, dependency.parent
        where = f"{child_id}: dependency {position} on {parent_id!r}"
        parent_elements = self._parent_elements(parent_id, batch)
        if parent_elements is None:
            raise UnknownDependencyError(
                f"{child_id} depends on unknown job {parent_id!r}",
                dependant=child_id,
                dependency=parent_id,
                position=position,
            )
        d = dependency
        if d.threshold is not None:
            if not 0.0 < d.threshold <= 1.0:
                raise DependencyError(
                    f"{where}: threshold must be in (0, 1], got {d.threshold}",
                    job=child_id,
                    position=position,
                )
            if d.parent_task is not None or d.child_task is not None or d.elementwise:
                raise DependencyError(
                    f"{where}: a progress threshold is for job-level edges",
                    job=child_id,
                    position=position,
                )
            if d.condition is Condition.ON_FAILURE:
                raise DependencyError(
                    f"{where}: a progress threshold cannot be on_failure",
                    job=child_id,
                    position=position,
                )
        if d.when is not None:
            try:
                MetricCondition.parse(d.when)
            except ValueError as error:
                raise DependencyError(
                    f"{where}: when: {error}", job=child_id, position=position
                ) from None
            if d.condition is not Condition.ON_SUCCESS or d.threshold is not None:
                raise DependencyError(
                    f"{where}: a 'when' condition needs condition on_success and no threshold",
                    job=child_id,
                    position=position,
                )
        if d.elementwise is not None and (d.parent_task is not None or d.child_task is not None):
            raise DependencyError(
                f"{where}: an element-wise dependency names no tasks",
                job=child_id,
                position=position,
            )
        if d.parent_task is not None and not 0 <= d.parent_task < len(parent_elements):
            name = f"{parent_id}[{d.parent_task}]"
            raise UnknownDependencyError(
                f"{child_id} depends on unknown task {name} ({parent_id!r} has "
                f"{len(parent_elements)} tasks)",
                dependant=child_id,
                dependency=name,
                position=position,
            )
        if d.child_task is not None and not 0 <= d.child_task < len(job.elements):
            raise DependencyError(
                f"{where}: child_task {d.child_task} is out of range ({child_id!r} has "
                f"{len(job.elements)} tasks)",
                job=child_id,
                position=position,
            )
        parent_whole = _end(parent_id)
        if d.elementwise is not None:
            index = _ElementIndex(parent_elements)
            edges: list[_Edge] = []
            for i, (start, end) in enumerate(job.elements):
                lo, hi = d.elementwise.window(start, end)
                parents = index.overlapping(lo, hi)
                if not parents:
                    raise DependencyError(
                        f"{where}: {child_id}[{i}] (elements {start}-{end}) needs elements "
                        f"{lo}-{hi} of {parent_id!r}, which no task of it covers",
                        job=child_id,
                        position=position,
                    )
                edges.extend(_Edge(_task(parent_id, p), _task(child_id, i), d) for p in parents)
            return edges
        parent = parent_whole if d.parent_task is None else _task(parent_id, d.parent_task)
        child = _start(child_id) if d.child_task is None else _task(child_id, d.child_task)
        return [_Edge(parent, child, d)]

    def _plan(self, batch: tuple[GraphJob, ...]) -> list[_Edge]:
        by_id: dict[str, GraphJob] = {}
        for job in batch:
            if job.job_id in self or job.job_id in by_id:
                raise DependencyError(f"job {job.job_id!r} already exists", job=job.job_id)
            if not job.elements:
                raise DependencyError(f"job {job.job_id!r} has no tasks", job=job.job_id)
            for i, (start, end) in enumerate(job.elements):
                if start > end:
                    raise DependencyError(f"{job.job_id}[{i}]: empty element range {start}-{end}")
            by_id[job.job_id] = job
        edges: list[_Edge] = []
        for job in batch:
            seen: set[tuple[_Node, _Node]] = set()
            for position, dependency in enumerate(job.dependencies):
                for edge in self._expand(job, position, dependency, by_id):
                    pair = (edge.parent, edge.child)
                    if pair in seen:
                        raise DependencyError(
                            f"{job.job_id}: duplicate dependency of {_label(edge.child)} "
                            f"on {_label(edge.parent)}",
                            job=job.job_id,
                            position=position,
                        )
                    seen.add(pair)
                    edges.append(edge)
        # Existing jobs never wait on new ones, so a new cycle lies within the submission.
        local: Any = nx.DiGraph()
        for job in batch:
            local.add_edge(_start(job.job_id), _end(job.job_id), explicit=False)
        for edge in edges:
            if edge.parent[1] not in by_id:
                continue
            for node in (edge.parent, edge.child):
                if node[0] == _TASK:
                    local.add_edge(_start(node[1]), node, explicit=False)
                    local.add_edge(node, _end(node[1]), explicit=False)
            local.add_edge(edge.parent, edge.child, explicit=True)
        # A linear-time check first: find_cycle walks from every node, which costs seconds on
        # a chain of a thousand stages; it only runs to name the cycle in the error.
        if nx.is_directed_acyclic_graph(local):
            return edges
        try:
            found = nx.find_cycle(local)
        except nx.NetworkXNoCycle:
            return edges
        raise DependencyCycleError(_cycle_labels([(u, v, local.edges[u, v]) for u, v in found]))


def _cycle_labels(edges: Sequence[tuple[_Node, _Node, Mapping[str, Any]]]) -> tuple[str, ...]:
    """Turn a cycle of flow edges (parent -> child) into a path of names, each waiting on the
    next, starting and ending at the smallest name."""
    names: list[str] = []
    for parent, child, data in reversed(edges):
        if data.get("explicit"):
            for name in (_label(child), _label(parent)):
                if not names or names[-1] != name:
                    names.append(name)
    if len(names) > 1 and names[0] == names[-1]:
        names.pop()
    first = names.index(min(names))
    ring = names[first:] + names[:first]
    return (*ring, ring[0])


def _canonical_metrics(
    metrics: Mapping[int, Mapping[str, float]],
) -> tuple[tuple[int, tuple[tuple[str, float], ...]], ...]:
    return tuple(sorted((i, tuple(sorted(m.items()))) for i, m in metrics.items()))
