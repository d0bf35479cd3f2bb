"""The operator verbs: ``amend``, ``pause``, ``resume``, ``retry``, ``checkpoint``,
``preempt`` and ``node drain|sleep|resume|release``.

Each is one request to the coordinator, which has the engine journal it (``taskfarm replay``
shows every one) and answers with what changed; ``--json`` prints that answer as JSON.  They
need the role ``operator`` (see ``ACCESS``).  Exit statuses as everywhere: 0 done, 1 the farm
refused (the job has finished, the task is not running, nothing to retry), 2 bad input (a
flag, a job, task or node that does not exist, a role that may not).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

import msgspec

from actors.cluster import (
    AmendJobRequest,
    CheckpointTaskRequest,
    ClientRequest,
    JobsReply,
    NodesReply,
    PauseJobRequest,
    PreemptTaskRequest,
    Reply,
    ResumeJobRequest,
    RetriedReply,
    RetryTasksRequest,
    SetNodeHealthRequest,
    TaskVerbReply,
)
from runtime import ConfigurationError, TaskfarmError

from ._client import add_client_arguments, open_client, reply_of, request
from ._format import format_jobs, format_nodes, jobs_json
from ._parsing import RelativeTime, parse_assignment, parse_time

__all__ = [
    "NotRunningError",
    "NothingToRetryError",
    "configure_amend",
    "configure_checkpoint",
    "configure_node",
    "configure_pause",
    "configure_preempt",
    "configure_resume",
    "configure_retry",
]

_NODE_HEALTH: dict[str, Literal["online", "draining", "sleeping"]] = {
    "drain": "draining",
    "sleep": "sleeping",
    "resume": "online",
    "release": "online",
}


class NotRunningError(TaskfarmError):
    """Raised when ``checkpoint`` or ``preempt`` names a task with no running attempt (the
    farm had nothing to ask); ``job_id`` and ``task`` say which."""

    exit_status = 1

    def __init__(self, job_id: str, task: str, verb: str) -> None:
        self.job_id = job_id
        self.task = task
        super().__init__(f"task {task} of job {job_id} has no running attempt: nothing to {verb}")


class NothingToRetryError(TaskfarmError):
    """Raised when ``retry`` finds no failed, cancelled or held task to run again."""

    exit_status = 1

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"nothing to retry in job {job_id}: no failed, cancelled or held task "
            "(or the job completed)"
        )


def _common(parser: argparse.ArgumentParser, handler: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_client_arguments(parser)
    parser.set_defaults(handler=handler)


async def _ask(args: argparse.Namespace, message: ClientRequest) -> Reply:
    async with open_client(args) as connection:
        return await request(connection, message)


def _print_json(data: Any) -> None:
    plain = msgspec.to_builtins(data)
    if isinstance(plain, dict):
        plain.pop("type", None)  # the wire tag of a reply says nothing to a script
    sys.stdout.write(msgspec.json.encode(plain).decode() + "\n")


def _print_job(args: argparse.Namespace, reply: Reply, headline: str) -> int:
    jobs = reply_of(reply, JobsReply)
    if args.json:
        (data,) = jobs_json(jobs.jobs, as_of=jobs.as_of, with_tasks=False)
        _print_json(data)
    else:
        print(headline)
        print(format_jobs(jobs.jobs, as_of=jobs.as_of))
    return 0


# -- amend ----------------------------------------------------------------------------------------


def configure_amend(parser: argparse.ArgumentParser) -> None:
    """Add ``amend``'s arguments."""
    parser.add_argument("job")
    parser.add_argument(
        "--priority", help="the new base priority (background, low, medium, high, critical)"
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a metadata key (repeatable); VALUE is JSON when it is JSON (3, true, "
        '"x", [1, 2]), else a TOML date-time (2025-03-14T18:00:00Z), else a string',
    )
    _common(parser, _amend)


async def _amend(args: argparse.Namespace) -> int:
    values = dict(parse_assignment(text) for text in args.assignments)
    if args.priority is None and not values:
        raise ConfigurationError("give --priority and/or --set KEY=VALUE", where="amend")
    metadata = {key: msgspec.json.encode(value).decode() for key, value in values.items()}
    reply = await _ask(
        args, AmendJobRequest(job_id=args.job, priority=args.priority, metadata=metadata)
    )
    changed = ([f"priority {args.priority}"] if args.priority else []) + [
        f"{key} = {text}" for key, text in metadata.items()
    ]
    return _print_job(args, reply, f"amended {args.job}: {', '.join(changed)}")


# -- pause and resume -----------------------------------------------------------------------------


def configure_pause(parser: argparse.ArgumentParser) -> None:
    """Add ``pause``'s arguments."""
    parser.add_argument("job")
    parser.add_argument(
        "--mode",
        choices=("checkpoint", "finish", "kill"),
        default="checkpoint",
        help="what running attempts do: checkpoint and yield (default), finish, or are "
        "killed (requeued, no attempt spent)",
    )
    parser.add_argument(
        "--reason",
        default="",
        help='default: "paused by NAME", NAME the client credential (token: operator)',
    )
    _common(parser, _pause)


async def _pause(args: argparse.Namespace) -> int:
    reply = await _ask(args, PauseJobRequest(job_id=args.job, mode=args.mode, reason=args.reason))
    return _print_job(args, reply, f"paused {args.job} ({args.mode}): no new attempts start")


def configure_resume(parser: argparse.ArgumentParser) -> None:
    """Add ``resume``'s arguments."""
    parser.add_argument("job")
    parser.add_argument(
        "--reason",
        default="",
        help='default: "resumed by NAME", NAME the client credential (token: operator)',
    )
    _common(parser, _resume)


async def _resume(args: argparse.Namespace) -> int:
    reply = await _ask(args, ResumeJobRequest(job_id=args.job, reason=args.reason))
    return _print_job(args, reply, f"resumed {args.job}")


# -- retry, checkpoint, preempt -------------------------------------------------------------------


def _task_argument(text: str) -> str:
    """A task as the operator names it: a name (``stage-2``, ``11-20``) or an index."""
    task = text.strip()
    if not task or task.startswith("-"):
        raise argparse.ArgumentTypeError(f"a task is a name or an index of 0 or more: {text!r}")
    return task


def configure_retry(parser: argparse.ArgumentParser) -> None:
    """Add ``retry``'s arguments."""
    parser.add_argument("job")
    parser.add_argument(
        "tasks",
        nargs="*",
        type=_task_argument,
        metavar="TASK",
        help="task names or indices (default: every failed, cancelled or held task)",
    )
    parser.add_argument(
        "--reason",
        default="",
        help='default: "retried by NAME", NAME the client credential (token: operator)',
    )
    _common(parser, _retry)


async def _retry(args: argparse.Namespace) -> int:
    reply = reply_of(
        await _ask(
            args, RetryTasksRequest(job_id=args.job, tasks=tuple(args.tasks), reason=args.reason)
        ),
        RetriedReply,
    )
    if not reply.tasks:
        raise NothingToRetryError(args.job)
    if args.json:
        _print_json(reply)
    else:
        print(f"retrying {len(reply.tasks)} task(s) of {reply.job_id}: {', '.join(reply.names)}")
    return 0


def configure_checkpoint(parser: argparse.ArgumentParser) -> None:
    """Add ``checkpoint``'s arguments."""
    parser.add_argument("job")
    parser.add_argument("task", type=_task_argument, help="a task's name or index")
    _common(parser, _checkpoint)


async def _checkpoint(args: argparse.Namespace) -> int:
    reply = await _ask(args, CheckpointTaskRequest(job_id=args.job, task=args.task))
    return _task_verb(args, reply, "checkpoint", "asked {task} of {job} to checkpoint now")


def configure_preempt(parser: argparse.ArgumentParser) -> None:
    """Add ``preempt``'s arguments."""
    parser.add_argument("job")
    parser.add_argument("task", type=_task_argument, help="a task's name or index")
    parser.add_argument(
        "--reason",
        default="",
        help='default: "preempted by NAME", NAME the client credential (token: operator)',
    )
    _common(parser, _preempt)


async def _preempt(args: argparse.Namespace) -> int:
    reply = await _ask(
        args, PreemptTaskRequest(job_id=args.job, task=args.task, reason=args.reason)
    )
    return _task_verb(
        args, reply, "preempt", "preempted {task} of {job}: it checkpoints, yields and is requeued"
    )


def _task_verb(args: argparse.Namespace, reply: Reply, verb: str, done: str) -> int:
    answer = reply_of(reply, TaskVerbReply)
    label = f"task {answer.name}" + (
        f" (index {answer.task})" if answer.name != str(answer.task) else ""
    )
    if not answer.done:
        raise NotRunningError(answer.job_id, answer.name, verb)
    if args.json:
        _print_json(answer)
    else:
        print(done.format(task=label, job=answer.job_id))
    return 0


# -- node -----------------------------------------------------------------------------------------


def configure_node(parser: argparse.ArgumentParser) -> None:
    """Add ``node``'s actions (``drain``, ``sleep``, ``resume``, ``release``)."""
    actions = parser.add_subparsers(dest="node_action", metavar="ACTION", required=True)
    helps = {
        "drain": "place no new work there; running work carries on (--at TIME: plan it)",
        "sleep": "place no new work there, to save energy; running work carries on",
        "resume": "back online (after a drain or a sleep)",
        "release": "back online (after a quarantine)",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text, description=text[:1].upper() + text[1:] + ".")
        sub.add_argument("node", metavar="NODE")
        sub.add_argument("--reason", default="", help="why (shown by taskfarm nodes)")
        if action == "drain":
            sub.add_argument(
                "--at",
                metavar="TIME",
                help="drain at TIME, ISO-8601 (2025-03-14T18:00:00Z; local time without an "
                "offset) or from now (+2h, +90m, +1h30m, +1d): until then no work that could "
                "run past it is placed there; at TIME what still runs there checkpoints and "
                "yields",
            )
        _common(sub, _node)


async def _node(args: argparse.Namespace) -> int:
    at = None
    after_s = None
    if getattr(args, "at", None) is not None:
        moment = parse_time(args.at, where="--at")
        if isinstance(moment, RelativeTime):
            after_s = float(moment)
        else:
            at = moment
    health = _NODE_HEALTH[args.node_action]
    message = SetNodeHealthRequest(
        node=args.node, health=health, reason=args.reason, at=at, after_s=after_s
    )
    nodes = reply_of(await _ask(args, message), NodesReply)
    if args.json:
        (node,) = nodes.nodes
        _print_json(node)
    else:
        planned = (
            f" at {nodes.nodes[0].drain_at}" if nodes.nodes and nodes.nodes[0].drain_at else ""
        )
        print(f"node {args.node}: {args.node_action}{planned}")
        print(format_nodes(nodes.nodes))
    return 0
