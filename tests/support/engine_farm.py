"""A farm for engine tests: an engine on a virtual clock with an in-memory journal, and nodes
that run small fake works in-process (each work knows the node it runs on)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    AttemptFinished,
    AttemptHandle,
    AttemptSpec,
    Dependency,
    Engine,
    EngineSettings,
    Executor,
    JobSummary,
    Policy,
    Priority,
    Resources,
    RetryPolicy,
    SubmitJob,
    TaskSpec,
    open_engine,
    open_inprocess_executor,
)
from actors.executors import AttemptReport, ReportSink, Work
from persistence import AppendResult, Event, InMemoryJournal, Journal, StreamAppend
from runtime import Clock, VirtualClock

CPU4 = Resources.of(cores=4, memory="8GiB")
ONE = Resources.of(cores=1, memory="1GiB")
NO_RETRY = RetryPolicy(max_attempts=1)
WAIT = 10.0  # real seconds: a backstop, never a synchronisation


# -- fakes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One attempt as the fake work saw it."""

    job: str
    task: int
    attempt: int
    token: int
    node: str
    at: float  # the virtual clock when the work started
    resume_from: str | None
    args: tuple[str, ...]
    memory: int = 0
    rank: int = 0
    hosts: tuple[str, ...] = ()


class Works:
    """The fake work every node runs in-process: small async functions and a log of runs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.runs: list[Run] = []
        self.cancelled: list[Run] = []
        self.gates: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        # job -> report its attempts up to this number as lost (their agent "restarted")
        self.lose: dict[str, int] = {}
        self.checkpoints: dict[str, int] = {}  # job -> checkpoints written on request
        self._changed = anyio.Event()

    def open(self, key: str) -> None:
        """Let the work blocked on gate ``key`` finish."""
        self.gates[key].set()

    def of(self, job: str, task: int | None = None) -> list[Run]:
        return [r for r in self.runs if r.job == job and (task is None or r.task == task)]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def registry(self) -> dict[str, Work]:
        def start(ctx: AttemptContext) -> Run:
            spec = ctx.spec
            run = Run(
                job=spec.job_id,
                task=int(spec.task_id),
                attempt=spec.attempt,
                token=spec.fencing_token,
                node=ctx.arguments["node"],
                at=self.clock.monotonic(),
                resume_from=ctx.resume_from,
                args=tuple(ctx.arguments.get("args", ())),
                memory=spec.memory,
                rank=spec.rank,
                hosts=spec.nodes,
            )
            self.runs.append(run)
            self._notify()
            return run

        async def ok(ctx: AttemptContext) -> None:
            start(ctx)

        async def fail(ctx: AttemptContext) -> None:
            start(ctx)
            raise RuntimeError("boom")

        async def flaky(ctx: AttemptContext) -> None:
            run = start(ctx)
            for _ in range(10):  # async work that yields without sleeping on the clock
                await anyio.lowlevel.checkpoint()
            if run.attempt <= int(run.args[0]):
                raise RuntimeError(f"flaky attempt {run.attempt}")

        async def fail_on(ctx: AttemptContext) -> None:
            run = start(ctx)
            if run.node in run.args:
                raise RuntimeError(f"cannot run on {run.node}")

        async def block(ctx: AttemptContext) -> None:
            run = start(ctx)
            try:
                await self.gates[run.args[0]].wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(run)
                self._notify()
                raise

        async def checkpoint_then_fail(ctx: AttemptContext) -> None:
            run = start(ctx)
            if run.resume_from is None:
                await ctx.checkpoint(f"step-{run.attempt * 5}")
                raise RuntimeError("lost the GPU")

        async def chatty(ctx: AttemptContext) -> None:
            run = start(ctx)
            for i in range(int(run.args[0])):
                await ctx.metric("residual", float(i))

        async def sleep(ctx: AttemptContext) -> None:
            run = start(ctx)
            await self.clock.sleep(float(run.args[0]))

        async def steps(ctx: AttemptContext) -> None:
            run = start(ctx)
            count, each = int(run.args[0]), float(run.args[1])
            for step in range(1, count + 1):
                await self.clock.sleep(each)
                await ctx.progress(step / count)

        async def oom_once(ctx: AttemptContext) -> None:
            run = start(ctx)
            if run.attempt == 1:
                raise MemoryError("resident memory above the limit")

        async def nan_progress(ctx: AttemptContext) -> None:
            start(ctx)
            await ctx.progress(float("nan"))
            await self.gates["never"].wait()

        async def checkpoint_on_request(ctx: AttemptContext) -> None:
            run = start(ctx)
            if run.resume_from is not None:
                return
            while True:  # checkpoint whenever asked, until stopped
                await ctx.checkpoint_requested.wait()
                count = self.checkpoints[run.job] = self.checkpoints.get(run.job, 0) + 1
                await ctx.checkpoint(f"checkpoint-{count}")  # arms a fresh request event

        async def blocked(run: Run) -> None:
            try:
                await self.gates["never"].wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(run)
                self._notify()
                raise

        async def rank_fails_once(ctx: AttemptContext) -> None:
            run = start(ctx)
            if run.attempt == 1:
                if run.rank == 1:
                    raise RuntimeError("rank 1 lost its MPI peer")
                await blocked(run)

        async def block_first(ctx: AttemptContext) -> None:
            run = start(ctx)
            if run.attempt == 1:
                await blocked(run)

        return {
            "block_first": block_first,
            "rank_fails_once": rank_fails_once,
            "checkpoint_on_request": checkpoint_on_request,
            "nan_progress": nan_progress,
            "oom_once": oom_once,
            "sleep": sleep,
            "steps": steps,
            "ok": ok,
            "fail": fail,
            "flaky": flaky,
            "fail_on": fail_on,
            "block": block,
            "checkpoint_then_fail": checkpoint_then_fail,
            "chatty": chatty,
        }


class CountingJournal(InMemoryJournal):
    """An in-memory journal that counts appends (commits) per stream."""

    def __init__(self, *, clock: Clock) -> None:
        super().__init__(clock=clock, codec=ENGINE_CODEC)
        self.appends: defaultdict[str, int] = defaultdict(int)
        self.multi_appends: list[int] = []  # streams per append_many

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        result = await super().append(
            stream_id, events, expected_version=expected_version, correlation_id=correlation_id
        )
        self.appends[stream_id] += 1
        return result

    async def append_many(
        self, appends: Sequence[StreamAppend], *, correlation_id: str | None = None
    ) -> list[AppendResult]:
        results = await super().append_many(appends, correlation_id=correlation_id)
        self.multi_appends.append(len(appends))
        return results


class OnNode:
    """One node's view of a shared in-process executor: it tells the work which node runs it."""

    def __init__(self, executor: Executor, node: str, works: Works | None = None) -> None:
        self._executor = executor
        self._node = node
        self._works = works

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        arguments = {**spec.arguments, "node": self._node}
        works = self._works

        async def sink(item: AttemptReport) -> None:
            # An agent that restarts reports the attempts it could not keep as lost.
            if (
                works is not None
                and isinstance(item, AttemptFinished)
                and works.lose.get(item.job_id, 0) >= item.attempt
            ):
                item = msgspec.structs.replace(item, outcome="lost", error="the agent restarted")
            await report(item)

        return await self._executor.start(msgspec.structs.replace(spec, arguments=arguments), sink)

    def running(self) -> tuple[AttemptHandle, ...]:
        return tuple(
            h for h in self._executor.running() if h.spec.arguments.get("node") == self._node
        )


