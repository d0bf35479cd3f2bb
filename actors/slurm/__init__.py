"""Slurm as the way to scale out: pilot jobs that start taskfarm agents inside allocations.

On a cluster the batch system owns the nodes.  taskfarm runs there as pilot jobs (the pattern
of dask-jobqueue, Parsl and RADICAL-Pilot): the coordinator stays on a login or service node,
and each pilot job runs one agent per allocated node, which joins the coordinator like any
other agent and prepares for its allocation's end (``actors.cluster.Allocation``).

- ``_script``: the pilot's shape (:class:`PilotSpec`) and its sbatch script;
- ``_commands``: Slurm's commands (sbatch, squeue, scancel, scontrol), as processes;
- ``_allocation``: the allocation a pilot agent runs in (its job, node, end and state).
"""

from ._allocation import SlurmJob, find_slurm_job, job_end, slurm_allocation, slurm_job_ending
from ._commands import (
    PilotJob,
    cancel_jobs,
    job_fields,
    list_pilot_jobs,
    parse_slurm_time,
    run_slurm,
    submit_script,
)
from ._script import (
    DEFAULT_JOB_NAME,
    PilotSpec,
    parse_time_limit,
    render_pilot_script,
    slurm_memory,
)

__all__ = [
    "DEFAULT_JOB_NAME",
    "PilotJob",
    "PilotSpec",
    "SlurmJob",
    "cancel_jobs",
    "find_slurm_job",
    "job_end",
    "job_fields",
    "list_pilot_jobs",
    "parse_slurm_time",
    "parse_time_limit",
    "render_pilot_script",
    "run_slurm",
    "slurm_allocation",
    "slurm_job_ending",
    "slurm_memory",
    "submit_script",
]
