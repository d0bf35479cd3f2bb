"""The README's scientific section keeps its promises: its cluster.toml is valid and its worked
example runs as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio
import pytest

from domains.scientific import parse_cluster_config

README = Path(__file__).resolve().parents[3] / "README.md"


def section() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"## Scientific computing.*?(?=\n## )", text, re.S)
    assert found is not None, "the README has no scientific section"
    return found.group(0)


def test_the_readme_cluster_toml_is_valid() -> None:
    """The example cluster.toml parses, with its windows and reservations."""
    block = re.search(r"```toml\n(.*?)```", section(), re.S)
    assert block is not None
    config = parse_cluster_config(block.group(1), source="README cluster.toml")
    assert config.maintenance[0].name == "rack-a"
    assert config.reservations[0].count == 64


@pytest.mark.slow
async def test_the_worked_example_runs_as_written(tmp_path: Path) -> None:
    """The example finishes the reserved run, finds the best sweep member and writes the
    capacity report with its charts."""
    block = re.search(r"### Worked example.*?```python\n(.*?)```", section(), re.S)
    assert block is not None
    script = tmp_path / "example.py"
    script.write_text(block.group(1), encoding="utf-8")
    with anyio.fail_after(300):
        done = await anyio.run_process(
            [sys.executable, str(script), "--log-level", "warning"], cwd=tmp_path, check=False
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = [line for line in out.splitlines() if not line.startswith("20")]
    assert lines[:2] == ["completed", "1 mixing-5 done"]
    for name in ("report.csv", "report.json", "report.png", "report.svg"):
        assert (tmp_path / "capacity" / name).stat().st_size > 0
