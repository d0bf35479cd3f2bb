"""In-process messages between the engine's actors (never journaled, never on the wire)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from actors.executors import AttemptReport, AttemptSpec
from runtime import Message

from ._graph import Outcome
from ._resources import Resources
from ._spec import SubmitJob

__all__ = [
    "AdmitJobs",
    "AdoptAttempt",
    "AttemptLost",
    "CancelJob",
    "CancelRun",
    "CancelRuns",
    "ClaimAttempt",
    "CreateJob",
    "Dispatch",
    "GetJobSummary",
    "GetNodes",
    "JobEnded",
    "Kick",
    "NodeJoined",
    "NodeLeft",
    "PreemptRun",
    "PreemptTask",
    "ReportAttempt",
    "SetNodeHealth",
    "StartAttempt",
    "TaskEnded",
    "Unplace",
    "WhyJob",
]


class CreateJob(Message, frozen=True, kw_only=True, tag="engine.cmd.create_job"):
    """Journal a validated job (sent by the scheduler to the new job actor)."""

    spec: SubmitJob


class Dispatch(Message, frozen=True, kw_only=True, tag="engine.cmd.dispatch"):
    """Journal these placements, then send the attempts to their nodes."""

    placements: tuple[tuple[int, str], ...]  # (task, node)


class ReportAttempt(Message, frozen=True, kw_only=True, tag="engine.cmd.report_attempt"):
    """An attempt's report; the reply is False when the attempt is stale (kill it)."""

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


class GetJobSummary(Message, frozen=True, kw_only=True, tag="engine.query.job_summary"):
    """Ask a job actor for its summary."""

    tasks: bool = False


class AdmitJobs(Message, frozen=True, kw_only=True, tag="engine.cmd.admit_jobs"):
    """Validate and create jobs (to the scheduler; the reply is a list of ids or an error)."""

    specs: tuple[SubmitJob, ...]
    source: str = ""


class TaskEnded(Message, frozen=True, kw_only=True, tag="engine.evt.task_ended"):
    """An attempt ended; ``outcome`` None means the task runs again (after ``retry_at``)."""

    job_id: str
    task: int
    outcome: Outcome | None
    retry_at: datetime | None = None
    failed_on_node: bool = False
    blocklist_node: str | None = None
    blocklist_until: datetime | None = None


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
    """Drain, sleep or resume a node (only ``online`` nodes get new work)."""

    name: str
    health: str
    reason: str = ""


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
    """Checkpoint-and-yield the task's attempt on ``node`` (to a job actor)."""

    task: int
    node: str
    reason: str


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
