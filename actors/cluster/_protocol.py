"""The coordinator's wire protocol: what node agents and CLI clients exchange with it.

One tagged union per direction, framed by ``runtime``'s wire layer (msgpack, length-prefixed,
authenticated).  Inbound messages forbid unknown fields: a peer that sends something we do not
understand gets its connection closed rather than a silent misreading.

Agent conversation::

    agent -> AgentHello(name, capacity, labels, running=[...])   (also after every reconnect)
    coord -> Welcome(node, heartbeat_interval, lease, lease_grace)
    coord -> RunAttempt(spec) | CancelAttempt | CheckpointAttempt | ReadLog
    agent -> Heartbeat(sequence) | Report(sequence, report) | Reports([...]) | LogChunk
    coord -> HeartbeatAck(sequence)  (renews the agent's lease on its attempts)
             | PlanDrain(at)        (an agent whose batch allocation ends at a known time)
    coord -> ReportAck(sequence)     (the agent drops acknowledged reports from its outbox)
    coord -> SleepNode(reason)       (the node is sleeping and idle: run the sleep command)

The lease: an agent runs its attempts only while it hears from the coordinator.  Each
``Heartbeat`` carries a number; the coordinator answers it with ``HeartbeatAck`` of the same
number as it reads it; the agent's lease then runs until the time it *sent* that heartbeat plus
``lease`` (so an answer delayed in the network never stretches it).  When the lease runs out the
agent asks its checkpointable attempts to checkpoint, stops them all within ``lease_grace`` and
reports them ``lost``; the coordinator requeues a silent node's attempts only after its fence,
measured from the last frame it read from the agent and longer than ``lease + lease_grace``.

Client conversation: one request, one reply (``Reply`` or ``ErrorReply``).  Operator verbs
(``amend``, ``pause``, ``resume``, ``retry``, ``checkpoint``, ``preempt``, ``node ...``) and a
policy's domain commands (``PolicyCommandRequest``, arguments and result as JSON text) are
requests like any other; :mod:`._access` says who may send each.

What the coordinator decodes (``CoordinatorInbound``) is bounded beyond the frame limit:
every string and container a peer sends has a maximum length, checked while decoding, so a
16 MiB frame of millions of tiny elements is refused before it costs memory.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from actors.engine import MAX_SPEC_BYTES, JobSummary, NodeSummary, Resources
from actors.executors import AttemptReport, AttemptSpec, RunningAttempt
from runtime import Message

from ._credentials import (
    CredentialsReply,
    IssueCredentialRequest,
    IssuedCredentialReply,
    ListCredentialsRequest,
    RevokeCredentialRequest,
)
from ._usage_wire import JobUsageNow, NodeUsage, UsageReply, UsageRequest

__all__ = [
    "AgentHello",
    "AgentToCoordinator",
    "AmendJobRequest",
    "CancelAttempt",
    "CancelJobRequest",
    "CheckpointAttempt",
    "CheckpointTaskRequest",
    "ClientRequest",
    "CoordinatorInbound",
    "CoordinatorToAgent",
    "ErrorReply",
    "Heartbeat",
    "HeartbeatAck",
    "JobsReply",
    "ListNodesRequest",
    "LogChunk",
    "LogsRequest",
    "NodesReply",
    "PauseJobRequest",
    "PlanDrain",
    "PolicyCommandRequest",
    "PolicyReply",
    "PreemptTaskRequest",
    "ReadLog",
    "Reply",
    "Report",
    "ReportAck",
    "Reports",
    "ResumeJobRequest",
    "RetriedReply",
    "RetryTasksRequest",
    "RunAttempt",
    "SetNodeHealthRequest",
    "SleepNode",
    "StatusRequest",
    "SubmitRequest",
    "SubmittedReply",
    "TaskVerbReply",
    "TextReply",
    "Welcome",
    "WhyRequest",
    "WireMessage",
]

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@:-]+$")]
Sequence_ = Annotated[int, msgspec.Meta(ge=1)]
# Bounds on what peers send (generous: a real request is far below each).
_Identifier = Annotated[str, msgspec.Meta(max_length=256)]  # a job id (a name, or renamed)
_Short = Annotated[str, msgspec.Meta(max_length=4096)]  # a reason, a file name
_Index = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
_Attempt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
_Json = Annotated[str, msgspec.Meta(max_length=1024 * 1024)]  # a JSON document, as text
_MAX_TASKS_NAMED = 100_000  # tasks one request names (a job has at most that many)
_MAX_KEYS = 64  # metadata keys one amend sets (the spec's metadata is bounded as well)
_MAX_LABELS = 256  # an agent's node labels
_MAX_RUNNING = 65_536  # attempts an agent reports running
MAX_REPORTS_PER_FRAME = 64  # reports an agent sends in one Reports frame


class _Inbound(Message, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for messages the coordinator receives from outside."""