class Farm:
    """An engine, its journal and clock, and nodes that run the fake work in-process."""

    def __init__(
        self,
        *,
        engine: Engine,
        journal: Journal,
        clock: VirtualClock,
        works: Works,
        executor: Executor,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.clock = clock
        self.works = works
        self._executor = executor

    def executor_for(self, node: str) -> Executor:
        """Return an executor whose work knows it runs on ``node``."""
        return OnNode(self._executor, node, self.works)

    async def add_node(self, name: str, capacity: Resources = CPU4) -> None:
        await self.engine.add_node(name, capacity, executor=self.executor_for(name))

    async def wait(self, job_id: str) -> JobSummary:
        with anyio.fail_after(WAIT):
            return await self.engine.wait_job(job_id)

    async def events(self, job_id: str) -> list[Event]:
        return [r.event for r in await self.journal.read_stream(f"job:{job_id}")]

    async def wait_for_event(self, job_id: str, kind: type[Event], count: int = 1) -> None:
        """Wait until the job's stream holds ``count`` events of ``kind`` (polls the journal)."""
        with anyio.fail_after(WAIT):
            while sum(isinstance(e, kind) for e in await self.events(job_id)) < count:
                await anyio.lowlevel.checkpoint()


@asynccontextmanager
async def open_farm(
    nodes: dict[str, Resources] | None = None,
    *,
    settings: EngineSettings | None = None,
    journal: Journal | None = None,
    clock: VirtualClock | None = None,
    policy: Policy | None = None,
) -> AsyncIterator[Farm]:
    clock = clock or VirtualClock(auto_advance=True)
    journal = journal or InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    works = Works(clock)
    # The executor outlives the engine, as a node agent outlives its coordinator.
    async with (
        open_inprocess_executor(works.registry(), clock=clock) as executor,
        open_engine(journal=journal, clock=clock, settings=settings, policy=policy) as engine,
    ):
        farm = Farm(engine=engine, journal=journal, clock=clock, works=works, executor=executor)
        for name, capacity in (nodes if nodes is not None else {"n1": CPU4}).items():
            await farm.add_node(name, capacity)
        yield farm


def job(
    job_id: str,
    work: str = "ok",
    *args: str,
    tasks: int = 1,
    priority: Priority = Priority.MEDIUM,
    resources: Resources = ONE,
    dependencies: Sequence[Dependency] = (),
    retries: RetryPolicy = NO_RETRY,
    **fields: Any,
) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        priority=priority,
        command=(f"inprocess:{work}", *args),
        resources=resources,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
        dependencies=tuple(dependencies),
        retries=retries,
        **fields,
    )
