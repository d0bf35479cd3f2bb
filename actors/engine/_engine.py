"""The engine: an actor system, a journal, a scheduler, job and node actors, recovery.

``open_engine()`` is the embedding API (an async context manager).  On open it rebuilds every
job and node from the journal in one pass: finished jobs only feed the dependency graph (their
actors stay passivated), unfinished jobs get their actor back, and attempts that were out on a
node when the previous process stopped are *in doubt*: an agent that comes back within the
restart grace period re-claims them, the rest are requeued from their last checkpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from actors._errors import JobNotFoundError
from actors.executors import AttemptReport, Executor
from persistence import Journal, rebuild_stream
from runtime import (
    ActorRef,
    ActorStoppedError,
    ActorSystem,
    Clock,
    ConfigurationError,
    MessageFailedError,
    TaskfarmError,
    get_logger,
    open_system,
)

from ._events import JobAggregate, JobState, NodeAggregate, NodeState, job_stream
from ._graph import Outcome
from ._job import JobActor, job_summary
from ._messages import (
    AdmitJobs,
    AdoptAttempt,
    CancelJob,
    CancelRuns,
    ClaimAttempt,
    GetJobSummary,
    GetNodes,
    NodeJoined,
    NodeLeft,
    ReportAttempt,
    SetNodeHealth,
    WhyJob,
)
from ._node import NodeActor
from ._placement import SchedulerCore
from ._policy import FifoPolicy, Policy
from ._resources import Resources
from ._scheduler import Recovered, SchedulerActor
from ._settings import EngineSettings
from ._spec import SubmitJob, load_spec, parse_spec
from ._summaries import JobSummary, NodeSummary

__all__ = ["Engine", "open_engine"]

_log = get_logger("actors.engine")

_JOB_AGGREGATE = JobAggregate()
_NODE_AGGREGATE = NodeAggregate()
_FINISHED = {
    "completed": Outcome.SUCCEEDED,
    "failed": Outcome.FAILED,
    "cancelled": Outcome.CANCELLED,
}


_HEALTHS = frozenset({"online", "draining", "sleeping", "quarantined", "unreachable"})


class Engine:
    """A running engine; build it with :func:`open_engine`."""

    def __init__(
        self,
        *,
        system: ActorSystem,
        journal: Journal,
        core: SchedulerCore,
        settings: EngineSettings,
    ) -> None:
        self.system = system
        self.journal = journal
        self.core = core
        self.settings = settings
        self.scheduler: ActorRef[Any]
        self._jobs: dict[str, ActorRef[Any]] = {}
        self._nodes: dict[str, ActorRef[Any]] = {}
        self._finished: dict[str, anyio.Event] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._scheduler_actor: SchedulerActor | None = None

    # -- refs -----------------------------------------------------------------------------------

    def job_ref(self, job_id: str) -> ActorRef[Any] | None:
        """Return a live job actor, or None (finished jobs are passivated)."""
        ref = self._jobs.get(job_id)
        return ref if ref is not None and ref.is_alive else None

    def node_ref(self, name: str) -> ActorRef[Any] | None:
        """Return a node actor, or None."""
        ref = self._nodes.get(name)
        return ref if ref is not None and ref.is_alive else None

    async def _spawn_job(
        self, job_id: str, recovered: tuple[JobState, int] | None = None
    ) -> ActorRef[Any]:
        once = [recovered] if recovered is not None else []

        def factory() -> JobActor:
            # The recovered state seeds the first start only; a restart re-reads the journal.
            return JobActor(
                job_id=job_id,
                journal=self.journal,
                scheduler=self.scheduler,
                node_ref=self.node_ref,
                settings=self.settings,
                recovered=once.pop() if once else None,
            )

        ref = await self.system.spawn(factory, name=f"job-{job_id}")
        self._jobs[job_id] = ref
        return ref

    def _job_ended(self, job_id: str, outcome: Outcome) -> None:
        self._jobs.pop(job_id, None)
        self._outcomes[job_id] = outcome
        event = self._finished.pop(job_id, None)
        if event is not None:
            event.set()

    # -- nodes ----------------------------------------------------------------------------------

    async def add_node(
        self,
        name: str,
        capacity: Resources,
        *,
        executor: Executor,
        labels: Sequence[str] = (),
        remote: bool = False,
    ) -> None:
        """Add a node that runs work with ``executor`` (which the caller keeps open)."""
        if self.node_ref(name) is not None:
            raise ConfigurationError(f"node {name!r} is already connected", where="add_node")
        old = self._nodes.pop(name, None)
        if old is not None:
            await self.system.stop(old)
        ref: ActorRef[Any] = await self.system.spawn(
            lambda: NodeActor(name=name, executor=executor, settings=self.settings),
            name=f"node-{name}",
        )
        self._nodes[name] = ref
        await self.scheduler.tell(
            NodeJoined(name=name, capacity=capacity, labels=tuple(sorted(labels)), remote=remote)
        )

    async def set_node_health(self, name: str, health: str, *, reason: str = "") -> None:
        """Set a node's health: ``online`` gets new work; ``draining`` (before maintenance),
        ``sleeping`` (to save energy), ``quarantined`` and ``unreachable`` (its agent lost
        contact; set by the coordinator) do not, and their running attempts carry on.

        Raises:
            ConfigurationError: the health is not one of those, or the node is unknown.
        """
        if health not in _HEALTHS:
            raise ConfigurationError(
                f"unknown health {health!r}; choose from {', '.join(sorted(_HEALTHS))}",
                where="set_node_health",
            )
        if health == "online" and self.node_ref(name) is None:
            health = "offline"  # released, but nothing runs there until its agent connects
        known = await self.scheduler.ask(
            SetNodeHealth(name=name, health=health, reason=reason),
            timeout=self.settings.ask_timeout,
        )
        if not known:
            raise ConfigurationError(f"no node named {name!r}", where="set_node_health")

    async def remove_node(self, name: str, *, reason: str) -> None:
        """Take a node offline: its running attempts are requeued by their jobs and stopped."""
        ref = self._nodes.pop(name, None)
        await self.scheduler.tell(NodeLeft(name=name, reason=reason))
        if ref is not None:
            # The requeued attempts run again elsewhere: the copies left here are stale work.
            await ref.tell(CancelRuns(grace=self.settings.cancel_grace))
            await self.system.stop(ref)

    async def claim_attempt(self, job_id: str, task: int, token: int, node: str) -> bool:
        """An agent says it still runs this attempt: adopt it if it is the current one.

        Returns False for a stale attempt (the caller kills it).
        """
        ref = self.job_ref(job_id)
        node_ref = self.node_ref(node)
        if ref is None or node_ref is None:
            return False
        spec = await ref.ask(
            ClaimAttempt(job_id=job_id, task=task, token=token, node=node),
            timeout=self.settings.ask_timeout,
        )
        if spec is None:
            return False
        await node_ref.ask(AdoptAttempt(spec=spec, job=ref), timeout=self.settings.ask_timeout)
        if self._scheduler_actor is not None:
            self._scheduler_actor.claimed(job_id, task)
        return True

    async def deliver_orphan(self, report: AttemptReport, node: str) -> bool:
        """Journal a report of an attempt no node actor knows (sent before a restart).

        Returns whether the job accepted it (False: stale, or the job is over).
        """
        ref = self.job_ref(report.job_id)
        if ref is None:
            return False
        try:
            accepted = await ref.ask(
                ReportAttempt(report=report, node=node), timeout=self.settings.ask_timeout
            )
        except (ActorStoppedError, MessageFailedError):
            return False  # the job finished (passivated) meanwhile: the report is stale
        return bool(accepted)

    async def nodes(self) -> list[NodeSummary]:
        """Describe every node."""
        result: list[NodeSummary] = await self.scheduler.ask(
            GetNodes(), timeout=self.settings.ask_timeout
        )
        return result

    # -- jobs -----------------------------------------------------------------------------------

    async def submit(self, specs: Sequence[SubmitJob], *, source: str = "") -> list[str]:
        """Validate and submit jobs; return their ids.

        Raises:
            SpecError, UnknownDependencyError, DependencyCycleError: the submission is invalid;
                nothing was journaled.
        """
        result = await self.scheduler.ask(
            AdmitJobs(specs=tuple(specs), source=source), timeout=self.settings.ask_timeout
        )
        if isinstance(result, TaskfarmError):
            raise result
        ids: list[str] = result
        return ids

    async def submit_file(self, path: str | Path) -> list[str]:
        """Load a TOML or JSON spec file and submit its jobs."""
        spec_file = load_spec(path, known_jobs=self.core.graph.jobs())
        return await self.submit(spec_file.to_commands().jobs, source=str(path))

    async def submit_text(self, text: str, *, fmt: str, source: str) -> list[str]:
        """Parse spec text (``fmt`` "toml" or "json") and submit its jobs."""
        spec_file = parse_spec(text, fmt=fmt, source=source, known_jobs=self.core.graph.jobs())  # type: ignore[arg-type]
        return await self.submit(spec_file.to_commands().jobs, source=source)

    async def status(self, job_id: str | None = None, *, tasks: bool = False) -> list[JobSummary]:
        """Summarise one job (live or finished) or every job in the journal."""
        if job_id is not None:
            return [await self._summary(job_id, tasks=tasks)]
        ids = sorted(
            {
                s.stream_id.partition(":")[2]
                for s in await self.journal.streams()
                if s.stream_id.startswith("job:")
            }
        )
        return [await self._summary(i, tasks=tasks) for i in ids]

    async def _summary(self, job_id: str, *, tasks: bool) -> JobSummary:
        ref = self.job_ref(job_id)
        if ref is not None:
            try:
                summary: JobSummary = await ref.ask(
                    GetJobSummary(tasks=tasks), timeout=self.settings.ask_timeout
                )
            except TaskfarmError:
                pass  # it passivated meanwhile: read the journal
            else:
                return summary
        state, version = await rebuild_stream(self.journal, job_stream(job_id), _JOB_AGGREGATE)
        if version == 0:
            raise JobNotFoundError(job_id)
        return job_summary(job_id, state, tasks=tasks)

    async def cancel(self, job_id: str, *, reason: str = "cancelled by user") -> JobSummary:
        """Cancel a job: pending tasks at once, running attempts stopped with a grace period."""
        ref = self.job_ref(job_id)
        if ref is None:
            return await self._summary(job_id, tasks=False)
        summary: JobSummary = await ref.ask(
            CancelJob(reason=reason), timeout=self.settings.ask_timeout
        )
        return summary

    async def why(self, job_id: str) -> str:
        """Explain why a job (or its tasks) waits."""
        if self.job_ref(job_id) is None:
            summary = await self._summary(job_id, tasks=False)
            return f"job {job_id} is {summary.status}" + (
                f": {summary.reason}" if summary.reason else ""
            )
        text: str = await self.scheduler.ask(
            WhyJob(job_id=job_id), timeout=self.settings.ask_timeout
        )
        return text

    async def wait_job(self, job_id: str) -> JobSummary:
        """Wait until a job has finished; return its summary."""
        if self.job_ref(job_id) is not None:
            event = self._finished.setdefault(job_id, anyio.Event())
            if self.job_ref(job_id) is not None:
                await event.wait()
        return await self._summary(job_id, tasks=False)

    # -- recovery -------------------------------------------------------------------------------

    async def _rebuild(self) -> _Recovered:
        """Rebuild the scheduler's core from the journal (one pass); no actor runs yet."""

        def aggregate_for(stream_id: str) -> Any:
            if stream_id.startswith("job:"):
                return _JOB_AGGREGATE
            if stream_id.startswith("node:"):
                return _NODE_AGGREGATE
            return None

        # Each stream from its latest snapshot plus the events after it: a restart reads the
        # tail of the journal, not all of it (replay from position 0 gives the same states).
        states: dict[str, tuple[Any, int]] = {}
        for info in await self.journal.streams():
            aggregate = aggregate_for(info.stream_id)
            if aggregate is not None:
                states[info.stream_id] = await rebuild_stream(
                    self.journal, info.stream_id, aggregate
                )
        nodes = {k: v for k, v in states.items() if k.startswith("node:")}
        for _stream, (node, _version) in sorted(nodes.items()):
            assert isinstance(node, NodeState)
            health = "quarantined" if node.quarantined else "offline"
            self.core.add_node(node.name, node.capacity, labels=node.labels, health=health)
        jobs = [
            (state, version)
            for stream, (state, version) in states.items()
            if stream.startswith("job:") and isinstance(state, JobState) and state.job is not None
        ]
        jobs.sort(key=lambda item: (item[0].submitted_at, item[0].job.job_id))  # type: ignore[union-attr]
        # A job submitted in one batch with its parent may sort before it (same time, smaller
        # id): the graph must know every parent before its dependants are added.
        jobs = _parents_first(jobs)
        in_doubt: dict[tuple[str, int], str] = {}
        unfinished: list[tuple[JobState, int]] = []
        for state, version in jobs:
            spec = state.job
            assert spec is not None
            assert state.submitted_at is not None
            task_outcomes = [_task_outcome(t.status) for t in state.tasks]
            if state.status in _FINISHED:
                self.core.add_finished_job(spec, _FINISHED[state.status], task_outcomes)
                continue
            unfinished.append((state, version))
            pending = [
                (i, t.attempt, t.failures, t.last_node, t.retry_at)
                for i, t in enumerate(state.tasks)
                if t.status == "pending" and state.status == "active"
            ]
            finished = [(i, o) for i, o in enumerate(task_outcomes) if o is not None]
            self.core.add_job(
                spec,
                submitted_at=state.submitted_at,
                pending=pending,
                finished=finished,
                blocklist=state.blocklist,
            )
            for index in state.active_attempts():
                task = state.tasks[index]
                assert task.node is not None
                if self.core.node_health(task.node) is None:
                    self.core.add_node(task.node, Resources(), health="offline")
                self.core.mark_running(spec.job_id, index, task.node, task.attempt)
                in_doubt[(spec.job_id, index)] = task.node
        _log.info(
            "engine_recovered",
            jobs=len(jobs),
            unfinished=len(unfinished),
            in_doubt=len(in_doubt),
            nodes=len(nodes),
        )
        known = {
            node.name: (node.capacity, node.labels, node.remote)
            for node, _ in (v for k, v in states.items() if k.startswith("node:"))
        }
        return _Recovered(unfinished=unfinished, in_doubt=in_doubt, nodes=known)


