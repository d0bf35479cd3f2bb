"""The scheduling policy: the hooks a domain implements, the views it sees, and the defaults.

The engine owns the mechanics (queues, the placement index, dispatch, retries, the journal); a
``Policy`` owns the judgement.  Every hook is a pure function of the views it is given and
``now`` (the injected clock), recomputed from scratch each cycle, so nothing ratchets and
``taskfarm why`` can always explain.  The two domains express their rules through these hooks:

- ``validate`` / ``prepare`` -- refuse or reshape a submission (API and CLI alike);
- ``rank`` -- effective priority (deadline boosts, fair-share aging, inheritance);
- ``admit_job`` -- hold a whole job (client at its maximum, off-peak deferral) at one call per
  job per cycle, until a time or until the next cycle;
- ``admit`` -- hold one task back (backfill that would delay a reservation);
- ``node_score`` -- where to put it (specialization, fit, learned speed, packing for sleep);
- ``preemptions`` -- whom to checkpoint-and-yield for a waiting task; ``yields`` -- whom to
  checkpoint-and-yield now for the policy's own reasons (a window or a reservation starting);
- ``checkpoint_interval`` -- how often a running stage must checkpoint (passed to it as
  ``TASKFARM_CHECKPOINT_INTERVAL``; the engine asks for one when an interval passes without);
- ``on_failure`` -- retry (when, where, with what), fail, or hold for an operator;
- ``observe`` -- facts in journal order (submissions, task start and end, progress, previews,
  node changes), for learned state; ``recover`` rebuilds that state from the journal after a
  restart;
- ``next_wakeup`` -- ask for a cycle at a time (a tariff boundary, a window start);
- ``cycle_events`` -- facts the policy decided by itself (a priority transition), journaled in
  its stream after the cycle and folded back in with ``apply``;
- ``node_actions`` -- sleep idle nodes, wake them, drain them before maintenance;
- ``command`` / ``apply`` -- domain commands (reservations, configuration reloads): pure
  decisions whose events are journaled in the policy's own stream and folded back in; a
  command is told who asked (``by``), so what it journals says who made it;
- ``describe`` / ``explain_rank`` -- domain columns for ``status`` and ``why``.

The views are the scheduler's own records, kept current incrementally (a cycle costs what
changed plus what it places, not the size of the farm): a policy reads them and never writes.
They are plain classes, so a policy's rules are tested with tables of hand-built views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from persistence import Event, EventCodec
from runtime import ConfigurationError

from ._resources import Resources, add, fits
from ._spec import Priority, SubmitJob

__all__ = [
    "CommandResult",
    "Failure",
    "FailureClass",
    "FarmView",
    "FifoPolicy",
    "Hold",
    "JobSubmittedObservation",
    "JobView",
    "NodeAction",
    "NodeChanged",
    "NodeView",
    "Observation",
    "Policy",
    "Preemption",
    "PriorityPreemptionPolicy",
    "RetryDecision",
    "RunningView",
    "RuntimeStats",
    "TaskEndedObservation",
    "TaskPreviewObservation",
    "TaskProgressObservation",
    "TaskStartedObservation",
    "TaskView",
    "default_retry",
    "parse_labels",
]


# -- views ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class RuntimeStats:
    """Runtimes of a job's finished tasks, in seconds."""

    count: int = 0
    total: float = 0.0
    minimum: float = 0.0
    maximum: float = 0.0

    @property
    def mean(self) -> float:
        """Return the mean runtime (0 when nothing finished)."""
        return self.total / self.count if self.count else 0.0

    def add(self, seconds: float) -> None:
        """Count one more finished task."""
        self.minimum = seconds if not self.count else min(self.minimum, seconds)
        self.maximum = max(self.maximum, seconds)
        self.count += 1
        self.total += seconds


