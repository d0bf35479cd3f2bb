"""Who may send which client request: one table, :data:`ACCESS`.

Roles nest: ``read`` < ``submit`` < ``operator`` < ``admin``; each may do what the ones before
it may.  A rule names the weakest role that may send a request; a rule with ``any_job`` lets
that role act only on jobs its principal submitted, and ``any_job`` (or stronger) on any job.
Add a row for every new request kind: a request without one is refused to everyone but
``admin`` (and a test checks that every request of the protocol has a row).

A policy's domain commands (``PolicyCommandRequest``) are guarded per command: the policy's
``command_roles`` names the role of each (``{"deadline": "submit"}``); a command it does not
list needs the row's role, ``operator``.  A role name the protocol does not know is read as
``admin`` (a typo in a policy must not open a command to everyone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from runtime import Message, Principal

from ._credentials import (
    ROLES,
    IssueCredentialRequest,
    ListCredentialsRequest,
    RevokeCredentialRequest,
    Role,
    role_rank,
)
from ._protocol import (
    AmendJobRequest,
    CancelJobRequest,
    CheckpointTaskRequest,
    ListNodesRequest,
    LogsRequest,
    PauseJobRequest,
    PolicyCommandRequest,
    PreemptTaskRequest,
    ResumeJobRequest,
    RetryTasksRequest,
    SetNodeHealthRequest,
    StatusRequest,
    SubmitRequest,
    WhyRequest,
)
from ._usage_wire import UsageRequest

__all__ = ["ACCESS", "Decision", "Rule", "decide", "describe_request", "rule_for"]


@dataclass(frozen=True, slots=True)
class Rule:
    """The weakest ``role`` that may send a request; with ``any_job``, ``role`` may act only on
    its own jobs and ``any_job`` on anyone's."""

    role: Role
    any_job: Role | None = None


ACCESS: Mapping[type[Message], Rule] = {
    # read: look, never touch
    StatusRequest: Rule("read"),
    ListNodesRequest: Rule("read"),
    WhyRequest: Rule("read"),
    LogsRequest: Rule("read"),
    UsageRequest: Rule("read"),
    # submit: its own jobs
    SubmitRequest: Rule("submit"),
    CancelJobRequest: Rule("submit", any_job="operator"),
    # operator: job and node verbs, on any job
    AmendJobRequest: Rule("operator"),
    PauseJobRequest: Rule("operator"),
    ResumeJobRequest: Rule("operator"),
    RetryTasksRequest: Rule("operator"),
    CheckpointTaskRequest: Rule("operator"),
    PreemptTaskRequest: Rule("operator"),
    SetNodeHealthRequest: Rule("operator"),
    # a policy's domain commands: per command, from the policy's ``command_roles``
    PolicyCommandRequest: Rule("operator"),
    # admin: who may connect
    IssueCredentialRequest: Rule("admin"),
    RevokeCredentialRequest: Rule("admin"),
    ListCredentialsRequest: Rule("admin"),
}
"""Request kind -> the rule that guards it (the one place to extend with new verbs)."""

_UNLISTED = Rule("admin")

Decision = Literal["allow", "own", "deny"]
"""``own``: allowed if the job the request names was submitted by the principal."""


def rule_for(request: Message, command_roles: Mapping[str, str] | None = None) -> Rule:
    """Return the rule of ``request``'s kind (``admin`` only for a kind without a row); a
    policy command's from ``command_roles`` (the policy's), when it names the command."""
    rule = ACCESS.get(type(request), _UNLISTED)
    if isinstance(request, PolicyCommandRequest) and command_roles:
        named = command_roles.get(request.name)
        if named is not None:
            rule = Rule(named if named in ROLES else "admin")
    return rule


def decide(
    principal: Principal, request: Message, command_roles: Mapping[str, str] | None = None
) -> Decision:
    """Decide from the principal's role alone; ``own`` leaves the job's owner to check."""
    rule = rule_for(request, command_roles)
    rank = role_rank(principal.grant)
    if rank < role_rank(rule.role):
        return "deny"
    if rule.any_job is not None and rank < role_rank(rule.any_job):
        return "own"
    return "allow"


def describe_request(request: Message) -> str:
    """Return a request kind as a verb for messages (``client.cancel`` -> ``cancel``)."""
    if isinstance(request, PolicyCommandRequest):
        return f"run the policy command {request.name!r}"
    tag = type(request).__struct_config__.tag
    return str(tag).removeprefix("client.").replace("_", " ")
