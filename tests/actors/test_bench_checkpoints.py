"""The checkpoint benchmark suite runs at its quick sizes (a smoke test, not a timing)."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from pathlib import Path

from actors.bench import CHECKPOINTS_SUITE
from runtime._bench import BenchContext, format_table


def test_the_suite_is_registered_as_checkpoints() -> None:
    """``taskfarm bench checkpoints`` finds the suite through its entry point."""
    [entry] = [ep for ep in entry_points(group="taskfarm.benchmarks") if ep.name == "checkpoints"]
    assert entry.load() is CHECKPOINTS_SUITE


async def test_quick_run_measures_verification_beside_sha256sum(tmp_path: Path) -> None:
    """A quick run reports our SHA-256 verification in MB/s beside sha256sum of the same
    files, both positive and finite."""
    progress: list[str] = []
    (figure,) = await CHECKPOINTS_SUITE(
        BenchContext(workdir=tmp_path, quick=True, progress=progress.append)
    )
    assert figure.unit == "MB/s"
    assert math.isfinite(figure.value)
    assert figure.value > 0
    assert figure.baseline_name == "sha256sum of the same files"
    assert figure.baseline_value is not None
    assert figure.baseline_value > 0
    assert progress
    assert "checkpoint verification (SHA-256)" in format_table([figure])
