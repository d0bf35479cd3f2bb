"""Simulations, their stages and scenarios: the Python API, and the workflow templates.

A :class:`Simulation` is one engine job whose tasks are its stages; what the scheduler needs to
know about it (owner, project, sweep, resilience, checkpoint size, stage estimates) travels in
the job's metadata as a :class:`SimulationMetadata`, which the science policy decodes once.  A
:class:`Scenario` is a named group of simulations (a parameter sweep, an ensemble).  Templates
build the usual shapes: a linear chain, a fan-out/fan-in, a parameter sweep from a grid with a
concurrency cap (Slurm's ``--array %N``), and a conditional branch on a reported metric.
Stages are added to a running simulation as a new job that depends on its stages
(:func:`extension`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from actors import (
    Condition,
    Dependency,
    MetricCondition,
    Priority,
    Resources,
    RetryPolicy,
    SubmitJob,
    TaskSpec,
    Timeouts,
    parse_duration,
    parse_size,
)
from runtime import ConfigurationError

from ._config import RESILIENCE_LEVELS

__all__ = [
    "Scenario",
    "Simulation",
    "SimulationMetadata",
    "SimulationStage",
    "conditional_branch",
    "extension",
    "fan_out_fan_in",
    "linear_chain",
    "parameter_sweep",
]

Resilience = Literal["low", "medium", "high", "critical"]
# Retries are the science policy's call (strategies per failure class): room for them.
_RETRIES = RetryPolicy(max_attempts=8, backoff=300.0, max_backoff=3600.0)


class SimulationMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What the science policy knows of a simulation (the job's ``metadata`` table).

    ``estimates`` and ``nodes`` are per stage name; ``sweep`` names the scenario a member
    belongs to for successive halving and its concurrency cap (``max_concurrent``).
    """

    owner: str = ""
    project: str = "default"
    scenario: str | None = None
    sweep: str | None = None
    member: str | None = None
    max_concurrent: int | None = None
    parameters: dict[str, float] = {}
    resilience: Resilience = "medium"
    checkpoint_size: int = 0
    estimates: dict[str, float] = {}
    nodes: dict[str, int] = {}


@dataclass(frozen=True, kw_only=True)
class SimulationStage:
    """One stage: a command (or an in-process ``function``), its resources, its walltime and
    estimate, and what it waits on.

    ``after`` stages must succeed first; with ``when`` (``"residual < 1e-3"``) the stage runs
    only if they succeeded with that metric condition true, and ends ``skipped`` otherwise.
    ``after_any`` stages must merely finish (completed, failed or skipped).  ``nodes`` > 1
    makes it a multi-node (gang) stage: that many nodes, each with the stage's resources, all
    or nothing; the command runs on every node (``TASKFARM_NODE_RANK``...) or, with
    ``launch = "leader"``, on the first (for ``mpirun -hostfile``).
    """

    name: str
    command: Sequence[str] = ()
    function: str | None = None
    args: Sequence[str] = ()
    cores: float | str = 1
    memory: int | str = 0
    gpus: int = 0
    requires: Sequence[str] = ()
    nodes: int = 1
    launch: Literal["all", "leader"] = "all"
    walltime: float | str | None = None
    estimate: float | str | None = None
    after: Sequence[str] = ()
    after_any: Sequence[str] = ()
    when: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self) -> tuple[str, ...]:
        """Return the stage's command line (``inprocess:NAME`` for a function)."""
        if self.function is not None:
            if self.command:
                raise ConfigurationError(
                    f"stage {self.name!r}: give a command or a function, not both",
                    where=f"stages.{self.name}",
                )
            return (f"inprocess:{self.function}", *self.args)
        if not self.command:
            raise ConfigurationError(
                f"stage {self.name!r} has no command", where=f"stages.{self.name}.command"
            )
        return (*self.command, *self.args)

    def resources(self) -> Resources:
        """Return what one node of the stage needs."""
        return Resources.of(cores=self.cores, memory=self.memory, gpus=self.gpus)


