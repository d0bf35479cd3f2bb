"""The coordinator and client commands: ``serve``, ``submit``, ``status``, ``cancel``,
``nodes``, ``why``, ``logs`` (the operator verbs are in ``_verbs``).

Clients talk to the coordinator over the same authenticated protocol as agents, with the role
``client``.  The address and token default to ``$TASKFARM_COORDINATOR`` (``127.0.0.1:7717``)
and ``$TASKFARM_TOKEN_FILE`` (``taskfarm.token``), so that after ``taskfarm serve`` in a folder
the other commands work from the same folder without flags; an error in a value that came from
the environment blames the variable, not the flag.

Every error is one line and an exit status (see ``runtime.cli``): 2 for input at fault (a flag,
a file, a spec, a job or task that does not exist), 1 when the farm refused or failed (a job
that already finished cannot be cancelled; the coordinator did not answer).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec

from actors.cluster import (
    WAKE_PLACEHOLDERS,
    CancelJobRequest,
    CoordinatorConfig,
    JobsReply,
    ListNodesRequest,
    LogsRequest,
    NodesReply,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
    TelemetrySettings,
    TextReply,
    WhyRequest,
    WireMessage,
    parse_command,
    run_coordinator,
)
from actors.engine import EngineSettings, read_spec_text
from runtime import (
    ConfigurationError,
    Connection,
    TaskfarmError,
    get_logger,
    tune_gc_for_many_objects,
)

from ._client import (
    DEFAULT_ADDRESS,
    DEFAULT_TOKEN_FILE,
    RequestError,
    add_client_arguments,
    blaming,
    ensure_token_file,
    open_client,
    parse_address,
    reply_of,
    request,
    setting,
    tls_config,
)
from ._format import FINISHED, EtaEstimator, format_jobs, format_nodes, jobs_json, watch_counts
from ._parsing import parse_counters
from ._policies import load_event_codecs, load_policy
from ._security import add_serve_security_arguments, serve_security
from ._usage import parse_duration

__all__ = [
    "AlreadyFinishedError",
    "RequestError",
    "configure_cancel",
    "configure_logs",
    "configure_nodes",
    "configure_serve",
    "configure_status",
    "configure_submit",
    "configure_why",
    "ensure_token_file",
    "format_jobs",
    "parse_address",
    "request",
    "setting",
    "watch_jobs",
]

_log = get_logger("actors.cli")


class AlreadyFinishedError(TaskfarmError):
    """Raised when ``cancel`` names a job that had already finished (nothing was cancelled);
    ``job_id`` and ``status`` say which and how it ended."""

    exit_status = 1

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} already {status}: nothing to cancel")


# -- serve ----------------------------------------------------------------------------------------


def configure_serve(parser: argparse.ArgumentParser) -> None:
    """Add ``serve``'s arguments."""
    parser.add_argument("--journal", default="taskfarm.db", help="the SQLite journal (created)")
    parser.add_argument(
        "--init",
        action="store_true",
        help="initialise --journal if it exists but is empty (zero bytes); without it an "
        "empty file is refused",
    )
    parser.add_argument("--listen", default=DEFAULT_ADDRESS, metavar="HOST:PORT")
    parser.add_argument(
        "--token-file",
        help="the shared secret (created, mode 600, if missing; default: $TASKFARM_TOKEN_FILE "
        "or ./taskfarm.token)",
    )
    parser.add_argument(
        "--local-agents",
        type=int,
        default=0,
        metavar="N",
        help=f"start N agents here (at most {_MAX_LOCAL_AGENTS})",
    )
    parser.add_argument("--work-dir", default="taskfarm-work", help="local agents' folders")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="an agent silent this long is disconnected and its node shown unreachable, "
        "with no new work (default: 5; agents heartbeat every S/5 s, at least 0.2 s)",
    )
    parser.add_argument(
        "--restart-grace",
        type=float,
        default=10.0,
        metavar="S",
        help="after a restart, how long agents have to re-claim running work before it is "
        "requeued (default: 10, raised to the fence if that is longer)",
    )
    parser.add_argument(
        "--lease",
        type=float,
        metavar="S",
        help="an agent that has not heard from this coordinator for S s asks its attempts to "
        "checkpoint and stops them within S/2 s, reporting them lost (default: twice "
        "--heartbeat-timeout, 10)",
    )
    parser.add_argument(
        "--fence",
        type=float,
        metavar="S",
        help="a silent agent's attempts are requeued S s after its last message, once they "
        "are surely stopped (default: lease + lease/2 + max(2, lease/5), 17.5; at least "
        "lease + lease/2 + 1)",
    )
    parser.add_argument(
        "--policy",
        default="fifo",
        metavar="NAME",
        help="the scheduling policy, a taskfarm.policies plugin (default: fifo; the engine "
        "also has priority-preemption)",
    )
    parser.add_argument(
        "--policy-config", metavar="FILE.toml", help="the policy's configuration file"
    )
    parser.add_argument(
        "--wake-command",
        metavar="CMD",
        help="run CMD (split like a shell line, no shell) to wake a sleeping node whose agent "
        "is away when its health leaves sleeping (a policy's wake, `node resume`); {node}, "
        "{mac} (its mac= label) and {address} (the host its agent last connected from) are "
        'filled in, e.g. "wakeonlan {mac}"',
    )
    parser.add_argument(
        "--counter",
        dest="counters",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a farm-wide licence counter, e.g. nuke=10: at most N units in use across every "
        "node (repeatable; counters not named here are node-local: agent --counter)",
    )
    parser.add_argument(
        "--keep-usage-minutes",
        default="1d",
        metavar="DURATION",
        help="how long measured usage is kept per minute (default: 1d; then per hour only)",
    )
    parser.add_argument(
        "--keep-usage-hours",
        default="365d",
        metavar="DURATION",
        help="how long measured usage is kept per hour (default: 365d, the most)",
    )
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    parser.add_argument("--tls-ca", help="CA that signs agent/client certificates (mutual TLS)")
    parser.add_argument("--tls-cert", help="the coordinator's certificate")
    parser.add_argument("--tls-key", help="the key of --tls-cert")
    add_serve_security_arguments(parser)
    parser.set_defaults(handler=_serve)


