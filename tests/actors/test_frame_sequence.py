"""A task whose command uses ``{frame}`` runs one real process per frame of its chunk, and an
interrupted chunk resumes after its last finished frame."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptCheckpointed,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    Resources,
    TaskCompleted,
    TaskFailed,
    open_engine,
    open_subprocess_executor,
    parse_spec,
)
from actors.executors import FRAME_SEQUENCE
from actors.executors._frame_runner import checkpoint_token, parse_token
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


# -- resuming a sequence ------------------------------------------------------------------------

FRAME = """\
import os, pathlib, sys, time
frame, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
def note(text):
    with open(out / "runs.log", "a") as log:
        log.write(text + "\\n")
note(f"start {frame} resume={os.environ.get('TASKFARM_RESUME_FROM', '')}")
if frame == 4 and not (out / "release").exists():
    print("@taskfarm checkpoint half-of-4", flush=True)
    print("@taskfarm progress 0.5 waiting", flush=True)
    while not (out / "release").exists():
        time.sleep(0.02)
(out / f"{frame:04d}.txt").write_text(str(frame))
note(f"done {frame}")
"""


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, (0, None)),
        ("taskfarm-frames:3/6", (3, None)),
        ("taskfarm-frames:3/6:half:of:4", (3, "half:of:4")),
        ("taskfarm-frames:0/6:inner", (0, "inner")),
        ("taskfarm-frames:3/5", (0, None)),  # another sequence's
        ("taskfarm-frames:7/6", (0, None)),
        ("taskfarm-frames:x/6", (0, None)),
        ("/some/renderer/checkpoint", (0, None)),
    ],
)
def test_frame_checkpoint_tokens_parse(token: str | None, expected: tuple[int, str | None]) -> None:
    """A token names the frames done (and the running frame's own checkpoint); a token of
    another sequence resumes nothing."""
    assert parse_token(token, 6) == expected
    if expected != (0, None):
        assert parse_token(checkpoint_token(expected[0], 6, expected[1]), 6) == expected


async def test_an_interrupted_sequence_resumes_after_its_last_finished_frame(
    tmp_path: Path,
) -> None:
    """Interrupted in frame 4 of 6 and resumed from its checkpoint, the sequence runs frames 1-3
    once, frame 4 again from the frame's own checkpoint, then 5 and 6: each completes once."""
    out = tmp_path / "out"
    out.mkdir()
    frames = [[sys.executable, "-c", FRAME, str(frame), str(out)] for frame in range(1, 7)]
    argv = (FRAME_SEQUENCE, json.dumps(frames))
    ident: dict[str, Any] = {"job_id": "seq", "task_id": "0", "fencing_token": 1}
    reports: list[AttemptReport] = []
    changed = anyio.Event()

    async def sink(report: AttemptReport) -> None:
        nonlocal changed
        reports.append(report)
        changed.set()
        changed = anyio.Event()

    async with open_subprocess_executor(
        log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "checkpoints"
    ) as executor:
        first = await executor.start(
            AttemptSpec(attempt=1, argv=argv, checkpointable=True, **ident), sink
        )
        with anyio.fail_after(30):
            while not any(
                isinstance(r, AttemptProgress) and r.message == "waiting" for r in reports
            ):
                await changed.wait()
            await first.terminate(5.0)
            interrupted = await first.wait()
        checkpoints = [r.checkpoint for r in reports if isinstance(r, AttemptCheckpointed)]
        assert checkpoints == [
            "taskfarm-frames:1/6",
            "taskfarm-frames:2/6",
            "taskfarm-frames:3/6",
            "taskfarm-frames:3/6:half-of-4",
        ]
        assert interrupted.outcome == "cancelled"
        assert interrupted.checkpoint == "taskfarm-frames:3/6:half-of-4"

        (out / "release").touch()
        second = await executor.start(
            AttemptSpec(attempt=2, argv=argv, resume_from=interrupted.checkpoint, **ident), sink
        )
        with anyio.fail_after(30):
            resumed = await second.wait()
    assert resumed.outcome == "completed"
    assert resumed.checkpoint == "taskfarm-frames:6/6"
    runs = (out / "runs.log").read_text().splitlines()
    started = Counter(int(line.split()[1]) for line in runs if line.startswith("start"))
    assert started == {1: 1, 2: 1, 3: 1, 4: 2, 5: 1, 6: 1}
    done = Counter(int(line.split()[1]) for line in runs if line.startswith("done"))
    assert done == dict.fromkeys(range(1, 7), 1)
    resumes = [line for line in runs if line.startswith("start") and "resume=" in line]
    assert resumes[4:] == ["start 4 resume=half-of-4", "start 5 resume=", "start 6 resume="]
    assert sorted(p.name for p in out.glob("*.txt")) == [f"{f:04d}.txt" for f in range(1, 7)]
