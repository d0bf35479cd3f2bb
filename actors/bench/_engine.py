"""``taskfarm bench engine``: the engine's figures, each beside a baseline from the same run.

- **end to end**: no-op tasks on the in-process executor through the whole engine (scheduler,
  job and node actors, SQLite journal with ``synchronous=FULL``), submitted to completed;
  baseline: the journal's group-commit throughput for the same number of one-event appends from
  as many concurrent appenders as the farm has slots (what a minimal durable engine must do).
- **placement**: :class:`SchedulerCore` alone (no I/O) draining 100,000 queued tasks of three
  shapes through 1,000 nodes of three shapes, releasing the oldest running tasks after each
  cycle; decision latency is timed per task (view, admit, node choice, reservation);
  baseline: the same cycles with a brute-force node choice that checks every node.
- **loopback**: a coordinator on 127.0.0.1 with four real agent processes running
  ``/bin/true`` (a process per task, 16 slots per agent); baselines: the raw spawn rate of the
  same shape (four processes, each keeping 16 ``/bin/true`` running with ``posix_spawn`` and
  ``wait``), and the same agents running no-op work in-process (the engine without spawning).
- **cold restart**: ``open_engine`` over a journal of 1,000,000 events with 10,000 unfinished
  tasks until a submission is accepted; baseline: raw ``rebuild_all`` of the same journal.

The machine is shared: every rate is the best of several rounds, and the table says how many.
"""

from __future__ import annotations

import gc
import heapq
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from actors.cli import ensure_token_file
from actors.cluster import CoordinatorConfig, open_coordinator
from actors.engine import (
    ENGINE_CODEC,
    Dependency,
    EngineSettings,
    FarmView,
    FifoPolicy,
    Hold,
    JobAggregate,
    JobFinished,
    JobState,
    JobSubmitted,
    JobView,
    NodeRegistered,
    Outcome,
    Resources,
    RetryPolicy,
    SchedulerCore,
    SubmitJob,
    TaskAssigned,
    TaskCompleted,
    TaskSpec,
    TaskStarted,
    TaskView,
    job_stream,
    node_stream,
    open_engine,
)
from actors.executors import AttemptContext, open_inprocess_executor, open_simulated_executor
from persistence import Event, InMemoryJournal, open_sqlite_journal, rebuild_all
from runtime import (
    BenchContext,
    Figure,
    Suite,
    SystemClock,
    VirtualClock,
    percentile,
    tune_gc_for_many_objects,
)

__all__ = ["SUITE"]

_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_NO_RETRY = RetryPolicy(max_attempts=1)


async def _noop(ctx: AttemptContext) -> None:
    return None


def _job(
    job_id: str, tasks: int, command: str, resources: Resources, *, nodes: int = 1
) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        command=(command,),
        resources=resources,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
        retries=_NO_RETRY,
        nodes=nodes,
    )


async def _wait_all(engine: Any, ids: Sequence[str]) -> None:
    for job_id in ids:
        summary = await engine.wait_job(job_id)
        if summary.status != "completed":
            raise RuntimeError(f"bench job {job_id} ended {summary.status}: {summary.reason}")


# -- 1. end to end, in-process ------------------------------------------------------------------


async def _end_to_end(path: Path, *, jobs: int, tasks: int, nodes: int, slots: int) -> float:
    """Return tasks/s from submission to the last completion, on a fresh journal."""
    clock = SystemClock()
    async with AsyncExitStack() as stack:
        journal = await stack.enter_async_context(
            open_sqlite_journal(path, clock=clock, codec=ENGINE_CODEC, synchronous="FULL")
        )
        executors = [
            await stack.enter_async_context(open_inprocess_executor({"noop": _noop}, clock=clock))
            for _ in range(nodes)
        ]
        engine = await stack.enter_async_context(open_engine(journal=journal, clock=clock))
        for number, executor in enumerate(executors):
            capacity = Resources.of(cores=slots, memory=f"{slots}GiB")
            await engine.add_node(f"node-{number}", capacity, executor=executor)
        one = Resources.of(cores=1, memory="1GiB")
        specs = [_job(f"job-{j}", tasks, "inprocess:noop", one) for j in range(jobs)]
        started = time.perf_counter()
        await _wait_all(engine, await engine.submit(specs))
        return jobs * tasks / (time.perf_counter() - started)


