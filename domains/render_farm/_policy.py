"""The render-farm policy: the rules of this package put behind the engine's ``Policy`` hooks.

It decides nothing the rule modules do not: ``_deadline`` (effective priority, order,
inheritance), ``_shares`` (guarantees, maxima, borrowing), ``_specialization`` (node scores),
``_speed`` (learned speed), ``_preemption`` (victims), ``_previews`` (previews first),
``_energy`` (modes, deferral, sleeping) and ``_forecast`` (the list-scheduling forecast).  What
it adds is bookkeeping: the per-job facts it learns from observations (frames done, measured
frame time, errors, previews), caches keyed so that a cycle never sees stale numbers, and the
journaling of what it decides by itself (priority transitions and deadline verdicts, through
``cycle_events``).

Everything it knows is a projection of the journal: job facts and learned speed from the
observations (rebuilt by ``recover`` after a restart), the configuration and the energy mode
from its own stream (``apply``).  At start the configuration it was given (``--policy-config``)
wins over the last one journaled, and the difference is journaled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

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
    Priority,
    Resources,
    RetryDecision,
    RunningView,
    SpecError,
    SubmitJob,
    TaskEndedObservation,
    TaskPreviewObservation,
    TaskStartedObservation,
    TaskView,
    fits,
    parse_duration,
)
from persistence import Event, EventCodec
from runtime import ConfigurationError

from ._config import ENERGY_MODES, EnergyMode, FarmConfig, config_changes, parse_farm_config
from ._deadline import (
    Level,
    deadline_level,
    format_seconds,
    inherited_levels,
    order_key,
    remaining_seconds,
    verdict,
)
from ._energy import SLEEP_AFTER_FACTOR, defer_to_off_peak, plan_sleep
from ._events import (
    RENDER_CODEC,
    DeadlineVerdictChanged,
    EnergyModeChanged,
    FarmConfigChanged,
    PriorityChanged,
    Verdict,
)
from ._forecast import ForecastJob, ForecastNode, ForecastTask, Slot, forecast, forecast_verdict
from ._models import PreviewPlan, RenderMetadata, node_class_of, node_watts
from ._preemption import Victim, choose_victims
from ._previews import check_command, plan_previews, preview_choice
from ._shares import ShareState, Totals, admit_share, dominant_share, loans
from ._specialization import RETRY_HERE, NodeProfile, base_factor, fit_factor
from ._speed import SpeedTable

__all__ = ["RenderFarmPolicy"]

_FAILED: Final = frozenset({"failed", "timed_out", "stalled", "oom", "start_failed"})
_FORECAST_EVERY: Final = 60.0  # seconds: the forecast is recomputed at most this often
_SLEEP_SCAN_EVERY: Final = 30.0  # seconds between two looks for idle nodes to put to sleep
_WAKE_SECONDS: Final = 120.0  # how long a woken node takes to come back (forecast, waking)
WAKE_TIMEOUT: Final = 600.0  # a woken node not back after this long is counted out
# A job waits up to PATIENCE seconds for a node of a class PATIENCE_RATIO times better at its
# job type before it takes a slower one (delay scheduling; never when it is urgent).
PATIENCE: Final = 900.0
PATIENCE_RATIO: Final = 1.6
_STRIP: Final = 40  # characters of a frame strip


@dataclass(slots=True, eq=False)
class _Job:
    """What the policy knows of one job (from its submission and the facts since)."""

    job_id: str
    client: str
    job_type: str
    prior: float  # estimated seconds per full-quality frame
    energy_intensive: bool
    max_errors: int | None
    submitted_at: datetime
    units: list[float]  # per task: frames x cost (a preview pass costs q**e per frame)
    full: list[bool]  # per task: full quality (its frames count, its time teaches speed)
    frames: list[tuple[int, int] | None]
    plan: PreviewPlan | None
    total_units: float
    longest: float = 0.0  # units of the longest unfinished full-quality task
    done: set[int] = field(default_factory=set)
    done_units: float = 0.0
    measured_seconds: float = 0.0
    measured_units: float = 0.0
    errors: int = 0
    previews: list[tuple[int, str, datetime]] = field(default_factory=list)
    first_preview_at: datetime | None = None
    share: float | None = None  # cached dominant share of one task
    share_version: int = -1

    @property
    def per_frame(self) -> float:
        """Return the seconds per full frame: measured once frames finished, else the prior."""
        if self.measured_units > 0:
            return self.measured_seconds / self.measured_units
        return self.prior

    def finish(self, index: int, runtime: float) -> None:
        if index in self.done or not 0 <= index < len(self.units):
            return
        self.done.add(index)
        self.done_units += self.units[index]
        if self.full[index] and runtime > 0:
            self.measured_seconds += runtime
            self.measured_units += self.units[index]
        if self.full[index] and self.units[index] >= self.longest:
            self.longest = max(
                (
                    u
                    for i, (u, f) in enumerate(zip(self.units, self.full, strict=True))
                    if f and i not in self.done
                ),
                default=0.0,
            )

    def frames_done(self) -> tuple[int, int]:
        total = sum(u for u, f in zip(self.units, self.full, strict=True) if f)
        done = sum(self.units[i] for i in self.done if self.full[i])
        return int(done), int(total)


class RenderFarmPolicy(FifoPolicy):
    """The render farm's judgement; see the module docstring and the package README section."""

    name = "render-farm"
    # Every fitting node is scored, so every node class is considered, not the first found.
    max_candidates = 1_000_000
    # Every event (a task ending, a submission) runs a cycle; the timer is a backstop.
    cycle_interval = 300.0
    metadata_type: type[Any] | None = RenderMetadata
    history = True
    events: EventCodec | None = RENDER_CODEC
    command_roles: Mapping[str, str] = {
        "status": "read",
        "clients": "read",
        "previews": "read",
        "chart": "read",
        "config": "read",
        "config-reload": "admin",
        "mode": "operator",
    }

    def __init__(self, config: FarmConfig, *, config_path: Path | None = None) -> None:
        self.config = config
        self.mode: EnergyMode = config.energy.mode
        self.speeds = SpeedTable()
        self._start_config = config
        self._config_path = config_path
        self._journaled_config: FarmConfig | None = None
        self._pending: list[Event] = []
        self._jobs: dict[str, _Job] = {}
        self._levels: dict[str, Level] = {}
        self._journaled_levels: dict[str, str] = {}
        self._verdicts: dict[str, tuple[Verdict, str]] = {}
        self._journaled_verdicts: dict[str, str] = {}
        self._holds: dict[str, Hold] = {}
        self._blocked_since: dict[str, datetime] = {}
        self._profiles: dict[str, NodeProfile] = {}
        self._node_version = 0
        self._slots: dict[tuple[Resources, tuple[str, ...]], int] = {}  # until a node changes
        self._totals: Totals | None = None
        self._waiting: dict[str, bool] | None = None
        # Caches valid from a cycle's first hook to its ``cycle_events``.
        self._cycle_open = False
        self._cycle_sums: dict[str, list[int]] | None = None
        self._cycle_states: dict[str, ShareState] | None = None
        self._no_victims: set[tuple[Any, ...]] = set()
        self._last_admitted: tuple[str, str, int, Resources] | None = None
        self._idle_since: dict[str, datetime] = {}
        self._waking: dict[str, datetime] = {}
        self._next_sleep_scan: datetime | None = None
        self._farm: FarmView | None = None
        self._forecast: tuple[datetime, dict[str, datetime], list[Slot]] | None = None
        self._classes: tuple[int, dict[str, tuple[str, ...]]] | None = None
        self._score_cache: dict[tuple[str, str], tuple[Any, tuple[float, float]]] = {}
        self._best_cache: dict[tuple[str, Resources], tuple[Any, float]] = {}
        self.preemptions_asked = 0

    # -- submission ---------------------------------------------------------------------------

    def validate(self, spec: SubmitJob, now: datetime) -> None:
        meta = spec.metadata_as(RenderMetadata)
        render = meta.render
        where = f"jobs.{spec.name}.metadata.render"

        def fail(field_name: str, problem: str) -> SpecError:
            return SpecError(
                path=spec.source or "<submission>", field=f"{where}.{field_name}", problem=problem
            )

        if self.config.client(render.client) is None:
            known = ", ".join(c.id for c in self.config.clients)
            raise fail("client", f"unknown client {render.client!r} (clients: {known})")
        deadline = meta.effective_deadline
        if deadline is not None and deadline <= now:
            raise fail("deadline", f"{deadline.isoformat()} is in the past (now {now.isoformat()})")
        if render.frame_estimate is not None:
            try:
                seconds = parse_duration(render.frame_estimate, what="frame_estimate")
            except ValueError as error:
                raise fail("frame_estimate", str(error).partition(": ")[2]) from None
            if not seconds > 0:
                raise fail("frame_estimate", "must be more than zero")
        if render.plan is not None:
            raise fail("plan", "is written by the policy, not by a submission")
        if not render.job_type.strip():
            raise fail("type", "must not be empty")
        preview = render.preview
        if preview is not None and preview.command:
            problem = check_command(tuple(preview.command))
            if problem is not None:
                raise fail("preview.command", problem)
        if preview is not None and preview.passes and not preview.command:
            raise fail("preview.passes", "preview passes need a preview command")

    def validate_amendment(self, spec: SubmitJob, amended: SubmitJob, now: datetime) -> None:
        """Refuse moving a deadline to a time that has passed (``amend --set deadline=``), as
        a submission is refused: a past deadline is no goal to plan for (it would only mark
        the job at risk, a boost an operator gives with ``--priority``)."""
        try:
            meta = amended.metadata_as(RenderMetadata)
        except msgspec.ValidationError:
            return  # the engine refuses it, naming the field
        deadline = meta.effective_deadline
        if deadline is None or deadline > now or deadline == _spec_deadline(spec):
            return
        before = msgspec.json.decode(spec.metadata)
        after = msgspec.json.decode(amended.metadata)
        changed = [key for key in ("deadline", "render") if before.get(key) != after.get(key)]
        raise ConfigurationError(
            f"deadline {deadline.isoformat()} is not in the future (the coordinator's time is "
            f"{now.isoformat()}); give a later one",
            where=f"--set {changed[0] if changed else 'deadline'}",
        )

    def prepare(self, spec: SubmitJob, now: datetime) -> SubmitJob:
        meta = spec.metadata_as(RenderMetadata)
        choice = preview_choice(meta.render.preview, self.config.previews)
        planned = plan_previews(spec, choice)
        if planned is None:
            return spec
        tasks, plan = planned
        data = msgspec.json.decode(spec.metadata)
        data["render"]["plan"] = msgspec.to_builtins(plan)
        return msgspec.structs.replace(
            spec, tasks=tasks, metadata=msgspec.json.encode(data, order="sorted")
        )

    # -- what the policy learns -----------------------------------------------------------------

    def observe(self, observation: Observation) -> None:
        match observation:
            case JobSubmittedObservation(job_id=job_id, spec=spec, at=at):
                self._register(job_id, spec, at)
            case TaskStartedObservation(job_id=job_id):
                self._blocked_since.pop(job_id, None)
            case TaskEndedObservation(job_id=job_id, task=task, outcome=outcome):
                job = self._jobs.get(job_id)
                if job is None:
                    return
                if outcome == "completed":
                    job.finish(task, observation.runtime_s)
                    self._learn(job, task, observation)
                    plan = job.plan
                    previewing = plan is not None and task < len(plan.passes) + plan.strides
                    if previewing and job.first_preview_at is None:
                        job.first_preview_at = observation.at
                elif outcome in _FAILED:
                    job.errors += 1
            case TaskPreviewObservation(job_id=job_id, task=task, path=path, at=at):
                job = self._jobs.get(job_id)
                if job is not None:
                    job.previews.append((task, path, at))
                    if job.first_preview_at is None:
                        job.first_preview_at = at
            case NodeChanged(node=node):
                self._node_version += 1
                self._profiles.pop(node, None)
                self._totals = None
                self._slots.clear()
                if observation.reachable == "connected":
                    self._waking.pop(node, None)
            case _:
                pass

    def recover(self, observations: Sequence[Observation]) -> None:
        for observation in observations:
            self.observe(observation)
        start = self._start_config
        journaled = self._journaled_config
        if journaled != start:
            self.config = start
            self._pending.append(
                FarmConfigChanged(
                    config=start, changes=config_changes(journaled, start), by="startup"
                )
            )
            previous_mode = journaled.energy.mode if journaled is not None else None
            if start.energy.mode != previous_mode and start.energy.mode != self.mode:
                self._pending.append(
                    EnergyModeChanged(
                        mode=start.energy.mode,
                        previous=self.mode,
                        reason=f"the mode in {start.source or 'the configuration'} at start",
                        by="startup",
                    )
                )

    def _register(self, job_id: str, spec: SubmitJob, at: datetime) -> None:
        try:
            meta = spec.metadata_as(RenderMetadata)
        except msgspec.ValidationError:
            return  # not a render job (an older journal's): ordered FIFO
        render = meta.render
        plan = render.plan
        passes = plan.passes if plan is not None else ()
        exponent = self.config.previews.cost_exponent
        units: list[float] = []
        full: list[bool] = []
        frames: list[tuple[int, int] | None] = []
        for index, task in enumerate(spec.tasks):
            count = (
                (task.end - task.start + 1)
                if task.start is not None and task.end is not None
                else 1
            )
            frames.append(
                (task.start, task.end) if task.start is not None and task.end is not None else None
            )
            if index < len(passes):
                step = max(1, plan.stride if plan else 1)
                picked = len(range(task.start or 0, (task.end or 0) + 1, step))
                units.append(max(1, picked) * passes[index] ** exponent)
                full.append(False)
            else:
                units.append(float(count))
                full.append(True)
        prior = self.config.frame_estimate
        if render.frame_estimate is not None:
            try:
                prior = parse_duration(render.frame_estimate) or prior
            except ValueError:
                pass
        self._jobs[job_id] = _Job(
            job_id=job_id,
            client=render.client,
            job_type=render.job_type,
            prior=prior,
            energy_intensive=render.energy_intensive,
            max_errors=render.max_errors,
            submitted_at=at,
            units=units,
            full=full,
            frames=frames,
            plan=plan,
            total_units=sum(units),
            longest=max((u for u, f in zip(units, full, strict=True) if f), default=0.0),
        )

    def _learn(self, job: _Job, task: int, observation: TaskEndedObservation) -> None:
        if not job.full[task] or observation.node is None or observation.runtime_s <= 0:
            return
        seconds_per_frame = observation.runtime_s / max(1e-9, job.units[task])
        self.speeds.add(observation.node, job.job_type, seconds_per_frame / job.prior)

    def _members(self, node_class: str) -> tuple[str, ...]:
        """Return the nodes of a class (as the farm's labels say; cached until a node changes)."""
        if self._classes is None or self._classes[0] != self._node_version:
            members: dict[str, list[str]] = {}
            if self._farm is not None:
                for name, view in self._farm.nodes.items():
                    found = node_class_of(view.label_map) or self.config.default_class.name
                    members.setdefault(found, []).append(name)
            self._classes = (self._node_version, {k: tuple(v) for k, v in members.items()})
        return self._classes[1].get(node_class, ())

    def _class_of(self, node: str) -> str:
        farm = self._farm
        if farm is not None:
            view = farm.nodes.get(node)
            if view is not None:
                return node_class_of(view.label_map) or self.config.default_class.name
        known = self._profiles.get(node)
        return known.node_class.name if known is not None else self.config.default_class.name

    # -- ranking --------------------------------------------------------------------------------

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[Any, ...]:
        self._farm = farm
        self._cycle_open = True
        level = self._effective(job, farm, now)
        self._levels[job.job_id] = level
        return order_key(level.priority, _deadline(job), job.submitted_at, job.job_id)

    def _own(self, job: JobView, farm: FarmView, now: datetime) -> Level:
        info = self._jobs.get(job.job_id)
        deadline = _deadline(job)
        if info is None or deadline is None:
            return deadline_level(job.priority, deadline, now, 0.0, self.config.margin)
        remaining = self._remaining(info, job, farm)
        level = deadline_level(job.priority, deadline, now, remaining, self.config.margin)
        self._verdicts[job.job_id] = (
            verdict(deadline, now, remaining, self.config.margin),
            f"remaining {format_seconds(remaining)}, "
            f"{format_seconds((deadline - now).total_seconds())} to the deadline, "
            f"margin {format_seconds(self.config.margin)}",
        )
        return level

    def _effective(self, job: JobView, farm: FarmView, now: datetime) -> Level:
        if not job.parents and not job.children:
            return self._own(job, farm, now)
        related: dict[str, JobView] = {}
        stack = [job.job_id]
        while stack:
            current = stack.pop()
            view = farm.jobs.get(current)
            if view is None or current in related:
                continue
            related[current] = view
            stack.extend(view.parents)
            stack.extend(view.children)
        own = {job_id: self._own(view, farm, now) for job_id, view in related.items()}
        levels = inherited_levels(
            own,
            parents=lambda j: related[j].parents,
            blocked_children=lambda j: (
                c for c in related[j].children if c in related and related[c].blocked
            ),
        )
        return levels[job.job_id]

    def _remaining(self, info: _Job, job: JobView, farm: FarmView) -> float:
        """Return R: the remaining work spread over the job's width, at least its longest
        remaining chunk (seconds)."""
        units = info.total_units - info.done_units
        for node, index in _placements(farm, job.job_id):
            running = farm.running.get(node, {}).get((job.job_id, index))
            if running is not None and index < len(info.units):
                units -= running.progress * info.units[index]
        per_frame = info.per_frame
        width = self._width(info, job, farm)
        return remaining_seconds(max(0.0, units) * per_frame, width, info.longest * per_frame)

    def _width(self, info: _Job, job: JobView, farm: FarmView) -> int:
        request = job.spec.resources
        slots = self._fitting_slots(request, job.spec.requires, farm)
        client = self.config.client(info.client)
        totals = self._farm_totals(farm)
        if client is not None and request.millicores:
            limits = []
            for asked, total in (
                (request.millicores, totals.millicores),
                (request.memory, totals.memory),
                (request.gpus, totals.gpus),
            ):
                if asked:
                    limits.append(int(client.maximum / 100 * total // asked))
            if limits:
                slots = min(slots, min(limits))
        return max(1, min(slots, max(1, job.remaining)))

    def _fitting_slots(self, request: Resources, requires: tuple[str, ...], farm: FarmView) -> int:
        key = (request, requires)
        found = self._slots.get(key)
        if found is not None:
            return found
        total = 0
        for node in farm.nodes.values():
            if not self._available(node) or node.satisfies(requires) is not None:
                continue
            total += _copies(request, node.capacity)
        self._slots[key] = total
        return total

    def _available(self, node: NodeView) -> bool:
        """Return whether the node counts in the farm shares are fractions of: online and
        connected, asleep by the policy's decision (it wakes for work), or woken by it and
        booting (for ``WAKE_TIMEOUT``: one that does not come back is counted out)."""
        if node.health == "online" and node.reachable == "connected":
            return True
        if node.health_by != "policy":
            return False
        return node.health == "sleeping" or (node.health == "online" and node.name in self._waking)

    def _farm_totals(self, farm: FarmView) -> Totals:
        if self._totals is None:
            self._totals = Totals.of(
                [n.capacity for n in farm.nodes.values() if self._available(n)]
            )
        return self._totals

    def explain_rank(self, job: JobView, now: datetime) -> str:
        level = self._levels.get(job.job_id)
        if level is None and self._farm is not None:
            level = self._effective(job, self._farm, now)
        if level is None:
            return super().explain_rank(job, now)
        deadline = _deadline(job)
        base = job.priority.value
        return (
            f"effective priority {level.reason} (base {base}); order: effective priority, then "
            f"deadline {deadline.isoformat() if deadline else 'none'}, then submission "
            f"{job.submitted_at.isoformat()}"
        )

    # -- admission ------------------------------------------------------------------------------

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        self._farm = farm
        self._cycle_open = True
        info = self._jobs.get(job.job_id)
        self._holds.pop(job.job_id, None)
        if info is None:
            return None
        states = self._share_states(farm, now)
        if info.client in states and not self._may_preempt(job):
            # A job that may preempt is not held here: with no room for it, it is offered to
            # ``preemptions`` (which then only takes from its own client).
            share = self._task_share(info, job, farm)
            state = states[info.client]
            if state.used + share > state.maximum + 1e-9:
                hold = Hold(
                    reason=f"client {info.client} at its maximum "
                    f"({state.used * 100:.1f} % used of {state.maximum * 100:.0f} %)"
                )
                self._holds[job.job_id] = hold
                return hold
        if self.mode != "night-savings" or not info.energy_intensive:
            return None
        deferral = defer_to_off_peak(
            mode=self.mode,
            energy_intensive=info.energy_intensive,
            now=now,
            deadline=_deadline(job),
            remaining_s=self._remaining(info, job, farm),
            margin_s=self.config.margin,
            config=self.config,
        )
        if deferral is not None:
            hold = Hold(reason=deferral.reason, until=deferral.until)
            self._holds[job.job_id] = hold
            return hold
        return None

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        info = self._jobs.get(job.job_id)
        if info is None:
            return None
        self._cycle_open = True
        states = self._share_states(farm, now)
        if info.client not in states:
            return None
        share = dominant_share(task.request, self._farm_totals(farm))
        reason = admit_share(info.client, share, states)
        if reason is None:
            self._admitted(info.client, job.job_id, task.index, task.request)
        return reason

    def _may_preempt(self, job: JobView) -> bool:
        level = self._levels.get(job.job_id)
        return job.priority is Priority.CRITICAL or (level is not None and level.at_risk)

    def _task_share(self, info: _Job, job: JobView, farm: FarmView) -> float:
        if info.share is None or info.share_version != self._node_version:
            info.share = dominant_share(job.spec.resources, self._farm_totals(farm))
            info.share_version = self._node_version
        return info.share

    def _usage(self, farm: FarmView) -> dict[str, float]:
        """Return each client's dominant share of the farm, from what runs now.

        Within a cycle the sums are computed once and then kept current: each task ``admit``
        lets through is added, and taken back if the engine found no node for it."""
        self._reconcile(farm)
        sums = self._cycle_sums if self._cycle_open else None
        if sums is None:
            sums = self._running_sums(farm)
            if self._cycle_open:
                self._cycle_sums = sums
        totals = self._farm_totals(farm)
        return {client: _dominant(s, totals) for client, s in sums.items()}

    def _running_sums(self, farm: FarmView) -> dict[str, list[int]]:
        used: dict[str, list[int]] = {}
        for job_id, view in farm.jobs.items():
            if not view.running:
                continue
            info = self._jobs.get(job_id)
            if info is None:
                continue
            sums = used.setdefault(info.client, [0, 0, 0])
            if _uniform(view.spec):
                request = view.spec.resources
                sums[0] += request.millicores * view.running
                sums[1] += request.memory * view.running
                sums[2] += request.gpus * view.running
                continue
            for node, index in _placements(farm, job_id):
                running = farm.running.get(node, {}).get((job_id, index))
                if running is not None:
                    sums[0] += running.request.millicores
                    sums[1] += running.request.memory
                    sums[2] += running.request.gpus
        return used

    def _admitted(self, client: str, job_id: str, task: int, request: Resources) -> None:
        """Count a task ``admit`` let through (the engine places it next, or finds no node)."""
        if self._cycle_sums is None:
            return
        sums = self._cycle_sums.setdefault(client, [0, 0, 0])
        sums[0] += request.millicores
        sums[1] += request.memory
        sums[2] += request.gpus
        self._cycle_states = None
        self._last_admitted = (client, job_id, task, request)

    def _reconcile(self, farm: FarmView) -> None:
        """Take back the last admitted task if the engine found no node for it."""
        last = self._last_admitted
        if last is None:
            return
        self._last_admitted = None
        client, job_id, task, request = last
        if task in farm.placements.get(job_id, {}) or self._cycle_sums is None:
            return
        sums = self._cycle_sums.get(client)
        if sums is not None:
            sums[0] -= request.millicores
            sums[1] -= request.memory
            sums[2] -= request.gpus
            self._cycle_states = None

    def _share_states(self, farm: FarmView, now: datetime) -> dict[str, ShareState]:
        self._reconcile(farm)
        if self._cycle_open and self._cycle_states is not None:
            return self._cycle_states
        usage = self._usage(farm)
        guarantees = self.config.guarantees()
        waiting = self._waiting_clients(farm, now, usage)
        states = {
            c.id: ShareState(
                guaranteed=guarantees[c.id],
                maximum=c.maximum / 100,
                borrowing_limit=c.borrowing_limit / 100,
                used=usage.get(c.id, 0.0),
                waiting=waiting.get(c.id, False),
            )
            for c in self.config.clients
        }
        if self._cycle_open:
            self._cycle_states = states
        return states

    def _waiting_clients(
        self, farm: FarmView, now: datetime, usage: Mapping[str, float]
    ) -> dict[str, bool]:
        """Return, per client, whether work of it waits that it could run now within its own
        guarantee, on a free node (its unused guarantee is then not lent: reclaim by not
        refilling).  A client whose next task would exceed its guarantee anyway does not hold
        the rest of its guarantee back from others.  Computed once per cycle."""
        if self._waiting is not None and self._cycle_open:
            return self._waiting
        guarantees = self.config.guarantees()
        totals = self._farm_totals(farm)
        shapes: dict[str, set[tuple[Resources, tuple[str, ...]]]] = {}
        for job_id, view in farm.jobs.items():
            if not view.queued or view.status != "active":
                continue
            hold = self._holds.get(job_id)
            if hold is not None and (hold.until is None or hold.until > now):
                continue
            info = self._jobs.get(job_id)
            if info is None or info.client not in guarantees:
                continue
            idle = guarantees[info.client] - usage.get(info.client, 0.0)
            if dominant_share(view.spec.resources, totals) <= idle + 1e-9:
                shapes.setdefault(info.client, set()).add((view.spec.resources, view.spec.requires))
        waiting: dict[str, bool] = {}
        free = [n for n in farm.nodes.values() if n.accepts_work]
        for client, wanted in shapes.items():
            waiting[client] = any(
                fits(request, node.free) and node.satisfies(requires) is None
                for request, requires in wanted
                for node in free
            )
        if self._cycle_open:
            self._waiting = waiting
        return waiting

    # -- placement ------------------------------------------------------------------------------

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        info = self._jobs.get(job.job_id)
        if info is None:
            return super().node_score(job, task, node, now)
        profile = self._profile(node)
        base, class_base = self._base(node, profile, info.job_type)
        if class_base * PATIENCE_RATIO < self._best_class_base(info.job_type, task.request):
            # A class far slower at this job type: wait a while for a better node, unless the
            # job cannot afford to (critical, at deadline risk) or has waited long enough.
            level = self._levels.get(job.job_id)
            urgent = job.priority is Priority.CRITICAL or (level is not None and level.at_risk)
            since = self._blocked_since.get(job.job_id, now)
            if not urgent and (now - since).total_seconds() < PATIENCE:
                self._blocked_since.setdefault(job.job_id, now)
                return None
        fit = fit_factor(
            request=task.request,
            free=node.free,
            capacity=node.capacity,
            node=profile,
            mode=self.mode,
        )
        retry_here = bool(task.failures) and task.last_node == node.name
        return base * fit * (RETRY_HERE if retry_here else 1.0)

    def _base(self, node: NodeView, profile: NodeProfile, job_type: str) -> tuple[float, float]:
        """Return the node's factors for the job type: with and without its own speed."""
        key = (node.name, job_type)
        stamp = (self.speeds.version, self.mode, id(self.config), self._node_version)
        cached = self._score_cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        node_class = profile.node_class.name
        members = self._members(node_class)
        class_only = base_factor(
            job_type=job_type,
            node=profile,
            class_factor=self.speeds.class_factor(members, job_type),
            node_factor=None,
            mode=self.mode,
            reference_watts=self._reference_watts(),
        )
        factor = self.speeds.node_factor(node.name, members, job_type)
        both = (class_only * (factor or 1.0), class_only)
        self._score_cache[key] = (stamp, both)
        return both

    def _best_class_base(self, job_type: str, request: Resources) -> float:
        """Return the best class factor for the job type among classes whose nodes fit it."""
        key = (job_type, request)
        stamp = (self.speeds.version, self.mode, id(self.config), self._node_version)
        cached = self._best_cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        best = 0.0
        farm = self._farm
        seen: set[str] = set()
        if farm is not None:
            for node in farm.nodes.values():
                profile = self._profile(node)
                name = profile.node_class.name
                if name in seen or not fits(request, node.capacity) or not self._available(node):
                    continue
                seen.add(name)
                best = max(best, self._base(node, profile, job_type)[1])
        self._best_cache[key] = (stamp, best)
        return best

    def _reference_watts(self) -> float | None:
        classes = self.config.node_classes
        if not classes:
            return None
        return sum(c.busy_watts / c.performance for c in classes) / len(classes)

    def _profile(self, node: NodeView) -> NodeProfile:
        profile = self._profiles.get(node.name)
        if profile is not None:
            return profile
        labels = node.label_map
        node_class = self.config.node_class(node_class_of(labels))
        idle, busy, sleep = node_watts(labels)
        profile = NodeProfile(
            name=node.name,
            node_class=node_class,
            type_labels=frozenset(k for k, v in labels.items() if not v),
            idle_watts=idle if idle is not None else node_class.idle_watts,
            busy_watts=busy if busy is not None else node_class.busy_watts,
            sleep_watts=sleep if sleep is not None else node_class.sleep_watts,
        )
        self._profiles[node.name] = profile
        return profile

    # -- preemption -----------------------------------------------------------------------------

    def preemptions(
        self, job: JobView, task: TaskView, farm: FarmView, now: datetime
    ) -> Sequence[Preemption]:
        self._blocked_since.setdefault(job.job_id, now)
        info = self._jobs.get(job.job_id)
        level = self._levels.get(job.job_id) or Level(job.priority, job.priority.value)
        victims_of = self._victims(farm)
        choice: tuple[str, list[Victim]] | None = None
        reason = ""
        # A client beyond what its shares allow may only take back from itself.
        urgent = job.priority is Priority.CRITICAL or level.at_risk
        own = urgent and info is not None and self._share_refuses(info, task, farm, now)
        client = info.client if info is not None else ""
        if job.priority is Priority.CRITICAL:
            choice = self._choose(
                ("critical", own and client),
                task,
                farm,
                victims_of,
                lambda v: (
                    self._base_rank(farm, v.job_id) < Priority.CRITICAL.rank
                    and (not own or v.client == client)
                ),
            )
            reason = f"critical job {job.job_id} needs the node"
        elif level.at_risk:
            choice = self._choose(
                ("at risk", level.priority.rank, own and client),
                task,
                farm,
                victims_of,
                lambda v: v.level < level.priority.rank and (not own or v.client == client),
            )
            reason = f"{job.job_id} is at deadline risk ({level.reason})"
        if choice is None and info is not None and not own:
            choice, reason = self._reclaim(job, task, info, farm, now, victims_of)
        if choice is None:
            return ()
        node, victims = choice
        self.preemptions_asked += len(victims)
        return [
            Preemption(victim_job=v.job_id, victim_task=v.task, node=node, reason=reason)
            for v in victims
        ]

    def _share_refuses(self, info: _Job, task: TaskView, farm: FarmView, now: datetime) -> bool:
        states = self._share_states(farm, now)
        if info.client not in states:
            return False
        share = dominant_share(task.request, self._farm_totals(farm))
        return admit_share(info.client, share, states) is not None

    def _reclaim(
        self,
        job: JobView,
        task: TaskView,
        info: _Job,
        farm: FarmView,
        now: datetime,
        victims_of: Any,
    ) -> tuple[tuple[str, list[Victim]] | None, str]:
        """A lender whose work waited longer than ``reclaim_after`` takes its guarantee back
        from borrowers (checkpoint and yield), no more than they borrowed."""
        since = self._blocked_since.get(job.job_id, now)
        if (now - since).total_seconds() < self.config.reclaim_after:
            return None, ""
        states = self._share_states(farm, now)
        state = states.get(info.client)
        totals = self._farm_totals(farm)
        share = dominant_share(task.request, totals)
        if state is None or state.used + share > state.guaranteed + 1e-9:
            return None, ""
        borrowers = {c for c, s in states.items() if s.borrowed > 1e-9 and c != info.client}
        if not borrowers:
            return None, ""
        budget = sum(states[c].borrowed for c in borrowers)
        choice = self._choose(
            ("reclaim", info.client),
            task,
            farm,
            victims_of,
            lambda v: v.client in borrowers,
            budget=budget,
            share_of=lambda v: dominant_share(v.request, totals),
        )
        waited = format_seconds((now - since).total_seconds())
        return choice, (
            f"client {info.client} reclaims its guarantee from {', '.join(sorted(borrowers))} "
            f"(its work waited {waited} > reclaim_after "
            f"{format_seconds(self.config.reclaim_after)})"
        )

    def _choose(
        self,
        kind: tuple[Any, ...],
        task: TaskView,
        farm: FarmView,
        victims_of: Any,
        eligible: Callable[[Victim], bool],
        **limits: Any,
    ) -> tuple[str, list[Victim]] | None:
        """Choose victims, remembering for the rest of the cycle when there are none: the
        same search for the same shape would find none again (nothing it looks at changes
        within a cycle but the work placed in it, which is no one's to preempt)."""
        key = (kind, task.request, task.requires)
        if self._cycle_open and key in self._no_victims:
            return None
        choice = choose_victims(
            task.request, task.requires, farm.nodes, victims_of, eligible, **limits
        )
        if choice is None and self._cycle_open:
            self._no_victims.add(key)
        return choice

    def _victims(self, farm: FarmView) -> Any:
        def running(node: str) -> Iterable[Victim]:
            for (job_id, index), attempt in farm.running.get(node, {}).items():
                if not attempt.preemptible:
                    continue
                info = self._jobs.get(job_id)
                yield Victim(
                    job_id=job_id,
                    task=index,
                    node=node,
                    request=attempt.request,
                    level=self._level_rank(attempt),
                    client=info.client if info is not None else "",
                    started_at=attempt.started_at,
                )

        return running

    def _level_rank(self, attempt: RunningView) -> int:
        level = self._levels.get(attempt.job_id)
        return level.priority.rank if level is not None else attempt.priority.rank

    def _base_rank(self, farm: FarmView, job_id: str) -> int:
        view = farm.jobs.get(job_id)
        return view.priority.rank if view is not None else 0

    # -- failures -------------------------------------------------------------------------------

    def on_failure(
        self,
        job: JobView,
        task: TaskView,
        failure: Failure,
        default: RetryDecision,
        now: datetime,
    ) -> RetryDecision:
        info = self._jobs.get(job.job_id)
        if info is None or failure.kind == "lost":
            return default
        limit = info.max_errors or self.config.max_errors
        errors = info.errors + 1  # this attempt is observed after the decision
        if errors >= limit:
            return RetryDecision(
                action="fail",
                reason=f"{errors} failed attempts reached max_errors ({limit}); last: "
                f"{failure.error or failure.kind}",
            )
        if default.action == "retry" and failure.node is not None and not failure.job_fault:
            return RetryDecision(action="retry", delay=default.delay, avoid_node=failure.node)
        return default

    # -- energy ---------------------------------------------------------------------------------

    def next_wakeup(self, now: datetime) -> datetime | None:
        times: list[datetime] = []
        if self.config.energy.auto or self.mode == "night-savings":
            boundary = self.config.next_price_change(now)
            if boundary is not None:
                times.append(boundary)
        factor = SLEEP_AFTER_FACTOR[self.mode]
        if factor is not None and self._idle_since:
            after = timedelta(seconds=max(30.0, self.config.energy.sleep_after * factor))
            times.append(min(self._idle_since.values()) + after)
        reclaim = timedelta(seconds=self.config.reclaim_after)
        patience = timedelta(seconds=PATIENCE)
        for since in self._blocked_since.values():
            times.extend((since + reclaim, since + patience))
        future = [t for t in times if t > now]
        return min(future) if future else None

    def node_actions(self, farm: FarmView, now: datetime) -> Sequence[NodeAction]:
        self._farm = farm
        actions: list[NodeAction] = []
        mine_asleep = [
            n for n in farm.nodes.values() if n.health == "sleeping" and n.health_by == "policy"
        ]
        factor = SLEEP_AFTER_FACTOR[self.mode]
        if factor is None:
            return [
                NodeAction(node=n.name, health="online", reason=f"energy mode {self.mode}")
                for n in sorted(mine_asleep, key=lambda n: n.name)
            ]
        if mine_asleep:
            demand = self._unmet_demand(farm, now)
            if demand:
                actions.extend(self._wake(demand, mine_asleep, farm, now))
        if self._next_sleep_scan is not None and now < self._next_sleep_scan:
            return actions
        # After a cycle, an idle node that admissible work fits has been given it: the nodes
        # still idle have nothing they could run now.
        self._next_sleep_scan = now + timedelta(seconds=_SLEEP_SCAN_EVERY)
        idle: list[tuple[str, datetime]] = []
        for name, node in farm.nodes.items():
            if node.running or not node.accepts_work:
                self._idle_since.pop(name, None)
                continue
            idle.append((name, self._idle_since.setdefault(name, now)))
        idle.sort(key=lambda item: self._keep_awake_key(farm.nodes[item[0]]))
        sleepers = plan_sleep(
            idle,
            reserve=self.config.energy.reserve,
            now=now,
            sleep_after=max(30.0, self.config.energy.sleep_after * factor),
        )
        for name in sleepers:
            self._idle_since.pop(name, None)
            actions.append(
                NodeAction(
                    node=name,
                    health="sleeping",
                    reason=f"idle beyond the reserve of {self.config.energy.reserve} "
                    f"(energy mode {self.mode})",
                )
            )
        return actions

    def _keep_awake_key(self, node: NodeView) -> tuple[float, str]:
        profile = self._profile(node)
        # The reserve keeps the nodes that do the most per watt awake, then by name.
        return (profile.watts_per_performance, node.name)

    def _unmet_demand(
        self, farm: FarmView, now: datetime
    ) -> list[tuple[Resources, tuple[str, ...], int]]:
        """Return (request, requires, tasks) of admissible queued work no free node fits."""
        demand: list[tuple[Resources, tuple[str, ...], int]] = []
        free = [n for n in farm.nodes.values() if n.accepts_work]
        states: dict[str, ShareState] | None = None
        for job_id, view in farm.jobs.items():
            if not view.queued or view.status != "active":
                continue
            hold = self._holds.get(job_id)
            if hold is not None and (hold.until is None or hold.until > now):
                continue
            info = self._jobs.get(job_id)
            if info is not None:
                # Work its client's shares do not admit now needs no node woken.
                states = states if states is not None else self._share_states(farm, now)
                share = self._task_share(info, view, farm)
                if info.client in states and admit_share(info.client, share, states):
                    continue
            request, requires = view.spec.resources, view.spec.requires
            if any(fits(request, n.free) and n.satisfies(requires) is None for n in free):
                continue
            demand.append((request, requires, view.queued))
        return demand

    def _wake(
        self,
        demand: list[tuple[Resources, tuple[str, ...], int]],
        asleep: list[NodeView],
        farm: FarmView,
        now: datetime,
    ) -> list[NodeAction]:
        for name, since in list(self._waking.items()):
            if (now - since).total_seconds() > WAKE_TIMEOUT:
                del self._waking[name]  # it never came back: count it no longer
                self._totals = None
                self._slots.clear()
        actions = []
        candidates = sorted(asleep, key=self._keep_awake_key)
        chosen: set[str] = set()
        for request, requires, tasks in demand:
            coming = [
                farm.nodes[n]
                for n in self._waking
                if n in farm.nodes and farm.nodes[n].satisfies(requires) is None
            ]
            covered = sum(_copies(request, n.capacity) for n in coming)
            needed = tasks - covered
            for node in candidates:
                if needed <= 0:
                    break
                if node.name in chosen or node.satisfies(requires) is not None:
                    continue
                copies = _copies(request, node.capacity)
                if not copies:
                    continue
                chosen.add(node.name)
                needed -= copies
                self._waking[node.name] = now
                actions.append(
                    NodeAction(node=node.name, health="online", reason="queued work needs it")
                )
        return actions

    # -- what the policy decides by itself ------------------------------------------------------

    def cycle_events(self, farm: FarmView, now: datetime) -> Sequence[Event]:
        self._farm = farm
        # The cycle is over: the next one starts from fresh numbers.
        self._cycle_open = False
        self._waiting = None
        self._cycle_sums = None
        self._cycle_states = None
        self._no_victims.clear()
        self._last_admitted = None
        events: list[Event] = list(self._pending)
        self._pending.clear()
        if self.config.energy.auto:
            wanted = (
                self.config.energy.peak_mode
                if self.config.is_peak(now)
                else self.config.energy.off_peak_mode
            )
            if wanted != self.mode:
                events.append(
                    EnergyModeChanged(
                        mode=wanted,
                        previous=self.mode,
                        reason="peak hours" if self.config.is_peak(now) else "off-peak hours",
                        by="auto",
                    )
                )
        for job_id in [j for j in self._levels if j not in farm.jobs]:
            del self._levels[job_id]
            self._verdicts.pop(job_id, None)
            self._journaled_levels.pop(job_id, None)
            self._journaled_verdicts.pop(job_id, None)
            self._holds.pop(job_id, None)
            self._blocked_since.pop(job_id, None)
        for job_id in [j for j in self._blocked_since if j not in farm.jobs]:
            del self._blocked_since[job_id]
        for job_id, level in self._levels.items():
            view = farm.jobs[job_id]
            before = self._journaled_levels.get(job_id, view.priority.value)
            if level.priority.value != before:
                events.append(
                    PriorityChanged(
                        job_id=job_id,
                        previous=before,
                        current=level.priority.value,
                        reason=level.reason,
                    )
                )
            judged = self._verdicts.get(job_id)
            if judged is not None and judged[0] != self._journaled_verdicts.get(job_id, "on track"):
                events.append(
                    DeadlineVerdictChanged(job_id=job_id, verdict=judged[0], reason=judged[1])
                )
        return events

    def apply(self, event: Event) -> None:
        match event:
            case FarmConfigChanged(config=config):
                self.config = config
                self._journaled_config = config
                self._score_cache.clear()
                self._profiles.clear()
                self._slots.clear()
                self._totals = None
            case EnergyModeChanged(mode=mode):
                self.mode = mode
            case PriorityChanged(job_id=job_id, current=current):
                self._journaled_levels[job_id] = current
            case DeadlineVerdictChanged(job_id=job_id, verdict=judged):
                self._journaled_verdicts[job_id] = judged
            case _:
                pass

    # -- commands -------------------------------------------------------------------------------

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any],
        farm: FarmView,
        now: datetime,
        *,
        by: str | None = None,
    ) -> CommandResult:
        self._farm = farm
        # Who the journaled change names: the client credential that asked, else "operator"
        # (the embedding application or a join-token client, as before names were recorded).
        who = by or "operator"
        match name:
            case "status":
                return CommandResult(reply=self.status_rows(farm, now))
            case "clients":
                return CommandResult(reply=self.client_rows(farm, now))
            case "previews":
                return CommandResult(reply=self._previews_reply(arguments))
            case "chart":
                return CommandResult(reply=self._chart(farm, now))
            case "config":
                return CommandResult(
                    reply={"config": msgspec.to_builtins(self.config), "mode": self.mode}
                )
            case "config-reload":
                return self._reload(arguments, by=who)
            case "mode":
                return self._set_mode(arguments, by=who)
            case _:
                return super().command(name, arguments, farm, now, by=by)

    def _reload(self, arguments: Mapping[str, Any], *, by: str) -> CommandResult:
        text = arguments.get("text")
        source = str(arguments.get("source") or "")
        if text is None:
            if self._config_path is None:
                raise ConfigurationError(
                    "the coordinator was started without --policy-config: send the file",
                    where="--file",
                )
            try:
                text = self._config_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigurationError(
                    f"cannot read it: {error}", where=str(self._config_path)
                ) from None
            source = str(self._config_path)
        if not isinstance(text, str):
            raise ConfigurationError("expected the text of a farm.toml", where="text")
        new = parse_farm_config(text, source=source or "farm.toml")
        changes = config_changes(self.config, new)
        if not changes:
            return CommandResult(reply={"changes": [], "mode": self.mode})
        events: list[Event] = [FarmConfigChanged(config=new, changes=changes, by=by)]
        if new.energy.mode != self.config.energy.mode and new.energy.mode != self.mode:
            events.append(
                EnergyModeChanged(
                    mode=new.energy.mode,
                    previous=self.mode,
                    reason=f"reloaded {new.source}",
                    by=by,
                )
            )
        return CommandResult(
            reply={"changes": list(changes), "mode": new.energy.mode}, events=events
        )

    def _set_mode(self, arguments: Mapping[str, Any], *, by: str) -> CommandResult:
        mode = arguments.get("mode")
        if mode not in ENERGY_MODES:
            raise ConfigurationError(
                f"unknown energy mode {mode!r}; choose from {', '.join(ENERGY_MODES)}", where="MODE"
            )
        reason = str(arguments.get("reason") or "set by operator")
        if mode == self.mode:
            return CommandResult(reply={"mode": mode, "changed": False})
        return CommandResult(
            reply={"mode": mode, "changed": True},
            events=[EnergyModeChanged(mode=mode, previous=self.mode, reason=reason, by=by)],
        )

    # -- what operators see ---------------------------------------------------------------------

    def describe(self, job: JobView, now: datetime) -> Mapping[str, str]:
        info = self._jobs.get(job.job_id)
        if info is None:
            return {}
        farm = self._farm
        columns: dict[str, str] = {"client": info.client, "type": info.job_type}
        level = self._levels.get(job.job_id)
        if level is None and farm is not None:
            level = self._effective(job, farm, now)
        if level is not None:
            columns["effective priority"] = level.reason
        deadline = _deadline(job)
        done, total = info.frames_done()
        columns["frames"] = f"{done}/{total}"
        columns["per frame"] = format_seconds(info.per_frame) + (
            " (measured)" if info.measured_units else " (estimate)"
        )
        if deadline is not None:
            columns["deadline"] = deadline.isoformat()
            if farm is not None:
                completion = self._forecast_for(farm, now)[0].get(job.job_id)
                if completion is not None:
                    columns["eta"] = completion.isoformat()
                    columns["verdict"] = (
                        f"{forecast_verdict(completion, deadline, self.config.margin)} "
                        f"(margin {format_seconds(self.config.margin)})"
                    )
        if job.preemptions:
            columns["preemptions"] = str(job.preemptions)
        if info.errors:
            limit = info.max_errors or self.config.max_errors
            columns["errors"] = f"{info.errors} of max_errors {limit}"
        if info.previews:
            columns["preview"] = info.previews[-1][1]
        hold = self._holds.get(job.job_id)
        if hold is not None and (hold.until is None or hold.until > now):
            columns["held"] = hold.reason
        return columns

    def _forecast_for(
        self, farm: FarmView, now: datetime
    ) -> tuple[dict[str, datetime], list[Slot]]:
        cached = self._forecast
        if (
            cached is not None
            and (now - cached[0]).total_seconds() < _FORECAST_EVERY
            and now >= cached[0]
        ):
            return cached[1], cached[2]
        order = sorted(
            farm.jobs.values(),
            key=lambda v: order_key(
                (self._levels.get(v.job_id) or self._effective(v, farm, now)).priority,
                _deadline(v),
                v.submitted_at,
                v.job_id,
            ),
        )
        jobs: list[ForecastJob] = []
        for view in order:
            info = self._jobs.get(view.job_id)
            if info is None or view.status != "active":
                continue
            placed = farm.placements.get(view.job_id, {})
            tasks = [
                ForecastTask(
                    index=i,
                    request=view.spec.task_resources(i),
                    requires=view.spec.task_requires(i),
                    seconds=info.units[i] * info.per_frame,
                )
                for i in range(len(info.units))
                if i not in info.done and i not in placed
            ]
            hold = self._holds.get(view.job_id)
            jobs.append(
                ForecastJob(
                    job_id=view.job_id,
                    tasks=tasks,
                    not_before=hold.until if hold is not None and hold.until is not None else None,
                )
            )
        nodes: list[ForecastNode] = []
        for node in farm.nodes.values():
            if node.health == "sleeping" and node.health_by == "policy":
                available = _WAKE_SECONDS
            elif node.accepts_work or node.running:
                available = 0.0
            else:
                continue
            running = []
            for (job_id, index), attempt in farm.running.get(node.name, {}).items():
                info = self._jobs.get(job_id)
                seconds = (
                    info.units[index] * info.per_frame
                    if info is not None and index < len(info.units)
                    else 0.0
                )
                seconds /= max(1e-6, self._speed(node.name, job_id))
                elapsed = (now - attempt.started_at).total_seconds() if attempt.started_at else 0.0
                left = max(seconds * (1 - attempt.progress), seconds - elapsed, 0.0)
                running.append((attempt.request, left))
            nodes.append(ForecastNode(view=node, available_at=available, running=running))
        completion, slots = forecast(jobs, nodes, now, self._speed)
        self._forecast = (now, completion, slots)
        return completion, slots

    def _speed(self, node: str, job_id: str) -> float:
        info = self._jobs.get(job_id)
        if info is None:
            return 1.0
        node_class = self._class_of(node)
        ratio = self.speeds.ratio(node, self._members(node_class), info.job_type)
        if ratio is not None:
            farm_ratio = self.speeds.types.get(info.job_type)
            return (farm_ratio.value if farm_ratio else 1.0) / ratio
        return self.config.node_class(node_class).performance

    def status_rows(self, farm: FarmView, now: datetime) -> list[dict[str, Any]]:
        """Return one row per live render job, in rank order (for ``taskfarm render status``)."""
        self._farm = farm
        completion, _ = self._forecast_for(farm, now)
        rows: list[tuple[Any, dict[str, Any]]] = []
        for view in farm.jobs.values():
            info = self._jobs.get(view.job_id)
            if info is None:
                continue
            level = self._levels.get(view.job_id) or self._effective(view, farm, now)
            deadline = _deadline(view)
            eta = completion.get(view.job_id)
            done, total = info.frames_done()
            rows.append(
                (
                    order_key(level.priority, deadline, view.submitted_at, view.job_id),
                    {
                        "job": view.job_id,
                        "client": info.client,
                        "type": info.job_type,
                        "frames_done": done,
                        "frames_total": total,
                        "strip": self._strip(info, view, farm),
                        "per_frame_s": info.per_frame,
                        "measured": bool(info.measured_units),
                        "eta": eta.isoformat() if eta else None,
                        "deadline": deadline.isoformat() if deadline else None,
                        "verdict": forecast_verdict(eta, deadline, self.config.margin)
                        if eta
                        else "-",
                        "margin_s": self.config.margin,
                        "priority": level.priority.value,
                        "base_priority": view.priority.value,
                        "why": level.reason,
                        "preview": info.previews[-1][1] if info.previews else None,
                        "preemptions": view.preemptions,
                        "held": (
                            self._holds[view.job_id].reason if view.job_id in self._holds else None
                        ),
                    },
                )
            )
        rows.sort(key=lambda item: item[0])
        return [row for _, row in rows]

    def _strip(self, info: _Job, view: JobView, farm: FarmView) -> str:
        """Return the job's frames as a strip: ``#`` done, ``>`` running, ``.`` waiting."""
        spans = [f for f in info.frames if f is not None]
        if not spans:
            return ""
        first = min(a for a, _ in spans)
        last = max(b for _, b in spans)
        count = last - first + 1
        width = min(_STRIP, count)
        cells = ["."] * width
        running = set(farm.placements.get(view.job_id, {}))
        for index, span in enumerate(info.frames):
            if span is None or not info.full[index]:
                continue
            mark = "#" if index in info.done else (">" if index in running else None)
            if mark is None:
                continue
            for frame in range(span[0], span[1] + 1):
                cell = (frame - first) * width // count
                if cells[cell] != "#":
                    cells[cell] = mark
        return "".join(cells)

    def client_rows(self, farm: FarmView, now: datetime) -> list[dict[str, Any]]:
        """Return each client's guaranteed, maximum, used, borrowed and lent share (percent)."""
        self._farm = farm
        states = self._share_states(farm, now)
        ledger = loans(states)
        lent: dict[str, float] = {}
        for borrower in ledger.values():
            for lender, amount in borrower.items():
                lent[lender] = lent.get(lender, 0.0) + amount
        rows = []
        for client in self.config.clients:
            state = states[client.id]
            rows.append(
                {
                    "client": client.id,
                    "name": client.label,
                    "tier": client.tier,
                    "guaranteed": round(state.guaranteed * 100, 2),
                    "maximum": client.maximum,
                    "used": round(state.used * 100, 2),
                    "borrowed": round(state.borrowed * 100, 2),
                    "lent": round(lent.get(client.id, 0.0) * 100, 2),
                    "waiting": state.waiting,
                    "loans": {k: round(v * 100, 2) for k, v in ledger.get(client.id, {}).items()},
                }
            )
        return rows

    def _previews_reply(self, arguments: Mapping[str, Any]) -> list[dict[str, Any]]:
        job_id = str(arguments.get("job") or "")
        info = self._jobs.get(job_id)
        if info is None:
            raise ConfigurationError(f"no render job {job_id!r} is known", where="JOB")
        result = []
        for index, path, at in info.previews:
            quality = (
                info.plan.passes[index]
                if info.plan is not None and index < len(info.plan.passes)
                else 1.0
            )
            frames = info.frames[index] if index < len(info.frames) else None
            result.append(
                {
                    "task": index,
                    "frames": list(frames) if frames else None,
                    "quality": quality,
                    "path": path,
                    "at": at.isoformat(),
                }
            )
        return result

    def _chart(self, farm: FarmView, now: datetime) -> dict[str, Any]:
        completion, slots = self._forecast_for(farm, now)
        bars = []
        for node, attempts in farm.running.items():
            for (job_id, index), attempt in attempts.items():
                info = self._jobs.get(job_id)
                seconds = (
                    info.units[index] * info.per_frame
                    if info is not None and index < len(info.units)
                    else 0.0
                )
                seconds /= max(1e-6, self._speed(node, job_id))
                start = attempt.started_at or now
                end = max(now, start + timedelta(seconds=seconds))
                bars.append(
                    {
                        "node": node,
                        "job": job_id,
                        "task": index,
                        "start": start.isoformat(),
                        "end": end.isoformat(),
                        "planned": False,
                        "client": info.client if info else "",
                    }
                )
        for slot in slots:
            info = self._jobs.get(slot.job_id)
            bars.append(
                {
                    "node": slot.node,
                    "job": slot.job_id,
                    "task": slot.task,
                    "start": slot.start.isoformat(),
                    "end": slot.end.isoformat(),
                    "planned": True,
                    "client": info.client if info else "",
                }
            )
        deadlines = {
            job_id: d.isoformat()
            for job_id, view in farm.jobs.items()
            if (d := _deadline(view)) is not None
        }
        return {
            "now": now.isoformat(),
            "bars": bars,
            "deadlines": deadlines,
            "completion": {j: t.isoformat() for j, t in completion.items()},
        }

    # -- for the benchmark and tests ------------------------------------------------------------

    def holds(self, now: datetime) -> dict[str, Hold]:
        """Return the holds in force (job -> hold)."""
        return {j: h for j, h in self._holds.items() if h.until is None or h.until > now}

    def first_preview_at(self, job_id: str) -> datetime | None:
        """Return when the job's first preview finished (None: none yet)."""
        info = self._jobs.get(job_id)
        return info.first_preview_at if info is not None else None

    def learned_factor(self, node: str, job_type: str) -> float | None:
        """Return the learned node factor for a job type (None: unknown)."""
        return self.speeds.node_factor(node, self._members(self._class_of(node)), job_type)


