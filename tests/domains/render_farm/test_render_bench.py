"""``taskfarm bench render``: the trace it promises, the baselines beside the policy, one small
run measured from its journal, and the worker process each policy runs in (smoke tests of the
measurement, not timings)."""

from __future__ import annotations

import statistics
import sys
from importlib.metadata import entry_points

import anyio
import msgspec
import pytest

from domains.render_farm import parse_farm_config
from domains.render_farm._bench import (
    _RUNS,
    AFFINITY,
    FARM_TOML,
    STEP,
    SUITE,
    RunResult,
    _policy_for,
    figures,
    main,
    make_trace,
    run_trace,
)
from domains.render_farm._policy import RenderFarmPolicy


def test_the_suite_is_registered_as_render() -> None:
    """``taskfarm bench render`` finds the suite through its entry point."""
    [entry] = [ep for ep in entry_points(group="taskfarm.benchmarks") if ep.name == "render"]
    assert entry.load() is SUITE


def test_the_trace_is_the_one_promised_and_seeded() -> None:
    """200 nodes of 3 classes, 2,000 jobs each with a deadline, 3 clients guaranteed 50/30/20 %,
    node failures, a node x job-type speed matrix (varying within a class) that the policy's
    configuration does not contain; times on the trace's steps; the same seed, the same week."""
    trace = make_trace()
    assert len(trace.nodes) == 200
    assert {n.node_class for n in trace.nodes} == set(AFFINITY)
    assert len(trace.jobs) == 2000
    assert all(job.deadline_s > job.submit_s for job in trace.jobs)
    assert {job.client for job in trace.jobs} == {"north", "east", "west"}
    config = parse_farm_config(FARM_TOML.replace("{mode}", "balanced"), source="bench")
    assert config.guarantees() == pytest.approx({"north": 0.5, "east": 0.3, "west": 0.2})
    assert len(trace.failures) >= 20
    assert all(at % STEP == 0 and down % STEP == 0 for at, _, down in trace.failures)
    assert all(job.submit_s % STEP == 0 for job in trace.jobs)
    std_vfx = [trace.speed[(n.name, "vfx")] for n in trace.nodes if n.node_class == "std"]
    assert statistics.pstdev(std_vfx) > 0.1  # nodes of a class differ: there is a truth to learn
    assert "speed" not in msgspec.json.encode(config).decode()
    assert 0.9 < sum(job.feasible for job in trace.jobs) / len(trace.jobs) < 1.0
    again = make_trace()
    assert again.jobs == trace.jobs
    assert again.failures == trace.failures
    assert make_trace(seed=7).jobs != trace.jobs


@pytest.mark.slow
async def test_a_small_run_under_every_policy_gives_every_figure_beside_its_baselines() -> None:
    """A day on 12 nodes under all seven policies: every job finishes, the render policy never
    places above a client's maximum, and each comparison figure names its same-run baseline."""
    trace = make_trace(nodes=12, jobs=25, hours=24)
    results: dict[str, RunResult] = {}
    for label in _RUNS:
        policy = _policy_for(label)
        holds = policy.holds if isinstance(policy, RenderFarmPolicy) else None
        results[label] = await run_trace(trace, policy, label, holds=holds)
    for label, result in results.items():
        assert result.unfinished == 0, label
        assert result.render_h > 0, label
        if label.startswith("render-farm"):
            assert result.above_maximum == 0, label
    table = {figure.name: figure for figure in figures(results, trace)}
    assert table["feasible deadlines met, render-farm (balanced)"].baseline_name == "FIFO"
    assert table["render time of the frames, render-farm (balanced)"].baseline_name == (
        "random placement"
    )
    assert table["energy cost, night-savings"].baseline_name == "performance mode"
    priority_only = str(results["priority-only"].missed_feasible)
    assert f"priority-only {priority_only}" in (
        table["missed feasible deadlines, render-farm (balanced)"].note
    )
    assert sum(name.startswith("simulated week, ") for name in table) == len(_RUNS)


def test_the_worker_refuses_an_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m domains.render_farm._bench NAME`` names the runs it knows."""
    assert main(["LIFO"]) == 2
    assert "render-farm night-savings" in capsys.readouterr().out


@pytest.mark.slow
async def test_the_worker_prints_its_result_as_the_last_line() -> None:
    """Each policy of the suite runs in a process of its own and hands back its measurement."""
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "domains.render_farm._bench", "random placement", "--quick"]
        )
    result = msgspec.json.decode(done.stdout.splitlines()[-1], type=RunResult)
    assert result.label == "random placement"
    assert result.with_deadline == 150
    assert result.unfinished == 0
