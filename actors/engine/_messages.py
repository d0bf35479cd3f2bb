"""In-process messages between the engine's actors (never journaled, never on the wire)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from actors.executors import AttemptReport, AttemptSpec
from runtime import Message

from ._graph import Outcome
from ._resources import Resources
from ._spec import SubmitJob

__all__ = [
    "AdmitJobs",
    "AdoptAttempt",
    "AmendJob",
    "AttemptLost",
    "CancelJob",
    "CancelRun",
    "CancelRuns",
    "CancelTasks",
    "CheckpointRun",
    "CheckpointTask",
    "ClaimAttempt",
    "DecideRetry",
    "DescribeJob",
    "Dispatch",
    "GetJobState",
    "GetJobSummary",
    "GetNodes",
    "JobChanged",
    "JobEnded",
    "JobRevived",
    "JobsAdded",
    "Kick",
    "NodeJoined",
    "NodeLeft",
    "PauseJob",
    "PolicyCommand",
    "PreemptRun",
    "PreemptTask",
    "ReleaseJobIds",
    "ReportAttempt",
    "ResumeJob",
    "RetryTasks",
    "SetNodeHealth",
    "SetNodeReachable",
    "SkipTasks",
    "StartAttempt",
    "TaskEnded",
    "TaskUpdate",
    "Unplace",
    "WhyJob",
]


class Dispatch(Message, frozen=True, kw_only=True, tag="engine.cmd.dispatch"):
    """Journal these placements, then send the attempts to their nodes."""

    placements: tuple[tuple[int, tuple[str, ...]], ...]  # (task, nodes: leader first)
    # Per placement, how often (seconds) the policy wants it to checkpoint (empty: never).
    checkpoint_intervals: tuple[float | None, ...] = ()


class ReportAttempt(Message, frozen=True, kw_only=True, tag="engine.cmd.report_attempt"):
    """An attempt's report, told or asked; the reply is False when the attempt is stale (the
    job then tells the node to stop it)."""

    report: AttemptReport
    node: str


class AttemptLost(Message, frozen=True, kw_only=True, tag="engine.cmd.attempt_lost"):
    """The node of an attempt is gone (or never re-claimed it after a restart)."""

    task: int
    node: str
    reason: str


class CancelJob(Message, frozen=True, kw_only=True, tag="engine.cmd.cancel_job"):
    """Cancel the job: pending tasks at once, running attempts stopped."""

    reason: str
    by: str | None = None  # who asked (journaled with the change)


class GetJobSummary(Message, frozen=True, kw_only=True, tag="engine.query.job_summary"):
    """Ask a job actor for its summary."""

    tasks: bool = False


class AdmitJobs(Message, frozen=True, kw_only=True, tag="engine.cmd.admit_jobs"):
    """Validate a submission and reserve its ids (to the scheduler; the reply is None or the
    error).  The engine then journals every job in one atomic append and sends ``JobsAdded``
    (or ``ReleaseJobIds`` when the append failed)."""

    specs: tuple[SubmitJob, ...]
    source: str = ""


class JobsAdded(Message, frozen=True, kw_only=True, tag="engine.evt.jobs_added"):
    """These jobs are journaled and their actors run: schedule them."""

    specs: tuple[SubmitJob, ...]
    submitted_at: datetime


class ReleaseJobIds(Message, frozen=True, kw_only=True, tag="engine.cmd.release_job_ids"):
    """A reserved submission was not journaled: free its ids."""

    job_ids: tuple[str, ...]


class JobRevived(Message, frozen=True, kw_only=True, tag="engine.evt.job_revived"):
    """A finished job was reopened (``taskfarm retry``): track it again."""

    job_id: str
    state: Any  # its JobState after the reopening


class TaskUpdate(Message, frozen=True, kw_only=True, tag="engine.evt.task_update"):
    """A running attempt started, progressed, checkpointed or produced a preview (for the
    views and the policy)."""

    job_id: str
    task: int
    node: str | None = None
    attempt: int = 0
    started: bool = False
    progress: float | None = None
    checkpoint_at: datetime | None = None
    checkpoint_bytes: int = 0  # the checkpoint's size by its verified manifest (0: none)
    preempted: bool = False
    preview: str | None = None


class DecideRetry(Message, frozen=True, kw_only=True, tag="engine.query.decide_retry"):
    """A job asks what follows a failed attempt; the reply is (RetryDecision, Failure)."""

    job_id: str
    task: int
    failure: Any  # a Failure


class JobChanged(Message, frozen=True, kw_only=True, tag="engine.evt.job_changed"):
    """A job was paused, resumed or amended, or tasks of it were released (to the scheduler)."""

    job_id: str
    status: str | None = None
    spec: SubmitJob | None = None
    released: tuple[int, ...] = ()


class CancelTasks(Message, frozen=True, kw_only=True, tag="engine.cmd.cancel_tasks"):
    """Cancel pending tasks whose dependency can no longer be met (to a job actor)."""

    tasks: tuple[int, ...]
    reason: str


class SkipTasks(Message, frozen=True, kw_only=True, tag="engine.cmd.skip_tasks"):
    """Skip pending tasks whose conditional branch was not taken."""

    tasks: tuple[int, ...]
    reason: str


class PauseJob(Message, frozen=True, kw_only=True, tag="engine.cmd.pause_job"):
    """Pause the job (to its actor); the reply is its summary."""

    mode: str = "checkpoint"
    reason: str = ""
    by: str | None = None  # who asked (journaled with the change)


class ResumeJob(Message, frozen=True, kw_only=True, tag="engine.cmd.resume_job"):
    """Resume a paused job, and release its held tasks (to its actor)."""

    reason: str = ""
    by: str | None = None  # who asked (journaled with the change)


class AmendJob(Message, frozen=True, kw_only=True, tag="engine.cmd.amend_job"):
    """Change the job's priority and metadata keys (values are JSON) (to its actor)."""

    priority: Any = None  # a Priority
    metadata: tuple[tuple[str, bytes], ...] = ()
    by: str | None = None  # who asked (journaled with the change)


