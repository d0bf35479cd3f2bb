"""A policy sees the size of a task's latest verified checkpoint (``TaskView.checkpoint_bytes``,
from its manifest), live and after the engine is reopened over its journal: what a policy can
cost a checkpoint by."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import anyio
import anyio.lowlevel

from actors import (
    ENGINE_CODEC,
    Engine,
    Failure,
    FifoPolicy,
    JobView,
    Resources,
    RetryDecision,
    RetryPolicy,
    SubmitJob,
    TaskSpec,
    TaskView,
    open_engine,
    open_subprocess_executor,
)
from persistence import InMemoryJournal
from runtime import SystemClock

SIZE = 12_345
# First attempt: a checkpoint of SIZE bytes with its manifest, reported, then exit 1; a resumed
# attempt completes.
PROGRAM = f"""
import os, sys
from pathlib import Path
from actors.executors import write_manifest
if os.environ.get("TASKFARM_RESUME_FROM"):
    sys.exit(0)
folder = Path(os.environ["TASKFARM_CHECKPOINT_DIR"], "step-1")
folder.mkdir(parents=True)
(folder / "state.bin").write_bytes(b"x" * {SIZE - 10})
(folder / "more.bin").write_bytes(b"y" * 10)
print("@taskfarm checkpoint --manifest", write_manifest(folder), flush=True)
sys.exit(1)
"""


class Recording(FifoPolicy):
    """Records the checkpoint size each placement of a checkpointable task sees; holds a failed
    task for an operator when ``hold`` is set."""

    def __init__(self, *, hold: bool = False) -> None:
        self.seen: list[int] = []
        self.hold = hold
        self.failed = anyio.Event()

    def checkpoint_interval(self, job: JobView, task: TaskView, now: datetime) -> float | None:
        self.seen.append(task.checkpoint_bytes)
        return None

    def on_failure(
        self,
        job: JobView,
        task: TaskView,
        failure: Failure,
        default: RetryDecision,
        now: datetime,
    ) -> RetryDecision:
        self.failed.set()
        return RetryDecision(action="hold", reason="look first") if self.hold else default


def _job() -> SubmitJob:
    return SubmitJob(
        job_id="sim",
        name="sim",
        command=(sys.executable, "-c", PROGRAM),
        resources=Resources.of(cores=1),
        tasks=(TaskSpec(index=0, name="main"),),
        checkpointable=True,
        retries=RetryPolicy(max_attempts=2, backoff=0),
    )


@asynccontextmanager
async def _farm(
    tmp_path: Path, journal: InMemoryJournal, policy: Recording
) -> AsyncIterator[Engine]:
    clock = SystemClock()
    async with (
        open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=clock
        ) as executor,
        open_engine(journal=journal, clock=clock, policy=policy) as engine,
    ):
        await engine.add_node("local", Resources.of(cores=4, memory="8GiB"), executor=executor)
        yield engine


async def test_a_retry_is_placed_knowing_the_size_of_the_checkpoint_it_resumes(
    tmp_path: Path,
) -> None:
    """The first placement sees no checkpoint (0 bytes); the retry, after a checkpoint with a
    manifest, sees the manifest's total size."""
    journal = InMemoryJournal(clock=SystemClock(), codec=ENGINE_CODEC)
    policy = Recording()
    async with _farm(tmp_path, journal, policy) as engine:
        await engine.submit([_job()])
        with anyio.fail_after(30):
            summary = await engine.wait_job("sim")
    assert summary.status == "completed"
    assert policy.seen == [0, SIZE]


async def test_the_size_is_recovered_from_the_journal(tmp_path: Path) -> None:
    """Reopened over its journal, the engine gives a held task's view the size of the latest
    checkpoint's manifest, so its next placement is costed as before the restart."""
    journal = InMemoryJournal(clock=SystemClock(), codec=ENGINE_CODEC)
    first = Recording(hold=True)
    async with _farm(tmp_path, journal, first) as engine:
        await engine.submit([_job()])
        with anyio.fail_after(30):
            await first.failed.wait()
            while "look first" not in await engine.why("sim"):
                await anyio.lowlevel.checkpoint()
    assert first.seen == [0]
    second = Recording()
    async with _farm(tmp_path, journal, second) as engine:
        assert await engine.retry("sim") == [0]
        with anyio.fail_after(30):
            summary = await engine.wait_job("sim")
    assert summary.status == "completed"
    assert second.seen == [SIZE]
