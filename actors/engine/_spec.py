"""Job specs: TOML and JSON files of jobs, validated into the engine's submission commands.

A spec file holds ``[[jobs]]``. Each job runs a command template (an argv list) once per task;
its tasks are a frame range cut into chunks (``frames = "1-100"``, ``chunk = 10``), an explicit
``[[jobs.tasks]]`` list (stages, sweep members), or, with neither, one task. Everything is
checked at load, across jobs too, and every error names the file, the field path
(``jobs[1].resources.memory``) and what was expected.

Placeholders in ``command``, ``env`` values and ``output`` (``str.format`` syntax, format specs
allowed: ``{frame:04d}``): ``{job}``, ``{task}`` (the task's name), ``{attempt}`` (from 1),
``{output}`` (the rendered ``output``; not inside ``output`` itself), and, when every task has
frames, ``{start}``, ``{end}`` and ``{frame}``. A task whose templates use ``{frame}`` runs
once per frame of its chunk, in order; otherwise once for the chunk.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import re
import string
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from actors._errors import DependencyCycleError, DependencyError, ResourceError, SpecError
from runtime import Message

from . import _limits as limits
from ._graph import (
    Condition,
    Dependency,
    DependencyGraph,
    ElementMap,
    GraphJob,
    MetricCondition,
    OnParentFailure,
)
from ._resources import Resources, format_size, parse_cores, parse_size

__all__ = [
    "Invocation",
    "JobSpecFile",
    "Priority",
    "RetryPolicy",
    "SubmitJob",
    "SubmitJobs",
    "TaskSpec",
    "Timeouts",
    "load_spec",
    "parse_duration",
    "parse_spec",
    "read_spec_text",
]

T = TypeVar("T")


class Priority(enum.Enum):
    """A job's base priority, ordered by rank (``Priority.LOW < Priority.HIGH``), never by
    name. Encoded by its name, so the ranks may be renumbered safely."""

    BACKGROUND = "background"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """The rank, from 0 (background) to 4 (critical)."""
        return _PRIORITY_RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank >= other.rank


_PRIORITY_RANK: Final = {p: i for i, p in enumerate(Priority)}


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Attempts and exponential backoff (seconds), deterministic: no jitter."""

    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 3
    backoff: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    backoff_factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    max_backoff: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    # Lost attempts (agent restart, node gone, coordinator restart) spend no attempt; a task
    # that keeps losing its host ends after this many.
    max_lost: Annotated[int, msgspec.Meta(ge=1)] = 3

    def delay(self, attempt: int) -> float:
        """Return the wait before ``attempt`` (numbered from 1; the first waits 0).

        Never more than the spec maximum of a backoff, whatever the policy holds (a policy
        built in code, or journaled before the maximum existed): a wait is added to a
        datetime, and a huge one would overflow it.
        """
        if attempt <= 1 or not self.backoff > 0:
            return 0.0
        try:
            wait = self.backoff * self.backoff_factor ** (attempt - 2)
        except OverflowError:
            wait = math.inf
        return min(limits.MAX_BACKOFF, wait, self.max_backoff)  # the maximum first: NaN-proof


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-attempt limits in seconds: total runtime, and time without a progress report."""

    max_runtime: float | None = None
    stall: float | None = None


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One task of a job: its name, its frames (inclusive; ``None`` without frames) and any
    per-task overrides. A plain value inside ``SubmitJob``, not a message of its own."""

    index: int
    name: str
    start: int | None = None
    end: int | None = None
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    resources: Resources | None = None
    requires: tuple[str, ...] = ()
    max_runtime: float | None = None  # this task's walltime (else the job's)
    nodes: int | None = None  # a multi-node (gang) task: this many nodes, each with resources
    checkpoint_warning: float | None = None  # this task's (else the job's)

    @property
    def frames(self) -> range:
        """The task's frames (empty without frames)."""
        if self.start is None or self.end is None:
            return range(0)
        return range(self.start, self.end + 1)


