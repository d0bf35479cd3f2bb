"""``cluster.toml`` and the Python API: simulations, stages, scenarios and the templates."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from actors import Condition, Priority
from domains.scientific import (
    ClusterConfig,
    Simulation,
    SimulationMetadata,
    SimulationStage,
    conditional_branch,
    extension,
    fan_out_fan_in,
    linear_chain,
    load_cluster_config,
    parameter_sweep,
    parse_cluster_config,
)
from runtime import ConfigurationError

EXAMPLE = """
cycle_interval = "2m"

[owners.ana]
weight = 2
[projects.climate]
weight = 3

[protection]
budgets = { high = 2 }
minimum_runtime = "30m"
yield_lead = "20m"
preemptible_backfill = false
protection_window = "4h"

[fair_share]
half_life = "3d"
aging_per_day = 2

[checkpoints]
intervals = { critical = "10m" }
bandwidth = "2GiB"
max_overhead = 0.01

[recovery]
backoff = ["1m", "2m"]
strategies = { crash = ["restart", "hold"] }

[scenarios]
eta = 2
rungs = [0.25, 0.5]
weights = { accuracy = 2 }

[[maintenance]]
name = "rack-a"
start = 2027-03-10T08:00:00Z
end = 2027-03-10T12:00:00Z
severity = "critical"
requires = "rack=a"