_MAX_LOCAL_AGENTS = 256  # processes on this host: more is a typo, not a farm
_MAX_SECONDS = 86_400.0  # a heartbeat timeout or restart grace of more than a day is a typo


def _seconds(value: float, *, where: str, allow_zero: bool) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= _MAX_SECONDS):
        low = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"expected seconds {low} and at most {_MAX_SECONDS:g}, got {value:g}", where=where
        )
    return value


def _telemetry_settings(args: argparse.Namespace) -> TelemetrySettings:
    minutes = parse_duration(args.keep_usage_minutes, where="--keep-usage-minutes")
    hours = parse_duration(args.keep_usage_hours, where="--keep-usage-hours")
    if minutes < 60:
        raise ConfigurationError("must be at least 1m", where="--keep-usage-minutes")
    if hours < minutes:
        raise ConfigurationError(
            "must be at least --keep-usage-minutes (hours are rolled up from minutes)",
            where="--keep-usage-hours",
        )
    return TelemetrySettings(minute_retention=minutes, hour_retention=hours)


def _work_dir(path: str) -> Path:
    work_dir = Path(path)
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigurationError(f"{work_dir} is not a directory", where="--work-dir")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create {work_dir}: {error.strerror or error}", where="--work-dir"
        ) from None
    return work_dir


