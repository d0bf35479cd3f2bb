"""``taskfarm agent``: run a node agent that executes work for a coordinator.

Every argument is checked before anything connects, and an error names the flag at fault.
SIGTERM or SIGINT stops the agent gracefully (running attempts get SIGTERM, then SIGKILL after
the grace period); a second signal stops it at once.  A refused token ends the process with
status 2: retrying a wrong secret forever helps nobody.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import msgspec

from actors.cluster import (
    AgentConfig,
    AgentHandle,
    Allocation,
    check_label,
    default_name,
    detect_resources,
    load_agent_secret,
    parse_command,
    run_agent,
)
from actors.engine import Resources
from actors.executors import Executor
from runtime import (
    AuthenticationError,
    ConfigurationError,
    get_logger,
    load_credential,
    load_token,
    tune_gc_for_many_objects,
)

from ._parsing import parse_counters

__all__ = [
    "config_from_args",
    "configure",
    "main_with_executor",
    "run_agent_command",
]

_log = get_logger("actors.agent")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``agent`` command's arguments to ``parser`` and set its handler."""
    parser.add_argument(
        "--connect", required=True, metavar="HOST:PORT", help="the coordinator's address"
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the join token (the coordinator's token file; chmod 600)",
    )
    parser.add_argument(
        "--credential-file",
        metavar="FILE",
        help="this node's credential (taskfarm token issue --node NAME; chmod 600), "
        "instead of the join token",
    )
    parser.add_argument(
        "--name",
        metavar="N",
        help="the node name (default: the credential's name, else the host name)",
    )
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        default="taskfarm-agent",
        help="attempt logs, checkpoints and the report outbox (default: ./taskfarm-agent)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="keep tasks' checkpoints here, in DIR/JOB/TASK (shared storage such as NFS or "
        "Lustre lets another host resume them; default: WORK_DIR/checkpoints)",
    )
    parser.add_argument("--cores", metavar="N", help="cores to offer, e.g. 8 or 7500m (detected)")
    parser.add_argument("--memory", metavar="SIZE", help="memory to offer, e.g. 64GiB (detected)")
    parser.add_argument("--gpus", metavar="N", help="GPUs to offer (default: 0)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory of each GPU, e.g. 24GiB")
    parser.add_argument(
        "--scratch", metavar="SIZE", help="scratch disk to offer (default: free space of work dir)"
    )
    parser.add_argument(
        "--counter",
        dest="counters",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a node-local licence counter this host offers, e.g. houdini=2 (repeatable; "
        "farm-wide ones are serve --counter)",
    )
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="L",
        help="a node label for placement (repeatable)",
    )
    parser.add_argument(
        "--sleep-command",
        metavar="CMD",
        help="run CMD (split like a shell line, no shell) when the coordinator puts this node "
        'to sleep and nothing runs here, e.g. "systemctl suspend" (default: the node '
        "sleeps only logically)",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the coordinator")
    parser.add_argument("--tls-cert", metavar="FILE", help="this agent's certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert")
    parser.add_argument(
        "--heartbeat",
        metavar="S",
        help="heartbeat at least every S seconds (default: the coordinator's interval, "
        "--heartbeat-timeout/5 of `taskfarm serve`: 1 s)",
    )
    parser.add_argument(
        "--lease",
        metavar="S",
        help="stop running attempts (asking them to checkpoint first) once the coordinator "
        "has not answered for S seconds; at most the coordinator's lease, which is the "
        "default (`taskfarm serve --lease`: twice its --heartbeat-timeout, 10 s)",
    )
    parser.add_argument(
        "--terminate-grace",
        metavar="S",
        default="10",
        help="seconds between SIGTERM and SIGKILL when stopping work (default: 10)",
    )
    parser.add_argument(
        "--sample-interval",
        metavar="S",
        default="10",
        help="measure the attempts' CPU, memory and I/O and the host's load, memory and "
        "scratch every S seconds and send them with a heartbeat (default: 10; 0: off)",
    )
    parser.add_argument(
        "--memory-limit-factor",
        metavar="F",
        default="0",
        help="stop an attempt whose resident memory exceeds F times its memory request, as "
        "oom (checked at each sample; default: 0, off)",
    )
    parser.epilog = (
        "Timing, set by the coordinator (`taskfarm serve`) unless capped here: the agent "
        "heartbeats every --heartbeat-timeout/5 s (1 s); the coordinator disconnects an agent "
        "silent for --heartbeat-timeout (5 s) and shows its node unreachable; the agent stops "
        "its attempts once unanswered for the lease (--lease, 10 s), within half a lease, and "
        "reports them lost; the coordinator requeues them after the fence (--fence, 17.5 s); "
        "after a coordinator restart, agents have --restart-grace (10 s, at least the fence) "
        "to re-claim what they run."
    )
    parser.set_defaults(handler=_run)


def _address(text: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if match is None:
        raise ConfigurationError(f"expected HOST:PORT, got {text!r}", where="--connect")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"port must be between 1 and 65535, got {port}", where="--connect")
    return host, port


def _seconds(text: str | None, *, where: str, allow_zero: bool = False) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(
            f"expected a number of seconds, got {text!r}", where=where
        ) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"must be {bound}, got {text!r}", where=where)
    return value


