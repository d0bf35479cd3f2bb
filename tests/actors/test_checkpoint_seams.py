"""The policy's checkpoint seams: an interval per task (``TASKFARM_CHECKPOINT_INTERVAL`` in the
attempt's environment, enforced with checkpoint requests when it passes without one), yields
for the policy's own reasons, and the simulated executor's cost of a checkpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
import msgspec

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    AttemptSpec,
    Engine,
    FarmView,
    FifoPolicy,
    JobView,
    Observation,
    Preemption,
    Resources,
    SubmitJob,
    TaskAssigned,
    TaskCheckpointed,
    TaskCheckpointRequested,
    TaskCompleted,
    TaskEndedObservation,
    TaskMetricRecorded,
    TaskPreempted,
    TaskRequeued,
    TaskSpec,
    TaskView,
    open_engine,
    open_inprocess_executor,
    open_simulated_executor,
    simulated_work,
)
from actors.executors import SimulatedExecutor
from persistence import InMemoryJournal
from runtime import VirtualClock

NODE = Resources.of(cores=4, memory="8GiB")
WAIT = 10.0


class Every(FifoPolicy):
    """Asks every checkpointable task to checkpoint every ``seconds``."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.asked: list[str] = []

    def checkpoint_interval(self, job: JobView, task: TaskView, now: datetime) -> float | None:
        self.asked.append(job.job_id)
        return self.seconds


def stage(job_id: str, seconds: float, *, checkpointable: bool = True) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        command=("inprocess:run", str(seconds)),
        tasks=(TaskSpec(index=0, name="main"),),
        checkpointable=checkpointable,
        preemptible=True,
    )


@asynccontextmanager
async def simulated(
    policy: FifoPolicy,
    *,
    cost: float | Callable[[AttemptSpec], float] = 0.0,
    clock: VirtualClock | None = None,
) -> AsyncIterator[tuple[Engine, InMemoryJournal, SimulatedExecutor, list[AttemptSpec]]]:
    clock = clock or VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    seen: list[AttemptSpec] = []

    def duration(spec: AttemptSpec) -> float:
        seen.append(spec)
        return float(spec.arguments["args"][0]) - simulated_work(spec.resume_from)

    async with (
        open_simulated_executor(
            duration=duration,
            clock=clock,
            checkpoint_cost=cost if callable(cost) else (lambda spec: cost),
            metrics=lambda spec: {"residual": 0.25},
        ) as executor,
        open_engine(journal=journal, clock=clock, policy=policy) as engine,
    ):
        await engine.add_node("n1", NODE, executor=executor)
        yield engine, journal, executor, seen


async def events(journal: InMemoryJournal, job_id: str) -> list[object]:
    return [r.event for r in await journal.read_stream(f"job:{job_id}")]


async def test_the_interval_reaches_the_attempt_and_lapses_are_requested() -> None:
    """A 3,600 s stage with a 900 s interval gets TASKFARM_CHECKPOINT_INTERVAL=900 and a
    checkpoint request every 900 s it goes without one; a non-checkpointable job gets none."""
    policy = Every(900.0)
    async with simulated(policy) as (engine, journal, _executor, seen):
        await engine.submit([stage("sim", 3600), stage("plain", 100, checkpointable=False)])
        with anyio.fail_after(WAIT):
            await engine.wait_job("sim")
            await engine.wait_job("plain")
        log = await events(journal, "sim")
    env = {s.job_id: dict(s.env) for s in seen}
    assert env["sim"]["TASKFARM_CHECKPOINT_INTERVAL"] == "900"
    assert "TASKFARM_CHECKPOINT_INTERVAL" not in env["plain"]
    assert policy.asked == ["sim"]
    requests = [e for e in log if isinstance(e, TaskCheckpointRequested)]
    assert len(requests) == 3  # at 900, 1800 and 2700 s (3,600 s is the end)
    assert all("checkpoint interval" in r.reason for r in requests)
    tokens = [e.checkpoint for e in log if isinstance(e, TaskCheckpointed)]
    assert [simulated_work(t) for t in tokens[:3]] == [900.0, 1800.0, 2700.0]
    assert any(isinstance(e, TaskMetricRecorded) and e.name == "residual" for e in log)


