"""Placement without I/O: the FIFO-within-priority policy, best fit, GPU placement, blocklists,
and the fit index checked against a brute-force scan in a seeded random scenario."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from actors import (
    Failure,
    FarmView,
    FifoPolicy,
    JobView,
    NodeView,
    Outcome,
    Priority,
    Resources,
    SubmitJob,
    TaskSpec,
    TaskView,
    fits,
)
from actors.engine import SchedulerCore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ONE = Resources.of(cores=1, memory="1GiB")
GPU_TASK = Resources.of(cores=1, memory="1GiB", gpus=1, gpu_memory="8GiB")
GPU_NODE = Resources.of(cores=8, memory="32GiB", gpus=2, gpu_memory="16GiB")


def spec(
    job_id: str,
    *,
    priority: Priority = Priority.MEDIUM,
    tasks: int = 1,
    request: Resources = ONE,
) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        priority=priority,
        command=("inprocess:ok",),
        resources=request,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
    )


def core_with(nodes: dict[str, Resources]) -> SchedulerCore:
    core = SchedulerCore(FifoPolicy())
    for name, capacity in nodes.items():
        core.add_node(name, capacity)
    return core


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- ranking ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("submitted", "expected"),
    [
        pytest.param(
            [
                ("l", "low", 0),
                ("c", "critical", 0),
                ("b", "background", 0),
                ("h", "high", 0),
                ("m", "medium", 0),
            ],
            ["c", "h", "m", "l", "b"],
            id="by-rank-not-by-name",
        ),
        pytest.param(
            [("x", "medium", 3), ("y", "medium", 1), ("z", "medium", 2)],
            ["y", "z", "x"],
            id="fifo-within-priority",
        ),
        pytest.param(
            [("b", "high", 5), ("c", "high", 5), ("a", "high", 5)],
            ["a", "b", "c"],
            id="equal-times-by-id",
        ),
        pytest.param(
            [("early", "low", 0), ("late", "high", 100)],
            ["late", "early"],
            id="priority-before-age",
        ),
        pytest.param(
            [("z-old", "medium", 1), ("a-new", "medium", 2)],
            ["z-old", "a-new"],
            id="time-before-id",
        ),
    ],
)
def test_fifo_policy_places_jobs_in_rank_order(
    submitted: list[tuple[str, str, float]], expected: list[str]
) -> None:
    """Critical before low by rank, then submission time, then id (never alphabetically)."""
    core = core_with({"big": Resources.of(cores=64, memory="64GiB")})
    for job_id, priority, seconds in submitted:
        core.add_job(spec(job_id, priority=Priority(priority)), submitted_at=at(seconds))
    placements = core.place(at(1000))
    assert [p.job_id for p in placements] == expected


def test_only_the_top_ranked_job_gets_the_last_slot() -> None:
    """With room for one task, the critical job wins over an older low-priority one."""
    core = core_with({"one": ONE})
    core.add_job(spec("old-low", priority=Priority.LOW), submitted_at=at(0))
    core.add_job(spec("new-critical", priority=Priority.CRITICAL), submitted_at=at(50))
    [placement] = core.place(at(100))
    assert placement.job_id == "new-critical"
    assert core.place(at(101)) == []
    core.task_ended("new-critical", 0, outcome=Outcome.SUCCEEDED)
    [placement] = core.place(at(102))
    assert placement.job_id == "old-low"


def test_tasks_of_one_job_are_placed_in_index_order() -> None:
    """Within a job, runnable tasks go out in index order."""
    core = core_with({"big": Resources.of(cores=8, memory="8GiB")})
    core.add_job(spec("a", tasks=5), submitted_at=T0)
    assert [p.task for p in core.place(T0)] == [0, 1, 2, 3, 4]


def test_the_rank_never_changes_with_time() -> None:
    """FIFO ranks are a pure function of the job: nothing climbs from cycle to cycle."""
    policy = FifoPolicy()
    view = JobView(job_id="a", spec=spec("a", priority=Priority.LOW), submitted_at=T0, total=1)
    farm = FarmView()
    assert policy.rank(view, farm, at(0)) == policy.rank(view, farm, at(86_400))
    assert policy.explain_rank(view, T0).startswith("priority low (FIFO within priority")


# -- node choice --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (Resources.of(cores=1, memory="1GiB"), "small"),
        (Resources.of(cores=3, memory="1GiB"), "mid"),
        (Resources.of(cores=3, memory="12GiB"), "big"),
        (Resources.of(cores=12, memory="1GiB"), "big"),
    ],
)
def test_best_fit_picks_the_tightest_node(request_: Resources, expected: str) -> None:
    """The node the task leaves least free wins; big nodes stay free for big work."""
    core = core_with(
        {
            "big": Resources.of(cores=16, memory="64GiB"),
            "small": Resources.of(cores=2, memory="4GiB"),
            "mid": Resources.of(cores=4, memory="8GiB"),
        }
    )
    core.add_job(spec("a", request=request_), submitted_at=T0)
    [placement] = core.place(T0)
    assert placement.node == expected


def test_a_gpu_task_never_goes_to_a_cpu_only_node() -> None:
    """With only CPU nodes, however big, a GPU task waits and ``why`` names the GPUs."""
    core = core_with({"cpu-a": Resources.of(cores=64, memory="256GiB"), "cpu-b": ONE})
    core.add_job(spec("render", request=GPU_TASK), submitted_at=T0)
    assert core.place(T0) == []
    why = core.why("render", T0)
    assert any("gpus: needs 1, has 0" in line for line in why)
    core.add_node("gpu", GPU_NODE)
    [placement] = core.place(T0)
    assert placement.node == "gpu"


def test_a_cpu_task_prefers_a_cpu_node_over_a_gpu_node() -> None:
    """Best fit weighs GPUs most: CPU work keeps the GPU node free even if it is tighter."""
    core = core_with({"gpu": GPU_NODE, "cpu": Resources.of(cores=16, memory="64GiB")})
    core.add_job(spec("a"), submitted_at=T0)
    [placement] = core.place(T0)
    assert placement.node == "cpu"


def test_gpu_memory_per_device_must_fit() -> None:
    """A task asking for more GPU memory per device than a node has does not go there."""
    core = core_with(
        {"small-gpu": Resources.of(cores=8, memory="32GiB", gpus=4, gpu_memory="4GiB")}
    )
    core.add_job(spec("a", request=GPU_TASK), submitted_at=T0)
    assert core.place(T0) == []
    assert any("gpu_memory" in line for line in core.why("a", T0))


def test_the_fifo_score_prefers_a_node_other_than_the_one_a_retry_failed_on() -> None:
    """Two equal nodes: the one the task last failed on scores lower."""
    policy = FifoPolicy()
    job = JobView(
        job_id="a", spec=spec("a"), submitted_at=T0, running=0, queued=1, completed=0, total=1
    )
    task = TaskView(job_id="a", index=0, request=ONE, attempt=1, failures=1, last_node="n1")
    capacity = Resources.of(cores=4, memory="8GiB")

    def node(name: str) -> NodeView:
        return NodeView(
            name=name, capacity=capacity, free=capacity, labels=(), running=0, health="online"
        )

    n1, n2 = (
        policy.node_score(job, task, node("n1"), T0),
        policy.node_score(job, task, node("n2"), T0),
    )
    assert n1 is not None
    assert n2 is not None
    assert n2 > n1


def test_a_retry_waits_for_its_backoff_and_avoids_its_failed_node() -> None:
    """A requeued task with ``retry_at`` is not placed before it, then goes to the other node."""
    core = core_with({"n1": ONE, "n2": ONE})
    core.add_job(spec("a"), submitted_at=T0)
    [first] = core.place(T0)
    failure = Failure(kind="exit_code", node=first.node, attempt=1, exit_code=1)
    core.task_ended("a", 0, outcome=None, retry_at=at(30), failure=failure)
    assert core.place(at(29)) == []
    assert any("retry backoff until" in line for line in core.why("a", at(29)))
    assert core.wakeups(at(29)) == [at(30)]
    [second] = core.place(at(30))
    assert second.node != first.node


def test_a_blocklisted_node_is_avoided_until_the_blocklist_expires() -> None:
    """A job skips a node it blocklisted, and uses it again once ``until`` has passed."""
    core = core_with({"n1": ONE})
    core.add_job(spec("a"), submitted_at=T0)
    core.block_node("a", "n1", at(600))
    assert core.place(at(1)) == []
    assert any("blocklisted" in line for line in core.why("a", at(1)))
    assert core.wakeups(at(1)) == [at(600)]
    [placement] = core.place(at(600))
    assert placement.node == "n1"


@pytest.mark.parametrize("health", ["draining", "sleeping", "quarantined"])
def test_only_online_nodes_get_work(health: str) -> None:
    """A draining, sleeping or quarantined node gets nothing; back online, it does."""
    core = core_with({"n1": ONE})
    core.set_health("n1", health)
    core.add_job(spec("a"), submitted_at=T0)
    assert core.place(T0) == []
    assert any(f"no node is online (nodes are {health})" in line for line in core.why("a", T0))
    core.set_health("n1", "online")
    assert [p.node for p in core.place(T0)] == ["n1"]


@pytest.mark.parametrize("reachable", ["unreachable", "offline"])
def test_only_connected_nodes_get_work(reachable: str) -> None:
    """An unreachable or offline node gets nothing, and ``why`` names its state."""
    core = core_with({"n1": ONE})
    core.set_reachable("n1", reachable)
    core.add_job(spec("a"), submitted_at=T0)
    assert core.place(T0) == []
    assert any(f"(nodes are {reachable})" in line for line in core.why("a", T0))
    core.set_reachable("n1", "connected")
    assert [p.node for p in core.place(T0)] == ["n1"]


# -- submission checks --------------------------------------------------------------------------


def test_a_submission_no_node_could_ever_fit_is_rejected_naming_the_shortfall() -> None:
    """check_submission names the largest node and what it lacks; offline nodes still count."""
    core = core_with({"gpu": GPU_NODE, "cpu": Resources.of(cores=2, memory="4GiB")})
    core.set_reachable("gpu", "offline")
    core.check_submission([spec("ok", request=GPU_TASK)])
    with pytest.raises(Exception, match="lacks gpus: needs 3, has 2"):
        core.check_submission([spec("too-many", request=Resources.of(cores=1, gpus=3))])


# -- the fit index ------------------------------------------------------------------------------


SHAPES = [
    Resources.of(cores=1, memory="1GiB"),
    Resources.of(cores=2, memory="4GiB"),
    Resources.of(cores=4, memory="16GiB"),
    Resources.of(cores="500m", memory="512MiB"),
    Resources.of(cores=1, memory="2GiB", gpus=1, gpu_memory="8GiB"),
    Resources.of(cores=2, memory="8GiB", gpus=2, gpu_memory="16GiB"),
    Resources.of(cores=1, counters={"nuke": 1}),
]
CAPACITIES = [
    Resources.of(cores=2, memory="4GiB"),
    Resources.of(cores=8, memory="32GiB"),
    Resources.of(cores=16, memory="64GiB", gpus=2, gpu_memory="16GiB"),
    Resources.of(cores=4, memory="16GiB", gpus=4, gpu_memory="8GiB"),
    Resources.of(cores=4, memory="8GiB", counters={"nuke": 2}),
]
HEALTHS = ["online", "online", "online", "draining", "sleeping", "quarantined"]
REACHABLE = ["connected", "connected", "unreachable", "offline"]


def check_index(core: SchedulerCore) -> None:
    """Compare the incremental fit index and node books with a brute-force scan."""
    nodes = {name: node.view for name, node in core._nodes.items()}
    queued = {job.keys[index] for job in core._jobs.values() for index in job.ready}
    assert set(core._fit_index) == queued
    for (request, requires), members in core._fit_index.items():
        brute = {
            name
            for name, node in nodes.items()
            if node.accepts_work and fits(request, node.free) and not node.satisfies(requires)
        }
        assert set(members) == brute, request
    for name, node in nodes.items():
        free = node.capacity
        used = [running.request for running in core._nodes[name].running.values()]
        for request in used:
            assert fits(request, free), f"{node.name} is overcommitted"
            free = Resources(
                millicores=free.millicores - request.millicores,
                memory=free.memory - request.memory,
                gpus=free.gpus - request.gpus,
                gpu_memory=free.gpu_memory,
                scratch=free.scratch - request.scratch,
                counters=tuple(
                    (name, count - request.counter(name)) for name, count in free.counters
                ),
            )
        assert node.free == free, node.name
    for job in core._jobs.values():
        assert job.view.running == len(job.running)
        assert job.view.queued == len(job.ready)
        for index, node_name in job.running.items():
            assert (job.view.job_id, index) in core._nodes[node_name].running
            assert index not in job.ready


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fit_index_matches_a_brute_force_scan_through_random_operations(seed: int) -> None:
    """Thousands of random placements, releases, requeues, health changes and job ends."""
    rng = random.Random(seed)
    core = SchedulerCore(FifoPolicy())
    now = T0
    jobs = 0
    placed = 0
    for _ in range(3000):
        now += timedelta(seconds=1)
        running = [(job.view.job_id, index) for job in core._jobs.values() for index in job.running]
        op = rng.random()
        if op < 0.08 or not core._nodes:
            core.add_node(f"n{len(core._nodes)}", rng.choice(CAPACITIES))
        elif op < 0.25:
            jobs += 1
            core.add_job(
                spec(f"j{jobs}", tasks=rng.randint(1, 6), request=rng.choice(SHAPES)),
                submitted_at=now,
            )
        elif op < 0.50:
            placed += len(core.place(now, limit=rng.choice([None, 1, 5])))
        elif op < 0.75 and running:
            job_id, index = rng.choice(running)
            if rng.random() < 0.7:
                core.task_ended(job_id, index, outcome=Outcome.SUCCEEDED)
            else:
                retry = now + timedelta(seconds=rng.randint(0, 5))
                failure = Failure(kind="exit_code", node=None, attempt=1, exit_code=1)
                core.task_ended(job_id, index, outcome=None, retry_at=retry, failure=failure)
        elif op < 0.80:
            core.set_health(rng.choice(sorted(core._nodes)), rng.choice(HEALTHS))
        elif op < 0.85:
            core.set_reachable(rng.choice(sorted(core._nodes)), rng.choice(REACHABLE))
        elif op < 0.90 and running:
            core.unplace(*rng.choice(running))  # a job refused its placement
        elif core._jobs:
            core.job_ended(rng.choice(sorted(core._jobs)), Outcome.CANCELLED)
        check_index(core)
    assert placed > 200  # the scenario really placed work
