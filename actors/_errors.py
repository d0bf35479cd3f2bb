"""Every error the engine raises on purpose, in one place (one root: ``TaskfarmError``)."""

from __future__ import annotations

from runtime import TaskfarmError

__all__ = [
    "AccessDeniedError",
    "AgentUnavailableError",
    "AttemptSpecError",
    "CheckpointManifestError",
    "CredentialError",
    "DependencyCycleError",
    "DependencyError",
    "ExecutorError",
    "JobFinishedError",
    "JobNotFoundError",
    "ReportLineError",
    "ResourceError",
    "SlurmError",
    "SpecError",
    "TaskNotFoundError",
    "UnknownDependencyError",
    "UnknownFunctionError",
]


class ResourceError(TaskfarmError):
    """Raised when a resource quantity is invalid, or an operation would drive one below zero
    or above its limit; ``dimension`` names the resource involved (``""`` when none does)."""

    def __init__(self, message: str, *, dimension: str = "") -> None:
        self.dimension = dimension
        super().__init__(message)


class DependencyError(TaskfarmError):
    """Raised when a dependency graph operation is invalid (a duplicate job, a bad task index,
    a conflicting outcome); the two precise cases below subclass it. ``job`` names the job at
    fault and ``position`` the index of its dependency at fault, when known."""

    def __init__(self, message: str, *, job: str = "", position: int | None = None) -> None:
        self.job = job
        self.position = position
        super().__init__(message)


class UnknownDependencyError(DependencyError):
    """Raised when a job or task depends on a job or task the graph does not know;
    ``dependant`` and ``dependency`` name both ends."""

    def __init__(
        self, message: str, *, dependant: str, dependency: str, position: int | None = None
    ) -> None:
        self.dependant = dependant
        self.dependency = dependency
        super().__init__(message, job=dependant, position=position)


class DependencyCycleError(DependencyError):
    """Raised when a submission would create a dependency cycle; ``cycle`` is the path, each
    element waiting on the next and the last equal to the first (``("a", "b", "a")``)."""

    def __init__(self, cycle: tuple[str, ...]) -> None:
        self.cycle = cycle
        super().__init__(
            f"dependency cycle: {' -> '.join(cycle)} (each waits on the next)",
            job=cycle[0].partition("[")[0] if cycle else "",
        )


class SpecError(TaskfarmError):
    """Raised when a job spec is invalid; ``path`` names the file (or source), ``field`` the
    field path inside it (``jobs[1].resources.memory``, ``""`` for the whole document) and
    ``problem`` what was expected."""

    def __init__(self, *, path: str, field: str, problem: str) -> None:
        self.path = path
        self.field = field
        self.problem = problem
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {problem}")


class JobNotFoundError(TaskfarmError):
    """Raised when a command names a job the journal has never seen."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} in this farm")


class JobFinishedError(TaskfarmError):
    """Raised when an operator verb (pause, resume, amend) names a job that has already
    finished, so there is nothing to act on; ``job_id`` and ``status`` say which and how it
    ended.  The farm refuses (exit status 1): the input named a real job."""

    def __init__(self, job_id: str, status: str, *, verb: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} already {status}: nothing to {verb}")


class TaskNotFoundError(TaskfarmError):
    """Raised when a command names a task, or an attempt of a task, that a job does not have;
    ``job_id``, ``task`` and ``attempt`` (None when the task itself is missing) say which."""

    def __init__(self, message: str, *, job_id: str, task: int, attempt: int | None = None) -> None:
        self.job_id = job_id
        self.task = task
        self.attempt = attempt
        super().__init__(message)


class AttemptSpecError(TaskfarmError, ValueError):
    """Raised when an :class:`AttemptSpec` is inconsistent; ``field`` names the culprit.

    A ``ValueError``, so decoding a bad spec with msgspec raises ``msgspec.ValidationError``.
    """

    def __init__(self, message: str, *, field: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ExecutorError(TaskfarmError):
    """Raised when an executor cannot start an attempt (nothing ran, nothing was reported);
    ``job_id``, ``task_id`` and ``attempt`` identify it."""

    def __init__(self, message: str, *, job_id: str, task_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.task_id = task_id
        self.attempt = attempt
        super().__init__(f"{job_id}/{task_id} attempt {attempt}: {message}")


class UnknownFunctionError(ExecutorError):
    """Raised when a spec names a function the in-process executor's registry lacks;
    ``function`` is the name and ``known`` the registered names."""

    def __init__(
        self, *, function: str, known: tuple[str, ...], job_id: str, task_id: str, attempt: int
    ) -> None:
        self.function = function
        self.known = known
        listed = ", ".join(known) or "none"
        super().__init__(
            f"unknown function {function!r} (registered: {listed})",
            job_id=job_id,
            task_id=task_id,
            attempt=attempt,
        )


class ReportLineError(TaskfarmError, ValueError):
    """Raised when a ``@taskfarm`` report line is malformed; ``line`` is the line and
    ``reason`` what is wrong.  The executor logs it and carries on; it never escapes."""

    def __init__(self, line: str, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"{reason}: {line!r}")


class CheckpointManifestError(TaskfarmError, ValueError):
    """Raised when a checkpoint manifest cannot be read, is malformed, or the files on disk do
    not match it (missing, another size, another SHA-256); ``path`` is the manifest or the
    file at fault and ``problem`` what is wrong.  The executor refuses the checkpoint (logged,
    in the attempt log) and carries on; it never fails the attempt."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class AgentUnavailableError(ExecutorError):
    """Raised when a request needs the agent but it is not connected, the connection fails, or
    it does not answer in time; ``job_id``, ``task_id`` and ``attempt`` name the attempt."""


class CredentialError(TaskfarmError):
    """Raised when a credential cannot be issued or revoked (the name is taken or unknown, or
    the kind and role do not go together); ``name`` names the principal."""

    def __init__(self, message: str, *, name: str) -> None:
        self.name = name
        super().__init__(message)


class AccessDeniedError(TaskfarmError):
    """Raised when a client's role does not allow its request; ``principal`` names who asked,
    ``role`` its role and ``request`` what it asked for."""

    def __init__(self, message: str, *, principal: str, role: str, request: str) -> None:
        self.principal = principal
        self.role = role
        self.request = request
        super().__init__(message)


class SlurmError(TaskfarmError):
    """Raised when a Slurm command (``sbatch``, ``squeue``, ``scancel``, ``scontrol``) is
    missing, fails or answers something unexpected; ``command`` names it, and the message
    carries what Slurm said.  Exit status 1: the batch system refused or failed."""

    exit_status = 1

    def __init__(self, message: str, *, command: str) -> None:
        self.command = command
        super().__init__(message)
