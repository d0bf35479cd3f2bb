"""``taskfarm slurm``: agents as Slurm pilot jobs.

- ``submit-agents`` writes a pilot job's sbatch script into the pilot folder (kept for the
  user to read, and to resubmit by hand) and submits it ``--count`` times;
- ``agent`` is what the script runs on every allocated node: ``taskfarm agent`` with its name,
  work folder, capacity and labels taken from the allocation, which knows when the allocation
  ends and drains itself before (see ``actors/cluster/_allocation.py``);
- ``status`` shows the pilot jobs (``squeue``) beside the agents they started (the
  coordinator's nodes labelled ``slurm-job=ID``);
- ``cancel`` ends pilot jobs (``scancel``); their agents stop and the coordinator requeues
  their work, which is lost, not failed.

Every argument is checked before Slurm is asked anything, and an error names the flag.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from actors.cluster import Allocation, ListNodesRequest, NodesReply, check_label
from actors.engine import NodeSummary, parse_duration
from actors.slurm import (
    DEFAULT_JOB_NAME,
    PilotJob,
    PilotSpec,
    SlurmJob,
    cancel_jobs,
    find_slurm_job,
    list_pilot_jobs,
    render_pilot_script,
    slurm_allocation,
    submit_script,
)
from runtime import ConfigurationError, TaskfarmError, WireError, load_token

from ._agent import configure as configure_agent
from ._agent import run_agent_command
from ._client import add_client_arguments, open_client, request

__all__ = ["configure"]

_MAX_COUNT = 1000  # pilot jobs in one submission: more is a typo
_JOB_ID = re.compile(r"\d+(?:_\d+)?")
JOB_LABEL = "slurm-job"  # agents of a pilot carry the label slurm-job=ID


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``slurm`` command's subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND", required=True)
    _configure_submit(
        sub.add_parser(
            "submit-agents",
            help="write a pilot job's sbatch script and submit it",
            description="Write an sbatch script that starts one taskfarm agent per allocated "
            "node, and submit it --count times.",
        )
    )
    _configure_agent(
        sub.add_parser(
            "agent",
            help="run a pilot's agent (what the sbatch script runs on every node)",
            description="Run a taskfarm agent inside a Slurm allocation: named after the job "
            "and the node, offering what the allocation gives, draining before its end.",
        )
    )
    _configure_status(
        sub.add_parser("status", help="show the pilot jobs and their agents side by side")
    )
    _configure_cancel(
        sub.add_parser("cancel", help="end pilot jobs (scancel); their work is requeued")
    )


# -- durations ------------------------------------------------------------------------------------


def _duration(text: str, *, where: str) -> float:
    """Return seconds from ``600`` or ``10m`` (``90s``, ``1h30m``)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text, what=where)
        except ValueError:
            raise ConfigurationError(
                f"expected seconds or a duration such as 10m, got {text!r}", where=where
            ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"must be >= 0, got {text!r}", where=where)
    return value


def _add_preparation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-warning",
        metavar="DURATION",
        default="10m",
        help="SIGUSR1 to checkpointable work this long before the allocation ends (default 10m)",
    )
    parser.add_argument(
        "--drain-margin",
        metavar="DURATION",
        default="2m",
        help="the node drains this long before the allocation ends: no work placed that "
        "cannot finish by then, and what runs then is checkpointed and requeued (default 2m)",
    )
    parser.add_argument(
        "--idle-timeout",
        metavar="DURATION",
        help="an agent that has run nothing for this long leaves, giving its allocation back "
        "(default: it stays until the end)",
    )


# -- submit-agents --------------------------------------------------------------------------------


