"""``taskfarm bench science``: the trace it promises, and one small run measured from its journal
(a smoke test, not a timing)."""

from __future__ import annotations

from importlib.metadata import entry_points

from domains.scientific import parse_cluster_config
from domains.scientific._bench import CONFIG, SUITE, Fifo, build_trace, run_trace
from domains.scientific._policy import SciencePolicy


def test_the_suite_is_registered_as_science() -> None:
    """``taskfarm bench science`` finds the suite through its entry point."""
    [entry] = [ep for ep in entry_points(group="taskfarm.benchmarks") if ep.name == "science"]
    assert entry.load() is SUITE


def test_the_trace_is_the_one_promised_and_seeded() -> None:
    """300 nodes, 90 days, 120 simulations, a 64-member sweep, 8 reservations, 4 windows of
    each severity, failures at a fixed MTBF; the same seed gives the same trace."""
    trace = build_trace()
    names = [sim.name for _, sim in trace.submissions]
    assert sum(n.startswith("sim-") for n in names) == 120
    assert sum(n.startswith("mix-") for n in names) == 64
    assert len(trace.reservations) == 8
    assert sorted(w["severity"] for _, w in trace.windows) == [
        "critical",
        "major",
        "major",
        "minor",
    ]
    assert 100 < len(trace.failures) < 400  # 300 nodes x 90 days / a 120-day MTBF
    again = build_trace()
    assert [s.to_job() for _, s in again.submissions] == [s.to_job() for _, s in trace.submissions]
    assert again.failures == trace.failures


async def test_a_small_run_measures_its_figures_from_the_journal() -> None:
    """A 10-day run on 40 nodes completes work, starts its reservation on time, checkpoints
    within the overhead share and breaks no protection rule; FIFO runs the same trace."""
    trace = build_trace(nodes=40, days=12, sims=8, sweep=9)
    science, records = await run_trace(trace, SciencePolicy(parse_cluster_config(CONFIG)))
    assert records
    assert science.completed > 0
    if science.samples:  # samples are taken only while placeable work waits
        assert 0 < science.utilization <= 1
    assert science.overhead < 0.02
    assert sum(science.violations.values()) == 0
    assert science.lost_beyond_interval == 0  # no failure lost more than its interval
    assert science.late == 0
    assert science.reservations == 1
    fifo, _ = await run_trace(trace, Fifo())
    assert fifo.completed > 0
