"""The ``taskfarm`` command line.

Subcommands are plugins registered under the ``taskfarm.commands`` entry-point group, so this
module knows none of the layers above it, and only the module of the command being run is
imported (``taskfarm --help`` stays fast).  A plugin is ``configure(parser)``: it adds its
arguments and sets ``handler``, an async function ``(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import anyio

from ._errors import TaskfarmError
from ._logging import configure_logging

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], Awaitable[int]]

# One-line help for each plugin command, shown without importing it.
_SUMMARIES = {
    "agent": "run a node agent that executes work for a coordinator",
    "bench": "measure performance against baselines taken in the same run",
    "journal": "inspect a journal file (streams, events, positions, schema)",
    "replay": "rebuild state from a journal, as of a position or a time",
    "serve": "run the coordinator: journal, scheduler, agent and client endpoint",
    "submit": "submit a TOML or JSON job spec to the coordinator",
    "status": "show jobs and their progress (--watch for live bars)",
    "cancel": "cancel a job",
    "nodes": "list the nodes and their free resources",
    "why": "explain why a job or its tasks wait",
    "logs": "show a task attempt's log",
    "token": "issue, revoke and list node and client credentials",
    "demo": "run a coordinator, two agents and a small real workload, with live progress",
}


def _commands() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group="taskfarm.commands")}


def _build_parser(commands: dict[str, EntryPoint], selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    except TaskfarmError as error:
        print(f"taskfarm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


async def _call(handler: Handler, args: Any) -> int:
    return await handler(args)


if __name__ == "__main__":
    sys.exit(main())
