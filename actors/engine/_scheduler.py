"""The scheduler actor: admits submissions, runs placement cycles, reacts to ends and nodes.

It never waits on I/O in the hot path: placements go to job actors as ``Dispatch`` tells (each
job journals its own assignments, in parallel, through the journal's group commit), and a
submission is journaled by the engine in one atomic append while placement goes on.  Triggers
are coalesced: any number of events between two cycles cause one cycle.  A periodic timer on
the injected clock runs a cycle too, and so do the policy's own wake-ups (``next_wakeup``), job
holds that expire, retry backoffs and blocklist expiries, each at its exact time.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, assert_never

import msgspec

from actors._errors import SpecError
from persistence import EventEncodeError, Journal
from runtime import Actor, ActorRef, ConfigurationError, TaskfarmError, get_logger

from ._events import NodeHealthChanged, NodeRegistered, node_stream, policy_stream
from ._graph import Outcome
from ._messages import (
    AdmitJobs,
    AttemptLost,
    CancelTasks,
    CheckpointTask,
    DecideRetry,
    DescribeJob,
    Dispatch,
    GetNodes,
    JobChanged,
    JobEnded,
    JobRevived,
    JobsAdded,
    Kick,
    NodeJoined,
    NodeLeft,
    PolicyCommand,
    PreemptTask,
    ReleaseJobIds,
    SetNodeHealth,
    SetNodeReachable,
    SkipTasks,
    TaskEnded,
    TaskUpdate,
    Unplace,
    WhyJob,
)
from ._placement import SchedulerCore
from ._policy import (
    JobSubmittedObservation,
    NodeChanged,
    Preemption,
    TaskEndedObservation,
    TaskPreviewObservation,
    TaskProgressObservation,
    TaskStartedObservation,
)
from ._settings import EngineSettings
from ._spec import SubmitJob
from ._summaries import NodeSummary

__all__ = [
    "CheckpointsDue",
    "DrainDue",
    "GraceExpired",
    "KnownNode",
    "Recovered",
    "SchedulerActor",
]

_log = get_logger("actors.scheduler")


class GraceExpired(Kick, frozen=True, kw_only=True, tag="engine.cmd.grace_expired"):
    """The restart grace period is over: attempts nobody re-claimed are lost."""


class Recovered(Kick, frozen=True, kw_only=True, tag="engine.cmd.recovered"):
    """Every recovered job actor runs: the restart grace period starts now."""


class DrainDue(Kick, frozen=True, kw_only=True, tag="engine.cmd.drain_due"):
    """A planned drain's time has come: the node drains, what runs there yields."""

    name: str


class CheckpointsDue(Kick, frozen=True, kw_only=True, tag="engine.cmd.checkpoints_due"):
    """A periodic checkpoint (or, with ``drain``, a warning before a planned drain) may be
    due: ask for the ones that are (no placement cycle)."""

    drain: bool = False


SchedulerMessage = (
    AdmitJobs
    | JobsAdded
    | ReleaseJobIds
    | JobRevived
    | TaskEnded
    | TaskUpdate
    | DecideRetry
    | Unplace
    | JobEnded
    | JobChanged
    | NodeJoined
    | NodeLeft
    | SetNodeHealth
    | SetNodeReachable
    | Kick
    | WhyJob
    | DescribeJob
    | PolicyCommand
    | GetNodes
)


class KnownNode:
    """A node as the journal knows it: identity, and the health an operator gave it."""

    __slots__ = ("by", "capacity", "drain_at", "health", "labels", "operator", "reason", "remote")

    def __init__(
        self,
        capacity: Any,
        labels: tuple[str, ...],
        remote: bool,
        health: str = "online",
        drain_at: datetime | None = None,
        reason: str = "",
        by: str = "engine",
        operator: str | None = None,
    ) -> None:
        self.by = by
        self.operator = operator
        self.capacity = capacity
        self.labels = labels
        self.remote = remote
        self.health = health
        self.drain_at = drain_at
        self.reason = reason