class Invocation(msgspec.Struct, frozen=True, kw_only=True):
    """One process to run for a task attempt: templates rendered."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    output: str | None


class SubmitJob(Message, frozen=True, kw_only=True, tag="engine.submit_job"):
    """Submit one job. ``dependencies`` name parents by job id; task-level ones use task
    indices. ``metadata`` is the spec's free-form table as canonical JSON (sorted keys,
    datetimes as ISO strings) for the domains to validate with ``metadata_as``."""

    job_id: str
    name: str
    priority: Priority = Priority.MEDIUM
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    output: str | None = None
    resources: Resources = Resources()
    tasks: tuple[TaskSpec, ...]
    dependencies: tuple[Dependency, ...] = ()
    retries: RetryPolicy = RetryPolicy()
    timeouts: Timeouts = Timeouts()
    checkpointable: bool = False
    preemptible: bool = False
    labels: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    # A multi-node (gang) job: each task runs on this many nodes at once, each node with
    # ``resources``; ``launch`` "all" runs the command on every node (ranks), "leader" on the
    # first only (for ``mpirun -hostfile``).
    nodes: int = 1
    launch: Literal["all", "leader"] = "all"
    # SIGUSR1 this long (seconds) before max_runtime and before a planned drain of the node;
    # and how many of each task's last checkpoints the job keeps (older ones are deleted).
    checkpoint_warning: float | None = None
    checkpoint_retention: int = 3
    metadata: bytes = b"{}"
    source: str = ""
    owner: str | None = None  # the principal that submitted it (None: unknown, or the join token)

    def graph_job(self) -> GraphJob:
        """Return the job as the dependency graph sees it (frames, else task indices)."""
        return GraphJob(
            job_id=self.job_id,
            elements=tuple(
                (t.start, t.end) if t.start is not None and t.end is not None else (i, i)
                for i, t in enumerate(self.tasks)
            ),
            dependencies=self.dependencies,
        )

    def task_resources(self, index: int) -> Resources:
        """Return what task ``index`` requests (its override, else the job's)."""
        task = self.tasks[index]
        return task.resources if task.resources is not None else self.resources

    def task_requires(self, index: int) -> tuple[str, ...]:
        """Return the node labels task ``index`` requires (the job's and its own)."""
        own = self.tasks[index].requires
        if not own:
            return self.requires
        return tuple(sorted({*self.requires, *own}))

    def task_nodes(self, index: int) -> int:
        """Return how many nodes task ``index`` runs on at once (1: a single-node task)."""
        own = self.tasks[index].nodes
        return own if own is not None else self.nodes

    def task_max_runtime(self, index: int) -> float | None:
        """Return task ``index``'s walltime in seconds (its own, else the job's; None:
        unbounded)."""
        own = self.tasks[index].max_runtime
        return own if own is not None else self.timeouts.max_runtime

    def task_checkpoint_warning(self, index: int) -> float | None:
        """Return how long before task ``index``'s walltime (or a planned drain of its node)
        it is asked to checkpoint (its own, else the job's; None: not warned)."""
        own = self.tasks[index].checkpoint_warning
        return own if own is not None else self.checkpoint_warning

    def metadata_as(self, target: type[T]) -> T:
        """Decode ``metadata`` into ``target`` (a domain's struct).

        Raises:
            msgspec.ValidationError: the metadata does not match ``target``.
        """
        return msgspec.json.decode(self.metadata, type=target)

    def invocations(self, index: int, *, attempt: int) -> tuple[Invocation, ...]:
        """Render the processes that attempt ``attempt`` of task ``index`` runs, in order.

        One per frame when a template uses ``{frame}``, else one for the whole task.
        """
        task = self.tasks[index]
        command = task.command or self.command
        env = _merge_env(self.env, task.env)
        templates = [*command, *(v for _, v in env), self.output or ""]
        per_frame = task.start is not None and any(_uses(t, "frame") for t in templates)
        frames: Iterable[int | None] = task.frames if per_frame else (None,)
        runs = []
        for frame in frames:
            values: dict[str, object] = {
                "job": self.job_id,
                "task": task.name,
                "attempt": attempt,
                "start": task.start,
                "end": task.end,
                "frame": frame if frame is not None else task.start,
            }
            output = self.output.format_map(values) if self.output is not None else None
            values["output"] = output
            runs.append(
                Invocation(
                    argv=tuple(a.format_map(values) for a in command),
                    env=tuple((k, v.format_map(values)) for k, v in env),
                    cwd=self.cwd,
                    output=output,
                )
            )
        return tuple(runs)


class SubmitJobs(Message, frozen=True, kw_only=True, tag="engine.submit_jobs"):
    """Submit several jobs at once, all or nothing (one spec file)."""

    jobs: tuple[SubmitJob, ...]


class JobSpecFile(msgspec.Struct, frozen=True, kw_only=True):
    """A validated spec file: its jobs, whose ids are their names until ``to_commands``."""

    source: str
    jobs: tuple[SubmitJob, ...]

    def to_commands(self, *, job_ids: Mapping[str, str] | None = None) -> SubmitJobs:
        """Return the submission, renaming jobs (and references to them) by ``job_ids``.

        Names missing from ``job_ids`` stay as they are; references to jobs outside the file
        are left alone.
        """
        rename = dict(job_ids or {})
        local = {job.job_id for job in self.jobs}

        def new_id(name: str) -> str:
            return rename.get(name, name) if name in local else name

        return SubmitJobs(
            jobs=tuple(
                msgspec.structs.replace(
                    job,
                    job_id=new_id(job.job_id),
                    dependencies=tuple(
                        msgspec.structs.replace(d, parent=new_id(d.parent))
                        for d in job.dependencies
                    ),
                )
                for job in self.jobs
            )
        )


# --- the inbound format (unknown fields rejected) -----------------------------------------------

# Every container and every free-text value has a maximum length (see ``_limits``): the bounds
# are checked while decoding, so a refused spec never builds anything big.
_Text = Annotated[str, msgspec.Meta(max_length=limits.MAX_VALUE_TEXT)]
_Size = int | _Text
_Duration = int | float | _Text
_Path = Annotated[str, msgspec.Meta(max_length=limits.MAX_PATH_BYTES)]
_Template = Annotated[str, msgspec.Meta(max_length=limits.MAX_ARG_BYTES)]
_Argv = Annotated[list[_Template], msgspec.Meta(max_length=limits.MAX_ARGS)]
_Env = Annotated[dict[str, _Template], msgspec.Meta(max_length=limits.MAX_ENV_VARS)]
_JobRef = Annotated[str, msgspec.Meta(max_length=limits.MAX_LABEL_LENGTH)]
_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_Name = Annotated[str, msgspec.Meta(pattern=_NAME_PATTERN)]
_Label = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.MAX_LABEL_LENGTH)]
# A required node label: "gpu" (present) or "os=linux" (key with that value).
_Requirement = Annotated[
    str,
    msgspec.Meta(
        max_length=limits.MAX_LABEL_LENGTH,
        pattern=r"^[A-Za-z0-9_.@:/-]+(=[A-Za-z0-9_.@:/-]+)?$",
    ),
]
_Requirements = Annotated[list[_Requirement], msgspec.Meta(max_length=limits.MAX_LABELS)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_COUNTER)]


class _ResourcesIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cores: int | float | _Text = 1  # a job that names nothing still takes a core
    memory: _Size = 0
    gpus: Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_GPUS)] = 0
    gpu_memory: _Size = 0
    scratch: _Size = 0
    counters: Annotated[dict[str, _Count], msgspec.Meta(max_length=limits.MAX_COUNTERS)] = {}


_When = Annotated[str, msgspec.Meta(max_length=200)]


class _ElementMapIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    offset: Annotated[
        int, msgspec.Meta(ge=-limits.MAX_FRAME_NUMBER, le=limits.MAX_FRAME_NUMBER)
    ] = 0
    before: Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_FRAMES)] = 0
    after: Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_FRAMES)] = 0


class _DependencyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    job: _JobRef
    condition: Condition = Condition.ON_SUCCESS
    task: _JobRef | None = None
    elementwise: bool | _ElementMapIn = False
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    on_parent_failure: OnParentFailure = "cancel"
    when: _When | None = None


class _TaskDependencyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    task: _JobRef
    condition: Condition = Condition.ON_SUCCESS
    on_parent_failure: OnParentFailure = "cancel"
    when: _When | None = None


