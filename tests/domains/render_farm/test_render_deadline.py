"""Deadline-driven priority: recomputed from scratch each cycle (never ratchets), transitions
journaled, order by effective priority then earliest deadline, inheritance both ways."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors import (
    FarmView,
    JobAmended,
    JobSubmittedObservation,
    JobView,
    NodeView,
    Priority,
    Resources,
    job_stream,
)
from domains.render_farm import (
    PriorityChanged,
    RenderFarmPolicy,
    RenderJob,
    RenderMetadata,
    RenderNode,
    parse_farm_config,
)
from domains.render_farm._deadline import (
    Level,
    deadline_level,
    inherited_levels,
    order_key,
    remaining_seconds,
    verdict,
)
from domains.render_farm._simulation import open_simulated_farm
from runtime import ConfigurationError, TaskfarmError, VirtualClock

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
H = 3600.0
CONFIG = parse_farm_config("[[clients]]\nid = 'acme'\n[[clients]]\nid = 'blue'\n")
NODE = Resources.of(cores=4, memory="16GiB")


@pytest.mark.parametrize(
    ("base", "hours_left", "remaining_h", "expected", "at_risk"),
    [
        (Priority.LOW, 20, 1, Priority.MEDIUM, False),  # < 24 h
        (Priority.LOW, 40, 1, Priority.MEDIUM, False),  # < 48 h
        (Priority.LOW, 60, 1, Priority.LOW, False),
        (Priority.MEDIUM, 20, 1, Priority.HIGH, False),
        (Priority.MEDIUM, 40, 1, Priority.MEDIUM, False),  # only low is lifted under 48 h
        (Priority.HIGH, 20, 1, Priority.HIGH, False),
        (Priority.MEDIUM, 3, 1, Priority.HIGH, True),  # R + M = 3 h >= T
        (Priority.LOW, 30, 29, Priority.MEDIUM, True),  # at risk: one level, not two
        (Priority.HIGH, 1, 5, Priority.HIGH, True),  # a deadline never lifts to critical
        (Priority.CRITICAL, 1, 5, Priority.CRITICAL, True),
        (Priority.BACKGROUND, 1, 5, Priority.LOW, True),
        (Priority.BACKGROUND, 20, 1, Priority.BACKGROUND, False),
        (Priority.MEDIUM, -2, 1, Priority.HIGH, True),  # already late
    ],
)
def test_the_deadline_rule(
    base: Priority, hours_left: float, remaining_h: float, expected: Priority, at_risk: bool
) -> None:
    """One level up at risk (R + M >= T); else medium/low under 24 h, low under 48 h."""
    level = deadline_level(base, NOW + timedelta(hours=hours_left), NOW, remaining_h * H, 2 * H)
    assert (level.priority, level.at_risk) == (expected, at_risk)


def test_no_deadline_keeps_the_base_priority() -> None:
    """A job without a deadline keeps the priority its user gave it."""
    assert deadline_level(Priority.LOW, None, NOW, 50 * H, 2 * H).priority is Priority.LOW


@pytest.mark.parametrize(
    ("work", "width", "longest", "expected"),
    [
        (10 * H, 5, 1 * H, 2 * H),  # spread over five nodes
        (10 * H, 50, 1 * H, 1 * H),  # a chunk cannot be split
        (10 * H, 0, 1 * H, 10 * H),  # no node fits: one at a time
        (0.0, 5, 1 * H, 0.0),  # nothing left
    ],
)
def test_remaining_work(work: float, width: int, longest: float, expected: float) -> None:
    """R = max(work / width, longest remaining chunk)."""
    assert remaining_seconds(work, width, longest) == expected


@pytest.mark.parametrize(
    ("hours_left", "remaining_h", "expected"),
    [(10, 1, "on track"), (3, 1.5, "at risk"), (3, 4, "will miss")],
)
def test_the_deadline_verdict(hours_left: float, remaining_h: float, expected: str) -> None:
    """Will miss when R alone reaches the deadline, at risk when R + M does."""
    assert verdict(NOW + timedelta(hours=hours_left), NOW, remaining_h * H, 2 * H) == expected


def test_equal_priorities_go_earliest_deadline_first_and_priorities_by_rank() -> None:
    """Effective priority by rank (never by name), then the earliest deadline (none last),
    then submission, then id."""
    early, late = NOW + timedelta(hours=5), NOW + timedelta(hours=9)
    keys = {
        "late": order_key(Priority.MEDIUM, late, NOW, "late"),
        "early": order_key(Priority.MEDIUM, early, NOW + timedelta(minutes=5), "early"),
        "none": order_key(Priority.MEDIUM, None, NOW - timedelta(hours=1), "none"),
        "low": order_key(Priority.LOW, early, NOW, "low"),
        "high": order_key(Priority.HIGH, None, NOW, "high"),
        "critical": order_key(Priority.CRITICAL, None, NOW, "critical"),
        "tie-b": order_key(Priority.MEDIUM, late, NOW, "tie-b"),
    }
    assert sorted(keys, key=keys.__getitem__) == [
        "critical",
        "high",
        "early",
        "late",
        "tie-b",
        "none",
        "low",
    ]


def _level(priority: Priority, reason: str = "") -> Level:
    return Level(priority, reason or priority.value)


def test_inheritance_runs_both_ways_without_contagion_between_siblings() -> None:
    """A high job blocked on a low one lifts it; the low job's other dependant inherits only
    what the parent has of its own (and its ancestors'), not its sibling's lift."""
    own = {
        "plate": _level(Priority.LOW),  # parent of comp and of review
        "comp": _level(Priority.HIGH),  # blocked on plate
        "review": _level(Priority.BACKGROUND),  # blocked on plate too
        "grade": _level(Priority.LOW),  # child of a high parent
        "edit": _level(Priority.HIGH),
    }
    parents = {"comp": ["plate"], "review": ["plate"], "grade": ["edit"]}
    children = {"plate": ["comp", "review"], "edit": ["grade"]}
    levels = inherited_levels(
        own,
        parents=lambda j: parents.get(j, []),
        blocked_children=lambda j: children.get(j, []),
    )
    assert levels["plate"].priority is Priority.HIGH
    assert "comp waits on it" in levels["plate"].reason
    assert levels["review"].priority is Priority.LOW  # plate's own level, not comp's lift
    assert levels["grade"].priority is Priority.HIGH
    assert "inherited from edit" in levels["grade"].reason
    assert levels["edit"].priority is Priority.HIGH


# -- the policy, cycle after cycle ------------------------------------------------------------


def _farm(*jobs: JobView, nodes: int = 4) -> FarmView:
    views = {
        f"n{i}": NodeView(name=f"n{i}", capacity=NODE, free=NODE, labels=("class=default",))
        for i in range(nodes)
    }
    return FarmView(nodes=views, jobs={j.job_id: j for j in jobs})


def _job(
    policy: RenderFarmPolicy,
    name: str,
    *,
    priority: Priority = Priority.MEDIUM,
    deadline: datetime | None = None,
    frames: int = 10,
    estimate: float = 60.0,
    submitted: datetime = NOW,
) -> JobView:
    spec = RenderJob(
        name=name,
        client="acme",
        command=["render", "{start}", "{end}"],
        frames=(1, frames),
        chunk=1,
        deadline=deadline,
        frame_estimate=estimate,
        priority=priority,
        resources=Resources.of(cores=1, memory="1GiB"),
        preview=None,
    ).to_spec()
    spec = policy.prepare(spec, NOW)
    policy.observe(JobSubmittedObservation(job_id=name, spec=spec, at=submitted))
    return JobView(
        job_id=name,
        spec=spec,
        submitted_at=submitted,
        total=len(spec.tasks),
        queued=len(spec.tasks),
        metadata=spec.metadata_as(RenderMetadata),
    )


def _amend_deadline(view: JobView, deadline: datetime) -> None:
    """What ``taskfarm amend --set deadline=...`` does to the live view."""
    data = msgspec.json.decode(view.spec.metadata)
    data["deadline"] = deadline.isoformat()
    spec = msgspec.structs.replace(view.spec, metadata=msgspec.json.encode(data))
    view.spec = spec
    view.metadata = spec.metadata_as(RenderMetadata)


def _effective(policy: RenderFarmPolicy, view: JobView, farm: FarmView, now: datetime) -> str:
    policy.rank(view, farm, now)
    return policy.describe(view, now)["effective priority"].split(":")[0]


def test_a_low_job_20_hours_from_its_deadline_is_medium_after_one_cycle_and_after_five() -> None:
    """The boost is recomputed, not accumulated: five cycles give the answer one gives, and the
    transition is journaled once."""
    policy = RenderFarmPolicy(CONFIG)
    view = _job(policy, "shot", priority=Priority.LOW, deadline=NOW + timedelta(hours=20))
    farm = _farm(view)
    seen = []
    events = []
    for cycle in range(5):
        now = NOW + timedelta(seconds=30 * cycle)
        seen.append(_effective(policy, view, farm, now))
        for event in policy.cycle_events(farm, now):
            policy.apply(event)
            events.append(event)
    assert seen == ["medium"] * 5
    changes = [e for e in events if isinstance(e, PriorityChanged)]
    assert [(e.job_id, e.previous, e.current) for e in changes] == [("shot", "low", "medium")]
    assert view.spec.priority is Priority.LOW  # the base priority is never overwritten


def test_a_job_whose_deadline_moves_out_drops_back_within_one_cycle() -> None:
    """Amending the deadline to next week returns the job to its base priority at the next
    cycle, and that transition is journaled too."""
    policy = RenderFarmPolicy(CONFIG)
    view = _job(policy, "shot", priority=Priority.MEDIUM, deadline=NOW + timedelta(hours=10))
    farm = _farm(view)
    assert _effective(policy, view, farm, NOW) == "high"
    for event in policy.cycle_events(farm, NOW):
        policy.apply(event)
    _amend_deadline(view, NOW + timedelta(days=7))
    assert _effective(policy, view, farm, NOW + timedelta(seconds=30)) == "medium"
    [event] = [e for e in policy.cycle_events(farm, NOW) if isinstance(e, PriorityChanged)]
    assert (event.previous, event.current) == ("high", "medium")


def test_remaining_work_is_spread_over_the_width_the_job_can_get() -> None:
    """100 frames of 60 s on 4 one-slot nodes: R = 25 min, so with a 2 h margin a deadline in
    2 h 20 min is at risk and one in 2 h 30 min is not (under 24 h it is lifted anyway)."""
    policy = RenderFarmPolicy(CONFIG)
    big = Resources.of(cores=4, memory="1GiB")
    for minutes, at_risk in ((140, True), (150, False)):
        view = _job(policy, f"job-{minutes}", frames=100, deadline=NOW + timedelta(minutes=minutes))
        view.spec = msgspec.structs.replace(view.spec, resources=big)
        policy.rank(view, _farm(view), NOW)
        reason = policy.describe(view, NOW)["effective priority"]
        assert ("at risk" in reason) is at_risk, reason


def test_inheritance_through_the_policy_lifts_the_parent_a_high_job_waits_on() -> None:
    """A low render that a high comp waits on ranks high (no priority inversion)."""
    policy = RenderFarmPolicy(CONFIG)
    plate = _job(policy, "plate", priority=Priority.LOW)
    comp = _job(policy, "comp", priority=Priority.HIGH)
    plate.children, comp.parents = ("comp",), ("plate",)
    comp.queued = 0  # everything of comp waits on the plate
    farm = _farm(plate, comp)
    assert comp.blocked == comp.total
    assert _effective(policy, plate, farm, NOW) == "high"
    assert "comp waits on it" in policy.explain_rank(plate, NOW)


async def test_amending_the_deadline_through_the_engine_takes_effect_within_one_cycle() -> None:
    """``amend --set deadline=...`` on a live job (the engine's amend): a medium job due in 10
    hours is high; moved out a week it is medium again, the base priority untouched; a deadline
    that is not a time is refused."""
    policy = RenderFarmPolicy(CONFIG)
    clock = VirtualClock(auto_advance=True, start=NOW)
    job = RenderJob(
        name="shot",
        client="acme",
        command=["render", "{start}"],
        frames=(1, 2),
        frame_estimate=3600.0,
        deadline=NOW + timedelta(hours=10),
        resources=NODE,
    )
    async with open_simulated_farm(
        policy=policy,
        nodes=[RenderNode(name="n1", cores=4, memory="16GiB")],
        duration=lambda n, s: 3600.0,
        clock=clock,
    ) as farm:
        clock.activity.acquire()  # hold the clock: the job stays where we look at it
        await farm.engine.submit([job.to_spec()])
        assert "effective priority high" in await farm.engine.why("shot")
        later = (NOW + timedelta(days=7)).isoformat()
        summary = await farm.engine.amend("shot", set_metadata={"deadline": later})
        assert summary.priority == "medium"
        assert "effective priority medium" in await farm.engine.why("shot")
        with pytest.raises(TaskfarmError, match="deadline"):
            await farm.engine.amend("shot", set_metadata={"deadline": "next friday"})
        clock.activity.release()
        await farm.engine.wait_job("shot")


async def test_amending_the_deadline_to_a_passed_time_is_refused_naming_the_flag_and_value() -> (
    None
):
    """``amend --set deadline=`` to a time not after the clock's now is refused before anything
    is journaled, naming ``--set deadline`` and the value; other amendments still pass."""
    policy = RenderFarmPolicy(CONFIG)
    clock = VirtualClock(auto_advance=True, start=NOW)
    job = RenderJob(
        name="shot",
        client="acme",
        command=["render", "{start}"],
        frames=(1, 2),
        deadline=NOW + timedelta(hours=10),
        resources=NODE,
    )
    async with open_simulated_farm(
        policy=policy,
        nodes=[RenderNode(name="n1", cores=4, memory="16GiB")],
        duration=lambda n, s: 3600.0,
        clock=clock,
    ) as farm:
        clock.activity.acquire()  # hold the clock: "now" is NOW while we amend
        await farm.engine.submit([job.to_spec()])
        for passed in (NOW - timedelta(minutes=1), NOW):
            with pytest.raises(ConfigurationError) as refused:
                await farm.engine.amend("shot", set_metadata={"deadline": passed.isoformat()})
            assert refused.value.where == "--set deadline"
            assert passed.isoformat() in str(refused.value)
            assert "not in the future" in str(refused.value)
        records = await farm.journal.read_stream(job_stream("shot"))
        assert not any(isinstance(r.event, JobAmended) for r in records)
        later = (NOW + timedelta(hours=1)).isoformat()
        await farm.engine.amend("shot", set_metadata={"deadline": later}, priority="high")
        records = await farm.journal.read_stream(job_stream("shot"))
        [amended] = [r.event for r in records if isinstance(r.event, JobAmended)]
        assert amended.changes[0] == "priority: medium -> high"
        clock.activity.release()
        await farm.engine.wait_job("shot")
