"""``taskfarm render ...`` and ``taskfarm audit``.

``render`` talks to a coordinator running the render-farm policy (``taskfarm serve --policy
render-farm --policy-config farm.toml``): every subcommand is one of the policy's commands,
answered from its state; ``config reload`` and ``mode`` are journaled in its stream.  ``audit``
reads a journal (read-only, the coordinator may be running) and answers "what happened and why".
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec

from actors.cli import add_client_arguments, run_policy_command
from runtime import ConfigurationError

from ._config import ENERGY_MODES

__all__ = ["configure", "configure_audit"]

_WATCH_EVERY = 2.0  # seconds between two refreshes of ``status --watch``


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``render``'s subcommands."""
    commands = parser.add_subparsers(dest="render_command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", help="jobs: frames, ETA, deadline verdict, priority")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.set_defaults(handler=_status)
    clients = commands.add_parser("clients", help="guaranteed, used, borrowed and lent shares")
    clients.add_argument("--json", action="store_true")
    clients.set_defaults(handler=_clients)
    previews = commands.add_parser("previews", help="a job's previews, latest last")
    previews.add_argument("job")
    previews.add_argument("--json", action="store_true")
    previews.set_defaults(handler=_previews)
    chart = commands.add_parser("chart", help="a Gantt chart of the schedule and forecast")
    chart.add_argument("--out", required=True, metavar="FILE.svg|FILE.png")
    chart.set_defaults(handler=_chart)
    config = commands.add_parser("config", help="show or reload farm.toml")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="the configuration in force (JSON)")
    show.set_defaults(handler=_config_show)
    reload = actions.add_parser("reload", help="reload farm.toml (journaled)")
    reload.add_argument(
        "--file", help="send this file instead of re-reading the coordinator's --policy-config"
    )
    reload.set_defaults(handler=_config_reload)
    mode = commands.add_parser("mode", help="set the energy mode (journaled)")
    mode.add_argument("mode", choices=ENERGY_MODES)
    mode.add_argument("--reason", default="set by operator")
    mode.set_defaults(handler=_mode)
    for sub in (status, clients, previews, chart, show, reload, mode):
        add_client_arguments(sub)


async def _status(args: argparse.Namespace) -> int:
    from ._views import format_status

    while True:
        rows = await run_policy_command(args, "status")
        if args.json:
            _print_json(rows)
        else:
            if args.watch:
                sys.stdout.write("\x1b[2J\x1b[H")
            print(format_status(rows), flush=True)
        if not args.watch:
            return 0
        await anyio.sleep(_WATCH_EVERY)


async def _clients(args: argparse.Namespace) -> int:
    from ._views import format_clients

    rows = await run_policy_command(args, "clients")
    if args.json:
        _print_json(rows)
    else:
        print(format_clients(rows))
    return 0


async def _previews(args: argparse.Namespace) -> int:
    from ._views import format_previews

    rows = await run_policy_command(args, "previews", {"job": args.job})
    if args.json:
        _print_json(rows)
    else:
        print(format_previews(args.job, rows))
    return 0


async def _chart(args: argparse.Namespace) -> int:
    from ._chart import write_chart

    out = Path(args.out)
    if out.suffix.lower() not in (".svg", ".png"):
        raise ConfigurationError(f"{out}: a chart is .svg or .png", where="--out")
    data = await run_policy_command(args, "chart")
    bars = write_chart(data, out)
    print(f"{out}: {bars} bars (running and forecast)")
    return 0


async def _config_show(args: argparse.Namespace) -> int:
    _print_json(await run_policy_command(args, "config"))
    return 0


async def _config_reload(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {}
    if args.file is not None:
        path = anyio.Path(args.file)
        try:
            arguments = {"text": await path.read_text(encoding="utf-8"), "source": str(path)}
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigurationError(f"cannot read it: {error}", where=str(path)) from None
    reply = await run_policy_command(args, "config-reload", arguments)
    changes = reply.get("changes", [])
    if not changes:
        print("no change")
    for change in changes:
        print(f"changed {change}")
    print(f"energy mode: {reply.get('mode')}")
    return 0


async def _mode(args: argparse.Namespace) -> int:
    reply = await run_policy_command(args, "mode", {"mode": args.mode, "reason": args.reason})
    print(f"energy mode: {reply['mode']}" + ("" if reply.get("changed") else " (unchanged)"))
    return 0


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


# -- audit ----------------------------------------------------------------------------------------


def configure_audit(parser: argparse.ArgumentParser) -> None:
    """Add ``audit``'s arguments."""
    parser.add_argument("--journal", default="taskfarm.db", help="the journal (read-only)")
    parser.add_argument("--job", help="only this job")
    parser.add_argument("--node", help="only this node")
    parser.add_argument("--client", help="only this client's jobs")
    parser.add_argument("--since", metavar="ISO-TIME", help="only from this time (with offset)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_audit)


async def _audit(args: argparse.Namespace) -> int:
    from actors import ENGINE_CODEC
    from persistence import EventCodec, open_sqlite_journal
    from runtime import SystemClock

    from ._audit import AuditProjection
    from ._events import RENDER_CODEC
    from ._views import format_audit

    since = _since(args.since)
    path = Path(args.journal)
    if not await anyio.Path(path).is_file():
        raise ConfigurationError(f"no journal at {path}", where="--journal")
    codec = EventCodec(keep_undecodable=True)
    codec.update(ENGINE_CODEC)
    codec.update(RENDER_CODEC)
    projection = AuditProjection()
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=codec, read_only=True
    ) as journal:
        async for batch in journal.read_all():
            projection.feed(batch)
    if args.job is not None and args.job not in projection.jobs:
        raise ConfigurationError(f"no job {args.job!r} in {path}", where="--job")
    entries = projection.select(job=args.job, node=args.node, client=args.client, since=since)
    figures = projection.metrics()
    if args.job is not None:
        figures["job"] = projection.job_figures(args.job)
    if args.json:
        _print_json({"entries": [e.as_dict() for e in entries], "figures": figures})
    else:
        print(format_audit(entries, figures))
    return 0


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"expected an ISO time like 2026-03-02T09:00:00+00:00, got {text!r}", where="--since"
        ) from None
    if moment.tzinfo is None:
        raise ConfigurationError("give a UTC offset (or Z)", where="--since")
    return moment
