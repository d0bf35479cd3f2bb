"""The render farm part of ``taskfarm demo``: a coordinator with the render-farm policy, real
agent processes, two clients' shots with deadlines, previews first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

# Run in a process of its own, as ``taskfarm demo`` is: the coordinator's local agents are
# that process's children.
SCRIPT = """
import json, sys
from pathlib import Path
import anyio
from domains.render_farm import run_render_demo

lines = []
demo = anyio.run(lambda: run_render_demo(
    Path(sys.argv[1]), frames=6, agents=2, run=1, show=lines.append
))
print(json.dumps({
    "lines": lines, "statuses": demo.statuses, "verdicts": demo.verdicts,
    "previews": demo.previews, "first": demo.first_preview_s, "jobs": demo.jobs,
    "journal": str(demo.journal),
}))
"""


@pytest.mark.slow
async def test_the_demo_renders_two_clients_shots_previews_first_with_verdicts(
    tmp_path: Path,
) -> None:
    """Both shots complete on real agents; each has a deadline verdict and its effective
    priority, previews on disk, and its first preview before its last frame."""
    with anyio.fail_after(240):
        done = await anyio.run_process([sys.executable, "-c", SCRIPT, str(tmp_path)], check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    demo = json.loads(done.stdout.splitlines()[-1])
    assert demo["statuses"] == {"shot010-1": "completed", "shot020-1": "completed"}
    assert any("studio-a" in line for line in demo["lines"])
    assert any("studio-b" in line for line in demo["lines"])
    for job in demo["jobs"]:
        verdict = demo["verdicts"][job]
        assert verdict.split(" (")[0] in ("will meet", "at risk", "will miss"), verdict
        assert "(priority " in verdict
        assert demo["previews"][job], job
        assert not _missing(demo["previews"][job])
        assert job in demo["first"]
    # The tight shot (due in 45 s, base low) is lifted by its deadline.
    assert "priority low" not in demo["verdicts"]["shot020-1"]
    assert not _missing([str(tmp_path / "farm.toml"), demo["journal"]])


def _missing(paths: list[str]) -> list[str]:
    return [path for path in paths if not Path(path).exists()]
