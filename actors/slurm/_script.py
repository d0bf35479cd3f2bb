"""The pilot job: what ``taskfarm slurm submit-agents`` asks Slurm for, and the sbatch script.

A pilot is an ordinary batch job whose only work is to run one ``taskfarm slurm agent`` per
allocated node (``srun --ntasks-per-node=1``); the agents connect to the coordinator, which
places work on them like on any other node.  The script is meant to be read: it is written to
the pilot folder (on the shared file system, where the agents also keep their work folders),
says what each line is for, and can be submitted again by hand with ``sbatch FILE``.

:class:`PilotSpec` holds everything the script needs; building one checks every value and a
:class:`ConfigurationError` names the flag at fault.  :func:`render_pilot_script` is pure (a
golden test reads its lines).
"""

from __future__ import annotations

import re
import shlex
from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated

import msgspec

from actors._errors import ResourceError
from actors.engine import parse_size
from runtime import ConfigurationError

__all__ = [
    "DEFAULT_JOB_NAME",
    "PilotSpec",
    "parse_time_limit",
    "render_pilot_script",
    "slurm_memory",
]

DEFAULT_JOB_NAME = "taskfarm-pilot"
_PARTITION = re.compile(r"[A-Za-z0-9_.+-]{1,200}")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,100}")
_PREFIX = re.compile(r"[A-Za-z0-9_.@:]{1,50}")  # then "-JOBID-HOST": a valid node name
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
# Slurm's time formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(
    r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?)"
    r"|(?:(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)"
)
_MAX_TIME = 366 * 86_400
# The options the script sets itself: an --sbatch-arg may not set them behind its back.
_OWN_OPTIONS = {
    "--partition": "--partition",
    "-p": "--partition",
    "--time": "--time",
    "-t": "--time",
    "--nodes": "--nodes-per-job",
    "-N": "--nodes-per-job",
    "--ntasks-per-node": "(one agent per node)",
    "--ntasks": "(one agent per node)",
    "-n": "(one agent per node)",
    "--cpus-per-task": "--cores",
    "-c": "--cores",
    "--mem": "--memory",
    "--job-name": "--job-name",
    "-J": "--job-name",
    "--output": "(the pilot folder)",
    "-o": "(the pilot folder)",
    "--error": "(the pilot folder)",
    "-e": "(the pilot folder)",
    "--array": "--count",
    "-a": "--count",
}
_MAX_SBATCH_ARGS = 64
_MAX_SETUP_LINES = 64


def parse_time_limit(text: str, *, where: str = "--time") -> int:
    """Return a Slurm time limit (``12:00:00``, ``1-00:00:00``, ``90``) in seconds.

    Raises:
        ConfigurationError: not one of Slurm's formats, zero, or more than a year.
    """
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise ConfigurationError(
            f"expected a Slurm time limit (MINUTES, HH:MM:SS or DAYS-HH:MM:SS), got {text!r}",
            where=where,
        )
    parts = match.groupdict()
    if parts["days"] is not None:
        seconds = (
            int(parts["days"]) * 86_400
            + int(parts["dh"]) * 3600
            + int(parts["dm"] or 0) * 60
            + int(parts["ds"] or 0)
        )
    elif parts["c"] is not None:  # H:M:S
        seconds = int(parts["a"]) * 3600 + int(parts["b"]) * 60 + int(parts["c"])
    elif parts["b"] is not None:  # M:S
        seconds = int(parts["a"]) * 60 + int(parts["b"])
    else:  # M
        seconds = int(parts["a"]) * 60
    if seconds <= 0 or seconds > _MAX_TIME:
        raise ConfigurationError(
            f"must be more than 0 and at most 366 days, got {text!r}", where=where
        )
    return seconds


def slurm_memory(text: str, *, where: str = "--memory") -> int:
    """Return a memory size (``64GiB``, as agents take it) in whole MiB, Slurm's unit.

    Raises:
        ConfigurationError: not a size, or less than 1 MiB.
    """
    try:
        size = parse_size(text, what="memory")
    except ResourceError as error:
        raise ConfigurationError(str(error), where=where) from None
    mib = size // (1024 * 1024)
    if mib < 1:
        raise ConfigurationError(f"must be at least 1MiB, got {text!r}", where=where)
    return mib


class PilotSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One shape of pilot job and how its agents reach the coordinator.

    ``command`` runs taskfarm on the compute nodes (the same installation, on the shared file
    system); ``setup`` lines run before it (``module load ...``).  Exactly one of
    ``token_file`` (the join token) and ``credential_dir`` (``HOST.cred``, a node credential per
    compute node) authenticates the agents.  Paths are absolute: the script runs elsewhere.

    Raises:
        ConfigurationError: a value is invalid; ``where`` names the flag.
    """

    connect: str
    partition: str
    time_limit: str
    pilot_dir: str
    command: tuple[str, ...]
    nodes_per_job: Annotated[int, msgspec.Meta(ge=1)] = 1
    cores: int | None = None
    memory: str | None = None
    sbatch_args: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    job_name: str = DEFAULT_JOB_NAME
    name_prefix: str = "pilot"
    token_file: str | None = None
    credential_dir: str | None = None
    tls_ca: str | None = None
    labels: tuple[str, ...] = ()
    checkpoint_warning: float = 600.0
    drain_margin: float = 120.0
    terminate_grace: float = 10.0
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        match = _HOST_PORT.fullmatch(self.connect)
        if match is None or not 1 <= int(match.group(2)) <= 65535:
            raise ConfigurationError(f"expected HOST:PORT, got {self.connect!r}", where="--connect")
        if match.group(1) in ("0.0.0.0", "[::]"):
            raise ConfigurationError(
                "the agents need an address they can reach, not a wildcard", where="--connect"
            )
        if not _PARTITION.fullmatch(self.partition):
            raise ConfigurationError(
                f"{self.partition!r} is not a partition name", where="--partition"
            )
        time_limit = parse_time_limit(self.time_limit)
        if not 1 <= self.nodes_per_job <= 10_000:
            raise ConfigurationError(
                f"must be between 1 and 10000, got {self.nodes_per_job}", where="--nodes-per-job"
            )
        if self.cores is not None and not 1 <= self.cores <= 100_000:
            raise ConfigurationError(
                f"must be between 1 and 100000, got {self.cores}", where="--cores"
            )
        if self.memory is not None:
            slurm_memory(self.memory)
        if not _JOB_NAME.fullmatch(self.job_name):
            raise ConfigurationError(
                f"{self.job_name!r} is not a job name (letters, digits and _.+- only)",
                where="--job-name",
            )
        if not _PREFIX.fullmatch(self.name_prefix):
            raise ConfigurationError(
                f"{self.name_prefix!r} is not a node name prefix (letters, digits and _.@: "
                "only, at most 50)",
                where="--name-prefix",
            )
        if (self.token_file is None) == (self.credential_dir is None):
            raise ConfigurationError(
                "give the join token (--token-file) or a folder of node credentials "
                "(--credential-dir)",
                where="--token-file",
            )
        for flag, path in (
            ("--pilot-dir", self.pilot_dir),
            ("--token-file", self.token_file),
            ("--credential-dir", self.credential_dir),
            ("--tls-ca", self.tls_ca),
        ):
            if path is not None and not PurePosixPath(path).is_absolute():
                raise ConfigurationError(f"must be an absolute path, got {path!r}", where=flag)
        if not self.command:
            raise ConfigurationError("must not be empty", where="--taskfarm")
        _check_sbatch_args(self.sbatch_args)
        if len(self.setup) > _MAX_SETUP_LINES:
            raise ConfigurationError(f"at most {_MAX_SETUP_LINES} lines", where="--setup")
        for line in self.setup:
            if not line.strip() or any(c in line for c in "\n\r\0"):
                raise ConfigurationError(
                    f"expected one non-empty line, got {line!r}", where="--setup"
                )
        for flag, value in (
            ("--checkpoint-warning", self.checkpoint_warning),
            ("--drain-margin", self.drain_margin),
            ("--terminate-grace", self.terminate_grace),
            ("--idle-timeout", self.idle_timeout),
        ):
            if value is not None and not 0 <= value <= time_limit:
                raise ConfigurationError(
                    f"must be between 0 and the time limit ({time_limit} s), got {value:g}",
                    where=flag,
                )

    def agent_flags(self) -> list[tuple[str, str]]:
        """Return the pilot agent's flags and their values (see :meth:`agent_argv`)."""
        flags = [("--connect", self.connect)]
        if self.token_file is not None:
            flags.append(("--token-file", self.token_file))
        else:
            assert self.credential_dir is not None
            flags.append(("--credential-dir", self.credential_dir))
        flags += [("--pilot-dir", self.pilot_dir), ("--name-prefix", self.name_prefix)]
        flags += [("--label", label) for label in self.labels]
        if self.tls_ca is not None:
            flags.append(("--tls-ca", self.tls_ca))
        flags += [
            ("--checkpoint-warning", f"{self.checkpoint_warning:g}"),
            ("--drain-margin", f"{self.drain_margin:g}"),
            ("--terminate-grace", f"{self.terminate_grace:g}"),
        ]
        if self.idle_timeout is not None:
            flags.append(("--idle-timeout", f"{self.idle_timeout:g}"))
        return flags

    def agent_argv(self) -> list[str]:
        """Return the pilot agent's command line (run by ``srun`` on every node)."""
        return [*self.agent_program(), *(word for pair in self.agent_flags() for word in pair)]

    def agent_program(self) -> list[str]:
        """Return the words before the pilot agent's flags (its log goes to Slurm's output
        file, at level info: what it was given, when it drains, why it stopped)."""
        return [*self.command, "--log-level", "info", "slurm", "agent"]