class SchedulerActor(Actor[SchedulerMessage]):
    """Owns the queues, the live views and the placement index (the :class:`SchedulerCore`)."""

    def __init__(
        self,
        *,
        core: SchedulerCore,
        journal: Journal,
        settings: EngineSettings,
        job_ref: Callable[[str], ActorRef[Any] | None],
        on_job_ended: Callable[[str, Outcome], None],
        in_doubt: dict[tuple[str, int], set[str]] | None = None,
        known_nodes: dict[str, KnownNode] | None = None,
    ) -> None:
        self.core = core
        self.journal = journal
        self.settings = settings
        self.job_ref = job_ref
        self.on_job_ended = on_job_ended
        # Attempts running when the coordinator stopped: (job, task) -> the nodes (every rank
        # of a multi-node attempt) that have not re-claimed it yet.
        self.in_doubt = {key: set(nodes) for key, nodes in (in_doubt or {}).items()}
        self._kick_queued = False
        self._known_nodes: dict[str, KnownNode] = dict(known_nodes or {})
        # Ids of submissions validated but not yet journaled (no second job may take them).
        self._reserved: set[str] = set()
        # Times at which queued work becomes placeable (retry backoffs, blocklist expiries,
        # holds, the policy's wake-ups): one timer, armed for the earliest.
        self._wakeups: list[datetime] = []
        self._armed: datetime | None = None
        self._checkpoint_timer: datetime | None = None
        # Attempts warned of their node's planned drain (node, job, task), and when the next
        # warning is due (its own timer).
        self._drain_warned: set[tuple[str, str, int]] = set()
        self._drain_warning_timer: datetime | None = None
        core.on_unreachable = self._cancel_unreachable
        core.on_skipped = self._skip_tasks

    async def on_start(self) -> None:
        interval = self.core.policy.cycle_interval
        self.context.start_timer("cycle", Kick(), delay=interval, interval=interval)
        now = self.context.clock.now()
        for when in self.core.wakeups(now):
            self._wake_at(when)
        for name, known in self._known_nodes.items():
            if known.drain_at is not None:
                self._arm_drain(name, known.drain_at)

    def _wake_at(self, when: datetime) -> None:
        heapq.heappush(self._wakeups, when)
        if self._wakeups[0] == when:
            self._arm_wakeup()

    def _arm_wakeup(self) -> None:
        now = self.context.clock.now()
        wakeups = self._wakeups
        while wakeups and wakeups[0] <= now:
            heapq.heappop(wakeups)
        if wakeups and wakeups[0] != self._armed:
            self._armed = wakeups[0]
            delay = (wakeups[0] - now).total_seconds()
            self.context.start_timer("wakeup", Kick(), delay=delay)

    def _kick(self) -> None:
        if not self._kick_queued:
            self._kick_queued = True
            self.context.self_ref.tell_nowait(Kick())

    async def receive(self, message: SchedulerMessage) -> Any:
        core = self.core
        match message:
            case AdmitJobs(specs=specs, source=source):
                return self._admit(specs, source)
            case JobsAdded(specs=specs, submitted_at=at):
                for spec in specs:
                    self._reserved.discard(spec.job_id)
                    core.observe(JobSubmittedObservation(job_id=spec.job_id, spec=spec, at=at))
                    core.add_job(spec, submitted_at=at)
                    _log.info("job_submitted", job_id=spec.job_id, tasks=len(spec.tasks))
                self._kick()
            case ReleaseJobIds(job_ids=ids):
                self._reserved.difference_update(ids)
            case JobRevived(job_id=job_id, state=state):
                self._revive(job_id, state)
            case TaskEnded():
                self._task_ended(message)
                await self._check_quarantine(message)
                self._kick()
            case TaskUpdate():
                self._task_update(message)
            case DecideRetry(job_id=job_id, task=task, failure=failure):
                return core.decide_failure(job_id, task, failure, self.context.clock.now())
            case Unplace(job_id=job_id, task=task):
                core.unplace(job_id, task)
                self._kick()
            case JobEnded(job_id=job_id, outcome=outcome):
                core.job_ended(job_id, outcome)
                self.on_job_ended(job_id, outcome)
                self._kick()
            case JobChanged(job_id=job_id, status=status, spec=spec, released=released):
                if status is not None:
                    core.set_job_status(job_id, status)
                if spec is not None:
                    core.amend_job(spec)
                if released:
                    core.release_held(job_id, released)
                self._kick()
            case NodeJoined(name=name, capacity=capacity, labels=labels, remote=remote):
                await self._node_joined(name, capacity, labels, remote)
            case NodeLeft(name=name, reason=reason):
                self._node_left(name, reason)
            case SetNodeHealth(
                name=name, health=health, reason=reason, drain_at=drain_at, by=by, operator=who
            ):
                return await self._set_health(name, health, reason, drain_at, by=by, operator=who)
            case SetNodeReachable(name=name, reachable=reachable):
                if core.node_health(name) is not None:
                    core.set_reachable(name, reachable)
                    self._observe_node(name)
                    _log.info("node_reachability_changed", node_id=name, reachable=reachable)
                    self._kick()
            case Recovered():
                unsent, core.unsent_skips = core.unsent_skips, []
                for job_id, tasks, reason in unsent:
                    self._skip_tasks(job_id, tasks, reason)
                # Not armed in on_start: on a virtual clock the grace could run out while the
                # engine still spawns the recovered jobs, whose in-doubt attempts would then be
                # forgotten instead of requeued.
                if self.in_doubt:
                    self.context.start_timer(
                        "restart-grace", GraceExpired(), delay=self.settings.restart_grace
                    )
                self._kick()
            case GraceExpired():
                self._grace_expired()
            case DrainDue(name=name):
                await self._drain_due(name)
            case CheckpointsDue(drain=drain):
                if drain:
                    self._drain_warning_timer = None
                else:
                    self._checkpoint_timer = None
                self._request_checkpoints(self.context.clock.now())
            case Kick():
                self._kick_queued = False
                self._arm_wakeup()
                self._cycle()
                await self._apply_node_actions()
                await self._journal_cycle_events()
            case WhyJob(job_id=job_id):
                return "\n".join(core.why(job_id, self.context.clock.now()))
            case DescribeJob(job_id=job_id):
                return core.describe(job_id, self.context.clock.now())
            case PolicyCommand(name=name, arguments=arguments, by=by):
                return await self._policy_command(name, arguments, by=by)
            case GetNodes():
                return self._node_summaries()
            case _:
                assert_never(message)
        return None

    # -- submission -----------------------------------------------------------------------------

    def _admit(
        self, specs: tuple[SubmitJob, ...], source: str
    ) -> tuple[SubmitJob, ...] | TaskfarmError:
        """Validate (and let the policy prepare) a submission; reserve its ids."""
        core = self.core
        now = self.context.clock.now()
        policy = core.policy
        try:
            prepared = []
            for spec in specs:
                if spec.job_id in self._reserved:
                    raise SpecError(
                        path=source or spec.source,
                        field=f"job {spec.job_id!r}",
                        problem="a job with this id is being submitted",
                    )
                core.check_metadata(spec)
                try:
                    policy.validate(spec, now)
                    spec = policy.prepare(spec, now)
                except TaskfarmError:
                    raise
                except Exception as error:  # a policy bug refuses the job, not the farm
                    core._policy_failed(None, "validate", error)
                    raise SpecError(
                        path=source or spec.source,
                        field=f"job {spec.job_id!r}",
                        problem=f"policy error: {type(error).__name__}: {error}",
                    ) from None
                prepared.append(spec)
            core.check_submission(prepared, source=source)
        except TaskfarmError as error:
            return error  # the caller raises it: a bad submission must not crash the scheduler
        self._reserved.update(spec.job_id for spec in prepared)
        return tuple(prepared)

    def _revive(self, job_id: str, state: Any) -> None:
        """A finished job was reopened: forget its passivated outcome, track it again."""
        spec = state.job
        self.core.graph.reopen(spec.graph_job(), [_outcome_of(t.status) for t in state.tasks])
        self.core.add_job(spec, submitted_at=state.submitted_at, state=state)
        _log.info("job_reopened", job_id=job_id)
        self._kick()

    async def _policy_command(self, name: str, arguments: Any, *, by: str | None) -> Any:
        """Decide, journal the policy's events, fold them in, reply (or return the error)."""
        core = self.core
        now = self.context.clock.now()
        try:
            result = core.policy.command(name, arguments, core.farm, now, by=by)
        except TaskfarmError as error:
            return error
        except Exception as error:  # a policy bug answers the caller, it does not crash us
            core._policy_failed(None, f"command {name}", error)
            return ConfigurationError(
                f"policy error: {type(error).__name__}: {error}", where=f"command {name}"
            )
        if result.events:
            try:
                await self.journal.append(policy_stream(core.policy.name), list(result.events))
            except EventEncodeError as error:  # the policy's events are not in the codec
                core._policy_failed(None, f"command {name}", error)
                return ConfigurationError(f"policy error: {error}", where=f"command {name}")
            for event in result.events:
                core.apply_policy_event(event)
            self._kick()
        return result.reply

    # -- task events ----------------------------------------------------------------------------

    def _task_ended(self, message: TaskEnded) -> None:
        core = self.core
        now = self.context.clock.now()
        core.task_ended(
            message.job_id,
            message.task,
            outcome=message.outcome,
            retry_at=message.retry_at,
            failure=message.failure,
            attempt_outcome=message.attempt_outcome,
            runtime_s=message.runtime_s,
            lost=message.lost,
            held=message.held,
            avoid_node=message.avoid_node,
            resources=message.resources,
            checkpoint_at=message.checkpoint_at,
            metrics=dict(message.metrics),
        )
        if message.blocklist_node and message.blocklist_until:
            core.block_node(message.job_id, message.blocklist_node, message.blocklist_until)
            self._wake_at(message.blocklist_until)
        if message.retry_at is not None:
            self._wake_at(message.retry_at)
        self.in_doubt.pop((message.job_id, message.task), None)
        if message.attempt_outcome is not None and message.node is not None:
            view = core.job_view(message.job_id)
            core.observe(
                TaskEndedObservation(
                    job_id=message.job_id,
                    task=message.task,
                    node=message.node,
                    attempt=message.attempt,
                    outcome=message.attempt_outcome,
                    runtime_s=message.runtime_s,
                    at=now,
                    metrics=dict(message.metrics),
                    job_type=_job_type(view.spec.labels) if view is not None else "",
                )
            )

    def _task_update(self, message: TaskUpdate) -> None:
        core = self.core
        now = self.context.clock.now()
        released = []
        if message.started and message.node is not None:
            core.observe(
                TaskStartedObservation(
                    job_id=message.job_id,
                    task=message.task,
                    node=message.node,
                    attempt=message.attempt,
                    at=now,
                )
            )
        if message.progress is not None:
            released = core.task_progressed(message.job_id, message.task, message.progress)
            core.observe(
                TaskProgressObservation(
                    job_id=message.job_id, task=message.task, fraction=message.progress, at=now
                )
            )
        if message.checkpoint_at is not None:
            core.task_checkpointed(
                message.job_id, message.task, message.checkpoint_at, message.checkpoint_bytes
            )
        if message.preempted:
            core.task_preempted(message.job_id, message.task)
        if message.preview is not None:
            core.observe(
                TaskPreviewObservation(
                    job_id=message.job_id, task=message.task, path=message.preview, at=now
                )
            )
        if released:
            self._kick()

    def _skip_tasks(self, job_id: str, tasks: list[int], reason: str) -> None:
        """A conditional branch was not taken: its tasks end skipped (journaled by their job)."""
        ref = self.job_ref(job_id)
        if ref is not None:
            ref.tell_nowait(SkipTasks(tasks=tuple(tasks), reason=reason))

    def _cancel_unreachable(self, job_id: str, tasks: list[int], reason: str) -> None:
        """Dependants whose parent can no longer satisfy them are cancelled, naming it."""
        ref = self.job_ref(job_id)
        if ref is not None:
            ref.tell_nowait(CancelTasks(tasks=tuple(tasks), reason=f"dependency failed: {reason}"))

    # -- placement ------------------------------------------------------------------------------

    def _cycle(self) -> None:
        core = self.core
        now = self.context.clock.now()
        placements = core.place(now)
        for when in core.hold_wakeups:
            self._wake_at(when)
        core.hold_wakeups.clear()
        self._preempt(now)
        by_job: dict[str, list[tuple[int, tuple[str, ...]]]] = defaultdict(list)
        for placement in placements:
            nodes = placement.nodes or (placement.node,)
            by_job[placement.job_id].append((placement.task, nodes))
        intervals: dict[str, list[float | None]] = defaultdict(list)
        for placement in placements:
            intervals[placement.job_id].append(placement.checkpoint_interval)
        for job_id, items in by_job.items():
            ref = self.job_ref(job_id)
            if ref is None:
                for task, _node in items:
                    core.unplace(job_id, task)
                continue
            every = intervals[job_id]
            ref.tell_nowait(
                Dispatch(
                    placements=tuple(items),
                    checkpoint_intervals=tuple(every) if any(every) else (),
                )
            )
        self._request_checkpoints(now)
        wakeup = core.next_wakeup(now)
        if wakeup is not None and wakeup > now:
            self._wake_at(wakeup)

    def _request_checkpoints(self, now: datetime) -> None:
        """Ask for the checkpoints the policy's intervals make due (SIGUSR1 to the attempt)."""
        for job_id, task, reason in self.core.checkpoint_requests(now):
            ref = self.job_ref(job_id)
            if ref is not None:
                ref.tell_nowait(CheckpointTask(task=task, reason=reason))
        self._warn_before_drains(now)
        # Its own timer, not a placement cycle: periodic checkpoints of a big farm come due
        # far more often than anything else happens.
        due = self.core.next_checkpoint_due
        if (
            due is not None
            and due > now
            and (self._checkpoint_timer is None or due < self._checkpoint_timer)
        ):
            self._checkpoint_timer = due
            delay = (due - now).total_seconds()
            self.context.start_timer("checkpoints", CheckpointsDue(), delay=delay)

    def _warn_before_drains(self, now: datetime) -> None:
        """Ask each attempt on a node whose drain is planned to checkpoint its
        ``checkpoint_warning`` before the drain (once per attempt and node), as Slurm's
        ``--signal`` does before a walltime: at the drain it is preempted (asked once more,
        given the preempt grace, stopped), so a long stage loses at most the work since."""
        core = self.core
        warned: set[tuple[str, str, int]] = set()
        earliest: datetime | None = None
        for name, drain_at in sorted(core.planned_drains.items()):
            for job_id, task in core.running_on(name):
                view = core.job_view(job_id)
                if view is None or not view.spec.checkpointable:
                    continue
                warning = view.spec.task_checkpoint_warning(task)
                if warning is None:
                    continue
                key = (name, job_id, task)
                due = drain_at - timedelta(seconds=warning)
                if key in self._drain_warned:
                    warned.add(key)
                elif due <= now:
                    warned.add(key)
                    ref = self.job_ref(job_id)
                    if ref is not None:
                        reason = (
                            f"node {name} drains at {drain_at.isoformat()} "
                            f"(checkpoint_warning {warning:g} s)"
                        )
                        ref.tell_nowait(CheckpointTask(task=task, reason=reason))
                        _log.info(
                            "checkpoint_warning_sent",
                            before="drain",
                            node_id=name,
                            job_id=job_id,
                            task=task,
                            drain_at=drain_at.isoformat(),
                        )
                elif earliest is None or due < earliest:
                    earliest = due
        self._drain_warned = warned  # forgets attempts that ended or moved
        if earliest is not None and (
            self._drain_warning_timer is None or earliest < self._drain_warning_timer
        ):
            self._drain_warning_timer = earliest
            delay = (earliest - now).total_seconds()
            self.context.start_timer("drain-warnings", CheckpointsDue(drain=True), delay=delay)

    async def _apply_node_actions(self) -> None:
        """Journal and apply the node health changes the policy asks for this cycle."""
        for action in self.core.node_actions(self.context.clock.now()):
            await self._set_health(
                action.node, action.health, action.reason, action.at, by="policy"
            )

    async def _journal_cycle_events(self) -> None:
        """Journal the facts the policy decided by itself this cycle, then fold them in."""
        core = self.core
        events = core.cycle_events(self.context.clock.now())
        if not events:
            return
        try:
            await self.journal.append(policy_stream(core.policy.name), list(events))
        except EventEncodeError as error:  # a policy bug: logged once, scheduling goes on
            core._policy_failed(None, "cycle_events", error)
            return
        for event in events:
            core.apply_policy_event(event)

    def _preempt(self, now: datetime) -> None:
        """Ask the victims the policy chose: for the tasks this cycle could not place, and
        those it yields for its own reasons (a reservation, a maintenance window)."""
        for _blocked, choice in self.core.preemption_choices(now):
            self._ask_to_yield(choice, "preemption_requested")
        for choice in self.core.yield_choices(now):
            self._ask_to_yield(choice, "yield_requested")

    def _ask_to_yield(self, choice: Preemption, event: str) -> None:
        ref = self.job_ref(choice.victim_job)
        if ref is None:
            self.core.preempting.pop((choice.victim_job, choice.victim_task), None)
            return
        ref.tell_nowait(
            PreemptTask(task=choice.victim_task, node=choice.node, reason=choice.reason)
        )
        _log.info(
            event,
            job_id=choice.victim_job,
            task=choice.victim_task,
            node_id=choice.node,
            reason=choice.reason,
        )

    # -- nodes ----------------------------------------------------------------------------------

    async def _node_joined(
        self, name: str, capacity: Any, labels: tuple[str, ...], remote: bool
    ) -> None:
        known = self._known_nodes.get(name)
        if known is None or (known.capacity, known.labels, known.remote) != (
            capacity,
            labels,
            remote,
        ):
            await self.journal.append(
                node_stream(name),
                [NodeRegistered(name=name, capacity=capacity, labels=labels, remote=remote)],
            )
            if known is None:
                known = self._known_nodes[name] = KnownNode(capacity, labels, remote)
            else:
                known.capacity, known.labels, known.remote = capacity, labels, remote
        # Drain, sleep and quarantine are the operator's (journaled): a rejoin keeps them.
        health = known.health
        self.core.add_node(name, capacity, labels=labels, health=health, reachable="connected")
        self.core.set_health(name, health, reason=known.reason, by=known.by)
        self.core.set_drain_at(name, known.drain_at)
        self._observe_node(name)
        _log.info("node_joined", node_id=name, capacity=str(capacity), health=health)
        self._kick()

    def _node_left(self, name: str, reason: str) -> None:
        core = self.core
        health = core.node_health(name)
        if health is None:
            return
        core.set_reachable(name, "offline")
        self._observe_node(name)
        if health == "sleeping":
            # A sleeping node goes offline on purpose: its work (if any) is not lost, it waits
            # for the node to wake up and re-claim it.
            _log.info("node_asleep_offline", node_id=name, reason=reason)
            return
        for job_id, task in core.running_on(name):
            ref = self.job_ref(job_id)
            if ref is not None:
                ref.tell_nowait(AttemptLost(task=task, node=name, reason=f"node {name}: {reason}"))
        _log.warning("node_left", node_id=name, reason=reason)

    async def _set_health(
        self,
        name: str,
        health: str,
        reason: str,
        drain_at: datetime | None,
        *,
        by: str = "operator",
        operator: str | None = None,
    ) -> bool:
        core = self.core
        previous = core.node_health(name)
        if previous is None:
            return False
        known = self._known_nodes.get(name)
        now = self.context.clock.now()
        if drain_at is not None and drain_at <= now:
            health, drain_at = "draining", None
        if known is not None and known.health == health and known.drain_at == drain_at:
            return True
        await self.journal.append(
            node_stream(name),
            [
                NodeHealthChanged(
                    health=health, reason=reason, drain_at=drain_at, by=by, operator=operator
                )
            ],
        )
        if known is not None:
            known.health, known.drain_at, known.reason, known.by = health, drain_at, reason, by
            known.operator = operator
        core.set_health(name, health, reason=reason, by=by)
        core.set_drain_at(name, drain_at)
        if drain_at is not None:
            self._arm_drain(name, drain_at)
        else:
            self.context.cancel_timer(f"drain-{name}")
        self._observe_node(name)
        _log.info(
            "node_health_changed",
            node_id=name,
            health=health,
            reason=reason,
            by=by,
            operator=operator,
            drain_at=drain_at.isoformat() if drain_at else None,
        )
        self._kick()
        return True

    def _arm_drain(self, name: str, when: datetime) -> None:
        delay = max(0.0, (when - self.context.clock.now()).total_seconds())
        self.context.start_timer(f"drain-{name}", DrainDue(name=name), delay=delay)

    async def _drain_due(self, name: str) -> None:
        known = self._known_nodes.get(name)
        if known is None or known.drain_at is None:
            return
        reason = f"drain planned for {known.drain_at.isoformat()}"
        await self._set_health(name, "draining", reason, None, by=known.by, operator=known.operator)
        for job_id, task in self.core.running_on(name):
            ref = self.job_ref(job_id)
            if ref is not None:
                ref.tell_nowait(PreemptTask(task=task, node=name, reason=reason, force=True))

    def _observe_node(self, name: str) -> None:
        view = self.core.node_view(name)
        if view is None:
            return
        self.core.observe(
            NodeChanged(
                node=name,
                health=view.health,
                reachable=view.reachable,
                capacity=view.capacity,
                at=self.context.clock.now(),
            )
        )

    def _grace_expired(self) -> None:
        for (job_id, task), nodes in sorted(self.in_doubt.items()):
            ref = self.job_ref(job_id)
            node = min(nodes)
            if ref is not None:
                ref.tell_nowait(
                    AttemptLost(
                        task=task, node=node, reason="not re-claimed after a coordinator restart"
                    )
                )
        self.in_doubt.clear()

    def claimed(self, job_id: str, task: int, node: str) -> None:
        """An agent re-claimed (its rank of) an in-doubt attempt: that part runs, not lost.
        A multi-node attempt is safe once every rank is re-claimed."""
        nodes = self.in_doubt.get((job_id, task))
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self.in_doubt[(job_id, task)]

    async def _check_quarantine(self, message: TaskEnded) -> None:
        node = message.node
        if message.failure is None or node is None:
            return
        reason = self.core.quarantine_due(
            node,
            after=self.settings.quarantine_after,
            distinct_jobs=self.settings.quarantine_distinct_jobs,
        )
        if reason is not None:
            await self._set_health(node, "quarantined", reason, None, by="engine")
            _log.warning("node_quarantined", node_id=node, reason=reason)

    def _node_summaries(self) -> list[NodeSummary]:
        summaries = self.core.node_summaries()
        # Who set a node's health is the journal's record (the core's views are the policy's).
        for i, summary in enumerate(summaries):
            known = self._known_nodes.get(summary.name)
            if known is not None and known.operator is not None:
                summaries[i] = msgspec.structs.replace(summary, by=known.operator)
        return summaries


def _outcome_of(status: str) -> Outcome | None:
    return {
        "completed": Outcome.SUCCEEDED,
        "failed": Outcome.FAILED,
        "cancelled": Outcome.CANCELLED,
        "skipped": Outcome.SKIPPED,
    }.get(status)


def _job_type(labels: tuple[str, ...]) -> str:
    for label in labels:
        key, eq, value = label.partition("=")
        if eq and key == "type":
            return value
    return ""
