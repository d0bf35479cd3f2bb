"""Node specialization: job-type match x hardware class x fit x over-provisioning x learned
speed; learned speed is a projection of the journal, rebuilt on restart; every fitting node
class is considered, not only the first candidates found."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actors import (
    AttemptSpec,
    FarmView,
    JobSubmittedObservation,
    JobView,
    NodeView,
    Resources,
    TaskAssigned,
    TaskView,
)
from domains.render_farm import (
    NodeClass,
    RenderFarmPolicy,
    RenderJob,
    RenderMetadata,
    RenderNode,
    parse_farm_config,
)
from domains.render_farm._policy import PATIENCE, PATIENCE_RATIO
from domains.render_farm._simulation import farm_codec, open_simulated_farm
from domains.render_farm._specialization import (
    NodeProfile,
    base_factor,
    fit_factor,
)
from domains.render_farm._speed import SpeedTable
from persistence import InMemoryJournal
from runtime import VirtualClock

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
FX = NodeClass(name="fx", performance=1.0, job_types=("vfx",))
BIG = NodeClass(name="big", performance=1.2, scarce=True)
NODE = Resources.of(cores=16, memory="64GiB")
GPU_NODE = Resources.of(cores=16, memory="64GiB", gpus=2)


def _profile(node_class: NodeClass, labels: frozenset[str] = frozenset()) -> NodeProfile:
    return NodeProfile(
        name="n",
        node_class=node_class,
        type_labels=labels,
        idle_watts=node_class.idle_watts,
        busy_watts=node_class.busy_watts,
        sleep_watts=node_class.sleep_watts,
    )


@pytest.mark.parametrize(
    ("node_class", "labels", "job_type", "class_factor", "node_factor", "expected"),
    [
        (FX, frozenset(), "vfx", None, None, 1.0),  # built for it
        (FX, frozenset(), "animation", None, None, 0.7),  # not built for it
        (NodeClass(name="x"), frozenset({"animation"}), "animation", None, None, 1.0),  # label
        (BIG, frozenset(), "vfx", None, None, 1.2 * 0.7),  # performance prior
        (FX, frozenset(), "animation", 1.5, None, 1.5),  # measured class replaces the prior
        (FX, frozenset(), "vfx", None, 1.25, 1.25),  # measured faster than its class
        (FX, frozenset(), "vfx", None, 0.8, 0.8),  # measured slower
    ],
)
def test_the_node_and_job_type_factors(
    node_class: NodeClass,
    labels: frozenset[str],
    job_type: str,
    class_factor: float | None,
    node_factor: float | None,
    expected: float,
) -> None:
    """Job-type match x hardware class x learned speed (1.0 when unknown)."""
    factor = base_factor(
        job_type=job_type,
        node=_profile(node_class, labels),
        class_factor=class_factor,
        node_factor=node_factor,
        mode="balanced",
    )
    assert factor == pytest.approx(expected)


@pytest.mark.parametrize(
    ("request_", "capacity", "node_class", "mode", "expected"),
    [
        (Resources.of(cores=16, memory="64GiB"), NODE, FX, "balanced", 1.0),  # a perfect fit
        (Resources.of(cores=8, memory="32GiB"), NODE, FX, "balanced", 1 - 0.2 * 0.5),
        (Resources.of(cores=8, memory="32GiB"), NODE, FX, "efficiency", 1 - 0.5 * 0.5),
        (Resources.of(cores=16, memory="64GiB"), GPU_NODE, FX, "balanced", 0.8),  # GPUs idle
        (Resources.of(cores=16, memory="64GiB", gpus=2), GPU_NODE, FX, "balanced", 1.0),
        (Resources.of(cores=4, memory="64GiB"), NODE, BIG, "balanced", (1 - 0.2 * 0.375) * 0.7),
    ],
)
def test_fit_and_over_provisioning(
    request_: Resources, capacity: Resources, node_class: NodeClass, mode: str, expected: float
) -> None:
    """Best fit (packing weighs more in the energy-saving modes); a task without GPUs on a GPU
    node, or a small task on a scarce big node, scores lower."""
    factor = fit_factor(
        request=request_,
        free=capacity,
        capacity=capacity,
        node=_profile(node_class),
        mode=mode,  # type: ignore[arg-type]
    )
    assert factor == pytest.approx(expected)


@pytest.mark.parametrize(
    ("samples", "node", "expected"),
    [
        ([("fast", 0.5), ("a", 1.0), ("b", 1.0)], "fast", "higher"),
        ([("slow", 2.0), ("a", 1.0), ("b", 1.0)], "slow", "lower"),
        ([("a", 1.0), ("b", 1.0)], "c", "same"),
    ],
)
def test_learned_speed_is_a_factor_around_one(
    samples: list[tuple[str, float]], node: str, expected: str
) -> None:
    """A node measured faster than its class scores higher, slower lower, unknown 1.0."""
    table = SpeedTable()
    for name, ratio in samples:
        table.add(name, "vfx", ratio)
    factor = table.node_factor(node, ("a", "b", "c", "fast", "slow"), "vfx")
    if expected == "same":
        assert factor is None
    else:
        assert factor is not None
        assert factor > 1.0 if expected == "higher" else factor < 1.0


CONFIG = parse_farm_config(
    """
