"""The scheduler actor: admits submissions, runs placement cycles, reacts to ends and nodes.

It never waits on I/O in the hot path: placements go to job actors as ``Dispatch`` tells (each
job journals its own assignments, in parallel, through the journal's group commit).  Triggers
are coalesced: any number of events between two cycles cause one cycle.  A periodic timer on the
injected clock runs a cycle too, for policies whose judgement changes with time alone.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, assert_never

from persistence import Journal
from runtime import Actor, ActorRef, TaskfarmError, get_logger

from ._events import NodeQuarantined, NodeRegistered, node_stream
from ._graph import Outcome
from ._messages import (
    AdmitJobs,
    AttemptLost,
    CreateJob,
    Dispatch,
    GetNodes,
    JobEnded,
    Kick,
    NodeJoined,
    NodeLeft,
    PreemptTask,
    SetNodeHealth,
    TaskEnded,
    Unplace,
    WhyJob,
)
from ._placement import SchedulerCore
from ._settings import EngineSettings
from ._summaries import NodeSummary

__all__ = ["GraceExpired", "Recovered", "SchedulerActor"]

_log = get_logger("actors.scheduler")


class GraceExpired(Kick, frozen=True, kw_only=True, tag="engine.cmd.grace_expired"):
    """The restart grace period is over: attempts nobody re-claimed are lost."""


class Recovered(Kick, frozen=True, kw_only=True, tag="engine.cmd.recovered"):
    """Every recovered job actor runs: the restart grace period starts now."""


SchedulerMessage = (
    AdmitJobs
    | TaskEnded
    | Unplace
    | JobEnded
    | NodeJoined
    | NodeLeft
    | SetNodeHealth
    | Kick
    | WhyJob
    | GetNodes
)


class SchedulerActor(Actor[SchedulerMessage]):
    """Owns the queues and the placement index (the :class:`SchedulerCore`)."""

    def __init__(
        self,
        *,
        core: SchedulerCore,
        journal: Journal,
        settings: EngineSettings,
        spawn_job: Callable[[str], Awaitable[ActorRef[Any]]],
        job_ref: Callable[[str], ActorRef[Any] | None],
        on_job_ended: Callable[[str, Outcome], None],
        in_doubt: dict[tuple[str, int], str] | None = None,
        known_nodes: dict[str, tuple[Any, ...]] | None = None,
    ) -> None:
        self.core = core
        self.journal = journal
        self.settings = settings
        self.spawn_job = spawn_job
        self.job_ref = job_ref
        self.on_job_ended = on_job_ended
        # Attempts running when the coordinator stopped: (job, task) -> node, until re-claimed.
        self.in_doubt = dict(in_doubt or {})
        self._kick_queued = False
        self._known_nodes: dict[str, tuple[Any, ...]] = dict(known_nodes or {})
        # Times at which queued work becomes placeable (retry backoffs, blocklist expiries):
        # one timer, armed for the earliest, so a retry starts on time, not at the next cycle.
        self._wakeups: list[datetime] = []
        self._armed: datetime | None = None

    async def on_start(self) -> None:
        interval = self.core.policy.cycle_interval
        self.context.start_timer("cycle", Kick(), delay=interval, interval=interval)
        for when in self.core.wakeups(self.context.clock.now()):
            self._wake_at(when)

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
                return await self._submit(specs, source)
            case TaskEnded():
                core.task_ended(
                    message.job_id,
                    message.task,
                    outcome=message.outcome,
                    retry_at=message.retry_at,
                    failed_on_node=message.failed_on_node,
                )
                if message.blocklist_node and message.blocklist_until:
                    core.block_node(message.job_id, message.blocklist_node, message.blocklist_until)
                    self._wake_at(message.blocklist_until)
                if message.retry_at is not None:
                    self._wake_at(message.retry_at)
                self.in_doubt.pop((message.job_id, message.task), None)
                await self._check_quarantine(message)
                self._kick()
            case Unplace(job_id=job_id, task=task):
                core.unplace(job_id, task)
                self._kick()
            case JobEnded(job_id=job_id, outcome=outcome):
                core.job_ended(job_id, outcome)
                self.on_job_ended(job_id, outcome)
                self._kick()
            case NodeJoined(name=name, capacity=capacity, labels=labels, remote=remote):
                await self._node_joined(name, capacity, labels, remote)
            case NodeLeft(name=name, reason=reason):
                self._node_left(name, reason)
            case SetNodeHealth(name=name, health=health, reason=reason):
                previous = core.node_health(name)
                if previous is None:
                    return False
                if (previous == "quarantined") != (health == "quarantined"):
                    # Quarantine is journaled: a restart must remember it, or its release.
                    await self.journal.append(
                        node_stream(name),
                        [
                            NodeQuarantined(
                                reason=reason or "set by the operator",
                                released=health != "quarantined",
                            )
                        ],
                    )
                core.set_health(name, health)
                _log.info("node_health_changed", node_id=name, health=health, reason=reason)
                self._kick()
                return True
            case Recovered():
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
            case Kick():
                self._kick_queued = False
                self._arm_wakeup()
                self._cycle()
            case WhyJob(job_id=job_id):
                return "\n".join(core.why(job_id, self.context.clock.now()))
            case GetNodes():
                return self._node_summaries()
            case _:
                assert_never(message)
        return None

    # -- submission -----------------------------------------------------------------------------

    async def _submit(self, specs: tuple[Any, ...], source: str) -> list[str] | TaskfarmError:
        try:
            self.core.check_submission(specs, source=source)
        except TaskfarmError as error:
            return error  # the caller raises it: a bad submission must not crash the scheduler
        now = self.context.clock.now()
        for spec in specs:
            ref = await self.spawn_job(spec.job_id)
            await ref.ask(CreateJob(spec=spec), timeout=self.settings.report_timeout)
            self.core.add_job(spec, submitted_at=now)
            _log.info("job_submitted", job_id=spec.job_id, tasks=len(spec.tasks))
        self._kick()
        return [spec.job_id for spec in specs]

    # -- placement ------------------------------------------------------------------------------

    def _cycle(self) -> None:
        now = self.context.clock.now()
        placements = self.core.place(now)
        self._preempt(now)
        by_job: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for placement in placements:
            by_job[placement.job_id].append((placement.task, placement.node))
        for job_id, items in by_job.items():
            ref = self.job_ref(job_id)
            if ref is None:
                for task, _node in items:
                    self.core.unplace(job_id, task)
                continue
            ref.tell_nowait(Dispatch(placements=tuple(items)))

    def _preempt(self, now: Any) -> None:
        """Offer the tasks this cycle could not place to the policy's preemption hook."""
        core = self.core
        farm = core.last_farm
        if farm is None or not core.blocked:
            return
        waiting_for = set(core.preempting.values())
        for job_view, task_view in core.blocked:
            blocked = (job_view.job_id, task_view.index)
            if blocked in waiting_for:
                continue  # its victims are still yielding
            for choice in core.policy.preemptions(job_view, task_view, farm, now):
                victim = (choice.victim_job, choice.victim_task)
                if victim in core.preempting or not core.is_running_on(victim, choice.node):
                    continue
                ref = self.job_ref(choice.victim_job)
                if ref is None:
                    continue
                core.preempting[victim] = blocked
                waiting_for.add(blocked)
                ref.tell_nowait(
                    PreemptTask(task=choice.victim_task, node=choice.node, reason=choice.reason)
                )
                _log.info(
                    "preemption_requested",
                    job_id=choice.victim_job,
                    task=choice.victim_task,
                    node_id=choice.node,
                    reason=choice.reason,
                )

    # -- nodes ----------------------------------------------------------------------------------

    async def _node_joined(
        self, name: str, capacity: Any, labels: tuple[str, ...], remote: bool
    ) -> None:
        identity = (capacity, labels, remote)
        if self._known_nodes.get(name) != identity:
            await self.journal.append(
                node_stream(name),
                [NodeRegistered(name=name, capacity=capacity, labels=labels, remote=remote)],
            )
            self._known_nodes[name] = identity
        health = self.core.node_health(name)
        self.core.add_node(
            name,
            capacity,
            labels=labels,
            health="quarantined" if health == "quarantined" else "online",
        )
        _log.info("node_joined", node_id=name, capacity=str(capacity))
        self._kick()

    def _node_left(self, name: str, reason: str) -> None:
        if self.core.node_health(name) is None:
            return
        self.core.set_health(name, "offline")
        for job_id, task in self.core.running_on(name):
            ref = self.job_ref(job_id)
            if ref is not None:
                ref.tell_nowait(AttemptLost(task=task, node=name, reason=f"node {name}: {reason}"))
        _log.warning("node_left", node_id=name, reason=reason)

    def _grace_expired(self) -> None:
        for (job_id, task), node in sorted(self.in_doubt.items()):
            ref = self.job_ref(job_id)
            if ref is not None:
                ref.tell_nowait(
                    AttemptLost(
                        task=task, node=node, reason="not re-claimed after a coordinator restart"
                    )
                )
        self.in_doubt.clear()

    def claimed(self, job_id: str, task: int) -> None:
        """An agent re-claimed an in-doubt attempt: it is running, not lost."""
        self.in_doubt.pop((job_id, task), None)

    async def _check_quarantine(self, message: TaskEnded) -> None:
        if not message.failed_on_node:
            return
        for name in list(self._known_nodes) or []:
            failures = self.core.consecutive_failures(name)
            if (
                failures >= self.settings.quarantine_after
                and self.core.node_health(name) == "online"
            ):
                self.core.set_health(name, "quarantined")
                reason = f"{failures} consecutive failed attempts"
                await self.journal.append(node_stream(name), [NodeQuarantined(reason=reason)])
                _log.warning("node_quarantined", node_id=name, reason=reason)

    def _node_summaries(self) -> list[NodeSummary]:
        return self.core.node_summaries()
