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

from persistence import Event, EventCodec

from ._resources import Resources
from ._spec import SubmitJob

__all__ = [
    "ENGINE_CODEC",
    "JobAggregate",
    "JobCancelRequested",
    "JobFinished",
    "JobState",
    "JobSubmitted",
    "NodeAggregate",
    "NodeBlocklisted",
    "NodeQuarantined",
    "NodeRegistered",
    "NodeState",
    "TaskAssigned",
    "TaskCancelled",
    "TaskCheckpointed",
    "TaskCompleted",
    "TaskFailed",
    "TaskMetricRecorded",
    "TaskPreempted",
    "TaskPreviewed",
    "TaskProgressed",
    "TaskRequeued",
    "TaskStarted",
    "TaskState",
    "TaskStatus",
    "job_stream",
    "node_stream",
]

ENGINE_CODEC = EventCodec()

TaskStatus = Literal["pending", "assigned", "running", "completed", "failed", "cancelled"]
JobStatus = Literal["new", "active", "cancelling", "completed", "failed", "cancelled"]


def job_stream(job_id: str) -> str:
    """Return the stream id of a job."""
    return f"job:{job_id}"


def node_stream(name: str) -> str:
    """Return the stream id of a node."""
    return f"node:{name}"


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


@ENGINE_CODEC.register
class TaskStarted(Event, frozen=True, kw_only=True, tag="engine.task_started"):
    """The node started the attempt."""

    task: int
    token: int
    pid: int | None = None


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
class TaskCompleted(Event, frozen=True, kw_only=True, tag="engine.task_completed"):
    """The attempt finished successfully."""

    task: int
    token: int
    runtime_s: float = 0.0


@ENGINE_CODEC.register
class TaskFailed(Event, frozen=True, kw_only=True, tag="engine.task_failed"):
    """The attempt failed; ``retry_at`` is set when another attempt will follow."""

    task: int
    token: int
    outcome: str
    error: str | None = None
    exit_code: int | None = None
    retry_at: datetime | None = None


@ENGINE_CODEC.register
class TaskRequeued(Event, frozen=True, kw_only=True, tag="engine.task_requeued"):
    """The attempt was lost or preempted (not the task's fault): it runs again."""

    task: int
    token: int
    reason: str


@ENGINE_CODEC.register
class TaskPreempted(Event, frozen=True, kw_only=True, tag="engine.task_preempted"):
    """The scheduler asked this attempt to checkpoint and yield its node to ``for_job``."""

    task: int
    token: int
    node: str
    reason: str


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


@ENGINE_CODEC.register
class JobFinished(Event, frozen=True, kw_only=True, tag="engine.job_finished"):
    """The job reached its end: completed, failed or cancelled."""

    outcome: Literal["completed", "failed", "cancelled"]
    reason: str | None = None
    finished_at: datetime


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
    """The node failed too many attempts in a row and gets no work until released."""

    reason: str
    released: bool = False


# -- the job aggregate --------------------------------------------------------------------------


class TaskState(msgspec.Struct, kw_only=True):
    """One task of a job, as the journal says it is."""

    status: TaskStatus = "pending"
    attempt: int = 0
    token: int = 0
    node: str | None = None
    last_node: str | None = None
    checkpoint: str | None = None
    progress: float = 0.0
    failures: int = 0
    last_error: str | None = None
    retry_at: datetime | None = None
    runtime_s: float = 0.0
    preview: str | None = None
    preemptions: int = 0


class JobState(msgspec.Struct, kw_only=True):
    """A job as the journal says it is (mutable: the aggregate updates it in place)."""

    job: SubmitJob | None = None
    submitted_at: datetime | None = None
    status: JobStatus = "new"
    tasks: list[TaskState] = msgspec.field(default_factory=list)
    blocklist: dict[str, datetime] = msgspec.field(default_factory=dict)
    finished_at: datetime | None = None
    reason: str | None = None
    metrics: dict[str, float] = msgspec.field(default_factory=dict)

    def unfinished(self) -> list[int]:
        """Return the indices of tasks that are not completed, failed or cancelled."""
        return [
            i for i, t in enumerate(self.tasks) if t.status in ("pending", "assigned", "running")
        ]

    def active_attempts(self) -> list[int]:
        """Return the indices of tasks with an attempt out on a node."""
        return [i for i, t in enumerate(self.tasks) if t.status in ("assigned", "running")]