async def _serve(args: argparse.Namespace) -> int:
    tune_gc_for_many_objects()
    host, port = parse_address(args.listen, where="--listen")
    if not 0 <= args.local_agents <= _MAX_LOCAL_AGENTS:
        raise ConfigurationError(
            f"expected 0 to {_MAX_LOCAL_AGENTS}, got {args.local_agents}", where="--local-agents"
        )
    _seconds(args.heartbeat_timeout, where="--heartbeat-timeout", allow_zero=False)
    _seconds(args.restart_grace, where="--restart-grace", allow_zero=True)
    journal = Path(args.journal)
    counters = parse_counters(args.counters)
    policy = load_policy(args.policy, Path(args.policy_config) if args.policy_config else None)
    events = load_event_codecs()
    wake_command = (
        parse_command(args.wake_command, where="--wake-command", placeholders=WAKE_PLACEHOLDERS)
        if args.wake_command is not None
        else ()
    )
    work_dir = _work_dir(args.work_dir)
    telemetry = _telemetry_settings(args)
    join_token, join_client_role, client_idle = serve_security(args)
    token_file: Path | None = None
    token: bytes | None = None
    if join_token:
        token_path, blame = setting(
            args.token_file,
            flag="--token-file",
            variable="TASKFARM_TOKEN_FILE",
            default=DEFAULT_TOKEN_FILE,
        )
        token_file, token = blaming(blame, lambda: ensure_token_file(token_path))
    config = CoordinatorConfig(
        journal=journal,
        init_journal=args.init,
        token=token,
        join_client_role=join_client_role,
        client_idle_timeout=client_idle,
        host=host,
        port=port,
        tls=tls_config(args, server=True),
        work_dir=work_dir,
        local_agents=args.local_agents,
        wake_command=wake_command,
        token_file=token_file,
        heartbeat_interval=max(0.2, args.heartbeat_timeout / 5),
        heartbeat_timeout=args.heartbeat_timeout,
        lease=args.lease,
        fence=args.fence,
        synchronous=args.synchronous,
        settings=EngineSettings(restart_grace=args.restart_grace, counters=counters),
        events=events,
        telemetry=telemetry,
    )
    async with anyio.create_task_group() as tg:
        coordinator = await tg.start(partial(run_coordinator, config, policy=policy))
        print(
            f"taskfarm coordinator on {host}:{coordinator.port}, journal {config.journal}, "
            f"token {token_file or 'off'}, policy {policy.name}",
            flush=True,
        )
        recovery = coordinator.engine.recovery
        if recovery.jobs or recovery.nodes:
            orphans = f", {recovery.orphans} orphaned job(s) ended" if recovery.orphans else ""
            print(
                f"recovered {recovery.jobs} job(s) ({recovery.unfinished} unfinished), "
                f"{recovery.in_doubt} attempt(s) in doubt (their agents have "
                f"{args.restart_grace:g} s to re-claim them), {recovery.nodes} node(s)"
                f"{orphans} from {config.journal}",
                flush=True,
            )
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break
    return 0


# -- the client commands -------------------------------------------------------------------


def configure_submit(parser: argparse.ArgumentParser) -> None:
    """Add ``submit``'s arguments."""
    parser.add_argument("spec", help="a TOML or JSON job spec file")
    add_client_arguments(parser)
    parser.set_defaults(handler=_submit)


async def _submit(args: argparse.Namespace) -> int:
    path = Path(args.spec)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigurationError(f"{path}: a spec file ends in .toml or .json", where="SPEC")
    # Read (bounded, UTF-8 checked) before connecting: a bad file is named, the farm untouched.
    text = await anyio.to_thread.run_sync(read_spec_text, path)
    async with open_client(args) as connection:
        reply = await request(
            connection, SubmitRequest(text=text, format=suffix[1:], source=str(path))
        )
    for job_id in reply_of(reply, SubmittedReply).job_ids:
        print(job_id)
    return 0


def configure_status(parser: argparse.ArgumentParser) -> None:
    """Add ``status``'s arguments."""
    parser.add_argument("job", nargs="?", help="one job, with its tasks (default: all jobs)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--tasks",
        action="store_true",
        help="with no JOB: include every job's tasks (and metric series) too",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="live progress: running, pending and blocked counts and an ETA, until done",
    )
    add_client_arguments(parser)
    parser.set_defaults(handler=_status)


async def _status(args: argparse.Namespace) -> int:
    with_tasks = args.job is not None or args.tasks
    async with open_client(args) as connection:
        if args.watch:
            await watch_jobs(connection, args.job)
            return 0
        reply = reply_of(
            await request(connection, StatusRequest(job_id=args.job, tasks=args.tasks)),
            JobsReply,
        )
    if args.json:
        data = jobs_json(reply.jobs, as_of=reply.as_of, with_tasks=with_tasks, usage=reply.usage)
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    else:
        print(format_jobs(reply.jobs, as_of=reply.as_of))
    return 0


