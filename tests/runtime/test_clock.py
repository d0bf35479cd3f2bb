"""Clocks: the system clock, the virtual clock's advance() and auto-advance, activity tracking."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from runtime import (
    ActivityTracker,
    Actor,
    ActorRef,
    Clock,
    ConfigurationError,
    Message,
    SystemClock,
    VirtualClock,
    open_system,
)

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Nap(Message, frozen=True, kw_only=True, tag="test.clock.nap"):
    seconds: float


class Relay(Message, frozen=True, kw_only=True, tag="test.clock.relay"):
    seconds: float


# -- SystemClock -------------------------------------------------------------------------------


async def test_system_clock_reads_real_time() -> None:
    """SystemClock gives UTC-aware wall time, monotonic seconds, and no activity tracker."""
    clock = SystemClock()
    assert isinstance(clock, Clock)
    assert clock.activity is None
    before = datetime.now(UTC)
    now = clock.now()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= now <= datetime.now(UTC)
    first = clock.monotonic()
    with anyio.fail_after(1):
        await clock.sleep_until(first - 10.0)  # in the past: returns at once
        await clock.sleep(0.0)
    assert clock.monotonic() >= first


# -- VirtualClock by hand ----------------------------------------------------------------------


def test_virtual_clock_needs_an_aware_start() -> None:
    """A naive start time is refused."""
    with pytest.raises(ConfigurationError):
        VirtualClock(datetime(2026, 1, 1))  # noqa: DTZ001


async def test_virtual_clock_starts_at_zero_and_now_follows_monotonic() -> None:
    """monotonic() starts at 0 and now() is the start plus the elapsed virtual seconds."""
    clock = VirtualClock(START)
    assert isinstance(clock, Clock)
    assert clock.monotonic() == 0.0
    assert clock.now() == START
    await clock.advance(90.5)
    assert clock.monotonic() == 90.5
    assert clock.now() == START + timedelta(seconds=90.5)


async def test_advance_refuses_to_go_backwards() -> None:
    """advance() with a negative duration raises ConfigurationError and leaves time alone."""
    clock = VirtualClock()
    await clock.advance(5.0)
    with pytest.raises(ConfigurationError):
        await clock.advance(-1.0)
    assert clock.monotonic() == 5.0


async def test_sleeping_for_nothing_returns_without_moving_time() -> None:
    """sleep(0) and sleep_until(a past deadline) return at once; time does not move."""
    clock = VirtualClock()
    await clock.advance(3.0)
    with anyio.fail_after(1):
        await clock.sleep(0.0)
        await clock.sleep_until(1.0)
    assert clock.monotonic() == 3.0
    assert clock.next_deadline() is None


async def test_advance_wakes_sleepers_in_deadline_order_at_their_exact_times() -> None:
    """advance() wakes each sleeper at its own deadline, earliest first, then stops at target."""
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    async def until(name: str, deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append((name, clock.monotonic()))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper, "c", 3.0)
            tg.start_soon(sleeper, "a", 1.0)
            tg.start_soon(until, "d", 7.5)
            tg.start_soon(sleeper, "b", 2.0)
            tg.start_soon(sleeper, "late", 100.0)
            await anyio.wait_all_tasks_blocked()
            assert clock.next_deadline() == 1.0
            await clock.advance(2.5)
            assert woke == [("a", 1.0), ("b", 2.0)]
            assert clock.monotonic() == 2.5
            await clock.advance(10.0)
            assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 7.5)]
            assert clock.monotonic() == 12.5
            assert clock.next_deadline() == 100.0
            tg.cancel_scope.cancel()


async def test_equal_deadlines_wake_in_the_order_they_slept() -> None:
    """Sleepers with the same deadline wake in the order they went to sleep."""
    clock = VirtualClock()
    woke: list[int] = []

    async def sleeper(n: int) -> None:
        await clock.sleep(5.0)
        woke.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(sleeper, n)
                await anyio.wait_all_tasks_blocked()
            await clock.advance(5.0)
    assert woke == [0, 1, 2, 3, 4]


async def test_a_cancelled_sleeper_is_forgotten() -> None:
    """A cancelled sleep leaves no deadline behind and gives its activity unit back."""
    clock = VirtualClock()
    tracker = clock.activity
    tracker.acquire()
    tracker.enter()  # this task now holds a unit, as an actor handler would
    with anyio.move_on_after(0.01):
        await clock.sleep(50.0)
    assert tracker.count == 1  # released on parking, taken back on cancellation
    assert clock.next_deadline() is None
    tracker.exit()
    tracker.release()
    assert tracker.count == 0


async def test_advance_waits_for_woken_actors_before_moving_on() -> None:
    """advance() lets woken actors finish (even via asks) before waking later deadlines."""
    clock = VirtualClock()
    times: list[float] = []

    async with open_system(clock=clock) as system:
        ref = await _chain(system, clock, times, depth=6)
        with anyio.fail_after(5):
            # The head wakes at 1, asks down a chain of 6 actors, then sleeps 1 more second.
            ref.tell_nowait(Relay(seconds=1.0))
            await anyio.wait_all_tasks_blocked()
            async with anyio.create_task_group() as tg:
                tg.start_soon(clock.sleep, 3.0)  # a later deadline to tempt advance()
                await anyio.wait_all_tasks_blocked()
                await clock.advance(5.0)
    assert times == [1.0, 2.0]
    assert clock.monotonic() == 5.0


# -- VirtualClock auto-advance -----------------------------------------------------------------


async def test_auto_advance_jumps_to_the_next_deadline_when_idle() -> None:
    """With auto-advance, a sleep of a simulated hour returns at exactly 3600 virtual seconds."""
    clock = VirtualClock(START, auto_advance=True)
    async with open_system(clock=clock):
        with anyio.fail_after(5):
            await clock.sleep(3600.0)
            assert clock.monotonic() == 3600.0
            assert clock.now() == START + timedelta(hours=1)


async def test_auto_advance_does_not_jump_while_an_actor_is_busy() -> None:
    """Time stands still while an actor handles a message, even if a sleeper is due later."""
    clock = VirtualClock(auto_advance=True)
    seen: list[float] = []

    class Busy(Actor[object]):
        async def receive(self, message: object) -> Any:
            for _ in range(50):
                await anyio.lowlevel.checkpoint()
            seen.append(clock.monotonic())
            return clock.monotonic()

    async with open_system(clock=clock) as system:
        ref = await system.spawn(Busy)
        with anyio.fail_after(5):
            ref.tell_nowait(Nap(seconds=0))
            async with anyio.create_task_group() as tg:
                tg.start_soon(clock.sleep, 10.0)
            assert clock.monotonic() == 10.0
    assert seen == [0.0]


async def test_auto_advance_moves_only_by_the_sleep_of_an_asked_actor() -> None:
    """An actor awaiting an ask to an actor that sleeps 5 s sees exactly 5 s pass."""
    clock = VirtualClock(auto_advance=True)

    class Napper(Actor[Nap]):
        async def receive(self, message: Nap) -> Any:
            await clock.sleep(message.seconds)
            return clock.monotonic()

    class Asker(Actor[Nap]):
        def __init__(self, napper: ActorRef[Nap]) -> None:
            self.napper = napper

        async def receive(self, message: Nap) -> Any:
            before = clock.monotonic()
            woke = await self.napper.ask(message, timeout=5)
            return (before, woke, clock.monotonic())

    async with open_system(clock=clock) as system:
        napper = await system.spawn(Napper)
        asker = await system.spawn(lambda: Asker(napper))
        with anyio.fail_after(5):
            assert await asker.ask(Nap(seconds=5.0), timeout=5) == (0.0, 5.0, 5.0)
            assert await asker.ask(Nap(seconds=2.5), timeout=5) == (5.0, 7.5, 7.5)
            assert clock.activity.count == 0


async def test_auto_advance_runs_a_chain_of_asks_and_sleeps_exactly() -> None:
    """Sleeps reached only through a chain of asks still happen at their exact times."""
    clock = VirtualClock(auto_advance=True)
    times: list[float] = []
    async with open_system(clock=clock) as system:
        ref = await _chain(system, clock, times, depth=6)
        with anyio.fail_after(5):
            ref.tell_nowait(Relay(seconds=1.0))
            await clock.sleep(3.0)
    assert times == [1.0, 2.0]


# -- ActivityTracker ---------------------------------------------------------------------------


async def test_activity_tracker_counts_units_and_signals_idle() -> None:
    """wait_idle returns only once every acquired unit is released."""
    tracker = ActivityTracker()
    with anyio.fail_after(1):
        await tracker.wait_idle()
    tracker.acquire()
    tracker.acquire()
    assert tracker.count == 2
    released = anyio.Event()

    async def waiter() -> None:
        await tracker.wait_idle()
        released.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tracker.release()
            await anyio.wait_all_tasks_blocked()
            assert not released.is_set()
            tracker.release()
            await released.wait()
    assert tracker.count == 0


def test_park_releases_only_a_held_unit() -> None:
    """park() releases the task's unit only if the task entered holding one."""
    tracker = ActivityTracker()
    assert tracker.park() is False
    assert tracker.count == 0
    tracker.acquire()
    tracker.enter()
    assert tracker.park() is True
    assert tracker.count == 0
    tracker.exit()
    assert tracker.park() is False


