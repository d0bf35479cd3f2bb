"""Journaled facts of the engine, and the job aggregate that folds them.

Each job has one stream, ``job:<job_id>``, written only by its JobActor; each node that ever
joined has one, ``node:<name>``, so a node that comes back keeps its identity.  Events are
facts in the past tense.  A task's fencing token is the stream version of the ``TaskAssigned``
event that started its attempt: unique within the job, increasing, and known before the append.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from actors.executors import CheckpointManifest, CheckpointRecord, retain
from persistence import Event, EventCodec

from ._resources import Resources
from ._spec import Priority, SubmitJob

__all__ = [
    "ENGINE_CODEC",
    "JobAggregate",
    "JobAmended",
    "JobCancelRequested",
    "JobFinished",
    "JobPaused",
    "JobReopened",
    "JobResumed",
    "JobState",
    "JobStatus",
    "JobSubmitted",
    "NodeAggregate",
    "NodeBlocklisted",
    "NodeHealthChanged",
    "NodeQuarantined",
    "NodeRegistered",
    "NodeState",
    "TaskAssigned",
    "TaskCancelled",
    "TaskCheckpointRequested",
    "TaskCheckpointed",
    "TaskCompleted",
    "TaskFailed",
    "TaskMetricRecorded",
    "TaskPreempted",
    "TaskPreviewed",
    "TaskProgressed",
    "TaskReleased",
    "TaskRequeued",
    "TaskSkipped",
    "TaskStarted",
    "TaskState",
    "TaskStatus",
    "job_stream",
    "node_stream",
    "policy_stream",
]

ENGINE_CODEC = EventCodec()

TaskStatus = Literal[
    "pending", "held", "assigned", "running", "completed", "failed", "cancelled", "skipped"
]
JobStatus = Literal["new", "active", "paused", "cancelling", "completed", "failed", "cancelled"]


def job_stream(job_id: str) -> str:
    """Return the stream id of a job."""
    return f"job:{job_id}"


def node_stream(name: str) -> str:
    """Return the stream id of a node."""
    return f"node:{name}"


def policy_stream(name: str) -> str:
    """Return the stream id of a policy's own events (reservations, configuration changes)."""
    return f"policy:{name}"


# -- job events ---------------------------------------------------------------------------------


@ENGINE_CODEC.register
class JobSubmitted(Event, frozen=True, kw_only=True, tag="engine.job_submitted"):
    """A job was accepted (validated, dependencies known, no cycle)."""

    job: SubmitJob
    submitted_at: datetime


@ENGINE_CODEC.register
class TaskAssigned(Event, frozen=True, kw_only=True, tag="engine.task_assigned"):
    """An attempt of a task was placed on a node (journaled before it is dispatched)."""

    task: int
    attempt: int
    token: int
    node: str
    resume_from: str | None = None
    nodes: tuple[str, ...] = ()  # a multi-node attempt's nodes, leader (``node``) first


@ENGINE_CODEC.register
class TaskStarted(Event, frozen=True, kw_only=True, tag="engine.task_started"):
    """The node started the attempt."""

    task: int
    token: int
    pid: int | None = None
    at: datetime | None = None  # when it started (None in journals written before 0.2)
    # A resumed attempt: what it resumed from, and the later checkpoints it skipped because
    # they failed verification (dropped from the task's kept checkpoints), with why.
    resumed_from: str | None = None
    refused: tuple[str, ...] = ()
    fallback: str | None = None
    # The refused checkpoints whose files were deleted (the retention rule: no attempt resumes
    # from a refused one again); a gang's are deleted once the attempt ends, and not listed.
    deleted: tuple[str, ...] = ()


@ENGINE_CODEC.register
class TaskProgressed(Event, frozen=True, kw_only=True, tag="engine.task_progressed"):
    """A progress milestone (every 10 %, not every report)."""

    task: int
    token: int
    fraction: float


@ENGINE_CODEC.register
class TaskCheckpointed(Event, frozen=True, kw_only=True, tag="engine.task_checkpointed"):
    """The attempt reported a checkpoint a later attempt can resume from."""

    task: int
    token: int
    checkpoint: str
    at: datetime | None = None
    manifest: CheckpointManifest | None = None  # its files, as the executor verified them


@ENGINE_CODEC.register
class TaskPreviewed(Event, frozen=True, kw_only=True, tag="engine.task_previewed"):
    """The attempt produced a preview (a partial output to look at)."""

    task: int
    token: int
    path: str