# -- agent <-> coordinator ------------------------------------------------------------------


class AgentHello(_Inbound, frozen=True, kw_only=True, tag="agent.hello"):
    """An agent introduces itself: its stable name, what it has, what it is running."""

    name: Name
    capacity: Resources
    labels: Annotated[tuple[_Short, ...], msgspec.Meta(max_length=_MAX_LABELS)] = ()
    running: Annotated[tuple[RunningAttempt, ...], msgspec.Meta(max_length=_MAX_RUNNING)] = ()
    unacknowledged: int = 0  # reports waiting in its outbox (they follow as Report frames)


class Heartbeat(_Inbound, frozen=True, kw_only=True, omit_defaults=True, tag="agent.heartbeat"):
    """The agent is alive; ``running`` counts its attempts; ``sequence`` (from 1; 0 asks for no
    answer) is echoed by ``HeartbeatAck``."""

    running: int = 0
    sequence: Annotated[int, msgspec.Meta(ge=0)] = 0
    # A usage sample, once per sample interval (left out when there is none, so an agent
    # that does not sample still speaks to a coordinator that predates samples).
    usage: NodeUsage | None = None


class Report(_Inbound, frozen=True, kw_only=True, tag="agent.report"):
    """One attempt report, numbered by the agent's durable outbox."""

    sequence: Sequence_
    report: AttemptReport


class Reports(_Inbound, frozen=True, kw_only=True, tag="agent.reports"):
    """Several outbox reports in one frame, in sequence order (what piled up since the last)."""

    reports: Annotated[
        tuple[Report, ...], msgspec.Meta(min_length=1, max_length=MAX_REPORTS_PER_FRAME)
    ]


class LogChunk(_Inbound, frozen=True, kw_only=True, tag="agent.log_chunk"):
    """The answer to ``ReadLog``: part of an attempt's log file."""

    request: int
    text: str
    missing: bool = False


class PlanDrain(_Inbound, frozen=True, kw_only=True, tag="agent.plan_drain"):
    """The agent's host goes away at a known time (its batch allocation ends): drain the node
    at ``at`` (until then, place no work there that cannot finish by ``at``)."""

    at: Annotated[datetime, msgspec.Meta(tz=True)]
    reason: _Short = ""


class Welcome(Message, frozen=True, kw_only=True, tag="coordinator.welcome"):
    """The coordinator accepted the agent as node ``node``.

    ``lease`` (seconds, 0 for none) is how long the agent may run its attempts without hearing
    from the coordinator, ``lease_grace`` how long it then has to checkpoint and stop them.
    """

    node: str
    heartbeat_interval: float
    lease: float = 0.0
    lease_grace: float = 0.0


class HeartbeatAck(Message, frozen=True, kw_only=True, tag="coordinator.heartbeat_ack"):
    """The coordinator read the agent's heartbeat ``sequence``: the agent's lease is renewed."""

    sequence: int


class RunAttempt(Message, frozen=True, kw_only=True, tag="coordinator.run_attempt"):
    """Run this attempt."""

    spec: AttemptSpec


class CancelAttempt(Message, frozen=True, kw_only=True, tag="coordinator.cancel_attempt"):
    """Stop an attempt (terminate, then kill after ``grace``); stale ones are killed this way."""

    job_id: str
    task_id: str
    fencing_token: int
    grace: float = 5.0
    reason: str = ""


class CheckpointAttempt(Message, frozen=True, kw_only=True, tag="coordinator.checkpoint_attempt"):
    """Ask a running attempt to checkpoint now."""

    job_id: str
    task_id: str
    fencing_token: int


