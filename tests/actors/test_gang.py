"""Multi-node (gang) tasks: placed all or nothing, not starved by small work, launched on every
rank (or the leader only), and ended everywhere when any rank fails or its node is lost."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from engine_farm import job, open_farm

from actors import (
    FifoPolicy,
    Priority,
    Resources,
    RetryPolicy,
    SpecError,
    SubmitJob,
    TaskAssigned,
    TaskFailed,
    TaskRequeued,
    TaskSpec,
)
from actors.engine import SchedulerCore

NODE = Resources.of(cores=32, memory="64GiB")
HALF = Resources.of(cores=16, memory="32GiB")
WHOLE = Resources.of(cores=32, memory="64GiB")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def gang(job_id: str, nodes: int, *, priority: Priority = Priority.MEDIUM) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        priority=priority,
        command=("inprocess:ok",),
        resources=WHOLE,
        tasks=(TaskSpec(index=0, name="coupled"),),
        nodes=nodes,
    )


def small(job_id: str, tasks: int, *, priority: Priority = Priority.LOW) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        priority=priority,
        command=("inprocess:ok",),
        resources=HALF,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
    )


def core_with(count: int) -> SchedulerCore:
    core = SchedulerCore(FifoPolicy())
    for number in range(count):
        core.add_node(f"n{number}", NODE)
    return core


def test_a_gang_is_placed_on_n_distinct_nodes_all_or_nothing() -> None:
    """2 x 32 cores goes to two whole nodes at once; with one free node it is not half-placed."""
    core = core_with(3)
    core.add_job(small("busy", 2), submitted_at=T0)
    [one, two] = core.place(T0)
    assert one.node == two.node  # best fit packs the small work on one node
    core.add_job(gang("climate", 2), submitted_at=T0)
    [placement] = core.place(T0)
    assert len(placement.nodes) == 2
    assert len(set(placement.nodes)) == 2
    assert one.node not in placement.nodes
    core.add_job(gang("second", 2), submitted_at=T0)
    assert core.place(T0) == []  # no two whole nodes are free: nothing is reserved for it
    assert core.statistics()["running"] == 3


def test_a_waiting_gang_holds_freed_nodes_so_small_work_cannot_starve_it() -> None:
    """A high gang waits for 2 nodes; a node freed meanwhile is held for it, not refilled by
    the stream of low-priority small tasks, and why says so."""
    core = core_with(2)
    core.add_job(small("stream", 100), submitted_at=T0)
    first = core.place(T0)
    assert len(first) == 4  # two per node
    core.add_job(gang("urgent", 2, priority=Priority.HIGH), submitted_at=T0)
    for placement in first[:2]:  # node one frees up
        core.task_ended("stream", placement.task, outcome=None)
    freed = first[0].node
    assert core.place(T0) == []  # the freed node is held, not refilled
    assert any("holding 1 of 2" in line for line in core.why("urgent", T0))
    for placement in first[2:]:
        core.task_ended("stream", placement.task, outcome=None)
    [placement] = core.place(T0)
    assert placement.job_id == "urgent"
    assert freed in placement.nodes


def test_a_gang_no_farm_could_fit_is_refused_naming_why() -> None:
    """Asking 3 nodes of a 2-node farm is refused at submission."""
    core = core_with(2)
    with pytest.raises(SpecError, match="needs 3 nodes at once and only 2"):
        core.check_submission([gang("too-big", 3)])


async def test_every_rank_runs_and_the_attempt_completes_once() -> None:
    """launch "all": each node runs its rank; the journal has one assignment naming both."""
    async with open_farm({"a": NODE, "b": NODE, "c": NODE}) as farm:
        await farm.engine.submit([job("g", resources=WHOLE, nodes=2)])
        assert (await farm.wait("g")).status == "completed"
        runs = farm.works.of("g")
        assert sorted(r.rank for r in runs) == [0, 1]
        assert len({r.node for r in runs}) == 2
        [assigned] = [e for e in await farm.events("g") if isinstance(e, TaskAssigned)]
        assert len(assigned.nodes) == 2
        assert {r.node for r in runs} == set(assigned.nodes)


async def test_launch_leader_runs_the_command_on_the_first_node_only() -> None:
    """launch "leader" (mpirun -hostfile): one process, but both nodes are held for it."""
    async with open_farm({"a": NODE, "b": NODE}) as farm:
        await farm.engine.submit(
            [job("g", "block", "x", resources=WHOLE, nodes=2, launch="leader")]
        )
        await farm.works.wait_until(lambda: bool(farm.works.of("g")))
        [run] = farm.works.of("g")
        assert run.rank == 0
        assert len(run.hosts) == 2
        assert [n.running for n in await farm.engine.nodes()] == [1, 1]
        farm.works.open("x")
        assert (await farm.wait("g")).status == "completed"


async def test_a_failing_rank_ends_the_whole_attempt_everywhere() -> None:
    """Rank 1 fails: the attempt fails as one (rank 0 is stopped), and the retry runs as one."""
    async with open_farm({"a": NODE, "b": NODE}) as farm:
        spec = job(
            "g",
            "rank_fails_once",
            resources=WHOLE,
            nodes=2,
            retries=RetryPolicy(max_attempts=2, backoff=0),
        )
        await farm.engine.submit([spec])
        assert (await farm.wait("g")).status == "completed"
        first = [r for r in farm.works.of("g") if r.attempt == 1]
        assert {r.rank for r in first} == {0, 1}
        assert next(r for r in first if r.rank == 0) in farm.works.cancelled
        failed = [e for e in await farm.events("g") if isinstance(e, TaskFailed)]
        assert len(failed) == 1
        assert "rank 1" in (failed[0].error or "")


async def test_losing_a_member_node_requeues_the_attempt_as_one() -> None:
    """A member's node goes away: the attempt is lost (no attempt spent), every rank stops,
    and it runs again on two nodes."""
    async with open_farm({"a": NODE, "b": NODE, "c": NODE}) as farm:
        await farm.engine.submit(
            [
                job(
                    "g",
                    "block_first",
                    "x",
                    resources=WHOLE,
                    nodes=2,
                    retries=RetryPolicy(max_attempts=1),
                )
            ]
        )
        await farm.works.wait_until(lambda: len(farm.works.of("g")) == 2)
        member = next(r for r in farm.works.of("g") if r.rank == 1)
        await farm.engine.remove_node(member.node, reason="power supply died")
        assert (await farm.wait("g")).status == "completed"
        leader = next(r for r in farm.works.of("g") if r.rank == 0 and r.attempt == 1)
        assert leader in farm.works.cancelled
        second = [r for r in farm.works.of("g") if r.attempt == 2]
        assert len(second) == 2
        assert member.node not in {r.node for r in second}
        requeued = [e for e in await farm.events("g") if isinstance(e, TaskRequeued)]
        assert [e.lost for e in requeued] == [True]
        assert not farm.engine.core.statistics()["running"]
