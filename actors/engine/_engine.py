"""The engine: an actor system, a journal, a scheduler, job and node actors, recovery.

``open_engine()`` is the embedding API (an async context manager).  On open it rebuilds every
job and node from the journal, each kind in one bulk read of the latest snapshots and the
events after them: finished jobs only feed the dependency graph (their actors stay
passivated, and only the part of their final snapshot the graph needs is decoded),
unfinished jobs get their actor back, and attempts that were out on a node when the previous
process stopped are *in doubt*: an agent that comes back within the restart grace period
re-claims them, the rest are requeued (lost, no attempt spent) from their last checkpoint.
Recovery never refuses to open a journal it wrote: a job whose parent was never journaled (a
partial submission by an older version) ends, with that reason.

A submission is journaled all or nothing: every job of a spec file in one atomic multi-stream
append, while placement goes on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec

from actors._errors import DependencyError, JobNotFoundError
from actors.executors import AttemptReport, Executor
from persistence import (
    Event,
    Journal,
    LoadedStream,
    StreamAppend,
    rebuild_stream,
    rebuild_streams,
)
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

from ._events import (
    JobAggregate,
    JobFinished,
    JobState,
    JobSubmitted,
    NodeAggregate,
    TaskAssigned,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskMetricRecorded,
    TaskPreviewed,
    TaskRequeued,
    TaskStarted,
    TaskState,
    job_stream,
    policy_stream,
)
from ._graph import Outcome
from ._job import JobActor, job_summary
from ._messages import (
    AdmitJobs,
    AdoptAttempt,
    AmendJob,
    CancelJob,
    CancelRuns,
    CheckpointTask,
    ClaimAttempt,
    DescribeJob,
    GetJobState,
    GetJobSummary,
    GetNodes,
    JobRevived,
    JobsAdded,
    NodeJoined,
    NodeLeft,
    PauseJob,
    PolicyCommand,
    PreemptTask,
    ReleaseJobIds,
    ReportAttempt,
    ResumeJob,
    RetryTasks,
    SetNodeHealth,
    SetNodeReachable,
    WhyJob,
)
from ._node import NodeActor
from ._placement import SchedulerCore
from ._policy import (
    FifoPolicy,
    JobSubmittedObservation,
    Observation,
    Policy,
    TaskEndedObservation,
    TaskPreviewObservation,
    TaskStartedObservation,
)
from ._resources import Resources
from ._scheduler import KnownNode, Recovered, SchedulerActor
from ._settings import EngineSettings
from ._spec import Priority, SubmitJob, load_spec, parse_spec
from ._summaries import JobSummary, NodeSummary, RecoverySummary

__all__ = ["Engine", "open_engine"]

_log = get_logger("actors.engine")

_JOB_AGGREGATE = JobAggregate()
_NODE_AGGREGATE = NodeAggregate()
_FINISHED = {
    "completed": Outcome.SUCCEEDED,
    "failed": Outcome.FAILED,
    "cancelled": Outcome.CANCELLED,
}
_TASK_OUTCOMES = {
    "completed": Outcome.SUCCEEDED,
    "failed": Outcome.FAILED,
    "cancelled": Outcome.CANCELLED,
    "skipped": Outcome.SKIPPED,
}
_HEALTHS = frozenset({"online", "draining", "sleeping", "quarantined"})
_REACHABLE = frozenset({"connected", "unreachable", "offline"})


# ``gc=False``: recovery keeps hundreds of thousands of these alive at once, and tracking them
# made decoding them slower by a third (each collection walked them all); they hold only
# strings, numbers and the job's spec, so they can never be part of a reference cycle.
class _FinishedTask(msgspec.Struct, kw_only=True, gc=False):
    """The part of a :class:`TaskState` the dependency graph needs of a finished job."""

    status: str = "pending"
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class _FinishedJob(msgspec.Struct, kw_only=True, gc=False):
    """A :class:`JobState` snapshot as recovery reads it first: only the fields the
    dependency graph needs of a finished job (the others are skipped, not decoded).  A job
    that turns out not to be finished is read again in full."""

    job: SubmitJob | None = None
    submitted_at: datetime | None = None
    status: str = "new"
    tasks: list[_FinishedTask] = msgspec.field(default_factory=list)
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


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
        self._addresses: dict[str, str] = {}  # node -> its network address (agents)
        self._scheduler_actor: SchedulerActor | None = None
        self.recovery = RecoverySummary()
        """What :func:`open_engine` rebuilt from the journal."""

    @property
    def policy(self) -> Policy:
        """Return the scheduling policy."""
        return self.core.policy

    # -- refs -----------------------------------------------------------------------------------

    def job_ref(self, job_id: str) -> ActorRef[Any] | None:
        """Return a live job actor, or None (finished jobs are passivated)."""
        ref = self._jobs.get(job_id)
        return ref if ref is not None and ref.is_alive else None

    def node_ref(self, name: str) -> ActorRef[Any] | None:
        """Return a node actor, or None."""
        ref = self._nodes.get(name)
        return ref if ref is not None and ref.is_alive else None

    def node_address(self, name: str) -> str:
        """Return a node's network address for the ranks of multi-node tasks (its name when
        it gave none: an in-process node)."""
        return self._addresses.get(name) or name

    async def _spawn_job(self, job_id: str, recovered: tuple[JobState, int]) -> ActorRef[Any]:
        once = [recovered]

        def factory() -> JobActor:
            # The recovered state seeds the first start only; a restart re-reads the journal.
            return JobActor(
                job_id=job_id,
                journal=self.journal,
                scheduler=self.scheduler,
                node_ref=self.node_ref,
                settings=self.settings,
                recovered=once.pop() if once else None,
                node_address=self.node_address,
            )

        ref = await self.system.spawn(factory, name=f"job-{job_id}")
        self._jobs[job_id] = ref
        return ref

    def _job_ended(self, job_id: str, outcome: Outcome) -> None:
        self._jobs.pop(job_id, None)
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
        address: str = "",
    ) -> None:
        """Add a node that runs work with ``executor`` (which the caller keeps open);
        ``address`` is where the ranks of a multi-node task on it can be reached.

        A node the journal knows keeps the health an operator gave it (drain, sleep and
        quarantine survive a rejoin and a restart).
        """
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
        if address:
            self._addresses[name] = address
        await self.scheduler.tell(
            NodeJoined(name=name, capacity=capacity, labels=tuple(sorted(labels)), remote=remote)
        )

    async def set_node_health(
        self,
        name: str,
        health: str,
        *,
        reason: str = "",
        at: datetime | None = None,
        by: Literal["operator", "engine"] = "operator",
        operator: str | None = None,
    ) -> None:
        """Set a node's health (journaled with ``by`` and the ``operator``'s name, kept across
        rejoins and restarts).

        ``online`` gets new work; ``draining`` (before maintenance), ``sleeping`` (to save
        energy) and ``quarantined`` do not, and their running attempts carry on.  ``draining``
        with ``at`` in the future plans the drain: until then work that cannot finish before
        ``at`` (by its ``max_runtime``) is not placed there, and at ``at`` what still runs
        there checkpoints and yields.

        Raises:
            ConfigurationError: the health is not one of those, or the node is unknown.
        """
        if health not in _HEALTHS:
            raise ConfigurationError(
                f"unknown health {health!r}; choose from {', '.join(sorted(_HEALTHS))}",
                where="set_node_health",
            )
        if at is not None and health != "draining":
            raise ConfigurationError("only a drain can be planned for later", where="--at")
        drain_at = at
        if at is not None:
            health = "online"  # until the time comes
        known = await self.scheduler.ask(
            SetNodeHealth(
                name=name,
                health=health,
                reason=reason,
                drain_at=drain_at,
                by=by,
                operator=operator,
            ),
            timeout=self.settings.ask_timeout,
        )
        if not known:
            raise ConfigurationError(f"no node named {name!r}", where="set_node_health")

    async def set_node_reachable(self, name: str, reachable: str) -> None:
        """Record a node's connection state: ``unreachable`` (no heartbeat: no new work, its
        attempts are not requeued yet), ``connected`` again, or ``offline``.

        Raises:
            ConfigurationError: the state is unknown.
        """
        if reachable not in _REACHABLE:
            raise ConfigurationError(
                f"unknown state {reachable!r}; choose from {', '.join(sorted(_REACHABLE))}",
                where="set_node_reachable",
            )
        await self.scheduler.tell(SetNodeReachable(name=name, reachable=reachable))

    async def remove_node(self, name: str, *, reason: str) -> None:
        """Take a node offline: its running attempts are requeued (lost, no attempt spent) and
        stopped there -- unless it is sleeping, whose work waits for it to wake up.

        Raises:
            ConfigurationError: the engine has never seen the node.
        """
        if self.core.node_health(name) is None and name not in self._nodes:
            raise ConfigurationError(f"no node named {name!r}", where="remove_node")
        ref = self._nodes.pop(name, None)
        sleeping = self.core.node_health(name) == "sleeping"
        await self.scheduler.tell(NodeLeft(name=name, reason=reason))
        if ref is not None:
            if not sleeping:
                # The requeued attempts run again elsewhere: the copies left here are stale.
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
            self._scheduler_actor.claimed(job_id, task, node)
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

    def attempt_node(self, job_id: str, task: int) -> str | None:
        """Return the node the task's current attempt was placed on (None: not running)."""
        placements = self.core.farm.placements.get(job_id)
        return placements.get(task) if placements else None

    async def nodes(self) -> list[NodeSummary]:
        """Describe every node."""
        result: list[NodeSummary] = await self.scheduler.ask(
            GetNodes(), timeout=self.settings.ask_timeout
        )
        return result

    # -- jobs -----------------------------------------------------------------------------------

    async def submit(self, specs: Sequence[SubmitJob], *, source: str = "") -> list[str]:
        """Validate and submit jobs, all or nothing; return their ids.

        The policy validates and prepares each job first (``Policy.validate``/``prepare``).

        Raises:
            SpecError, UnknownDependencyError, DependencyCycleError: the submission is invalid;
                nothing was journaled.
        """
        with _time_held(self.system.clock):
            return await self._submit(specs, source)

    async def _submit(self, specs: Sequence[SubmitJob], source: str) -> list[str]:
        result = await self.scheduler.ask(
            AdmitJobs(specs=tuple(specs), source=source), timeout=self.settings.ask_timeout
        )
        if isinstance(result, TaskfarmError):
            raise result
        prepared: tuple[SubmitJob, ...] = result
        now = self.system.clock.now()
        try:
            # One transaction for the whole file: a crash never leaves a dependant journaled
            # without its parent.
            await self.journal.append_many(
                [
                    StreamAppend(
                        stream_id=job_stream(spec.job_id),
                        events=[JobSubmitted(job=spec, submitted_at=now)],
                        expected_version=0,
                    )
                    for spec in prepared
                ]
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.scheduler.tell(
                    ReleaseJobIds(job_ids=tuple(spec.job_id for spec in prepared))
                )
            raise
        for spec in prepared:
            state = _JOB_AGGREGATE.apply(JobState(), JobSubmitted(job=spec, submitted_at=now))
            await self._spawn_job(spec.job_id, recovered=(state, 1))
        await self.scheduler.tell(JobsAdded(specs=prepared, submitted_at=now))
        return [spec.job_id for spec in prepared]

    async def submit_file(self, path: str | Path) -> list[str]:
        """Load a TOML or JSON spec file and submit its jobs."""
        spec_file = load_spec(path, known_jobs=self.core.graph.jobs())
        return await self.submit(spec_file.to_commands().jobs, source=str(path))

    async def submit_text(
        self, text: str, *, fmt: str, source: str, owner: str | None = None
    ) -> list[str]:
        """Parse spec text (``fmt`` "toml" or "json") and submit its jobs (recording ``owner``,
        the principal that submits them, on each)."""
        spec_file = parse_spec(text, fmt=fmt, source=source, known_jobs=self.core.graph.jobs())  # type: ignore[arg-type]
        jobs = spec_file.to_commands().jobs
        if owner is not None:
            jobs = tuple(msgspec.structs.replace(job, owner=owner) for job in jobs)
        return await self.submit(jobs, source=source)

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
                domain, statuses = await self.scheduler.ask(
                    DescribeJob(job_id=job_id), timeout=self.settings.ask_timeout
                )
            except TaskfarmError:
                pass  # it passivated meanwhile: read the journal
            else:
                return _with_live_state(summary, domain, statuses)
        state, version = await rebuild_stream(self.journal, job_stream(job_id), _JOB_AGGREGATE)
        if version == 0:
            raise JobNotFoundError(job_id)
        return job_summary(job_id, state, tasks=tasks)

    async def _ask_job(self, job_id: str, message: Any) -> Any:
        ref = self.job_ref(job_id)
        if ref is None:
            await self._summary(job_id, tasks=False)  # raises JobNotFoundError if unknown
            return None
        return await ref.ask(message, timeout=self.settings.ask_timeout)

    async def cancel(self, job_id: str, *, reason: str = "", by: str | None = None) -> JobSummary:
        """Cancel a job: pending tasks at once, running attempts stopped with a grace period.

        A finished job is left as it is (its summary says how it ended).  ``by`` names who
        asked (a coordinator passes the client credential's name); the reason defaults to
        "cancelled by" them, or "cancelled by user".

        Raises:
            JobNotFoundError: no such job.
        """
        reason = reason or f"cancelled by {by or 'user'}"
        summary = await self._ask_job(job_id, CancelJob(reason=reason, by=by))
        return summary if summary is not None else await self._summary(job_id, tasks=False)

    async def pause(
        self, job_id: str, *, mode: str = "checkpoint", reason: str = "", by: str | None = None
    ) -> JobSummary:
        """Pause a job: no new attempts; running ones ``checkpoint`` and yield, ``finish``,
        or are ``kill``ed (requeued without spending an attempt).

        ``by`` names who asked, as for :meth:`cancel`; the reason defaults to "paused by"
        them, or "paused by operator".

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: the job is over or the mode
            is unknown.
        """
        reason = reason or _by("paused", by)
        summary = await self._ask_job(job_id, PauseJob(mode=mode, reason=reason, by=by))
        if summary is None:
            raise ConfigurationError(f"job {job_id} is over; nothing to pause", where="pause")
        result: JobSummary = summary
        return result

    async def resume(self, job_id: str, *, reason: str = "", by: str | None = None) -> JobSummary:
        """Resume a paused job (and release tasks held for an operator); ``by`` as for
        :meth:`pause`.

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: the job is over.
        """
        reason = reason or _by("resumed", by)
        summary = await self._ask_job(job_id, ResumeJob(reason=reason, by=by))
        if summary is None:
            raise ConfigurationError(f"job {job_id} is over; nothing to resume", where="resume")
        result: JobSummary = summary
        return result

    async def amend(
        self,
        job_id: str,
        *,
        priority: Priority | str | None = None,
        set_metadata: Mapping[str, Any] | None = None,
        by: str | None = None,
    ) -> JobSummary:
        """Change a live job's base priority and metadata keys (journaled with ``by``, who
        asked; the policy sees the change at its next cycle).

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: the job is over, the priority
            is unknown, the metadata no longer fits the policy's metadata type, or the policy
            refuses the change (``Policy.validate_amendment``: a deadline in the past).
        """
        if isinstance(priority, str):
            try:
                priority = Priority(priority)
            except ValueError:
                choices = ", ".join(p.value for p in Priority)
                raise ConfigurationError(
                    f"unknown priority {priority!r}; choose from {choices}", where="--priority"
                ) from None
        metadata = tuple(
            (key, msgspec.json.encode(value)) for key, value in sorted((set_metadata or {}).items())
        )
        # The job as its actor has it (the scheduler's view may not have it yet).
        ref = self.job_ref(job_id)
        state: JobState | None = None
        if ref is not None:
            state = await ref.ask(GetJobState(), timeout=self.settings.ask_timeout)
        current = state.job if state is not None and state.live else None
        if current is not None and (metadata or priority is not None):
            candidate = current
            if metadata:
                merged = msgspec.json.decode(current.metadata)
                merged.update({k: msgspec.json.decode(v) for k, v in metadata})
                candidate = msgspec.structs.replace(
                    candidate, metadata=msgspec.json.encode(merged, order="sorted")
                )
                try:
                    self.core.check_metadata(candidate)
                except TaskfarmError as error:
                    raise ConfigurationError(str(error), where="--set") from None
            if priority is not None:
                candidate = msgspec.structs.replace(candidate, priority=priority)
            # The policy gives metadata its meaning (a deadline that must be ahead): it may
            # refuse the change before anything is journaled.
            self.core.policy.validate_amendment(current, candidate, self.system.clock.now())
        summary = await self._ask_job(job_id, AmendJob(priority=priority, metadata=metadata, by=by))
        if summary is None:
            raise ConfigurationError(f"job {job_id} is over; it cannot be amended", where="amend")
        result: JobSummary = summary
        return result

    async def retry(
        self,
        job_id: str,
        tasks: Sequence[int | str] = (),
        *,
        reason: str = "",
        by: str | None = None,
    ) -> list[int]:
        """Run failed, cancelled or held tasks again (all of them when ``tasks`` is empty);
        ``by`` as for :meth:`pause`.

        A finished job is reopened; dependants that wait on it (``on_parent_failure =
        "wait"``) wait on it again.  Returns the task indices that will run.

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: a task is unknown.
        """
        with _time_held(self.system.clock):
            return await self._retry(job_id, tasks, reason or _by("retried", by), by)

    async def _retry(
        self, job_id: str, tasks: Sequence[int | str], reason: str, by: str | None
    ) -> list[int]:
        indices = tuple([await self.task_index(job_id, task) for task in tasks])
        ref = self.job_ref(job_id)
        revived = False
        if ref is None:
            state, version = await rebuild_stream(self.journal, job_stream(job_id), _JOB_AGGREGATE)
            if version == 0:
                raise JobNotFoundError(job_id)
            if state.status == "completed":
                return []
            ref = await self._spawn_job(job_id, recovered=(state, version))
            revived = True
        chosen: list[int] = await ref.ask(
            RetryTasks(tasks=indices, reason=reason, by=by), timeout=self.settings.ask_timeout
        )
        if revived:
            if not chosen:
                await self.system.stop(ref)
                self._jobs.pop(job_id, None)
                return []
            state = await ref.ask(GetJobState(), timeout=self.settings.ask_timeout)
            await self.scheduler.tell(JobRevived(job_id=job_id, state=state))
        return chosen

    async def checkpoint(self, job_id: str, task: int | str, *, by: str | None = None) -> bool:
        """Ask a task's running attempt to checkpoint now (SIGUSR1); False if none runs.
        ``by`` names who asked, as for :meth:`pause`.

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: the task is unknown.
        """
        index = await self.task_index(job_id, task)
        result = await self._ask_job(job_id, CheckpointTask(task=index, reason="operator", by=by))
        return bool(result)

    async def preempt(
        self, job_id: str, task: int | str, *, reason: str = "", by: str | None = None
    ) -> bool:
        """Checkpoint and yield a task's running attempt (it is requeued, no attempt spent);
        ``by`` as for :meth:`pause`.

        Returns False when the task is not running.

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: the task is unknown.
        """
        index = await self.task_index(job_id, task)
        node = self.attempt_node(job_id, index)
        ref = self.job_ref(job_id)
        if node is None or ref is None:
            await self._summary(job_id, tasks=False)
            return False
        await ref.tell(
            PreemptTask(
                task=index, node=node, reason=reason or _by("preempted", by), force=True, by=by
            )
        )
        return True

    async def task_index(self, job_id: str, task: int | str) -> int:
        """Resolve a task given by index or by name (``stage-2``, a frame chunk ``11-20``).

        Raises:
            JobNotFoundError: no such job.  ConfigurationError: no such task.
        """
        view = self.core.job_view(job_id)
        if view is not None:
            spec = view.spec
        else:
            state, version = await rebuild_stream(self.journal, job_stream(job_id), _JOB_AGGREGATE)
            if version == 0 or state.job is None:
                raise JobNotFoundError(job_id)
            spec = state.job
        names = {t.name: i for i, t in enumerate(spec.tasks)}
        if isinstance(task, str) and task in names:
            return names[task]
        try:
            index = int(task)
        except ValueError:
            index = -1
        if not isinstance(task, str) and 0 <= index < len(spec.tasks):
            return index
        if isinstance(task, str) and task.isdigit() and 0 <= index < len(spec.tasks):
            return index
        shown = ", ".join(list(names)[:10]) + (" ..." if len(names) > 10 else "")
        raise ConfigurationError(
            f"job {job_id} has no task {task!r} (tasks: {shown})", where="task"
        )

    async def policy_command(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, by: str | None = None
    ) -> Any:
        """Run a domain command of the policy; return its reply.

        Its events are journaled in the policy's stream (``policy:<name>``) before the reply,
        and replayed into the policy when the engine opens again.  ``by`` names who asked,
        for the policy's record of it (a coordinator passes the client credential's name;
        None: the embedding application itself).

        Raises:
            ConfigurationError: the policy has no such command, or an argument is bad.
        """
        result = await self.scheduler.ask(
            PolicyCommand(name=name, arguments=dict(arguments or {}), by=by),
            timeout=self.settings.ask_timeout,
        )
        if isinstance(result, TaskfarmError):
            raise result
        return result

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

        # Each stream from its latest snapshot plus the events after it, all streams of a kind
        # in a few queries: a restart reads the tail of the journal, not all of it (replay
        # from position 0 gives the same states).
        nodes = await rebuild_streams(self.journal, "node:", _NODE_AGGREGATE)
        known: dict[str, KnownNode] = {}
        for node, _version in nodes.values():
            self.core.add_node(
                node.name,
                node.capacity,
                labels=node.labels,
                health=node.health,
                reachable="offline",
            )
            self.core.set_health(
                node.name, node.health, reason=node.health_reason or "", by=node.health_by
            )
            self.core.set_drain_at(node.name, node.drain_at)
            known[node.name] = KnownNode(
                node.capacity,
                node.labels,
                node.remote,
                node.health,
                node.drain_at,
                node.health_reason or "",
                node.health_by,
                node.health_operator,
            )
        jobs = await self._load_jobs()
        jobs.sort(key=lambda item: (item[0].submitted_at, item[0].job.job_id))  # type: ignore[union-attr]
        # A job submitted in one batch with its parent may sort before it (same time, smaller
        # id): the graph must know every parent before its dependants are added.
        jobs = _parents_first(jobs)
        in_doubt: dict[tuple[str, int], set[str]] = {}
        unfinished: list[tuple[JobState, int]] = []
        orphans = 0
        for state, version in jobs:
            spec = state.job
            assert spec is not None
            if state.status in _FINISHED:
                statuses = [t.status for t in state.tasks]
                outcome = _FINISHED[state.status]
                if outcome is Outcome.SUCCEEDED and all(s == "skipped" for s in statuses):
                    outcome = Outcome.SKIPPED
                self.core.add_finished_job(
                    spec,
                    outcome,
                    [_TASK_OUTCOMES.get(s) for s in statuses],
                    metrics=_metrics_of(state),
                )
                continue
            assert isinstance(state, JobState)
            assert state.submitted_at is not None
            try:
                self.core.add_job(spec, submitted_at=state.submitted_at, state=state)
            except DependencyError as error:
                state, version = await self._end_orphan(state, version, str(error))
                orphans += 1
                self.core.add_finished_job(
                    spec, Outcome.FAILED, [_TASK_OUTCOMES.get(t.status) for t in state.tasks]
                )
                continue
            unfinished.append((state, version))
            for index in state.active_attempts():
                task = state.tasks[index]
                assert task.node is not None
                if self.core.node_health(task.node) is None:
                    self.core.add_node(task.node, Resources(), reachable="offline")
                for member in task.gang:
                    if self.core.node_health(member) is None:
                        self.core.add_node(member, Resources(), reachable="offline")
                self.core.mark_running(
                    spec.job_id, index, task.node, task.attempt, started_at=None, nodes=task.gang
                )
                in_doubt[(spec.job_id, index)] = set(task.gang or [task.node])
        for record in await self.journal.read_stream(policy_stream(self.core.policy.name)):
            self.core.apply_policy_event(record.event)
        if self.core.policy_wants_history():
            self.core.policy.recover(await _history(self.journal))
        _log.info(
            "engine_recovered",
            jobs=len(jobs),
            unfinished=len(unfinished),
            in_doubt=len(in_doubt),
            nodes=len(known),
            orphans=orphans,
        )
        self.recovery = RecoverySummary(
            jobs=len(jobs),
            unfinished=len(unfinished),
            in_doubt=len(in_doubt),
            nodes=len(known),
            orphans=orphans,
        )
        return _Recovered(unfinished=unfinished, in_doubt=in_doubt, nodes=known)

    async def _load_jobs(self) -> list[tuple[JobState | _FinishedJob, int]]:
        """Every submitted job's state and version: a finished job's from its final snapshot
        decoded as a :class:`_FinishedJob` (what the dependency graph needs), any other's in
        full (its snapshot plus the events after it)."""
        jobs: list[tuple[JobState | _FinishedJob, int]] = []
        async for stream in self.journal.load_streams(
            "job:", _FinishedJob, schema_version=_JOB_AGGREGATE.schema_version
        ):
            if stream.snapshot is not None and not stream.events:
                version, finished = stream.snapshot
                if finished.status in _FINISHED and finished.job is not None:
                    jobs.append((finished, version))
                    continue
            state, version = await self._load_job(stream)
            if state.job is not None:
                jobs.append((state, version))
        return jobs

    async def _load_job(self, stream: LoadedStream[_FinishedJob]) -> tuple[JobState, int]:
        """Return a job's full state: its snapshot (read again, in full) plus the events after
        it, or, if the snapshot does not read in full, as ``rebuild_stream`` finds it."""
        state = JobState()
        if stream.snapshot is not None:
            full = await self.journal.load_snapshot(
                stream.stream_id,
                JobState,
                schema_version=_JOB_AGGREGATE.schema_version,
                max_version=stream.snapshot[0],
            )
            if full is None or full[0] != stream.snapshot[0]:
                return await rebuild_stream(self.journal, stream.stream_id, _JOB_AGGREGATE)
            state = full[1]
        apply = _JOB_AGGREGATE.apply
        for record in stream.events:
            state = apply(state, record.event)
        return state, stream.version

    async def _end_orphan(
        self, state: JobState, version: int, problem: str
    ) -> tuple[JobState, int]:
        """End a job whose dependencies cannot be rebuilt (its parent was never journaled)."""
        spec = state.job
        assert spec is not None
        reason = f"cannot run after a restart: {problem} (a partial submission before a crash)"
        events: list[Event] = [
            TaskCancelled(task=i, reason=reason)
            for i, t in enumerate(state.tasks)
            if t.status in ("pending", "held", "assigned", "running")
        ]
        events.append(
            JobFinished(outcome="failed", reason=reason, finished_at=self.system.clock.now())
        )
        result = await self.journal.append(
            job_stream(spec.job_id), events, expected_version=version
        )
        for event in events:
            state = _JOB_AGGREGATE.apply(state, event)
        _log.warning("orphan_job_ended", job_id=spec.job_id, reason=reason)
        return state, result.version


def _by(done: str, by: str | None) -> str:
    """The default reason of an operator verb: it names who asked (an embedder: "operator")."""
    return f"{done} by {by or 'operator'}"


@contextmanager
def _time_held(clock: Clock) -> Iterator[None]:
    """Hold a virtual clock still while a caller outside any actor does several steps (an
    atomic append, spawning job actors): otherwise it sees the farm idle and jumps ahead."""
    tracker = clock.activity
    if tracker is None:
        yield
        return
    tracker.acquire()
    try:
        yield
    finally:
        tracker.release()


@dataclass(frozen=True)
class _Recovered:
    unfinished: list[tuple[JobState, int]]
    in_doubt: dict[tuple[str, int], set[str]]
    nodes: dict[str, KnownNode]


def _with_live_state(
    summary: JobSummary, domain: Mapping[str, str], statuses: Mapping[int, str]
) -> JobSummary:
    """Add what only the scheduler knows: the policy's columns, blocked and held tasks."""
    if statuses and summary.tasks:
        tasks = tuple(
            msgspec.structs.replace(t, status=statuses.get(t.index, t.status))
            for t in summary.tasks
        )
        summary = msgspec.structs.replace(summary, tasks=tasks)
    if statuses:
        counts = dict(summary.task_counts)
        for status in statuses.values():
            counts["pending"] = counts.get("pending", 0) - 1
            counts[status] = counts.get(status, 0) + 1
        summary = msgspec.structs.replace(
            summary, task_counts={k: v for k, v in counts.items() if v > 0}
        )
    if domain:
        summary = msgspec.structs.replace(summary, domain=dict(domain))
    return summary


async def _history(journal: Journal) -> list[Observation]:
    """The facts a policy learns from, rebuilt from the whole journal in order."""
    observations: list[Observation] = []
    nodes: dict[tuple[str, int], tuple[str, int]] = {}
    # The metrics each task reported (last value of each), as live observations carry them.
    metrics: dict[tuple[str, int], dict[str, float]] = {}
    async for batch in journal.read_all(until_position=await journal.last_position()):
        for recorded in batch:
            if not recorded.stream_id.startswith("job:"):
                continue
            job_id = recorded.stream_id[4:]
            event = recorded.event
            at = recorded.timestamp
            match event:
                case TaskStarted(task=task, at=began):
                    node, attempt = nodes.get((job_id, task), ("", 0))
                    observations.append(
                        TaskStartedObservation(
                            job_id=job_id, task=task, node=node, attempt=attempt, at=began or at
                        )
                    )
                case TaskMetricRecorded(task=task, name=name, value=value):
                    metrics.setdefault((job_id, task), {})[name] = value
                case TaskCompleted(task=task, runtime_s=runtime):
                    node, attempt = nodes.get((job_id, task), ("", 0))
                    observations.append(
                        TaskEndedObservation(
                            job_id=job_id,
                            task=task,
                            node=node or None,
                            attempt=attempt,
                            outcome="completed",
                            runtime_s=runtime,
                            at=at,
                            metrics=dict(metrics.get((job_id, task), {})),
                        )
                    )
                case TaskFailed(task=task, outcome=outcome, runtime_s=runtime):
                    node, attempt = nodes.get((job_id, task), ("", 0))
                    observations.append(
                        TaskEndedObservation(
                            job_id=job_id,
                            task=task,
                            node=node or None,
                            attempt=attempt,
                            outcome=outcome,
                            runtime_s=runtime,
                            at=at,
                            metrics=dict(metrics.get((job_id, task), {})),
                        )
                    )
                case TaskRequeued(task=task, lost=lost):
                    node, attempt = nodes.get((job_id, task), ("", 0))
                    observations.append(
                        TaskEndedObservation(
                            job_id=job_id,
                            task=task,
                            node=node or None,
                            attempt=attempt,
                            outcome="lost" if lost else "preempted",
                            runtime_s=0.0,
                            at=at,
                        )
                    )
                case TaskAssigned(task=task, node=node, attempt=attempt):
                    nodes[(job_id, task)] = (node, attempt)
                case JobSubmitted(job=spec, submitted_at=submitted):
                    observations.append(
                        JobSubmittedObservation(job_id=job_id, spec=spec, at=submitted)
                    )
                case TaskPreviewed(task=task, path=path):
                    observations.append(
                        TaskPreviewObservation(job_id=job_id, task=task, path=path, at=at)
                    )
                case _:
                    pass
    return observations


def _parents_first(
    jobs: list[tuple[JobState | _FinishedJob, int]],
) -> list[tuple[JobState | _FinishedJob, int]]:
    """Order jobs so each comes after the jobs it depends on, otherwise keeping their order."""
    by_id = {state.job.job_id: (state, version) for state, version in jobs if state.job}
    ordered: list[tuple[JobState | _FinishedJob, int]] = []
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
                # A job's own task-level edges name itself: not a parent to visit first.
                if d.parent in by_id and d.parent not in done and d.parent != job_id
            )
    return ordered