[[reservations]]
name = "big-run"
for = "coupled-1"
start = 2027-03-12T00:00:00Z
duration = "2d"
nodes = 64
"""


def test_an_example_cluster_toml_is_read_into_every_section() -> None:
    """Every section of cluster.toml is read, with durations and sizes converted."""
    config = parse_cluster_config(EXAMPLE, source="cluster.toml")
    assert config.cycle_interval == 120
    assert config.weight("owner", "ana") == 2
    assert config.weight("owner", "bo") == 1
    assert config.weight("project", "climate") == 3
    assert config.protection.budget(Priority.HIGH) == 2
    assert config.protection.budget(Priority.LOW) == 4  # defaults kept
    assert config.protection.minimum_runtime == 1800
    assert config.protection.yield_lead == 1200
    assert not config.protection.preemptible_backfill
    assert ClusterConfig().protection.yield_lead == 900  # the default
    assert config.fair_share.half_life == 3 * 86400
    assert config.checkpoints.intervals["critical"] == 600
    assert config.checkpoints.intervals["medium"] == 3600
    assert config.checkpoints.bandwidth == 2 * 2**30
    assert config.recovery.backoff == (60.0, 120.0)
    assert config.recovery.strategies["crash"] == ("restart", "hold")
    assert config.recovery.strategies["oom"][0] == "more_memory"
    assert config.scenarios.eta == 2
    assert config.scenarios.weights["accuracy"] == 2
    assert config.maintenance[0].severity == "critical"
    assert config.maintenance[0].covers("n1", {"rack": "a"})
    assert not config.maintenance[0].covers("n2", {"rack": "b"})
    assert config.reservations[0].job_id == "coupled-1"
    assert config.reservations[0].count == 64


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("[protection]\nbudgets = { urgent = 1 }", "protection.budgets.urgent", "unknown priority"),
        ('[protection]\nminimum_runtime = "soon"', "protection.minimum_runtime", "not a duration"),
        ('[protection]\nyield_lead = "0s"', "protection.yield_lead", ""),
        (
            "[checkpoints]\nintervals = { extreme = 5 }",
            "checkpoints.intervals.extreme",
            "resilience",
        ),
        ('[checkpoints]\nbandwidth = "fast"', "checkpoints.bandwidth", ""),
        ("[checkpoints]\nmax_overhead = 0.9", "checkpoints.max_overhead", "0.5"),
        ("[fair_share]\nweight = 1", "fair_share", "weight"),
        ("[scenarios]\nrungs = [0.5, 0.2]", "scenarios.rungs", "increasing"),
        ('[recovery]\nstrategies = { crash = ["pray"] }', "recovery.strategies.crash", ""),
        (
            '[[maintenance]]\nname = "m"\nstart = 2027-03-10T08:00:00Z\nend = 2027-03-10T07:00:00Z',
            "maintenance[0].end",
            "after start",
        ),
        (
            '[[maintenance]]\nname = "m"\nstart = 2027-03-10T08:00:00\nend = 2027-03-10T09:00:00Z',
            "maintenance[0].start",
            "UTC offset",
        ),
        (
            '[[reservations]]\nname = "r"\nfor = "s"\nstart = 2027-03-10T08:00:00Z\n'
            'duration = "1h"',
            "reservations[0].nodes",
            "node count",
        ),
        ('cycle_interval = "2d"', "cycle_interval", "one day"),
        ("[owners]\nana = 3", "owners.ana", "object"),
        ("nonsense = [", "", "invalid TOML"),
    ],
)
def test_a_bad_cluster_toml_names_the_file_and_the_field(
    text: str, field: str, problem: str
) -> None:
    """Every mistake is refused with the file, the field path and what was expected."""
    with pytest.raises(ConfigurationError) as raised:
        parse_cluster_config(text, source="cluster.toml")
    message = str(raised.value)
    assert message.startswith("cluster.toml")
    assert field in message
    assert problem.lower() in message.lower()


def test_no_file_is_the_defaults_and_a_missing_file_is_named(tmp_path: Path) -> None:
    """No config gives the defaults; an unreadable one is refused naming it."""
    assert load_cluster_config(None).cycle_interval == 900
    with pytest.raises(ConfigurationError, match=r"missing\.toml: cannot read"):
        load_cluster_config(tmp_path / "missing.toml")


def stage(name: str, **fields: object) -> SimulationStage:
    return SimulationStage(name=name, command=["model", name], **fields)  # type: ignore[arg-type]


def test_a_simulation_is_one_job_whose_tasks_are_its_stages() -> None:
    """Stages become tasks with their resources, walltimes, nodes and dependencies; owner,
    project, resilience, checkpoint size and estimates travel as metadata."""
    sim = Simulation(
        name="ocean-ctl",
        owner="ana",
        project="climate",
        priority="high",
        resilience="high",
        checkpoint_size="50GiB",
        stages=[
            stage("atmosphere", cores=32, memory="64GiB", walltime="2d", estimate="30h"),
            stage("ocean", nodes=2, launch="leader", after=["atmosphere"], walltime="3d"),
            stage("analysis", after=["ocean"], when="residual < 1e-3"),
            stage("report", after_any=["analysis"]),
        ],
    )
    job = sim.to_job()
    assert job.job_id == "ocean-ctl"
    assert job.priority is Priority.HIGH
    assert [t.name for t in job.tasks] == ["atmosphere", "ocean", "analysis", "report"]
    assert job.tasks[0].max_runtime == 2 * 86400
    assert job.task_max_runtime(2) is None
    assert job.task_resources(0).cores == 32
    assert job.task_resources(0).memory == 64 * 2**30
    assert job.tasks[1].nodes == 2
    assert job.launch == "leader"
    assert job.tasks[0].command == ("model", "atmosphere")
    assert job.checkpointable
    assert job.preemptible
    edges = {(d.parent_task, d.child_task, d.condition, d.when) for d in job.dependencies}
    assert edges == {
        (0, 1, Condition.ON_SUCCESS, None),
        (1, 2, Condition.ON_SUCCESS, "residual < 1e-3"),
        (2, 3, Condition.ON_ANY_OUTCOME, None),
    }
    metadata = job.metadata_as(SimulationMetadata)
    assert (metadata.owner, metadata.project, metadata.resilience) == ("ana", "climate", "high")
    assert metadata.checkpoint_size == 50 * 2**30
    assert metadata.estimates == {"atmosphere": 30 * 3600}


@pytest.mark.parametrize(
    ("stages", "problem"),
    [
        ([stage("a"), stage("a")], "two stages named 'a'"),
        ([stage("a", after=["b"])], "not a stage"),
        ([stage("a", when="x < 1")], "'after'"),
        ([stage("b"), stage("a", after=["b"], when="x <")], "metric condition"),
        ([SimulationStage(name="a")], "no command"),
        ([stage("a", nodes=0)], "at least 1"),
        ([], "no stages"),
    ],
)
def test_a_malformed_simulation_is_refused_naming_the_stage(
    stages: list[SimulationStage], problem: str
) -> None:
    """A bad stage is refused before anything is submitted, saying which and why."""
    with pytest.raises(ConfigurationError, match=problem):
        Simulation(name="s", owner="o", project="p", stages=stages).to_job()


def test_the_templates_build_the_usual_shapes() -> None:
    """Linear chain, fan-out/fan-in and the conditional branch wire the stages as named."""
    chain = linear_chain("c", [stage("a"), stage("b"), stage("c")], owner="o", project="p")
    assert [(d.parent_task, d.child_task) for d in chain.to_job().dependencies] == [(0, 1), (1, 2)]
    fan = fan_out_fan_in(
        "f",
        stage("prep"),
        [stage(f"m{k}") for k in range(3)],
        stage("gather"),
        owner="o",
        project="p",
    )
    edges = sorted((d.parent_task, d.child_task) for d in fan.to_job().dependencies)
    assert edges == [(0, 1), (0, 2), (0, 3), (1, 4), (2, 4), (3, 4)]
    branch = conditional_branch(
        "b",
        stage("solve"),
        "residual < 1e-3",
        then=[stage("publish")],
        otherwise=[stage("refine"), stage("resolve")],
        finally_=stage("report"),
        owner="o",
        project="p",
    ).to_job()
    when = {(d.parent_task, d.child_task): d.when for d in branch.dependencies}
    assert when[(0, 1)] == "residual < 1e-3"
    assert when[(0, 2)] == "residual >= 0.001"
    assert when[(2, 3)] is None
    anyway = {
        (d.parent_task, d.child_task)
        for d in branch.dependencies
        if d.condition is Condition.ON_ANY_OUTCOME
    }
    assert anyway == {(1, 4), (3, 4)}


def test_a_sweep_is_a_scenario_of_one_simulation_per_grid_point() -> None:
    """Every combination of the grid, keys sorted, each a member with its parameters and
    the sweep's concurrency cap."""
    sweep = parameter_sweep(
        "mix",
        {"kappa": [0.1, 0.2], "alpha": [1, 2, 3]},
        lambda p: [stage("run", args=[f"--kappa={p['kappa']}", f"--alpha={p['alpha']}"])],
        max_concurrent=4,
        owner="o",
        project="p",
    )
    jobs = sweep.to_jobs()
    assert len(jobs) == 6
    assert jobs[0].job_id == "mix-0"
    assert jobs[5].job_id == "mix-5"
    first = jobs[0].metadata_as(SimulationMetadata)
    assert first.sweep == "mix"
    assert first.max_concurrent == 4
    assert first.parameters == {"alpha": 1.0, "kappa": 0.1}
    assert jobs[0].tasks[0].command[-2:] == ("--kappa=0.1", "--alpha=1.0")
    assert {j.metadata_as(SimulationMetadata).member for j in jobs} == {
        f"alpha={a},kappa={k}" for a in (1, 2, 3) for k in (0.1, 0.2)
    }


