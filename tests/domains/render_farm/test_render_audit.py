"""The audit answers from the journal alone: the timeline of a job, a node and a client
(submitted, scheduled where, priority changed and why, preempted, node lost, mode changed,
preview produced, deadline at risk, finished on time or late), and the figures (utilization,
on-time rate, turnaround, preemptions, failures, kWh and cost per job, client and mode)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actors import AttemptSpec, Resources
from domains.render_farm import (
    PreviewSettings,
    RenderFarmPolicy,
    RenderJob,
    RenderNode,
    parse_farm_config,
)
from domains.render_farm._audit import AuditProjection, audit_records
from domains.render_farm._simulation import open_simulated_farm
from persistence import RecordedEvent
from runtime import VirtualClock

MONDAY = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
FARM = """
margin = "1h"
flat_price = 0.20
[[clients]]
id = "acme"
guaranteed = 50
[[clients]]
id = "blue"
guaranteed = 50
[[node_classes]]
name = "std"
watts = { idle = 100, busy = 300, sleep = 5 }
[energy]
mode = "performance"
[previews]
stride = 4
"""
WHOLE = Resources.of(cores=4, memory="4GiB")


async def _records(farm: object) -> list[RecordedEvent]:
    journal = farm.journal  # type: ignore[attr-defined]
    return [r async for batch in journal.read_all() for r in batch]


async def test_energy_is_charged_to_jobs_clients_and_modes_and_idle_draw_is_counted() -> None:
    """One node busy for an hour (300 W) beside one idle node (100 W) at 0.20 per kWh: the job
    is charged 0.3 kWh, the farm 0.4 kWh, the idle 0.1 kWh; utilization is half."""
    policy = RenderFarmPolicy(parse_farm_config(FARM.replace("stride = 4", "stride = 1")))
    nodes = [
        RenderNode(name="a", node_class="std", cores=4),
        RenderNode(name="b", node_class="std", cores=4),
    ]
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    job = RenderJob(name="hour", client="acme", command=["r"], frames=(1, 1), resources=WHOLE)
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda n, s: 3600.0, clock=clock
    ) as farm:
        await farm.engine.submit([job.to_spec()])
        await farm.engine.wait_job("hour")
        records = await _records(farm)
        projection = audit_records(records)
    figures = projection.metrics()
    energy = figures["energy"]
    assert energy["kwh"] == pytest.approx(0.4)
    assert energy["cost"] == pytest.approx(0.08)
    assert energy["idle_kwh"] == pytest.approx(0.1)
    assert energy["per_client"]["acme"]["kwh"] == pytest.approx(0.3)
    assert energy["per_mode"]["performance"]["kwh"] == pytest.approx(0.4)
    assert figures["utilization"] == pytest.approx(0.5)
    assert projection.job_figures("hour")["cost"] == pytest.approx(0.06)  # type: ignore[index]
    # An outage (not in the journal) draws nothing: node b down for the hour.
    down = {"b": [(MONDAY, MONDAY + timedelta(hours=1))]}
    assert audit_records(records).metrics(outages=down)["energy"]["kwh"] == pytest.approx(0.3)


def _seconds(node: str, spec: AttemptSpec) -> float:
    return 900.0


async def test_the_timeline_tells_what_happened_to_a_job_a_node_and_a_client() -> None:
    """Two clients, previews first, a deadline that becomes at risk, a node lost mid-run and an
    energy-mode change: each is in the timeline with its reason, filterable by job, node,
    client and time."""
    policy = RenderFarmPolicy(parse_farm_config(FARM))
    nodes = [RenderNode(name=f"n{i}", node_class="std", cores=4) for i in range(3)]
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    shot = RenderJob(
        name="shot",
        client="acme",
        command=["render", "{start}"],
        frames=(1, 8),
        chunk=2,
        deadline=MONDAY + timedelta(hours=2),
        frame_estimate=450.0,
        resources=WHOLE,
        preview=PreviewSettings(stride=4),
    )
    fx = RenderJob(
        name="fx", client="blue", job_type="vfx", command=["fx"], frames=(1, 2), resources=WHOLE
    )
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=_seconds, clock=clock
    ) as farm:
        await farm.engine.submit([shot.to_spec(), fx.to_spec()])
        await clock.sleep(300)
        await farm.engine.policy_command("mode", {"mode": "balanced", "reason": "evening"})
        busy = farm.engine.core.farm.placements["shot"]
        lost_node = sorted(busy.values())[0]
        await farm.fail_node(lost_node)
        await farm.engine.wait_job("shot")
        await farm.engine.wait_job("fx")
        projection = audit_records(await _records(farm))
    kinds = {e.kind for e in projection.select(job="shot")}
    assert {"submitted", "scheduled", "priority", "deadline", "node lost", "preview"} <= kinds
    assert "finished" in kinds
    [submitted] = [e for e in projection.select(job="shot") if e.kind == "submitted"]
    assert "client acme" in submitted.text
    assert "deadline 2026-03-02T11:00:00+00:00" in submitted.text
    [lost] = [e for e in projection.select(node=lost_node) if e.kind == "node lost"]
    assert lost.job == "shot"
    assert "power failure" in lost.text
    assert {e.job for e in projection.select(client="blue")} == {"fx"}
    [mode] = [e for e in projection.entries if e.kind == "mode"]
    assert "performance -> balanced (by operator: evening)" in mode.text
    later = projection.select(since=MONDAY + timedelta(minutes=5))
    assert later
    assert all(e.at >= MONDAY + timedelta(minutes=5) for e in later)
    figures = projection.metrics(outages=farm.down)
    assert figures["lost"] == 1
    assert figures["with_deadline"] == 1
    assert set(figures["turnaround_s"]) == {"acme", "blue"}
    assert set(figures["energy"]["per_mode"]) == {"performance", "balanced"}
    [ready] = [e for e in projection.select(job="shot") if e.kind == "preview"]
    first_preview = projection.job_figures("shot")["first_preview_s"]  # type: ignore[index]
    assert first_preview == (ready.at - MONDAY).total_seconds()


async def test_a_mode_change_and_a_reload_name_the_client_that_asked() -> None:
    """``mode`` and ``config reload`` sent with ``by=NAME`` journal NAME, and the audit says
    who; without one they say ``operator``, as before names were recorded."""
    policy = RenderFarmPolicy(parse_farm_config(FARM))
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    nodes = [RenderNode(name="n0", node_class="std", cores=4)]
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=_seconds, clock=clock
    ) as farm:
        command = farm.engine.policy_command
        await command("mode", {"mode": "balanced", "reason": "evening"}, by="alice")
        await command("config-reload", {"text": FARM.replace('"1h"', '"2h"')}, by="bob")
        await command("mode", {"mode": "efficiency", "reason": "night"})
        projection = audit_records(await _records(farm))
    said = [e.text for e in projection.entries if e.kind in ("mode", "config")]
    assert [line for line in said if "(startup)" not in line] == [
        "energy mode performance -> balanced (by alice: evening)",
        "configuration (bob): margin: 3600.0 -> 7200.0",
        "energy mode balanced -> efficiency (by operator: night)",
    ]


async def test_a_node_health_change_names_the_operator_that_asked() -> None:
    """A drain an operator's credential asked for names them in the audit; one without a name
    says ``operator``, as before names were recorded."""
    policy = RenderFarmPolicy(parse_farm_config(FARM))
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    nodes = [RenderNode(name="n0", node_class="std", cores=4)]
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=_seconds, clock=clock
    ) as farm:
        await farm.engine.set_node_health("n0", "draining", reason="disks", operator="carol")
        await farm.engine.set_node_health("n0", "online")
        projection = audit_records(await _records(farm))
    said = [e.text for e in projection.select(node="n0") if e.kind == "node health"]
    assert said == ["node n0 draining (by carol: disks)", "node n0 online (by operator)"]


def test_an_empty_journal_has_no_figures() -> None:
    """Nothing happened: no entries, nothing to divide by."""
    projection = AuditProjection()
    figures = projection.metrics()
    assert projection.entries == []
    assert figures["on_time_rate"] is None
    assert figures["energy"]["kwh"] == 0.0


async def test_a_nodes_own_watts_labels_override_its_class() -> None:
    """Node b says ``watts.busy=150`` (its agent's labels, from ``RenderNode(watts=...)``): its
    busy hour costs 0.15 kWh, not its class's 0.3."""
    policy = RenderFarmPolicy(parse_farm_config(FARM.replace("stride = 4", "stride = 1")))
    frugal = RenderNode(name="b", node_class="std", cores=4, watts=(50.0, 150.0, 2.0))
    assert {"watts.idle=50", "watts.busy=150", "watts.sleep=2"} <= set(frugal.all_labels)
    nodes = [RenderNode(name="a", node_class="std", cores=4), frugal]
    clock = VirtualClock(auto_advance=True, start=MONDAY)
    job = RenderJob(name="hour", client="acme", command=["r"], frames=(1, 1), resources=WHOLE)
    async with open_simulated_farm(
        policy=policy, nodes=nodes, duration=lambda n, s: 3600.0, clock=clock
    ) as farm:
        await farm.engine.submit([job.to_spec(), job.to_spec(job_id="hour-2")])
        await farm.engine.wait_job("hour")
        await farm.engine.wait_job("hour-2")
        records = await _records(farm)
    energy = audit_records(records).metrics()["energy"]
    assert energy["kwh"] == pytest.approx(0.3 + 0.15)  # a at 300 W, b at its own 150 W