@dataclass(slots=True, eq=False)
class JobView:
    """What a policy sees of a live job (kept current by the scheduler; read, never write).

    ``queued`` tasks are runnable now, ``blocked`` ones wait on a dependency or are held;
    ``progress`` counts completed tasks and the reported progress of running ones.  ``spec``
    reflects amendments (``taskfarm amend``); ``metadata`` is the spec's metadata decoded once
    into the policy's ``metadata_type`` (None without one).
    """

    job_id: str
    spec: SubmitJob
    submitted_at: datetime
    total: int
    running: int = 0
    queued: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0  # conditional branches not taken (done: they need no work)
    progress: float = 0.0
    runtime: RuntimeStats = field(default_factory=RuntimeStats)
    preemptions: int = 0
    metadata: Any = None
    parents: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    status: Literal["active", "paused", "cancelling"] = "active"

    @property
    def priority(self) -> Priority:
        """Return the base priority (as submitted or amended; never a domain's boost)."""
        return self.spec.priority

    @property
    def priority_rank(self) -> int:
        """Return the base priority's rank (higher is more urgent)."""
        return self.spec.priority.rank

    @property
    def remaining(self) -> int:
        """Return how many tasks are not finished."""
        return self.total - self.completed - self.failed - self.cancelled - self.skipped

    @property
    def blocked(self) -> int:
        """Return how many unfinished tasks can neither run nor be placed now (a dependency,
        a hold, a retry backoff counts as queued)."""
        return self.remaining - self.running - self.queued


@dataclass(slots=True, eq=False)
class TaskView:
    """What a policy sees of a task of a live job."""

    job_id: str
    index: int
    request: Resources
    name: str = ""
    frames: tuple[int, int] | None = None
    requires: tuple[str, ...] = ()
    attempt: int = 0
    failures: int = 0
    lost: int = 0
    last_node: str | None = None
    last_outcome: str | None = None
    progress: float = 0.0
    checkpoint_at: datetime | None = None
    # The size in bytes of its latest checkpoint, from the manifest its executor verified
    # (0: none yet, or reported without a manifest): what a policy can cost a checkpoint by.
    checkpoint_bytes: int = 0
    preemptions: int = 0
    not_before: datetime | None = None
    avoid: tuple[str, ...] = ()
    nodes: int = 1  # a multi-node (gang) task runs on this many nodes at once

    @property
    def has_checkpoint(self) -> bool:
        """Return whether a later attempt can resume from a checkpoint."""
        return self.checkpoint_at is not None

    @property
    def frame_count(self) -> int:
        """Return how many frames the task covers (1 without frames)."""
        return self.frames[1] - self.frames[0] + 1 if self.frames else 1


@dataclass(slots=True, eq=False)
class NodeView:
    """What a policy sees of a node.

    ``health`` is the operator's (or a policy's) decision -- ``online``, ``draining``,
    ``sleeping``, ``quarantined`` -- and ``reachable`` the connection's state -- ``connected``,
    ``unreachable`` (no heartbeat; its work may still run), ``offline``.  New work goes only to
    nodes that are online and connected.  ``label_map`` holds the ``key=value`` labels.
    """

    name: str
    capacity: Resources
    free: Resources
    labels: tuple[str, ...] = ()
    running: int = 0
    health: str = "online"
    reachable: str = "connected"
    failures: int = 0
    drain_at: datetime | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)
    health_reason: str = ""
    health_by: str = "engine"  # who set the health: operator, policy or engine

    def __post_init__(self) -> None:
        if not self.label_map and self.labels:
            self.label_map = parse_labels(self.labels)

    @property
    def accepts_work(self) -> bool:
        """Return whether new work may be placed here."""
        return self.health == "online" and self.reachable == "connected"

    def satisfies(self, requires: Sequence[str]) -> str | None:
        """Return the first requirement this node lacks (``gpu``, ``os=linux``), or None."""
        for requirement in requires:
            key, eq, value = requirement.partition("=")
            if eq:
                if self.label_map.get(key) != value:
                    return requirement
            elif requirement not in self.label_map and requirement not in self.labels:
                return requirement
        return None


@dataclass(slots=True, eq=False)
class RunningView:
    """An attempt running on a node (as preemption and the domains see it)."""

    job_id: str
    task: int
    request: Resources
    node: str = ""
    attempt: int = 1
    started_at: datetime | None = None
    progress: float = 0.0
    checkpoint_at: datetime | None = None
    preemptions: int = 0
    yielding: bool = False
    job: JobView | None = None
    checkpoint_interval: float | None = None  # seconds, as the policy set it at placement

    @property
    def priority(self) -> Priority:
        """Return its job's base priority."""
        return self.job.spec.priority if self.job is not None else Priority.MEDIUM

    @property
    def preemptible(self) -> bool:
        """Return whether it may be asked to yield (its job allows it, it is not yielding)."""
        return not self.yielding and self.job is not None and self.job.spec.preemptible


