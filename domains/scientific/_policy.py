"""The science policy: the scientific cluster's rules, through the engine's policy hooks.

Each hook reads the views and the policy's projections and decides; the rules themselves live
in pure modules tested with tables (``_fairshare``, ``_protection``, ``_backfill``,
``_maintenance``, ``_checkpointing``, ``_recovery``, ``_scenarios``):

- ``rank``: fair share with decayed usage, priority and aging (a reserved simulation at its
  start first); ``admit_job``: a sweep's concurrency cap and successive halving;
  ``admit``: the head-of-queue (EASY) reservation; ``node_score``: backfill around
  reservations, maintenance, node reliability, best fit;
- ``preemptions``: priority preemption within the protection rules (budgets per priority per
  day, minimum runtime, protection window); ``yields``: planned moves (a reservation or a
  maintenance window starting) that spend no budget;
- ``checkpoint_interval``: by resilience level, adapted to measured cost and failure rate;
  ``on_failure``: recovery strategies per failure class with backoff;
- ``node_actions``: drains before maintenance, nodes back after it;
- ``command``/``apply``: reservations, maintenance windows and pins, journaled in
  ``policy:science``; ``observe``/``recover``: usage, failures, scores and preemptions, a
  projection of the journal's facts.

Projections are recomputed from scratch once per cycle (at a new ``now`` or after a new fact),
never ratcheted: the same journal and clock give the same decisions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from actors import (
    CommandResult,
    Failure,
    FarmView,
    FifoPolicy,
    Hold,
    JobSubmittedObservation,
    JobView,
    NodeAction,
    NodeChanged,
    NodeView,
    Observation,
    Preemption,
    RetryDecision,
    RunningView,
    SpecError,
    SubmitJob,
    TaskEndedObservation,
    TaskProgressObservation,
    TaskStartedObservation,
    TaskView,
    add,
    fits,
)
from persistence import Event, EventCodec
from runtime import ConfigurationError

from ._backfill import Hold as NodeHold
from ._backfill import ShadowPlan, backfill_refusal, head_hold, plan_reservations
from ._checkpointing import Interval, checkpoint_cost, checkpoint_interval
from ._config import ClusterConfig, MaintenanceWindow, Reservation, load_cluster_config
from ._events import (
    SCIENCE_CODEC,
    MaintenanceCancelled,
    MaintenanceScheduled,
    MemberPinned,
    ReservationCancelled,
    ReservationMade,
)
from ._fairshare import Points, UsageLedger, fair_share_factor, points, starvation_bound
from ._maintenance import maintenance_actions, maintenance_refusal, window_yields
from ._model import SimulationMetadata
from ._protection import PreemptionLedger, protection_reason
from ._recovery import FailureClass, NodeReliability, classify, recovery_decision
from ._scenarios import Halving, Member, halving, score

__all__ = ["SciencePolicy", "science_policy"]

_OUTCOME_CLASS: dict[str, FailureClass] = {
    "failed": "crash",
    "timed_out": "timeout",
    "stalled": "stall",
    "oom": "oom",
    "lost": "lost",
}
_DEFAULT = SimulationMetadata()


def science_policy(config: Path | None) -> SciencePolicy:
    """Build the science policy from ``cluster.toml`` (the ``taskfarm.policies`` factory).

    Raises:
        ConfigurationError: the file is unreadable or a field is wrong (naming both).
    """
    return SciencePolicy(load_cluster_config(config))


@dataclass
class _JobInfo:
    owner: str
    project: str
    sweep: str | None
    tasks: int
    cores: list[float]
    metadata: SimulationMetadata
    widths: list[int] = field(default_factory=list)  # nodes per task (multi-node stages)

    def width(self, task: int) -> int:
        return self.widths[task] if task < len(self.widths) else 1


@dataclass
class _Cycle:
    """What is computed once per cycle."""

    now: datetime | None = None
    plan: ShadowPlan = field(default_factory=ShadowPlan)
    owner_factor: dict[str, float] = field(default_factory=dict)
    project_factor: dict[str, float] = field(default_factory=dict)
    halvings: dict[str, Halving] = field(default_factory=dict)
    sweep_running: dict[str, int] = field(default_factory=dict)
    head: tuple[str, NodeHold] | None = None
    head_decided: bool = False
    holds: dict[str, NodeHold] = field(default_factory=dict)


class SciencePolicy(FifoPolicy):
    """The scientific cluster's policy (see the module docstring)."""

    name = "science"
    max_candidates = 64
    metadata_type: type[Any] | None = SimulationMetadata
    history = True
    events: EventCodec | None = SCIENCE_CODEC
    command_roles: Mapping[str, str] = {
        "reservations": "read",
        "windows": "read",
        "scenarios": "read",
        "nodes": "read",
        "reserve": "operator",
        "unreserve": "operator",
        "maintenance": "operator",
        "cancel-maintenance": "operator",
        "pin": "operator",
        "unpin": "operator",
    }

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        self.cycle_interval = self.config.cycle_interval
        self.reservations: dict[str, Reservation] = {r.name: r for r in self.config.reservations}
        self.windows: dict[str, MaintenanceWindow] = {w.name: w for w in self.config.maintenance}
        self.pins: set[str] = set()
        self.usage = UsageLedger(half_life=self.config.fair_share.half_life)
        self.preempted = PreemptionLedger()
        self.reliability = NodeReliability(half_life=self.config.recovery.reliability_half_life)
        self.jobs: dict[str, _JobInfo] = {}
        self.last_start: dict[str, datetime] = {}
        self.starts: dict[tuple[str, int], datetime] = {}
        self.exposure = 0.0  # node-seconds run (an attempt's seconds x its nodes)
        self.interruptions = 0  # attempts lost to a node
        self.done: dict[str, int] = defaultdict(int)
        self.scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.checkpoint_cost: dict[str, float] = {}
        self.class_failures: dict[tuple[str, int, str], int] = defaultdict(int)
        self.attempt_class: dict[tuple[str, int, int], tuple[FailureClass, bool, str | None]] = {}
        self.asked: set[tuple[str, int]] = set()  # victims asked to yield (until they end)
        self.intervals: dict[str, Interval] = {}
        self.refusals: dict[str, str] = {}
        self.farm = FarmView()
        self.sweeps: dict[str, list[str]] = defaultdict(list)  # sweep -> member jobs
        self.reachable: dict[str, str] = {}
        self._cycle = _Cycle()
        self._dirty = True
        self._recovering = False
        self._shares_at: datetime | None = None
        self._new_entity = True
        self._shares: tuple[dict[str, float], dict[str, float]] = ({}, {})
        self._halving_dirty = True
        self._halvings: dict[str, Halving] = {}
        self._maintenance_due: datetime | None = None  # None: recompute at the next cycle

    # -- per cycle ----------------------------------------------------------------------------

    def _begin(self, farm: FarmView, now: datetime) -> _Cycle:
        self.farm = farm
        cycle = self._cycle
        if cycle.now == now and not self._dirty:
            return cycle
        self._dirty = False
        cycle = self._cycle = _Cycle(now=now)
        unended = [r for r in self.reservations.values() if now < r.end]
        if unended:
            cycle.plan = plan_reservations(
                unended,
                farm,
                now,
                walltime=self._walltimes(farm),
                windows=list(self.windows.values()),
            )
        cycle.holds = dict(cycle.plan.holds)
        self._refresh_shares(farm, now)
        cycle.owner_factor, cycle.project_factor = self._shares
        if self._halving_dirty:
            self._halving_dirty = False
            self._halvings = self._decide_halving(farm)
        cycle.halvings = self._halvings
        for sweep, members in self.sweeps.items():
            cycle.sweep_running[sweep] = sum(
                1 for j in members if (live := farm.jobs.get(j)) is not None and live.running
            )
        return cycle

    def _refresh_shares(self, farm: FarmView, now: datetime) -> None:
        """Fair-share factors move slowly: recomputed every few minutes of the clock, or when
        an owner or project shows up (deterministic: a function of the facts and the time)."""
        last = self._shares_at
        if last is not None and not self._new_entity and (now - last).total_seconds() < 600:
            return
        self._shares_at, self._new_entity = now, False
        owners, projects = self.usage.usage(now)
        active_owners = {self._info(j).owner for j in farm.jobs.values()} | set(owners)
        active_projects = {self._info(j).project for j in farm.jobs.values()} | set(projects)
        config = self.config
        owner_weight = sum(config.weight("owner", o) for o in active_owners)
        project_weight = sum(config.weight("project", p) for p in active_projects)
        owner_total, project_total = sum(owners.values()), sum(projects.values())
        self._shares = (
            {
                o: fair_share_factor(
                    owners.get(o, 0.0), owner_total, config.weight("owner", o), owner_weight
                )
                for o in active_owners
            },
            {
                p: fair_share_factor(
                    projects.get(p, 0.0), project_total, config.weight("project", p), project_weight
                )
                for p in active_projects
            },
        )

    def _decide_halving(self, farm: FarmView) -> dict[str, Halving]:
        sweeps: dict[str, list[Member]] = defaultdict(list)
        for job_id in (j for members in self.sweeps.values() for j in members):
            info = self.jobs[job_id]
            assert info.sweep is not None
            live = farm.jobs.get(job_id)
            failed = live is None and self.done[job_id] < info.tasks
            sweeps[info.sweep].append(
                Member(
                    job_id=job_id,
                    scores=tuple(self.scores.get(job_id, ())),
                    pinned=job_id in self.pins,
                    failed=failed,
                )
            )
        settings = self.config.scenarios
        return {
            sweep: halving(members, settings.rungs, settings.eta)
            for sweep, members in sweeps.items()
        }

    def _walltimes(self, farm: FarmView) -> dict[tuple[str, int], float | None]:
        walltime: dict[tuple[str, int], float | None] = {}
        for attempts in farm.running.values():
            for key in attempts:
                job = farm.jobs.get(key[0])
                walltime[key] = job.spec.task_max_runtime(key[1]) if job is not None else None
        return walltime

    def _info(self, job: JobView) -> _JobInfo:
        info = self.jobs.get(job.job_id)
        if info is None:
            info = self._learn(job.spec)
        return info

    def _learn(self, spec: SubmitJob) -> _JobInfo:
        try:
            metadata = spec.metadata_as(SimulationMetadata)
        except msgspec.ValidationError:
            metadata = _DEFAULT
        info = _JobInfo(
            owner=metadata.owner or spec.owner or "anonymous",
            project=metadata.project or "default",
            sweep=metadata.sweep,
            tasks=len(spec.tasks),
            cores=[spec.task_resources(i).cores for i in range(len(spec.tasks))],
            metadata=metadata,
            widths=[spec.task_nodes(i) for i in range(len(spec.tasks))],
        )
        if spec.job_id not in self.jobs:
            if info.sweep is not None:
                self.sweeps[info.sweep].append(spec.job_id)
                self._halving_dirty = True
            self._new_entity = True
        self.jobs[spec.job_id] = info
        return info

    def _points(self, job: JobView, now: datetime) -> Points:
        cycle = self._cycle
        info = self._info(job)
        waited = 0.0
        if job.queued:
            since = max(job.submitted_at, self.last_start.get(job.job_id, job.submitted_at))
            waited = (now - since).total_seconds()
        survived = 0
        if info.sweep is not None and info.sweep in cycle.halvings:
            survived = cycle.halvings[info.sweep].survived.get(job.job_id, 0)
        reserved = any(r.job_id == job.job_id for r in cycle.plan.active.values())
        return points(
            rank=job.priority_rank,
            owner_factor=cycle.owner_factor.get(info.owner, 1.0),
            project_factor=cycle.project_factor.get(info.project, 1.0),
            waited=waited,
            survived=survived,
            settings=self.config.fair_share,
            reserved=reserved,
        )

    # -- submission ---------------------------------------------------------------------------

    def validate(self, spec: SubmitJob, now: datetime) -> None:
        try:
            metadata = spec.metadata_as(SimulationMetadata)
        except msgspec.ValidationError:
            return  # the engine refuses it, naming the field
        where = spec.source or "<submission>"
        if metadata.max_concurrent is not None and metadata.max_concurrent < 1:
            raise SpecError(
                path=where,
                field=f"jobs.{spec.name}.metadata.max_concurrent",
                problem="must be at least 1",
            )

    # -- ordering -----------------------------------------------------------------------------

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[Any, ...]:
        self._begin(farm, now)
        return (-self._points(job, now).total, job.submitted_at, job.job_id)

    def explain_rank(self, job: JobView, now: datetime) -> str:
        self._begin(self.farm, now)
        return self._points(job, now).explain()

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        cycle = self._begin(farm, now)
        info = self._info(job)
        if info.sweep is None:
            return None
        decided = cycle.halvings.get(info.sweep)
        if decided is not None and job.job_id not in self.pins:
            why = decided.pruned.get(job.job_id) or decided.waiting.get(job.job_id)
            if why is not None and not job.running:
                return Hold(f"successive halving: {why}")
        cap = info.metadata.max_concurrent
        if cap is not None and not job.running:
            passed = decided.rungs_passed if decided is not None else 0
            effective = cap * self.config.scenarios.eta**passed
            if cycle.sweep_running.get(info.sweep, 0) >= effective:
                return Hold(f"sweep {info.sweep} runs {effective} members at once (its cap)")
            # Counted now: the members admitted later in this cycle see it.
            cycle.sweep_running[info.sweep] = cycle.sweep_running.get(info.sweep, 0) + 1
        return None

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        cycle = self._begin(farm, now)
        if cycle.head_decided or job.spec.task_nodes(task.index) > 1:
            return None  # a waiting multi-node stage gets the engine's gang holds
        # EASY: the first stage (in rank order) that fits no node now gets the node that fits
        # it soonest; lower-ranked work may use that node only if it ends before then.
        for view in farm.nodes.values():
            if (
                view.accepts_work
                and fits(task.request, view.free)
                and view.satisfies(task.requires) is None
            ):
                return None
        cycle.head_decided = True
        found = head_hold(
            job.job_id, task.request, task.requires, farm, self._walltimes(farm), now, cycle.holds
        )
        if found is not None:
            held, hold = found
            cycle.head = found
            cycle.holds[held] = hold
        return None

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        cycle = self._cycle
        reliability = self.reliability.score(node.name, now)
        if reliability < self.config.recovery.avoid_below:
            self.refusals[job.job_id] = f"node {node.name} is unreliable ({reliability:.2f})"
            return None
        walltime = job.spec.task_max_runtime(task.index)
        refused = maintenance_refusal(
            list(self.windows.values()), node, job.spec.priority, walltime, now
        ) or backfill_refusal(
            job.job_id, walltime, node.name, cycle.holds, now, yields=self._yields(job)
        )
        if refused is not None:
            self.refusals[job.job_id] = refused
            return None
        score = super().node_score(job, task, node, now)
        if score is None:
            return None
        hold = cycle.holds.get(node.name)
        if hold is not None and hold.job_id == job.job_id:
            score += 5.0  # its own reserved nodes first
        return score + 2.0 * reliability

    def _yields(self, job: JobView) -> tuple[float, float] | None:
        """(lead, minimum runtime) if ``job``'s stages may backfill a reservation's nodes
        past its start, yielding ahead of it (checkpointable and preemptible ones)."""
        protection = self.config.protection
        if not (protection.preemptible_backfill and job.spec.checkpointable):
            return None
        if not job.spec.preemptible:
            return None
        return protection.yield_lead, protection.minimum_runtime

    # -- preemption ---------------------------------------------------------------------------

    def preemptions(
        self, job: JobView, task: TaskView, farm: FarmView, now: datetime
    ) -> Sequence[Preemption]:
        cycle = self._begin(farm, now)
        waiting = job.spec.priority
        if waiting.rank < self.config.protection.priority_gap:
            return ()
        if job.spec.task_nodes(task.index) > 1:
            return ()  # a multi-node stage waits for its EASY hold, it preempts nobody
        walltime = job.spec.task_max_runtime(task.index)
        best: tuple[tuple[Any, ...], str, list[RunningView]] | None = None
        for name in sorted(farm.nodes):
            node = farm.nodes[name]
            if not node.accepts_work or not fits(task.request, node.capacity):
                continue
            if node.satisfies(task.requires) is not None:
                continue
            if backfill_refusal(job.job_id, walltime, name, cycle.holds, now) is not None:
                continue
            if self.reliability.score(name, now) < self.config.recovery.avoid_below:
                continue
            candidates = sorted(
                (
                    r
                    for r in farm.running.get(name, {}).values()
                    if (r.job_id, r.task) not in self.asked
                    and protection_reason(r, waiting, self.preempted, self.config.protection, now)
                    is None
                ),
                key=lambda r: (
                    r.priority.rank,
                    -(r.checkpoint_at or r.started_at or now).timestamp(),
                    r.job_id,
                    r.task,
                ),
            )
            free, victims = node.free, []
            for running in candidates:
                if fits(task.request, free):
                    break
                free = add(free, running.request, capacity=node.capacity)
                victims.append(running)
            if not victims or not fits(task.request, free):
                continue
            key = (len(victims), max(v.priority.rank for v in victims), name)
            if best is None or key < best[0]:
                best = (key, name, victims)
        if best is None:
            return ()
        _, name, victims = best
        chosen = []
        for victim in victims:
            self.asked.add((victim.job_id, victim.task))
            self.preempted.record(victim.job_id, now)
            chosen.append(
                Preemption(
                    victim_job=victim.job_id,
                    victim_task=victim.task,
                    node=name,
                    reason=f"{waiting.value} simulation {job.job_id} needs node {name}",
                )
            )
        self._dirty = True
        return chosen

    def yields(self, farm: FarmView, now: datetime) -> Sequence[Preemption]:
        cycle = self._begin(farm, now)
        chosen: list[Preemption] = []
        for reservation in cycle.plan.active.values():
            sim = farm.jobs.get(reservation.job_id)
            if sim is None or not sim.queued:
                continue
            # Nodes, not stages: a queued multi-node stage needs all of its nodes freed.
            spec = sim.spec
            widest = max((spec.task_nodes(i) for i in range(len(spec.tasks))), default=1)
            needed = sim.queued * widest
            for name in cycle.plan.nodes.get(reservation.name, ()):
                others = [
                    (key, attempt)
                    for key, attempt in sorted(farm.running.get(name, {}).items())
                    if key[0] != reservation.job_id
                ]
                if needed <= 0:
                    break
                needed -= 1  # this node serves (a rank of) one of its stages, now or once free
                for key, attempt in others:
                    if key in self.asked or not attempt.preemptible:
                        continue
                    self.asked.add(key)
                    chosen.append(
                        Preemption(
                            victim_job=key[0],
                            victim_task=key[1],
                            node=name,
                            reason=f"reservation {reservation.name} for {reservation.job_id} "
                            f"started at {reservation.start.isoformat()}",
                        )
                    )
        chosen += self._clear_before_start(cycle, farm, now)
        reserved = set(cycle.plan.holds)
        for choice in window_yields(list(self.windows.values()), farm, now, reserved=reserved):
            key = (choice.victim_job, choice.victim_task)
            if key not in self.asked:
                self.asked.add(key)
                chosen.append(choice)
        return chosen

    def _clear_before_start(self, cycle: _Cycle, farm: FarmView, now: datetime) -> list[Preemption]:
        """``yield_lead`` before a reservation starts (its simulation submitted), the work on
        its nodes that would run past the start checkpoints and yields."""
        lead = timedelta(seconds=self.config.protection.yield_lead)
        chosen: list[Preemption] = []
        walltime: Mapping[tuple[str, int], float | None] | None = None
        for reservation in self.reservations.values():
            if not reservation.start - lead <= now < reservation.start:
                continue
            if reservation.job_id not in farm.jobs:
                continue  # nobody to clear the nodes for (yet)
            for name in cycle.plan.nodes.get(reservation.name, ()):
                for key, attempt in sorted(farm.running.get(name, {}).items()):
                    if key[0] == reservation.job_id or key in self.asked:
                        continue
                    if not attempt.preemptible or attempt.started_at is None:
                        continue
                    walltime = walltime if walltime is not None else self._walltimes(farm)
                    limit = walltime.get(key)
                    end = None if limit is None else attempt.started_at + timedelta(seconds=limit)
                    if end is not None and end <= reservation.start:
                        continue  # it ends before the start anyway
                    self.asked.add(key)
                    chosen.append(
                        Preemption(
                            victim_job=key[0],
                            victim_task=key[1],
                            node=name,
                            reason=f"reservation {reservation.name} for {reservation.job_id} "
                            f"starts at {reservation.start.isoformat()}",
                        )
                    )
        return chosen

    # -- checkpoints and failures -------------------------------------------------------------

    def mtbf(self, nodes: int = 1) -> float:
        """Return the mean running time between interruptions of a stage on ``nodes`` nodes.

        Measured per node here (node-seconds run per attempt lost to a node, starting from
        the configured per-node expectation, which counts as one interruption): a stage on
        N nodes is interrupted when any of them fails, N times as often as a one-node stage,
        so its optimum interval is shorter by about the square root of N.
        """
        prior = self.config.checkpoints.expected_mtbf
        return (prior + self.exposure) / (1 + self.interruptions) / max(1, nodes)

    def checkpoint_interval(self, job: JobView, task: TaskView, now: datetime) -> float | None:
        info = self._info(job)
        settings = self.config.checkpoints
        cost = checkpoint_cost(
            manifest_bytes=task.checkpoint_bytes,
            measured=self.checkpoint_cost.get(job.job_id),
            configured_size=info.metadata.checkpoint_size,
            bandwidth=settings.bandwidth,
        )
        interval = checkpoint_interval(
            info.metadata.resilience, cost.seconds, self.mtbf(task.nodes), settings
        )
        if cost.seconds is not None and settings.adapt:  # say what it was costed by
            interval = Interval(interval.seconds, f"{interval.why} (cost: {cost.source})")
        self.intervals[job.job_id] = interval
        return interval.seconds

    def on_failure(
        self,
        job: JobView,
        task: TaskView,
        failure: Failure,
        default: RetryDecision,
        now: datetime,
    ) -> RetryDecision:
        kind = classify(failure)
        self.attempt_class[(job.job_id, task.index, failure.attempt)] = (
            kind,
            failure.job_fault,
            failure.node,
        )
        largest = max((n.capacity.memory for n in self.farm.nodes.values()), default=0)
        return recovery_decision(
            kind=kind,
            earlier=self.class_failures[(job.job_id, task.index, kind)],
            failures=task.failures,
            failure=failure,
            request=task.request,
            largest_memory=largest,
            settings=self.config.recovery,
        )

    # -- facts ---------------------------------------------------------------------------------

    def observe(self, observation: Observation) -> None:
        if not isinstance(observation, TaskProgressObservation):
            self._dirty = True  # progress changes nothing the cycle computes
        match observation:
            case JobSubmittedObservation(spec=spec):
                self._learn(spec)
            case TaskStartedObservation(job_id=job_id, task=task, at=at):
                info = self.jobs.get(job_id)
                key = (job_id, task)
                self.starts[key] = at
                self.last_start[job_id] = at
                if info is not None:
                    # A stage on N nodes uses its cores on each of them.
                    cores = info.cores[task] if task < len(info.cores) else 1.0
                    cores *= info.width(task)
                    self.usage.started(key, info.owner, info.project, cores, at)
            case TaskEndedObservation() as ended:
                self._ended(ended)
            case NodeChanged(node=node, reachable=reachable, at=at):
                self._maintenance_due = None
                was = self.reachable.get(node)
                self.reachable[node] = reachable
                if was == "connected" and reachable != "connected":
                    self.reliability.failed(node, at)  # it went away without being asked
            case _:
                pass

    def _ended(self, ended: TaskEndedObservation) -> None:
        key = (ended.job_id, ended.task)
        info = self.jobs.get(ended.job_id)
        if info is not None and info.sweep is not None:
            self._halving_dirty = True
        self.usage.ended(key, ended.at)
        started = self.starts.pop(key, None)
        if started is not None:
            width = info.width(ended.task) if info is not None else 1
            self.exposure += max(0.0, (ended.at - started).total_seconds()) * width
        was_asked = key in self.asked
        self.asked.discard(key)
        classified = self.attempt_class.pop((ended.job_id, ended.task, ended.attempt), None)
        if ended.outcome == "lost":
            # The node that went away is counted when it leaves (a multi-node attempt's
            # ``node`` is only its leader).
            self.interruptions += 1
        if ended.outcome in _OUTCOME_CLASS and ended.outcome != "completed":
            kind: FailureClass = classified[0] if classified else _OUTCOME_CLASS[ended.outcome]
            if ended.outcome != "lost":
                self.class_failures[(ended.job_id, ended.task, kind)] += 1
            if classified is not None and not classified[1] and ended.node and kind != "lost":
                self.reliability.failed(ended.node, ended.at)
        if ended.outcome == "preempted" and self._recovering and not was_asked:
            # Rebuilding from the journal, which does not say why an attempt yielded: count
            # every yield against the budget (conservative: never more preemptions than live).
            self.preempted.record(ended.job_id, ended.at)
        if ended.outcome == "completed":
            info = self.jobs.get(ended.job_id)
            self.done[ended.job_id] += 1
            if "checkpoint_seconds" in ended.metrics:
                self.checkpoint_cost[ended.job_id] = float(ended.metrics["checkpoint_seconds"])
            if info is not None:
                value = score(ended.metrics, self.config.scenarios.weights)
                if value is not None:
                    self.scores[ended.job_id].append((self.done[ended.job_id] / info.tasks, value))

    def recover(self, observations: Sequence[Observation]) -> None:
        self._recovering = True
        try:
            for observation in observations:
                self.observe(observation)
        finally:
            self._recovering = False
        # Attempts running when the coordinator stopped are not charged twice.
        self.starts.clear()
        self.usage.running.clear()

    # -- wake-ups and nodes ---------------------------------------------------------------------

    def next_wakeup(self, now: datetime) -> datetime | None:
        lead = timedelta(seconds=self.config.protection.yield_lead)
        times = [
            t
            for r in self.reservations.values()
            for t in (r.start - lead, r.start, r.end)
            if t > now
        ] + [t for w in self.windows.values() for t in (w.start, w.end) if t > now]
        return min(times, default=None)

    def node_actions(self, farm: FarmView, now: datetime) -> Sequence[NodeAction]:
        # Recomputed only when a window or a node changed, or a window starts or ends.
        due = self._maintenance_due
        if not self.windows or (due is not None and now < due):
            return ()
        cycle = self._begin(farm, now)
        reserved = {n for names in cycle.plan.nodes.values() for n in names}
        boundaries = [t for w in self.windows.values() for t in (w.start, w.end) if t > now]
        self._maintenance_due = min(boundaries, default=datetime.max.replace(tzinfo=now.tzinfo))
        return maintenance_actions(list(self.windows.values()), farm, now, reserved=reserved)

    # -- explanations -------------------------------------------------------------------------

    def describe(self, job: JobView, now: datetime) -> Mapping[str, str]:
        cycle = self._begin(self.farm, now)
        info = self._info(job)
        columns = {
            "owner": info.owner,
            "project": info.project,
            "points": f"{self._points(job, now).total:.2f}",
            "fair share": f"owner {cycle.owner_factor.get(info.owner, 1.0):.2f}, "
            f"project {cycle.project_factor.get(info.project, 1.0):.2f}",
        }
        interval = self.intervals.get(job.job_id)
        if interval is not None:
            columns["checkpoints"] = interval.why
        if info.sweep is not None:
            decided = cycle.halvings.get(info.sweep)
            status = "pinned" if job.job_id in self.pins else "running"
            if decided is not None:
                status = (
                    decided.pruned.get(job.job_id)
                    or decided.waiting.get(job.job_id)
                    or (f"survived {decided.survived.get(job.job_id, 0)} rung(s)")
                )
            columns["sweep"] = f"{info.sweep}: {status}"
        for reservation in self.reservations.values():
            if reservation.job_id == job.job_id and now < reservation.end:
                columns["reservation"] = (
                    f"{reservation.name}: {len(cycle.plan.nodes.get(reservation.name, ()))} "
                    f"node(s) from {reservation.start.isoformat()}"
                )
        refused = self.refusals.get(job.job_id)
        if refused is not None and job.queued:
            columns["backfill"] = refused
        return columns

    def paused(self, job_id: str) -> bool:
        """Return whether successive halving pruned the simulation (and no pin resumed it)."""
        info = self.jobs.get(job_id)
        if info is None or info.sweep is None or job_id in self.pins:
            return False
        decided = self._halvings.get(info.sweep)
        return decided is not None and job_id in decided.pruned

    def starvation_bound(self) -> float:
        """Return the starvation bound in seconds (see ``_fairshare``)."""
        return starvation_bound(self.config.fair_share, len(self.config.scenarios.rungs))

    # -- commands -----------------------------------------------------------------------------

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any],
        farm: FarmView,
        now: datetime,
        *,
        by: str | None = None,
    ) -> CommandResult:
        cycle = self._begin(farm, now)
        who = by or ""  # "" in the record: the embedding application or a join-token client
        match name:
            case "reserve":
                return self._reserve(arguments, farm, now, by=who)
            case "unreserve":
                found = self._existing(arguments, self.reservations, "reservation")
                return CommandResult(
                    reply={"cancelled": found},
                    events=[
                        ReservationCancelled(
                            name=found, reason=str(arguments.get("reason", "")), by=who
                        )
                    ],
                )
            case "reservations":
                return CommandResult(reply=self._reservation_rows(cycle, farm, now))
            case "maintenance":
                return self._schedule_window(arguments, now, by=who)
            case "cancel-maintenance":
                found = self._existing(arguments, self.windows, "maintenance window")
                return CommandResult(
                    reply={"cancelled": found},
                    events=[
                        MaintenanceCancelled(
                            name=found, reason=str(arguments.get("reason", "")), by=who
                        )
                    ],
                )
            case "windows":
                return CommandResult(
                    reply=[
                        _window_row(w, now)
                        for w in sorted(self.windows.values(), key=lambda w: (w.start, w.name))
                    ]
                )
            case "pin" | "unpin":
                job_id = _text(arguments, "job")
                if job_id not in self.jobs:
                    raise ConfigurationError(f"no simulation {job_id!r}", where="job")
                return CommandResult(
                    reply={"job": job_id, "pinned": name == "pin"},
                    events=[MemberPinned(job_id=job_id, pinned=name == "pin", by=who)],
                )
            case "scenarios":
                return CommandResult(reply=self._scenario_rows(cycle, farm))
            case "nodes":
                return CommandResult(
                    reply=[
                        {
                            "node": n,
                            "reliability": round(self.reliability.score(n, now), 3),
                            "recent_failures": round(self.reliability.count(n, now), 2),
                            "reserved_for": cycle.holds[n].job_id if n in cycle.holds else None,
                        }
                        for n in sorted(farm.nodes)
                    ]
                )
            case _:
                raise ConfigurationError(
                    f"the science policy has no command {name!r}; choose from "
                    f"{', '.join(sorted(self.command_roles))}",
                    where="policy command",
                )

    def _existing(self, arguments: Mapping[str, Any], table: Mapping[str, Any], what: str) -> str:
        name = _text(arguments, "name")
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise ConfigurationError(f"no {what} {name!r} (known: {known})", where="name")
        return name

    def _reserve(
        self, arguments: Mapping[str, Any], farm: FarmView, now: datetime, *, by: str
    ) -> CommandResult:
        job_id = _text(arguments, "for")
        start = _time(arguments, "start")
        duration = _duration(arguments, "duration")
        count = int(arguments.get("nodes") or 0)
        requires = arguments.get("requires") or None
        if count < 0:
            raise ConfigurationError("must be at least 1", where="--nodes")
        if not count and not requires:
            raise ConfigurationError("give --nodes N or --requires LABEL", where="--nodes")
        if start < now:
            raise ConfigurationError(f"{start.isoformat()} is in the past", where="--start")
        name = str(arguments.get("name") or f"{job_id}@{start.strftime('%Y%m%dT%H%M')}")
        if name in self.reservations and now < self.reservations[name].end:
            raise ConfigurationError(f"a reservation {name!r} exists", where="--name")
        reservation = Reservation(
            name=name,
            job_id=job_id,
            start=start,
            duration=duration,
            count=count,
            requires=requires if isinstance(requires, str) else None,
            made_at=now,
            by=by,
        )
        trial = plan_reservations(
            [*self.reservations.values(), reservation],
            farm,
            now,
            walltime=self._walltimes(farm),
            windows=list(self.windows.values()),
        )
        nodes = trial.nodes.get(name, ())
        if count and trial.short.get(name, 0):
            raise ConfigurationError(
                f"only {len(nodes)} node(s) can be held for {job_id} then "
                f"(requires {requires or 'nothing'}; other reservations and critical maintenance "
                "take the rest)",
                where="--nodes",
            )
        if not nodes:
            raise ConfigurationError(f"no node has the label {requires!r}", where="--requires")
        reply = {
            "reservation": name,
            "for": job_id,
            "start": start.isoformat(),
            "end": reservation.end.isoformat(),
            "nodes": list(nodes),
            "by": by or None,
        }
        return CommandResult(reply=reply, events=[ReservationMade(reservation=reservation)])

    def _schedule_window(
        self, arguments: Mapping[str, Any], now: datetime, *, by: str
    ) -> CommandResult:
        name = _text(arguments, "name")
        start, end = _time(arguments, "start"), _time(arguments, "end")
        severity = str(arguments.get("severity", "major"))
        if severity not in ("critical", "major", "minor"):
            raise ConfigurationError("choose critical, major or minor", where="--severity")
        if not end > start:
            raise ConfigurationError("must be after --start", where="--end")
        if end <= now:
            raise ConfigurationError(f"{end.isoformat()} is in the past", where="--end")
        if name in self.windows and now < self.windows[name].end:
            raise ConfigurationError(f"a maintenance window {name!r} exists", where="--name")
        nodes = tuple(sorted(set(arguments.get("nodes") or ())))
        requires = arguments.get("requires") or None
        if nodes and requires:
            raise ConfigurationError("give --nodes or --requires, not both", where="--requires")
        window = MaintenanceWindow(
            name=name,
            start=start,
            end=end,
            severity=severity,  # type: ignore[arg-type]
            nodes=nodes,
            requires=requires if isinstance(requires, str) else None,
            reason=str(arguments.get("reason", "")),
            by=by,
        )
        return CommandResult(
            reply=_window_row(window, now),
            events=[MaintenanceScheduled(window=window)],
        )

    def _reservation_rows(
        self, cycle: _Cycle, farm: FarmView, now: datetime
    ) -> list[dict[str, Any]]:
        rows = []
        for r in sorted(self.reservations.values(), key=lambda r: (r.start, r.name)):
            if now >= r.end:
                status = "ended"
            elif now >= r.start:
                status = "active" if r.name in cycle.plan.active else "idle (simulation not live)"
            else:
                status = "planned"
            rows.append(
                {
                    "name": r.name,
                    "for": r.job_id,
                    "start": r.start.isoformat(),
                    "end": r.end.isoformat(),
                    "count": r.count,
                    "requires": r.requires,
                    "by": r.by or None,
                    "status": status,
                    "nodes": list(cycle.plan.nodes.get(r.name, ())),
                    "short": cycle.plan.short.get(r.name, 0),
                }
            )
        return rows

    def _scenario_rows(self, cycle: _Cycle, farm: FarmView) -> list[dict[str, Any]]:
        rows = []
        for sweep, decided in sorted(cycle.halvings.items()):
            members = sorted(
                (j for j, info in self.jobs.items() if info.sweep == sweep),
                key=lambda j: (-(self.scores[j][-1][1] if self.scores.get(j) else -math.inf), j),
            )
            ranking = []
            for position, job_id in enumerate(members, start=1):
                history = self.scores.get(job_id, [])
                if job_id in self.pins:
                    status = "pinned"
                elif job_id in decided.pruned:
                    status = "pruned"
                elif job_id in decided.waiting:
                    status = "waiting at a rung"
                elif job_id in farm.jobs:
                    status = "running" if farm.jobs[job_id].running else "queued"
                else:
                    status = "done" if self.done[job_id] >= self.jobs[job_id].tasks else "ended"
                ranking.append(
                    {
                        "rank": position,
                        "member": job_id,
                        "parameters": self.jobs[job_id].metadata.parameters,
                        "score": round(history[-1][1], 4) if history else None,
                        "progress": round(history[-1][0], 3) if history else 0.0,
                        "status": status,
                        "why": decided.pruned.get(job_id)
                        or decided.waiting.get(job_id)
                        or f"survived {decided.survived.get(job_id, 0)} rung(s)",
                    }
                )
            rows.append(
                {"scenario": sweep, "rungs_passed": decided.rungs_passed, "members": ranking}
            )
        return rows

    def apply(self, event: Event) -> None:
        self._dirty = True
        self._maintenance_due = None
        self._halving_dirty = True
        match event:
            case ReservationMade(reservation=reservation):
                self.reservations[reservation.name] = reservation
            case ReservationCancelled(name=name):
                self.reservations.pop(name, None)
            case MaintenanceScheduled(window=window):
                self.windows[window.name] = window
            case MaintenanceCancelled(name=name):
                self.windows.pop(name, None)
            case MemberPinned(job_id=job_id, pinned=pinned):
                if pinned:
                    self.pins.add(job_id)
                else:
                    self.pins.discard(job_id)
            case _:
                pass


