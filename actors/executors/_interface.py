"""Executors: what runs one attempt of a task and reports back.

An executor is opened for the life of its owner (a node actor or a node agent) and runs
attempts in its own task group, so nothing it starts outlives it.  ``start()`` either raises
:class:`ExecutorError` (nothing ran, nothing was reported) or returns an :class:`AttemptHandle`
after reporting :class:`AttemptStarted`; exactly one :class:`AttemptFinished` follows, always
as the last report of the attempt.  Every report carries the attempt's identity (job, task,
attempt number and fencing token) so a receiver can drop a stale one.

## The attempt protocol (for programs run by the subprocess executor)

### Environment

The program runs with the node agent's environment, the job's ``env`` on top, and:

| Variable                  | Value                                                           |
|---------------------------|-----------------------------------------------------------------|
| `TASKFARM_JOB_ID`         | the job id                                                      |
| `TASKFARM_TASK_ID`        | the task id                                                     |
| `TASKFARM_ATTEMPT`        | the attempt number, from 1                                      |
| `TASKFARM_CHECKPOINT_DIR` | a directory for this task that persists across its attempts     |
| `TASKFARM_RESUME_FROM`    | the last checkpoint reported by an earlier attempt (only set    |
|                           | when resuming): resume from it instead of starting over         |
| `TASKFARM_RESUME_FALLBACK`| set when the last checkpoint failed verification: why, and that |
|                           | ``TASKFARM_RESUME_FROM`` is the one before (or unset: start     |
|                           | over)                                                           |
| `TASKFARM_OUTPUT_DIR`     | the job's output directory (only set when the job has one)      |
| `TASKFARM_EXECUTOR_ID`    | the executor (node agent) that started it: every process that   |
|                           | carries it is killed if that agent dies (leave it inherited)    |

The directories exist and are absolute paths.

It starts in its own session and process group, with stdin from `/dev/null`.

### Report lines

A line on **stdout** that starts with `@taskfarm ` (with the space) is a report, not a log line:

```
@taskfarm progress <fraction> [message]   fraction of the task done, 0 to 1
@taskfarm checkpoint <token-or-path>      a checkpoint a later attempt can resume from
@taskfarm checkpoint --manifest <file>    the same, with its files' sizes and SHA-256: the
                                          executor verifies them before it reports it
                                          (see ``_manifest.py``)
@taskfarm preview <path>                  a preview image (or other partial output) is ready
@taskfarm metric <name> <number>          a named measurement (frame time, residual, ...)
```

Fields are separated by whitespace; the message, token and path are the rest of the line (they
may contain spaces; leading and trailing whitespace is dropped).  Write each report on its own
line and flush stdout after it (a pipe is block-buffered: in Python, `print(..., flush=True)`).
A malformed report line (an unknown verb, a missing or non-numeric value, a fraction outside
0..1) is recorded as a warning in the attempt log and otherwise ignored: it never fails the
attempt.  Report lines on stderr are ordinary log lines.

### Signals

- **SIGUSR1: checkpoint now.**  Sent to the main process when the scheduler wants a checkpoint
  (before preemption, before a maintenance window), and only if the job declared that it
  handles it (`checkpointable`), because SIGUSR1's default action kills a process.  A
  well-behaved program writes a checkpoint, reports it with `@taskfarm checkpoint ...` and
  carries on, as with Slurm's `--signal=USR1`.  With ``checkpoint_warning`` it also comes
  that long before ``max_runtime`` (and, from the coordinator, before a planned drain).
- **SIGTERM: stop.**  Sent to the whole process group on cancellation, preemption, a
  `max_runtime` timeout or a stall; after a grace period the group gets **SIGKILL**.  When the
  main process exits, whatever is left in its process group is killed too: no process outlives
  its attempt.

### Timeouts and outcomes

`max_runtime` bounds the attempt's run time (outcome `timed_out`).  `stall_timeout` bounds the
time from the start to the first report line and between two of them (outcome `stalled`): a
program that only writes log lines for that long is considered hung, so long-running work
reports progress.  Otherwise exit code 0 is `completed` and anything else `failed`, with the
last stderr line as the error (or the exit code when stderr was empty).  An attempt stopped on
request is `cancelled`, whatever its exit code.  The first reason to stop wins.  The final
report always carries the real exit code; a negative one is the signal that killed the process.

An attempt the node could not see through is `lost`, not `failed`: its agent lost contact with
the coordinator for longer than its lease (it asked for a checkpoint, then stopped the attempt),
or the agent died while it ran.  A lost attempt runs again (from its last checkpoint) without
spending one of the task's retries.

### When the agent dies

A node agent's processes die with it: if the agent is killed, every process that carries its
`TASKFARM_EXECUTOR_ID` is SIGKILLed within a fraction of a second, with its process group, and
an agent that restarts kills whatever its previous incarnation left before it reports back.

### The attempt log

stdout and stderr go to `<log_dir>/<job_id>/<task_id>.<attempt>.log` (appended to, never
truncated), written as they arrive: a crash of the agent loses no line it had read.  Each line
is `<seconds since start> <stream> <text>` with the stream `out`, `err` or `sys` (the
executor's own notes: the start, checkpoint requests, signals sent, malformed report lines, the
outcome), e.g.

```
    0.000 sys started pid 4242: blender -b shot.blend -f 12
    0.130 out Fra:12 Mem:212M | Rendering 1/64 tiles
    0.131 err Warning: texture missing
    9.802 sys exited with code 0: completed
```

The file is created at the first output (report lines too), once the attempt has run for a
second, or when it ends other than `completed`: an attempt that completes within a second
without printing a word leaves no log file (its start and end are in the journal), which spares
the agent's disk a new file per task on farms of very short tasks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal, Protocol, TypeAlias, TypedDict

import msgspec

from actors._errors import AttemptSpecError
from runtime import Message

from ._manifest import CheckpointManifest, CheckpointRecord

__all__ = [
    "PATH_SAFE_PATTERN",
    "AttemptCheckpointed",
    "AttemptFinished",
    "AttemptHandle",
    "AttemptIdentity",
    "AttemptMetric",
    "AttemptOutcome",
    "AttemptPreview",
    "AttemptProgress",
    "AttemptReport",
    "AttemptSpec",
    "AttemptStarted",
    "Executor",
    "ReportSink",
    "RunningAttempt",
    "attempt_identity",
    "gang_environment",
]

# Ids become path components of log and checkpoint directories: no separators, no "." or "..".
PATH_SAFE_PATTERN = r"^(?!\.\.?$)[^/\\\x00]+$"
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=PATH_SAFE_PATTERN)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]

# "start_failed": nothing ran (the command could not be started); "lost": the agent lost the
# attempt (it restarted, or stopped work it could no longer report); "oom": out of memory.
AttemptOutcome: TypeAlias = Literal[
    "completed", "failed", "cancelled", "timed_out", "stalled", "oom", "lost", "start_failed"
]


# -- errors -----------------------------------------------------------------------------------


# -- the attempt description ------------------------------------------------------------------


class AttemptSpec(
    Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="engine.attempt_spec"
):
    """Everything an executor needs to run one attempt of one task.

    Exactly one of ``argv`` (a command, placeholders already expanded; subprocess executor) and
    ``function`` (a registered callable given ``arguments``; in-process executor) is set.
    ``checkpointable`` says the work handles checkpoint requests; only then is it sent one.
    A command from the coordinator, so an agent rejects fields it does not know rather than
    silently ignoring what it was asked to honour.
    """

    job_id: Identifier
    task_id: Identifier
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    fencing_token: Annotated[int, msgspec.Meta(ge=0)]
    argv: tuple[str, ...] = ()
    function: str | None = None
    arguments: Mapping[str, Any] = {}
    env: Mapping[str, str] = {}
    cwd: str | None = None
    output_dir: str | None = None
    resume_from: str | None = None
    checkpointable: bool = False
    max_runtime: Seconds | None = None
    stall_timeout: Seconds | None = None
    # The memory the attempt asked for, in bytes (0: none stated); an executor may stop an
    # attempt that uses far more, as out of memory.
    memory: Annotated[int, msgspec.Meta(ge=0)] = 0
    # A multi-node attempt: every node (leader first), this node's rank in them, and whether
    # every rank runs the command ("all") or only the leader ("leader", for mpirun).
    nodes: tuple[str, ...] = ()
    rank: Annotated[int, msgspec.Meta(ge=0)] = 0
    launch: Literal["all", "leader"] = "all"
    # The nodes' network addresses (in ``nodes`` order) and a port for the ranks to meet on
    # (the leader listens): what MPI's hostfile or torchrun's MASTER_ADDR/PORT need.
    hosts: tuple[str, ...] = ()
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    # The task's kept checkpoints, oldest first (``resume_from`` is normally the last): the
    # executor re-verifies the one it resumes from and falls back to an earlier one when that
    # fails, and deletes those that fall out of the last ``checkpoint_retention``.
    checkpoints: tuple[CheckpointRecord, ...] = ()
    checkpoint_retention: Annotated[int, msgspec.Meta(ge=1)] = 3
    # SIGUSR1 this long before ``max_runtime`` (a checkpointable attempt only).
    checkpoint_warning: Seconds | None = None

    def __post_init__(self) -> None:
        if bool(self.argv) == (self.function is not None):
            raise AttemptSpecError("set exactly one of argv and function", field="argv")
        if self.arguments and self.function is None:
            raise AttemptSpecError("arguments are for a function, not argv", field="arguments")
        if self.function == "":
            raise AttemptSpecError("must not be empty", field="function")


# -- reports ----------------------------------------------------------------------------------


class RunningAttempt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An attempt an agent is still running when it (re)connects."""

    job_id: str
    task_id: str
    attempt: int
    fencing_token: int


