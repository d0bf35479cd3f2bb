"""The coordinator's wire protocol: what node agents and CLI clients exchange with it.

One tagged union per direction, framed by ``runtime``'s wire layer (msgpack, length-prefixed,
authenticated).  Inbound messages forbid unknown fields: a peer that sends something we do not
understand gets its connection closed rather than a silent misreading.

Agent conversation::

    agent -> AgentHello(name, capacity, labels, running=[...])   (also after every reconnect)
    coord -> Welcome(node, heartbeat_interval)
    coord -> RunAttempt(spec) | CancelAttempt | CheckpointAttempt | ReadLog
    agent -> Heartbeat | Report(sequence, report) | LogChunk
             | PlanDrain(at)        (an agent whose batch allocation ends at a known time)
    coord -> ReportAck(sequence)     (the agent drops acknowledged reports from its outbox)

Client conversation: one request, one reply (``Reply`` or ``ErrorReply``).

What the coordinator decodes (``CoordinatorInbound``) is bounded beyond the frame limit:
every string and container a peer sends has a maximum length, checked while decoding, so a
16 MiB frame of millions of tiny elements is refused before it costs memory.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

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

__all__ = [
    "AgentHello",
    "AgentToCoordinator",
    "CancelAttempt",
    "CancelJobRequest",
    "CheckpointAttempt",
    "ClientRequest",
    "CoordinatorInbound",
    "CoordinatorToAgent",
    "ErrorReply",
    "Heartbeat",
    "JobsReply",
    "ListNodesRequest",
    "LogChunk",
    "LogsRequest",
    "NodesReply",
    "PlanDrain",
    "ReadLog",
    "Reply",
    "Report",
    "ReportAck",
    "RunAttempt",
    "StatusRequest",
    "SubmitRequest",
    "SubmittedReply",
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
_MAX_LABELS = 256  # an agent's node labels
_MAX_RUNNING = 65_536  # attempts an agent reports running


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


class Heartbeat(_Inbound, frozen=True, kw_only=True, tag="agent.heartbeat"):
    """The agent is alive; ``running`` counts its attempts."""

    running: int = 0


class Report(_Inbound, frozen=True, kw_only=True, tag="agent.report"):
    """One attempt report, numbered by the agent's durable outbox."""

    sequence: Sequence_
    report: AttemptReport


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
    """The coordinator accepted the agent as node ``node``."""

    node: str
    heartbeat_interval: float


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


AgentToCoordinator = AgentHello | Heartbeat | Report | LogChunk | PlanDrain
CoordinatorToAgent = Welcome | RunAttempt | CancelAttempt | CheckpointAttempt | ReportAck | ReadLog
AgentWire = AgentToCoordinator | CoordinatorToAgent

# -- client <-> coordinator -----------------------------------------------------------------


class SubmitRequest(_Inbound, frozen=True, kw_only=True, tag="client.submit"):
    """Submit a spec file's text (validated by the coordinator, which names file and field)."""

    text: Annotated[str, msgspec.Meta(max_length=MAX_SPEC_BYTES)]
    format: _Short  # "toml" or "json"
    source: _Short  # the file name, for error messages


class StatusRequest(_Inbound, frozen=True, kw_only=True, tag="client.status"):
    """Ask for the status of one job, or all jobs."""

    job_id: _Identifier | None = None


class CancelJobRequest(_Inbound, frozen=True, kw_only=True, tag="client.cancel"):
    """Cancel a job."""

    job_id: _Identifier
    reason: _Short = "cancelled by user"


class ListNodesRequest(_Inbound, frozen=True, kw_only=True, tag="client.nodes"):
    """List the nodes."""


class WhyRequest(_Inbound, frozen=True, kw_only=True, tag="client.why"):
    """Explain why a job (or its tasks) waits."""

    job_id: _Identifier


class LogsRequest(_Inbound, frozen=True, kw_only=True, tag="client.logs"):
    """Fetch an attempt's log (the latest attempt of the task when ``attempt`` is None)."""

    job_id: _Identifier
    task: _Index | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None


class SubmittedReply(Message, frozen=True, kw_only=True, tag="coordinator.submitted"):
    """The jobs a submission created."""

    job_ids: tuple[str, ...]


class JobsReply(Message, frozen=True, kw_only=True, tag="coordinator.jobs"):
    """Job summaries."""

    jobs: tuple[JobSummary, ...]


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
    | IssueCredentialRequest
    | RevokeCredentialRequest
    | ListCredentialsRequest
)
Reply = (
    SubmittedReply
    | JobsReply
    | NodesReply
    | TextReply
    | ErrorReply
    | IssuedCredentialReply
    | CredentialsReply
)

CoordinatorInbound = AgentToCoordinator | ClientRequest
"""What the coordinator accepts from any peer (the role decides which part it may send)."""

WireMessage = AgentToCoordinator | CoordinatorToAgent | ClientRequest | Reply
"""Everything that crosses a coordinator connection (the role from the handshake decides which
part a peer may send)."""
