"""``taskfarm bench render``: a seeded simulated week of a render farm, under five policies.

The trace: 200 nodes of three classes, three clients (50/30/20 %), 2,000 jobs of five types
arriving with a working-day rhythm, with deadlines (a few impossible), frame-time estimates that
are only estimates, tariffs with peak hours, node failures, attempts that fail, and a node x
job-type speed matrix the policy is not told (its classes' priors are roughly right; single
nodes are faster or slower than their class).  The same trace runs, each on a fresh engine and
virtual clock with the production engine, under FIFO, priority-only (base priority, then
earliest deadline), random placement, and the render-farm policy in each energy mode.  Every
figure is taken from the run's journal (through the audit's projection) or from the farm as the
simulation saw it, and printed beside its baselines.

``--quick`` runs a smaller farm and trace (a smoke run, not a measurement).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final

import anyio
import msgspec

from actors import (
    AttemptOutcome,
    AttemptSpec,
    FarmView,
    FifoPolicy,
    JobSubmitted,
    JobView,
    NodeHealthChanged,
    NodeView,
    Policy,
    Priority,
    Resources,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    TaskRequeued,
    TaskView,
    fits,
)
from persistence import RecordedEvent
from runtime import (
    BenchContext,
    Figure,
    TaskfarmError,
    VirtualClock,
    configure_logging,
    tune_gc_for_many_objects,
)

from ._audit import AuditProjection
from ._config import FarmConfig, parse_farm_config
from ._models import PreviewSettings, RenderJob, RenderMetadata, RenderNode
from ._policy import WAKE_TIMEOUT, RenderFarmPolicy
from ._shares import Totals, dominant_share
from ._simulation import SimulatedFarm, open_simulated_farm

__all__ = ["SUITE", "Trace", "make_trace", "run_suite"]

START: Final = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday
HOUR: Final = 3600.0
SAMPLE_EVERY: Final = 600.0  # seconds between two looks at idle nodes and waiting work
# Durations, submissions and failures fall on whole steps of this many seconds: events that
# land together are handled in one step of the virtual clock, which is what keeps a simulated
# week within the time budget (under 5 % of a chunk of frames that takes hours).
STEP: Final = 300.0
TYPES: Final = ("animation", "lighting", "vfx", "simulation", "compositing")
TYPE_MIX: Final = (0.40, 0.20, 0.20, 0.10, 0.10)
# The hidden truth: time multiplier per class and job type (lower is faster).
AFFINITY: Final[Mapping[str, Mapping[str, float]]] = {
    "std": {"animation": 1.0, "lighting": 1.3, "vfx": 1.7, "simulation": 2.0, "compositing": 1.0},
    "big": {"animation": 0.8, "lighting": 1.0, "vfx": 0.9, "simulation": 0.6, "compositing": 0.9},
    "gpu": {"animation": 0.9, "lighting": 0.5, "vfx": 0.6, "simulation": 1.3, "compositing": 1.0},
}
CLIENTS: Final = (("north", 0.5), ("east", 0.3), ("west", 0.2))
PASS_COMMAND: Final = ("render", "--quality", "{quality}", "--frames", "{start}-{end}", "--step",
                       "{stride}")  # fmt: skip
COMMAND: Final = ("render", "--frames", "{start}-{end}")
ATTEMPT_FAILURE: Final = 0.005  # of attempts fail (a bad frame, a crashed renderer)

FARM_TOML: Final = """
margin = "2h"
reclaim_after = "2m"
max_errors = 5
frame_estimate = "10m"
timezone = "UTC"

[[clients]]
id = "north"
name = "North Animation"
tier = "premium"
guaranteed = 50
maximum = 75
borrowing_limit = 25

[[clients]]
id = "east"
name = "East VFX"
tier = "standard"
guaranteed = 30
maximum = 55
borrowing_limit = 25

[[clients]]
id = "west"
name = "West Studio"
tier = "basic"
guaranteed = 20
maximum = 45
borrowing_limit = 25

[[node_classes]]
name = "std"
watts = { idle = 120, busy = 380, sleep = 6 }
performance = 1.0
job_types = ["animation", "compositing"]

[[node_classes]]
name = "big"
watts = { idle = 200, busy = 650, sleep = 8 }
performance = 1.2
job_types = ["simulation", "vfx"]
scarce = true

[[node_classes]]
name = "gpu"
watts = { idle = 180, busy = 800, sleep = 8 }
performance = 1.3
job_types = ["lighting", "vfx"]