def gang_environment(spec: AttemptSpec, hostfile: str | None) -> dict[str, str]:
    """Return the environment a rank of a multi-node attempt runs with (empty otherwise):
    ``TASKFARM_NODE_RANK``, ``TASKFARM_NUM_NODES``, ``TASKFARM_NODES`` (the host list,
    comma-separated, leader first), ``TASKFARM_NODE_NAMES``, ``TASKFARM_LEADER`` and
    ``TASKFARM_PORT`` (where rank 0 listens), and ``TASKFARM_HOSTFILE`` when one was written."""
    if len(spec.nodes) < 2:
        return {}
    hosts = spec.hosts or spec.nodes
    env = {
        "TASKFARM_NODE_RANK": str(spec.rank),
        "TASKFARM_NUM_NODES": str(len(spec.nodes)),
        "TASKFARM_NODES": ",".join(hosts),
        "TASKFARM_NODE_NAMES": ",".join(spec.nodes),
        "TASKFARM_LEADER": hosts[0],
        "TASKFARM_PORT": str(spec.port),
    }
    if hostfile is not None:
        env["TASKFARM_HOSTFILE"] = hostfile
    return env


class AttemptIdentity(TypedDict):
    """The fields that identify an attempt in every report (``**attempt_identity(spec)``)."""

    job_id: str
    task_id: str
    attempt: int
    fencing_token: int


