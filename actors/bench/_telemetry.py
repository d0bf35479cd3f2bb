"""``taskfarm bench telemetry``: what measured usage costs the coordinator.

- **CPU share**: a coordinator (``open_coordinator``, as ``taskfarm serve`` runs it, with its
  SQLite journal and usage store) and 200 simulated agents in a child process, each on its own
  TCP connection over loopback: they authenticate, say hello and heartbeat, a usage sample
  (two attempts of two jobs, and the host) on a heartbeat every 10 s.  The coordinator
  process's CPU time over a window of real time (a minute, so a roll-up flush falls in it; 20 s
  with ``--quick``), as a share of one core, in two shapes, each beside the same agents
  heartbeating without samples: heartbeats every second (``serve``'s default) with every tenth
  carrying a sample, and a heartbeat every 10 s with a sample on each (``serve
  --heartbeat-timeout 50``).  The first shape's difference is what the samples add.  Two
  interleaved rounds (one with ``--quick``), the least CPU of each kept.
- **journal growth per day**: the event journal's bytes (file and WAL) over the first shape's
  window, scaled to a day; baseline: the no-sample run's.
- **usage store per simulated day**: the coordinator's :class:`Telemetry` and a real usage
  store fed a day of those 200 agents' samples (8,640 each) on a virtual clock, flushing each
  minute, with the default retention; its size then (the steady state of the minute rows, plus
  a day of hours); baseline: the same samples' encoded frames, i.e. what journaling every
  sample would add per day.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import anyio

from actors.cli import ensure_token_file
from actors.cluster import (
    AgentHello,
    AgentToCoordinator,
    CoordinatorConfig,
    CoordinatorToAgent,
    Heartbeat,
    NodeUsage,
    Telemetry,
    TelemetrySettings,
    Welcome,
    open_coordinator,
)
from actors.engine import Resources
from actors.executors import AttemptUsage, HostUsage
from persistence import open_usage_store
from runtime import (
    BenchContext,
    Figure,
    FrameCodec,
    Suite,
    VirtualClock,
    load_token,
    open_connection,
    tune_gc_for_many_objects,
)

__all__ = ["SUITE"]

_AGENTS = 200
_HEARTBEAT = 1.0  # seconds: what `taskfarm serve` asks of agents by default
_SAMPLE_EVERY = 10  # heartbeats: a sample every 10 s
_ATTEMPTS = 2  # running attempts per agent, each of its own job
_DAY = 86_400.0
_CODEC: FrameCodec[AgentToCoordinator | CoordinatorToAgent] = FrameCodec(
    AgentToCoordinator | CoordinatorToAgent
)


def _sample(agent: int, tick: int) -> NodeUsage:
    """Agent ``agent``'s sample number ``tick``: two attempts that keep using CPU and I/O."""
    return NodeUsage(
        host=HostUsage(
            load=1.5 + (tick % 7) / 10,
            memory_available=48 * 2**30 - (tick % 13) * 2**20,
            scratch_free=800 * 2**30,
        ),
        attempts=tuple(
            AttemptUsage(
                job_id=f"job-{(agent * _ATTEMPTS + a) % 97}",
                task_id=str(agent),
                attempt=1,
                fencing_token=agent + 1,
                cpu_s=tick * 9.5,
                rss=(2 + a) * 2**30 + (tick % 5) * 2**20,
                peak_rss=(3 + a) * 2**30,
                read_bytes=tick * 2**20,
                write_bytes=tick * 2**19,
                processes=3,
                memory=4 * 2**30,
            )
            for a in range(_ATTEMPTS)
        ),
    )


# -- the simulated agents (a child process) --------------------------------------------------------