@ENGINE_CODEC.register
class TaskMetricRecorded(Event, frozen=True, kw_only=True, tag="engine.task_metric"):
    """The attempt reported a named measurement."""

    task: int
    token: int
    name: str
    value: float


@ENGINE_CODEC.register
class TaskCompleted(
    Event, frozen=True, kw_only=True, omit_defaults=True, tag="engine.task_completed"
):
    """The attempt finished successfully; ``runtime_s`` (wall), ``cpu_s`` and ``peak_rss``
    (bytes) are what it used, as its executor measured (``cpu_s`` None, ``peak_rss`` 0: not
    measured, as in-process and simulated; events journaled before None was possible hold 0).
    Fields at their defaults are left out of the payload."""

    task: int
    token: int
    runtime_s: float = 0.0
    cpu_s: float | None = None
    peak_rss: int = 0


@ENGINE_CODEC.register
class TaskFailed(Event, frozen=True, kw_only=True, omit_defaults=True, tag="engine.task_failed"):
    """The attempt failed; ``retry_at`` is set when another attempt will follow, ``held``
    when the task waits for an operator instead.

    ``kind`` is the failure class the engine detected (exit_code, signal, timeout, stall,
    lost, oom, start); ``job_fault`` that it says nothing about the node; ``avoid_node`` and
    ``resources`` are the retry's adjustments (from the policy's ``on_failure``).
    """

    task: int
    token: int
    outcome: str
    error: str | None = None
    exit_code: int | None = None
    retry_at: datetime | None = None
    kind: str = ""
    job_fault: bool = False
    held: str | None = None
    avoid_node: str | None = None
    resources: Resources | None = None
    runtime_s: float = 0.0
    cpu_s: float | None = None  # what the attempt used, as for TaskCompleted
    peak_rss: int = 0


@ENGINE_CODEC.register
class TaskRequeued(Event, frozen=True, kw_only=True, tag="engine.task_requeued"):
    """The attempt was lost (``lost``: its node or agent went away) or preempted, paused or
    killed by the farm: not the task's fault, so it runs again without spending an attempt."""

    task: int
    token: int
    reason: str
    lost: bool = False


@ENGINE_CODEC.register
class TaskPreempted(Event, frozen=True, kw_only=True, tag="engine.task_preempted"):
    """The scheduler asked this attempt to checkpoint and yield its node to ``for_job``."""

    task: int
    token: int
    node: str
    reason: str
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class TaskCancelled(Event, frozen=True, kw_only=True, tag="engine.task_cancelled"):
    """The task will not run (its job was cancelled or failed)."""

    task: int
    reason: str


@ENGINE_CODEC.register
class NodeBlocklisted(Event, frozen=True, kw_only=True, tag="engine.node_blocklisted"):
    """This job avoids ``node`` until ``until`` (its attempts kept failing there)."""

    node: str
    until: datetime
    reason: str


@ENGINE_CODEC.register
class JobCancelRequested(Event, frozen=True, kw_only=True, tag="engine.job_cancel_requested"):
    """Somebody asked to cancel the job; running attempts are being stopped."""

    reason: str
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class JobFinished(Event, frozen=True, kw_only=True, tag="engine.job_finished"):
    """The job reached its end: completed, failed or cancelled."""

    outcome: Literal["completed", "failed", "cancelled"]
    reason: str | None = None
    finished_at: datetime


@ENGINE_CODEC.register
class JobPaused(Event, frozen=True, kw_only=True, tag="engine.job_paused"):
    """No new attempts start; running ones ``checkpoint`` and yield, ``finish``, or are
    ``kill``ed (requeued, no attempt spent)."""

    mode: Literal["checkpoint", "finish", "kill"]
    reason: str = ""
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class JobResumed(Event, frozen=True, kw_only=True, tag="engine.job_resumed"):
    """A paused job gets new attempts again."""

    reason: str = ""
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class JobAmended(Event, frozen=True, kw_only=True, tag="engine.job_amended"):
    """An operator changed the job's priority or metadata (``changes`` says what, readably)."""

    priority: Priority | None = None
    metadata: bytes | None = None
    changes: tuple[str, ...] = ()
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class JobReopened(Event, frozen=True, kw_only=True, tag="engine.job_reopened"):
    """``taskfarm retry``: these failed or cancelled tasks run again, with fresh attempts."""

    tasks: tuple[int, ...]
    reason: str = ""
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class TaskReleased(Event, frozen=True, kw_only=True, tag="engine.task_released"):
    """A held task (held for an operator after a failure) may run again."""

    task: int
    reason: str = ""
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class TaskCheckpointRequested(
    Event, frozen=True, kw_only=True, tag="engine.task_checkpoint_requested"
):
    """An operator asked the running attempt to checkpoint now (SIGUSR1)."""

    task: int
    token: int
    reason: str = ""
    by: str | None = None  # who asked: a coordinator client credential's name (None: the embedder)


