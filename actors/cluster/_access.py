"""Who may send which client request: one table, :data:`ACCESS`.

Roles nest: ``read`` < ``submit`` < ``operator`` < ``admin``; each may do what the ones before
it may.  A rule names the weakest role that may send a request; a rule with ``any_job`` lets
that role act only on jobs its principal submitted, and ``any_job`` (or stronger) on any job.
Add a row for every new request kind: a request without one is refused to everyone but
``admin`` (and a test checks that every request of the protocol has a row).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from runtime import Message, Principal

from ._credentials import (
    IssueCredentialRequest,
    ListCredentialsRequest,
    RevokeCredentialRequest,
    Role,
    role_rank,
)
from ._protocol import (
    CancelJobRequest,
    ListNodesRequest,
    LogsRequest,
    StatusRequest,
    SubmitRequest,
    WhyRequest,
)

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
    # submit: its own jobs
    SubmitRequest: Rule("submit"),
    CancelJobRequest: Rule("submit", any_job="operator"),
    # admin: who may connect
    IssueCredentialRequest: Rule("admin"),
    RevokeCredentialRequest: Rule("admin"),
    ListCredentialsRequest: Rule("admin"),
}
"""Request kind -> the rule that guards it (the one place to extend with new verbs)."""

_UNLISTED = Rule("admin")

Decision = Literal["allow", "own", "deny"]
"""``own``: allowed if the job the request names was submitted by the principal."""


def rule_for(request: Message) -> Rule:
    """Return the rule of ``request``'s kind (``admin`` only for a kind without a row)."""
    return ACCESS.get(type(request), _UNLISTED)


def decide(principal: Principal, request: Message) -> Decision:
    """Decide from the principal's role alone; ``own`` leaves the job's owner to check."""
    rule = rule_for(request)
    rank = role_rank(principal.grant)
    if rank < role_rank(rule.role):
        return "deny"
    if rule.any_job is not None and rank < role_rank(rule.any_job):
        return "own"
    return "allow"


def describe_request(request: Message) -> str:
    """Return a request kind as a verb for messages (``client.cancel`` -> ``cancel``)."""
    tag = type(request).__struct_config__.tag
    return str(tag).removeprefix("client.").replace("_", " ")