class JobAggregate:
    """Folds a job stream's events into a :class:`JobState` (deterministic, no I/O)."""

    state_type = JobState
    schema_version = 1

    def initial_state(self, stream_id: str) -> JobState:
        return JobState()

    def apply(self, state: JobState, event: Event) -> JobState:
        match event:
            case JobSubmitted(job=job, submitted_at=at):
                state.job = job
                state.submitted_at = at
                state.status = "active"
                state.tasks = [TaskState() for _ in job.tasks]
            case TaskAssigned(task=i, attempt=attempt, token=token, node=node):
                task = state.tasks[i]
                task.status = "assigned"
                task.attempt = attempt
                task.token = token
                task.node = node
                task.retry_at = None
            case TaskStarted(task=i):
                state.tasks[i].status = "running"
            case TaskProgressed(task=i, fraction=fraction):
                state.tasks[i].progress = fraction
            case TaskCheckpointed(task=i, checkpoint=checkpoint):
                state.tasks[i].checkpoint = checkpoint
            case TaskPreviewed(task=i, path=path):
                state.tasks[i].preview = path
            case TaskMetricRecorded(name=name, value=value):
                state.metrics[name] = value
            case TaskCompleted(task=i, runtime_s=runtime):
                task = state.tasks[i]
                task.status = "completed"
                task.progress = 1.0
                task.runtime_s += runtime
                task.last_node, task.node = task.node, None
            case TaskFailed(task=i, outcome=outcome, error=error, retry_at=retry_at):
                task = state.tasks[i]
                task.failures += 1
                task.last_error = f"{outcome}: {error}" if error else outcome
                task.retry_at = retry_at
                task.status = "pending" if retry_at is not None else "failed"
                task.last_node, task.node = task.node, None
            case TaskRequeued(task=i, reason=reason):
                task = state.tasks[i]
                task.status = "pending"
                task.last_error = reason
                task.last_node, task.node = task.node, None
            case TaskPreempted(task=i):
                state.tasks[i].preemptions += 1
            case TaskCancelled(task=i):
                task = state.tasks[i]
                task.status = "cancelled"
                task.node = None
            case NodeBlocklisted(node=node, until=until):
                state.blocklist[node] = until
            case JobCancelRequested(reason=reason):
                state.status = "cancelling"
                state.reason = reason
            case JobFinished(outcome=outcome, reason=reason, finished_at=at):
                state.status = outcome
                state.reason = reason
                state.finished_at = at
            case _:
                pass  # events of newer versions this code does not know change nothing here
        return state


class NodeState(msgspec.Struct, kw_only=True):
    """A node's identity as journaled."""

    name: str = ""
    capacity: Resources = Resources()
    labels: tuple[str, ...] = ()
    remote: bool = False
    quarantined: bool = False
    quarantine_reason: str | None = None


class NodeAggregate:
    """Folds a node stream into a :class:`NodeState`."""

    state_type = NodeState
    schema_version = 1

    def initial_state(self, stream_id: str) -> NodeState:
        return NodeState(name=stream_id.partition(":")[2])

    def apply(self, state: NodeState, event: Event) -> NodeState:
        match event:
            case NodeRegistered(capacity=capacity, labels=labels, remote=remote):
                state.capacity = capacity
                state.labels = labels
                state.remote = remote
            case NodeQuarantined(reason=reason, released=released):
                state.quarantined = not released
                state.quarantine_reason = None if released else reason
            case _:
                pass
        return state