def _metrics_of(state: JobState | _FinishedJob) -> dict[int, dict[str, float]]:
    """What a finished job's tasks reported (-1: the job's last values), for conditional
    dependencies submitted after it ended."""
    tasks: Sequence[TaskState | _FinishedTask] = state.tasks
    kept = {i: t.metrics for i, t in enumerate(tasks) if t.metrics}
    if state.metrics:
        kept[-1] = state.metrics
    return kept


def _check_policy_events(policy: Policy, journal: Journal) -> None:
    """Refuse a journal that could not store the policy's events, now rather than when the
    policy first journals one (which would stop scheduling)."""
    events = getattr(policy, "events", None)
    codec = getattr(journal, "codec", None)
    if events is None or codec is None:
        return
    missing = sorted(set(events.tags()) - set(codec.tags()))
    if missing:
        raise ConfigurationError(
            f"the journal's codec lacks the events of policy {policy.name!r} "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): open the journal "
            "with a codec updated with the policy's `events`",
            where="open_engine",
        )


@asynccontextmanager
async def open_engine(
    *,
    journal: Journal,
    clock: Clock | None = None,
    policy: Policy | None = None,
    settings: EngineSettings | None = None,
) -> AsyncIterator[Engine]:
    """Open an engine over ``journal``: recover, start the scheduler, yield the engine.

    With a :class:`VirtualClock`, time stops moving when the engine closes: a simulation ends
    at its horizon, not hours later while the actors shut down (see ``open_system``).
    """
    settings = settings or EngineSettings()
    core = SchedulerCore(policy or FifoPolicy(), counters=settings.counters)
    _check_policy_events(core.policy, journal)
    async with open_system(clock=clock) as system:
        engine = Engine(system=system, journal=journal, core=core, settings=settings)
        # Recovery reads the journal outside any actor: hold a virtual clock still meanwhile,
        # or it sees the farm idle and jumps to the next timer (how far it gets would depend
        # on how many reads recovery takes).
        with _time_held(system.clock):
            recovered = await engine._rebuild()

        def scheduler_factory() -> SchedulerActor:
            actor = SchedulerActor(
                core=core,
                journal=journal,
                settings=settings,
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