class RetryTasks(Message, frozen=True, kw_only=True, tag="engine.cmd.retry_tasks"):
    """Run failed, cancelled or held tasks again (all of them when ``tasks`` is empty)."""

    tasks: tuple[int, ...] = ()
    reason: str = ""
    by: str | None = None  # who asked (journaled with the change)


class CheckpointTask(Message, frozen=True, kw_only=True, tag="engine.cmd.checkpoint_task"):
    """Ask the task's running attempt to checkpoint now (to its job actor)."""

    task: int
    reason: str = ""
    by: str | None = None  # who asked (journaled with the change)


class CheckpointRun(Message, frozen=True, kw_only=True, tag="engine.cmd.checkpoint_run"):
    """Ask an attempt to checkpoint now, without stopping it (to a node actor)."""

    job_id: str
    task_id: str
    token: int


class SetNodeReachable(Message, frozen=True, kw_only=True, tag="engine.cmd.set_node_reachable"):
    """A node's connection state changed (connected, unreachable, offline)."""

    name: str
    reachable: str


class TaskEnded(Message, frozen=True, kw_only=True, tag="engine.evt.task_ended"):
    """An attempt ended (or a pending task was cancelled); ``outcome`` None means the task
    runs again (after ``retry_at``), or waits for an operator (``held``).

    ``attempt_outcome`` is what happened to the attempt (completed, failed, timed_out,
    stalled, oom, lost, preempted, cancelled, ...); the rest feeds the views and the policy.
    """

    job_id: str
    task: int
    outcome: Outcome | None
    retry_at: datetime | None = None
    failure: Any = None  # a Failure, when the attempt failed
    blocklist_node: str | None = None
    blocklist_until: datetime | None = None
    attempt_outcome: str | None = None
    node: str | None = None
    attempt: int = 0
    runtime_s: float = 0.0
    lost: bool = False
    held: str | None = None
    avoid_node: str | None = None
    resources: Resources | None = None
    metrics: tuple[tuple[str, float], ...] = ()
    checkpoint_at: datetime | None = None


class Unplace(Message, frozen=True, kw_only=True, tag="engine.evt.unplace"):
    """A placement the job actor refused (the task was no longer pending): free the node."""

    job_id: str
    task: int