@ENGINE_CODEC.register
class TaskSkipped(Event, frozen=True, kw_only=True, tag="engine.task_skipped"):
    """The task will not run: a conditional branch was not taken (``when`` was false, or the
    stage it waited on was skipped).  It does not fail or cancel its job."""

    task: int
    reason: str


# -- node events --------------------------------------------------------------------------------


@ENGINE_CODEC.register
class NodeRegistered(Event, frozen=True, kw_only=True, tag="engine.node_registered"):
    """A node joined (or came back with new capacity or labels)."""

    name: str
    capacity: Resources
    labels: tuple[str, ...] = ()
    remote: bool = False


@ENGINE_CODEC.register
class NodeQuarantined(Event, frozen=True, kw_only=True, tag="engine.node_quarantined"):
    """The node failed too many attempts in a row and gets no work until released.

    Written by older versions; newer ones write :class:`NodeHealthChanged` for every health.
    """

    reason: str
    released: bool = False


@ENGINE_CODEC.register
class NodeHealthChanged(Event, frozen=True, kw_only=True, tag="engine.node_health_changed"):
    """An operator, a policy or the engine set the node's health (online, draining, sleeping,
    quarantined); ``drain_at`` plans a drain (work that cannot finish before it is not placed
    there, and what still runs then checkpoints and yields)."""

    health: str
    reason: str = ""
    drain_at: datetime | None = None
    by: str = "operator"  # operator, policy or engine
    # The operator's name when a coordinator client credential asked (None: the embedder, a
    # join-token client, a policy or the engine); ``by`` stays the kind, which placement reads.
    operator: str | None = None


# -- the job aggregate --------------------------------------------------------------------------


class TaskState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One task of a job, as the journal says it is.

    Encoded without its default fields (``omit_defaults``), so a snapshot of a big job stays small
    and quick to read back; a field left out decodes as its default, so snapshots written with
    every field and without them read alike.

    ``nodes`` holds the node of every attempt (index = attempt - 1), so the log of any attempt
    can be fetched, cancelled ones included.
    """

    status: TaskStatus = "pending"
    attempt: int = 0
    token: int = 0
    node: str | None = None
    last_node: str | None = None
    checkpoint: str | None = None
    checkpoint_at: datetime | None = None
    # The last ``checkpoint_retention`` checkpoints, oldest first (``checkpoint`` is the last).
    checkpoints: list[CheckpointRecord] = msgspec.field(default_factory=list)
    resume_note: str | None = None  # why the last resume fell back to an earlier checkpoint
    progress: float = 0.0
    failures: int = 0
    lost: int = 0
    last_error: str | None = None
    last_outcome: str | None = None
    retry_at: datetime | None = None
    runtime_s: float = 0.0
    cpu_s: float | None = None  # of its attempts that ended with a measurement (None: none)
    peak_rss: int = 0  # the largest of them
    preview: str | None = None
    preemptions: int = 0
    # The token of the attempt last asked to checkpoint and yield: while it yields, a rank
    # other than the leader that stops first must not end the attempt before the leader's
    # checkpoint is journaled (the leader's end decides; see the job actor).
    yielding: int = 0
    held_reason: str | None = None
    avoid: list[str] = msgspec.field(default_factory=list)
    resources: Resources | None = None
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    nodes: list[str] = msgspec.field(default_factory=list)
    gang: list[str] = msgspec.field(default_factory=list)  # the current attempt's nodes
    started_at: datetime | None = None  # of the current attempt, once it started

    def holds(self, node: str | None) -> bool:
        """Return whether ``node`` runs (a rank of) the current attempt."""
        return node is not None and (node == self.node or node in self.gang)


class JobState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A job as the journal says it is (mutable: the aggregate updates it in place; encoded
    without its default fields, as :class:`TaskState` is)."""

    job: SubmitJob | None = None
    submitted_at: datetime | None = None
    status: JobStatus = "new"
    tasks: list[TaskState] = msgspec.field(default_factory=list)
    blocklist: dict[str, datetime] = msgspec.field(default_factory=dict)
    # failed attempts per node (that count against it) since its last blocklisting
    node_failures: dict[str, int] = msgspec.field(default_factory=dict)
    finished_at: datetime | None = None
    reason: str | None = None
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    # every metric value in report order: name -> [(task, value), ...]
    metric_series: dict[str, list[tuple[int, float]]] = msgspec.field(default_factory=dict)
    pause_mode: str | None = None

    def unfinished(self) -> list[int]:
        """Return the indices of tasks that are not completed, failed or cancelled."""
        return [
            i for i, t in enumerate(self.tasks) if t.status in ("pending", "assigned", "running")
        ]

    def active_attempts(self) -> list[int]:
        """Return the indices of tasks with an attempt out on a node."""
        return [i for i, t in enumerate(self.tasks) if t.status in ("assigned", "running")]

    @property
    def live(self) -> bool:
        """Return whether the job may still run work (active or paused)."""
        return self.status in ("active", "paused")