async def test_an_attempt_that_checkpoints_on_its_own_is_never_asked() -> None:
    """Checkpoints taken within the interval keep the engine from asking."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)

    async def run(ctx: AttemptContext) -> None:
        for step in range(6):
            await ctx.clock.sleep(500)
            await ctx.checkpoint(f"step-{step}")

    async with (
        open_inprocess_executor({"run": run}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock, policy=Every(900.0)) as engine,
    ):
        await engine.add_node("n1", NODE, executor=executor)
        await engine.submit([stage("sim", 0)])
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("sim")
        assert summary.status == "completed"
        log = await events(journal, "sim")
    assert not [e for e in log if isinstance(e, TaskCheckpointRequested)]
    assert sum(isinstance(e, TaskCheckpointed) for e in log) == 6


async def test_no_interval_means_no_requests() -> None:
    """A policy that returns None asks for nothing (the engine's default)."""
    async with simulated(Every(None)) as (engine, journal, _executor, seen):
        await engine.submit([stage("sim", 3600)])
        with anyio.fail_after(WAIT):
            await engine.wait_job("sim")
        log = await events(journal, "sim")
    assert not [e for e in log if isinstance(e, TaskCheckpointRequested)]
    assert "TASKFARM_CHECKPOINT_INTERVAL" not in dict(seen[0].env)


async def test_a_checkpoint_costs_time_and_a_resume_skips_the_work_done() -> None:
    """With a cost of 100 s per checkpoint, a 1,000 s stage asked every 400 s runs 1,000 s of
    work plus 100 s per checkpoint; its tokens count work, not wall time."""
    async with simulated(Every(400.0), cost=100.0) as (engine, journal, _executor, _seen):
        await engine.submit([stage("sim", 1000)])
        with anyio.fail_after(WAIT):
            await engine.wait_job("sim")
        log = await events(journal, "sim")
    tokens = [simulated_work(e.checkpoint) for e in log if isinstance(e, TaskCheckpointed)]
    # Asked at 400 (written at 500: work 400), then 400 s after that checkpoint, at 900
    # (written at 1,000: work 800); the end moved to 1,200.
    assert tokens == [400.0, 800.0]
    assert [e.runtime_s for e in log if isinstance(e, TaskCompleted)] == [1200.0]


class YieldAt(FifoPolicy):
    """Yields whatever runs on n1 once the clock reaches ``at`` (a window starting)."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.yielded = 0

    def next_wakeup(self, now: datetime) -> datetime | None:
        return self.at if now < self.at else None

    def yields(self, farm: FarmView, now: datetime) -> Sequence[Preemption]:
        if now < self.at or self.yielded:
            return ()
        running = list(farm.running.get("n1", {}).values())
        self.yielded += len(running)
        return [Preemption(r.job_id, r.task, "n1", "maintenance window starts") for r in running]


async def test_a_policy_yield_checkpoints_and_requeues_the_attempt_which_resumes() -> None:
    """A yield the policy asks for at a time checkpoints the running stage and requeues it;
    the next attempt resumes from that checkpoint and does only the rest of the work."""
    clock = VirtualClock(auto_advance=True)
    policy = YieldAt(clock.now() + timedelta(seconds=1000))
    async with simulated(policy, clock=clock) as (engine, journal, _executor, seen):
        await engine.submit([stage("sim", 3000)])
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("sim")
        log = await events(journal, "sim")
    assert summary.status == "completed"
    preempted = [e for e in log if isinstance(e, TaskPreempted)]
    assert [p.reason for p in preempted] == ["maintenance window starts"]
    assert [s.attempt for s in seen] == [1, 2]
    assert simulated_work(seen[1].resume_from) == 1000.0


class Learner(FifoPolicy):
    """Keeps every ended observation (live, or from the journal's history on open)."""

    history = True

    def __init__(self) -> None:
        self.ended: list[TaskEndedObservation] = []

    def observe(self, observation: Observation) -> None:
        if isinstance(observation, TaskEndedObservation):
            self.ended.append(observation)

    def recover(self, observations: Sequence[Observation]) -> None:
        for observation in observations:
            self.observe(observation)


async def test_the_history_a_policy_recovers_carries_the_metrics_live_ends_did() -> None:
    """After a restart, ``recover`` gets each end with the metrics its attempt reported."""
    clock = VirtualClock(auto_advance=True)
    live = Learner()
    async with simulated(live, clock=clock) as (engine, journal, _executor, _seen):
        await engine.submit([stage("sim", 100)])
        with anyio.fail_after(WAIT):
            await engine.wait_job("sim")
    again = Learner()
    async with open_engine(journal=journal, clock=clock, policy=again):
        pass
    assert [o.metrics for o in live.ended] == [{"residual": 0.25}]
    assert [o.metrics for o in again.ended] == [{"residual": 0.25}]


class YieldOnRank(FifoPolicy):
    """Yields whatever runs on ``node`` (a gang's second rank) once the clock reaches ``at``."""

    def __init__(self, at: datetime, node: str) -> None:
        self.at = at
        self.node = node
        self.yielded = 0

    def next_wakeup(self, now: datetime) -> datetime | None:
        return self.at if now < self.at else None

    def yields(self, farm: FarmView, now: datetime) -> Sequence[Preemption]:
        if now < self.at or self.yielded:
            return ()
        running = list(farm.running.get(self.node, {}).values())
        self.yielded += len(running)
        return [Preemption(r.job_id, r.task, self.node, "rank's node is wanted") for r in running]


async def test_a_yield_named_on_a_gang_rank_node_yields_the_whole_attempt() -> None:
    """A policy may name any node a multi-node attempt runs on (it sees the attempt on every
    rank's node): the yield is not dropped because the node is not the leader's."""
    clock = VirtualClock(auto_advance=True)
    policy = YieldOnRank(clock.now() + timedelta(seconds=1000), "n2")
    async with simulated(policy, clock=clock) as (engine, journal, executor, seen):
        await engine.add_node("n2", NODE, executor=executor)
        gang = msgspec.structs.replace(stage("sim", 3000), resources=NODE, nodes=2)
        await engine.submit([gang])
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("sim")
        log = await events(journal, "sim")
    assert summary.status == "completed"
    assert [p.reason for p in log if isinstance(p, TaskPreempted)] == ["rank's node is wanted"]
    # The whole attempt yielded and ran again on both ranks.
    assert sorted(s.rank for s in seen if s.attempt == 2) == [0, 1]


async def test_a_gang_yield_keeps_the_leaders_checkpoint_when_a_rank_stops_first() -> None:
    """A yielded multi-node attempt resumes from the checkpoint its leader writes while
    yielding, although the other rank stops (and reports) long before that checkpoint is
    written: the attempt is requeued as preempted, not lost, and no work is thrown away."""
    clock = VirtualClock(auto_advance=True)
    policy = YieldOnRank(clock.now() + timedelta(seconds=1000), "n2")

    # The leader's checkpoint takes 30 s; rank 1's is instant, so it stops well before.
    def leader_slow(spec: AttemptSpec) -> float:
        return 30.0 if spec.rank == 0 else 0.0

    async with simulated(policy, cost=leader_slow, clock=clock) as (engine, journal, ex, seen):
        await engine.add_node("n2", NODE, executor=ex)
        gang = msgspec.structs.replace(stage("sim", 3000), resources=NODE, nodes=2)
        await engine.submit([gang])
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("sim")
        log = await events(journal, "sim")
    assert summary.status == "completed"
    requeued = [e for e in log if isinstance(e, TaskRequeued)]
    assert [(e.reason, e.lost) for e in requeued] == [("preempted", False)]
    second = [s for s in seen if s.attempt == 2]
    assert sorted(s.rank for s in second) == [0, 1]
    # Both ranks resume from the leader's yield checkpoint, written 1,000 s into the run.
    assert {simulated_work(s.resume_from) for s in second} == {1000.0}


async def test_removing_a_node_stops_only_its_own_attempts_on_a_shared_executor() -> None:
    """Two nodes may share one executor (an embedded farm or a simulation): taking one node
    away stops the attempt that ran there, not the other node's, which completes unharmed."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    both_started = anyio.Event()
    started: list[AttemptSpec] = []

    def duration(spec: AttemptSpec) -> float:
        started.append(spec)
        if len(started) == 2:
            both_started.set()
        return 3000.0

    async with (
        open_simulated_executor(duration=duration, clock=clock) as executor,
        open_engine(journal=journal, clock=clock, policy=FifoPolicy()) as engine,
    ):
        for name in ("n1", "n2"):
            await engine.add_node(name, NODE, executor=executor)
        whole = Resources.of(cores=4, memory="8GiB")
        jobs = [msgspec.structs.replace(stage(j, 3000), resources=whole) for j in ("a", "b")]
        await engine.submit(jobs)
        with anyio.fail_after(WAIT):
            await both_started.wait()
            [assigned] = [e for e in await events(journal, "a") if isinstance(e, TaskAssigned)]
            await engine.remove_node(assigned.node, reason="taken away")
            summary = await engine.wait_job("b")
        log_a, log_b = await events(journal, "a"), await events(journal, "b")
    assert summary.status == "completed"
    assert [e.lost for e in log_a if isinstance(e, TaskRequeued)] == [True]
    assert not [e for e in log_b if isinstance(e, TaskRequeued)]
