"""Energy: cost across tariff boundaries, the power model, night-savings deferral that never
endangers a deadline, idle nodes put to sleep beyond a reserve and woken for queued work, and
the mode set by the operator (journaled)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actors import AttemptSpec, NodeHealthChanged, Resources, TaskAssigned
from domains.render_farm import (
    EnergyModeChanged,
    RenderFarmPolicy,
    RenderJob,
    RenderNode,
    parse_farm_config,
)
from domains.render_farm._energy import (
    PriceTimeline,
    defer_to_off_peak,
    node_power,
    plan_sleep,
)
from domains.render_farm._simulation import open_simulated_farm
from runtime import ConfigurationError, VirtualClock

MONDAY = datetime(2026, 3, 2, tzinfo=UTC)
FARM = """
margin = "1h"
[[clients]]
id = "acme"
[energy]
mode = "{mode}"
reserve = 1
sleep_after = "10m"
[[tariffs]]
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
peak_hours = ["07:00-23:00"]
peak_price = 0.30
off_peak_price = 0.10
[previews]
stride = 1
"""


def _config(mode: str = "balanced") -> object:
    return parse_farm_config(FARM.replace("{mode}", mode))


def test_energy_cost_is_integrated_across_tariff_boundaries() -> None:
    """1 kW from 06:00 to 08:00 on a Monday: one off-peak hour and one peak hour."""
    config = parse_farm_config(FARM.replace("{mode}", "balanced"))
    timeline = PriceTimeline(config, MONDAY, MONDAY + timedelta(days=1))
    start = (MONDAY + timedelta(hours=6)).timestamp()
    kwh, cost = timeline.energy(1000.0, start, start + 7200)
    assert kwh == pytest.approx(2.0)
    assert cost == pytest.approx(0.10 + 0.30)
    kwh, cost = timeline.energy(500.0, start + 3600, start + 3600 + 1800)
    assert cost == pytest.approx(0.25 * 0.30)


@pytest.mark.parametrize(
    ("used", "asleep", "watts"),
    [(0.0, False, 100.0), (0.5, False, 200.0), (1.0, False, 300.0), (0.7, True, 5.0)],
)
def test_the_power_model(used: float, asleep: bool, watts: float) -> None:
    """Idle + (busy - idle) x the share of cores in use; sleep watts asleep."""
    assert node_power(100.0, 300.0, 5.0, used=used, asleep=asleep) == watts


@pytest.mark.parametrize(
    ("mode", "intensive", "hour", "deadline_h", "remaining_h", "deferred"),
    [
        ("night-savings", True, 10, 48, 2, True),  # peak, plenty of time: to 23:00
        ("night-savings", True, 10, None, 2, True),  # no deadline: to 23:00
        ("night-savings", True, 10, 16, 2, False),  # 23:00 + 2 x 2 h + 1 h > 26 h - 10 h
        ("night-savings", True, 3, 48, 2, False),  # already off-peak
        ("night-savings", False, 10, 48, 2, False),  # not energy-intensive
        ("balanced", True, 10, 48, 2, False),  # only night-savings defers
    ],
)
def test_night_savings_defers_energy_intensive_work_unless_the_deadline_is_endangered(
    mode: str,
    intensive: bool,
    hour: int,
    deadline_h: float | None,
    remaining_h: float,
    deferred: bool,
) -> None:
    """Deferred to off-peak only when the job, its remaining work counted twice, still ends
    before its deadline with the margin."""
    config = parse_farm_config(FARM.replace("{mode}", mode))
    now = MONDAY + timedelta(hours=hour)
    result = defer_to_off_peak(
        mode=mode,  # type: ignore[arg-type]
        energy_intensive=intensive,
        now=now,
        deadline=MONDAY + timedelta(hours=deadline_h) if deadline_h is not None else None,
        remaining_s=remaining_h * 3600,
        margin_s=config.margin,
        config=config,
    )
    assert (result is not None) is deferred
    if result is not None:
        assert result.until == MONDAY + timedelta(hours=23)
        assert "night-savings" in result.reason


def test_idle_nodes_beyond_the_reserve_sleep_once_idle_long_enough() -> None:
    """The first ``reserve`` idle nodes stay awake; the others sleep after ``sleep_after``."""
    now = MONDAY + timedelta(hours=12)
    idle = [
        ("keep", now - timedelta(hours=5)),
        ("long", now - timedelta(minutes=30)),
        ("short", now - timedelta(minutes=5)),
    ]
    assert plan_sleep(idle, reserve=1, now=now, sleep_after=600) == ["long"]
    assert plan_sleep(idle, reserve=3, now=now, sleep_after=600) == []


def _seconds(node: str, spec: AttemptSpec) -> float:
    return 1800.0


def _nodes() -> list[RenderNode]:
    return [RenderNode(name=f"n{i}", cores=4, memory="16GiB") for i in range(4)]


def _job(name: str, tasks: int, **fields: object) -> RenderJob:
    return RenderJob(
        name=name,
        client="acme",
        command=["render", "{start}"],
        frames=(1, tasks),
        frame_estimate=1800.0,
        resources=Resources.of(cores=4, memory="4GiB"),
        **fields,  # type: ignore[arg-type]
    )


async def _health_changes(farm: object, node: str) -> list[NodeHealthChanged]:
    records = await farm.journal.read_stream(f"node:{node}")  # type: ignore[attr-defined]
    return [r.event for r in records if isinstance(r.event, NodeHealthChanged)]


async def test_idle_nodes_sleep_and_are_woken_when_queued_work_needs_them() -> None:
    """Balanced mode, reserve 1: after 10 idle minutes three nodes sleep (journaled, by the
    policy); a job that needs them wakes them, runs on all four, and completes."""
    policy = RenderFarmPolicy(parse_farm_config(FARM.replace("{mode}", "balanced")))
    clock = VirtualClock(auto_advance=True, start=MONDAY + timedelta(hours=1))
    async with open_simulated_farm(
        policy=policy, nodes=_nodes(), duration=_seconds, clock=clock, wake_seconds=90
    ) as farm:
        await clock.sleep(1800)
        asleep = {n.name for n in await farm.engine.nodes() if n.health == "sleeping"}
        assert len(asleep) == 3
        await farm.engine.submit([_job("wide", 4).to_spec()])
        summary = await farm.engine.wait_job("wide")
        assert summary.status == "completed"
        used = {
            r.event.node
            for r in await farm.journal.read_stream("job:wide")
            if isinstance(r.event, TaskAssigned)
        }
        assert used == {"n0", "n1", "n2", "n3"}
        woken = next(iter(asleep))
        changes = [(e.health, e.by) for e in await _health_changes(farm, woken)]
        assert changes[:2] == [("sleeping", "policy"), ("online", "policy")]


async def test_performance_mode_wakes_every_node_and_the_mode_change_is_journaled() -> None:
    """``mode performance`` (an operator command) is journaled in the policy's stream and wakes
    every node the policy had put to sleep; an unknown mode is refused."""
    policy = RenderFarmPolicy(parse_farm_config(FARM.replace("{mode}", "efficiency")))
    clock = VirtualClock(auto_advance=True, start=MONDAY + timedelta(hours=1))
    async with open_simulated_farm(
        policy=policy, nodes=_nodes(), duration=_seconds, clock=clock, wake_seconds=60
    ) as farm:
        await clock.sleep(1800)
        assert sum(n.health == "sleeping" for n in await farm.engine.nodes()) == 3
        reply = await farm.engine.policy_command("mode", {"mode": "performance"})
        assert reply == {"mode": "performance", "changed": True}
        with pytest.raises(ConfigurationError, match="unknown energy mode 'turbo'"):
            await farm.engine.policy_command("mode", {"mode": "turbo"})
        await clock.sleep(120)
        assert {n.health for n in await farm.engine.nodes()} == {"online"}
        events = [r.event for r in await farm.journal.read_stream("policy:render-farm")]
        changes = [e for e in events if isinstance(e, EnergyModeChanged)]
        assert [(e.previous, e.mode, e.by) for e in changes] == [
            ("efficiency", "performance", "operator")
        ]


async def test_night_savings_runs_energy_intensive_work_off_peak_unless_its_deadline_is_near() -> (
    None
):
    """At 10:00 an energy-intensive job with days to spare starts at 23:00, and ``why`` says
    so; one due this afternoon starts at once."""
    policy = RenderFarmPolicy(parse_farm_config(FARM.replace("{mode}", "night-savings")))
    start = MONDAY + timedelta(hours=10)
    clock = VirtualClock(auto_advance=True, start=start)
    async with open_simulated_farm(
        policy=policy, nodes=_nodes(), duration=_seconds, clock=clock
    ) as farm:
        clock.activity.acquire()
        await farm.engine.submit(
            [
                _job("sim", 1, energy_intensive=True, deadline=start + timedelta(days=2)).to_spec(),
                _job(
                    "urgent", 1, energy_intensive=True, deadline=start + timedelta(hours=5)
                ).to_spec(),
            ]
        )
        while "night-savings" not in await farm.engine.why("sim"):
            await clock_tick()
        clock.activity.release()
        for name, expected in (("urgent", start), ("sim", MONDAY + timedelta(hours=23))):
            await farm.engine.wait_job(name)
            [first] = [
                r.timestamp
                for r in await farm.journal.read_stream(f"job:{name}")
                if isinstance(r.event, TaskAssigned)
            ]
            assert first == expected


async def clock_tick() -> None:
    """Let the actors run (time stands still while the test holds the clock)."""
    import anyio

    await anyio.lowlevel.checkpoint()


async def test_auto_mode_switches_at_tariff_boundaries_and_each_switch_is_journaled() -> None:
    """``auto = true``: night-savings from 07:00 (peak) and balanced from 23:00, each switch a
    journaled ``EnergyModeChanged`` by "auto" with its reason, with no work to wake it."""
    text = FARM.replace('mode = "{mode}"', 'mode = "balanced"\nauto = true')
    policy = RenderFarmPolicy(parse_farm_config(text))
    clock = VirtualClock(auto_advance=True, start=MONDAY + timedelta(hours=6))
    async with open_simulated_farm(
        policy=policy, nodes=_nodes(), duration=_seconds, clock=clock
    ) as farm:
        seen = []
        for hours in (1, 16):
            await clock.sleep(hours * 3600 + 60)
            seen.append(policy.mode)
        assert seen == ["night-savings", "balanced"]
        records = await farm.journal.read_stream("policy:render-farm")
    switches = [(r.timestamp, r.event) for r in records if isinstance(r.event, EnergyModeChanged)]
    assert [(at.hour, e.previous, e.mode, e.by, e.reason) for at, e in switches] == [
        (7, "balanced", "night-savings", "auto", "peak hours"),
        (23, "night-savings", "balanced", "auto", "off-peak hours"),
    ]


@pytest.mark.parametrize(
    ("mode", "asleep_after_6_minutes"),
    [("balanced", 0), ("efficiency", 3), ("night-savings", 3), ("performance", 0)],
)
async def test_the_saving_modes_sleep_idle_nodes_after_half_of_sleep_after(
    mode: str, asleep_after_6_minutes: int
) -> None:
    """sleep_after = 10 min, reserve 1: six idle minutes put three of four nodes to sleep in
    efficiency and night-savings (half of it), none in balanced (the whole of it) or in
    performance (never)."""
    policy = RenderFarmPolicy(parse_farm_config(FARM.replace("{mode}", mode)))
    clock = VirtualClock(auto_advance=True, start=MONDAY + timedelta(hours=1))
    async with open_simulated_farm(
        policy=policy, nodes=_nodes(), duration=_seconds, clock=clock
    ) as farm:
        await clock.sleep(360)
        asleep = sum(n.health == "sleeping" for n in await farm.engine.nodes())
    assert asleep == asleep_after_6_minutes
