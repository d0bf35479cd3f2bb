"""The ``taskfarm`` command line.

Subcommands are plugins registered under the ``taskfarm.commands`` entry-point group, so this
module knows none of the layers above it, and only the module of the command being run is
imported (``taskfarm --help`` stays fast).  A plugin is ``configure(parser)``: it adds its
arguments and sets ``handler``, an async function ``(args) -> int`` (the exit status).

Nothing a user does ends in a traceback.  A ``TaskfarmError`` that ends a command is printed
as one line, ``taskfarm: error: ...``, and the process exits with its ``exit_status`` (2 when
the input is at fault, 1 when the farm refused or failed); errors that reach this boundary
inside anyio's exception groups are unwrapped first.  Argument errors are one line too.  Exit
statuses: 0 done, 1 refused or failed, 2 bad input, 130 interrupted.  Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NoReturn

import anyio

from ._errors import TaskfarmError
from ._logging import configure_logging

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (with where to find the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# One-line help for each plugin command, shown without importing it.
_SUMMARIES = {
    "agent": "run a node agent that executes work for a coordinator",
    "bench": "measure performance against baselines taken in the same run",
    "journal": "inspect a journal file (streams, events, positions, schema)",
    "replay": "rebuild state from a journal, as of a position or a time",
    "serve": "run the coordinator: journal, scheduler, agent and client endpoint",
    "submit": "submit a TOML or JSON job spec to the coordinator",
    "status": "show jobs, their tasks and progress (--watch: live counts and ETA)",
    "cancel": "cancel a job",
    "nodes": "list the nodes and their free resources",
    "why": "explain why a job or its tasks wait",
    "logs": "show a task attempt's log",
    "amend": "change a job's priority or metadata",
    "pause": "pause a job (running attempts checkpoint, finish or are killed)",
    "resume": "resume a paused job",
    "retry": "run a job's failed, cancelled or held tasks again",
    "checkpoint": "ask a running task to checkpoint now",
    "preempt": "checkpoint a running task and put it back in the queue",
    "node": "drain, sleep, resume or release a node",
    "token": "issue, revoke and list node and client credentials",
    "slurm": "run agents as Slurm pilot jobs: submit, status, cancel",
    "demo": "run a coordinator, two agents and a small real workload, with live progress",
}


def _commands() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group="taskfarm.commands")}


def _build_parser(commands: dict[str, EntryPoint], selected: str | None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskfarm",
        description="A concurrent task scheduler for render farms and compute clusters.",
    )
    parser.add_argument(
        "--log-format", choices=("console", "json"), default="console", help="log renderer"
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(commands):
        summary = _SUMMARIES.get(name, "")
        command_parser = sub.add_parser(name, help=summary, description=summary)
        if name == selected:
            configure = commands[name].load()
            configure(command_parser)
    return parser


def _selected_command(argv: Sequence[str], commands: dict[str, EntryPoint]) -> str | None:
    return next((arg for arg in argv if arg in commands), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    parser = _build_parser(commands, _selected_command(args_list, commands))
    args = parser.parse_args(args_list)
    configure_logging(renderer=args.log_format, level=args.log_level)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"command {args.command!r} is not available in this installation")
    try:
        status: int = anyio.run(_call, handler, args)
    except (TaskfarmError, KeyboardInterrupt, BaseExceptionGroup) as error:
        return _report(error)
    return status


def _report(error: BaseException) -> int:
    """Print the error that ended a command as one line; return the exit status.

    Raises:
        BaseException: ``error`` itself when anything but taskfarm errors (and the
            cancellations they caused) is inside it: a bug, whose traceback matters.
    """
    leaves = list(_leaves(error))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130
    # Cancellations (BaseException, not Exception) are the echo of the error that caused them.
    failures = [leaf for leaf in leaves if isinstance(leaf, Exception)]
    if not failures or not all(isinstance(leaf, TaskfarmError) for leaf in failures):
        raise error
    first = failures[0]
    assert isinstance(first, TaskfarmError)
    print(f"taskfarm: error: {_one_line(str(first))}", file=sys.stderr)
    return first.exit_status


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")) if "\n" in text else text


async def _call(handler: Handler, args: Any) -> int:
    return await handler(args)


if __name__ == "__main__":
    sys.exit(main())