class ReportAck(Message, frozen=True, kw_only=True, tag="coordinator.report_ack"):
    """Reports up to and including ``sequence`` are journaled: drop them from the outbox."""

    sequence: int


class ReadLog(Message, frozen=True, kw_only=True, tag="coordinator.read_log"):
    """Send the tail of an attempt's log."""

    request: int
    job_id: str
    task_id: str
    attempt: int
    max_bytes: int = 64 * 1024


class SleepNode(Message, frozen=True, kw_only=True, tag="coordinator.sleep_node"):
    """The node is sleeping and runs nothing: put the host to sleep (``--sleep-command``)."""

    reason: _Short = ""


AgentToCoordinator = AgentHello | Heartbeat | Report | Reports | LogChunk | PlanDrain
CoordinatorToAgent = (
    Welcome
    | HeartbeatAck
    | RunAttempt
    | CancelAttempt
    | CheckpointAttempt
    | ReportAck
    | ReadLog
    | SleepNode
)
AgentWire = AgentToCoordinator | CoordinatorToAgent

# -- client <-> coordinator -----------------------------------------------------------------


class SubmitRequest(_Inbound, frozen=True, kw_only=True, tag="client.submit"):
    """Submit a spec file's text (validated by the coordinator, which names file and field)."""

    text: Annotated[str, msgspec.Meta(max_length=MAX_SPEC_BYTES)]
    format: _Short  # "toml" or "json"
    source: _Short  # the file name, for error messages


class StatusRequest(_Inbound, frozen=True, kw_only=True, tag="client.status"):
    """Ask for the status of one job (with its tasks), or all jobs (with theirs if ``tasks``)."""

    job_id: _Identifier | None = None
    tasks: bool = False


class CancelJobRequest(_Inbound, frozen=True, kw_only=True, tag="client.cancel"):
    """Cancel a job."""

    job_id: _Identifier
    reason: _Short = ""  # "" : "cancelled by user", naming the client credential if one asked


class ListNodesRequest(_Inbound, frozen=True, kw_only=True, tag="client.nodes"):
    """List the nodes."""


class WhyRequest(_Inbound, frozen=True, kw_only=True, tag="client.why"):
    """Explain why a job (or its tasks) waits."""

    job_id: _Identifier


class LogsRequest(_Inbound, frozen=True, kw_only=True, tag="client.logs"):
    """Fetch an attempt's log (the latest attempt of the task when ``attempt`` is None)."""

    job_id: _Identifier
    task: _Index | _Identifier | None = None  # an index, or a task's name (``stage-2``)
    attempt: _Attempt | None = None


# -- operator verbs -------------------------------------------------------------------------


class AmendJobRequest(_Inbound, frozen=True, kw_only=True, tag="client.amend"):
    """Change a live job's priority and metadata keys (each value a JSON document)."""

    job_id: _Identifier
    priority: _Short | None = None
    metadata: Annotated[dict[_Short, _Json], msgspec.Meta(max_length=_MAX_KEYS)] = {}


class PauseJobRequest(_Inbound, frozen=True, kw_only=True, tag="client.pause"):
    """Pause a job: running attempts checkpoint and yield, finish, or are killed."""

    job_id: _Identifier
    mode: Literal["checkpoint", "finish", "kill"] = "checkpoint"
    reason: _Short = ""  # "" : "paused by operator", naming the client credential if one asked


class ResumeJobRequest(_Inbound, frozen=True, kw_only=True, tag="client.resume"):
    """Resume a paused job (and release tasks held for an operator)."""

    job_id: _Identifier
    reason: _Short = ""  # "" : "resumed by operator", naming the client credential if one asked


class RetryTasksRequest(_Inbound, frozen=True, kw_only=True, tag="client.retry"):
    """Run a job's failed, cancelled or held tasks again (all of them when ``tasks`` is
    empty); each task by index or by name."""

    job_id: _Identifier
    tasks: Annotated[
        tuple[_Index | _Identifier, ...], msgspec.Meta(max_length=_MAX_TASKS_NAMED)
    ] = ()
    reason: _Short = ""  # "" : "retried by operator", naming the client credential if one asked