[[clients]]
id = "acme"
[[node_classes]]
name = "fx"
watts = { idle = 100, busy = 300 }
job_types = ["vfx"]
[[node_classes]]
name = "general"
watts = { idle = 100, busy = 300 }
job_types = ["animation"]
[previews]
stride = 1
"""
)


def _vfx_view(
    policy: RenderFarmPolicy,
    name: str = "fx-shot",
    priority: str = "medium",
    deadline: datetime | None = None,
) -> tuple[JobView, TaskView]:
    spec = RenderJob(
        name=name,
        priority=priority,
        deadline=deadline,
        client="acme",
        job_type="vfx",
        command=["fx", "{start}"],
        frames=(1, 4),
        frame_estimate=100.0,
        resources=Resources.of(cores=4, memory="8GiB"),
    ).to_spec()
    policy.observe(JobSubmittedObservation(job_id=name, spec=spec, at=NOW))
    view = JobView(
        job_id=name,
        spec=spec,
        submitted_at=NOW,
        total=len(spec.tasks),
        metadata=spec.metadata_as(RenderMetadata),
    )
    task = TaskView(job_id=name, index=0, request=spec.resources, frames=(1, 1))
    return view, task


def _node(name: str, node_class: str = "fx") -> NodeView:
    return NodeView(name=name, capacity=NODE, free=NODE, labels=(f"class={node_class}",))


def test_a_node_with_a_fast_history_for_vfx_outscores_the_same_node_without_history() -> None:
    """Learned speed never lowers a good node: with a fast vfx history (its class measured
    slower) the node scores above the same node with no history at all."""
    fresh = RenderFarmPolicy(CONFIG)
    learned = RenderFarmPolicy(CONFIG)
    for name, ratio in (("n1", 0.5), ("n2", 1.0), ("n3", 1.0)):
        learned.speeds.add(name, "vfx", ratio)
    farm = FarmView(nodes={n: _node(n) for n in ("n1", "n2", "n3")})
    for policy in (fresh, learned):
        policy.cycle_events(farm, NOW)  # the policy sees the farm's nodes and their classes
    view, task = _vfx_view(fresh)
    without = fresh.node_score(view, task, _node("n1"), NOW)
    view, task = _vfx_view(learned)
    with_history = learned.node_score(view, task, _node("n1"), NOW)
    assert without is not None
    assert with_history is not None
    assert with_history > without
    slow = learned.node_score(view, task, _node("n2"), NOW)
    assert slow is not None
    assert slow < with_history


def _task_seconds(node: str, spec: AttemptSpec) -> float:
    return 60.0


async def test_every_fitting_node_class_is_considered_not_only_the_first_found() -> None:
    """Forty nodes of a class not built for vfx join first and one fx node last: the vfx task
    still goes to the fx node (all fitting nodes are scored, not the first 32)."""
    nodes = [RenderNode(name=f"a{i:02d}", node_class="general", cores=16) for i in range(40)]
    nodes.append(RenderNode(name="z-fx", node_class="fx", cores=16))
    policy = RenderFarmPolicy(CONFIG)
    async with open_simulated_farm(policy=policy, nodes=nodes, duration=_task_seconds) as farm:
        view, _ = _vfx_view(policy, "probe")
        await farm.engine.submit([view.spec])
        await farm.engine.wait_job("probe")
        placed = [
            r.event.node
            for r in await farm.journal.read_stream("job:probe")
            if isinstance(r.event, TaskAssigned)
        ]
        assert placed[0] == "z-fx"


async def test_learned_speed_is_rebuilt_from_the_journal_on_restart() -> None:
    """After a restart over the same journal the policy's speed table is the one it had
    learned: it is a projection of the finished frames, not a second truth."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=farm_codec())
    nodes = [RenderNode(name="fast", node_class="fx"), RenderNode(name="slow", node_class="fx")]

    def seconds(node: str, spec: AttemptSpec) -> float:
        return 50.0 if node == "fast" else 150.0

    first = RenderFarmPolicy(CONFIG)
    async with open_simulated_farm(
        policy=first, nodes=nodes, duration=seconds, clock=clock, journal=journal
    ) as farm:
        view, _ = _vfx_view(first, "learn")
        await farm.engine.submit([view.spec])
        await farm.engine.wait_job("learn")
    learned = {k: (v.value, v.samples) for k, v in first.speeds.nodes.items()}
    assert {node for node, _ in learned} == {"fast", "slow"}
    second = RenderFarmPolicy(CONFIG)
    async with open_simulated_farm(
        policy=second, nodes=nodes, duration=seconds, clock=clock, journal=journal
    ) as farm:
        rebuilt = {k: (v.value, v.samples) for k, v in second.speeds.nodes.items()}
        assert rebuilt == learned
        second.cycle_events(farm.engine.core.farm, clock.now())  # as the next cycle does
        fast = second.learned_factor("fast", "vfx")
        assert fast is not None
        assert fast > 1.0


