"""Kernel benchmarks: tell throughput, ask latency, spawn rate and idle-actor memory.

Each figure is measured beside a raw baseline in the same run: an ``asyncio.Queue`` put/get
loop for tells, a bare future round trip for asks, bare anyio tasks for spawning.  Memory is
measured in a fresh child process so that nothing else this process allocated is counted.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from ._actor import Actor
from ._bench import BenchContext, Figure, percentile
from ._clock import VirtualClock
from ._gc import tune_gc_for_many_objects
from ._message import Message
from ._system import open_system

__all__ = ["SUITE"]


class _Add(Message, frozen=True, kw_only=True, tag="bench.add"):
    amount: int


class _Counter(Actor[_Add]):
    def __init__(self) -> None:
        self.total = 0

    async def receive(self, message: _Add) -> int:
        self.total += message.amount
        return self.total


class _Tick(Message, frozen=True, kw_only=True, tag="bench.tick"):
    pass


class _Ticker(Actor[_Tick]):
    """Counts the ticks of one periodic timer."""

    def __init__(self, interval: float, ticks: list[int]) -> None:
        self.interval = interval
        self.ticks = ticks

    async def on_start(self) -> None:
        self.context.start_timer("tick", _Tick(), delay=self.interval, interval=self.interval)

    async def receive(self, message: _Tick) -> None:
        self.ticks[0] += 1


async def _simulated_day(actors: int, interval: float) -> tuple[float, int]:
    """Run a simulated day of periodic timers; return real seconds and ticks handled."""
    clock = VirtualClock(auto_advance=True)
    ticks = [0]
    async with open_system(clock=clock) as system:
        for _ in range(actors):
            await system.spawn(lambda: _Ticker(interval, ticks))
        started = time.perf_counter()
        await clock.sleep(86_400)
        elapsed = time.perf_counter() - started
        handled = ticks[0]  # only the ticks inside the timed window
    return elapsed, handled


async def _raw_hops(count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await asyncio.sleep(0)
    return time.perf_counter() - started


class _Idle(Actor[object]):
    async def receive(self, message: object) -> None:
        return None


async def _tell_throughput(count: int) -> float:
    async with open_system() as system:
        ref = await system.spawn(_Counter, name="counter")
        message = _Add(amount=1)
        started = time.perf_counter()
        for _ in range(count):
            await ref.tell(message)
        total = await ref.ask(_Add(amount=0), timeout=60)
        elapsed = time.perf_counter() - started
    assert total == count
    return count / elapsed


async def _raw_queue_throughput(count: int) -> float:
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=1024)
    received = 0

    async def consume() -> None:
        nonlocal received
        while (item := await queue.get()) is not None:
            received += item

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for _ in range(count):
            await queue.put(1)
        await queue.put(None)
    elapsed = time.perf_counter() - started
    assert received == count
    return count / elapsed


async def _naive_stream_throughput(count: int) -> float:
    send, receive = anyio.create_memory_object_stream[int](1024)
    received = 0

    async def consume() -> None:
        nonlocal received
        async with receive:
            async for item in receive:
                received += item

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        async with send:
            for _ in range(count):
                await send.send(1)
    elapsed = time.perf_counter() - started
    assert received == count
    return count / elapsed


async def _ask_latencies(count: int) -> list[float]:
    async with open_system() as system:
        ref = await system.spawn(_Counter, name="counter")
        message = _Add(amount=1)
        for _ in range(min(1000, count)):  # warm up
            await ref.ask(message, timeout=5)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await ref.ask(message, timeout=5)
            samples.append(time.perf_counter() - started)
    return samples


async def _raw_future_latencies(count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[asyncio.Future[int] | None] = asyncio.Queue()

    async def serve() -> None:
        while (future := await queue.get()) is not None:
            future.set_result(1)

    samples = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        for _ in range(count + min(1000, count)):
            started = time.perf_counter()
            future: asyncio.Future[int] = loop.create_future()
            queue.put_nowait(future)
            await future
            samples.append(time.perf_counter() - started)
        queue.put_nowait(None)
    return samples[min(1000, count) :]


class _SpawnResult(msgspec.Struct):
    per_second: float
    rss_mib: float


def _rss_mib() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _spawn_in_this_process(count: int, mode: str) -> _SpawnResult:
    gc.collect()
    before = _rss_mib()
    if mode == "tasks":
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            started = time.perf_counter()
            for _ in range(count):
                tg.start_soon(stop.wait)
            await anyio.lowlevel.checkpoint()
            elapsed = time.perf_counter() - started
            rss = _rss_mib() - before
            stop.set()
        return _SpawnResult(per_second=count / elapsed, rss_mib=rss)
    async with open_system() as system:
        started = time.perf_counter()
        for _ in range(count):
            await system.spawn(_Idle)
        await anyio.lowlevel.checkpoint()  # let every actor reach its idle wait
        elapsed = time.perf_counter() - started
        rss = _rss_mib() - before
        assert system.statistics().actors == count
    return _SpawnResult(per_second=count / elapsed, rss_mib=rss)


def _spawn_in_child(count: int, mode: str, gc_mode: str) -> _SpawnResult:
    completed = subprocess.run(
        [sys.executable, "-m", "runtime._bench_kernel", str(count), mode, gc_mode],
        capture_output=True,
        check=True,
        timeout=600,
    )
    return msgspec.json.decode(completed.stdout.splitlines()[-1], type=_SpawnResult)


async def suite(context: BenchContext) -> list[Figure]:
    """Measure the kernel figures of the foundation issue."""
    scale = 10 if context.quick else 1
    tells = 1_000_000 // scale
    asks = 20_000 // scale
    actors = 100_000 // scale
    context.progress(f"tell throughput: {tells:,} messages, and the raw asyncio.Queue loop")
    tell_rate = max([await _tell_throughput(tells) for _ in range(3)])
    raw_rate = max([await _raw_queue_throughput(tells) for _ in range(3)])
    naive_rate = await _naive_stream_throughput(tells)
    context.progress(f"ask round trips: {asks:,}")
    ask = await _ask_latencies(asks)
    raw_ask = await _raw_future_latencies(asks)
    context.progress("a simulated day of timers on the virtual clock")
    day_one, day_one_ticks = await _simulated_day(1, 1.0)
    day_farm, day_farm_ticks = await _simulated_day(100, 600.0)
    hops = await _raw_hops(day_one_ticks)
    context.progress(f"spawning {actors:,} idle actors in a fresh process")
    tuned = await anyio.to_thread.run_sync(_spawn_in_child, actors, "actors", "tuned")
    default_gc = await anyio.to_thread.run_sync(_spawn_in_child, actors, "actors", "default")
    tasks = await anyio.to_thread.run_sync(_spawn_in_child, actors, "tasks", "tuned")
    return [
        Figure(
            name=f"simulated 24 h, 100 actors with 10 min timers ({day_farm_ticks:,} ticks)",
            value=day_farm,
            unit="s",
            target=1.0,
            better="lower",
            note="real time",
        ),
        Figure(
            name=f"simulated 24 h, one 1 s timer ({day_one_ticks:,} ticks, stress)",
            value=day_one,
            unit="s",
            baseline_name="as many bare event-loop passes",
            baseline_value=hops,
            better="lower",
            note="real time",
        ),
        Figure(
            name="tell throughput",
            value=tell_rate,
            unit="msg/s",
            baseline_name="asyncio.Queue put/get",
            baseline_value=raw_rate,
            target=1_000_000,
            ratio_target=0.5,
        ),
        Figure(
            name="naive anyio stream `async for` (reference)",
            value=naive_rate,
            unit="msg/s",
            baseline_name="taskfarm mailbox",
            baseline_value=tell_rate,
        ),
        Figure(
            name="ask round trip p50",
            value=percentile(ask, 50) * 1e6,
            unit="us",
            baseline_name="bare future round trip",
            baseline_value=percentile(raw_ask, 50) * 1e6,
            target=20,
            better="lower",
        ),
        Figure(
            name="ask round trip p99",
            value=percentile(ask, 99) * 1e6,
            unit="us",
            baseline_name="bare future round trip",
            baseline_value=percentile(raw_ask, 99) * 1e6,
            target=100,
            better="lower",
        ),
        Figure(
            name=f"spawn rate, {actors:,} actors (server GC settings)",
            value=tuned.per_second,
            unit="/s",
            baseline_name="bare anyio tasks",
            baseline_value=tasks.per_second,
            target=20_000,
        ),
        Figure(
            name=f"spawn rate, {actors:,} actors (default GC)",
            value=default_gc.per_second,
            unit="/s",
            baseline_name="bare anyio tasks",
            baseline_value=tasks.per_second,
        ),
        Figure(
            name=f"resident memory, {actors:,} idle actors",
            value=tuned.rss_mib * (100_000 / actors),
            unit="MiB",
            baseline_name="bare anyio tasks",
            baseline_value=tasks.rss_mib * (100_000 / actors),
            target=1024,
            better="lower",
            note="scaled to 100,000" if actors != 100_000 else "",
        ),
    ]


SUITE = suite


def _child_main(argv: list[str]) -> None:
    count, mode, gc_mode = int(argv[0]), argv[1], argv[2]
    if gc_mode == "tuned":
        tune_gc_for_many_objects()
    result: Any = anyio.run(_spawn_in_this_process, count, mode)
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