class CheckpointTaskRequest(_Inbound, frozen=True, kw_only=True, tag="client.checkpoint"):
    """Ask a task's running attempt to checkpoint now."""

    job_id: _Identifier
    task: _Index | _Identifier


class PreemptTaskRequest(_Inbound, frozen=True, kw_only=True, tag="client.preempt"):
    """Checkpoint and yield a task's running attempt (requeued, no attempt spent)."""

    job_id: _Identifier
    task: _Index | _Identifier
    reason: _Short = ""  # "" : "preempted by operator", naming the client credential if one asked


class SetNodeHealthRequest(_Inbound, frozen=True, kw_only=True, tag="client.node_health"):
    """Set a node's health (``online`` for ``node resume`` and ``node release``); a drain
    may be planned ``at`` a time, or ``after_s`` seconds from the coordinator's now."""

    node: _Identifier
    health: Literal["online", "draining", "sleeping"]
    reason: _Short = ""
    at: datetime | None = None
    after_s: Annotated[float, msgspec.Meta(ge=0, le=366 * 86_400)] | None = None


class PolicyCommandRequest(_Inbound, frozen=True, kw_only=True, tag="client.policy_command"):
    """Run a domain command of the coordinator's policy (``taskfarm render ...``); the
    arguments are a JSON object, as text."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    arguments: _Json = "{}"


class SubmittedReply(Message, frozen=True, kw_only=True, tag="coordinator.submitted"):
    """The jobs a submission created."""

    job_ids: tuple[str, ...]


class JobsReply(Message, frozen=True, kw_only=True, tag="coordinator.jobs"):
    """Job summaries, as of the coordinator's time ``as_of`` (for "running 0:41")."""

    jobs: tuple[JobSummary, ...]
    as_of: datetime | None = None
    usage: tuple[JobUsageNow, ...] = ()  # the jobs' running attempts, as last sampled


class RetriedReply(Message, frozen=True, kw_only=True, tag="coordinator.retried"):
    """The tasks a retry runs again (none: nothing was failed, cancelled or held)."""

    job_id: str
    tasks: tuple[int, ...]
    names: tuple[str, ...] = ()


class TaskVerbReply(Message, frozen=True, kw_only=True, tag="coordinator.task_verb"):
    """The answer to ``checkpoint`` and ``preempt``: ``done`` is False when the task had no
    running attempt to ask."""

    job_id: str
    task: int
    name: str
    done: bool


class PolicyReply(Message, frozen=True, kw_only=True, tag="coordinator.policy_reply"):
    """A policy command's result, as JSON text."""

    result: str


class NodesReply(Message, frozen=True, kw_only=True, tag="coordinator.nodes"):
    """Node summaries."""

    nodes: tuple[NodeSummary, ...]


class TextReply(Message, frozen=True, kw_only=True, tag="coordinator.text"):
    """A plain-text answer (``why``, ``logs``)."""

    text: str


class ErrorReply(Message, frozen=True, kw_only=True, tag="coordinator.error"):
    """The request failed; ``error`` says why (and names the field or file at fault)."""

    error: str
    kind: str = "error"


ClientRequest = (
    SubmitRequest
    | StatusRequest
    | CancelJobRequest
    | ListNodesRequest
    | WhyRequest
    | LogsRequest
    | AmendJobRequest
    | PauseJobRequest
    | ResumeJobRequest
    | RetryTasksRequest
    | CheckpointTaskRequest
    | PreemptTaskRequest
    | SetNodeHealthRequest
    | PolicyCommandRequest
    | IssueCredentialRequest
    | RevokeCredentialRequest
    | ListCredentialsRequest
    | UsageRequest
)
Reply = (
    SubmittedReply
    | JobsReply
    | NodesReply
    | TextReply
    | RetriedReply
    | TaskVerbReply
    | PolicyReply
    | ErrorReply
    | IssuedCredentialReply
    | CredentialsReply
    | UsageReply
)

CoordinatorInbound = AgentToCoordinator | ClientRequest
"""What the coordinator accepts from any peer (the role decides which part it may send)."""

WireMessage = AgentToCoordinator | CoordinatorToAgent | ClientRequest | Reply
"""Everything that crosses a coordinator connection (the role from the handshake decides which
part a peer may send)."""