_TaskDependencies = Annotated[
    list[_JobRef | _TaskDependencyIn], msgspec.Meta(max_length=limits.MAX_DEPENDENCIES)
]


class _TaskIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: _Name | None = None
    frames: _Text | int | None = None
    command: _Argv | None = None
    env: _Env = {}
    resources: _ResourcesIn | None = None
    depends_on: _TaskDependencies = []
    requires: _Requirements = []
    max_runtime: _Duration | None = None
    nodes: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_GANG_NODES)] | None = None
    checkpoint_warning: _Duration | None = None


class _RetriesIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_ATTEMPTS)] = 3
    backoff: _Duration = 30
    backoff_factor: Annotated[float, msgspec.Meta(ge=1, le=limits.MAX_BACKOFF_FACTOR)] = 2.0
    max_backoff: _Duration = 600
    max_lost: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_ATTEMPTS)] = 3


class _TimeoutsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_runtime: _Duration | None = None
    stall: _Duration | None = None


class _JobIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: _Name
    priority: Priority = Priority.MEDIUM
    command: _Argv | None = None
    frames: _Text | int | None = None
    chunk: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_FRAMES)] = 1
    tasks: Annotated[list[_TaskIn], msgspec.Meta(max_length=limits.MAX_TASKS)] | None = None
    output: _Path | None = None
    env: _Env = {}
    cwd: _Path | None = None
    resources: _ResourcesIn = msgspec.field(default_factory=_ResourcesIn)
    depends_on: Annotated[
        list[_JobRef | _DependencyIn], msgspec.Meta(max_length=limits.MAX_DEPENDENCIES)
    ] = []
    retries: _RetriesIn = msgspec.field(default_factory=_RetriesIn)
    timeouts: _TimeoutsIn = msgspec.field(default_factory=_TimeoutsIn)
    checkpointable: bool = False
    preemptible: bool = False
    labels: Annotated[list[_Label], msgspec.Meta(max_length=limits.MAX_LABELS)] = []
    requires: _Requirements = []
    nodes: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_GANG_NODES)] = 1
    launch: Literal["all", "leader"] = "all"
    checkpoint_warning: _Duration | None = None
    checkpoint_retention: Annotated[int, msgspec.Meta(ge=1, le=limits.MAX_CHECKPOINT_RETENTION)] = 3
    metadata: dict[str, Any] = {}


class _SpecFileIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: Literal[1] = 1
    jobs: Annotated[list[_JobIn], msgspec.Meta(min_length=1, max_length=limits.MAX_JOBS)]


# --- loading ------------------------------------------------------------------------------------