PATIENT = parse_farm_config(
    """
[[clients]]
id = "acme"
[[node_classes]]
name = "fx"
performance = 2.0
watts = { idle = 100, busy = 300 }
job_types = ["vfx"]
[[node_classes]]
name = "general"
watts = { idle = 100, busy = 300 }
job_types = ["animation"]
[previews]
stride = 1
"""
)


@pytest.mark.parametrize(
    ("priority", "waited", "takes_the_slow_node"),
    [
        ("medium", 0.0, False),  # a class 2.9x better for vfx exists: wait for it
        ("medium", PATIENCE - 1, False),
        ("medium", PATIENCE, True),  # waited long enough: take what there is
        ("critical", 0.0, True),  # critical work never waits for a better node
        ("at risk", 0.0, True),  # nor work at deadline risk
    ],
)
def test_a_job_waits_a_while_for_a_much_faster_class_before_taking_a_slow_node(
    priority: str, waited: float, takes_the_slow_node: bool
) -> None:
    """Delay scheduling: a vfx task refuses a node of a class far slower at vfx (by more than
    PATIENCE_RATIO) for up to PATIENCE seconds, unless it is critical or at deadline risk; the
    fast class is always acceptable."""
    policy = RenderFarmPolicy(PATIENT)
    farm = FarmView(nodes={"f1": _node("f1", "fx"), "g1": _node("g1", "general")})
    policy.cycle_events(farm, NOW)
    if priority == "at risk":
        # 4 frames of 100 s and a 2 h margin: due in an hour, it is at risk.
        view, task = _vfx_view(policy, deadline=NOW + timedelta(hours=1))
        policy.rank(view, FarmView(nodes=farm.nodes, jobs={view.job_id: view}), NOW)
        assert "at risk" in policy.describe(view, NOW)["effective priority"]
    else:
        view, task = _vfx_view(policy, priority=priority)
    assert policy.node_score(view, task, farm.nodes["f1"], NOW) is not None
    first = policy.node_score(view, task, farm.nodes["g1"], NOW)
    assert (first is not None) == (priority in ("critical", "at risk"))
    later = NOW + timedelta(seconds=waited)
    score = policy.node_score(view, task, farm.nodes["g1"], later)
    assert (score is not None) == takes_the_slow_node
    if not takes_the_slow_node:
        # A cycle runs when the patience runs out (the placement has nothing else to wake it).
        just_before = NOW + timedelta(seconds=PATIENCE - 1)
        assert policy.next_wakeup(just_before) == NOW + timedelta(seconds=PATIENCE)


def test_a_class_only_somewhat_slower_is_taken_at_once() -> None:
    """No waiting when the best class is less than PATIENCE_RATIO times better (vfx on a class
    not built for it scores 0.7 of one built for it)."""
    policy = RenderFarmPolicy(CONFIG)
    farm = FarmView(nodes={"f1": _node("f1", "fx"), "g1": _node("g1", "general")})
    policy.cycle_events(farm, NOW)
    view, task = _vfx_view(policy)
    assert PATIENCE_RATIO > 1.0 / 0.7
    assert policy.node_score(view, task, farm.nodes["g1"], NOW) is not None


@pytest.mark.parametrize(
    ("mode", "busy_watts", "expected"),
    [
        ("balanced", 150.0, 1.0),  # only the energy-saving modes look at the watts
        ("performance", 150.0, 1.0),
        ("efficiency", 200.0, 1.5**0.5),  # fewer watts than the reference: scores higher
        ("night-savings", 600.0, 0.5**0.5),  # twice: lower
        ("efficiency", 30.0, 1.3),  # bounded: power never outweighs speed
        ("efficiency", 3000.0, 0.7),
    ],
)
def test_the_energy_saving_modes_prefer_nodes_that_do_more_per_watt(
    mode: str, busy_watts: float, expected: float
) -> None:
    """Against a 300 W reference, a node's factor is sqrt(reference / its watts per unit of
    performance) in efficiency and night-savings, between 0.7 and 1.3; 1.0 otherwise."""
    node_class = NodeClass(name="x", busy_watts=busy_watts, job_types=("vfx",))
    factor = base_factor(
        job_type="vfx",
        node=_profile(node_class),
        class_factor=None,
        node_factor=None,
        mode=mode,  # type: ignore[arg-type]
        reference_watts=300.0,
    )
    assert factor == pytest.approx(expected)
