"""Recovery: an engine stopped mid-run and reopened on the same SQLite journal finishes the work,
never reruns completed tasks, requeues in-doubt attempts from their checkpoints after the
restart grace, and still releases dependants of jobs that finished before the stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    Dependency,
    Engine,
    EngineSettings,
    JobFinished,
    JobSubmitted,
    JobSummary,
    Resources,
    RetryPolicy,
    SubmitJob,
    TaskAssigned,
    TaskCheckpointed,
    TaskCompleted,
    TaskRequeued,
    TaskSpec,
    open_engine,
    open_inprocess_executor,
)
from actors.executors import Work
from persistence import Event, InMemoryJournal, Journal, open_sqlite_journal
from runtime import VirtualClock

CPU4 = Resources.of(cores=4, memory="8GiB")
GPU1 = Resources.of(cores=4, memory="8GiB", gpus=1, gpu_memory="8GiB")
ONE = Resources.of(cores=1, memory="1GiB")
GRACE = 10.0
WAIT = 10.0  # real seconds: a backstop, never a synchronisation


@dataclass(frozen=True)
class Run:
    """One attempt as the fake work saw it."""

    job: str
    task: int
    attempt: int
    at: float
    resume_from: str | None


class Works:
    """Fake work: ``stage`` completes task 0 at once; other tasks checkpoint, then wait for a
    gate that never opens (they are still running when the engine stops) unless resuming."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.runs: list[Run] = []
        self.checkpointed: set[int] = set()
        self.checkpointed_runs: list[Run] = []
        self._changed = anyio.Event()
        self.never = anyio.Event()

    async def wait_until(self, predicate: object) -> None:
        assert callable(predicate)
        with anyio.fail_after(WAIT):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def registry(self) -> dict[str, Work]:
        async def stage(ctx: AttemptContext) -> None:
            spec = ctx.spec
            task = int(spec.task_id)
            run = Run(spec.job_id, task, spec.attempt, self.clock.monotonic(), ctx.resume_from)
            self.runs.append(run)
            self._notify()
            if task == 0 or ctx.resume_from is not None:
                return
            await ctx.checkpoint(f"ck-{task}")  # returns once it is journaled
            self.checkpointed.add(task)
            self.checkpointed_runs.append(run)
            self._notify()
            await self.never.wait()

        async def ok(ctx: AttemptContext) -> None:
            self.runs.append(Run(ctx.spec.job_id, 0, ctx.spec.attempt, 0.0, None))
            self._notify()

        return {"stage": stage, "ok": ok}


@dataclass
class Session:
    engine: Engine
    journal: Journal
    clock: VirtualClock
    works: Works

    async def wait(self, job_id: str) -> JobSummary:
        with anyio.fail_after(WAIT):
            return await self.engine.wait_job(job_id)

    async def events(self, job_id: str) -> list[Event]:
        return [r.event for r in await self.journal.read_stream(f"job:{job_id}")]


@asynccontextmanager
async def open_session(
    path: Path, clock: VirtualClock, nodes: dict[str, Resources]
) -> AsyncIterator[Session]:
    """One life of the coordinator: journal, executor and engine, closed in that reverse order."""
    works = Works(clock)
    settings = EngineSettings(restart_grace=GRACE)
    async with (
        open_sqlite_journal(path, clock=clock, codec=ENGINE_CODEC) as journal,
        open_inprocess_executor(works.registry(), clock=clock) as executor,
        open_engine(journal=journal, clock=clock, settings=settings) as engine,
    ):
        for name, capacity in nodes.items():
            await engine.add_node(name, capacity, executor=executor)
        yield Session(engine=engine, journal=journal, clock=clock, works=works)


def later(clock: VirtualClock, hours: float = 1.0) -> VirtualClock:
    """A clock for the next life, starting after the last one stopped."""
    return VirtualClock(clock.now() + timedelta(hours=hours), auto_advance=True)


def job(
    job_id: str,
    work: str,
    *,
    tasks: int = 1,
    resources: Resources = ONE,
    dependencies: tuple[Dependency, ...] = (),
    checkpointable: bool = False,
) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        command=(f"inprocess:{work}",),
        resources=resources,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
        dependencies=dependencies,
        retries=RetryPolicy(max_attempts=1),
        checkpointable=checkpointable,
    )


