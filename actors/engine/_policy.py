"""The scheduling policy: the hooks a domain implements, and the default FIFO-within-priority.

The engine owns the mechanics (queues, the placement index, dispatch, retries); a ``Policy``
owns the judgement.  Every hook is a pure function of the views it is given and ``now`` (the
injected clock), so it is deterministic under a virtual clock and recomputed from scratch every
cycle: nothing ratchets.  The two domains express their rules through these hooks:

- ``rank`` -- effective priority (deadline-driven boosts, fair-share aging, inheritance);
- ``admit`` -- a reason to hold a runnable task back (client at its maximum share, deferred to
  off-peak hours, backfill that would delay a reservation, node draining before maintenance);
- ``node_score`` -- where to put it (specialization, fit, learned history, packing for sleep);
- ``preemptions`` -- whom to checkpoint-and-yield for a waiting task;
- node health (drain before maintenance, sleep to save energy) is set from outside the policy
  through ``Engine.set_node_health``: a draining or sleeping node gets no new work, and its
  running attempts finish (or are preempted) as the domain decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from ._resources import Resources, add, fits
from ._spec import Priority, SubmitJob

__all__ = [
    "FarmView",
    "FifoPolicy",
    "JobView",
    "NodeView",
    "Policy",
    "Preemption",
    "PriorityPreemptionPolicy",
    "RunningView",
    "TaskView",
]


@dataclass(frozen=True, slots=True)
class JobView:
    """What a policy sees of a job."""

    job_id: str
    spec: SubmitJob
    submitted_at: datetime
    running: int
    queued: int
    completed: int
    total: int

    @property
    def priority_rank(self) -> int:
        """Return the base priority's rank (higher is more urgent)."""
        return self.spec.priority.rank


@dataclass(frozen=True, slots=True)
class TaskView:
    """What a policy sees of a runnable task."""

    job_id: str
    index: int
    request: Resources
    attempt: int
    failures: int
    last_node: str | None


@dataclass(frozen=True, slots=True)
class NodeView:
    """What a policy sees of a node."""

    name: str
    capacity: Resources
    free: Resources
    labels: tuple[str, ...]
    running: int
    health: str


@dataclass(frozen=True, slots=True)
class RunningView:
    """An attempt running on a node, as preemption sees it."""

    job_id: str
    task: int
    request: Resources
    priority: Priority
    preemptible: bool


@dataclass(frozen=True, slots=True)
class FarmView:
    """The whole farm, for decisions that need it (shares, preemption)."""

    nodes: Mapping[str, NodeView]
    jobs: Mapping[str, JobView]
    # job_id -> nodes its attempts run on (one entry per attempt)
    placements: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # node -> the attempts running there
    running: Mapping[str, Sequence[RunningView]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Preemption:
    """Checkpoint-and-yield ``victim_task`` of ``victim_job`` so that a waiting task can run."""

    victim_job: str
    victim_task: int
    node: str
    reason: str


class Policy(Protocol):
    """The judgement the scheduler delegates; see the module docstring."""

    #: How many fitting nodes placement scores per task (bounds decision latency).
    max_candidates: int
    #: Seconds between placement cycles when nothing else triggers one (time-based rules).
    cycle_interval: float

    def rank(self, job: JobView, now: datetime) -> tuple[object, ...]:
        """Return the job's sort key for this cycle (smaller runs first); say why in ``why``."""
        ...

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        """Return a reason to hold ``task`` back this cycle, or None to place it."""
        ...

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        """Score a node that fits the task (higher is better); None forbids it."""
        ...

    def preemptions(
        self, job: JobView, task: TaskView, farm: FarmView, now: datetime
    ) -> Sequence[Preemption]:
        """Return the attempts to preempt so ``task`` can run (empty: wait)."""
        ...

    def explain_rank(self, job: JobView, now: datetime) -> str:
        """Return one line that explains the job's rank (for ``taskfarm why``)."""
        ...


class FifoPolicy:
    """First in, first out within priority; best fit among fitting nodes; no preemption.

    Order: base priority (critical first, by rank, never by name), then submission time, then
    job id, so equal submissions are ordered deterministically.
    """

    max_candidates = 32
    cycle_interval = 60.0

    def rank(self, job: JobView, now: datetime) -> tuple[object, ...]:
        return (-job.priority_rank, job.submitted_at, job.job_id)

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        return None

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        # Best fit: the node this task leaves least free wins, keeping big nodes free for big
        # work (the share of cores, memory and GPUs left over, GPUs weighted most).  A retry
        # prefers a node other than the one it failed on.
        request, free, capacity = task.request, node.free, node.capacity
        left = (free.millicores - request.millicores) / (capacity.millicores or 1)
        left += (free.memory - request.memory) / (capacity.memory or 1)
        if capacity.gpus:
            left += 4 * (free.gpus - request.gpus) / capacity.gpus
        score = -left
        if task.last_node == node.name and task.failures:
            score -= 10.0
        return score

    def preemptions(
        self, job: JobView, task: TaskView, farm: FarmView, now: datetime
    ) -> Sequence[Preemption]:
        return ()

    def explain_rank(self, job: JobView, now: datetime) -> str:
        return (
            f"priority {job.spec.priority.value} (FIFO within priority, submitted "
            f"{job.submitted_at.isoformat()})"
        )


class PriorityPreemptionPolicy(FifoPolicy):
    """FIFO within priority, and a critical task that fits nowhere preempts lower work.

    Only onto a node whose capacity fits the waiting task, only preemptible attempts of
    lower priority, lowest priority first, and on the node that needs the fewest victims (then
    by name, so the choice is deterministic).  Victims checkpoint and yield: they return to the
    queue and resume from their checkpoint.
    """

    def preemptions(
        self, job: JobView, task: TaskView, farm: FarmView, now: datetime
    ) -> Sequence[Preemption]:
        if job.spec.priority is not Priority.CRITICAL:
            return ()
        best: tuple[int, str, list[RunningView]] | None = None
        for name in sorted(farm.nodes):
            node = farm.nodes[name]
            if node.health != "online" or not fits(task.request, node.capacity):
                continue
            candidates = sorted(
                (
                    r
                    for r in farm.running.get(name, ())
                    if r.preemptible and r.priority.rank < Priority.CRITICAL.rank
                ),
                key=lambda r: (r.priority.rank, r.job_id, r.task),
            )
            free, victims = node.free, []
            for running in candidates:
                if fits(task.request, free):
                    break
                free = add(free, running.request, capacity=node.capacity)
                victims.append(running)
            if victims and fits(task.request, free) and (best is None or len(victims) < best[0]):
                best = (len(victims), name, victims)
        if best is None:
            return ()
        _, name, victims = best
        reason = f"critical job {job.job_id} task {task.index} needs node {name}"
        return [
            Preemption(victim_job=v.job_id, victim_task=v.task, node=name, reason=reason)
            for v in victims
        ]