def _check_sbatch_args(args: tuple[str, ...]) -> None:
    if len(args) > _MAX_SBATCH_ARGS:
        raise ConfigurationError(f"at most {_MAX_SBATCH_ARGS}", where="--sbatch-arg")
    for arg in args:
        if not arg.startswith("-") or any(c in arg for c in "\n\r\0") or len(arg) > 1000:
            raise ConfigurationError(
                f"expected one sbatch option such as --account=physics, got {arg!r}",
                where="--sbatch-arg",
            )
        option = arg.split("=", 1)[0].split(None, 1)[0]
        if not option.startswith("--") and len(option) > 2:
            option = option[:2]  # -pdebug
        owner = _OWN_OPTIONS.get(option)
        if owner is not None:
            instead = f"use {owner} instead" if owner.startswith("--") else f"it is set by {owner}"
            raise ConfigurationError(
                f"{arg!r}: the script sets {option} itself; {instead}", where="--sbatch-arg"
            )


def render_pilot_script(spec: PilotSpec, *, written_at: datetime) -> str:
    """Return the sbatch script of a pilot job of shape ``spec``."""
    quote = shlex.quote
    directives = [
        f"--job-name={spec.job_name}",
        f"--partition={spec.partition}",
        f"--time={spec.time_limit}",
        f"--nodes={spec.nodes_per_job}",
        "--ntasks-per-node=1",
    ]
    if spec.cores is not None:
        directives.append(f"--cpus-per-task={spec.cores}")
    else:
        directives.append("--exclusive")  # whole nodes: the agents offer all they have
    if spec.memory is not None:
        directives.append(f"--mem={slurm_memory(spec.memory)}M")
    directives.append(f"--output={spec.pilot_dir}/slurm-%j.out")
    directives += list(spec.sbatch_args)
    secret = (
        f"join token {spec.token_file}"
        if spec.token_file is not None
        else f"node credentials {spec.credential_dir}/HOST.cred"
    )
    lines = [
        "#!/bin/bash",
        f"# A taskfarm pilot job, written by `taskfarm slurm submit-agents` at "
        f"{written_at.isoformat(timespec='seconds')}.",
        f"# It runs one taskfarm agent per allocated node; the agents connect to {spec.connect}",
        f"# ({secret}) and take work until the time limit comes near:",
        f"# {spec.checkpoint_warning:g} s before the end checkpointable work is asked to "
        "checkpoint (SIGUSR1),",
        f"# {spec.drain_margin:g} s before it the node drains (no new work that could not "
        "finish, what runs",
        "# checkpoints and is requeued elsewhere), and the agents exit once idle.",
        "# Submit it again with: sbatch THIS-FILE",
        *(f"#SBATCH {directive}" for directive in directives),
        "",
        "set -euo pipefail",
    ]
    if spec.setup:
        lines += ["", "# Set up the environment (--setup).", *spec.setup]
    # The program on one line, then one flag per line.
    head = " ".join(quote(word) for word in spec.agent_program())
    flags = [f"{flag} {quote(value)}" for flag, value in spec.agent_flags()]
    command = " \\\n    ".join([head, *flags])
    lines += [
        "",
        "# One agent per node, with all the job has there (--whole): each names itself after",
        "# this job and its node (or its credential), offers the CPUs and memory Slurm gave it,",
        "# keeps its work folder under the pilot folder, and stops cleanly on SIGTERM",
        "# (scancel, or the time limit); its unfinished work is requeued elsewhere.",
        "exec srun --whole --ntasks-per-node=1 --kill-on-bad-exit=0 \\",
        f"    {command}",
        "",
    ]
    return "\n".join(lines)
