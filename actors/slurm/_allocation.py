"""The Slurm allocation a pilot agent runs in: its job, its node, its end, its state.

The end comes from ``$SLURM_JOB_END_TIME`` (seconds since the epoch; Slurm 23.02 and later set
it) or, failing that, from ``scontrol show job $SLURM_JOB_ID`` (``EndTime``, in local time).
A job without a time limit has no end, and its agent never drains by itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from actors.cluster import Allocation
from runtime import ConfigurationError

from ._commands import job_fields, parse_slurm_time

__all__ = ["SlurmJob", "find_slurm_job", "job_end", "slurm_allocation", "slurm_job_ending"]

# A job in one of these states still runs; any other (CANCELLED, TIMEOUT, NODE_FAIL,
# PREEMPTED, COMPLETING, ...) is being ended, and what dies in it dies with it.
_ALIVE_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "RESIZING"})
_NODE_NAME = re.compile(r"[^A-Za-z0-9_.@:-]")


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    """This process's place in Slurm: the job, the node, what the allocation gives it."""

    job_id: str
    node: str  # the node's name as Slurm knows it
    partition: str
    cpus: int | None  # CPUs allocated on this node
    memory_mb: int | None  # memory allocated on this node, MiB
    end_time: str | None  # $SLURM_JOB_END_TIME, when Slurm set it

    @property
    def safe_node(self) -> str:
        """Return the node name made valid as part of a taskfarm node name."""
        return _NODE_NAME.sub("-", self.node)


def find_slurm_job(environ: Mapping[str, str] | None = None) -> SlurmJob | None:
    """Return the Slurm job this process runs in (from its environment), or None outside one."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    return SlurmJob(
        job_id=job_id,
        node=env.get("SLURMD_NODENAME") or env.get("HOSTNAME") or "node",
        partition=env.get("SLURM_JOB_PARTITION", ""),
        cpus=_whole(env.get("SLURM_CPUS_ON_NODE")),
        memory_mb=_whole(env.get("SLURM_MEM_PER_NODE")),
        end_time=env.get("SLURM_JOB_END_TIME"),
    )


def _whole(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and int(text) > 0 else None


async def job_end(job: SlurmJob) -> tuple[datetime | None, str]:
    """Return when ``job``'s allocation ends (None: no time limit) and where that came from.

    Raises:
        ConfigurationError: ``$SLURM_JOB_END_TIME`` is not a time.
        SlurmError: scontrol failed.
    """
    if job.end_time is not None:
        if not job.end_time.isdigit():
            raise ConfigurationError(
                f"expected seconds since the epoch, got {job.end_time!r}",
                where="$SLURM_JOB_END_TIME (environment)",
            )
        return datetime.fromtimestamp(int(job.end_time), tz=UTC), "$SLURM_JOB_END_TIME"
    fields = await job_fields(job.job_id)
    return parse_slurm_time(fields.get("EndTime", "")), f"scontrol show job {job.job_id}"


def slurm_job_ending(job_id: str) -> Callable[[], Awaitable[bool]]:
    """Return a check of whether Slurm is ending job ``job_id`` right now."""

    async def ending() -> bool:
        fields = await job_fields(job_id)
        return fields.get("JobState", "RUNNING") not in _ALIVE_STATES

    return ending


async def slurm_allocation(
    job: SlurmJob,
    *,
    checkpoint_warning: float,
    drain_margin: float,
    idle_timeout: float | None = None,
) -> Allocation | None:
    """Return the allocation of ``job`` as the agent prepares for its end (None: no end).

    Raises:
        ConfigurationError: ``$SLURM_JOB_END_TIME`` is not a time.
        SlurmError: scontrol failed.
    """
    end, source = await job_end(job)
    if end is None:
        return None
    return Allocation(
        end=end,
        source=source,
        checkpoint_warning=checkpoint_warning,
        drain_margin=drain_margin,
        idle_timeout=idle_timeout,
        ending=slurm_job_ending(job.job_id),
    )
