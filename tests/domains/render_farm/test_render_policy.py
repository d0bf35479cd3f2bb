"""The policy on the engine: submissions validated (unknown clients, past deadlines, bad
types), failures and max_errors, node loss resumed from the last checkpoint, the configuration
journaled at start and on reload (and what wins after a restart), priority transitions and
deadline verdicts journaled, the forecast and the operator's columns."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import msgspec
import pytest

from actors import (
    FarmView,
    JobSubmittedObservation,
    JobView,
    NodeView,
    Resources,
    SpecError,
    TaskAssigned,
    TaskFailed,
    TaskRequeued,
)
from domains.render_farm import (
    DeadlineVerdictChanged,
    FarmConfigChanged,
    PriorityChanged,
    RenderFarmPolicy,
    RenderJob,
    RenderMetadata,
    RenderNode,
    parse_farm_config,
    render_farm_policy,
)
from domains.render_farm._forecast import (
    ForecastJob,
    ForecastNode,
    ForecastTask,
    forecast,
    forecast_verdict,
)
from domains.render_farm._simulation import farm_codec, open_simulated_farm
from persistence import InMemoryJournal
from runtime import ConfigurationError, VirtualClock

MONDAY = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
FARM = """
margin = "1h"
max_errors = 3
[[clients]]
id = "acme"
[[clients]]
id = "blue"
[previews]
stride = 1
"""
CONFIG = parse_farm_config(FARM, source="farm.toml")
CHUNK = Resources.of(cores=4, memory="4GiB")


def _job(name: str = "shot", **fields: object) -> RenderJob:
    values: dict[str, object] = {
        "client": "acme",
        "command": ["render", "{start}"],
        "frames": (1, 4),
        "frame_estimate": 600.0,
        "resources": CHUNK,
    }
    values.update(fields)
    return RenderJob(name=name, **values)  # type: ignore[arg-type]


def _metadata(spec_metadata: dict[str, object]) -> bytes:
    return msgspec.json.encode(spec_metadata)


@pytest.mark.parametrize(
    ("render", "field", "problem"),
    [
        ({"client": "nobody"}, "metadata.render.client", "unknown client 'nobody'"),
        (
            {"client": "acme", "deadline": "2026-03-01T09:00:00Z"},
            "metadata.render.deadline",
            "in the past",
        ),
        ({"client": "acme", "complexity": 11}, "metadata.render.complexity", "<= 10"),
        ({"client": "acme", "complexity": "high"}, "metadata.render.complexity", "int"),
        ({"client": "acme", "deadline": "tomorrow"}, "metadata.render.deadline", "datetime"),
        (
            {"client": "acme", "deadline": "2026-04-01T09:00:00"},
            "metadata.render.deadline",
            "timezone",
        ),
        ({"client": "acme", "frame_estimate": "soon"}, "metadata.render.frame_estimate", "not a"),
        ({"client": "acme", "colour": "red"}, "metadata.render", "unknown field `colour`"),
        ({"type": "vfx"}, "metadata.render", "missing required field `client`"),
        ({"client": "acme", "plan": {}}, "metadata.render.plan", "written by the policy"),
    ],
)
async def test_a_bad_render_table_is_refused_at_submission(
    render: dict[str, object], field: str, problem: str
) -> None:
    """Unknown clients, past deadlines and bad types: refused with the job, field and problem,
    and nothing journaled."""
    policy = RenderFarmPolicy(CONFIG)
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    nodes = [RenderNode(name="n1", cores=4)]
    spec = msgspec.structs.replace(
        _job().to_spec(source="shot.toml"), metadata=_metadata({"render": render})
    )
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda n, s: 1.0, clock=clock
    ) as farm:
        with pytest.raises(SpecError) as caught:
            await farm.engine.submit([spec])
        assert caught.value.path == "shot.toml"
        assert field in caught.value.field, caught.value
        assert problem in str(caught.value)
        assert not [s for s in await farm.journal.streams() if s.stream_id.startswith("job:")]


async def test_failed_attempts_count_against_the_job_until_max_errors_fails_it() -> None:
    """Every attempt fails: the third failed attempt (max_errors = 3) fails the job with that
    reason, each retry avoiding the node it failed on."""
    policy = RenderFarmPolicy(CONFIG)
    nodes = [RenderNode(name=f"n{i}", cores=4) for i in range(3)]
    async with open_simulated_farm(
        policy=policy,
        nodes=nodes,
        duration=lambda n, s: 10.0,
        outcome=lambda node, spec: "failed",  # a broken scene: every attempt fails
    ) as farm:
        await farm.engine.submit([_job(frames=(1, 1)).to_spec()])
        summary = await farm.engine.wait_job("shot")
        assert summary.status == "failed"
        assert "3 failed attempts reached max_errors (3)" in (summary.reason or "")
        events = [r.event for r in await farm.journal.read_stream("job:shot")]
        assert sum(isinstance(e, TaskFailed) for e in events) == 3
        nodes_used = [e.node for e in events if isinstance(e, TaskAssigned)]
        assert len(set(nodes_used)) == 3


async def test_a_lost_node_requeues_its_work_from_the_last_checkpoint() -> None:
    """A node fails mid-chunk: the attempt is requeued (lost, no error counted) and resumes
    elsewhere from its checkpoint, so the chunk costs what was left of it."""
    policy = RenderFarmPolicy(CONFIG)
    nodes = [RenderNode(name="n1", cores=4), RenderNode(name="n2", cores=4)]
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda n, s: 1000.0
    ) as farm:
        engine = farm.engine
        farm.clock.activity.acquire()
        await engine.submit([_job(frames=(1, 1)).to_spec()])
        while not engine.core.farm.placements.get("shot"):
            await anyio.lowlevel.checkpoint()
        [node] = engine.core.farm.placements["shot"].values()
        farm.clock.activity.release()
        await farm.clock.sleep(400)
        assert await engine.checkpoint("shot", 0)
        await farm.clock.sleep(1)
        await farm.fail_node(node)
        summary = await engine.wait_job("shot")
        assert summary.status == "completed"
        events = list(await farm.journal.read_stream("job:shot"))
        requeued = [r.event for r in events if isinstance(r.event, TaskRequeued)]
        assert len(requeued) == 1
        assert requeued[0].lost
        assigned = [r for r in events if isinstance(r.event, TaskAssigned)]
        assert assigned[-1].event.resume_from == "sim:400"  # type: ignore[attr-defined]
        assert assigned[-1].event.node != node  # type: ignore[attr-defined]
        # 400 s were done before the loss: the resumed attempt runs the other 600 s.
        finished = (await farm.journal.read_stream("job:shot"))[-1].timestamp
        assert finished - assigned[-1].timestamp == timedelta(seconds=600)
        assert policy._jobs["shot"].errors == 0


async def test_the_configuration_is_journaled_at_start_and_on_reload(tmp_path: Path) -> None:
    """The first start journals the configuration; a reload journals what changed (a bad file
    is refused naming file and field, nothing journaled); a restart with the file unchanged
    journals nothing, one with an edited file journals the difference."""
    path = tmp_path / "farm.toml"
    path.write_text(FARM, encoding="utf-8")
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    journal = InMemoryJournal(clock=clock, codec=farm_codec())
    nodes = [RenderNode(name="n1")]

    async def configs() -> list[FarmConfigChanged]:
        return [
            r.event
            for r in await journal.read_stream("policy:render-farm")
            if isinstance(r.event, FarmConfigChanged)
        ]

    async def run(policy: RenderFarmPolicy) -> None:
        async with open_simulated_farm(
            policy=policy, nodes=nodes, duration=lambda n, s: 1.0, clock=clock, journal=journal
        ) as farm:
            await farm.clock.sleep(60)

    await run(render_farm_policy(path))
    assert [(c.by, c.changes) for c in await configs()] == [("startup", (f"loaded from {path}",))]
    policy = render_farm_policy(path)
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda n, s: 1.0, clock=clock, journal=journal
    ) as farm:
        path.write_text(FARM.replace('margin = "1h"', 'margin = "3h"'), encoding="utf-8")
        reply = await farm.engine.policy_command("config-reload", {})
        assert reply["changes"] == ["margin: 3600.0 -> 10800.0"]
        assert policy.config.margin == 10800
        path.write_text(FARM.replace("max_errors = 3", "max_errors = 0"), encoding="utf-8")
        with pytest.raises(ConfigurationError, match=r"farm\.toml: max_errors"):
            await farm.engine.policy_command("config-reload", {})
        assert policy.config.margin == 10800
    assert len(await configs()) == 2
    path.write_text(FARM.replace('margin = "1h"', 'margin = "3h"'), encoding="utf-8")
    await run(render_farm_policy(path))
    assert len(await configs()) == 2  # the file is what was journaled last: nothing new
    path.write_text(FARM, encoding="utf-8")
    restarted = render_farm_policy(path)
    await run(restarted)
    last = (await configs())[-1]
    assert (last.by, last.changes) == ("startup", ("margin: 10800.0 -> 3600.0",))
    assert restarted.config.margin == 3600


async def test_priority_transitions_and_verdicts_are_journaled_once_each() -> None:
    """A job due soon is lifted (journaled with its reason) and judged at risk, then will miss;
    each transition journaled once, not every cycle, and the stream replays into a new policy
    without journaling anything again."""
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    journal = InMemoryJournal(clock=clock, codec=farm_codec())
    nodes = [RenderNode(name="n1", cores=4)]
    policy = RenderFarmPolicy(CONFIG)
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda n, s: 900.0, clock=clock, journal=journal
    ) as farm:
        job = _job(frames=(1, 8), deadline=MONDAY + timedelta(minutes=90))
        await farm.engine.submit([job.to_spec()])
        await farm.engine.wait_job("shot")
    events = [r.event for r in await journal.read_stream("policy:render-farm")]
    lifts = [(e.previous, e.current) for e in events if isinstance(e, PriorityChanged)]
    assert lifts == [("medium", "high")]
    verdicts = [e.verdict for e in events if isinstance(e, DeadlineVerdictChanged)]
    # 8 frames estimated at 10 min on one node, due in 90 min with a 1 h margin: at risk at once;
    # the first frame takes 15 min, so the measured estimate says the rest (105 min) will miss.
    assert verdicts[:2] == ["at risk", "will miss"]
    assert all(a != b for a, b in itertools.pairwise(verdicts))
    replayed = RenderFarmPolicy(CONFIG)
    async with open_simulated_farm(
        policy=replayed, nodes=nodes, duration=lambda n, s: 1.0, clock=clock, journal=journal
    ):
        pass
    assert len(list(await journal.read_stream("policy:render-farm"))) == len(events)


def test_the_forecast_list_schedules_the_queue_in_rank_order() -> None:
    """Two one-core nodes, one twice as fast with a GPU: jobs in rank order, each task where it
    starts (then ends) first; a GPU task only on the GPU node; a deferred job starts then."""
    now = MONDAY
    one = Resources.of(cores=1, memory="1GiB")
    gpu = Resources.of(cores=1, memory="1GiB", gpus=1)

    def node(name: str, capacity: Resources) -> ForecastNode:
        return ForecastNode(
            view=NodeView(name=name, capacity=capacity, free=capacity), available_at=0
        )

    nodes = [node("n1", one), node("g1", Resources.of(cores=1, memory="1GiB", gpus=1))]
    jobs = [
        ForecastJob("a", [ForecastTask(i, one, (), 100.0) for i in range(3)]),
        ForecastJob("b", [ForecastTask(i, one, (), 100.0) for i in range(2)]),
        ForecastJob("c", [ForecastTask(0, gpu, (), 50.0)]),
        ForecastJob("d", [ForecastTask(0, one, (), 10.0)], not_before=now + timedelta(hours=5)),
    ]
    completion, slots = forecast(jobs, nodes, now, lambda n, j: 2.0 if n == "g1" else 1.0)
    seconds = {job: (at - now).total_seconds() for job, at in completion.items()}
    # Earliest start, then earliest end: g1 (twice as fast) a0 0-50, a2 50-100, b0 100-150,
    # c 150-175; n1 a1 0-100, b1 100-200; d waits for its deferral.
    assert seconds == {"a": 100.0, "b": 200.0, "c": 175.0, "d": 5 * 3600 + 5.0}
    assert {s.node for s in slots if s.job_id == "c"} == {"g1"}
    assert forecast_verdict(now + timedelta(hours=1), now + timedelta(hours=3), 3600) == "will meet"
    assert (
        forecast_verdict(now + timedelta(hours=1), now + timedelta(minutes=90), 3600) == "at risk"
    )
    assert forecast_verdict(now + timedelta(hours=2), now + timedelta(hours=1), 3600) == "will miss"


def test_status_columns_and_rows_say_what_an_operator_needs() -> None:
    """Client, frames done/total, per-frame time, effective priority and why, deadline, ETA
    and verdict with the margin, in rank order."""
    policy = RenderFarmPolicy(CONFIG)
    node = NodeView(name="n1", capacity=CHUNK, free=CHUNK, labels=())
    views = {}
    for name, hours in (("late", 30), ("soon", 3)):
        spec = _job(name, deadline=MONDAY + timedelta(hours=hours)).to_spec()
        policy.observe(JobSubmittedObservation(job_id=name, spec=spec, at=MONDAY))
        views[name] = JobView(
            job_id=name,
            spec=spec,
            submitted_at=MONDAY,
            total=4,
            queued=4,
            metadata=spec.metadata_as(RenderMetadata),
        )
    farm = FarmView(nodes={"n1": node}, jobs=views)
    rows = policy.status_rows(farm, MONDAY)
    assert [r["job"] for r in rows] == ["soon", "late"]
    soon = rows[0]
    assert (soon["client"], soon["frames_done"], soon["frames_total"]) == ("acme", 0, 4)
    assert soon["priority"] == "high"
    assert soon["verdict"] == "will meet"  # 4 x 10 min on one node: done at 09:40 < 12:00 - 1 h
    assert soon["strip"] == "...."
    columns = policy.describe(views["soon"], MONDAY)
    assert columns["client"] == "acme"
    assert columns["frames"] == "0/4"
    assert columns["per frame"] == "10m (estimate)"
    assert columns["verdict"] == "will meet (margin 1h00m)"
    assert columns["effective priority"].startswith("high: deadline in 3h00m")


def test_the_forecast_is_recomputed_at_most_once_a_minute() -> None:
    """A more urgent job submitted 30 s after a forecast does not move the other's ETA until
    a minute has passed; then it goes behind it."""
    policy = RenderFarmPolicy(CONFIG)
    node = NodeView(name="n1", capacity=CHUNK, free=CHUNK, labels=())
    views: dict[str, JobView] = {}

    def submit(name: str, hours: float, at: datetime) -> None:
        spec = _job(name, deadline=MONDAY + timedelta(hours=hours)).to_spec()
        policy.observe(JobSubmittedObservation(job_id=name, spec=spec, at=at))
        views[name] = JobView(
            job_id=name,
            spec=spec,
            submitted_at=at,
            total=4,
            queued=4,
            metadata=spec.metadata_as(RenderMetadata),
        )

    submit("late", 30, MONDAY)
    farm = FarmView(nodes={"n1": node}, jobs=views)
    [first] = policy.status_rows(farm, MONDAY)
    submit("soon", 3, MONDAY + timedelta(seconds=30))
    cached = {r["job"]: r["eta"] for r in policy.status_rows(farm, MONDAY + timedelta(seconds=30))}
    assert cached["late"] == first["eta"]
    fresh = {r["job"]: r["eta"] for r in policy.status_rows(farm, MONDAY + timedelta(seconds=61))}
    assert fresh["late"] > first["eta"]  # four 10-minute frames of "soon" now come first
