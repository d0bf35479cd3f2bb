"""Slurm's own commands, run as processes: ``sbatch``, ``squeue``, ``scancel``, ``scontrol``.

taskfarm talks to Slurm only through its command line, as a user would (no C library, no REST
daemon that a site may not run), with output formats chosen for parsing (``--parsable``,
``-h -o``, ``scontrol -o``).  Every failure is a :class:`SlurmError` naming the command and
quoting what Slurm said; the commands honour ``$SLURM_CONF`` like any Slurm client.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from datetime import datetime

import anyio
import msgspec

from actors._errors import SlurmError

__all__ = [
    "PilotJob",
    "cancel_jobs",
    "job_fields",
    "list_pilot_jobs",
    "parse_slurm_time",
    "run_slurm",
    "submit_script",
]

_TIMEOUT = 60.0  # seconds for one Slurm command (a busy controller answers slowly)
_JOB_ID = re.compile(r"\d+(?:_\d+)?")
_FIELD = re.compile(r"(\S+?)=(\S*)")
_SEPARATOR = "\x1f"  # between squeue's output fields: no job name or node list has one
_SQUEUE_FIELDS = ("%i", "%j", "%T", "%P", "%D", "%N", "%L", "%e", "%r")


class PilotJob(msgspec.Struct, frozen=True, kw_only=True):
    """A pilot job as ``squeue`` shows it."""

    job_id: str
    name: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    partition: str
    nodes: int
    node_list: str  # Slurm's compressed host list (``node[01-04]``), "" while pending
    time_left: str  # Slurm's format, "INVALID"/"UNLIMITED" when it has none
    end: str  # the expected end (local time), "N/A" when unknown
    reason: str  # why it waits (``Resources``, ``Priority``), ``None`` when running


async def run_slurm(argv: Sequence[str], *, input: bytes | None = None) -> str:
    """Run a Slurm command; return its standard output.

    Raises:
        SlurmError: the command is not installed, fails, or does not answer in time.
    """
    program = argv[0]
    if shutil.which(program) is None:
        raise SlurmError(
            f"{program} not found: is Slurm installed here (and on the PATH)?", command=program
        )
    try:
        with anyio.fail_after(_TIMEOUT):
            result = await anyio.run_process(list(argv), input=input, check=False)
    except TimeoutError:
        raise SlurmError(
            f"{program} did not answer within {_TIMEOUT:g} s", command=program
        ) from None
    except OSError as error:
        raise SlurmError(f"{program} could not run: {error}", command=program) from None
    if result.returncode != 0:
        said = " ".join(result.stderr.decode(errors="replace").split()) or (
            f"exit status {result.returncode}"
        )
        raise SlurmError(f"{program} failed: {said}", command=program)
    return result.stdout.decode(errors="replace")


async def submit_script(script: str) -> str:
    """Submit a batch script (``sbatch --parsable FILE``); return the job id.

    Raises:
        SlurmError: sbatch refused it (Slurm's message says why).
    """
    output = (await run_slurm(["sbatch", "--parsable", script])).strip()
    job_id = output.split(";", 1)[0]  # "ID;CLUSTER" on a federation
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"sbatch answered {output!r}, not a job id", command="sbatch")
    return job_id


async def list_pilot_jobs(job_name: str) -> list[PilotJob]:
    """Return this user's pilot jobs named ``job_name`` that have not ended.

    Raises:
        SlurmError: squeue failed.
    """
    argv = ["squeue", "--noheader", "--me", "--name", job_name]
    argv += ["--format", _SEPARATOR.join(_SQUEUE_FIELDS)]
    jobs = []
    for line in (await run_slurm(argv)).splitlines():
        fields = line.split(_SEPARATOR)
        if len(fields) != len(_SQUEUE_FIELDS):
            continue
        job_id, name, state, partition, nodes, node_list, left, end, reason = fields
        jobs.append(
            PilotJob(
                job_id=job_id.strip(),
                name=name.strip(),
                state=state.strip(),
                partition=partition.strip(),
                nodes=int(nodes) if nodes.strip().isdigit() else 0,
                node_list=node_list.strip(),
                time_left=left.strip(),
                end=end.strip(),
                reason=reason.strip(),
            )
        )
    return sorted(jobs, key=lambda job: _job_order(job.job_id))


def _job_order(job_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", job_id))


async def cancel_jobs(job_ids: Sequence[str]) -> None:
    """End jobs with ``scancel`` (their processes get SIGTERM, then SIGKILL).

    Raises:
        SlurmError: scancel failed.
    """
    if job_ids:
        await run_slurm(["scancel", *job_ids])


async def job_fields(job_id: str) -> dict[str, str]:
    """Return ``scontrol show job -o JOB``'s ``Key=Value`` fields (``JobState``, ``EndTime``).

    Raises:
        SlurmError: scontrol failed (the job is unknown, or the controller did not answer).
    """
    output = await run_slurm(["scontrol", "show", "job", "--oneliner", job_id])
    return dict(_FIELD.findall(output))


def parse_slurm_time(text: str) -> datetime | None:
    """Return a time Slurm printed (``2026-12-03T12:11:29``, local time) as an aware datetime,
    or None for ``Unknown``, ``None`` or ``N/A``."""
    try:
        naive = datetime.fromisoformat(text)
    except ValueError:
        return None
    if naive.tzinfo is not None:
        return naive
    # Slurm prints the local time of the host that runs the command: this host's zone.
    return naive.astimezone()
