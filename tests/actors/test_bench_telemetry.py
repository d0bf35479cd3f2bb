"""The telemetry benchmark suite: registered, and its parts run (a smoke test, not a timing)."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import structlog

from actors.bench._telemetry import SUITE, _run, _simulated_day
from runtime._bench import BenchContext


def test_the_suite_is_registered_as_telemetry() -> None:
    """``taskfarm bench telemetry`` finds the suite through its entry point."""
    [entry] = [ep for ep in entry_points(group="taskfarm.benchmarks") if ep.name == "telemetry"]
    assert entry.load() is SUITE


async def test_a_simulated_hour_fills_the_usage_store(tmp_path: Path) -> None:
    """An hour of 200 agents' samples makes a usage store far smaller than the raw samples."""
    size, minutes_share, raw_per_day = await _simulated_day(
        BenchContext(workdir=tmp_path, quick=True), 1 / 24
    )
    assert 0 < size < raw_per_day / 24
    assert 0.9 < minutes_share <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_simulated_agents_over_loopback_are_read_and_measured(tmp_path: Path) -> None:
    """200 simulated agent connections deliver their samples to a real coordinator, whose CPU
    share is measured and whose journal does not grow with them."""
    with structlog.testing.capture_logs():
        cpu, journal_per_day, read = await _run(
            BenchContext(workdir=tmp_path, quick=True),
            "smoke",
            heartbeat=10.0,
            sample_every=1,
            window=10.0,
        )
    assert math.isfinite(cpu)
    assert 0 < cpu < 1
    assert journal_per_day <= 2**20  # nothing per sample (the figure says 0 MB/day)
    assert read >= 150  # 200 agents x one sample per 10 s, less the window's edges