class JobAggregate:
    """Folds a job stream's events into a :class:`JobState` (deterministic, no I/O)."""

    state_type = JobState
    schema_version = 2

    def initial_state(self, stream_id: str) -> JobState:
        return JobState()

    def apply(self, state: JobState, event: Event) -> JobState:
        match event:
            case JobSubmitted(job=job, submitted_at=at):
                state.job = job
                state.submitted_at = at
                state.status = "active"
                state.tasks = [TaskState() for _ in job.tasks]
            case TaskAssigned(task=i, attempt=attempt, token=token, node=node, nodes=members):
                task = state.tasks[i]
                task.status = "assigned"
                task.attempt = attempt
                task.token = token
                task.node = node
                task.gang = list(members)
                task.retry_at = None
                task.started_at = None
                del task.nodes[attempt - 1 :]
                task.nodes.extend([""] * (attempt - 1 - len(task.nodes)))
                task.nodes.append(node)
            case TaskStarted(task=i, at=at, refused=refused, resumed_from=resumed_from):
                task = state.tasks[i]
                task.status = "running"
                task.started_at = at
                if refused:
                    task.checkpoints = [c for c in task.checkpoints if c.checkpoint not in refused]
                    task.checkpoint = resumed_from
                    task.resume_note = event.fallback
                    if event.deleted:
                        task.resume_note = (
                            f"{event.fallback}; deleted the refused {', '.join(event.deleted)}"
                        )
            case TaskProgressed(task=i, fraction=fraction):
                state.tasks[i].progress = fraction
            case TaskCheckpointed(task=i, checkpoint=checkpoint, at=at, manifest=manifest):
                task = state.tasks[i]
                task.checkpoint = checkpoint
                task.checkpoint_at = at or task.checkpoint_at
                keep = state.job.checkpoint_retention if state.job is not None else 3
                record = CheckpointRecord(checkpoint=checkpoint, manifest=manifest)
                task.checkpoints, _ = retain([*task.checkpoints, record], keep)
            case TaskPreviewed(task=i, path=path):
                state.tasks[i].preview = path
            case TaskMetricRecorded(task=i, name=name, value=value):
                state.metrics[name] = value
                state.tasks[i].metrics[name] = value
                state.metric_series.setdefault(name, []).append((i, value))
            case TaskCompleted(task=i, runtime_s=runtime) as completed:
                task = state.tasks[i]
                task.status = "completed"
                task.progress = 1.0
                task.runtime_s += runtime
                task.cpu_s = _plus(task.cpu_s, completed.cpu_s)
                task.peak_rss = max(task.peak_rss, completed.peak_rss)
                task.last_outcome = "completed"
                task.last_node, task.node = task.node, None
                if task.last_node:
                    state.node_failures.pop(task.last_node, None)
            case TaskFailed() as failed:
                task = state.tasks[failed.task]
                task.failures += 1
                task.last_error = (
                    f"{failed.outcome}: {failed.error}" if failed.error else failed.outcome
                )
                task.last_outcome = failed.outcome
                task.retry_at = failed.retry_at
                task.runtime_s += failed.runtime_s
                task.cpu_s = _plus(task.cpu_s, failed.cpu_s)
                task.peak_rss = max(task.peak_rss, failed.peak_rss)
                if failed.held is not None:
                    task.status, task.held_reason = "held", failed.held
                else:
                    task.status = "pending" if failed.retry_at is not None else "failed"
                if failed.avoid_node and failed.avoid_node not in task.avoid:
                    task.avoid.append(failed.avoid_node)
                if failed.resources is not None:
                    task.resources = failed.resources
                failed_on = task.node
                task.last_node, task.node = failed_on, None
                if failed_on and not failed.job_fault and failed.kind != "lost":
                    state.node_failures[failed_on] = state.node_failures.get(failed_on, 0) + 1
            case TaskRequeued(task=i, reason=reason, lost=lost):
                task = state.tasks[i]
                task.status = "pending"
                task.last_error = reason
                task.last_outcome = "lost" if lost else "requeued"
                task.lost += 1 if lost else 0
                task.last_node, task.node = task.node, None
            case TaskPreempted(task=i, token=token):
                state.tasks[i].preemptions += 1
                state.tasks[i].yielding = token
            case TaskCancelled(task=i):
                task = state.tasks[i]
                task.status = "cancelled"
                if task.node:
                    task.last_node = task.node
                task.node = None
            case TaskSkipped(task=i):
                task = state.tasks[i]
                if task.status in ("pending", "held"):
                    task.status, task.held_reason = "skipped", None
            case TaskReleased(task=i):
                task = state.tasks[i]
                if task.status == "held":
                    task.status, task.held_reason, task.retry_at = "pending", None, None
            case NodeBlocklisted(node=node, until=until):
                state.blocklist[node] = until
                state.node_failures.pop(node, None)
            case JobCancelRequested(reason=reason):
                state.status = "cancelling"
                state.reason = reason
            case JobPaused(mode=mode):
                if state.status == "active":
                    state.status, state.pause_mode = "paused", mode
            case JobResumed():
                if state.status == "paused":
                    state.status, state.pause_mode = "active", None
            case JobAmended(priority=priority, metadata=metadata):
                if state.job is not None:
                    changes: dict[str, object] = {}
                    if priority is not None:
                        changes["priority"] = priority
                    if metadata is not None:
                        changes["metadata"] = metadata
                    state.job = msgspec.structs.replace(state.job, **changes)
            case JobReopened(tasks=indices):
                state.status, state.reason, state.finished_at = "active", None, None
                for i in indices:
                    task = state.tasks[i]
                    if task.status in ("failed", "cancelled", "held"):
                        task.status, task.failures, task.lost = "pending", 0, 0
                        task.retry_at, task.held_reason = None, None
            case JobFinished(outcome=outcome, reason=reason, finished_at=at):
                state.status = outcome
                state.reason = reason
                state.finished_at = at
            case _:
                pass  # events of newer versions this code does not know change nothing here
        return state


