"""A task whose command uses ``{frame}`` runs one real process per frame of its chunk."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from actors import (
    ENGINE_CODEC,
    Resources,
    TaskCompleted,
    TaskFailed,
    open_engine,
    open_subprocess_executor,
    parse_spec,
)
from persistence import Event, InMemoryJournal
from runtime import SystemClock

WRITE_FRAME = (
    "import pathlib, sys; frame = int(sys.argv[1]); "
    "sys.exit(3) if frame == int(sys.argv[3]) else None; "
    "print('@taskfarm progress 0.5', flush=True); "
    "pathlib.Path(sys.argv[2], f'{frame:04d}.txt').write_text(str(frame))"
)


def _spec(out: Path, *, fail_at: int) -> str:
    python = sys.executable.replace("\\", "/")
    return f"""
[[jobs]]
name = "frames"
frames = "1-6"
chunk = 3
command = ["{python}", "-c", "{WRITE_FRAME}", "{{frame}}", "{out.as_posix()}", "{fail_at}"]
resources = {{ cores = 1, memory = "64MiB" }}
retries = {{ max_attempts = 1 }}
"""


async def _run(tmp_path: Path, *, fail_at: int) -> tuple[str, list[Event]]:
    clock = SystemClock()
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    out = tmp_path / "frames"
    out.mkdir()
    spec = parse_spec(_spec(out, fail_at=fail_at), fmt="toml", source="frames.toml")
    async with (
        open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "checkpoints", clock=clock
        ) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", Resources.of(cores=2, memory="1GiB"), executor=executor)
        [job_id] = await engine.submit(spec.to_commands().jobs)
        with anyio.fail_after(60):
            summary = await engine.wait_job(job_id)
        events = [r.event for r in await journal.read_stream(f"job:{job_id}")]
    return summary.status, events


async def test_each_frame_of_a_chunk_runs_as_its_own_process(tmp_path: Path) -> None:
    """Two chunks of three frames write six files, one process per frame."""
    status, events = await _run(tmp_path, fail_at=0)
    assert status == "completed"
    written = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert written == [f"{f:04d}.txt" for f in range(1, 7)]
    assert sum(isinstance(e, TaskCompleted) for e in events) == 2


async def test_a_failing_frame_stops_its_chunk_with_its_exit_code(tmp_path: Path) -> None:
    """Frame 5 exits 3: its chunk fails (frame 6 never runs), the other chunk completes."""
    status, events = await _run(tmp_path, fail_at=5)
    assert status == "failed"
    written = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert "0006.txt" not in written
    assert "0004.txt" in written
    failures = [e for e in events if isinstance(e, TaskFailed)]
    assert [f.exit_code for f in failures] == [3]