def _configure_submit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", default="1", metavar="N", help="pilot jobs to submit")
    parser.add_argument("--partition", required=True, metavar="P", help="the Slurm partition")
    parser.add_argument(
        "--time", required=True, metavar="T", help="each pilot's time limit, e.g. 12:00:00"
    )
    parser.add_argument(
        "--nodes-per-job", default="1", metavar="K", help="nodes in each pilot job (default 1)"
    )
    parser.add_argument(
        "--cores", metavar="C", help="CPUs per node (--cpus-per-task; default: the partition's)"
    )
    parser.add_argument("--memory", metavar="M", help="memory per node, e.g. 64GiB (--mem)")
    parser.add_argument(
        "--sbatch-arg",
        dest="sbatch_args",
        action="append",
        default=[],
        metavar="ARG",
        help="another sbatch option, written as '--sbatch-arg=--account=physics' (repeatable)",
    )
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="a shell line to run before the agents, e.g. 'module load python' (repeatable)",
    )
    parser.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="the coordinator as the compute nodes reach it (default: $TASKFARM_COORDINATOR)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the join token, on a file system the compute nodes share",
    )
    parser.add_argument(
        "--credential-dir",
        metavar="DIR",
        help="node credentials instead of the join token: DIR/HOST.cred for each compute node",
    )
    parser.add_argument(
        "--pilot-dir",
        default="taskfarm-pilots",
        metavar="DIR",
        help="where the scripts, Slurm's output and the agents' work folders go, on a shared "
        "file system (default: ./taskfarm-pilots)",
    )
    parser.add_argument("--job-name", default=DEFAULT_JOB_NAME, help="the pilot jobs' name")
    parser.add_argument(
        "--name-prefix",
        default="pilot",
        help="agents are named PREFIX-JOBID-NODE (default: pilot)",
    )
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="L",
        help="a node label for placement (repeatable)",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the coordinator")
    parser.add_argument(
        "--terminate-grace",
        default="10",
        metavar="S",
        help="seconds between SIGTERM and SIGKILL when an agent stops its work (default 10)",
    )
    _add_preparation_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="write the script, do not submit it")
    parser.set_defaults(handler=_submit)