[energy]
mode = "{mode}"
reserve = 4
sleep_after = "15m"

[[tariffs]]
days = ["mon", "tue", "wed", "thu", "fri"]
peak_hours = ["07:00-23:00"]
peak_price = 0.32
off_peak_price = 0.12

[[tariffs]]
days = ["sat", "sun"]
peak_hours = []
peak_price = 0.15
off_peak_price = 0.15

[previews]
stride = 12
passes = [0.25, 0.5]
max_passes = 2
overhead = 0.05
"""


# -- the trace ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of the trace: what the policy is told, and the truth it is not."""

    name: str
    client: str
    job_type: str
    submit_s: float
    frames: int
    chunk: int
    frame_s: float  # true seconds per frame at speed 1
    estimate_s: float  # what the job says (a prior)
    deadline_s: float
    priority: Priority
    request: Resources
    requires: tuple[str, ...]
    energy_intensive: bool
    previews: bool
    feasible: bool

    def job(self) -> RenderJob:
        """Return the job as a studio would submit it."""
        return RenderJob(
            name=self.name,
            client=self.client,
            job_type=self.job_type,
            command=COMMAND,
            frames=(1, self.frames),
            chunk=self.chunk,
            deadline=START + timedelta(seconds=self.deadline_s),
            frame_estimate=round(self.estimate_s, 1),
            priority=self.priority,
            resources=self.request,
            requires=self.requires,
            energy_intensive=self.energy_intensive,
            preview=(
                PreviewSettings(command=list(PASS_COMMAND))
                if self.previews
                else PreviewSettings(stride=0)
            ),
        )


@dataclass(frozen=True, slots=True)
class Trace:
    """A seeded week: nodes, the hidden speed matrix, jobs, node failures."""

    nodes: tuple[RenderNode, ...]
    speed: Mapping[tuple[str, str], float]  # (node, job type) -> time multiplier
    jobs: tuple[TraceJob, ...]
    failures: tuple[tuple[float, str, float], ...]  # (at s, node, down for s)
    hours: float
    seed: int


def _shapes() -> dict[str, tuple[Resources, tuple[str, ...]]]:
    return {
        "animation": (Resources.of(cores=8, memory="16GiB"), ()),
        "lighting": (Resources.of(cores=8, memory="32GiB"), ()),
        "lighting-gpu": (Resources.of(cores=8, memory="32GiB", gpus=1), ("gpu",)),
        "vfx": (Resources.of(cores=16, memory="64GiB"), ()),
        "simulation": (Resources.of(cores=32, memory="128GiB"), ()),
        "compositing": (Resources.of(cores=4, memory="8GiB"), ()),
    }


