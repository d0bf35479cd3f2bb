"""Preemption: only onto a node that fits the waiting task, only of preemptible victims;
critical beats non-critical; otherwise only a job at deadline risk over lower effective
priority; the victim checkpoints and yields, and preemptions are counted and shown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors import (
    AttemptSpec,
    FarmView,
    JobSubmittedObservation,
    JobView,
    NodeView,
    Priority,
    Resources,
    RunningView,
    TaskPreempted,
    TaskView,
)
from domains.render_farm import (
    RenderFarmPolicy,
    RenderJob,
    RenderMetadata,
    RenderNode,
    parse_farm_config,
)
from domains.render_farm._preemption import Victim, choose_victims
from domains.render_farm._simulation import open_simulated_farm

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CPU = Resources.of(cores=8, memory="32GiB")
GPU = Resources.of(cores=8, memory="16GiB", gpus=1)
HALF = Resources.of(cores=4, memory="8GiB")
CONFIG = parse_farm_config("[[clients]]\nid = 'acme'\n[previews]\nstride = 1\n")


def _victim(job: str, node: str, level: int, *, minutes_ago: int = 10) -> Victim:
    return Victim(
        job_id=job,
        task=0,
        node=node,
        request=HALF,
        level=level,
        client="acme",
        started_at=NOW - timedelta(minutes=minutes_ago),
    )


def _nodes(**shapes: Resources) -> dict[str, NodeView]:
    return {
        name: NodeView(name=name, capacity=shape, free=Resources(), labels=())
        for name, shape in shapes.items()
    }


def test_a_gpu_task_never_preempts_onto_a_cpu_only_node() -> None:
    """The only victims run on a CPU-only node: a GPU task finds nothing to preempt."""
    nodes = _nodes(cpu=CPU)
    running = {"cpu": [_victim("low", "cpu", 1), _victim("low2", "cpu", 1)]}
    found = choose_victims(GPU, (), nodes, lambda n: running.get(n, []), lambda v: True)
    assert found is None
    nodes = _nodes(cpu=CPU, gpu=GPU)
    gpu_half = Resources.of(cores=4, memory="8GiB", gpus=1)
    running["gpu"] = [
        Victim(job_id="low3", task=0, node="gpu", request=gpu_half, level=1, client="acme"),
        _victim("low4", "gpu", 1),
    ]
    found = choose_victims(GPU, (), nodes, lambda n: running.get(n, []), lambda v: True)
    assert found is not None
    assert found[0] == "gpu"


@pytest.mark.parametrize(
    ("wanted", "running", "eligible", "expected"),
    [
        # a whole node: two half victims on a, one whole victim on b -> b (fewest)
        (CPU, {"a": [("x", 1, HALF), ("y", 1, HALF)], "b": [("z", 2, CPU)]}, "xyz", ("b", "z")),
        # equal counts: the node whose victims are lowest
        (HALF, {"a": [("x", 2, HALF), ("y", 2, HALF)], "b": [("z", 1, CPU)]}, "xyz", ("b", "z")),
        # on a node, the lowest level goes first
        (HALF, {"a": [("x", 2, HALF), ("y", 1, HALF)]}, "xy", ("a", "y")),
        # never an ineligible victim
        (HALF, {"a": [("x", 3, HALF), ("y", 3, HALF)]}, "", None),
        # not enough eligible room on any node
        (CPU, {"a": [("x", 1, HALF), ("y", 3, HALF)]}, "x", None),
    ],
)
def test_victims_are_chosen_lowest_first_on_the_node_needing_fewest(
    wanted: Resources,
    running: dict[str, list[tuple[str, int, Resources]]],
    eligible: str,
    expected: tuple[str, str] | None,
) -> None:
    """Fewest victims, then the lowest victims, then the name; never an ineligible one."""
    nodes = {
        name: NodeView(name=name, capacity=CPU, free=Resources(), labels=()) for name in running
    }
    victims = {
        node: [
            Victim(job_id=job, task=0, node=node, request=request, level=level, client="acme")
            for job, level, request in jobs
        ]
        for node, jobs in running.items()
    }
    found = choose_victims(
        wanted, (), nodes, lambda n: victims.get(n, []), lambda v: v.job_id in eligible
    )
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert (found[0], "".join(v.job_id for v in found[1])) == expected


def _job(
    policy: RenderFarmPolicy,
    name: str,
    priority: Priority,
    *,
    deadline: datetime | None = None,
    request: Resources = HALF,
    frames: int = 4,
) -> JobView:
    spec = RenderJob(
        name=name,
        client="acme",
        command=["render", "{start}"],
        frames=(1, frames),
        frame_estimate=3600.0,
        priority=priority,
        deadline=deadline,
        resources=request,
    ).to_spec()
    policy.observe(JobSubmittedObservation(job_id=name, spec=spec, at=NOW))
    return JobView(
        job_id=name,
        spec=spec,
        submitted_at=NOW,
        total=len(spec.tasks),
        queued=len(spec.tasks),
        metadata=spec.metadata_as(RenderMetadata),
    )


def _busy_farm(victim: JobView, *waiting: JobView) -> FarmView:
    node = NodeView(name="n1", capacity=CPU, free=Resources(), labels=())
    running = {
        ("victim", i): RunningView(
            job_id="victim", task=i, request=HALF, node="n1", started_at=NOW, job=victim
        )
        for i in range(2)
    }
    victim.running = 2
    return FarmView(
        nodes={"n1": node},
        jobs={j.job_id: j for j in (victim, *waiting)},
        running={"n1": running},
        placements={"victim": {0: "n1", 1: "n1"}},
    )


@pytest.mark.parametrize(
    ("waiting", "victim", "preempts"),
    [
        ((Priority.CRITICAL, None), Priority.HIGH, True),  # critical beats non-critical
        ((Priority.CRITICAL, None), Priority.CRITICAL, False),
        ((Priority.HIGH, 1.0), Priority.MEDIUM, True),  # at risk, higher effective
        ((Priority.HIGH, 100.0), Priority.MEDIUM, False),  # not at risk
        ((Priority.MEDIUM, 1.0), Priority.MEDIUM, False),  # at risk but lifted only to high
    ],
)
def test_who_may_preempt_whom(
    waiting: tuple[Priority, float | None], victim: Priority, preempts: bool
) -> None:
    """Critical beats non-critical; otherwise only a job at deadline risk preempts attempts of
    lower effective priority."""
    policy = RenderFarmPolicy(CONFIG)
    priority, hours = waiting
    deadline = NOW + timedelta(hours=hours) if hours is not None else None
    urgent = _job(policy, "urgent", priority, deadline=deadline)
    running = _job(policy, "victim", victim)
    if priority is Priority.MEDIUM:
        running = _job(policy, "victim", Priority.HIGH)  # the lifted job meets its equal
    farm = _busy_farm(running, urgent)
    for view in farm.jobs.values():
        policy.rank(view, farm, NOW)
    task = TaskView(job_id="urgent", index=0, request=HALF)
    chosen = policy.preemptions(urgent, task, farm, NOW)
    assert bool(chosen) is preempts
    if preempts:
        assert [(p.victim_job, p.node) for p in chosen] == [("victim", "n1")]


def test_a_victim_that_is_not_preemptible_is_left_alone() -> None:
    """A job submitted with ``preemptible = false`` never yields, even to a critical job."""
    policy = RenderFarmPolicy(CONFIG)
    urgent = _job(policy, "urgent", Priority.CRITICAL)
    running = _job(policy, "victim", Priority.LOW)
    running.spec = msgspec.structs.replace(running.spec, preemptible=False)
    farm = _busy_farm(running, urgent)
    task = TaskView(job_id="urgent", index=0, request=HALF)
    assert not policy.preemptions(urgent, task, farm, NOW)


async def test_a_critical_job_preempts_and_the_victim_resumes_and_counts_it() -> None:
    """On a full farm a critical job makes a low job checkpoint and yield; the victim resumes
    later, finishes, and its preemptions are counted and shown in ``status``."""
    policy = RenderFarmPolicy(CONFIG)

    def seconds(node: str, spec: AttemptSpec) -> float:
        return 3600.0 if spec.job_id == "low" else 600.0

    nodes = [RenderNode(name="n1", cores=8, memory="32GiB")]
    async with open_simulated_farm(policy=policy, nodes=nodes, duration=seconds) as farm:
        engine = farm.engine
        farm.clock.activity.acquire()
        low = _job(policy, "low", Priority.LOW, frames=2)
        await engine.submit([low.spec])
        urgent = _job(policy, "urgent", Priority.CRITICAL, frames=1)
        farm.clock.activity.release()
        await farm.clock.sleep(60)
        await engine.submit([urgent.spec])
        done = await engine.wait_job("urgent")
        assert done.status == "completed"
        live = (await engine.status("low"))[0]
        assert live.domain.get("preemptions") == "1"
        finished = await engine.wait_job("low")
        assert finished.status == "completed"
        yielded = [
            r.event
            for r in await farm.journal.read_stream("job:low")
            if isinstance(r.event, TaskPreempted)
        ]
        assert len(yielded) == 1
        assert "critical job urgent" in yielded[0].reason