def attempt_identity(spec: AttemptSpec) -> AttemptIdentity:
    """Return the identity fields of the attempt ``spec`` describes."""
    return {
        "job_id": spec.job_id,
        "task_id": spec.task_id,
        "attempt": spec.attempt,
        "fencing_token": spec.fencing_token,
    }


class _Report(Message, frozen=True, kw_only=True):
    """The identity every report carries, so stale ones (an old fencing token) are dropped."""

    job_id: str
    task_id: str
    attempt: int
    fencing_token: int


class AttemptStarted(_Report, frozen=True, kw_only=True, tag="engine.attempt_started"):
    """The attempt is running; ``pid`` is its main process (None in-process), ``log_path``
    its log file (None when it has none)."""

    pid: int | None = None
    log_path: str | None = None
    # Set when the attempt resumes: the checkpoint it resumes from, and the later ones it
    # skipped because they failed verification (``refused``, with ``fallback`` saying why).
    resumed_from: str | None = None
    refused: tuple[str, ...] = ()
    fallback: str | None = None
    # The refused checkpoints whose files the executor deleted before the start.
    deleted: tuple[str, ...] = ()


class AttemptProgress(_Report, frozen=True, kw_only=True, tag="engine.attempt_progress"):
    """The attempt reports the ``fraction`` (0 to 1) of its work done."""

    fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    message: str = ""