async def _group_commits(path: Path, *, appends: int, appenders: int) -> float:
    """Return one-event appends/s from ``appenders`` concurrent streams (synchronous=FULL)."""
    per = appends // appenders
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=ENGINE_CODEC, synchronous="FULL"
    ) as journal:

        async def appender(number: int) -> None:
            stream = f"bench:{number}"
            for version in range(per):
                event = TaskCompleted(task=version, token=version + 1)
                await journal.append(stream, [event], expected_version=version)

        started = time.perf_counter()
        async with anyio.create_task_group() as task_group:
            for number in range(appenders):
                task_group.start_soon(appender, number)
        return per * appenders / (time.perf_counter() - started)


async def _figure_end_to_end(ctx: BenchContext, rounds: int) -> tuple[Figure, float]:
    jobs, tasks, nodes, slots = (20, 50, 4, 64) if ctx.quick else (20, 500, 4, 64)
    total = jobs * tasks
    ctx.progress(f"engine: end to end, {jobs} jobs x {tasks} no-op tasks, {nodes}x{slots} slots")
    rates, baselines = [], []
    for number in range(rounds):
        rates.append(
            await _end_to_end(
                ctx.workdir / f"e2e-{number}.db", jobs=jobs, tasks=tasks, nodes=nodes, slots=slots
            )
        )
        baselines.append(
            await _group_commits(
                ctx.workdir / f"commits-{number}.db", appends=total, appenders=nodes * slots
            )
        )
    best = max(rates)
    return (
        Figure(
            name="end to end, in-process no-op tasks, synchronous=FULL",
            value=best,
            unit="tasks/s",
            baseline_name=f"journal group commit (appends/s), {nodes * slots} appenders",
            baseline_value=max(baselines),
            target=2_000,
            note=f"{total:,} tasks, {jobs} jobs, {nodes} nodes x {slots} slots, best of {rounds}",
        ),
        best,
    )


# -- 2. placement -------------------------------------------------------------------------------

_NODE_SHAPES = (  # (capacity, weight)
    (Resources.of(cores=16, memory="64GiB"), 6),
    (Resources.of(cores=64, memory="256GiB"), 3),
    (Resources.of(cores=32, memory="128GiB", gpus=4, gpu_memory="24GiB"), 1),
)
_REQUEST_SHAPES = (
    (Resources.of(cores=1, memory="2GiB"), 6),
    (Resources.of(cores=4, memory="16GiB"), 3),
    (Resources.of(cores=8, memory="32GiB", gpus=1, gpu_memory="16GiB"), 1),
)


def _shape(shapes: tuple[tuple[Resources, int], ...], number: int) -> Resources:
    slot = number % sum(weight for _, weight in shapes)
    for shape, weight in shapes:
        if slot < weight:
            return shape
        slot -= weight
    raise AssertionError("unreachable")


class _Drained:
    def __init__(self) -> None:
        self.placed = 0
        self.gangs = 0  # placements of multi-node tasks
        self.cycles = 0
        self.place_seconds = 0.0
        self.total_seconds = 0.0