def _spec_deadline(spec: SubmitJob) -> datetime | None:
    try:
        return spec.metadata_as(RenderMetadata).effective_deadline
    except msgspec.ValidationError:
        return None


def _deadline(job: JobView) -> datetime | None:
    meta = job.metadata
    if isinstance(meta, RenderMetadata):
        return meta.effective_deadline
    return None


def _placements(farm: FarmView, job_id: str) -> Iterable[tuple[str, int]]:
    for index, node in farm.placements.get(job_id, {}).items():
        yield node, index


def _dominant(sums: Sequence[int], totals: Totals) -> float:
    """Return the dominant share of summed (millicores, memory, GPUs)."""
    share = 0.0
    for asked, total in zip(sums, (totals.millicores, totals.memory, totals.gpus), strict=True):
        if asked:
            share = max(share, asked / total if total else float("inf"))
    return share


def _uniform(spec: SubmitJob) -> bool:
    return not any(t.resources is not None for t in spec.tasks)


def _copies(request: Resources, capacity: Resources) -> int:
    """Return how many tasks of ``request`` a node of ``capacity`` runs at once."""
    if not fits(request, capacity):
        return 0
    counts = []
    for asked, has in (
        (request.millicores, capacity.millicores),
        (request.memory, capacity.memory),
        (request.gpus, capacity.gpus),
    ):
        if asked:
            counts.append(has // asked)
    return max(1, min(counts)) if counts else 1