def _plus(total: float | None, measured: float | None) -> float | None:
    """Add a measurement to a total; None (not measured) adds nothing, and stays None alone."""
    if measured is None:
        return total
    return measured if total is None else total + measured


class NodeState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A node's identity as journaled (encoded without its default fields)."""

    name: str = ""
    capacity: Resources = Resources()
    labels: tuple[str, ...] = ()
    remote: bool = False
    health: str = "online"
    health_reason: str | None = None
    health_by: str = "engine"
    health_operator: str | None = None  # the operator's name (see NodeHealthChanged.operator)
    drain_at: datetime | None = None

    @property
    def quarantined(self) -> bool:
        """Return whether the node is quarantined."""
        return self.health == "quarantined"


class NodeAggregate:
    """Folds a node stream into a :class:`NodeState`."""

    state_type = NodeState
    schema_version = 2

    def initial_state(self, stream_id: str) -> NodeState:
        return NodeState(name=stream_id.partition(":")[2])

    def apply(self, state: NodeState, event: Event) -> NodeState:
        match event:
            case NodeRegistered(capacity=capacity, labels=labels, remote=remote):
                state.capacity = capacity
                state.labels = labels
                state.remote = remote
            case NodeQuarantined(reason=reason, released=released):
                state.health = "online" if released else "quarantined"
                state.health_reason = None if released else reason
            case NodeHealthChanged(
                health=health, reason=reason, drain_at=drain_at, by=by, operator=operator
            ):
                state.health = health
                state.health_reason = reason or None
                state.health_by = by
                state.health_operator = operator
                state.drain_at = drain_at
            case _:
                pass
        return state