class AttemptCheckpointed(_Report, frozen=True, kw_only=True, tag="engine.attempt_checkpointed"):
    """The attempt wrote a checkpoint (a token or a path) that a later attempt can resume from;
    ``manifest``, when the program gave one, lists its files as verified by the executor."""

    checkpoint: str
    manifest: CheckpointManifest | None = None


class AttemptPreview(_Report, frozen=True, kw_only=True, tag="engine.attempt_preview"):
    """The attempt produced a preview (or other partial output) at ``path``."""

    path: str


class AttemptMetric(_Report, frozen=True, kw_only=True, tag="engine.attempt_metric"):
    """The attempt reports a named measurement."""

    name: str
    value: float


class AttemptFinished(_Report, frozen=True, kw_only=True, tag="engine.attempt_finished"):
    """The attempt is over: the last report it sends.

    ``exit_code`` is the process's (negative: the signal that killed it; None in-process or when
    it never exited on its own), ``error`` says why it did not complete, ``checkpoint`` is the
    last checkpoint *this* attempt reported and ``runtime_s`` its duration on the clock.
    ``cpu_s`` and ``peak_rss`` (bytes) are what its processes used in total, where the
    executor measures it (``cpu_s`` None and ``peak_rss`` 0 where it does not: in-process,
    simulated, or never started).
    """

    outcome: AttemptOutcome
    exit_code: int | None = None
    error: str | None = None
    checkpoint: str | None = None
    runtime_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    cpu_s: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    peak_rss: Annotated[int, msgspec.Meta(ge=0)] = 0


AttemptReport: TypeAlias = (
    AttemptStarted
    | AttemptProgress
    | AttemptCheckpointed
    | AttemptPreview
    | AttemptMetric
    | AttemptFinished
)
"""Any report an attempt sends (a tagged union: decode it with ``type=AttemptReport``)."""

ReportSink: TypeAlias = Callable[[AttemptReport], Awaitable[None]]
"""Where an executor sends an attempt's reports, in order; awaiting it is backpressure.

It must not raise: an exception from it fails the executor, raised from its ``async with``
(in an ``ExceptionGroup``, as from any task group) after its processes are killed.
"""


# -- the protocols ----------------------------------------------------------------------------


class AttemptHandle(Protocol):
    """A running (or finished) attempt, as returned by :meth:`Executor.start`.

    Preemption is the caller's composition: :meth:`request_checkpoint`, wait up to a grace
    period for :class:`AttemptCheckpointed`, then :meth:`terminate` (which kills after its own
    grace).
    """

    @property
    def spec(self) -> AttemptSpec:
        """Return the spec the attempt runs."""
        ...

    @property
    def pid(self) -> int | None:
        """Return the main process id (None in-process)."""
        ...

    @property
    def result(self) -> AttemptFinished | None:
        """Return the final report once it was sent, else None."""
        ...

    def request_checkpoint(self) -> bool:
        """Ask the work to checkpoint now; return False (and do nothing) when the spec is not
        ``checkpointable`` or the attempt is no longer running."""
        ...

    def cancel(self, *, grace: float) -> None:
        """Ask the attempt to stop, at once: terminate now, kill after ``grace`` seconds.

        Returns without waiting; the outcome is ``cancelled`` unless the attempt already ended.
        """
        ...

    async def terminate(self, grace: float) -> None:
        """Stop the attempt (terminate, then kill after ``grace``) and wait until it exited."""
        ...

    async def kill(self) -> None:
        """Kill the attempt without a grace period and wait until it exited."""
        ...

    async def wait(self) -> AttemptFinished:
        """Wait for the attempt to end and return its final report (once it was sent)."""
        ...


class Executor(Protocol):
    """Runs attempts; opened as an async context manager that owns their tasks.

    An executor that keeps reports durably until their receiver has journaled them (a remote
    agent's outbox) says so with a class attribute ``awaits_journaled_reports = True``: its
    sink then returns only once the report is journaled.  Without it a sink may return as soon
    as the report is handed over (in order) to whoever journals it.
    """

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        """Start one attempt; return once :class:`AttemptStarted` was reported.

        Raises:
            ExecutorError: the attempt could not start (nothing ran, nothing was reported).
        """
        ...

    def running(self) -> tuple[AttemptHandle, ...]:
        """Return the attempts that have not finished yet, oldest first."""
        ...
