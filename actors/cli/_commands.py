"""The coordinator and client commands: ``serve``, ``submit``, ``status``, ``cancel``,
``nodes``, ``why``, ``logs``.

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
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from actors.cluster import (
    WIRE_CODEC,
    CancelJobRequest,
    ClientRequest,
    CoordinatorConfig,
    ErrorReply,
    JobsReply,
    ListNodesRequest,
    LogsRequest,
    NodesReply,
    Reply,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
    TextReply,
    WhyRequest,
    WireMessage,
    run_coordinator,
)
from actors.engine import EngineSettings, JobSummary, format_size, read_spec_text
from runtime import (
    ConfigurationError,
    Connection,
    TaskfarmError,
    TLSConfig,
    create_token_file,
    load_token,
    open_connection,
    tune_gc_for_many_objects,
)

from ._security import (
    add_client_credential_argument,
    add_serve_security_arguments,
    client_credential,
    serve_security,
)

__all__ = [
    "configure_cancel",
    "configure_logs",
    "configure_nodes",
    "configure_serve",
    "configure_status",
    "configure_submit",
    "configure_why",
    "ensure_token_file",
    "parse_address",
    "setting",
]

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:7717"
DEFAULT_TOKEN_FILE = "taskfarm.token"


# What the coordinator's refusals mean for the exit status: these kinds blame the request.
_INPUT_ERRORS = frozenset(
    {
        "AccessDeniedError",
        "ConfigurationError",
        "DependencyCycleError",
        "DependencyError",
        "JobNotFoundError",
        "ResourceError",
        "SpecError",
        "TaskNotFoundError",
        "UnknownDependencyError",
    }
)
_REPLY_TIMEOUT = 60.0  # seconds for one reply (a submission of a large spec included)


class RequestError(TaskfarmError):
    """Raised when the coordinator refuses a request (the message says why); ``kind`` is the
    coordinator's error class, and the exit status is 2 when it blames the request, else 1."""

    def __init__(self, message: str, *, kind: str = "") -> None:
        self.kind = kind
        self.exit_status = 2 if kind in _INPUT_ERRORS else 1
        super().__init__(message)


class AlreadyFinishedError(TaskfarmError):
    """Raised when ``cancel`` names a job that had already finished (nothing was cancelled);
    ``job_id`` and ``status`` say which and how it ended."""

    exit_status = 1

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} already {status}: nothing to cancel")


def setting(value: str | None, *, flag: str, variable: str, default: str) -> tuple[str, str]:
    """Return a client setting and what to blame if it is wrong: the flag when given, else
    the environment variable when set, else the flag (whose default it is)."""
    if value is not None:
        return value, flag
    from_environment = os.environ.get(variable)
    if from_environment is not None:
        return from_environment, f"${variable} (environment)"
    return default, flag


