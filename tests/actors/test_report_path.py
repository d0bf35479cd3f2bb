"""The per-task report path: reports of an executor that keeps nothing durably are told to the
job (the sink returns before the commit), an executor that declares
``awaits_journaled_reports`` gets them journaled before its sink returns, the job stops a
stale attempt whose report was told, and the simulated executor sends its reports in order
through one queue (``start_nowait`` included)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    AttemptFinished,
    AttemptHandle,
    AttemptSpec,
    AttemptStarted,
    Engine,
    Executor,
    Resources,
    RetryPolicy,
    SubmitJob,
    TaskCompleted,
    TaskMetricRecorded,
    TaskSpec,
    open_engine,
    open_inprocess_executor,
    open_simulated_executor,
)
from actors.cluster import RemoteExecutor
from actors.engine._messages import AttemptLost
from actors.executors import AttemptMetric, AttemptProgress, AttemptReport, ReportSink
from persistence import AppendResult, Event, InMemoryJournal
from runtime import Clock, VirtualClock

NODE = Resources.of(cores=4, memory="8GiB")
ONE = Resources.of(cores=1, memory="1GiB")
WAIT = 10.0


class HeldJournal(InMemoryJournal):
    """An in-memory journal whose appends to job streams can be held (to see who waits for a
    commit)."""

    def __init__(self, *, clock: Clock) -> None:
        super().__init__(clock=clock, codec=ENGINE_CODEC)
        self.gate = anyio.Event()
        self.gate.set()
        self.entered = anyio.Event()

    def hold(self) -> None:
        self.gate = anyio.Event()
        self.entered = anyio.Event()

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        if stream_id.startswith("job:") and not self.gate.is_set():
            self.entered.set()
            await self.gate.wait()
        return await super().append(
            stream_id, events, expected_version=expected_version, correlation_id=correlation_id
        )


class Watched:
    """A node's view of an in-process executor that records when its sink returns."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self.returned: list[AttemptReport] = []
        self.changed = anyio.Event()

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        async def sink(item: AttemptReport) -> None:
            await report(item)
            self.returned.append(item)
            self.changed.set()
            self.changed = anyio.Event()

        return await self._executor.start(spec, sink)

    def running(self) -> tuple[AttemptHandle, ...]:
        return self._executor.running()


class Acknowledged(Watched):
    """The same, declaring what a remote agent's executor declares."""

    awaits_journaled_reports = RemoteExecutor.awaits_journaled_reports


def one_task(job_id: str, command: str, *args: str) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        command=(f"inprocess:{command}", *args),
        resources=ONE,
        tasks=(TaskSpec(index=0, name="only"),),
        retries=RetryPolicy(max_attempts=1),
    )


