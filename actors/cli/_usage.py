"""``taskfarm usage``: what the farm, a node or a job measurably used (role ``read``).

Shows the latest sample of each connected node and of each job with running attempts, then a
series per minute (while minutes are kept, a day by default) or per hour: CPU (seconds, and
cores on average), the largest resident memory, I/O, and the hosts' load, available memory and
free scratch.  ``--json`` prints the coordinator's answer as JSON.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

import msgspec

from actors.cluster import UsageReply, UsageRequest
from actors.engine import format_size
from runtime import ConfigurationError

from ._client import add_client_arguments, open_client, reply_of, request
from ._parsing import RelativeTime, parse_time

__all__ = ["configure", "format_usage", "parse_duration", "parse_since"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``usage``'s arguments."""
    parser.add_argument("--node", help="one node's usage (its host, and the jobs it ran)")
    parser.add_argument("--job", help="one job's usage (over every node it ran on)")
    parser.add_argument(
        "--since",
        metavar="T",
        help="from when: a time ago (30m, 6h, 2d) or an ISO-8601 time (default: 1h)",
    )
    parser.add_argument(
        "--resolution",
        choices=("auto", "minute", "hour"),
        default="auto",
        help="per minute or per hour (default: minutes while they are kept, else hours)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_client_arguments(parser)
    parser.set_defaults(handler=_usage)


def parse_since(text: str, *, now: datetime) -> datetime:
    """Parse ``--since``: a duration ago (``30m``, ``6h``, ``1d``, ``1h30m``) or a time.

    Raises:
        ConfigurationError: neither form (``where`` is ``--since``), or a time after ``now``.
    """
    value = text.strip()
    moment: datetime
    if value and value[0].isdigit() and value[-1] in "smhd":
        relative = parse_time(f"+{value}", where="--since")
        assert isinstance(relative, RelativeTime)
        moment = now - timedelta(seconds=float(relative))
    else:
        wrong = ConfigurationError(
            f"expected a time ago (30m, 6h, 2d) or an ISO-8601 time (2026-03-14T18:00:00Z), "
            f"got {text!r}",
            where="--since",
        )
        try:
            absolute = parse_time(value, where="--since")
        except ConfigurationError:
            raise wrong from None
        if isinstance(absolute, RelativeTime):
            raise wrong
        moment = absolute
    if moment > now:
        raise ConfigurationError(f"{text!r} is in the future", where="--since")
    return moment


def parse_duration(text: str, *, where: str) -> float:
    """Parse a duration (``90m``, ``36h``, ``1d``, ``365d``; at most 366 days) into seconds.

    Raises:
        ConfigurationError: not a duration, zero, or longer than 366 days (``where`` names the
            flag).
    """
    value = text.strip()
    if not (value[:1].isdigit() and value[-1:] in ("s", "m", "h", "d")):
        raise ConfigurationError(
            f"expected a duration such as 90m, 36h or 30d, got {text!r}", where=where
        )
    relative = parse_time(f"+{value}", where=where)
    assert isinstance(relative, RelativeTime)
    return float(relative)


async def _usage(args: argparse.Namespace) -> int:
    since = parse_since(args.since, now=datetime.now(UTC)) if args.since else None
    message = UsageRequest(node=args.node, job=args.job, since=since, resolution=args.resolution)
    async with open_client(args) as connection:
        reply = reply_of(await request(connection, message), UsageReply)
    if args.json:
        plain = msgspec.to_builtins(reply)
        plain.pop("type", None)
        sys.stdout.write(msgspec.json.encode(plain).decode() + "\n")
    else:
        print(format_usage(reply))
    return 0


def format_usage(reply: UsageReply) -> str:
    """Render a usage answer as tables."""
    lines: list[str] = []
    if reply.nodes:
        lines.append(
            f"{'NODE':<20} {'LOAD':>6} {'MEM AVAIL':>10} {'SCRATCH':>10} {'ATTEMPTS':>8} "
            f"{'RSS':>10} {'CORES':>6}"
        )
        lines.extend(
            f"{node.node:<20} {node.load:>6.2f} {format_size(node.memory_available):>10} "
            f"{format_size(node.scratch_free):>10} {node.attempts:>8} "
            f"{format_size(node.rss):>10} {node.cpu_cores:>6.2f}"
            for node in reply.nodes
        )
        lines.append("")
    if reply.jobs:
        lines.append(
            f"{'JOB':<24} {'ATTEMPTS':>8} {'CPU S':>10} {'RSS':>10} {'PEAK RSS':>10} "
            f"{'CORES':>6}  NODES"
        )
        lines.extend(
            f"{job.job_id:<24} {job.attempts:>8} {job.cpu_s:>10.1f} "
            f"{format_size(job.rss):>10} {format_size(job.peak_rss):>10} "
            f"{job.cpu_cores:>6.2f}  {','.join(job.nodes)}"
            for job in reply.jobs
        )
        lines.append("")
    since = reply.since.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    lines.append(f"per {reply.resolution} since {since} UTC:")
    if not reply.points:
        lines.append("  no samples")
    else:
        lines.append(
            f"{'AT (UTC)':<17} {'CPU S':>9} {'CORES':>6} {'RSS MAX':>10} {'READ':>9} "
            f"{'WRITTEN':>9} {'LOAD':>6} {'MEM AVAIL':>10} {'SCRATCH':>10}"
        )
        lines.extend(
            f"{point.at.astimezone(UTC).strftime('%Y-%m-%d %H:%M'):<17} "
            f"{point.cpu_s:>9.1f} {point.cpu_cores:>6.2f} "
            f"{format_size(point.rss_max):>10} {format_size(point.read_bytes):>9} "
            f"{format_size(point.write_bytes):>9} {point.load_max:>6.2f} "
            f"{format_size(point.memory_available_min):>10} "
            f"{format_size(point.scratch_free_min):>10}"
            for point in reply.points
        )
    return "\n".join(lines)