async def watch_jobs(
    connection: Connection[WireMessage], job_id: str | None, *, interval: float = 0.5
) -> None:
    """Show each job's progress with its running, pending and blocked counts and an ETA
    until every watched job has finished: live bars (rich) on a terminal, else one line per
    job whenever it changes (for a log or a pipe)."""
    eta = EtaEstimator()
    if not sys.stdout.isatty():
        shown: dict[str, str] = {}
        while True:
            reply = reply_of(await request(connection, StatusRequest(job_id=job_id)), JobsReply)
            for job in reply.jobs:
                line = (
                    f"{job.job_id} {job.status} {job.progress:.0%}  {watch_counts(job)}  "
                    f"{eta.describe(job, reply.as_of)}"
                )
                if shown.get(job.job_id) != line:
                    shown[job.job_id] = line
                    print(line, flush=True)
            if all(job.status in FINISHED for job in reply.jobs):
                return
            await anyio.sleep(interval)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[status]:<10}"),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, refresh_per_second=4) as progress:
        bars: dict[str, Any] = {}
        while True:
            reply = reply_of(await request(connection, StatusRequest(job_id=job_id)), JobsReply)
            for job in reply.jobs:
                status = job.status
                counts = watch_counts(job)
                left = eta.describe(job, reply.as_of)
                if job.job_id not in bars:
                    bars[job.job_id] = progress.add_task(
                        job.job_id, total=100, status=status, counts=counts, eta=left
                    )
                progress.update(
                    bars[job.job_id],
                    completed=job.progress * 100,
                    status=status,
                    counts=counts,
                    eta=left,
                )
            if all(job.status in FINISHED for job in reply.jobs):
                return
            await anyio.sleep(interval)


def configure_cancel(parser: argparse.ArgumentParser) -> None:
    """Add ``cancel``'s arguments."""
    parser.add_argument("job")
    parser.add_argument(
        "--reason",
        default="",
        help='default: "cancelled by NAME", NAME the client credential (token: user)',
    )
    add_client_arguments(parser)
    parser.set_defaults(handler=_cancel)


async def _cancel(args: argparse.Namespace) -> int:
    async with open_client(args) as connection:
        reply = await request(connection, CancelJobRequest(job_id=args.job, reason=args.reason))
    (job,) = reply_of(reply, JobsReply).jobs
    # A finished job's summary comes back unchanged: say that nothing was cancelled.  (One
    # cancelled before stays "cancelled": cancelling is idempotent.)
    if job.status in ("completed", "failed"):
        raise AlreadyFinishedError(job.job_id, job.status)
    print(format_jobs((job,)))
    return 0


def configure_nodes(parser: argparse.ArgumentParser) -> None:
    """Add ``nodes``'s arguments."""
    parser.add_argument("--json", action="store_true")
    add_client_arguments(parser)
    parser.set_defaults(handler=_nodes)


async def _nodes(args: argparse.Namespace) -> int:
    async with open_client(args) as connection:
        reply = reply_of(await request(connection, ListNodesRequest()), NodesReply)
    if args.json:
        sys.stdout.write(msgspec.json.encode(reply.nodes).decode() + "\n")
    else:
        print(format_nodes(reply.nodes))
    return 0


def configure_why(parser: argparse.ArgumentParser) -> None:
    """Add ``why``'s arguments."""
    parser.add_argument("job")
    add_client_arguments(parser)
    parser.set_defaults(handler=_why)


async def _why(args: argparse.Namespace) -> int:
    async with open_client(args) as connection:
        reply = await request(connection, WhyRequest(job_id=args.job))
    print(reply_of(reply, TextReply).text)
    return 0


def configure_logs(parser: argparse.ArgumentParser) -> None:
    """Add ``logs``'s arguments."""
    parser.add_argument("job")
    parser.add_argument(
        "task", nargs="?", help="a task's name (stage-2, a chunk 11-20) or index (default: all)"
    )
    parser.add_argument(
        "--attempt",
        type=int,
        help="which attempt (default: the latest); any attempt that ran, cancelled ones too",
    )
    add_client_arguments(parser)
    parser.set_defaults(handler=_logs)


async def _logs(args: argparse.Namespace) -> int:
    task: str | None = args.task
    if task is not None and (not task.strip() or task.startswith("-")):
        raise ConfigurationError(
            f"a task is a name or an index of 0 or more, got {task!r}", where="TASK"
        )
    if args.attempt is not None and args.attempt < 1:
        raise ConfigurationError(
            f"attempts are numbered from 1, got {args.attempt}", where="--attempt"
        )
    if args.attempt is not None and task is None:
        raise ConfigurationError("--attempt needs a TASK", where="--attempt")
    async with open_client(args) as connection:
        reply = await request(
            connection, LogsRequest(job_id=args.job, task=task, attempt=args.attempt)
        )
    print(reply_of(reply, TextReply).text)
    return 0