@asynccontextmanager
async def open_node(
    works: dict[str, Any], wrapper: type[Watched], journal: HeldJournal, clock: VirtualClock
) -> AsyncIterator[tuple[Engine, Watched]]:
    async with (
        open_inprocess_executor(works, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        watched = wrapper(executor)
        await engine.add_node("n1", NODE, executor=watched)
        yield engine, watched


@pytest.mark.parametrize(("wrapper", "waits"), [(Watched, False), (Acknowledged, True)])
async def test_a_report_waits_for_its_commit_only_where_the_executor_needs_it(
    wrapper: type[Watched], waits: bool
) -> None:
    """A local executor's sink returns while the report's commit is held; one that declares
    awaits_journaled_reports (the remote agent's) returns only once it is journaled."""
    clock = VirtualClock(auto_advance=True)
    journal = HeldJournal(clock=clock)
    running, report_now, finish = anyio.Event(), anyio.Event(), anyio.Event()

    async def progress_then_wait(ctx: AttemptContext) -> None:
        running.set()
        await report_now.wait()
        await ctx.progress(0.5)
        await finish.wait()

    async with open_node({"work": progress_then_wait}, wrapper, journal, clock) as (engine, node):
        await engine.submit([one_task("a", "work")])
        with anyio.fail_after(WAIT):
            await running.wait()
        journal.hold()
        report_now.set()
        with anyio.fail_after(WAIT):
            await journal.entered.wait()  # the report's commit (or one before it) is held
            if not waits:
                while not any(isinstance(r, AttemptProgress) for r in node.returned):
                    await node.changed.wait()
        progressed = any(isinstance(r, AttemptProgress) for r in node.returned)
        assert progressed is not waits
        journal.gate.set()
        with anyio.fail_after(WAIT):
            while not any(isinstance(r, AttemptProgress) for r in node.returned):
                await node.changed.wait()
        finish.set()
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("a")
    assert summary.status == "completed"


async def test_a_stale_attempt_whose_report_was_told_is_stopped_by_its_job() -> None:
    """An attempt left running after its task moved on (reported lost) is killed when its next
    report, told to the job, is refused as stale; the new attempt completes."""
    clock = VirtualClock(auto_advance=True)
    journal = HeldJournal(clock=clock)
    runs: list[int] = []
    started = anyio.Event()
    report_now, release = anyio.Event(), anyio.Event()
    stopped: list[int] = []
    stopped_now = anyio.Event()

    async def work(ctx: AttemptContext) -> None:
        nonlocal started
        token = ctx.spec.fencing_token
        runs.append(token)
        started.set()
        if len(runs) > 1:
            await release.wait()
            return
        try:
            await report_now.wait()
            await ctx.progress(0.5)  # stale by now: its task was requeued
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            stopped.append(token)
            stopped_now.set()
            raise

    async with open_node({"work": work}, Watched, journal, clock) as (engine, _):
        await engine.submit([one_task("a", "work")])
        with anyio.fail_after(WAIT):
            await started.wait()
        started = anyio.Event()
        job = engine.job_ref("a")
        assert job is not None
        # The job hears the attempt is lost (as when its agent went quiet): it requeues the
        # task without stopping the attempt, which runs on.
        await job.tell(AttemptLost(task=0, node="n1", reason="agent silent"))
        with anyio.fail_after(WAIT):
            await started.wait()
        assert len(runs) == 2
        assert not stopped
        report_now.set()
        with anyio.fail_after(WAIT):
            await stopped_now.wait()
        assert stopped == [runs[0]]
        release.set()
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("a")
    assert summary.status == "completed"


async def test_simulated_reports_of_an_attempt_keep_their_order() -> None:
    """Started, metrics and the end of every simulated attempt are journaled in that order."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with (
        open_simulated_executor(
            duration=lambda spec: 60.0 + 7 * int(spec.task_id),
            metrics=lambda spec: {"first": 1.0, "second": 2.0, "third": 3.0},
            clock=clock,
        ) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", NODE, executor=executor)
        await engine.add_node("n2", NODE, executor=executor)
        await engine.submit(
            [
                SubmitJob(
                    job_id="sim",
                    name="sim",
                    command=("inprocess:sim",),
                    resources=ONE,
                    tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(12)),
                )
            ]
        )
        with anyio.fail_after(WAIT):
            summary = await engine.wait_job("sim")
        events = [r.event for r in await journal.read_stream("job:sim")]
    assert summary.status == "completed"
    for task in range(12):
        mine = [e for e in events if getattr(e, "task", None) == task]
        kinds = [
            type(e).__name__ for e in mine if isinstance(e, TaskMetricRecorded | TaskCompleted)
        ]
        assert kinds == ["TaskMetricRecorded"] * 3 + ["TaskCompleted"]
        names = [e.name for e in mine if isinstance(e, TaskMetricRecorded)]
        assert names == ["first", "second", "third"]


async def test_simulated_start_nowait_reports_through_the_queue_in_order() -> None:
    """start_nowait returns before anything is reported; the start then comes first, before
    the attempt's metrics and its end, at the simulated time the attempt takes."""
    clock = VirtualClock(auto_advance=True)
    seen: list[tuple[str, float]] = []

    async def sink(report: AttemptReport) -> None:
        seen.append((type(report).__name__, clock.monotonic()))

    spec = AttemptSpec(job_id="j", task_id="0", attempt=1, fencing_token=1, function="sim")
    async with (
        anyio.create_task_group() as tg,
        open_simulated_executor(
            duration=lambda spec: 30.0, metrics=lambda spec: {"m": 1.0}, clock=clock
        ) as executor,
    ):
        tg.start_soon(clock.run_auto_advance)
        handle = executor.start_nowait(spec, sink)
        assert seen == []
        with anyio.fail_after(WAIT):
            result = await handle.wait()
        tg.cancel_scope.cancel()
    assert result.outcome == "completed"
    assert [name for name, _ in seen] == [
        AttemptStarted.__name__,
        AttemptMetric.__name__,
        AttemptFinished.__name__,
    ]
    assert [at for _, at in seen] == [0.0, 30.0, 30.0]