def _drain(
    core: SchedulerCore,
    *,
    tasks: int,
    nodes: int,
    release: int,
    stop_after: int | None = None,
    per_job: int = 1000,
    gang: Callable[[int], int] | None = None,
) -> _Drained:
    """Queue ``tasks`` on ``nodes``, then place and release until every task has been placed.

    ``gang(job_number)`` gives the nodes each task of that job spans (multi-node jobs).
    """
    for number in range(nodes):
        core.add_node(f"node-{number:04d}", _shape(_NODE_SHAPES, number))
    left: dict[str, int] = {}
    for number in range(tasks // per_job):
        width = gang(number) if gang is not None else 1
        request = _shape(_REQUEST_SHAPES, number)
        spec = _job(f"job-{number:03d}", per_job, "noop", request, nodes=width)
        core.add_job(spec, submitted_at=_EPOCH)
        left[spec.job_id] = per_job
    goal = min(tasks, stop_after or tasks)
    result = _Drained()
    running: deque[tuple[str, int]] = deque()
    clock = time.perf_counter
    started = clock()
    while result.placed < goal:
        began = clock()
        placements = core.place(_EPOCH, limit=goal - result.placed)
        result.place_seconds += clock() - began
        result.cycles += 1
        result.placed += len(placements)
        result.gangs += sum(len(p.nodes) > 1 for p in placements)
        running.extend((p.job_id, p.task) for p in placements)
        if not placements and not running:
            raise RuntimeError("placement stalled with nothing running")
        for _ in range(min(release, len(running))):
            job_id, index = running.popleft()
            core.task_ended(job_id, index, outcome=Outcome.SUCCEEDED)
            left[job_id] -= 1
            if not left[job_id]:
                core.job_ended(job_id, Outcome.SUCCEEDED)
    result.total_seconds = clock() - started
    return result


def _figure_placement(ctx: BenchContext, rounds: int) -> list[Figure]:
    tasks, nodes, release = (10_000, 100, 100) if ctx.quick else (100_000, 1_000, 1_000)
    brute_placements = tasks // 10
    ctx.progress(f"engine: placement, {tasks:,} tasks on {nodes:,} nodes (best of {rounds})")
    runs = [
        _drain(SchedulerCore(FifoPolicy()), tasks=tasks, nodes=nodes, release=release)
        for _ in range(rounds)
    ]
    best = max(runs, key=lambda r: r.placed / r.place_seconds)
    timed = SchedulerCore(FifoPolicy(), time_decisions=True)
    _drain(timed, tasks=tasks, nodes=nodes, release=release)
    ctx.progress(f"engine: placement baseline, brute force, first {brute_placements:,} placements")
    brute = max(
        (
            _drain(
                SchedulerCore(FifoPolicy(), exhaustive=True),
                tasks=tasks,
                nodes=nodes,
                release=release,
                stop_after=brute_placements,
            )
            for _ in range(rounds)
        ),
        key=lambda r: r.placed / r.place_seconds,
    )
    brute_timed = SchedulerCore(FifoPolicy(), exhaustive=True, time_decisions=True)
    _drain(brute_timed, tasks=tasks, nodes=nodes, release=release, stop_after=brute_placements)
    samples, brute_samples = timed.decision_seconds or [0.0], brute_timed.decision_seconds or [0.0]
    shapes = "3 node shapes, 3 request shapes (10% GPU)"
    return [
        Figure(
            name=f"placement, {tasks:,} queued tasks on {nodes:,} nodes",
            value=best.placed / best.place_seconds,
            unit="placements/s",
            baseline_name=f"brute force (every node per task), first {brute.placed:,} (filling)",
            baseline_value=brute.placed / brute.place_seconds,
            target=10_000,
            note=f"{shapes}; {best.cycles} cycles releasing {release:,} each; "
            f"{best.placed / best.total_seconds:,.0f}/s with releases; best of {rounds}",
        ),
        Figure(
            name="placement decision latency p99",
            value=percentile(samples, 99) * 1000,
            unit="ms",
            baseline_name="brute force",
            baseline_value=percentile(brute_samples, 99) * 1000,
            target=1,
            better="lower",
            note=f"{len(samples):,} decisions, p50 "
            f"{percentile(samples, 50) * 1e6:.0f} us, max "
            f"{max(samples) * 1000:.2f} ms",
        ),
    ]


def _gang_width(job_number: int) -> int:
    """One job in ten spans 2 to 8 nodes; the others run on one."""
    return 2 + (job_number // 10) % 7 if job_number % 10 == 0 else 1


def _figure_gang_placement(ctx: BenchContext, rounds: int) -> list[Figure]:
    """Placement with multi-node tasks beside the single-node queue of the same size."""
    tasks, nodes, release = (2_000, 200, 20) if ctx.quick else (10_000, 1_000, 100)
    ctx.progress(
        f"engine: gang placement, {tasks:,} tasks (10% on 2-8 nodes) on {nodes:,} nodes "
        f"(best of {rounds})"
    )

    def drain(gang: Callable[[int], int] | None, timed: bool = False) -> tuple[_Drained, Any]:
        core = SchedulerCore(FifoPolicy(), time_decisions=timed)
        return (
            _drain(core, tasks=tasks, nodes=nodes, release=release, per_job=100, gang=gang),
            core,
        )

    def best(gang: Callable[[int], int] | None) -> _Drained:
        return max(
            (drain(gang)[0] for _ in range(rounds)), key=lambda r: r.placed / r.place_seconds
        )

    with_gangs, single = best(_gang_width), best(None)
    gang_samples = drain(_gang_width, timed=True)[1].decision_seconds or [0.0]
    single_samples = drain(None, timed=True)[1].decision_seconds or [0.0]
    return [
        Figure(
            name=f"gang placement, {tasks:,} queued tasks (10% on 2-8 nodes) on {nodes:,} nodes",
            value=with_gangs.placed / with_gangs.place_seconds,
            unit="placements/s",
            baseline_name="the same queue, every task on one node",
            baseline_value=single.placed / single.place_seconds,
            ratio_target=0.5,
            note=f"{with_gangs.gangs:,} multi-node placements, each counted once; "
            f"{with_gangs.cycles} cycles releasing {release} each; best of {rounds}",
        ),
        Figure(
            name="gang placement decision latency p99",
            value=percentile(gang_samples, 99) * 1000,
            unit="ms",
            baseline_name="every task on one node",
            baseline_value=percentile(single_samples, 99) * 1000,
            better="lower",
            note=f"{len(gang_samples):,} decisions, max {max(gang_samples) * 1000:.2f} ms",
        ),
    ]


# -- 3. loopback --------------------------------------------------------------------------------


@asynccontextmanager
async def _agents(
    ctx: BenchContext, port: int, token_file: Path, module: str, count: int, slots: int
) -> AsyncIterator[None]:
    """Run ``count`` agent processes (``python -m module agent ...``); stop them on exit."""
    processes: list[anyio.abc.Process] = []
    logs = ctx.workdir / "agent-logs"
    logs.mkdir(exist_ok=True)
    try:
        for number in range(count):
            name = f"{module.rsplit('.', 1)[-1].strip('_')}-{number}"
            log = (logs / f"{name}.log").open("ab")
            processes.append(
                await anyio.open_process(
                    [
                        sys.executable,
                        "-m",
                        module,
                        "agent",
                        "--connect",
                        f"127.0.0.1:{port}",
                        "--token-file",
                        str(token_file),
                        "--name",
                        name,
                        "--work-dir",
                        str(ctx.workdir / "agents" / name),
                        "--cores",
                        str(slots),
                        "--memory",
                        f"{slots}GiB",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )
            log.close()
        yield
    finally:
        with anyio.move_on_after(20, shield=True):
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def _loopback(
    ctx: BenchContext, name: str, *, module: str, command: str, tasks: int, agents: int, slots: int
) -> float:
    """Return tasks/s of ``command`` run by ``agents`` agent processes over loopback."""
    root = ctx.workdir / name
    root.mkdir()
    token_file, token = ensure_token_file(root / "token")
    config = CoordinatorConfig(
        journal=root / "journal.db",
        token=token,
        port=0,
        work_dir=root / "work",
        heartbeat_interval=0.5,
        heartbeat_timeout=10.0,
    )
    # The coordinator runs here as `taskfarm serve` runs it (with the collector tuned).
    previous = tune_gc_for_many_objects()
    async with (
        open_coordinator(config) as coordinator,
        _agents(ctx, coordinator.port, token_file, module, agents, slots),
    ):
        engine = coordinator.engine
        with anyio.fail_after(60):
            # Polls the scheduler's view: the agents are processes that connect when ready.
            while sum(n.health == "online" for n in await engine.nodes()) < agents:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        one = Resources.of(cores=1, memory="1GiB")
        jobs = agents
        specs = [_job(f"job-{j}", tasks // jobs, command, one) for j in range(jobs)]
        started = time.perf_counter()
        try:
            with anyio.fail_after(600):
                await _wait_all(engine, await engine.submit(specs))
        finally:
            gc.set_threshold(*previous)
        return (tasks // jobs) * jobs / (time.perf_counter() - started)


async def _spawn_ceiling(spawns: int, processes: int, concurrency: int) -> float:
    """Return the aggregate rate of ``processes`` processes each spawning ``/bin/true`` with
    ``concurrency`` children running at a time (the loopback figure's shape: an agent per
    process, a slot per child)."""
    per = spawns // processes
    start_at = time.time() + 2.0  # every child starts together, after its interpreter is up
    outputs: list[str] = []

    async def child() -> None:
        argv = [sys.executable, "-m", "actors.bench._engine", "spawn", str(per), str(concurrency)]
        result = await anyio.run_process([*argv, repr(start_at)])
        outputs.append(result.stdout.decode().strip())

    async with anyio.create_task_group() as task_group:
        for _ in range(processes):
            task_group.start_soon(child)
    ended = max(float(line) for line in outputs)
    return per * processes / (ended - start_at)


async def _figure_loopback(ctx: BenchContext, rounds: int, in_process_rate: float) -> list[Figure]:
    tasks, agents, slots = (400, 4, 16) if ctx.quick else (4_000, 4, 16)
    ctx.progress(f"engine: loopback, {agents} agent processes, {tasks:,} x /bin/true")
    spawn_rate = max([await _spawn_ceiling(tasks, agents, slots) for _ in range(rounds)])
    real = max(
        [
            await _loopback(
                ctx,
                f"loopback-true-{number}",
                module="runtime.cli",
                command="/bin/true",
                tasks=tasks,
                agents=agents,
                slots=slots,
            )
            for number in range(rounds)
        ]
    )
    ctx.progress(f"engine: loopback, {agents} agent processes, {tasks:,} in-process no-ops")
    cheap = max(
        [
            await _loopback(
                ctx,
                f"loopback-noop-{number}",
                module="actors.bench._engine",
                command="inprocess:noop",
                tasks=tasks,
                agents=agents,
                slots=slots,
            )
            for number in range(rounds)
        ]
    )
    setup = f"{tasks:,} tasks, {agents} agents x {slots} slots, best of {rounds}"
    return [
        Figure(
            name=f"loopback, {agents} `taskfarm agent` processes, /bin/true per task",
            value=real,
            unit="tasks/s",
            baseline_name=f"raw posix_spawn of /bin/true, {agents} processes x {slots} at a time",
            baseline_value=spawn_rate,
            ratio_target=0.3,
            note=setup,
        ),
        Figure(
            name=f"loopback, {agents} agent processes, in-process no-op work",
            value=cheap,
            unit="tasks/s",
            baseline_name="same tasks, local in-process executor",
            baseline_value=in_process_rate,
            target=1_000,
            note=setup + "; the agent code with its subprocess executor swapped for in-process",
        ),
    ]


# -- 4. cold restart ----------------------------------------------------------------------------

_RESTART_TASKS = 500  # per job
_RESTART_IN_DOUBT = 13  # attempts per unfinished job that were out when the coordinator stopped


def _finished_job_events(spec: SubmitJob) -> list[Event]:
    events: list[Event] = [JobSubmitted(job=spec, submitted_at=_EPOCH)]
    for index in range(len(spec.tasks)):
        token = len(events) + 1
        events += [
            TaskAssigned(task=index, attempt=1, token=token, node=f"node-{index % 16}"),
            TaskStarted(task=index, token=token),
            TaskCompleted(task=index, token=token, runtime_s=0.01),
        ]
    events.append(JobFinished(outcome="completed", finished_at=_EPOCH))
    return events


def _unfinished_job_events(spec: SubmitJob) -> list[Event]:
    events: list[Event] = [JobSubmitted(job=spec, submitted_at=_EPOCH)]
    for index in range(_RESTART_IN_DOUBT):
        token = len(events) + 1
        events += [
            TaskAssigned(task=index, attempt=1, token=token, node=f"node-{index % 16}"),
            TaskStarted(task=index, token=token),
        ]
    return events


async def _build_restart_journal(path: Path, *, events: int, unfinished: int) -> tuple[int, int]:
    """Write a journal as a farm would leave it; return (events, unfinished tasks).

    The latest snapshot of each job stream is written too, where the job actor would have
    left it: its final state for a finished job, else every
    ``EngineSettings.snapshot_interval(tasks)`` events (the product's cadence, which grows with
    the job's size).
    """
    every = EngineSettings().snapshot_interval(_RESTART_TASKS)
    one = Resources.of(cores=1, memory="1GiB")
    open_jobs = unfinished // _RESTART_TASKS
    per_finished = 3 * _RESTART_TASKS + 2
    finished_jobs = max(0, (events - 16 - open_jobs * (1 + 2 * _RESTART_IN_DOUBT)) // per_finished)
    aggregate = JobAggregate()
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=ENGINE_CODEC, synchronous="OFF"
    ) as journal:
        for number in range(16):
            capacity = Resources.of(cores=64, memory="256GiB")
            await journal.append(
                node_stream(f"node-{number}"),
                [NodeRegistered(name=f"node-{number}", capacity=capacity)],
            )

        async def write(number: int) -> None:
            spec = _job(f"job-{number:05d}", _RESTART_TASKS, "inprocess:noop", one)
            stream = job_stream(spec.job_id)
            batch = (
                _finished_job_events(spec)
                if number < finished_jobs
                else _unfinished_job_events(spec)
            )
            await journal.append(stream, batch, expected_version=0)
            # A finished job's actor snapshots its final state; an unfinished one has the
            # latest snapshot of its cadence.
            version = len(batch) if number < finished_jobs else len(batch) // every * every
            if version:
                state = aggregate.initial_state(stream)
                for event in batch[:version]:
                    state = aggregate.apply(state, event)
                await journal.save_snapshot(
                    stream, version=version, state=state, schema_version=aggregate.schema_version
                )

        jobs = finished_jobs + open_jobs
        for first in range(0, jobs, 16):
            async with anyio.create_task_group() as task_group:
                for number in range(first, min(first + 16, jobs)):
                    task_group.start_soon(write, number)
        written = await journal.last_position()
    return written, open_jobs * _RESTART_TASKS


async def _restart(path: Path, number: int) -> tuple[float, int]:
    """Return seconds from opening the journal to an accepted submission, and the queue."""
    clock = SystemClock()
    started = time.perf_counter()
    async with (
        open_sqlite_journal(path, clock=clock, codec=ENGINE_CODEC) as journal,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        one = Resources.of(cores=1, memory="1GiB")
        await engine.submit([_job(f"after-restart-{number}", 1, "inprocess:noop", one)])
        elapsed = time.perf_counter() - started
        queued = engine.core.statistics()["queued"]
    return elapsed, queued


async def _raw_replay(path: Path) -> float:
    aggregate = JobAggregate()
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=ENGINE_CODEC, read_only=True
    ) as journal:
        started = time.perf_counter()
        await rebuild_all(journal, lambda s: aggregate if s.startswith("job:") else None)
        return time.perf_counter() - started


async def _snapshot_replay(path: Path) -> float:
    """Rebuild every job stream from its latest snapshot plus the events after it."""
    aggregate = JobAggregate()
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=ENGINE_CODEC, read_only=True
    ) as journal:
        started = time.perf_counter()
        for info in await journal.streams():
            if not info.stream_id.startswith("job:"):
                continue
            snapshot = await journal.load_snapshot(
                info.stream_id, JobState, schema_version=aggregate.schema_version
            )
            version, state = snapshot or (0, aggregate.initial_state(info.stream_id))
            for record in await journal.read_stream(info.stream_id, after_version=version):
                state = aggregate.apply(state, record.event)
        return time.perf_counter() - started


async def _figure_restart(ctx: BenchContext, rounds: int) -> list[Figure]:
    events = 100_000 if ctx.quick else 1_000_000
    path = ctx.workdir / "restart.db"
    ctx.progress(f"engine: building a {events:,}-event journal for the restart")
    written, unfinished = await _build_restart_journal(path, events=events, unfinished=10_000)
    ctx.progress(f"engine: cold restart over {written:,} events (best of {rounds})")
    restarts = [await _restart(path, number) for number in range(rounds)]
    best, queued = min(restarts)
    raw = min([await _raw_replay(path) for _ in range(rounds)])
    snapshots = min([await _snapshot_replay(path) for _ in range(rounds)])
    setup = f"{written:,} events, {unfinished:,} unfinished tasks; best of {rounds}"
    return [
        Figure(
            name="cold restart until a submission is accepted",
            value=best,
            unit="s",
            baseline_name="raw rebuild_all (job aggregate)",
            baseline_value=raw,
            target=3,
            better="lower",
            note=f"{setup}; {queued:,} queued after it; page cache warm",
        ),
        Figure(
            name="replay from the latest snapshot per job stream (what a snapshot restart costs)",
            value=snapshots,
            unit="s",
            baseline_name="raw rebuild_all",
            baseline_value=raw,
            better="lower",
            note=setup,
        ),
    ]


# -- 5. the simulated farm ------------------------------------------------------------------------


def _trace(tasks: int, seed: int = 7) -> list[int]:
    """Task durations of the simulated farm: 60 to 600 s, seeded."""
    rng = random.Random(seed)
    return [rng.randint(60, 600) for _ in range(tasks)]


async def _simulated_farm(nodes: int, durations: list[int]) -> tuple[float, float]:
    """Run the trace through the engine on a virtual clock; return (real s, simulated s)."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    per_job = 100
    async with (
        open_simulated_executor(
            duration=lambda spec: float(spec.arguments["args"][0]), clock=clock
        ) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        for number in range(nodes):
            capacity = Resources.of(cores=4, memory="16GiB")
            await engine.add_node(f"node-{number}", capacity, executor=executor)
        one = Resources.of(cores=1, memory="1GiB")
        specs = [
            SubmitJob(
                job_id=f"job-{j}",
                name=f"job-{j}",
                command=("inprocess:sim", "{task}"),
                resources=one,
                tasks=tuple(
                    TaskSpec(index=i, name=str(seconds))
                    for i, seconds in enumerate(durations[j * per_job : (j + 1) * per_job])
                ),
                retries=_NO_RETRY,
            )
            for j in range((len(durations) + per_job - 1) // per_job)
        ]
        started = time.perf_counter()
        await _wait_all(engine, await engine.submit(specs))
        return time.perf_counter() - started, clock.monotonic()


def _bare_simulation(nodes: int, durations: list[int]) -> float:
    """The same trace as a bare list-scheduling loop (a heap of slot free times)."""
    started = time.perf_counter()
    free = [0.0] * (nodes * 4)
    heapq.heapify(free)
    for seconds in durations:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return time.perf_counter() - started


async def _figure_simulated_farm(ctx: BenchContext, rounds: int) -> list[Figure]:
    tasks = 1_000 if ctx.quick else 20_000
    durations = _trace(tasks)
    figures = []
    for nodes in (50, 200, 500, 1000):
        ctx.progress(f"engine: simulated farm, {nodes} nodes, {tasks:,} tasks (best of {rounds})")
        # With the collector tuned as the processes we own run (`taskfarm serve`, the domains'
        # benches); at the target's size also with CPython's defaults, which an application
        # embedding the engine keeps unless it tunes them itself.
        previous = tune_gc_for_many_objects()
        try:
            runs = [await _simulated_farm(nodes, durations) for _ in range(rounds)]
        finally:
            gc.set_threshold(*previous)
        real, simulated = min(runs)
        untuned = ""
        if nodes == 500:
            default = min([await _simulated_farm(nodes, durations) for _ in range(rounds)])[0]
            untuned = f"; {tasks / default:,.0f} tasks/s with the collector's default thresholds"
        bare = min(_bare_simulation(nodes, durations) for _ in range(rounds))
        figures.append(
            Figure(
                name=f"simulated farm, {nodes} nodes x 4 slots, {tasks:,} tasks queued",
                value=tasks / real,
                unit="tasks/s",
                baseline_name="bare list-scheduling loop of the same trace",
                baseline_value=tasks / bare,
                target=2_000 if nodes == 500 else None,
                note=f"tasks of 60-600 s (seeded); {simulated / 3600:.1f} simulated hours in "
                f"{real:.1f} s; virtual clock, in-memory journal, simulated executor; "
                f"collector tuned as `taskfarm serve` runs; best of {rounds}{untuned}",
            )
        )
    return figures


# -- 6. a chain of dependent tasks ---------------------------------------------------------------


async def _chain(path: Path, *, tasks: int, chained: bool) -> float:
    """Return tasks/s for one job of ``tasks`` no-op tasks, each waiting on the one before."""
    clock = SystemClock()
    async with (
        open_sqlite_journal(path, clock=clock, codec=ENGINE_CODEC, synchronous="FULL") as journal,
        open_inprocess_executor({"noop": _noop}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("node", Resources.of(cores=64, memory="64GiB"), executor=executor)
        spec = _job("chain", tasks, "inprocess:noop", Resources.of(cores=1, memory="1GiB"))
        if chained:
            spec = msgspec.structs.replace(
                spec,
                dependencies=tuple(
                    Dependency(parent="chain", parent_task=i - 1, child_task=i)
                    for i in range(1, tasks)
                ),
            )
        started = time.perf_counter()
        await _wait_all(engine, await engine.submit([spec]))
        return tasks / (time.perf_counter() - started)


async def _figure_chain(ctx: BenchContext, rounds: int) -> Figure:
    tasks = 200 if ctx.quick else 1_000
    ctx.progress(f"engine: a chain of {tasks:,} dependent tasks (best of {rounds})")
    chained = max(
        [
            await _chain(ctx.workdir / f"chain-{n}.db", tasks=tasks, chained=True)
            for n in range(rounds)
        ]
    )
    free = max(
        [
            await _chain(ctx.workdir / f"free-{n}.db", tasks=tasks, chained=False)
            for n in range(rounds)
        ]
    )
    # The floor the disk sets: a link waits for two commits in sequence (the assignment, then
    # the start and end together), and nothing else is there to share them with.
    commits = max(
        [
            await _group_commits(
                ctx.workdir / f"sequential-commits-{n}.db", appends=200, appenders=1
            )
            for n in range(rounds)
        ]
    )
    return Figure(
        name=f"linear chain of {tasks:,} dependent no-op tasks, in process, synchronous=FULL",
        value=chained,
        unit="tasks/s",
        baseline_name="the same tasks without dependencies",
        baseline_value=free,
        target=1_000,
        note=f"one job, task i waits on task i-1; two sequential commits per link, and this "
        f"disk does {commits:,.0f} sequential synchronous=FULL commits/s (measured in this run): "
        f"a floor of {commits / 2:,.0f} links/s; best of {rounds}",
    )


# -- 7. a cycle over job-deferred work -----------------------------------------------------------


class _HoldEverything(FifoPolicy):
    """Holds every job (off-peak deferral) -- at one call per job, or per task."""

    def __init__(self, per_task: bool) -> None:
        self.per_task = per_task

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        return None if self.per_task else Hold("deferred to off-peak")

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        return "deferred to off-peak"


def _deferred_cycle(*, jobs: int, tasks: int, per_task: bool, cycles: int) -> float:
    """Return the mean seconds of one placement cycle over held work."""
    core = SchedulerCore(_HoldEverything(per_task))
    for number in range(10):
        core.add_node(f"node-{number}", Resources.of(cores=64, memory="256GiB"))
    one = Resources.of(cores=1, memory="1GiB")
    for number in range(jobs):
        core.add_job(_job(f"job-{number}", tasks, "inprocess:noop", one), submitted_at=_EPOCH)
    core.place(_EPOCH)  # warm
    started = time.perf_counter()
    for cycle in range(cycles):
        core.place(_EPOCH + timedelta(seconds=cycle))
    return (time.perf_counter() - started) / cycles


def _figure_deferred(ctx: BenchContext, rounds: int) -> Figure:
    jobs, tasks = (20, 2_000) if ctx.quick else (100, 10_000)
    ctx.progress(f"engine: a cycle over {jobs} held jobs of {tasks:,} tasks (best of {rounds})")
    held = min(
        _deferred_cycle(jobs=jobs, tasks=tasks, per_task=False, cycles=20) for _ in range(rounds)
    )
    per_task = min(
        _deferred_cycle(jobs=jobs, tasks=tasks, per_task=True, cycles=2) for _ in range(rounds)
    )
    return Figure(
        name=f"placement cycle, {jobs} jobs of {tasks:,} job-deferred tasks",
        value=held * 1000,
        unit="ms",
        baseline_name="the same work deferred task by task (admit per task)",
        baseline_value=per_task * 1000,
        target=5,
        better="lower",
        note=f"{jobs * tasks:,} tasks held by the policy's admit_job; best of {rounds}",
    )


# -- the suite ------------------------------------------------------------------------------------


async def run_suite(ctx: BenchContext) -> list[Figure]:
    """Measure the engine's figures (smaller sizes with ``ctx.quick``)."""
    rounds = 2 if ctx.quick else 3
    end_to_end, in_process_rate = await _figure_end_to_end(ctx, rounds)
    figures = [end_to_end]
    figures += await anyio.to_thread.run_sync(_figure_placement, ctx, rounds)
    figures += await anyio.to_thread.run_sync(_figure_gang_placement, ctx, rounds)
    figures += await _figure_loopback(ctx, rounds, in_process_rate)
    figures += await _figure_restart(ctx, rounds)
    figures += await _figure_simulated_farm(ctx, rounds)
    figures.append(await _figure_chain(ctx, rounds))
    figures.append(await anyio.to_thread.run_sync(_figure_deferred, ctx, rounds))
    return figures


SUITE: Suite = run_suite


# -- child processes ------------------------------------------------------------------------------


def _spawn_main(argv: list[str]) -> None:
    """Spawn ``/bin/true`` ``argv[0]`` times, ``argv[1]`` at a time, from ``argv[2]`` (a
    wall-clock time): ``posix_spawn`` and ``wait``, the least a spawner can do."""
    count, concurrency, start_at = int(argv[0]), int(argv[1]), float(argv[2])
    delay = start_at - time.time()
    if delay > 0:
        anyio.run(anyio.sleep, delay)
    started = running = 0
    environment = dict(os.environ)
    while started < count or running:
        while running < concurrency and started < count:
            os.posix_spawn("/bin/true", ["/bin/true"], environment)
            started += 1
            running += 1
        _, status = os.wait()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("/bin/true failed")
        running -= 1
    print(repr(time.time()))


def _agent_main(argv: list[str]) -> int:
    """Run ``taskfarm agent`` with an in-process executor that runs ``noop``."""
    from actors.cli import main_with_executor

    @asynccontextmanager
    async def in_process(**options: Any) -> AsyncIterator[Any]:
        async with open_inprocess_executor({"noop": _noop}, clock=options.get("clock")) as ex:
            yield ex

    return main_with_executor(argv, in_process)


if __name__ == "__main__":
    if sys.argv[1] == "spawn":
        _spawn_main(sys.argv[2:])
    elif sys.argv[1] == "agent":
        sys.exit(_agent_main(sys.argv[2:]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