@dataclass(frozen=True)
class _Recovered:
    unfinished: list[tuple[JobState, int]]
    in_doubt: dict[tuple[str, int], str]
    nodes: dict[str, tuple[Any, ...]]


def _parents_first(jobs: list[tuple[JobState, int]]) -> list[tuple[JobState, int]]:
    """Order jobs so each comes after the jobs it depends on, otherwise keeping their order."""
    by_id = {state.job.job_id: (state, version) for state, version in jobs if state.job}
    ordered: list[tuple[JobState, int]] = []
    done: set[str] = set()
    for state, _version in jobs:
        assert state.job is not None
        stack = [(state.job.job_id, False)]
        while stack:
            job_id, expanded = stack.pop()
            if job_id in done:
                continue
            if expanded:
                done.add(job_id)
                ordered.append(by_id[job_id])
                continue
            stack.append((job_id, True))
            spec = by_id[job_id][0].job
            assert spec is not None
            # Reversed, so parents are visited in declaration order; cycles were rejected.
            stack.extend(
                (d.parent, False)
                for d in reversed(spec.dependencies)
                if d.parent in by_id and d.parent not in done
            )
    return ordered


def _task_outcome(status: str) -> Outcome | None:
    return {
        "completed": Outcome.SUCCEEDED,
        "failed": Outcome.FAILED,
        "cancelled": Outcome.CANCELLED,
    }.get(status)


@asynccontextmanager
async def open_engine(
    *,
    journal: Journal,
    clock: Clock | None = None,
    policy: Policy | None = None,
    settings: EngineSettings | None = None,
) -> AsyncIterator[Engine]:
    """Open an engine over ``journal``: recover, start the scheduler, yield the engine."""
    settings = settings or EngineSettings()
    core = SchedulerCore(policy or FifoPolicy())
    async with open_system(clock=clock) as system:
        engine = Engine(system=system, journal=journal, core=core, settings=settings)
        recovered = await engine._rebuild()

        def scheduler_factory() -> SchedulerActor:
            actor = SchedulerActor(
                core=core,
                journal=journal,
                settings=settings,
                spawn_job=engine._spawn_job,
                job_ref=engine.job_ref,
                on_job_ended=engine._job_ended,
                in_doubt=recovered.in_doubt,
                known_nodes=recovered.nodes,
            )
            engine._scheduler_actor = actor
            return actor

        engine.scheduler = await system.spawn(scheduler_factory, name="scheduler")
        for state, version in recovered.unfinished:
            assert state.job is not None
            await engine._spawn_job(state.job.job_id, recovered=(state, version))
        await engine.scheduler.tell(Recovered())
        yield engine