def _window_row(window: MaintenanceWindow, now: datetime) -> dict[str, Any]:
    """Return a window as ``windows`` shows it: its fields, who scheduled it (None: no one
    named) and its status now."""
    return {
        **msgspec.to_builtins(window),
        "by": window.by or None,
        "status": _window_status(window, now),
    }


def _window_status(window: MaintenanceWindow, now: datetime) -> str:
    if now >= window.end:
        return "over"
    return "in progress" if now >= window.start else "planned"


def _text(arguments: Mapping[str, Any], key: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"--{key} is required", where=f"--{key}")
    return value


def _time(arguments: Mapping[str, Any], key: str) -> datetime:
    text = _text(arguments, key)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"{text!r} is not a time (expected ISO 8601 with an offset, e.g. 2027-03-01T08:00Z)",
            where=f"--{key}",
        ) from None
    if value.tzinfo is None:
        raise ConfigurationError(f"{text!r} needs a UTC offset (e.g. ...Z)", where=f"--{key}")
    return value


def _duration(arguments: Mapping[str, Any], key: str) -> float:
    from actors import parse_duration

    value = arguments.get(key)
    if value is None:
        raise ConfigurationError(f"--{key} is required", where=f"--{key}")
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        raise ConfigurationError(str(error), where=f"--{key}") from None
    if not seconds > 0:
        raise ConfigurationError("must be more than 0", where=f"--{key}")
    return seconds
