"""The README's promises: its embedding example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _embedding_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Embedding.*?```python\n(.*?)```", text, re.S)
    assert match is not None, "the README has no embedding example"
    return match.group(1)


def test_embedding_example_runs_and_refuses_a_duplicate(tmp_path: Path) -> None:
    """The example completes its job, and a second run refuses the same job id."""
    script = tmp_path / "example.py"
    script.write_text(_embedding_example(), encoding="utf-8")
    first = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "shot-010 completed {'completed': 8}"
    second = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert second.returncode != 0
    assert "shot-010" in second.stderr
    assert "already exists" in second.stderr


def test_the_policy_example_defers_energy_work_to_the_night(tmp_path: Path) -> None:
    """The "Writing a policy" example starts the preview at once and the simulation at 22:00."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Writing a policy.*?```python\n(.*?)```", text, re.S)
    assert match is not None, "the README has no policy example"
    script = tmp_path / "policy.py"
    script.write_text(match.group(1), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["preview", "09:00", "simulation", "22:00"]