@dataclass(slots=True, eq=False)
class FarmView:
    """The whole farm, current within a cycle: every node, every live job, what runs where.

    ``running`` maps a node to its attempts, keyed ``(job_id, task)``; ``placements`` maps a
    job to ``{task: node}`` of its running attempts; ``counters`` holds the farm-wide licence
    counters' capacity and what is free.
    """

    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    jobs: Mapping[str, JobView] = field(default_factory=dict)
    running: Mapping[str, Mapping[tuple[str, int], RunningView]] = field(default_factory=dict)
    placements: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)
    counters_free: Mapping[str, int] = field(default_factory=dict)


def parse_labels(labels: Sequence[str]) -> dict[str, str]:
    """Return ``key=value`` labels as a map; a bare label maps to ``""``."""
    result: dict[str, str] = {}
    for label in labels:
        key, _, value = label.partition("=")
        result[key] = value
    return result


# -- decisions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a policy command decided: ``events`` to journal in the policy's stream (then
    folded in with ``Policy.apply``) and the ``reply`` for the caller (msgspec-encodable)."""

    reply: Any = None
    events: Sequence[Event] = ()


@dataclass(frozen=True, slots=True)
class Hold:
    """Hold a whole job back: ``until`` a time (None: until the next cycle asks again)."""

    reason: str
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class NodeAction:
    """A policy's change to a node's health: sleep an idle node, wake it, drain it before a
    maintenance window (``at`` plans the drain).  The operator's decisions win: a policy may
    change a node only while it is online or in a health the policy itself gave it."""

    node: str
    health: str
    reason: str
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Preemption:
    """Checkpoint-and-yield ``victim_task`` of ``victim_job`` so that a waiting task can run."""

    victim_job: str
    victim_task: int
    node: str
    reason: str


FailureClass = Literal["exit_code", "signal", "timeout", "stall", "lost", "oom", "start"]


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, classified: ``kind`` is what the engine detected.

    ``job_fault`` is True when the failure says nothing about the node (the command does not
    exist, or the job failed the same way on another node): it never counts against a node.
    """

    kind: FailureClass
    node: str | None
    attempt: int
    error: str | None = None
    exit_code: int | None = None
    job_fault: bool = False


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt.

    ``retry``: run again after ``delay`` seconds, avoiding ``avoid_node`` for this task, with
    ``resources`` instead of its request when given (e.g. more memory after an OOM).
    ``fail``: the task (and with it the job) fails with ``reason``.  ``hold``: the task waits
    for an operator (``taskfarm retry``), with ``reason``.
    """

    action: Literal["retry", "fail", "hold"]
    delay: float = 0.0
    reason: str = ""
    avoid_node: str | None = None
    resources: Resources | None = None


def default_retry(spec: SubmitJob, task: TaskView, failure: Failure) -> RetryDecision:
    """The engine's rule: retry with the job's backoff while attempts remain, else fail."""
    failures = task.failures + 1
    if failures >= spec.retries.max_attempts:
        return RetryDecision(
            action="fail",
            reason=f"failed after {failures} attempt(s): {failure.error or failure.kind}",
        )
    return RetryDecision(action="retry", delay=spec.retries.delay(failures + 1))


# -- observations -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskStartedObservation:
    """An attempt started on a node."""

    job_id: str
    task: int
    node: str
    attempt: int
    at: datetime


@dataclass(frozen=True, slots=True)
class TaskEndedObservation:
    """An attempt ended: ``outcome`` is completed, failed, timed_out, stalled, oom, lost,
    cancelled or preempted; ``metrics`` are the last value of each metric it reported."""

    job_id: str
    task: int
    node: str | None
    attempt: int
    outcome: str
    runtime_s: float
    at: datetime
    metrics: Mapping[str, float] = field(default_factory=dict)
    job_type: str = ""


@dataclass(frozen=True, slots=True)
class TaskProgressObservation:
    """A running attempt reported a progress milestone."""

    job_id: str
    task: int
    fraction: float
    at: datetime


@dataclass(frozen=True, slots=True)
class TaskPreviewObservation:
    """A running attempt produced a preview (a partial output to look at) at ``path``."""

    job_id: str
    task: int
    path: str
    at: datetime


@dataclass(frozen=True, slots=True)
class JobSubmittedObservation:
    """A job was accepted, as journaled (after ``prepare``): what a policy learning from the
    history needs to know of jobs that finished before it started (their type, their owner,
    the frames of each task)."""

    job_id: str
    spec: SubmitJob
    at: datetime


@dataclass(frozen=True, slots=True)
class NodeChanged:
    """A node joined, left, or changed health or reachability."""

    node: str
    health: str
    reachable: str
    capacity: Resources
    at: datetime


Observation = (
    JobSubmittedObservation
    | TaskStartedObservation
    | TaskEndedObservation
    | TaskProgressObservation
    | TaskPreviewObservation
    | NodeChanged
)


# -- the protocol -----------------------------------------------------------------------------


class Policy(Protocol):
    """The judgement the scheduler delegates; see the module docstring.

    Subclass :class:`FifoPolicy` to inherit a sensible default for every hook.
    """

    #: The name ``taskfarm serve --policy`` knows it by.
    name: str
    #: How many fitting nodes placement scores per task (bounds decision latency).
    max_candidates: int
    #: Seconds between placement cycles when nothing else triggers one.
    cycle_interval: float
    #: The msgspec Struct a job's metadata must decode into (None: free-form).
    metadata_type: type[Any] | None
    #: Whether ``recover`` gets the journal's history of facts when the engine opens.
    history: bool
    #: The role each command needs (``read``, ``submit``, ``operator``, ``admin``); a command
    #: not listed needs ``operator``.
    command_roles: Mapping[str, str]
    #: The codec of the events the policy journals (``cycle_events``, command results), merged
    #: into the coordinator's journal codec; None: it journals none.
    events: EventCodec | None

    def validate(self, spec: SubmitJob, now: datetime) -> None:
        """Refuse a job at submission by raising ``SpecError`` naming the field."""
        ...

    def prepare(self, spec: SubmitJob, now: datetime) -> SubmitJob:
        """Return the job as it will be journaled (e.g. preview tasks first)."""
        ...

    def validate_amendment(self, spec: SubmitJob, amended: SubmitJob, now: datetime) -> None:
        """Refuse an operator's amendment of a live job (``spec``: the job as it is;
        ``amended``: as it would be) by raising ``ConfigurationError`` naming the flag
        (``--set KEY``, ``--priority``) and the value."""
        ...

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[Any, ...]:
        """Return the job's sort key for this cycle (smaller runs first)."""
        ...

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        """Return a hold for the whole job, or None to consider its tasks."""
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

    def yields(self, farm: FarmView, now: datetime) -> Sequence[Preemption]:
        """Return running attempts to checkpoint-and-yield now, for no waiting task in
        particular (a maintenance window or a reservation starting; called every cycle)."""
        ...

    def checkpoint_interval(self, job: JobView, task: TaskView, now: datetime) -> float | None:
        """Return how often (seconds) the task, placed now, must checkpoint; None: never asked.

        Only for checkpointable jobs.  The attempt gets it as ``TASKFARM_CHECKPOINT_INTERVAL``,
        and the engine requests a checkpoint (SIGUSR1) when that long passes without one.
        """

    def gang_holds(
        self,
        job: JobView,
        task: TaskView,
        candidates: Sequence[str],
        farm: FarmView,
        now: datetime,
    ) -> Sequence[str]:
        """A multi-node task found too few free nodes: return the ones (of ``candidates``,
        which fit it now) to keep for it this cycle, so lower-ranked work does not take
        them.  Holds are recomputed every cycle."""
        ...

    def on_failure(
        self,
        job: JobView,
        task: TaskView,
        failure: Failure,
        default: RetryDecision,
        now: datetime,
    ) -> RetryDecision:
        """Decide what follows a failed attempt (``default`` is the engine's rule)."""
        ...

    def observe(self, observation: Observation) -> None:
        """Learn from a fact, in journal order (the hook may not raise into the engine)."""
        ...

    def recover(self, observations: Sequence[Observation]) -> None:
        """Rebuild learned state after a restart from the journal's history of facts."""
        ...

    def next_wakeup(self, now: datetime) -> datetime | None:
        """Return when the policy wants a cycle even if nothing happens (None: no need)."""
        ...

    def node_actions(self, farm: FarmView, now: datetime) -> Sequence[NodeAction]:
        """Return the node health changes the policy wants now (journaled, then applied)."""
        ...

    def cycle_events(self, farm: FarmView, now: datetime) -> Sequence[Event]:
        """Return the facts the policy decided on its own since the last call (an effective
        priority that changed, a deadline now at risk): journaled in its stream after each
        cycle, then folded in with ``apply`` (and replayed on restart like a command's)."""
        ...

    def describe(self, job: JobView, now: datetime) -> Mapping[str, str]:
        """Return domain columns for ``status``, ``status --json`` and ``why``."""
        ...

    def explain_rank(self, job: JobView, now: datetime) -> str:
        """Return one line that explains the job's rank (for ``taskfarm why``)."""
        ...

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any],
        farm: FarmView,
        now: datetime,
        *,
        by: str | None = None,
    ) -> CommandResult:
        """Run a domain command (``taskfarm render ...``, ``taskfarm science ...``): decide
        from the policy's state, the farm and ``now``; change nothing but return the events.

        ``by`` is who asked, for the record the events keep: the name of the client
        credential that sent the command over the wire, or what an embedding application
        passed to ``Engine.policy_command``; None is the application itself (or a client of
        the shared join token, which names no one).  Never take it from ``arguments``: those
        are the caller's words, ``by`` is what the coordinator authenticated.

        Raises ``ConfigurationError`` (naming the argument) for a bad command or argument.
        """
        ...

    def apply(self, event: Event) -> None:
        """Fold one of the policy's own journaled events into its state (a reservation, a
        configuration change); called after the command's commit and on every restart."""
        ...


