"""The heat simulation's checkpoints under a real subprocess executor (an agent's): reported
with manifests, verified and retained by the executor, and a damaged newest one skipped by the
executor's fallback before the program ever sees it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio

from actors import AttemptCheckpointed, AttemptSpec, AttemptStarted, open_subprocess_executor
from actors.executors import CheckpointRecord
from domains.scientific.heat_simulation import load_checkpoint
from runtime import SystemClock

STEPS = ["--steps", "200", "--checkpoint-every", "50", "--size", "16"]


class Reports:
    """A report sink that keeps every report."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def __call__(self, report: Any) -> None:
        self.items.append(report)

    def of(self, kind: type[Any]) -> list[Any]:
        return [r for r in self.items if isinstance(r, kind)]


def _spec(out: Path, attempt: int, **fields: Any) -> AttemptSpec:
    argv = (sys.executable, "-m", "domains.scientific.heat_simulation", "--stage", "main")
    return AttemptSpec(
        job_id="heat",
        task_id="main",
        attempt=attempt,
        fencing_token=attempt,
        argv=(*argv, *STEPS, "--output", str(out)),
        checkpointable=True,
        checkpoint_retention=2,
        **fields,
    )


def _grid(path: Path) -> object:
    return json.loads(path.read_text())["grid"]


async def test_the_agent_verifies_retains_and_falls_back_for_the_heat_simulation(
    tmp_path: Path,
) -> None:
    """The executor verifies each checkpoint's manifest and keeps the job's last two (the
    program deletes none under it); with a byte of the newest flipped, the next attempt is
    resumed by the executor from the one before, the program never sees the damaged one, and
    the result equals the uninterrupted run's."""
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=SystemClock()
    ) as executor:
        first = Reports()
        spec = _spec(tmp_path / "first", 1)
        with anyio.fail_after(60):
            finished = await (await executor.start(spec, first)).wait()
        assert finished.outcome == "completed"
        folder = executor.checkpoint_dir(spec)
        records = first.of(AttemptCheckpointed)
        names = [Path(r.checkpoint).name for r in records]
        assert names == [f"main-{step:08d}.ckpt" for step in (50, 100, 150)]
        assert all(r.manifest is not None and len(r.manifest.files) == 1 for r in records)
        # The executor deleted the checkpoint (and manifest) the job no longer keeps.
        assert sorted(p.name for p in folder.iterdir()) == [
            "main-00000100.ckpt",
            "main-00000100.manifest.json",
            "main-00000150.ckpt",
            "main-00000150.manifest.json",
        ]

        previous, newest = (Path(r.checkpoint) for r in records[-2:])
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0x04
        newest.write_bytes(bytes(data))

        second = Reports()
        retry = _spec(
            tmp_path / "second",
            2,
            resume_from=str(newest),
            checkpoints=tuple(
                CheckpointRecord(checkpoint=r.checkpoint, manifest=r.manifest) for r in records[-2:]
            ),
        )
        with anyio.fail_after(60):
            finished = await (await executor.start(retry, second)).wait()
        assert finished.outcome == "completed"
    (started,) = second.of(AttemptStarted)
    assert started.resumed_from == str(previous)
    assert started.refused == (str(newest),)
    assert started.fallback is not None
    assert "SHA-256 differs" in started.fallback
    log = executor.log_path(retry).read_text()
    step = load_checkpoint(previous).step
    assert f"resuming from step {step} ({previous})" in log
    assert "invalid checkpoint" not in log  # the executor caught it, not the program
    assert _grid(tmp_path / "second" / "main.json") == _grid(tmp_path / "first" / "main.json")