def _whole(text: str, *, where: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigurationError(f"expected a whole number, got {text!r}", where=where) from None
    if not low <= value <= high:
        raise ConfigurationError(f"must be between {low} and {high}, got {value}", where=where)
    return value


def _absolute_file(path: str, *, where: str) -> str:
    if not os.path.isfile(path):
        raise ConfigurationError(f"file not found: {path}", where=where)
    return os.path.abspath(path)


def pilot_spec_from_args(args: argparse.Namespace) -> PilotSpec:
    """Build and check a pilot's shape from ``submit-agents``'s arguments.

    Raises:
        ConfigurationError: an argument is invalid; ``where`` names its flag.
    """
    connect = args.connect or os.environ.get("TASKFARM_COORDINATOR")
    if not connect:
        raise ConfigurationError(
            "give the coordinator's address as the compute nodes reach it (HOST:PORT)",
            where="--connect",
        )
    token_file = credential_dir = None
    if args.token_file is not None and args.credential_dir is not None:
        raise ConfigurationError(
            "give --token-file or --credential-dir, not both", where="--credential-dir"
        )
    if args.credential_dir is not None:
        folder = Path(args.credential_dir)
        if not folder.is_dir():
            raise ConfigurationError(f"not a folder: {folder}", where="--credential-dir")
        if not any(folder.glob("*.cred")):
            raise ConfigurationError(
                f"no HOST.cred files in {folder} (taskfarm token issue --node NAME "
                "--out DIR/HOST.cred, one per compute node)",
                where="--credential-dir",
            )
        credential_dir = str(folder.resolve())
    else:
        token_path = args.token_file or os.environ.get("TASKFARM_TOKEN_FILE")
        if token_path is None:
            raise ConfigurationError(
                "give the join token (--token-file) or a folder of node credentials "
                "(--credential-dir)",
                where="--token-file",
            )
        load_token(token_path)  # a missing or malformed token is named now
        token_file = os.path.abspath(token_path)
    labels = tuple(dict.fromkeys(check_label(label, where="--label") for label in args.labels))
    grace = _duration(args.terminate_grace, where="--terminate-grace")
    return PilotSpec(
        connect=connect,
        partition=args.partition,
        time_limit=args.time,
        pilot_dir=os.path.abspath(args.pilot_dir),
        command=(sys.executable, "-m", "runtime.cli"),
        nodes_per_job=_whole(args.nodes_per_job, where="--nodes-per-job", low=1, high=10_000),
        cores=(
            _whole(args.cores, where="--cores", low=1, high=100_000)
            if args.cores is not None
            else None
        ),
        memory=args.memory,
        sbatch_args=tuple(args.sbatch_args),
        setup=tuple(args.setup),
        job_name=args.job_name,
        name_prefix=args.name_prefix,
        token_file=token_file,
        credential_dir=credential_dir,
        tls_ca=_absolute_file(args.tls_ca, where="--tls-ca") if args.tls_ca else None,
        labels=labels,
        checkpoint_warning=_duration(args.checkpoint_warning, where="--checkpoint-warning"),
        drain_margin=_duration(args.drain_margin, where="--drain-margin"),
        terminate_grace=grace,
        idle_timeout=(
            _duration(args.idle_timeout, where="--idle-timeout")
            if args.idle_timeout is not None
            else None
        ),
    )


def write_pilot_script(spec: PilotSpec, *, now: datetime) -> Path:
    """Write ``spec``'s sbatch script into its pilot folder (never over another); return it.

    Raises:
        ConfigurationError: the pilot folder cannot be created or written.
    """
    folder = Path(spec.pilot_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = now.strftime("%Y%m%dT%H%M%S")
        for number in range(1, 1000):
            suffix = "" if number == 1 else f"-{number}"
            path = folder / f"pilot-{spec.partition}-{stamp}{suffix}.sbatch"
            try:
                with path.open("x", encoding="utf-8") as file:
                    file.write(render_pilot_script(spec, written_at=now))
            except FileExistsError:
                continue
            path.chmod(0o755)
            return path
    except OSError as error:
        raise ConfigurationError(
            f"cannot write the pilot script: {error.strerror or error}", where="--pilot-dir"
        ) from None
    raise ConfigurationError("too many pilot scripts this second", where="--pilot-dir")


async def _submit(args: argparse.Namespace) -> int:
    count = _whole(args.count, where="--count", low=1, high=_MAX_COUNT)
    spec = pilot_spec_from_args(args)
    path = write_pilot_script(spec, now=datetime.now(UTC).astimezone())
    print(f"wrote {path}", flush=True)
    if args.dry_run:
        return 0
    submitted: list[str] = []
    try:
        for _ in range(count):
            job_id = await submit_script(str(path))
            submitted.append(job_id)
    finally:
        if submitted:
            nodes = f"{spec.nodes_per_job} node{'s' if spec.nodes_per_job > 1 else ''}"
            print(
                f"submitted {len(submitted)} pilot job{'s' if len(submitted) > 1 else ''}: "
                f"{' '.join(submitted)} (partition {spec.partition}, {nodes} each, time limit "
                f"{spec.time_limit})",
                flush=True,
            )
    return 0


# -- agent ----------------------------------------------------------------------------------------


def _configure_agent(parser: argparse.ArgumentParser) -> None:
    configure_agent(parser)
    parser.add_argument(
        "--credential-dir",
        metavar="DIR",
        help="node credentials: this node's is DIR/NODE.cred (instead of --token-file)",
    )
    parser.add_argument(
        "--pilot-dir",
        default=".",
        metavar="DIR",
        help="the work folder is DIR/agents/JOBID-NODE unless --work-dir is given",
    )
    parser.add_argument(
        "--name-prefix", default="pilot", help="the agent is named PREFIX-JOBID-NODE"
    )
    _add_preparation_arguments(parser)
    parser.add_argument(
        "--end-time",
        metavar="TIME",
        help="when the allocation ends (ISO 8601 with a zone, or seconds since the epoch); "
        "default: $SLURM_JOB_END_TIME, else scontrol show job $SLURM_JOB_ID",
    )
    parser.set_defaults(handler=_agent, work_dir=None)


def _end_time(text: str) -> datetime:
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return datetime.fromtimestamp(float(text), tz=UTC)
        when = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        when = None
    if when is None or when.tzinfo is None:
        raise ConfigurationError(
            f"expected an ISO 8601 time with a zone (2026-03-14T18:00:00+00:00) or seconds "
            f"since the epoch, got {text!r}",
            where="--end-time",
        )
    return when


def _fill_from_allocation(args: argparse.Namespace, job: SlurmJob | None) -> None:
    """Give the agent's arguments the allocation's values where the user gave none."""
    job_id = job.job_id if job is not None else "local"
    node = job.safe_node if job is not None else "node"
    if args.credential_dir is not None:
        if args.token_file is not None or args.credential_file is not None:
            raise ConfigurationError(
                "give --credential-dir alone, without --token-file or --credential-file",
                where="--credential-dir",
            )
        args.credential_file = str(Path(args.credential_dir) / f"{node}.cred")
        if not os.path.isfile(args.credential_file):
            raise ConfigurationError(
                f"no credential for this node: {args.credential_file} is missing",
                where="--credential-dir",
            )
    if args.name is None and args.credential_file is None:
        args.name = f"{args.name_prefix}-{job_id}-{node}"
    if args.work_dir is None:
        args.work_dir = str(Path(args.pilot_dir) / "agents" / f"{job_id}-{node}")
    if job is not None:
        if args.cores is None and job.cpus is not None:
            args.cores = str(job.cpus)
        if args.memory is None and job.memory_mb is not None:
            args.memory = f"{job.memory_mb}MiB"
        args.labels = [*args.labels, "slurm", f"{JOB_LABEL}={job.job_id}"]
        if job.partition:
            partition = f"slurm-partition={job.partition}"
            try:
                args.labels.append(check_label(partition, where="$SLURM_JOB_PARTITION"))
            except ConfigurationError:
                pass  # an unusual partition name: the label is only a convenience


async def _agent(args: argparse.Namespace) -> int:
    warning = _duration(args.checkpoint_warning, where="--checkpoint-warning")
    margin = _duration(args.drain_margin, where="--drain-margin")
    idle = (
        _duration(args.idle_timeout, where="--idle-timeout")
        if args.idle_timeout is not None
        else None
    )
    job = find_slurm_job()
    end = _end_time(args.end_time) if args.end_time is not None else None
    if job is None and end is None:
        raise ConfigurationError(
            "not inside a Slurm job ($SLURM_JOB_ID is not set): run it through sbatch and "
            "srun (taskfarm slurm submit-agents), or give --end-time",
            where="--end-time",
        )
    _fill_from_allocation(args, job)
    allocation: Allocation | None
    if end is not None:
        allocation = Allocation(
            end=end,
            source="--end-time",
            checkpoint_warning=warning,
            drain_margin=margin,
            idle_timeout=idle,
        )
    else:
        assert job is not None
        allocation = await slurm_allocation(
            job, checkpoint_warning=warning, drain_margin=margin, idle_timeout=idle
        )
    return await run_agent_command(args, allocation=allocation)


# -- status ---------------------------------------------------------------------------------------


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job-name", default=DEFAULT_JOB_NAME, help="the pilot jobs' name")
    parser.add_argument("--json", action="store_true")
    add_client_arguments(parser)
    parser.set_defaults(handler=_status)


class PilotStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A pilot job beside the agents it started."""

    job: PilotJob
    agents: tuple[NodeSummary, ...]


def match_pilots(
    jobs: list[PilotJob], nodes: list[NodeSummary]
) -> tuple[list[PilotStatus], list[NodeSummary]]:
    """Pair each pilot job with its agents (by their ``slurm-job=ID`` label); return the
    pairs and the pilots' agents whose job has ended."""
    by_job: dict[str, list[NodeSummary]] = {}
    for node in nodes:
        for label in node.labels:
            key, _, value = label.partition("=")
            if key == JOB_LABEL:
                by_job.setdefault(value, []).append(node)
    pilots = [PilotStatus(job=job, agents=tuple(by_job.pop(job.job_id, ()))) for job in jobs]
    ended = sorted((node for agents in by_job.values() for node in agents), key=lambda n: n.name)
    return pilots, ended


def _agent_text(node: NodeSummary) -> str:
    return f"{node.name} ({node.health}, {node.running} running)"


async def _status(args: argparse.Namespace) -> int:
    jobs = await list_pilot_jobs(args.job_name)
    nodes: list[NodeSummary] = []
    unreachable: str | None = None
    try:
        async with open_client(args) as connection:
            reply = await request(connection, ListNodesRequest())
        assert isinstance(reply, NodesReply)
        nodes = list(reply.nodes)
    except (WireError, TaskfarmError) as error:
        unreachable = str(error)
    pilots, ended = match_pilots(jobs, nodes)
    if args.json:
        data = {
            "pilots": pilots,
            "ended_pilot_agents": ended,
            "coordinator_error": unreachable,
        }
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
        return 1 if unreachable else 0
    print(f"{'JOB':<10} {'STATE':<11} {'PARTITION':<12} {'NODES':>5}  {'TIME LEFT':<11} AGENTS")
    for pilot in pilots:
        job = pilot.job
        if pilot.agents:
            agents = ", ".join(_agent_text(node) for node in pilot.agents)
        elif job.state == "PENDING":
            agents = f"- (waiting: {job.reason})"
        else:
            agents = "- (not connected)" if unreachable is None else "?"
        print(
            f"{job.job_id:<10} {job.state:<11} {job.partition:<12} {job.nodes:>5}  "
            f"{job.time_left:<11} {agents}"
        )
    if not pilots:
        print(f"(no pilot jobs named {args.job_name})")
    if ended:
        print("agents of pilots that ended: " + ", ".join(_agent_text(node) for node in ended))
    if unreachable is not None:
        print(
            f"taskfarm: error: the coordinator's agents are unknown: {unreachable}", file=sys.stderr
        )
        return 1
    return 0


# -- cancel ---------------------------------------------------------------------------------------


def _configure_cancel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_ids", nargs="*", metavar="JOBID", help="pilot jobs to end")
    parser.add_argument("--all", action="store_true", help="end every pilot job")
    parser.add_argument("--job-name", default=DEFAULT_JOB_NAME, help="the pilot jobs' name")
    parser.set_defaults(handler=_cancel)


async def _cancel(args: argparse.Namespace) -> int:
    if bool(args.job_ids) == bool(args.all):
        raise ConfigurationError("give pilot job ids or --all (not both)", where="JOBID")
    for job_id in args.job_ids:
        if not _JOB_ID.fullmatch(job_id):
            raise ConfigurationError(f"{job_id!r} is not a Slurm job id", where="JOBID")
    pilots = {job.job_id: job for job in await list_pilot_jobs(args.job_name)}
    if args.all:
        doomed = sorted(pilots, key=lambda job_id: [int(p) for p in re.findall(r"\d+", job_id)])
        if not doomed:
            print(f"no pilot jobs named {args.job_name}")
            return 0
    else:
        for job_id in args.job_ids:
            if job_id not in pilots:
                raise ConfigurationError(
                    f"no pending or running pilot job {job_id} named {args.job_name} "
                    "(see taskfarm slurm status)",
                    where="JOBID",
                )
        doomed = list(dict.fromkeys(args.job_ids))
    await cancel_jobs(doomed)
    print(
        f"cancelled pilot job{'s' if len(doomed) > 1 else ''} {' '.join(doomed)}: their agents "
        "stop, and the coordinator requeues their work"
    )
    return 0