def _factor(text: str, *, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(f"expected a number, got {text!r}", where=where) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"must be >= 0 (0: off), got {text!r}", where=where)
    return value


def _readable(path: str | None, *, where: str) -> str | None:
    if path is not None and not os.path.isfile(path):
        raise ConfigurationError(f"file not found: {path}", where=where)
    return path


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Build and check the agent's configuration from parsed arguments.

    Raises:
        ConfigurationError: an argument is invalid; ``where`` names its flag.
    """
    host, port = _address(args.connect)
    if (args.token_file is None) == (args.credential_file is None):
        raise ConfigurationError(
            "give the join token (--token-file) or this node's credential (--credential-file)",
            where="--token-file",
        )
    # Read now, naming the file, rather than fail after connecting.
    credential = load_credential(args.credential_file) if args.credential_file else None
    if credential is None:
        load_token(args.token_file)
    name = args.name if args.name is not None else None
    if name is None:
        name = credential.name if credential is not None else default_name()
    if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,200}", name):
        raise ConfigurationError(
            f"{name!r} is not a valid node name (letters, digits and _.@:- only)", where="--name"
        )
    work_dir = Path(args.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigurationError(f"{work_dir} is not a directory", where="--work-dir")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create {work_dir}: {error.strerror}", where="--work-dir"
        ) from None
    checkpoint_dir: str | None = None
    if args.checkpoint_dir is not None:
        chosen = Path(args.checkpoint_dir)
        try:
            chosen.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigurationError(
                f"cannot create {chosen}: {error.strerror}", where="--checkpoint-dir"
            ) from None
        if not os.access(chosen, os.W_OK | os.X_OK):
            raise ConfigurationError(f"{chosen} is not writable", where="--checkpoint-dir")
        checkpoint_dir = str(chosen.resolve())
    gpus: int | None = None
    if args.gpus is not None:
        try:
            gpus = int(args.gpus)
        except ValueError:
            raise ConfigurationError(
                f"expected a whole number, got {args.gpus!r}", where="--gpus"
            ) from None
    capacity = detect_resources(
        work_dir,
        cores=args.cores,
        memory=args.memory,
        gpus=gpus,
        gpu_memory=args.gpu_memory,
        scratch=args.scratch,
    )
    counters = parse_counters(args.counters)
    if counters:
        # Built anew (not replaced): the constructor checks and canonicalises counters.
        fields = msgspec.structs.asdict(capacity)
        fields["counters"] = tuple(counters.items())
        capacity = Resources(**fields)
    labels = tuple(dict.fromkeys(check_label(label, where="--label") for label in args.labels))
    sleep_command = (
        parse_command(args.sleep_command, where="--sleep-command")
        if args.sleep_command is not None
        else ()
    )
    if args.tls_key is not None and args.tls_cert is None:
        raise ConfigurationError("--tls-key needs --tls-cert", where="--tls-key")
    if args.tls_cert is not None and args.tls_key is None:
        raise ConfigurationError("--tls-cert needs --tls-key", where="--tls-cert")
    grace = _seconds(args.terminate_grace, where="--terminate-grace", allow_zero=True)
    assert grace is not None
    interval = _seconds(args.sample_interval, where="--sample-interval", allow_zero=True)
    assert interval is not None
    factor = _factor(args.memory_limit_factor, where="--memory-limit-factor")
    config = AgentConfig(
        host=host,
        port=port,
        token_file=args.token_file or "",
        credential_file=args.credential_file,
        name=name,
        work_dir=str(work_dir.resolve()),
        checkpoint_dir=checkpoint_dir,
        capacity=capacity,
        labels=labels,
        sleep_command=sleep_command,
        tls_ca=_readable(args.tls_ca, where="--tls-ca"),
        tls_cert=_readable(args.tls_cert, where="--tls-cert"),
        tls_key=_readable(args.tls_key, where="--tls-key"),
        heartbeat=_seconds(args.heartbeat, where="--heartbeat"),
        lease=_seconds(args.lease, where="--lease"),
        terminate_grace=grace,
        sample_interval=interval,
        memory_limit_factor=factor,
    )
    load_agent_secret(config)  # a credential for another node or kind is named now
    tls = config.tls_config()
    if tls is not None:
        tls.client_context()  # a bad certificate or key is named now, not at the first connect
    return config


class _Started:
    """Receives the agent's handle from ``run_agent`` (a ``TaskStatus``)."""

    def __init__(self) -> None:
        self.handle: AgentHandle | None = None

    def started(self, value: AgentHandle | None = None) -> None:
        self.handle = value