async def test_a_restarted_engine_finishes_the_work_from_checkpoints(tmp_path: Path) -> None:
    """Completed tasks are not rerun; in-doubt ones resume from checkpoints after the grace."""
    path = tmp_path / "taskfarm.db"
    first = VirtualClock(auto_advance=True)
    async with open_session(path, first, {"n1": CPU4}) as session:
        await session.engine.submit([job("sim", "stage", tasks=3, checkpointable=True)])
        await session.works.wait_until(lambda: session.works.checkpointed == {1, 2})
        await session.works.wait_until(lambda: bool(session.works.runs))
        with anyio.fail_after(WAIT):
            while (await session.engine.status("sim")).pop().task_counts.get("completed") != 1:
                await anyio.lowlevel.checkpoint()
    # The engine stopped with tasks 1 and 2 still out on n1: in doubt.
    second = later(first)
    async with open_session(path, second, {"n1": CPU4}) as session:
        summary = await session.wait("sim")
        events = await session.events("sim")
    assert summary.status == "completed"
    runs = session.works.runs
    assert sorted((r.task, r.resume_from) for r in runs) == [(1, "ck-1"), (2, "ck-2")]
    assert {r.at for r in runs} == {GRACE}  # requeued when the restart grace ran out
    assert [r.attempt for r in runs] == [2, 2]
    for task in range(3):
        completed = [e for e in events if isinstance(e, TaskCompleted) and e.task == task]
        assert len(completed) == 1, task
    requeued = [e for e in events if isinstance(e, TaskRequeued)]
    assert sorted(e.task for e in requeued) == [1, 2]
    assert all("re-claimed" in e.reason for e in requeued)
    resumed = [e for e in events if isinstance(e, TaskAssigned) and e.attempt == 2]
    assert sorted((e.task, e.resume_from) for e in resumed) == [(1, "ck-1"), (2, "ck-2")]
    assert [e.checkpoint for e in events if isinstance(e, TaskCheckpointed)] == ["ck-1", "ck-2"]
    assert isinstance(events[-1], JobFinished)


async def test_every_recovered_job_gets_its_in_doubt_attempts_back(tmp_path: Path) -> None:
    """With many jobs to respawn, the restart grace still covers each of their attempts."""
    path = tmp_path / "taskfarm.db"
    first = VirtualClock(auto_advance=True)
    big = Resources.of(cores=64, memory="64GiB")
    names = [f"j{i:02}" for i in range(24)]
    async with open_session(path, first, {"n1": big}) as session:
        await session.engine.submit([job(name, "stage", tasks=2) for name in names])
        await session.works.wait_until(lambda: len(session.works.checkpointed_runs) == 24)
    async with open_session(path, later(first), {"n1": big}) as session:
        for name in names:
            assert (await session.wait(name)).status == "completed"
    assert sorted(r.job for r in session.works.runs) == names
    assert {r.resume_from for r in session.works.runs} == {"ck-1"}


async def test_a_job_finished_before_the_restart_still_releases_its_dependants(
    tmp_path: Path,
) -> None:
    """A waiting dependant and a dependant submitted after the restart both run."""
    path = tmp_path / "taskfarm.db"
    first = VirtualClock(auto_advance=True)
    async with open_session(path, first, {"cpu": CPU4, "gpu": GPU1}) as session:
        # The GPU node leaves: the child (GPU work) can only wait once its parent is done.
        await session.engine.remove_node("gpu", reason="maintenance")
        gpu_child = job(
            "child",
            "ok",
            dependencies=(Dependency(parent="parent"),),
            resources=Resources.of(cores=1, gpus=1),
        )
        await session.engine.submit([job("parent", "ok"), gpu_child])
        assert (await session.wait("parent")).status == "completed"
        assert "no online node is big enough" in await session.engine.why("child")
    second = later(first)
    async with open_session(path, second, {"cpu": CPU4, "gpu": GPU1}) as session:
        await session.engine.submit(
            [job("late", "ok", dependencies=(Dependency(parent="parent"),))]
        )
        assert (await session.wait("late")).status == "completed"
        assert (await session.wait("child")).status == "completed"
        [parent] = await session.engine.status("parent")
    assert parent.status == "completed"
    assert sorted(r.job for r in session.works.runs) == ["child", "late"]


async def test_a_restart_with_nothing_in_doubt_arms_no_grace_and_keeps_finished_jobs(
    tmp_path: Path,
) -> None:
    """Reopening after a clean finish reruns nothing and journals nothing new for the jobs."""
    path = tmp_path / "taskfarm.db"
    first = VirtualClock(auto_advance=True)
    async with open_session(path, first, {"n1": CPU4}) as session:
        await session.engine.submit([job("a", "ok"), job("b", "ok")])
        await session.wait("a")
        await session.wait("b")
        before = await session.journal.last_position()
    async with open_session(path, later(first), {"n1": CPU4}) as session:
        assert [s.status for s in await session.engine.status()] == ["completed", "completed"]
        assert await session.journal.last_position() == before
        with pytest.raises(Exception, match="already exists"):
            await session.engine.submit([job("a", "ok")])
    assert session.works.runs == []


async def test_a_dependant_whose_parent_was_never_journaled_ends_instead_of_bricking() -> None:
    """A journal an older version left half-written (a dependant without its parent) opens:
    the orphan ends as failed, naming the missing parent, and everything else runs."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    orphan = SubmitJob(
        job_id="comp",
        name="comp",
        command=("inprocess:ok",),
        tasks=(TaskSpec(index=0, name="0"),),
        dependencies=(Dependency(parent="render"),),
    )
    fine = SubmitJob(
        job_id="fine", name="fine", command=("inprocess:ok",), tasks=(TaskSpec(index=0, name="0"),)
    )
    for spec in (orphan, fine):
        await journal.append(
            f"job:{spec.job_id}", [JobSubmitted(job=spec, submitted_at=clock.now())]
        )

    async def ok(ctx: AttemptContext) -> None:
        return None

    async with (
        open_inprocess_executor({"ok": ok}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", CPU4, executor=executor)
        [comp] = await engine.status("comp")
        assert comp.status == "failed"
        assert comp.reason is not None
        assert "'render'" in comp.reason
        with anyio.fail_after(WAIT):
            assert (await engine.wait_job("fine")).status == "completed"