def test_stages_added_to_a_simulation_depend_on_its_stages() -> None:
    """An extension is a new job whose stages wait on the simulation's by name."""
    sim = linear_chain("ocean", [stage("spinup"), stage("main")], owner="ana", project="climate")
    extra = extension(
        sim,
        [stage("plots", after=["main"], when="residual < 0.1"), stage("archive", after=["plots"])],
        name="ocean-extra",
    )
    outside = [d for d in extra.dependencies if d.parent == "ocean"]
    inside = [d for d in extra.dependencies if d.parent == "ocean-extra"]
    assert [(d.parent_task, d.child_task, d.when) for d in outside] == [(1, 0, "residual < 0.1")]
    assert [(d.parent_task, d.child_task) for d in inside] == [(0, 1)]
    assert extra.metadata_as(SimulationMetadata).owner == "ana"
    with pytest.raises(ConfigurationError, match="no stage 'nope'"):
        extension(sim, [stage("x", after=["nope"])], name="bad")


def test_the_metadata_refuses_what_the_policy_cannot_use() -> None:
    """An unknown resilience level is refused at decode (the engine names the field)."""
    with pytest.raises(msgspec.ValidationError, match="resilience"):
        msgspec.json.decode(b'{"resilience": "extreme"}', type=SimulationMetadata)
