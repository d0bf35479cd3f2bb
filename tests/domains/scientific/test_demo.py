"""``taskfarm demo`` runs its heat simulation under the science policy, on real agents."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest


@pytest.mark.slow
async def test_the_demo_runs_its_simulation_under_the_science_policy(tmp_path: Path) -> None:
    """The demo's first coordinator uses the science policy, its simulation completes its
    three stages, then the render farm's two shots complete."""
    with anyio.fail_after(300):
        result = await anyio.run_process(
            [sys.executable, "-m", "runtime.cli", "demo", "--frames", "3", "--dir", str(tmp_path)],
            check=False,
        )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "policy science" in output
    # The simulation; the shots run on a render farm of their own (domains.render_farm).
    assert "1 of 1 jobs completed" in output
    assert "render farm: 2 of 2 shots completed" in output
    simulation = tmp_path / "output" / "run-1" / "simulation"
    assert {p.name for p in simulation.glob("*.json")} == {
        "spinup.json",
        "main.json",
        "analysis.json",
    }