# -- helpers -----------------------------------------------------------------------------------


async def _chain(system: Any, clock: VirtualClock, times: list[float], *, depth: int) -> Any:
    """A head actor that sleeps, asks down a chain of ``depth`` actors, then sleeps again."""

    class Link(Actor[Relay]):
        def __init__(self, next_ref: ActorRef[Relay] | None) -> None:
            self.next_ref = next_ref

        async def receive(self, message: Relay) -> Any:
            if self.next_ref is not None:
                return await self.next_ref.ask(message, timeout=5)
            return "end"

    class Head(Actor[Relay]):
        def __init__(self, chain: ActorRef[Relay]) -> None:
            self.chain = chain

        async def receive(self, message: Relay) -> Any:
            await clock.sleep(message.seconds)
            times.append(clock.monotonic())
            assert await self.chain.ask(message, timeout=5) == "end"
            await clock.sleep(message.seconds)
            times.append(clock.monotonic())

    next_ref: ActorRef[Relay] | None = None
    for _ in range(depth):
        next_ref = await system.spawn(lambda n=next_ref: Link(n))
    assert next_ref is not None
    chain = next_ref
    return await system.spawn(lambda: Head(chain))


async def test_simulated_time_stops_where_the_system_starts_to_shut_down() -> None:
    """A simulation of a day ends at 24 h: timers that would fire while the actors stop (one
    stops slowly, letting the clock jump) do not move time any further."""
    clock = VirtualClock(auto_advance=True)

    class Ticker(Actor[object]):
        async def on_start(self) -> None:
            self.context.start_timer("tick", Nap(seconds=0), delay=600, interval=600)

        async def on_stop(self) -> None:
            for _ in range(50):  # a stop that takes several event-loop passes
                await anyio.lowlevel.checkpoint()

        async def receive(self, message: object) -> Any:
            return None

    async with open_system(clock=clock) as system:
        for _ in range(10):
            await system.spawn(Ticker)
        with anyio.fail_after(5):
            await clock.sleep(86_400)
    assert clock.monotonic() == 86_400
