"""Preemption: the policy's choices (pure tables) and checkpoint-then-yield end to end."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    FarmView,
    JobView,
    NodeView,
    Priority,
    PriorityPreemptionPolicy,
    Resources,
    RunningView,
    SubmitJob,
    TaskAssigned,
    TaskCompleted,
    TaskPreempted,
    TaskRequeued,
    TaskSpec,
    TaskView,
    open_engine,
    open_inprocess_executor,
)
from persistence import InMemoryJournal
from runtime import VirtualClock

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CPU = Resources.of(cores=4, memory="8GiB")
GPU = Resources.of(cores=8, memory="32GiB", gpus=1, gpu_memory="16GiB")
ONE_CPU = Resources.of(cores=4, memory="4GiB")
ONE_GPU = Resources.of(cores=2, memory="4GiB", gpus=1, gpu_memory="8GiB")


def _spec(
    job_id: str, priority: Priority, request: Resources, *, preemptible: bool = True
) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        priority=priority,
        resources=request,
        tasks=(TaskSpec(index=0, name="0"),),
        preemptible=preemptible,
    )


def _job_view(spec: SubmitJob) -> JobView:
    return JobView(job_id=spec.job_id, spec=spec, submitted_at=NOW, queued=1, total=1)


def _task(job_id: str, request: Resources) -> TaskView:
    return TaskView(job_id=job_id, index=0, request=request)


def _node(name: str, capacity: Resources, free: Resources) -> NodeView:
    return NodeView(name=name, capacity=capacity, free=free, running=1)


def _running(
    job_id: str, request: Resources, priority: Priority, preemptible: bool
) -> tuple[tuple[str, int], RunningView]:
    job = _job_view(_spec(job_id, priority, request, preemptible=preemptible))
    return (job_id, 0), RunningView(job_id=job_id, task=0, request=request, job=job)


FULL_CPU = Resources.of(cores=0, memory="4GiB")


@pytest.mark.parametrize(
    ("waiting_priority", "asked", "victim_priority", "victim_preemptible", "expected"),
    [
        (Priority.CRITICAL, ONE_CPU, Priority.LOW, True, ["low-job"]),
        (Priority.CRITICAL, ONE_CPU, Priority.LOW, False, []),  # never a non-preemptible victim
        (
            Priority.CRITICAL,
            ONE_CPU,
            Priority.CRITICAL,
            True,
            [],
        ),  # critical never preempts critical
        (Priority.HIGH, ONE_CPU, Priority.LOW, True, []),  # only critical preempts by default
        (Priority.CRITICAL, ONE_GPU, Priority.LOW, True, []),  # a GPU task never onto a CPU node
    ],
)
def test_priority_preemption_policy_table(
    waiting_priority: Priority,
    asked: Resources,
    victim_priority: Priority,
    victim_preemptible: bool,
    expected: list[str],
) -> None:
    """Critical work preempts preemptible lower work, only on a node that fits it."""
    waiting = _spec("waiting", waiting_priority, asked)
    farm = FarmView(
        nodes={"cpu-1": _node("cpu-1", CPU, FULL_CPU)},
        jobs={},
        running={
            "cpu-1": dict([_running("low-job", ONE_CPU, victim_priority, victim_preemptible)])
        },
    )
    choices = PriorityPreemptionPolicy().preemptions(
        _job_view(waiting), _task("waiting", asked), farm, NOW
    )
    assert [c.victim_job for c in choices] == expected
    assert all(c.node == "cpu-1" for c in choices)


def test_priority_preemption_prefers_the_node_with_fewest_victims() -> None:
    """Of two nodes that could make room, the one needing fewer preemptions is chosen."""
    half = Resources.of(cores=2, memory="2GiB")
    waiting = _spec("urgent", Priority.CRITICAL, ONE_CPU)
    farm = FarmView(
        nodes={
            "a": _node("a", CPU, Resources.of(cores=0, memory="4GiB")),
            "b": _node("b", CPU, Resources.of(cores=0, memory="4GiB")),
        },
        jobs={},
        running={
            "a": dict(
                [
                    _running("a1", half, Priority.LOW, True),
                    _running("a2", half, Priority.LOW, True),
                ]
            ),
            "b": dict([_running("b1", ONE_CPU, Priority.MEDIUM, True)]),
        },
    )
    choices = PriorityPreemptionPolicy().preemptions(
        _job_view(waiting), _task("urgent", ONE_CPU), farm, NOW
    )
    assert [(c.victim_job, c.node) for c in choices] == [("b1", "b")]


async def test_critical_job_preempts_with_checkpoint_and_the_victim_resumes() -> None:
    """The victim checkpoints and yields, the critical job runs, the victim resumes from it."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    resumed: list[str | None] = []
    started = anyio.Event()

    async def long_render(ctx: AttemptContext) -> None:
        if ctx.resume_from is not None:
            resumed.append(ctx.resume_from)
            return
        started.set()
        await ctx.progress(0.25)
        await ctx.checkpoint_requested.wait()
        await ctx.checkpoint("frame-25")
        await anyio.sleep_forever()  # until the node stops it

    async def quick(ctx: AttemptContext) -> None:
        await ctx.progress(1.0)

    victim = SubmitJob(
        job_id="render",
        name="render",
        priority=Priority.LOW,
        command=("inprocess:long_render",),
        resources=ONE_CPU,
        tasks=(TaskSpec(index=0, name="0"),),
        preemptible=True,
        checkpointable=True,
    )
    urgent = SubmitJob(
        job_id="urgent",
        name="urgent",
        priority=Priority.CRITICAL,
        command=("inprocess:quick",),
        resources=ONE_CPU,
        tasks=(TaskSpec(index=0, name="0"),),
    )
    registry = {"long_render": long_render, "quick": quick}
    async with (
        open_inprocess_executor(registry, clock=clock) as executor,
        open_engine(journal=journal, clock=clock, policy=PriorityPreemptionPolicy()) as engine,
    ):
        await engine.add_node("only", CPU, executor=executor)
        await engine.submit([victim])
        with anyio.fail_after(10):
            await started.wait()
            await engine.submit([urgent])
            assert (await engine.wait_job("urgent")).status == "completed"
            assert (await engine.wait_job("render")).status == "completed"
        render = [r.event for r in await journal.read_stream("job:render")]
        urgent_done = list(await journal.read_stream("job:urgent"))
    assert resumed == ["frame-25"]
    preempted = [e for e in render if isinstance(e, TaskPreempted)]
    assert len(preempted) == 1
    assert preempted[0].node == "only"
    assert [e.reason for e in render if isinstance(e, TaskRequeued)] == ["preempted"]
    assigned = [e for e in render if isinstance(e, TaskAssigned)]
    assert [(a.attempt, a.resume_from) for a in assigned] == [(1, None), (2, "frame-25")]
    # The critical job finished before the victim's second attempt was placed.
    all_events = [r async for batch in journal.read_all() for r in batch]
    urgent_completed = next(
        r.position
        for r in all_events
        if r.stream_id == "job:urgent" and isinstance(r.event, TaskCompleted)
    )
    second_assignment = next(
        r.position
        for r in all_events
        if r.stream_id == "job:render"
        and isinstance(r.event, TaskAssigned)
        and r.event.attempt == 2
    )
    assert urgent_completed < second_assignment
    assert urgent_done