@dataclass(frozen=True, kw_only=True)
class Simulation:
    """A simulation: one job of stages, with an owner and a project."""

    name: str
    owner: str
    project: str
    stages: Sequence[SimulationStage]
    priority: Priority | str = Priority.MEDIUM
    resilience: Resilience = "medium"
    checkpoint_size: int | str = 0
    scenario: str | None = None
    sweep: str | None = None
    member: str | None = None
    max_concurrent: int | None = None
    parameters: Mapping[str, float] = field(default_factory=dict)
    retries: RetryPolicy = field(default_factory=lambda: _RETRIES)
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    output: str | None = None
    labels: Sequence[str] = ()
    preemptible: bool = True
    checkpointable: bool = True

    @property
    def job_id(self) -> str:
        """Return the engine job id of the simulation (its name)."""
        return self.name

    def stage_index(self, name: str) -> int:
        """Return the index of stage ``name``.

        Raises:
            ConfigurationError: the simulation has no such stage.
        """
        for index, stage in enumerate(self.stages):
            if stage.name == name:
                return index
        raise ConfigurationError(
            f"simulation {self.name!r} has no stage {name!r} "
            f"(it has {', '.join(s.name for s in self.stages)})",
            where=f"simulation {self.name}",
        )

    def metadata(self) -> SimulationMetadata:
        """Return what the science policy will know of it."""
        if self.resilience not in RESILIENCE_LEVELS:
            raise ConfigurationError(
                f"unknown resilience {self.resilience!r}; choose from "
                f"{', '.join(RESILIENCE_LEVELS)}",
                where=f"simulation {self.name}.resilience",
            )
        return SimulationMetadata(
            owner=self.owner,
            project=self.project,
            scenario=self.scenario,
            sweep=self.sweep,
            member=self.member,
            max_concurrent=self.max_concurrent,
            parameters=dict(self.parameters),
            resilience=self.resilience,
            checkpoint_size=parse_size(self.checkpoint_size, what="checkpoint_size"),
            estimates={
                s.name: _seconds(s.estimate, f"stages.{s.name}.estimate")
                for s in self.stages
                if s.estimate is not None
            },
            nodes={s.name: s.nodes for s in self.stages if s.nodes != 1},
        )

    def to_job(self) -> SubmitJob:
        """Return the engine job of the simulation.

        Raises:
            ConfigurationError: a stage is malformed (no command, an unknown or later stage
                in ``after``, a bad ``when``, more than one node), naming it.
        """
        if not self.stages:
            raise ConfigurationError(
                f"simulation {self.name!r} has no stages", where=f"simulation {self.name}"
            )
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ConfigurationError(
                f"simulation {self.name!r} has two stages named {duplicate!r}",
                where=f"simulation {self.name}.stages",
            )
        index = {n: i for i, n in enumerate(names)}
        tasks: list[TaskSpec] = []
        dependencies: list[Dependency] = []
        for k, stage in enumerate(self.stages):
            _check_stage(self.name, stage)
            tasks.append(
                TaskSpec(
                    index=k,
                    name=stage.name,
                    command=stage.argv(),
                    env=tuple(sorted(stage.env.items())),
                    resources=stage.resources(),
                    requires=tuple(sorted(set(stage.requires))),
                    max_runtime=_seconds(stage.walltime, f"stages.{stage.name}.walltime")
                    if stage.walltime is not None
                    else None,
                    nodes=stage.nodes if stage.nodes > 1 else None,
                )
            )
            for parent, condition in _parents(stage):
                if parent not in index:
                    raise ConfigurationError(
                        f"stage {stage.name!r} waits on {parent!r}, which is not a stage of "
                        f"{self.name!r}",
                        where=f"simulation {self.name}.stages.{stage.name}",
                    )
                dependencies.append(
                    Dependency(
                        parent=self.name,
                        parent_task=index[parent],
                        child_task=k,
                        condition=condition,
                        when=stage.when if condition is Condition.ON_SUCCESS else None,
                    )
                )
        priority = self.priority if isinstance(self.priority, Priority) else Priority(self.priority)
        metadata = msgspec.json.encode(msgspec.to_builtins(self.metadata()), order="sorted")
        return SubmitJob(
            job_id=self.name,
            name=self.name,
            priority=priority,
            env=tuple(sorted(self.env.items())),
            cwd=self.cwd,
            output=self.output,
            resources=self.stages[0].resources(),
            tasks=tuple(tasks),
            dependencies=tuple(dependencies),
            retries=self.retries,
            timeouts=Timeouts(),
            checkpointable=self.checkpointable,
            preemptible=self.preemptible,
            labels=tuple(sorted({*self.labels, "type=simulation"})),
            launch=_launch(self.stages),
            metadata=metadata,
            source=f"simulation {self.name}",
        )


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A named group of simulations (a sweep, an ensemble), scored and ranked together."""

    name: str
    simulations: Sequence[Simulation]

    def to_jobs(self) -> tuple[SubmitJob, ...]:
        """Return the engine jobs of every simulation, in order."""
        return tuple(sim.to_job() for sim in self.simulations)


def _seconds(value: float | str | None, where: str) -> float:
    try:
        seconds = parse_duration(value if value is not None else 0)
    except ValueError as error:
        raise ConfigurationError(str(error), where=where) from None
    return seconds


def _parents(stage: SimulationStage) -> list[tuple[str, Condition]]:
    return [(p, Condition.ON_SUCCESS) for p in stage.after] + [
        (p, Condition.ON_ANY_OUTCOME) for p in stage.after_any
    ]


def _check_stage(simulation: str, stage: SimulationStage) -> None:
    where = f"simulation {simulation}.stages.{stage.name}"
    if stage.nodes < 1:
        raise ConfigurationError(f"stage {stage.name!r}: nodes must be at least 1", where=where)
    if stage.when is not None:
        if not stage.after:
            raise ConfigurationError(
                f"stage {stage.name!r}: 'when' decides on the stages in 'after', which is empty",
                where=f"{where}.when",
            )
        try:
            MetricCondition.parse(stage.when)
        except ValueError as error:
            raise ConfigurationError(str(error), where=f"{where}.when") from None


def _launch(stages: Sequence[SimulationStage]) -> Literal["all", "leader"]:
    """The job's launch mode (the engine has one per job): every multi-node stage's."""
    modes = {s.launch for s in stages if s.nodes > 1}
    if len(modes) > 1:
        raise ConfigurationError(
            "multi-node stages of one simulation must share a launch mode (all or leader)",
            where="stages.launch",
        )
    return modes.pop() if modes else "all"


# -- templates ------------------------------------------------------------------------------------


def linear_chain(name: str, stages: Sequence[SimulationStage], **simulation: Any) -> Simulation:
    """Return a simulation whose stages run one after the other, in the order given."""
    chained = [
        stage if k == 0 else _with(stage, after=(*stage.after, stages[k - 1].name))
        for k, stage in enumerate(stages)
    ]
    return Simulation(name=name, stages=chained, **simulation)


def fan_out_fan_in(
    name: str,
    prepare: SimulationStage,
    members: Sequence[SimulationStage],
    gather: SimulationStage,
    **simulation: Any,
) -> Simulation:
    """Return a simulation: ``prepare``, then every member at once, then ``gather`` once
    all of them succeeded."""
    fanned = [_with(m, after=(*m.after, prepare.name)) for m in members]
    gathered = _with(gather, after=(*gather.after, *(m.name for m in members)))
    return Simulation(name=name, stages=[prepare, *fanned, gathered], **simulation)


def conditional_branch(
    name: str,
    first: SimulationStage,
    when: str,
    then: Sequence[SimulationStage],
    otherwise: Sequence[SimulationStage] = (),
    finally_: SimulationStage | None = None,
    **simulation: Any,
) -> Simulation:
    """Return a simulation that runs ``first``, then the ``then`` chain if its metric meets
    ``when`` (``"residual < 1e-3"``) or the ``otherwise`` chain if not (the other is skipped),
    then ``finally_`` whichever ran."""
    negated = _negate(when)
    stages: list[SimulationStage] = [first]
    tails: list[str] = []
    for branch, condition in ((then, when), (otherwise, negated)):
        previous: str | None = None
        for k, stage in enumerate(branch):
            if k == 0:
                stages.append(_with(stage, after=(first.name,), when=condition))
            else:
                stages.append(_with(stage, after=(*stage.after, str(previous))))
            previous = stage.name
        if previous is not None:
            tails.append(previous)
    if finally_ is not None:
        stages.append(_with(finally_, after_any=(*finally_.after_any, *tails)))
    return Simulation(name=name, stages=stages, **simulation)


def parameter_sweep(
    name: str,
    grid: Mapping[str, Sequence[float]],
    member: Callable[[Mapping[str, float]], Sequence[SimulationStage]],
    *,
    max_concurrent: int | None = None,
    **simulation: Any,
) -> Scenario:
    """Return a scenario of one simulation per point of ``grid`` (every combination, keys in
    sorted order), named ``<name>-<k>``; at most ``max_concurrent`` of them run at once (as
    Slurm's ``--array %N``), and successive halving prunes the weak ones."""
    if not grid:
        raise ConfigurationError("a sweep needs at least one parameter", where="grid")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigurationError("must be at least 1", where="max_concurrent")
    keys = sorted(grid)
    points = list(itertools.product(*(grid[k] for k in keys)))
    width = max(1, int(math.log10(len(points))) + 1)
    simulations = []
    for k, values in enumerate(points):
        parameters = dict(zip(keys, (float(v) for v in values), strict=True))
        label = ",".join(f"{key}={value:g}" for key, value in parameters.items())
        simulations.append(
            Simulation(
                name=f"{name}-{k:0{width}d}",
                stages=tuple(member(parameters)),
                scenario=name,
                sweep=name,
                member=label,
                parameters=parameters,
                max_concurrent=max_concurrent,
                **simulation,
            )
        )
    return Scenario(name=name, simulations=simulations)


def extension(simulation: Simulation, stages: Sequence[SimulationStage], *, name: str) -> SubmitJob:
    """Return a job of new ``stages`` for a running (or finished) ``simulation``: their
    ``after``/``after_any`` may name its stages (and each other), ``when`` too.

    Raises:
        ConfigurationError: a stage names a stage neither job has.
    """
    own = {s.name: k for k, s in enumerate(stages)}
    local: list[SimulationStage] = []
    outside: list[Dependency] = []
    for k, stage in enumerate(stages):
        keep_after = [p for p in stage.after if p in own]
        keep_any = [p for p in stage.after_any if p in own]
        for parent, condition in _parents(stage):
            if parent in own:
                continue
            outside.append(
                Dependency(
                    parent=simulation.name,
                    parent_task=simulation.stage_index(parent),
                    child_task=k,
                    condition=condition,
                    when=stage.when if condition is Condition.ON_SUCCESS else None,
                )
            )
        when = stage.when if keep_after else None
        local.append(_with(stage, after=tuple(keep_after), after_any=tuple(keep_any), when=when))
    base = msgspec.structs.asdict(simulation.metadata())
    job = Simulation(
        name=name,
        owner=simulation.owner,
        project=simulation.project,
        stages=local,
        priority=simulation.priority,
        resilience=simulation.resilience,
        checkpoint_size=base["checkpoint_size"],
        scenario=simulation.scenario,
        env=simulation.env,
        cwd=simulation.cwd,
        output=simulation.output,
        labels=simulation.labels,
    ).to_job()
    return msgspec.structs.replace(job, dependencies=(*job.dependencies, *outside))


def _with(stage: SimulationStage, **changes: Any) -> SimulationStage:
    from dataclasses import replace

    return replace(stage, **changes)


_NEGATION = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}


def _negate(when: str) -> str:
    try:
        condition = MetricCondition.parse(when)
    except ValueError as error:
        raise ConfigurationError(str(error), where="when") from None
    return f"{condition.metric} {_NEGATION[condition.op]} {condition.value!r}"
