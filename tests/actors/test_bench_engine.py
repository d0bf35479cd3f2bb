"""The engine benchmark suite runs end to end at its quick sizes (a smoke test, not a timing)."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import structlog

from actors import ENGINE_CODEC, FifoPolicy, JobAggregate, JobState
from actors.bench._engine import SUITE, _build_restart_journal, _drain, _gang_width
from actors.engine import SchedulerCore
from persistence import open_sqlite_journal
from runtime import SystemClock
from runtime._bench import BenchContext, format_table


def test_the_suite_is_registered_as_engine() -> None:
    """``taskfarm bench engine`` finds the suite through its entry point."""
    [entry] = [ep for ep in entry_points(group="taskfarm.benchmarks") if ep.name == "engine"]
    assert entry.load() is SUITE


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_quick_run_reports_positive_named_figures(tmp_path: Path) -> None:
    """Every figure of a quick run has a name, a unit and a positive finite value and baseline."""
    progress: list[str] = []
    # Thousands of attempts log at info level: keep them in memory, not in the test output.
    with structlog.testing.capture_logs():
        figures = await SUITE(BenchContext(workdir=tmp_path, quick=True, progress=progress.append))
    names = [figure.name for figure in figures]
    assert len(names) == len(set(names)) == 15
    for figure in figures:
        assert figure.name
        assert figure.unit
        assert math.isfinite(figure.value), figure
        assert figure.value > 0, figure
        assert figure.baseline_name, figure
        assert figure.baseline_value is not None, figure
        assert figure.baseline_value > 0, figure
    assert progress
    assert "placement decision latency p99" in format_table(figures)
    assert any(name.startswith("gang placement, ") for name in names)


def test_gang_workload_is_one_job_in_ten_on_two_to_eight_nodes() -> None:
    """The gang placement figure's queue: 10 % of the jobs span 2-8 nodes, and all of it drains."""
    widths = [_gang_width(number) for number in range(100)]
    assert sum(width > 1 for width in widths) == 10
    assert {width for width in widths if width > 1} <= set(range(2, 9))
    assert len({width for width in widths if width > 1}) == 7
    core = SchedulerCore(FifoPolicy())
    drained = _drain(core, tasks=2_000, nodes=100, release=20, per_job=100, gang=_gang_width)
    assert drained.placed == 2_000
    assert drained.gangs == 200  # 2 of the 20 jobs, 100 tasks each


async def test_the_restart_journal_has_the_snapshots_a_restart_can_use(tmp_path: Path) -> None:
    """Every finished job of the cold-restart journal has its final state as a snapshot at the
    job aggregate's schema version (one a restart loads, not one it skips)."""
    path = tmp_path / "restart.db"
    with structlog.testing.capture_logs():
        await _build_restart_journal(path, events=20_000, unfinished=1_000)
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=ENGINE_CODEC, read_only=True
    ) as journal:
        finished = unfinished = 0
        for info in await journal.streams():
            if not info.stream_id.startswith("job:"):
                continue
            loaded = await journal.load_snapshot(
                info.stream_id, JobState, schema_version=JobAggregate.schema_version
            )
            if loaded is not None and loaded[1].status == "completed":
                assert loaded[0] == info.version
                finished += 1
            else:
                unfinished += 1
    assert finished > 0
    assert unfinished == 2  # 1,000 unfinished tasks, 500 a job
