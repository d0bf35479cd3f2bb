"""Errors of the engine models: resources, the dependency graph and job specs."""

from __future__ import annotations

from runtime import TaskfarmError

__all__ = [
    "DependencyCycleError",
    "DependencyError",
    "ResourceError",
    "SpecError",
    "UnknownDependencyError",
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
