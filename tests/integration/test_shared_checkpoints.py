"""Checkpoints that survive their host, end to end: three real agents share a checkpoint folder
(``taskfarm agent --checkpoint-dir``); the agent running a checkpointing stage is SIGKILLed
mid-run and another resumes it from the last valid checkpoint -- or, when the latest one's
bytes were flipped meanwhile, from the one before, saying so -- and the result equals an
uninterrupted run's.  Only the last three checkpoints stay on the shared disk."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from actors import JobSummary, TaskAssigned, TaskStarted

if TYPE_CHECKING:
    from conftest import Cluster

PYTHON = sys.executable
STEPPER = Path(__file__).resolve().parents[1] / "actors" / "workloads" / "stepper.py"
ARGS = ("--steps", "100", "--every", "10", "--size", str(256 * 1024))


def spec(output: Path) -> str:
    command = [PYTHON, str(STEPPER), *ARGS, "--pause-at", "50", "--output", str(output)]
    return f"""
[[jobs]]
name = "steps"
checkpointable = true
checkpoint_retention = 3
command = {json.dumps(command)}
resources = {{ cores = 1, memory = "64MiB" }}
"""


def steps_on_disk(folder: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in folder.glob("step-*"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["intact", "flipped"])
async def test_a_stage_resumes_on_another_agent_from_its_last_valid_checkpoint(
    cluster: Cluster, damage: str
) -> None:
    """SIGKILL the agent whose stage paused after checkpoint 50 (30, 40 and 50 kept; 10 and
    20 deleted): another agent resumes from 50, or -- with a byte of 50 flipped -- re-verifies
    it, refuses it and resumes from 40, saying so; the result equals an uninterrupted run's
    and the shared folder keeps only the last three checkpoints."""
    shared = cluster.root / "shared-checkpoints"
    output = cluster.root / "result.json"
    cluster.start_coordinator(heartbeat_timeout=2.0)
    for name in ("a1", "a2", "a3"):
        cluster.start_agent(name, extra=("--checkpoint-dir", str(shared)))
    await cluster.wait_online("a1", "a2", "a3")
    await cluster.submit(spec(output))

    def paused(job: JobSummary) -> bool:
        (task,) = job.tasks
        return (task.checkpoint or "").endswith("step-000050")

    before = await cluster.wait_job("steps", paused, what="checkpoint 50 journaled")
    (task,) = before.tasks
    folder = shared / "steps" / "0"
    assert [Path(c).name for c in task.checkpoints] == ["step-000030", "step-000040", "step-000050"]
    runner = task.node
    assert runner is not None
    await cluster.wait_for_log(
        f"agent-{runner}", "checkpoints_deleted", checkpoints=[str(folder / "step-000020")]
    )
    assert steps_on_disk(folder) == [30, 40, 50]
    if damage == "flipped":
        data = folder / "step-000050" / "data.bin"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    cluster.kill_agent(runner)

    (done,) = (await cluster.wait_finished("steps", limit=120.0)).values()
    assert done.status == "completed", done
    records = await cluster.journal_events()
    stream = [r.event for r in records if r.stream_id == "job:steps"]
    attempts = [e for e in stream if isinstance(e, TaskAssigned)]
    assert len(attempts) == 2
    assert attempts[0].node == runner
    assert attempts[1].node != runner
    assert attempts[1].resume_from == str(folder / "step-000050")
    started = [e for e in stream if isinstance(e, TaskStarted)]
    resumed = started[-1]
    if damage == "intact":
        assert resumed.resumed_from == str(folder / "step-000050")
        assert resumed.refused == ()
    else:
        assert resumed.resumed_from == str(folder / "step-000040")
        assert resumed.refused == (str(folder / "step-000050"),)
        assert resumed.fallback is not None
        assert "SHA-256 differs" in resumed.fallback
        assert "resuming from the one before" in resumed.fallback
        # The refused 50 is out of the kept ones for good: its files went before the resume
        # (the program then wrote a new 50 in the same folder).
        assert resumed.deleted == (str(folder / "step-000050"),)
        (final,) = (await cluster.status("steps"))[0].tasks
        assert final.resume_note == f"{resumed.fallback}; deleted the refused {resumed.deleted[0]}"
        fell_back = await cluster.wait_for_log(f"agent-{attempts[1].node}", "checkpoint_fallback")
        assert fell_back["resume_from"] == str(folder / "step-000040")

    # The same program, uninterrupted, in one process.
    alone = cluster.root / "alone.json"
    env = {**os.environ, "TASKFARM_CHECKPOINT_DIR": str(cluster.root / "alone-checkpoints")}
    await anyio.run_process([PYTHON, str(STEPPER), *ARGS, "--output", str(alone)], env=env)
    assert json.loads(output.read_text()) == json.loads(alone.read_text())
    assert json.loads(output.read_text())["step"] == 100
    # The last three stay; the rest (the one resumed from too, once its attempt ended) went.
    assert steps_on_disk(folder) == [80, 90, 100]
    (final,) = (await cluster.status("steps"))[0].tasks
    assert [Path(c).name for c in final.checkpoints] == [
        "step-000080",
        "step-000090",
        "step-000100",
    ]