def read_spec_text(path: str | Path) -> str:
    """Read a spec file's text: at most ``MAX_SPEC_BYTES`` of UTF-8.

    Raises:
        SpecError: the file cannot be read, is too large (checked before it is read) or is
            not UTF-8 text; the error names the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(limits.MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(
            path=str(path), field="", problem=f"cannot read the file: {e.strerror or e}"
        ) from e
    if len(data) > limits.MAX_SPEC_BYTES:
        raise SpecError(path=str(path), field="", problem=_too_large())
    return _decode_utf8(data, source=str(path))


def load_spec(path: str | Path, *, known_jobs: Collection[str] = ()) -> JobSpecFile:
    """Load and validate a spec file; ``.json`` is JSON, anything else TOML.

    ``known_jobs`` are ids of jobs already submitted that dependencies may name.

    Raises:
        SpecError: the file cannot be read or the spec is invalid.
    """
    path = Path(path)
    text = read_spec_text(path)
    fmt: Literal["toml", "json"] = "json" if path.suffix.lower() == ".json" else "toml"
    return parse_spec(text, fmt=fmt, source=str(path), known_jobs=known_jobs)


def parse_spec(
    text: str,
    *,
    fmt: Literal["toml", "json"],
    source: str = "<spec>",
    known_jobs: Collection[str] = (),
) -> JobSpecFile:
    """Parse and validate a spec document; ``source`` names it in errors.

    Raises:
        SpecError: the document is malformed, too large or too deeply nested, or the spec is
            invalid.
    """
    source = limits.shown(source, limit=limits.MAX_PATH_BYTES)
    # Characters never outnumber UTF-8 bytes: the cheap test first, the exact one after.
    if len(text) > limits.MAX_SPEC_BYTES or len(_encoded(text)) > limits.MAX_SPEC_BYTES:
        raise SpecError(path=source, field="", problem=_too_large())
    if fmt not in ("toml", "json"):
        raise SpecError(path=source, field="", problem=f"unknown format {limits.shown(fmt)!r}")
    try:
        data: Any = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except RecursionError:
        # The parsers recurse once per level: far deeper than any spec, caught here.
        raise SpecError(path=source, field="", problem=_too_deep()) from None
    except ValueError as e:  # TOMLDecodeError, JSONDecodeError, an integer of 5,000 digits
        # Python's hint for a 5,000-digit integer names a function, not the spec's problem.
        problem = limits.shown(str(e).partition("; use sys.")[0], limit=200)
        raise SpecError(path=source, field="", problem=f"invalid {fmt.upper()}: {problem}") from e
    if limits.nesting_depth(data) > limits.MAX_SPEC_DEPTH:
        raise SpecError(path=source, field="", problem=_too_deep())
    try:
        raw = msgspec.convert(data, type=_SpecFileIn)
    except msgspec.ValidationError as e:
        field, problem = _translate(str(e))
        raise SpecError(path=source, field=field, problem=problem) from e
    return _Builder(source, raw, frozenset(known_jobs)).build()


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _too_large() -> str:
    return (
        f"larger than the maximum of {limits.MAX_SPEC_BYTES // 2**20} MiB for a spec; "
        "split it into several files"
    )


def _too_deep() -> str:
    return f"nested more than {limits.MAX_SPEC_DEPTH} levels deep (tables and lists)"


def _decode_utf8(data: bytes, *, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(
            path=source,
            field="",
            problem=f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
            f"(line {line}); save the file as UTF-8",
        ) from None


def parse_duration(value: int | float | str, *, what: str = "duration") -> float:
    """Parse a duration into seconds: a number (seconds) or a string such as ``"90s"``,
    ``"5m"``, ``"2h"``, ``"1d"``, ``"1h30m"`` or ``"250ms"``.

    Raises:
        ValueError: the value is negative or not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration like '5m', got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(f"{what}: must be a finite, non-negative number of seconds")
        return float(value)
    text = value.strip().replace(" ", "")
    if text.startswith("-"):
        raise ValueError(f"{what}: {value!r} must not be negative")
    if not text or not _DURATION_RE.fullmatch(text):
        raise ValueError(
            f"{what}: {value!r} is not a duration (expected e.g. '90s', '5m', '1h30m', '2d')"
        )
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_RE: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_FRAMES_RE: Final = re.compile(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?")
# Bounds that keep one mistyped spec from exhausting the coordinator's memory ("1-100000000"
# with chunk 1 would be a hundred million tasks, built before anything else is checked).
_MAX_FRAMES: Final = limits.MAX_FRAMES  # in one frame range
_MAX_TASKS: Final = limits.MAX_TASKS  # in one job
_INT_PLACEHOLDERS: Final = frozenset({"frame", "start", "end", "attempt"})
_FRAME_PLACEHOLDERS: Final = frozenset({"frame", "start", "end"})
_BASE_PLACEHOLDERS: Final = frozenset({"job", "task", "attempt", "output"})


class _Builder:
    """Turns the decoded inbound spec into ``SubmitJob`` commands, checking as it goes."""

    def __init__(self, source: str, raw: _SpecFileIn, known_jobs: frozenset[str]) -> None:
        self.source = source
        self.raw = raw
        self.known = known_jobs
        self.index = {job.name: i for i, job in reversed(list(enumerate(raw.jobs)))}
        self.task_names: dict[str, dict[str, int]] = {}

    def fail(self, field: str, problem: str) -> SpecError:
        return SpecError(path=self.source, field=field, problem=problem)

    def build(self) -> JobSpecFile:
        seen: dict[str, int] = {}
        for i, job in enumerate(self.raw.jobs):
            if job.name in seen:
                raise self.fail(
                    f"jobs[{i}].name",
                    f"duplicate job name {job.name!r} (also jobs[{seen[job.name]}].name)",
                )
            seen[job.name] = i
        tasks = [self.tasks(i, job) for i, job in enumerate(self.raw.jobs)]
        self.check_task_total(tasks)
        for i, job in enumerate(self.raw.jobs):
            self.task_names[job.name] = {t.name: t.index for t in tasks[i]}
        built: list[SubmitJob] = []
        dep_fields: list[list[str]] = []
        for i, job in enumerate(self.raw.jobs):
            dependencies, fields = self.dependencies(i, job)
            dep_fields.append(fields)
            built.append(
                SubmitJob(
                    job_id=job.name,
                    name=job.name,
                    priority=job.priority,
                    command=self.command(f"jobs[{i}].command", job.command),
                    env=tuple(sorted(job.env.items())),
                    cwd=job.cwd,
                    output=job.output,
                    resources=self.resources(f"jobs[{i}].resources", job.resources),
                    tasks=tasks[i],
                    dependencies=dependencies,
                    retries=self.retries(i, job.retries),
                    timeouts=self.timeouts(i, job.timeouts),
                    checkpointable=job.checkpointable,
                    preemptible=job.preemptible,
                    labels=tuple(sorted(set(job.labels))),
                    requires=tuple(sorted(set(job.requires))),
                    nodes=job.nodes,
                    launch=job.launch,
                    checkpoint_warning=self.walltime(
                        f"jobs[{i}].checkpoint_warning", job.checkpoint_warning
                    ),
                    checkpoint_retention=job.checkpoint_retention,
                    metadata=msgspec.json.encode(msgspec.to_builtins(job.metadata), order="sorted"),
                    source=self.source,
                )
            )
            self.templates(i, job, built[-1])
            self.check_bounds(i, built[-1])
        self.check_graph(built, dep_fields)
        return JobSpecFile(source=self.source, jobs=tuple(built))

    # --- tasks ---

    def frames(self, field: str, value: str | int) -> tuple[int, int]:
        match = _FRAMES_RE.fullmatch(str(value))
        if match is None:
            raise self.fail(
                field, f"expected a frame range like '1-100' or '7', got {limits.shown(value)!r}"
            )
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        for number in (start, end):
            if abs(number) > limits.MAX_FRAME_NUMBER:
                raise self.fail(
                    field,
                    f"frame {limits.shown(number)} is beyond the maximum frame number "
                    f"(±{limits.MAX_FRAME_NUMBER:,})",
                )
        if end < start:
            raise self.fail(field, f"empty frame range {value!r}: end {end} is before {start}")
        if end - start + 1 > _MAX_FRAMES:
            raise self.fail(
                field, f"frame range {value!r} has {end - start + 1} frames, at most {_MAX_FRAMES}"
            )
        return start, end

    def tasks(self, i: int, job: _JobIn) -> tuple[TaskSpec, ...]:
        at = f"jobs[{i}]"
        if job.frames is not None and job.tasks is not None:
            raise self.fail(f"{at}.tasks", "give either frames (with chunk) or tasks, not both")
        if job.chunk != 1 and job.frames is None:
            raise self.fail(f"{at}.chunk", "chunk needs frames")
        if job.frames is not None:
            start, end = self.frames(f"{at}.frames", job.frames)
            count = (end - start) // job.chunk + 1
            if count > _MAX_TASKS:
                raise self.fail(
                    f"{at}.chunk",
                    f"{count} tasks of {job.chunk} frame(s), at most {_MAX_TASKS} in a job; "
                    "use a larger chunk",
                )
            return tuple(
                TaskSpec(
                    index=k,
                    name=f"{s}-{min(s + job.chunk - 1, end)}" if job.chunk > 1 else str(s),
                    start=s,
                    end=min(s + job.chunk - 1, end),
                )
                for k, s in enumerate(range(start, end + 1, job.chunk))
            )
        if job.tasks is None:
            return (TaskSpec(index=0, name="0"),)
        if not job.tasks:
            raise self.fail(f"{at}.tasks", "expected at least one task")
        if len(job.tasks) > _MAX_TASKS:
            raise self.fail(f"{at}.tasks", f"{len(job.tasks)} tasks, at most {_MAX_TASKS} in a job")
        specs: list[TaskSpec] = []
        names: dict[str, int] = {}
        framed = [t.frames is not None for t in job.tasks]
        if any(framed) and not all(framed):
            raise self.fail(
                f"{at}.tasks[{framed.index(False)}].frames",
                "either every task has frames or none has",
            )
        for k, task in enumerate(job.tasks):
            where = f"{at}.tasks[{k}]"
            name = task.name if task.name is not None else str(k)
            if name in names:
                raise self.fail(
                    f"{where}.name", f"duplicate task name {name!r} (also tasks[{names[name]}])"
                )
            names[name] = k
            first: int | None = None
            last: int | None = None
            if task.frames is not None:
                first, last = self.frames(f"{where}.frames", task.frames)
            specs.append(
                TaskSpec(
                    index=k,
                    name=name,
                    start=first,
                    end=last,
                    command=self.command(f"{where}.command", task.command),
                    env=tuple(sorted(task.env.items())),
                    resources=(
                        self.resources(f"{where}.resources", task.resources)
                        if task.resources is not None
                        else None
                    ),
                    requires=tuple(sorted(set(task.requires))),
                    max_runtime=self.walltime(f"{where}.max_runtime", task.max_runtime),
                    nodes=task.nodes,
                    checkpoint_warning=self.walltime(
                        f"{where}.checkpoint_warning", task.checkpoint_warning
                    ),
                )
            )
        return tuple(specs)

    def walltime(self, field: str, value: int | float | str | None) -> float | None:
        if value is None:
            return None
        seconds = self.duration(field, value, maximum=limits.MAX_RUNTIME)
        if seconds <= 0:
            raise self.fail(field, "expected a duration above zero")
        return seconds

    def command(self, field: str, value: list[str] | None) -> tuple[str, ...]:
        if value is None:
            return ()
        if not value:
            raise self.fail(field, "expected a non-empty argv list")
        return tuple(value)

    # --- values ---

    def resources(self, field: str, value: _ResourcesIn) -> Resources:
        def parse(name: str, fn: Callable[[], int], maximum: int, unit: str) -> int:
            # Above the maximum is refused whatever the farm has: no node could ever fit it,
            # and quantities this large overflow the journal's integers.
            raw = getattr(value, name)
            beyond = (
                f"{limits.shown(raw)} is more than the maximum of {unit} "
                "(no node could ever fit it)"
            )
            try:
                quantity = fn()
            except ResourceError as e:
                if "too large" in str(e):
                    raise self.fail(f"{field}.{name}", beyond) from e
                problem = str(e).partition(": ")[2] or str(e)
                raise self.fail(f"{field}.{name}", problem) from e
            if quantity > maximum:
                raise self.fail(f"{field}.{name}", beyond)
            return quantity

        millicores = parse(
            "cores",
            lambda: parse_cores(value.cores),
            limits.MAX_CORES * 1000,
            f"{limits.MAX_CORES:,} cores",
        )
        memory = parse(
            "memory",
            lambda: parse_size(value.memory, what="memory"),
            limits.MAX_MEMORY,
            format_size(limits.MAX_MEMORY),
        )
        gpu_memory = parse(
            "gpu_memory",
            lambda: parse_size(value.gpu_memory, what="gpu_memory"),
            limits.MAX_GPU_MEMORY,
            f"{format_size(limits.MAX_GPU_MEMORY)} per GPU",
        )
        scratch = parse(
            "scratch",
            lambda: parse_size(value.scratch, what="scratch"),
            limits.MAX_SCRATCH,
            format_size(limits.MAX_SCRATCH),
        )
        if gpu_memory and not value.gpus:
            raise self.fail(f"{field}.gpu_memory", "gpu_memory needs gpus (it is per GPU)")
        for name in value.counters:
            if not 1 <= len(name) <= limits.MAX_LABEL_LENGTH:
                raise self.fail(
                    f"{field}.counters",
                    f"a counter name has 1 to {limits.MAX_LABEL_LENGTH} characters, "
                    f"got {limits.shown(name)!r}",
                )
        return Resources(
            millicores=millicores,
            memory=memory,
            gpus=value.gpus,
            gpu_memory=gpu_memory,
            scratch=scratch,
            counters=tuple(value.counters.items()),
        )

    def duration(self, field: str, value: _Duration, *, maximum: float) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise self.fail(field, str(e).partition(": ")[2]) from e
        if seconds > maximum:
            written = limits.shown(value if isinstance(value, str) else f"{value:g}s")
            raise self.fail(
                field,
                f"{written} is longer than the maximum of {limits.format_duration(maximum)}",
            )
        return seconds

    def retries(self, i: int, value: _RetriesIn) -> RetryPolicy:
        at = f"jobs[{i}].retries"
        return RetryPolicy(
            max_attempts=value.max_attempts,
            backoff=self.duration(f"{at}.backoff", value.backoff, maximum=limits.MAX_BACKOFF),
            backoff_factor=value.backoff_factor,
            max_backoff=self.duration(
                f"{at}.max_backoff", value.max_backoff, maximum=limits.MAX_BACKOFF
            ),
            max_lost=value.max_lost,
        )

    def timeouts(self, i: int, value: _TimeoutsIn) -> Timeouts:
        at = f"jobs[{i}].timeouts"
        result: dict[str, float] = {}
        maxima = {"max_runtime": limits.MAX_RUNTIME, "stall": limits.MAX_STALL}
        for name, maximum in maxima.items():
            raw = getattr(value, name)
            if raw is not None:
                seconds = self.duration(f"{at}.{name}", raw, maximum=maximum)
                if seconds <= 0:
                    raise self.fail(f"{at}.{name}", "expected a duration above zero")
                result[name] = seconds
        return Timeouts(**result)

    # --- bounds ---

    def check_task_total(self, tasks: list[tuple[TaskSpec, ...]]) -> None:
        total = sum(len(t) for t in tasks)
        if total > limits.MAX_TASKS_PER_FILE:
            raise self.fail(
                "jobs",
                f"{total:,} tasks in all, more than the maximum of "
                f"{limits.MAX_TASKS_PER_FILE:,} in one file; split it into several files",
            )

    def check_bounds(self, i: int, job: SubmitJob) -> None:
        """Check what the inbound types cannot: characters no process can take, the metadata's
        size, and the size of every command as it will be expanded for an attempt."""
        at = f"jobs[{i}]"
        where_tasks = [(f"{at}.tasks[{t.index}]", t.command, t.env) for t in job.tasks]
        for where, command, env in [(at, job.command, job.env), *where_tasks]:
            for k, arg in enumerate(command):
                if "\0" in arg:
                    raise self.fail(f"{where}.command[{k}]", "contains a NUL character")
            for name, value in env:
                if not name or "=" in name or "\0" in name:
                    raise self.fail(
                        f"{where}.env",
                        f"{limits.shown(name)!r} is not a variable name (empty, or has '=' or "
                        "a NUL character)",
                    )
                if "\0" in value:
                    raise self.fail(f"{where}.env.{name}", "contains a NUL character")
        for key, path in (("cwd", job.cwd), ("output", job.output)):
            if path is not None and "\0" in path:
                raise self.fail(f"{at}.{key}", "contains a NUL character")
        if len(job.metadata) > limits.MAX_METADATA_BYTES:
            raise self.fail(
                f"{at}.metadata",
                f"{len(job.metadata):,} bytes as JSON, more than the maximum of "
                f"{limits.MAX_METADATA_BYTES:,}",
            )
        self.check_warnings(at, job)
        self.check_expansions(at, job)

    def check_warnings(self, at: str, job: SubmitJob) -> None:
        """A checkpoint warning is a SIGUSR1, which only a checkpointable job gets, and it must
        come before the walltime it warns of."""
        for task in job.tasks:
            where = f"{at}.tasks[{task.index}]" if task.checkpoint_warning is not None else at
            warning = job.task_checkpoint_warning(task.index)
            if warning is None:
                continue
            if not job.checkpointable:
                raise self.fail(
                    f"{where}.checkpoint_warning",
                    "needs checkpointable = true (the warning is a SIGUSR1, which only a "
                    "checkpointable job is sent)",
                )
            runtime = job.task_max_runtime(task.index)
            if runtime is not None and warning >= runtime:
                raise self.fail(
                    f"{where}.checkpoint_warning",
                    f"{limits.format_duration(warning)} is not shorter than the max_runtime "
                    f"it warns of ({limits.format_duration(runtime)})",
                )

    def check_expansions(self, at: str, job: SubmitJob) -> None:
        """Refuse a command that, expanded for some frame of some task, is more than a process
        can take (an argument or env entry, the whole argv and env, a task's frame sequence).

        The size of a rendering depends on how long each value is, not on which value it is,
        so tasks of one shape (a chunked range: same name length, same digits and bits in
        their first and last frames) are checked once.  A task's widest frames are its first
        and last.
        """
        seen: set[tuple[object, ...]] = set()
        for task in job.tasks:
            frames = (task.start, task.end) if task.start is not None else (None,)
            shape = (
                task.command,
                task.env,
                len(task.name),
                len(task.frames),
                tuple((len(str(f)), f.bit_length()) for f in frames if f is not None),
            )
            if shape in seen:
                continue
            seen.add(shape)
            self.check_task_expansion(at, job, task)

    def check_task_expansion(self, at: str, job: SubmitJob, task: TaskSpec) -> None:
        command = task.command or job.command
        command_field = f"{at}.tasks[{task.index}].command" if task.command else f"{at}.command"
        env = _merge_env(job.env, task.env)
        task_env = dict(task.env)
        templates = [*command, *(v for _, v in env), job.output or ""]
        per_frame = task.start is not None and any(_uses(t, "frame") for t in templates)
        frames: tuple[int | None, ...] = (task.start, task.end) if per_frame else (task.start,)
        # A framed task is named by its frames; a stage (an explicit task) by its name.
        if task.start is None:
            label = f"task {task.name!r}"
        elif task.start == task.end:
            label = f"task {task.index} (frame {task.start})"
        else:
            label = f"task {task.index} (frames {task.start}-{task.end})"
        longest = 0
        for frame in dict.fromkeys(frames):
            values: dict[str, object] = {
                "job": job.job_id,
                "task": task.name,
                "attempt": limits.WORST_ATTEMPT,
                "start": task.start,
                "end": task.end,
                "frame": frame if frame is not None else task.start,
            }
            where = f"frame {frame} of task {task.index}" if per_frame else label
            if job.output is not None:
                size = limits.expanded_size(job.output, values, limit=limits.MAX_PATH_BYTES)
                if size > limits.MAX_PATH_BYTES:
                    raise self.fail(
                        f"{at}.output",
                        f"expands to more than the maximum of {limits.MAX_PATH_BYTES:,} bytes "
                        f"for {where}",
                    )
                values["output"] = job.output.format_map(values)
            total = 0
            for k, arg in enumerate(command):
                size = limits.expanded_size(arg, values, limit=limits.MAX_ARG_BYTES)
                if size > limits.MAX_ARG_BYTES:
                    raise self.fail(
                        f"{command_field}[{k}]",
                        f"expands to more than the maximum of {limits.MAX_ARG_BYTES:,} bytes "
                        f"an argument may have, for {where}",
                    )
                total += size + 1
            for name, value in env:
                size = (
                    len(name) + 1 + limits.expanded_size(value, values, limit=limits.MAX_ARG_BYTES)
                )
                if size > limits.MAX_ARG_BYTES:
                    field = f"{at}.tasks[{task.index}].env" if name in task_env else f"{at}.env"
                    raise self.fail(
                        f"{field}.{name}",
                        f"expands to more than the maximum of {limits.MAX_ARG_BYTES:,} bytes "
                        f"an environment entry may have, for {where}",
                    )
                total += size + 1
            if total > limits.MAX_PROCESS_BYTES:
                raise self.fail(
                    command_field,
                    f"the command and env expand to {total:,} bytes for {where}, more than "
                    f"the maximum of {limits.MAX_PROCESS_BYTES:,} for one process",
                )
            if per_frame:
                argv = [a.format_map(values) for a in command]
                longest = max(longest, len(json.dumps(argv)))
        count = len(task.frames)
        if per_frame and count > 1:
            # Sent (and started) as one argument: every frame's argv as a JSON list.
            sequence = count * (longest + 2)
            if sequence > limits.MAX_SEQUENCE_BYTES:
                raise self.fail(
                    command_field,
                    f"the {count:,} frames of {label} expand "
                    f"to about {sequence:,} bytes of commands, more than the maximum of "
                    f"{limits.MAX_SEQUENCE_BYTES:,} for one task's frame sequence; use a "
                    "smaller chunk",
                )

    # --- templates ---

    def templates(self, i: int, raw: _JobIn, job: SubmitJob) -> None:
        at = f"jobs[{i}]"
        allowed = set(_BASE_PLACEHOLDERS)
        if all(t.start is not None for t in job.tasks):
            allowed |= _FRAME_PLACEHOLDERS
        if job.output is None:
            allowed.discard("output")
        if job.output is not None:
            self.template(f"{at}.output", job.output, allowed - {"output"})
        if not job.command and not all(t.command for t in job.tasks):
            missing = next(t.index for t in job.tasks if not t.command)
            where = f"{at}.command" if raw.tasks is None else f"{at}.tasks[{missing}].command"
            raise self.fail(where, "a command is required (on the job or on every task)")
        for k, arg in enumerate(job.command):
            self.template(f"{at}.command[{k}]", arg, allowed)
        for name, val in job.env:
            self.template(f"{at}.env.{name}", val, allowed)
        for task in job.tasks:
            for k, arg in enumerate(task.command):
                self.template(f"{at}.tasks[{task.index}].command[{k}]", arg, allowed)
            for name, val in task.env:
                self.template(f"{at}.tasks[{task.index}].env.{name}", val, allowed)

    def template(self, field: str, text: str, allowed: Collection[str]) -> None:
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise self.fail(
                field, f"invalid template {limits.shown(text)!r}: {e} (write '{{{{' for '{{')"
            ) from e
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            known = ", ".join(f"{{{p}}}" for p in sorted(allowed))
            if name not in allowed:
                what = (
                    "a placeholder needs a name" if not name else f"unknown placeholder {{{name}}}"
                )
                if name in _FRAME_PLACEHOLDERS or name == "output":
                    what += " (not available here: " + (
                        "no output is set)" if name == "output" else "the tasks have no frames)"
                    )
                raise self.fail(field, f"{what}; allowed: {known}")
            if conversion is not None or (spec and "{" in spec):
                raise self.fail(field, f"placeholder {{{name}}} may only have a format spec")
            # Checked from its digits before anything is formatted: formatting first would
            # build the 20 MB string of a mistyped ``{frame:>20000000}``.
            width = limits.largest_format_number(spec or "")
            if width > limits.MAX_ARG_BYTES:
                raise self.fail(
                    field,
                    f"format width {limits.shown(width)} in {{{name}:{limits.shown(spec)}}} is "
                    f"more than the maximum of {limits.MAX_ARG_BYTES:,} bytes an argument may have",
                )
            if name in _INT_PLACEHOLDERS and (spec or "").endswith("c"):
                # A frame as a character: NUL for frame 0, an error for frames beyond Unicode.
                raise self.fail(field, f"format type 'c' is not allowed for {{{name}}}")
            try:
                format(1 if name in _INT_PLACEHOLDERS else "x", spec or "")
            except ValueError as e:
                raise self.fail(field, f"invalid format spec {spec!r} for {{{name}}}: {e}") from e

    # --- dependencies ---

    def dependencies(self, i: int, job: _JobIn) -> tuple[tuple[Dependency, ...], list[str]]:
        deps: list[Dependency] = []
        fields: list[str] = []
        for m, entry in enumerate(job.depends_on):
            field = f"jobs[{i}].depends_on[{m}]"
            item = _DependencyIn(job=entry) if isinstance(entry, str) else entry
            if item.job not in self.index and item.job not in self.known:
                hint = difflib.get_close_matches(item.job, list(self.index), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.fail(field, f"unknown dependency: no job {item.job!r}{suggestion}")
            parent_task = None
            if item.task is not None:
                names = self.task_names.get(item.job)
                if names is None:
                    raise self.fail(
                        f"{field}.task", "task names are known only for jobs in the same file"
                    )
                if item.task not in names:
                    raise self.fail(f"{field}.task", f"job {item.job!r} has no task {item.task!r}")
                parent_task = names[item.task]
            elementwise = None
            if isinstance(item.elementwise, _ElementMapIn):
                e = item.elementwise
                elementwise = ElementMap(offset=e.offset, before=e.before, after=e.after)
            elif item.elementwise:
                elementwise = ElementMap()
            self.when(field, item.when, item.condition, item.threshold)
            deps.append(
                Dependency(
                    parent=item.job,
                    condition=item.condition,
                    parent_task=parent_task,
                    elementwise=elementwise,
                    threshold=item.threshold,
                    on_parent_failure=item.on_parent_failure,
                    when=item.when,
                )
            )
            fields.append(field)
        for k, task in enumerate(job.tasks or ()):
            for m, task_entry in enumerate(task.depends_on):
                field = f"jobs[{i}].tasks[{k}].depends_on[{m}]"
                tdep = (
                    _TaskDependencyIn(task=task_entry)
                    if isinstance(task_entry, str)
                    else task_entry
                )
                names = self.task_names[job.name]
                if tdep.task not in names:
                    raise self.fail(
                        field, f"unknown dependency: job {job.name!r} has no task {tdep.task!r}"
                    )
                self.when(field, tdep.when, tdep.condition, None)
                deps.append(
                    Dependency(
                        parent=job.name,
                        condition=tdep.condition,
                        parent_task=names[tdep.task],
                        child_task=k,
                        on_parent_failure=tdep.on_parent_failure,
                        when=tdep.when,
                    )
                )
                fields.append(field)
        return tuple(deps), fields

    def when(
        self, field: str, when: str | None, condition: Condition, threshold: float | None
    ) -> None:
        """Check a conditional edge: a metric condition, on an on_success edge."""
        if when is None:
            return
        try:
            MetricCondition.parse(when)
        except ValueError as error:
            raise self.fail(f"{field}.when", str(error)) from None
        if condition is not Condition.ON_SUCCESS:
            raise self.fail(
                f"{field}.when",
                f"a 'when' condition decides on the parent's success; remove condition = "
                f"{condition.value!r} (a branch not taken ends 'skipped', which "
                "on_any_outcome dependants accept)",
            )
        if threshold is not None:
            raise self.fail(f"{field}.when", "a 'when' condition cannot have a threshold")

    def task_label(self, label: str) -> str:
        """Turn the graph's ``job[2]`` into ``job[name]`` for explicit, named tasks."""
        job, _, rest = label.partition("[")
        if not rest or self.raw.jobs[self.index[job]].tasks is None:
            return label
        index = int(rest.rstrip("]"))
        names = {i: n for n, i in self.task_names[job].items()}
        return f"{job}[{names[index]}]"

    def check_graph(self, jobs: list[SubmitJob], dep_fields: list[list[str]]) -> None:
        """Check the file's own dependency structure with the engine's graph."""
        local: list[GraphJob] = []
        positions: dict[str, list[int]] = {}
        for job in jobs:
            kept = [p for p, d in enumerate(job.dependencies) if d.parent in self.index]
            positions[job.job_id] = kept
            graph_job = job.graph_job()
            local.append(
                msgspec.structs.replace(
                    graph_job, dependencies=tuple(job.dependencies[p] for p in kept)
                )
            )
        try:
            DependencyGraph().check_new(local)
        except DependencyCycleError as e:
            i = self.index[e.job]
            task = e.cycle[0].partition("[")[2]
            field = f"jobs[{i}].depends_on"
            if task and self.raw.jobs[i].tasks is not None:
                field = f"jobs[{i}].tasks[{task.rstrip(']')}].depends_on"
            path = " -> ".join(self.task_label(label) for label in e.cycle)
            raise self.fail(field, f"dependency cycle: {path} (each waits on the next)") from e
        except DependencyError as e:
            i = self.index.get(e.job, 0)
            field = f"jobs[{i}].depends_on"
            if e.position is not None:
                field = dep_fields[i][positions[e.job][e.position]]
            raise self.fail(field, str(e)) from e


def _merge_env(
    base: tuple[tuple[str, str], ...], extra: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    if not extra:
        return base
    return tuple(sorted({**dict(base), **dict(extra)}.items()))


def _uses(template: str, name: str) -> bool:
    return any(field == name for _, field, _, _ in string.Formatter().parse(template))


# --- msgspec error translation -----------------------------------------------------------------

_AT: Final = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _translate(message: str) -> tuple[str, str]:
    """Turn a msgspec validation message into ``(field path, problem)``."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any string
    text, path = match.group("message"), (match.group("path") or "").lstrip(".")
    path = path.replace("[...]", "")  # msgspec's mark for "some key of this table"
    if found := re.fullmatch(r"Expected `(\w+)` <= ([\d.]+)", text):
        return path, f"more than the maximum of {_number(found.group(2))}"
    if found := re.fullmatch(r"Expected `(\w+)` of length <= (\d+)", text):
        things = "characters" if found.group(1) == "str" else "entries"
        return path, f"more than the maximum of {_number(found.group(2))} {things}"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", text, re.DOTALL):
        name = limits.shown(found.group(1))
        allowed = _fields_at(path)
        hint = difflib.get_close_matches(name, allowed, n=1)
        problem = f"unknown field {name!r}"
        if hint:
            problem += f" (did you mean {hint[0]!r}?)"
        if allowed:
            problem += f"; allowed: {', '.join(allowed)}"
        return _join(path, name), problem
    if found := re.fullmatch(r"Object missing required field `(.+)`", text):
        return _join(path, found.group(1)), "required field is missing"
    if found := re.fullmatch(r"Invalid enum value (.+)", text, re.DOTALL):
        choices = _enum_values_at(path)
        expected = f" (expected one of: {', '.join(choices)})" if choices else ""
        return path, f"invalid value {limits.shown(found.group(1))}{expected}"
    if found := re.fullmatch(r"Expected `(.+?)`(.*)", text, re.DOTALL):
        expected = found.group(1).replace("object", "table").replace("array", "list")
        rest = found.group(2).replace("`", "")
        if _NAME_PATTERN in rest:
            return path, (
                "expected a name of letters, digits, '.', '_' and '-' that starts with a "
                "letter or digit (at most 128 characters)"
            )
        return path, f"expected {expected}{rest}"
    return path, text


def _number(text: str) -> str:
    number = float(text)
    return f"{int(number):,}" if number.is_integer() else text


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _info_at(path: str) -> msgspec.inspect.Type | None:
    """Walk the inbound spec's type to ``path`` (``jobs[1].resources``)."""
    node: msgspec.inspect.Type = msgspec.inspect.type_info(_SpecFileIn)
    for part in re.findall(r"\.?([^.\[\]]+)|\[(\d+)\]", path):
        name, index = part
        node = _unwrap(node, want_struct=bool(name))
        if name and isinstance(node, msgspec.inspect.StructType):
            fields = {f.name: f.type for f in node.fields}
            if name not in fields:
                return None
            node = fields[name]
        elif index and isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
        elif name and isinstance(node, msgspec.inspect.DictType):
            node = node.value_type
        else:
            return None
    return _unwrap(node, want_struct=True)


def _unwrap(node: msgspec.inspect.Type, *, want_struct: bool) -> msgspec.inspect.Type:
    if isinstance(node, msgspec.inspect.UnionType):
        for option in node.types:
            if isinstance(option, msgspec.inspect.StructType) and want_struct:
                return option
            if isinstance(option, msgspec.inspect.ListType | msgspec.inspect.DictType):
                return option
    return node


def _fields_at(path: str) -> list[str]:
    node = _info_at(path)
    if isinstance(node, msgspec.inspect.StructType):
        return [f.name for f in node.fields]
    return []


def _enum_values_at(path: str) -> list[str]:
    node = _info_at(path)
    if isinstance(node, msgspec.inspect.UnionType):
        node = next((t for t in node.types if isinstance(t, msgspec.inspect.EnumType)), node)
    if isinstance(node, msgspec.inspect.EnumType):
        return [str(member.value) for member in node.cls]
    return []