def _watch_children_with_pidfds() -> None:
    """On Python 3.11, let asyncio wait for child processes through pidfds.

    The default watcher starts one thread per child process, which on an agent that starts a
    process per task is a large share of its cost; Python 3.12 uses pidfds by itself.
    """
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
    except (OSError, RuntimeError, NotImplementedError):
        pass  # an old kernel: keep the default


def main_with_executor(
    argv: list[str], open_executor: Callable[..., AbstractAsyncContextManager[Executor]]
) -> int:
    """Run ``taskfarm agent ARGV`` with another executor (for the engine benchmark)."""
    from runtime.cli import main

    _EXECUTOR_OVERRIDE.append(open_executor)
    return main(["agent", *argv])


# Set only by ``main_with_executor``, in a process of its own.
_EXECUTOR_OVERRIDE: list[Callable[..., AbstractAsyncContextManager[Executor]]] = []


async def run_agent_command(
    args: argparse.Namespace, *, allocation: Allocation | None = None
) -> int:
    """Run ``taskfarm agent`` with its parsed ``args``; ``allocation`` is the batch allocation
    it runs in, when it has a known end (``taskfarm slurm agent``)."""
    return await _run(args, allocation=allocation)


async def _run(args: argparse.Namespace, *, allocation: Allocation | None = None) -> int:
    config = config_from_args(args)
    open_executor = _EXECUTOR_OVERRIDE[-1] if _EXECUTOR_OVERRIDE else None
    tune_gc_for_many_objects()
    _watch_children_with_pidfds()
    failure: Exception | None = None
    status = _Started()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as task_group:

            async def agent_main() -> None:
                nonlocal failure
                try:
                    await run_agent(
                        config,
                        open_executor=open_executor,
                        allocation=allocation,
                        task_status=status,
                    )
                except Exception as error:
                    failure = error
                finally:
                    task_group.cancel_scope.cancel()

            task_group.start_soon(agent_main)
            stopping = False
            async for signum in signals:
                if stopping or status.handle is None:
                    _log.warning("agent_killed", node_id=config.name, signal=signum.name)
                    task_group.cancel_scope.cancel()
                    break
                _log.info("agent_stopping", node_id=config.name, signal=signum.name)
                stopping = True
                status.handle.stop()
    if isinstance(failure, AuthenticationError):
        print(
            f"taskfarm agent: error: the coordinator at {failure.peer} refused this agent "
            f"({failure.reason}); check that "
            + (
                f"--credential-file {args.credential_file} holds this node's credential"
                if args.credential_file
                else f"--token-file {args.token_file} holds the coordinator's join token"
            )
            + " (and the TLS options, if any)",
            file=sys.stderr,
        )
        return 2
    if failure is not None:
        raise failure
    return 0