class FifoPolicy:
    """First in, first out within priority; best fit among fitting nodes; no preemption.

    Order: base priority (critical first, by rank, never by name), then submission time, then
    job id, so equal submissions are ordered deterministically.  Every other hook does what
    the engine would do without a policy; domains subclass it and override what they decide.
    """

    name = "fifo"
    max_candidates = 32
    cycle_interval = 60.0
    metadata_type: type[Any] | None = None
    #: Whether ``recover`` gets the journal's history of facts when the engine opens.
    history = False
    command_roles: Mapping[str, str] = {}
    events: EventCodec | None = None

    def validate(self, spec: SubmitJob, now: datetime) -> None:
        return None

    def prepare(self, spec: SubmitJob, now: datetime) -> SubmitJob:
        return spec

    def validate_amendment(self, spec: SubmitJob, amended: SubmitJob, now: datetime) -> None:
        return None

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[Any, ...]:
        return (-job.priority_rank, job.submitted_at, job.job_id)

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        return None

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

    def yields(self, farm: FarmView, now: datetime) -> Sequence[Preemption]:
        return ()

    def checkpoint_interval(self, job: JobView, task: TaskView, now: datetime) -> float | None:
        return None

    def gang_holds(
        self,
        job: JobView,
        task: TaskView,
        candidates: Sequence[str],
        farm: FarmView,
        now: datetime,
    ) -> Sequence[str]:
        # Every node that fits now: the gang ranks above what comes after it this cycle.
        return candidates

    def on_failure(
        self,
        job: JobView,
        task: TaskView,
        failure: Failure,
        default: RetryDecision,
        now: datetime,
    ) -> RetryDecision:
        return default

    def observe(self, observation: Observation) -> None:
        return None

    def recover(self, observations: Sequence[Observation]) -> None:
        return None

    def next_wakeup(self, now: datetime) -> datetime | None:
        return None

    def node_actions(self, farm: FarmView, now: datetime) -> Sequence[NodeAction]:
        return ()

    def cycle_events(self, farm: FarmView, now: datetime) -> Sequence[Event]:
        return ()

    def describe(self, job: JobView, now: datetime) -> Mapping[str, str]:
        return {}

    def explain_rank(self, job: JobView, now: datetime) -> str:
        return (
            f"priority {job.spec.priority.value} (FIFO within priority, submitted "
            f"{job.submitted_at.isoformat()})"
        )

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any],
        farm: FarmView,
        now: datetime,
        *,
        by: str | None = None,
    ) -> CommandResult:
        raise ConfigurationError(
            f"the {self.name} policy has no command {name!r}", where="policy command"
        )

    def apply(self, event: Event) -> None:
        return None


class PriorityPreemptionPolicy(FifoPolicy):
    """FIFO within priority, and a critical task that fits nowhere preempts lower work.

    Only onto a node that accepts work and whose capacity fits the waiting task, only
    preemptible attempts of lower priority, lowest priority first, and on the node that needs
    the fewest victims (then by name, so the choice is deterministic).  Victims checkpoint and
    yield: they return to the queue and resume from their checkpoint.
    """

    name = "priority-preemption"

    def preemptions(
        self, job: JobView, task: TaskView, farm: FarmView, now: datetime
    ) -> Sequence[Preemption]:
        if job.spec.priority is not Priority.CRITICAL:
            return ()
        best: tuple[int, str, list[RunningView]] | None = None
        for name in sorted(farm.nodes):
            node = farm.nodes[name]
            if not node.accepts_work or not fits(task.request, node.capacity):
                continue
            if node.satisfies(task.requires) is not None:
                continue
            candidates = sorted(
                (
                    r
                    for r in farm.running.get(name, {}).values()
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