class JobEnded(Message, frozen=True, kw_only=True, tag="engine.evt.job_ended"):
    """A job finished (its actor passivates)."""

    job_id: str
    outcome: Outcome


class NodeJoined(Message, frozen=True, kw_only=True, tag="engine.evt.node_joined"):
    """A node is ready for work."""

    name: str
    capacity: Resources
    labels: tuple[str, ...] = ()
    remote: bool = False


class NodeLeft(Message, frozen=True, kw_only=True, tag="engine.evt.node_left"):
    """A node went offline (its attempts are being requeued by their jobs)."""

    name: str
    reason: str


class ClaimAttempt(Message, frozen=True, kw_only=True, tag="engine.cmd.claim_attempt"):
    """An agent re-reported a running attempt after a restart; the reply says if it is current."""

    job_id: str
    task: int
    token: int
    node: str


class SetNodeHealth(Message, frozen=True, kw_only=True, tag="engine.cmd.set_node_health"):
    """Drain, sleep, quarantine or resume a node (only ``online`` nodes get new work);
    ``drain_at`` plans a drain for later (the reply is whether the node is known)."""

    name: str
    health: str
    reason: str = ""
    drain_at: datetime | None = None
    by: Literal["operator", "engine"] = "operator"  # who decided (policies use node_actions)
    operator: str | None = None  # the operator's name, when a client credential asked


class Kick(Message, frozen=True, kw_only=True, tag="engine.cmd.kick"):
    """Run a placement cycle (coalesced: many triggers, one cycle)."""


class WhyJob(Message, frozen=True, kw_only=True, tag="engine.query.why"):
    """Explain why a job waits."""

    job_id: str


class GetNodes(Message, frozen=True, kw_only=True, tag="engine.query.nodes"):
    """List the nodes."""


class StartAttempt(Message, frozen=True, kw_only=True, tag="engine.cmd.start_attempt"):
    """Start an attempt on this node (to a node actor)."""

    spec: AttemptSpec
    job: Any  # the job actor's ref, where reports go


class AdoptAttempt(Message, frozen=True, kw_only=True, tag="engine.cmd.adopt_attempt"):
    """Route an attempt the node's agent still runs (after a restart) back to its job."""

    spec: AttemptSpec
    job: Any


class PreemptTask(Message, frozen=True, kw_only=True, tag="engine.cmd.preempt_task"):
    """Checkpoint-and-yield the task's attempt on ``node`` (to a job actor); ``force`` for an
    operator or a planned drain, which may stop work its job did not mark preemptible."""

    task: int
    node: str
    reason: str
    force: bool = False
    by: str | None = None  # who asked (journaled with the change)


class GetJobState(Message, frozen=True, kw_only=True, tag="engine.query.job_state"):
    """Ask a job actor for its state (a copy is not made: read, never write)."""


class PolicyCommand(Message, frozen=True, kw_only=True, tag="engine.cmd.policy_command"):
    """Run a domain command of the policy (to the scheduler); the reply is its result or the
    error.  ``by`` is who asked (see ``Policy.command``; None: the embedding application)."""

    name: str
    arguments: Any  # a mapping of JSON-able values
    by: str | None = None


class DescribeJob(Message, frozen=True, kw_only=True, tag="engine.query.describe_job"):
    """Ask the scheduler for a live job's policy columns and its blocked and held tasks."""

    job_id: str


class PreemptRun(Message, frozen=True, kw_only=True, tag="engine.cmd.preempt_run"):
    """Ask an attempt to checkpoint, wait up to ``grace`` for it, then stop it (to a node)."""

    job_id: str
    task_id: str
    token: int
    grace: float


class CancelRun(Message, frozen=True, kw_only=True, tag="engine.cmd.cancel_run"):
    """Stop an attempt on this node (terminate, kill after ``grace``)."""

    job_id: str
    task_id: str
    token: int
    grace: float = 5.0


class CancelRuns(Message, frozen=True, kw_only=True, tag="engine.cmd.cancel_runs"):
    """Stop every attempt on this node: it is leaving the farm and its work was requeued."""

    grace: float = 5.0