def make_trace(
    *, seed: int = 2026, nodes: int = 200, jobs: int = 2000, hours: float = 168.0
) -> Trace:
    """Build the seeded trace (the same seed gives the same week)."""
    rng = random.Random(seed)
    counts = {"std": round(nodes * 0.55), "big": round(nodes * 0.25)}
    counts["gpu"] = nodes - counts["std"] - counts["big"]
    shapes: dict[str, tuple[float, str, int]] = {
        "std": (16, "64GiB", 0),
        "big": (32, "256GiB", 0),
        "gpu": (16, "128GiB", 2),
    }
    farm: list[RenderNode] = []
    speed: dict[tuple[str, str], float] = {}
    for node_class in ("std", "big", "gpu"):
        for number in range(counts[node_class]):
            name = f"{node_class}-{number:03d}"
            cores, memory, gpus = shapes[node_class]
            farm.append(
                RenderNode(name=name, node_class=node_class, cores=cores, memory=memory, gpus=gpus)
            )
            quirk = rng.random()
            for job_type in TYPES:
                factor = AFFINITY[node_class][job_type] * math.exp(rng.gauss(0.0, 0.12))
                if quirk < 0.1 and rng.random() < 0.5:
                    factor *= 0.6  # a newer CPU, a better driver: faster at this type
                elif quirk > 0.9 and rng.random() < 0.5:
                    factor *= 1.6  # thermal throttling, a slow disk
                speed[(name, job_type)] = factor
    fastest = {
        t: min(statistics.fmean(speed[(n.name, t)] for n in farm if n.node_class == c)
               for c in ("std", "big", "gpu"))
        for t in TYPES
    }  # fmt: skip
    by_shape = _shapes()
    trace_jobs: list[TraceJob] = []
    horizon = hours * HOUR * 0.86  # the last jobs arrive with time left to finish
    submits = sorted(_step(_arrival(rng, horizon)) for _ in range(jobs))
    for number, submit in enumerate(submits):
        job_type = rng.choices(TYPES, TYPE_MIX)[0]
        client = rng.choices([c for c, _ in CLIENTS], [w for _, w in CLIENTS])[0]
        key = job_type
        if job_type == "lighting" and rng.random() < 0.5:
            key = "lighting-gpu"
        request, requires = by_shape[key]
        if job_type == "simulation":
            frames, chunk = rng.randint(4, 12), 1
            frame_s = rng.uniform(40, 100) * 60
        elif job_type == "compositing":
            frames, chunk = rng.randint(24, 96), 24
            frame_s = rng.uniform(2, 6) * 60
        else:
            frames, chunk = rng.randint(24, 120), rng.choice((12, 16, 20))
            frame_s = rng.uniform(8, 24) * 60
        estimate = frame_s * math.exp(rng.gauss(0.0, 0.25))
        chunks = math.ceil(frames / chunk)
        best = fastest[job_type]
        # Alone on its fastest class, at the width that class offers (or its chunk count).
        width = min(chunks, 12)
        ideal = max(frames * frame_s * best / width, chunk * frame_s * best)
        roll = rng.random()
        if roll < 0.04:
            # impossible: a client's wish
            deadline = submit + ideal * rng.uniform(0.4, 0.9)
        elif roll < 0.25:
            deadline = submit + ideal * rng.uniform(1.5, 3.0) + rng.uniform(2, 4) * HOUR
        else:
            deadline = submit + ideal * rng.uniform(3.0, 10.0) + rng.uniform(4, 12) * HOUR
        feasible = submit + ideal <= deadline
        priority = rng.choices(
            (Priority.LOW, Priority.MEDIUM, Priority.HIGH, Priority.CRITICAL),
            (0.25, 0.55, 0.18, 0.02),
        )[0]
        trace_jobs.append(
            TraceJob(
                name=f"{client}-{job_type}-{number:04d}",
                client=client,
                job_type=job_type,
                submit_s=submit,
                frames=frames,
                chunk=chunk,
                frame_s=frame_s,
                estimate_s=estimate,
                deadline_s=deadline,
                priority=priority,
                request=request,
                requires=requires,
                energy_intensive=job_type == "simulation"
                or (job_type == "vfx" and rng.random() < 0.5),
                previews=job_type in ("animation", "lighting") and rng.random() < 0.5,
                feasible=feasible,
            )
        )
    failures = []
    for _ in range(max(2, nodes // 10)):
        at = _step(rng.uniform(0, horizon))
        node = rng.choice(farm).name
        failures.append((at, node, _step(rng.uniform(1, 8) * HOUR)))
    return Trace(
        nodes=tuple(farm),
        speed=speed,
        jobs=tuple(trace_jobs),
        failures=tuple(sorted(failures)),
        hours=hours,
        seed=seed,
    )


def _step(seconds: float) -> float:
    return math.floor(seconds / STEP) * STEP


def _arrival(rng: random.Random, horizon: float) -> float:
    """A submission time with a working-day rhythm: weekday office hours are busiest."""
    while True:
        t = rng.uniform(0, horizon)
        moment = START + timedelta(seconds=t)
        weight = 1.0
        if moment.weekday() >= 5:
            weight = 0.3
        elif 9 <= moment.hour < 19:
            weight = 1.0
        else:
            weight = 0.35
        if rng.random() < weight:
            return t


# -- the baselines -------------------------------------------------------------------------------


class FifoBaseline(FifoPolicy):
    """FIFO within priority, best fit, no shares, no sleeping (cycles as often as the render
    policy's)."""

    name = "fifo"
    cycle_interval = RenderFarmPolicy.cycle_interval


class PriorityOnlyPolicy(FifoBaseline):
    """The base priority, then the earliest deadline, then submission: no boosts, no shares."""

    name = "priority-only"
    metadata_type: type[Any] | None = RenderMetadata

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[Any, ...]:
        meta = job.metadata
        deadline = meta.effective_deadline if isinstance(meta, RenderMetadata) else None
        return (
            -job.priority_rank,
            deadline or START + timedelta(days=3650),
            job.submitted_at,
            job.job_id,
        )


class RandomPlacementPolicy(FifoBaseline):
    """FIFO within priority, on a node chosen at random (seeded: the same every run)."""

    name = "random-placement"

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        digest = hashlib.blake2b(
            f"{job.job_id}/{task.index}/{task.attempt}/{node.name}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64


# -- one run -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one policy did with the trace."""

    label: str
    wall_s: float
    simulated_h: float
    met_feasible: int
    feasible: int
    missed_feasible: int
    met_all: int
    with_deadline: int
    above_maximum: int
    idle_node_hours: float
    node_hours: float
    render_h: float
    preview_ratio_median: float | None
    preview_compute: float
    kwh: float
    cost: float
    preemptions: int
    lost: int
    failures: int
    unfinished: int
    notes: list[str] = field(default_factory=list)


def _uniform(node: str, spec: AttemptSpec, trace: Trace, jobs: Mapping[str, TraceJob]) -> float:
    job = jobs[spec.job_id]
    argv = list(spec.argv)
    first, last = (int(x) for x in argv[argv.index("--frames") + 1].split("-"))
    frames = last - first + 1
    cost = 1.0
    if "--quality" in argv:
        quality = float(argv[argv.index("--quality") + 1])
        step = int(argv[argv.index("--step") + 1])
        frames = len(range(first, last + 1, step))
        cost = quality**2
    seconds = frames * job.frame_s * cost * trace.speed[(node, job.job_type)]
    return max(STEP, math.ceil(seconds / STEP) * STEP)


def _attempt_outcome(node: str, spec: AttemptSpec) -> AttemptOutcome:
    digest = hashlib.blake2b(
        f"{spec.job_id}/{spec.task_id}/{spec.attempt}".encode(), digest_size=8
    ).digest()
    return "failed" if int.from_bytes(digest, "big") / 2**64 < ATTEMPT_FAILURE else "completed"


async def run_trace(
    trace: Trace,
    policy: Policy,
    label: str,
    *,
    holds: Callable[[datetime], Mapping[str, Any]] | None = None,
) -> RunResult:
    """Run the trace under ``policy`` on a fresh engine and virtual clock; measure it."""
    jobs = {job.name: job for job in trace.jobs}
    clock = VirtualClock(auto_advance=True, start=START)
    began = time.perf_counter()
    idle_samples: list[int] = []
    outcome_of: Callable[[str, AttemptSpec], AttemptOutcome] = _attempt_outcome
    async with open_simulated_farm(
        policy=policy,
        nodes=trace.nodes,
        duration=lambda node, spec: _uniform(node, spec, trace, jobs),
        clock=clock,
        outcome=outcome_of,
    ) as farm:
        done = anyio.Event()

        async def submit() -> None:
            for job in trace.jobs:
                await clock.sleep_until(job.submit_s)
                await farm.engine.submit([job.job().to_spec()])

        async def fail() -> None:
            pending = sorted(
                [(at, 0, node, down) for at, node, down in trace.failures]
                + [(at + down, 1, node, down) for at, node, down in trace.failures]
            )
            gone: set[str] = set()
            for at, kind, node, _down in pending:
                await clock.sleep_until(at)
                if kind == 0 and node not in gone:
                    gone.add(node)
                    await farm.fail_node(node)
                elif kind == 1 and node in gone:
                    gone.discard(node)
                    await farm.restore_node(node)

        async def sample() -> None:
            while not done.is_set():
                await clock.sleep(SAMPLE_EVERY)
                idle_samples.append(_idle_nodes(farm, policy, holds, clock.now()))

        async with anyio.create_task_group() as group:
            group.start_soon(submit)
            group.start_soon(fail)
            group.start_soon(sample)
            await clock.sleep_until(trace.jobs[-1].submit_s + 1)
            for job in trace.jobs:
                await farm.engine.wait_job(job.name)
            done.set()
            group.cancel_scope.cancel()
        simulated = clock.monotonic()
        records = [r async for batch in farm.journal.read_all() for r in batch]
        return _measure(
            trace, label, records, farm, idle_samples, simulated, time.perf_counter() - began
        )


def _idle_nodes(
    farm: SimulatedFarm,
    policy: Policy,
    holds: Callable[[datetime], Mapping[str, Any]] | None,
    now: datetime,
) -> int:
    """Return how many awake nodes run nothing while admissible work that fits them waits.

    Admissible: queued (dependencies met), its job active and not held by the policy (a
    deferral to off-peak is a decision, not idleness), and its client below its maximum."""
    view = farm.engine.core.farm
    held = holds(now) if holds is not None else {}
    waiting: list[tuple[Resources, tuple[str, ...]]] = []
    config = policy.config if isinstance(policy, RenderFarmPolicy) else _CONFIG
    totals = Totals.of(
        [
            n.capacity
            for n in view.nodes.values()
            if n.reachable == "connected" or n.health == "sleeping"
        ]
    )
    usage = _usage(view, totals)
    for job_id, job in view.jobs.items():
        if not job.queued or job.status != "active" or job_id in held:
            continue
        meta = _meta(job)
        if meta is not None:
            client = config.client(meta.render.client)
            share = dominant_share(job.spec.resources, totals)
            if (
                client is not None
                and usage.get(client.id, 0.0) + share > client.maximum / 100 + 1e-9
            ):
                continue
        waiting.append((job.spec.resources, job.spec.requires))
    if not waiting:
        return 0
    idle = 0
    for node in view.nodes.values():
        if node.running or not node.accepts_work:
            continue
        if any(fits(r, node.free) and node.satisfies(q) is None for r, q in waiting):
            idle += 1
    return idle


def _meta(job: JobView) -> RenderMetadata | None:
    if isinstance(job.metadata, RenderMetadata):
        return job.metadata
    try:
        return job.spec.metadata_as(RenderMetadata)
    except Exception:
        return None


def _usage(view: FarmView, totals: Totals) -> dict[str, float]:
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for job in view.jobs.values():
        if not job.running:
            continue
        meta = _meta(job)
        if meta is None:
            continue
        s = sums[meta.render.client]
        s[0] += job.spec.resources.millicores * job.running
        s[1] += job.spec.resources.memory * job.running
        s[2] += job.spec.resources.gpus * job.running
    return {
        c: dominant_share(Resources(millicores=s[0], memory=s[1], gpus=s[2]), totals)
        for c, s in sums.items()
    }


_CONFIG: FarmConfig = parse_farm_config(FARM_TOML.replace("{mode}", "balanced"), source="bench")


def _measure(
    trace: Trace,
    label: str,
    records: Sequence[RecordedEvent],
    farm: SimulatedFarm,
    idle_samples: list[int],
    simulated: float,
    wall: float,
) -> RunResult:
    jobs = {job.name: job for job in trace.jobs}
    projection = AuditProjection(config=_CONFIG, keep_entries=False)
    projection.feed(records)
    figures = projection.metrics(outages=farm.down)
    finished: dict[str, tuple[datetime, str]] = {}
    for name, seen in projection.jobs.items():
        if seen.finished_at is not None and seen.outcome is not None:
            finished[name] = (seen.finished_at, seen.outcome)
    met_feasible = feasible = met_all = 0
    for job in trace.jobs:
        deadline = START + timedelta(seconds=job.deadline_s)
        end = finished.get(job.name)
        ok = end is not None and end[1] == "completed" and end[0] <= deadline
        met_all += ok
        if job.feasible:
            feasible += 1
            met_feasible += ok
    # Render time, preview compute and placements above a client's maximum, from the journal.
    passes: dict[str, int] = {}
    requests: dict[str, Resources] = {}
    clients: dict[str, str] = {}
    render_s = preview_s = 0.0
    above = 0
    running: dict[tuple[str, int], tuple[str, Resources]] = {}
    usage: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    maxima = {c.id: c.maximum / 100 for c in _CONFIG.clients}
    online = _OnlineFarm(trace, farm)
    for record in records:
        event = record.event
        online.advance(record.timestamp)
        if record.stream_id.startswith("node:"):
            if isinstance(event, NodeHealthChanged):
                online.health(record.stream_id[5:], event)
            continue
        job_id = record.stream_id[4:] if record.stream_id.startswith("job:") else None
        if job_id is None:
            continue
        if isinstance(event, JobSubmitted):
            meta = _decode(event.job.metadata)
            plan = meta.render.plan if meta is not None else None
            passes[job_id] = len(plan.passes) if plan is not None else 0
            requests[job_id] = event.job.resources
            clients[job_id] = jobs[job_id].client
        elif isinstance(event, TaskAssigned):
            client = clients[job_id]
            request = requests[job_id]
            sums = usage[client]
            sums[0] += request.millicores
            sums[1] += request.memory
            sums[2] += request.gpus
            used = dominant_share(
                Resources(millicores=sums[0], memory=sums[1], gpus=sums[2]), online.totals()
            )
            if used > maxima[client] + 1e-6:
                above += 1
            running[(job_id, event.task)] = (client, request)
        elif isinstance(event, TaskCompleted | TaskFailed | TaskRequeued):
            previous = running.pop((job_id, event.task), None)
            if previous is not None:
                sums = usage[previous[0]]
                sums[0] -= previous[1].millicores
                sums[1] -= previous[1].memory
                sums[2] -= previous[1].gpus
            if isinstance(event, TaskCompleted):
                if event.task < passes.get(job_id, 0):
                    preview_s += event.runtime_s
                else:
                    render_s += event.runtime_s
    ratios = []
    for name, seen in projection.jobs.items():
        if seen.first_preview_at is None or seen.finished_at is None:
            continue
        if seen.outcome != "completed" or not jobs[name].previews:
            continue
        duration = (seen.finished_at - seen.submitted_at).total_seconds()
        if duration > 0:
            ratios.append((seen.first_preview_at - seen.submitted_at).total_seconds() / duration)
    energy = figures["energy"]
    node_hours = len(trace.nodes) * simulated / HOUR
    return RunResult(
        label=label,
        wall_s=wall,
        simulated_h=simulated / HOUR,
        met_feasible=met_feasible,
        feasible=feasible,
        missed_feasible=feasible - met_feasible,
        met_all=met_all,
        with_deadline=len(trace.jobs),
        above_maximum=above,
        idle_node_hours=sum(idle_samples) * SAMPLE_EVERY / HOUR,
        node_hours=node_hours,
        render_h=render_s / HOUR,
        preview_ratio_median=statistics.median(ratios) if ratios else None,
        preview_compute=preview_s / (preview_s + render_s) if render_s else 0.0,
        kwh=energy["kwh"],
        cost=energy["cost"],
        preemptions=figures["preemptions"],
        lost=figures["lost"],
        failures=figures["failures"],
        unfinished=len(trace.jobs) - len(finished),
    )


def _decode(raw: bytes) -> RenderMetadata | None:
    try:
        return msgspec.json.decode(raw, type=RenderMetadata)
    except msgspec.ValidationError:
        return None


class _OnlineFarm:
    """The farm shares are fractions of, as the coordinator knows it at each moment: nodes up
    and connected, nodes asleep by the policy's decision (they wake for work) and nodes it woke
    that are booting (for the policy's ``WAKE_TIMEOUT``); not failed nodes (a node that failed
    asleep still looks asleep)."""

    def __init__(self, trace: Trace, farm: SimulatedFarm) -> None:
        self.capacity = {n.name: n.capacity for n in trace.nodes}
        self.asleep: set[str] = set()
        self.gone: set[str] = set()
        self.booting: dict[str, datetime] = {}  # node -> when it was woken
        marks: list[tuple[datetime, int, str]] = []
        for name, spans in farm.down.items():
            for a, b in spans:
                marks.append((a, 0, name))
                if b is not None:
                    marks.append((b, 1, name))
        for name, boots in farm.boots.items():
            for _woken, back in boots:
                marks.append((back, 2, name))
        marks.sort()
        self.marks = marks
        self.next = 0
        self.now = START
        self.cached: Totals | None = None

    def advance(self, at: datetime) -> None:
        self.now = at
        while self.next < len(self.marks) and self.marks[self.next][0] <= at:
            _, kind, name = self.marks[self.next]
            self.next += 1
            if kind == 0:
                self.gone.add(name)
            elif kind == 1:
                self.gone.discard(name)  # back: it rejoins connected
                self.booting.pop(name, None)
            else:
                self.booting.pop(name, None)
            self.cached = None
        for name, woken in list(self.booting.items()):
            if (at - woken).total_seconds() > WAKE_TIMEOUT:
                del self.booting[name]
                self.gone.add(name)  # counted out until it is back
                self.cached = None

    def health(self, name: str, event: NodeHealthChanged) -> None:
        if event.health == "sleeping" and event.by == "policy":
            self.asleep.add(name)
        else:
            if name in self.asleep and event.health == "online" and event.by == "policy":
                self.booting[name] = self.now
            self.asleep.discard(name)
        self.cached = None

    def totals(self) -> Totals:
        if self.cached is None:
            self.cached = Totals.of(
                [
                    capacity
                    for name, capacity in self.capacity.items()
                    if name in self.asleep or name in self.booting or name not in self.gone
                ]
            )
        return self.cached


# -- the suite -----------------------------------------------------------------------------------


def render_policy(mode: str) -> RenderFarmPolicy:
    """Return the render-farm policy configured for the bench in ``mode``."""
    return RenderFarmPolicy(parse_farm_config(FARM_TOML.replace("{mode}", mode), source="bench"))


_RUNS: Final = (
    "FIFO",
    "priority-only",
    "random placement",
    "render-farm balanced",
    "render-farm performance",
    "render-farm efficiency",
    "render-farm night-savings",
)


def _policy_for(label: str) -> Policy:
    if label == "FIFO":
        return FifoBaseline()
    if label == "priority-only":
        return PriorityOnlyPolicy()
    if label == "random placement":
        return RandomPlacementPolicy()
    return render_policy(label.removeprefix("render-farm "))


def _trace_for(quick: bool) -> Trace:
    return make_trace(nodes=30, jobs=150, hours=48) if quick else make_trace()


async def run_one(label: str, *, quick: bool) -> RunResult:
    """Run one policy of the comparison on the trace (in this process)."""
    policy = _policy_for(label)
    holds = policy.holds if isinstance(policy, RenderFarmPolicy) else None
    return await run_trace(_trace_for(quick), policy, label, holds=holds)


async def run_suite(ctx: BenchContext) -> list[Figure]:
    """Run the comparison, one process per policy, as many at once as there are cores (at
    most two: the figure is "on 2 cores"), and return its figures."""
    trace = _trace_for(ctx.quick)
    workers = max(1, min(2, os.cpu_count() or 1))
    limiter = anyio.CapacityLimiter(workers)
    results: dict[str, RunResult] = {}

    async def one(label: str) -> None:
        async with limiter:
            ctx.progress(
                f"render: {label}, {len(trace.jobs):,} jobs on {len(trace.nodes)} nodes, "
                f"{trace.hours:g} simulated hours"
            )
            command = [sys.executable, "-m", "domains.render_farm._bench", label]
            if ctx.quick:
                command.append("--quick")
            done = await anyio.run_process(command, check=False)
            if done.returncode != 0:
                raise TaskfarmError(
                    f"the {label} run failed: {done.stderr.decode(errors='replace')[-2000:]}"
                )
            results[label] = msgspec.json.decode(done.stdout.splitlines()[-1], type=RunResult)

    began = time.perf_counter()
    cpu_before = _children_cpu()
    async with anyio.create_task_group() as group:
        # The slowest first, so the two processes finish together.
        for label in sorted(_RUNS, key=lambda label: not label.startswith("render-farm")):
            group.start_soon(one, label)
    wall = time.perf_counter() - began
    cpu = _children_cpu() - cpu_before
    return [*figures(results, trace), _wall_figure(wall, cpu, workers, results)]


def _children_cpu() -> float:
    """Return the CPU seconds (user and system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wall_figure(wall: float, cpu: float, workers: int, results: Mapping[str, RunResult]) -> Figure:
    # The CPU time says what the wall time would be on idle cores (a shared machine's load
    # stretches the wall time; it does not change the work done).
    return Figure(
        name=f"the whole comparison ({len(results)} simulated weeks)",
        value=wall,
        unit="s",
        target=180.0,
        better="lower",
        note=f"{workers} processes at once; {cpu:.0f} CPU-s in all, {cpu / workers:.0f} s per "
        f"core; load average {os.getloadavg()[0]:.1f} at the end; each run's wall time: "
        + ", ".join(f"{label} {r.wall_s:.0f} s" for label, r in results.items()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one policy of the comparison and print its result as JSON (the suite's worker)."""
    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    labels = [a for a in args if a != "--quick"]
    if len(labels) != 1 or labels[0] not in _RUNS:
        print(f"usage: python -m domains.render_farm._bench {{{'|'.join(_RUNS)}}} [--quick]")
        return 2
    configure_logging(level="error")
    tune_gc_for_many_objects()
    result = anyio.run(partial(run_one, labels[0], quick=quick))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


def figures(results: Mapping[str, RunResult], trace: Trace) -> list[Figure]:
    """Turn the runs into the table's figures, each beside its baselines."""
    fifo, prio, rand = results["FIFO"], results["priority-only"], results["random placement"]
    main = results["render-farm balanced"]
    perf = results["render-farm performance"]
    night = results["render-farm night-savings"]
    setup = (
        f"{len(trace.jobs):,} jobs, {len(trace.nodes)} nodes, {trace.hours:g} h, seed {trace.seed}"
    )
    out: list[Figure] = []

    def pct(value: int, total: int) -> float:
        return 100.0 * value / total if total else 100.0

    out.append(
        Figure(
            name="feasible deadlines met, render-farm (balanced)",
            value=pct(main.met_feasible, main.feasible),
            unit="%",
            baseline_name="FIFO",
            baseline_value=pct(fifo.met_feasible, fifo.feasible),
            target=99.0,
            note=f"{main.feasible} feasible of {len(trace.jobs)}; priority-only "
            f"{pct(prio.met_feasible, prio.feasible):.1f} %, random "
            f"{pct(rand.met_feasible, rand.feasible):.1f} %; {setup}",
        )
    )
    out.append(
        Figure(
            name="missed feasible deadlines, render-farm (balanced)",
            value=main.missed_feasible,
            unit="jobs",
            baseline_name="FIFO",
            baseline_value=fifo.missed_feasible,
            better="lower",
            ratio_target=0.2,
            note=f"priority-only {prio.missed_feasible}, random {rand.missed_feasible}",
        )
    )
    for label in ("render-farm balanced", "render-farm efficiency", "render-farm night-savings"):
        result = results[label]
        out.append(
            Figure(
                name=f"placements above a client's maximum, {label.removeprefix('render-farm ')}",
                value=result.above_maximum,
                unit="",
                baseline_name="FIFO",
                baseline_value=fifo.above_maximum,
                target=0,
                better="lower",
            )
        )
    out.append(
        Figure(
            name="idle node-hours while admissible work waits, render-farm (balanced)",
            value=pct_f(main.idle_node_hours, main.node_hours),
            unit="%",
            baseline_name="FIFO",
            baseline_value=pct_f(fifo.idle_node_hours, fifo.node_hours),
            target=2.0,
            better="lower",
            note=f"{main.idle_node_hours:,.0f} of {main.node_hours:,.0f} node-hours; sampled every "
            f"{SAMPLE_EVERY / 60:g} min",
        )
    )
    out.append(
        Figure(
            name="render time of the frames, render-farm (balanced)",
            value=main.render_h,
            unit="node-h",
            baseline_name="random placement",
            baseline_value=rand.render_h,
            better="lower",
            ratio_target=0.8,
            note=f"FIFO {fifo.render_h:,.0f} node-h; hidden node x job-type speed matrix",
        )
    )
    out.append(
        Figure(
            name="energy cost, night-savings",
            value=night.cost,
            unit="",
            baseline_name="performance mode",
            baseline_value=perf.cost,
            better="lower",
            ratio_target=0.85,
            note=f"{night.kwh:,.0f} vs {perf.kwh:,.0f} kWh; missed feasible deadlines "
            f"{night.missed_feasible} vs {perf.missed_feasible} (balanced {main.missed_feasible}, "
            f"efficiency {results['render-farm efficiency'].missed_feasible}); balanced cost "
            f"{main.cost:,.0f}, efficiency {results['render-farm efficiency'].cost:,.0f}, "
            f"FIFO {fifo.cost:,.0f}",
        )
    )
    out.append(
        Figure(
            name="extra missed feasible deadlines, night-savings over performance",
            value=night.missed_feasible - perf.missed_feasible,
            unit="jobs",
            target=0,
            better="lower",
        )
    )
    out.append(
        Figure(
            name="median time to first preview / job duration, render-farm (balanced)",
            value=100.0 * (main.preview_ratio_median or 0.0),
            unit="%",
            baseline_name="FIFO (first frames done)",
            baseline_value=100.0 * (fifo.preview_ratio_median or 0.0),
            target=10.0,
            better="lower",
            note="jobs with previews",
        )
    )
    out.append(
        Figure(
            name="preview compute / all compute, render-farm (balanced)",
            value=100.0 * main.preview_compute,
            unit="%",
            target=5.0,
            better="lower",
        )
    )
    for label, result in results.items():
        out.append(
            Figure(
                name=f"simulated week, {label}: wall time",
                value=result.wall_s,
                unit="s",
                better="lower",
                note=f"{result.simulated_h:.0f} simulated h; deadlines met "
                f"{pct(result.met_all, result.with_deadline):.1f} % (feasible "
                f"{pct(result.met_feasible, result.feasible):.1f} %); {result.preemptions} "
                f"preemptions, {result.lost} lost, {result.failures} failed attempts; "
                f"{result.kwh:,.0f} kWh, cost {result.cost:,.0f}"
                + (f"; {result.unfinished} unfinished" if result.unfinished else ""),
            )
        )
    return out


def pct_f(value: float, total: float) -> float:
    """Return value / total in percent."""
    return 100.0 * value / total if total else 0.0


SUITE = run_suite

if __name__ == "__main__":
    sys.exit(main())