def parse_address(text: str, *, where: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` too).

    Raises:
        ConfigurationError: not HOST:PORT, or the port is not 0-65535; ``where`` names the flag.
    """
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigurationError(f"expected HOST:PORT, got {text!r}", where=where)
    return host, int(port_text)


def ensure_token_file(path: str | Path) -> tuple[Path, bytes]:
    """Return the token file's absolute path and its token, creating it (mode 600) if missing."""
    absolute = Path(os.path.abspath(path))
    return absolute, load_token(absolute) if absolute.is_file() else create_token_file(absolute)


def _tls(args: argparse.Namespace, *, server: bool) -> TLSConfig | None:
    ca, cert, key = args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if not (ca or cert or key):
        return None
    if server and not (cert and key):
        raise ConfigurationError(
            "a TLS server needs both --tls-cert and --tls-key", where="--tls-cert"
        )
    for flag, value in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if value and not Path(value).is_file():
            raise ConfigurationError(f"no such file: {value}", where=flag)
    return TLSConfig(cafile=ca, certfile=cert, keyfile=key)


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
    work_dir = _work_dir(args.work_dir)
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
        token_file, token = _blaming(blame, lambda: ensure_token_file(token_path))
    config = CoordinatorConfig(
        journal=journal,
        init_journal=args.init,
        token=token,
        join_client_role=join_client_role,
        client_idle_timeout=client_idle,
        host=host,
        port=port,
        tls=_tls(args, server=True),
        work_dir=work_dir,
        local_agents=args.local_agents,
        token_file=token_file,
        heartbeat_interval=max(0.2, args.heartbeat_timeout / 5),
        heartbeat_timeout=args.heartbeat_timeout,
        lease=args.lease,
        fence=args.fence,
        synchronous=args.synchronous,
        settings=EngineSettings(restart_grace=args.restart_grace),
    )
    async with anyio.create_task_group() as tg:
        coordinator = await tg.start(run_coordinator, config)
        print(
            f"taskfarm coordinator on {host}:{coordinator.port}, journal {config.journal}, "
            f"token {token_file or 'off'}",
            flush=True,
        )
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break
    return 0


# -- the client -----------------------------------------------------------------------------------


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    # No argparse defaults: resolved in ``_client``, which knows what to blame for an error.
    parser.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="the coordinator (default: $TASKFARM_COORDINATOR or 127.0.0.1:7717)",
    )
    parser.add_argument(
        "--token-file",
        help="the shared secret (default: $TASKFARM_TOKEN_FILE or ./taskfarm.token)",
    )
    add_client_credential_argument(parser)
    parser.add_argument("--tls-ca", help="CA certificate to verify the coordinator")
    parser.add_argument("--tls-cert", help="this client's certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="the key of --tls-cert")


@asynccontextmanager
async def _client(args: argparse.Namespace) -> AsyncIterator[Connection[WireMessage]]:
    address, blame = setting(
        args.connect, flag="--connect", variable="TASKFARM_COORDINATOR", default=DEFAULT_ADDRESS
    )
    host, port = parse_address(address, where=blame)
    token: bytes | None = None
    credential = client_credential(args)
    if credential is None:
        token_file, blame = setting(
            args.token_file,
            flag="--token-file",
            variable="TASKFARM_TOKEN_FILE",
            default=DEFAULT_TOKEN_FILE,
        )
        token = _blaming(blame, lambda: load_token(token_file))
    async with open_connection(
        host,
        port,
        codec=WIRE_CODEC,
        token=token,
        credential=credential,
        name="cli",
        role="client",
        tls=_tls(args, server=False),
    ) as connection:
        yield connection


def _blaming(blame: str, load: Callable[[], T]) -> T:
    """Run ``load``; a ConfigurationError from it also names where the value came from."""
    try:
        return load()
    except ConfigurationError as error:
        if blame.startswith("--"):
            raise
        raise ConfigurationError(str(error), where=blame) from None


async def request(connection: Connection[WireMessage], message: ClientRequest) -> Reply:
    """Send one request and return its reply.

    Raises:
        RequestError: the coordinator refused it (the message says why), or did not answer
            within a minute.
    """
    await connection.send(message)
    with anyio.move_on_after(_REPLY_TIMEOUT):
        reply = await connection.receive()
        if isinstance(reply, ErrorReply):
            raise RequestError(reply.error, kind=reply.kind)
        return reply  # type: ignore[return-value]
    raise RequestError(
        f"the coordinator at {connection.peer} did not answer within {_REPLY_TIMEOUT:g} s"
    )


def configure_submit(parser: argparse.ArgumentParser) -> None:
    """Add ``submit``'s arguments."""
    parser.add_argument("spec", help="a TOML or JSON job spec file")
    _add_client_arguments(parser)
    parser.set_defaults(handler=_submit)


async def _submit(args: argparse.Namespace) -> int:
    path = Path(args.spec)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigurationError(f"{path}: a spec file ends in .toml or .json", where="SPEC")
    # Read (bounded, UTF-8 checked) before connecting: a bad file is named, the farm untouched.
    text = await anyio.to_thread.run_sync(read_spec_text, path)
    async with _client(args) as connection:
        reply = await request(
            connection, SubmitRequest(text=text, format=suffix[1:], source=str(path))
        )
    assert isinstance(reply, SubmittedReply)
    for job_id in reply.job_ids:
        print(job_id)
    return 0


def configure_status(parser: argparse.ArgumentParser) -> None:
    """Add ``status``'s arguments."""
    parser.add_argument("job", nargs="?", help="one job (default: all)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", action="store_true", help="live progress bars until done")
    _add_client_arguments(parser)
    parser.set_defaults(handler=_status)


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as connection:
        if args.watch:
            await watch_jobs(connection, args.job)
            return 0
        reply = await request(connection, StatusRequest(job_id=args.job))
    assert isinstance(reply, JobsReply)
    if args.json:
        sys.stdout.write(msgspec.json.encode(reply.jobs).decode() + "\n")
    else:
        print(format_jobs(reply.jobs))
    return 0


def format_jobs(jobs: tuple[JobSummary, ...] | list[JobSummary]) -> str:
    """Render job summaries as a table (and a job's tasks, when present)."""
    lines = [f"{'JOB':<24} {'STATUS':<11} {'PRIORITY':<9} {'PROGRESS':>8}  TASKS"]
    for job in jobs:
        counts = " ".join(f"{k}={v}" for k, v in sorted(job.task_counts.items()))
        lines.append(
            f"{job.job_id:<24} {job.status:<11} {job.priority:<9} {job.progress:>7.0%}  {counts}"
        )
        if job.reason:
            lines.append(f"    reason: {job.reason}")
        lines.extend(
            f"    task {task.index:>4} {task.status:<10} attempt {task.attempt} "
            f"{task.progress:>5.0%} {task.node or '-'}"
            + (f"  {task.last_error}" if task.last_error else "")
            for task in job.tasks
        )
    return "\n".join(lines)


async def watch_jobs(connection: Connection[WireMessage], job_id: str | None) -> None:
    """Show live progress bars (rich) until every watched job has finished."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[status]:<10}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, refresh_per_second=4) as progress:
        bars: dict[str, Any] = {}
        while True:
            reply = await request(connection, StatusRequest(job_id=job_id))
            assert isinstance(reply, JobsReply)
            for job in reply.jobs:
                if job.job_id not in bars:
                    bars[job.job_id] = progress.add_task(job.name, total=100, status=job.status)
                progress.update(bars[job.job_id], completed=job.progress * 100, status=job.status)
            if all(job.status in ("completed", "failed", "cancelled") for job in reply.jobs):
                return
            await anyio.sleep(0.5)


def configure_cancel(parser: argparse.ArgumentParser) -> None:
    """Add ``cancel``'s arguments."""
    parser.add_argument("job")
    parser.add_argument("--reason", default="cancelled by user")
    _add_client_arguments(parser)
    parser.set_defaults(handler=_cancel)


async def _cancel(args: argparse.Namespace) -> int:
    async with _client(args) as connection:
        reply = await request(connection, CancelJobRequest(job_id=args.job, reason=args.reason))
    assert isinstance(reply, JobsReply)
    (job,) = reply.jobs
    # A finished job's summary comes back unchanged: say that nothing was cancelled.  (One
    # cancelled before stays "cancelled": cancelling is idempotent.)
    if job.status in ("completed", "failed"):
        raise AlreadyFinishedError(job.job_id, job.status)
    print(format_jobs(reply.jobs))
    return 0


def configure_nodes(parser: argparse.ArgumentParser) -> None:
    """Add ``nodes``'s arguments."""
    parser.add_argument("--json", action="store_true")
    _add_client_arguments(parser)
    parser.set_defaults(handler=_nodes)


async def _nodes(args: argparse.Namespace) -> int:
    async with _client(args) as connection:
        reply = await request(connection, ListNodesRequest())
    assert isinstance(reply, NodesReply)
    if args.json:
        sys.stdout.write(msgspec.json.encode(reply.nodes).decode() + "\n")
        return 0
    header = ("NODE", "HEALTH", "RUNNING", "CORES FREE", "MEMORY FREE")
    print(
        f"{header[0]:<20} {header[1]:<12} {header[2]:>7}  {header[3]:>12}  {header[4]:>18}  LABELS"
    )
    for node in reply.nodes:
        cores = f"{node.free.cores:g}/{node.capacity.cores:g}"
        memory = f"{format_size(node.free.memory)}/{format_size(node.capacity.memory)}"
        print(
            f"{node.name:<20} {node.health:<12} {node.running:>7}  {cores:>12}  {memory:>18}  "
            f"{','.join(node.labels)}"
        )
    return 0


def configure_why(parser: argparse.ArgumentParser) -> None:
    """Add ``why``'s arguments."""
    parser.add_argument("job")
    _add_client_arguments(parser)
    parser.set_defaults(handler=_why)


async def _why(args: argparse.Namespace) -> int:
    async with _client(args) as connection:
        reply = await request(connection, WhyRequest(job_id=args.job))
    assert isinstance(reply, TextReply)
    print(reply.text)
    return 0


def configure_logs(parser: argparse.ArgumentParser) -> None:
    """Add ``logs``'s arguments."""
    parser.add_argument("job")
    parser.add_argument("task", nargs="?", type=int)
    parser.add_argument("--attempt", type=int)
    _add_client_arguments(parser)
    parser.set_defaults(handler=_logs)


async def _logs(args: argparse.Namespace) -> int:
    if args.task is not None and args.task < 0:
        raise ConfigurationError(f"a task number is 0 or more, got {args.task}", where="TASK")
    if args.attempt is not None and args.attempt < 1:
        raise ConfigurationError(
            f"attempts are numbered from 1, got {args.attempt}", where="--attempt"
        )
    async with _client(args) as connection:
        reply = await request(
            connection, LogsRequest(job_id=args.job, task=args.task, attempt=args.attempt)
        )
    assert isinstance(reply, TextReply)
    print(reply.text)
    return 0