async def _agent(
    port: int,
    token: bytes,
    number: int,
    *,
    heartbeat: float,
    sample_every: int,
    offset: float,
    until: float,
    handshakes: anyio.CapacityLimiter,
) -> None:
    async with AsyncExitStack() as stack:
        # The coordinator admits a few unauthenticated connections per address at a time.
        async with handshakes:
            connection = await stack.enter_async_context(
                open_connection(
                    "127.0.0.1", port, codec=_CODEC, token=token, name=f"sim-{number}", role="agent"
                )
            )
            await connection.send(
                AgentHello(name=f"sim-{number}", capacity=Resources.of(cores=16, memory="64GiB"))
            )
            welcome = await connection.receive()
        assert isinstance(welcome, Welcome), welcome
        async with anyio.create_task_group() as task_group:

            async def drain() -> None:
                async for _ in connection:  # the heartbeat answers
                    pass

            task_group.start_soon(drain)
            await anyio.sleep(offset)
            sequence = 0
            next_at = anyio.current_time()
            while time.time() < until:
                sequence += 1
                usage = None
                if sample_every and (sequence + number) % sample_every == 0:
                    usage = _sample(number, sequence // sample_every)
                await connection.send(Heartbeat(running=_ATTEMPTS, sequence=sequence, usage=usage))
                next_at += heartbeat
                await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            task_group.cancel_scope.cancel()


async def _agents_main(
    port: int, token_file: str, heartbeat: float, sample_every: int, until: float
) -> None:
    token = load_token(token_file)
    spread = random.Random(7)
    handshakes = anyio.CapacityLimiter(8)
    async with anyio.create_task_group() as task_group:
        for number in range(_AGENTS):
            task_group.start_soon(
                partial(
                    _agent,
                    port,
                    token,
                    number,
                    heartbeat=heartbeat,
                    sample_every=sample_every,
                    offset=spread.uniform(0, heartbeat),
                    until=until,
                    handshakes=handshakes,
                )
            )


# -- 1 and 2: CPU share and journal growth, over loopback ------------------------------------------


def _journal_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


async def _run(
    ctx: BenchContext, name: str, *, heartbeat: float, sample_every: int, window: float
) -> tuple[float, float, int]:
    """Return (CPU share of one core, journal bytes per day, samples read) of one run: agents
    heartbeating every ``heartbeat`` seconds, every ``sample_every``-th with a sample (0: none);
    the coordinator asks for that interval (``serve --heartbeat-timeout`` 5 x it)."""
    root = ctx.workdir / name
    root.mkdir(parents=True)
    token_file, token = ensure_token_file(root / "token")
    config = CoordinatorConfig(
        journal=root / "journal.db",
        token=token,
        port=0,
        work_dir=root / "work",
        heartbeat_interval=heartbeat,
        heartbeat_timeout=5.0 * heartbeat,
    )
    previous = tune_gc_for_many_objects()
    # Every agent connected and in its rhythm (its first sample sent) before measuring.
    warmup = max(_HEARTBEAT * _SAMPLE_EVERY, heartbeat) + 5.0
    try:
        async with open_coordinator(config) as coordinator:
            until = time.time() + warmup + window + 5.0
            with (root / "agents.log").open("wb") as log:
                process = await anyio.open_process(
                    [
                        sys.executable,
                        "-m",
                        "actors.bench._telemetry",
                        str(coordinator.port),
                        str(token_file),
                        repr(heartbeat),
                        str(sample_every),
                        repr(until),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            try:
                with anyio.fail_after(120):
                    # The agents' process connects when it is ready: poll the scheduler's view.
                    while len(await coordinator.engine.nodes()) < _AGENTS:
                        if process.returncode is not None:
                            text = (root / "agents.log").read_text(errors="replace")
                            raise RuntimeError(f"the simulated agents failed:\n{text[-2000:]}")
                        await anyio.sleep(0.2)
                await anyio.sleep(warmup)
                cpu = time.process_time()
                journal = _journal_bytes(config.journal)
                read = coordinator.telemetry.samples
                started = time.perf_counter()
                await anyio.sleep(window)
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu
                journal = _journal_bytes(config.journal) - journal
                read = coordinator.telemetry.samples - read
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(10, shield=True):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
    finally:
        gc.set_threshold(*previous)
    return cpu / elapsed, journal * _DAY / elapsed, read


async def _figures_loopback(ctx: BenchContext) -> list[Figure]:
    window = 20.0 if ctx.quick else 60.0
    every = _HEARTBEAT * _SAMPLE_EVERY
    rounds = 1 if ctx.quick else 2
    runs: dict[str, tuple[float, float, int]] = {}
    # Interleaved rounds, the least CPU of each shape kept: the machine is shared, and another
    # process's burst only ever adds to a window's CPU time.
    for number in range(rounds):
        for name, heartbeat, sample_every in (
            ("heartbeats", _HEARTBEAT, 0),
            ("samples", _HEARTBEAT, _SAMPLE_EVERY),
            ("slow-heartbeats", every, 0),
            ("slow-samples", every, 1),
        ):
            ctx.progress(
                f"telemetry: {_AGENTS} agents over loopback for {window:g} s, heartbeat every "
                f"{heartbeat:g} s, "
                + (f"a sample every {every:g} s" if sample_every else "no samples")
            )
            run = await _run(
                ctx,
                f"{name}-{number}",
                heartbeat=heartbeat,
                sample_every=sample_every,
                window=window,
            )
            if name not in runs or run[0] < runs[name][0]:
                runs[name] = run
    base_cpu, base_journal, _ = runs["heartbeats"]
    cpu, journal, read = runs["samples"]
    slow_base, _, _ = runs["slow-heartbeats"]
    slow, _, slow_read = runs["slow-samples"]
    expected = _AGENTS * window / every
    return [
        Figure(
            name=f"telemetry: coordinator CPU, {_AGENTS} agents heartbeating every "
            f"{_HEARTBEAT:g} s (the serve default), a sample every {every:g} s",
            value=cpu * 100,
            unit="% of a core",
            baseline_name="same agents heartbeating without samples",
            baseline_value=base_cpu * 100,
            better="lower",
            note=f"loopback TCP, {window:g} s of real time, best of {rounds}; {read:,} samples "
            f"read ({expected:,.0f} sent at the rate)",
        ),
        Figure(
            name="telemetry: what 20 samples/s add to the coordinator's CPU",
            value=(slow - slow_base) * 100,
            unit="% of a core",
            target=5.0,
            better="lower",
            note="the 10 s shape below minus its baseline (there every heartbeat carries a "
            "sample): decoding, folding and flushing samples",
        ),
        Figure(
            name=f"telemetry: coordinator CPU, {_AGENTS} agents reporting every {every:g} s "
            f"(a heartbeat with a sample each, serve --heartbeat-timeout {5 * every:g})",
            value=slow * 100,
            unit="% of a core",
            baseline_name="same heartbeats without samples",
            baseline_value=slow_base * 100,
            target=5.0,
            better="lower",
            note=f"loopback TCP, {window:g} s of real time, best of {rounds}; {slow_read:,} "
            "samples read",
        ),
        Figure(
            name=f"telemetry: event journal growth, {_AGENTS} agents sampling",
            value=journal / 2**20,
            unit="MB/day",
            baseline_name="same agents without samples",
            baseline_value=base_journal / 2**20,
            target=50.0,
            better="lower",
            note="journal file and WAL over the window, scaled to a day (samples are not "
            "journaled: they roll up into the usage store)",
        ),
    ]


# -- 3: the usage store over a simulated day ---------------------------------------------------


async def _simulated_day(ctx: BenchContext, days: float) -> tuple[float, float, float]:
    """Return (usage store MB after ``days``, its minute rows' share, raw sample MB per day)."""
    clock = VirtualClock()
    path = ctx.workdir / "usage-day.db"
    settings = TelemetrySettings()
    raw = 0
    async with open_usage_store(path) as store:
        telemetry = Telemetry(store=store, clock=clock, settings=settings)
        interval = _HEARTBEAT * _SAMPLE_EVERY
        ticks = int(days * _DAY / interval)
        per_minute = int(60 / interval)
        for tick in range(1, ticks + 1):
            for agent in range(_AGENTS):
                usage = _sample(agent, tick)
                if tick == 1:
                    raw += len(_CODEC.encode(Heartbeat(running=2, sequence=tick, usage=usage)))
                telemetry.record(f"sim-{agent}", usage)
            await clock.advance(interval)
            if tick % per_minute == 0:
                await telemetry.flush()
        await telemetry.flush(everything=True)
        size = await store.size()
        minutes = await store.rows("minute")
        hours = await store.rows("hour")
    per_day = raw * _DAY / interval
    share = minutes / max(1, minutes + hours)
    return size / 2**20, share, per_day / 2**20


async def _figure_day(ctx: BenchContext) -> Figure:
    days = 0.25 if ctx.quick else 1.0
    ctx.progress(f"telemetry: a simulated {days:g} day of {_AGENTS} agents into the usage store")
    started = time.perf_counter()
    size, share, raw = await _simulated_day(ctx, days)
    took = time.perf_counter() - started
    return Figure(
        name=f"telemetry: usage store after {days:g} simulated day(s), {_AGENTS} agents",
        value=size,
        unit="MB",
        baseline_name="the same samples journaled raw, per day",
        baseline_value=raw,
        target=50.0 if days >= 1 else None,
        better="lower",
        note=f"virtual clock, {took:.0f} s of real time; {share:.0%} of rows are minutes "
        "(kept a day, then deleted: the file stops growing); hours kept a year",
    )


async def run_suite(ctx: BenchContext) -> list[Figure]:
    """Measure the telemetry figures (smaller with ``ctx.quick``)."""
    figures = await _figures_loopback(ctx)
    figures.append(await _figure_day(ctx))
    return figures


SUITE: Suite = run_suite


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    port_text, token_path, heartbeat_text, every_text, end = sys.argv[1:6]
    anyio.run(
        _agents_main, int(port_text), token_path, float(heartbeat_text), int(every_text), float(end)
    )
