"""Timers on the virtual clock: one-shot, periodic, replace, cancel, stop/restart, overflow."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from runtime import (
    Actor,
    ActorRef,
    ConfigurationError,
    Message,
    MessageFailedError,
    Supervision,
    VirtualClock,
    open_system,
)


class Tick(Message, frozen=True, kw_only=True, tag="test.timers.tick"):
    label: str


class Start(Message, frozen=True, kw_only=True, tag="test.timers.start"):
    key: str
    label: str
    delay: float
    interval: float | None = None


class Cancel(Message, frozen=True, kw_only=True, tag="test.timers.cancel"):
    key: str


class Boom(Message, frozen=True, kw_only=True, tag="test.timers.boom"):
    pass


class Hold(Message, frozen=True, kw_only=True, tag="test.timers.hold"):
    pass


class Timed(Actor[object]):
    """Starts and cancels timers on request; records (label, virtual time) for every Tick."""

    def __init__(self, clock: VirtualClock, ticks: list[tuple[str, float]]) -> None:
        self.clock = clock
        self.ticks = ticks

    async def receive(self, message: object) -> Any:
        match message:
            case Start(key=key, label=label, delay=delay, interval=interval):
                self.context.start_timer(key, Tick(label=label), delay=delay, interval=interval)
            case Cancel(key=key):
                self.context.cancel_timer(key)
            case Tick(label=label):
                self.ticks.append((label, self.clock.monotonic()))
            case Boom():
                raise RuntimeError("boom")
        return None


async def _timed(system: Any, clock: VirtualClock, ticks: list[tuple[str, float]]) -> Any:
    ref: ActorRef[object] = await system.spawn(lambda: Timed(clock, ticks), name="timed")
    return ref


async def test_one_shot_timer_fires_once_at_its_deadline() -> None:
    """A one-shot timer delivers its message exactly at now + delay, once."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await clock.advance(2.0)
            await ref.ask(Start(key="k", label="once", delay=5.0), timeout=5)
            assert system.statistics().timers == 1
            await clock.advance(4.999)
            assert ticks == []
            await clock.advance(0.001)
            await clock.advance(100.0)
            stats = system.statistics()
    assert ticks == [("once", 7.0)]
    assert (stats.timers, stats.timers_fired) == (0, 1)


async def test_periodic_timer_fires_at_a_fixed_rate() -> None:
    """A periodic timer fires after delay, then every interval, until cancelled."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="p", label="p", delay=1.0, interval=2.0), timeout=5)
            await clock.advance(6.0)
            assert ticks == [("p", 1.0), ("p", 3.0), ("p", 5.0)]
            assert system.statistics().timers == 1
            await ref.ask(Cancel(key="p"), timeout=5)
            await clock.advance(10.0)
            stats = system.statistics()
    assert ticks == [("p", 1.0), ("p", 3.0), ("p", 5.0)]
    assert (stats.timers, stats.timers_fired) == (0, 3)


async def test_starting_a_timer_with_a_running_key_replaces_it() -> None:
    """Starting key "k" again replaces the running "k" timer; only the new one fires."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="k", label="old", delay=5.0), timeout=5)
            await ref.ask(Start(key="k", label="new", delay=8.0), timeout=5)
            await ref.ask(Start(key="other", label="other", delay=3.0), timeout=5)
            assert system.statistics().timers == 2
            await clock.advance(20.0)
    assert ticks == [("other", 3.0), ("new", 8.0)]


async def test_replacing_with_an_earlier_deadline_fires_early() -> None:
    """A replacement due before the timer service's current sleep still fires on time."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="k", label="far", delay=50.0), timeout=5)
            await ref.ask(Start(key="k", label="near", delay=2.0), timeout=5)
            await clock.advance(100.0)
    assert ticks == [("near", 2.0)]


async def test_cancelled_timer_never_fires() -> None:
    """cancel_timer stops a pending timer; cancelling an unknown key is a no-op."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="k", label="k", delay=5.0), timeout=5)
            await ref.ask(Cancel(key="k"), timeout=5)
            await ref.ask(Cancel(key="nothing"), timeout=5)
            await clock.advance(10.0)
            stats = system.statistics()
    assert ticks == []
    assert (stats.timers, stats.timers_fired) == (0, 0)


async def test_timers_are_cancelled_when_the_actor_stops() -> None:
    """Stopping an actor cancels its timers: nothing fires, nothing is dead-lettered."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="a", label="a", delay=5.0), timeout=5)
            await ref.ask(Start(key="b", label="b", delay=1.0, interval=1.0), timeout=5)
            await system.stop(ref)
            assert system.statistics().timers == 0
            await clock.advance(10.0)
            stats = system.statistics()
    assert ticks == []
    assert (stats.timers_fired, stats.dead_letters) == (0, 0)


async def test_timers_are_cancelled_when_the_actor_restarts() -> None:
    """A restart cancels the old instance's timers; the fresh instance starts with none."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    policy = Supervision(backoff_min=0.0, backoff_max=0.0)
    async with open_system(clock=clock, default_supervision=policy) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="p", label="p", delay=1.0, interval=1.0), timeout=5)
            await clock.advance(2.0)
            with pytest.raises(MessageFailedError):
                await ref.ask(Boom(), timeout=5)
            assert system.statistics().timers == 0
            await clock.advance(10.0)
            stats = system.statistics()
    assert ticks == [("p", 1.0), ("p", 2.0)]
    assert (stats.timers, stats.timers_fired, stats.restarts) == (0, 2, 2)


async def test_timer_firing_into_a_full_mailbox_is_a_dead_letter() -> None:
    """A timer whose actor's mailbox is full becomes a counted dead letter, not an error."""
    clock = VirtualClock()
    handled: list[tuple[object, float]] = []

    class Dozing(Actor[object]):
        async def receive(self, message: object) -> Any:
            if isinstance(message, Start):
                self.context.start_timer(message.key, Tick(label=message.label), delay=1.0)
                return None
            handled.append((message, clock.monotonic()))
            if isinstance(message, Hold):
                await clock.sleep(10.0)  # parked on the clock with a full mailbox
            return None

    async with open_system(clock=clock) as system:
        ref = await system.spawn(Dozing, name="dozing", mailbox_capacity=1)
        with anyio.fail_after(5):
            await ref.ask(Start(key="k", label="late", delay=1.0), timeout=5)
            ref.tell_nowait(Hold())
            await anyio.wait_all_tasks_blocked()
            ref.tell_nowait(Hold())  # queued behind the dozing one: mailbox full
            await clock.advance(1.0)
            stats = system.statistics()
            await clock.advance(30.0)
    assert (stats.timers, stats.timers_fired, stats.dead_letters) == (0, 1, 1)
    letter = system.recent_dead_letters[0]
    assert (letter.recipient, letter.message, letter.reason) == (
        "/dozing",
        Tick(label="late"),
        "timer 'k': mailbox full",
    )
    assert handled == [(Hold(), 0.0), (Hold(), 10.0)]


async def test_cancelled_timer_does_not_move_auto_advanced_time() -> None:
    """Auto-advance never jumps to the deadline of a timer that was cancelled."""
    clock = VirtualClock(auto_advance=True)
    ticks: list[tuple[str, float]] = []
    async with open_system(clock=clock) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5):
            await ref.ask(Start(key="a", label="a", delay=10.0), timeout=5)
            await ref.ask(Start(key="b", label="b", delay=100.0), timeout=5)
            await ref.ask(Cancel(key="a"), timeout=5)
            await clock.sleep(50.0)
            assert clock.monotonic() == 50.0
            await ref.ask(Cancel(key="b"), timeout=5)
            await anyio.wait_all_tasks_blocked()
            assert clock.monotonic() == 50.0
    assert ticks == []


@pytest.mark.parametrize(("delay", "interval"), [(-1.0, None), (1.0, 0.0), (1.0, -2.0)])
async def test_invalid_timer_arguments_are_rejected(delay: float, interval: float | None) -> None:
    """A negative delay or a non-positive interval raises ConfigurationError in the handler."""
    clock = VirtualClock()
    ticks: list[tuple[str, float]] = []
    policy = Supervision(backoff_min=0.0, backoff_max=0.0)
    async with open_system(clock=clock, default_supervision=policy) as system:
        ref = await _timed(system, clock, ticks)
        with anyio.fail_after(5), pytest.raises(MessageFailedError) as info:
            await ref.ask(Start(key="k", label="k", delay=delay, interval=interval), timeout=5)
        assert isinstance(info.value.__cause__, ConfigurationError)


# -- simulated days ----------------------------------------------------------------------------


async def _simulate(seconds: int) -> tuple[int, list[tuple[str, float]], float, int]:
    """Run a 1 s periodic timer plus one-shots for ``seconds`` of virtual time."""
    clock = VirtualClock(auto_advance=True)
    done = anyio.Event()
    events: list[tuple[str, float]] = []
    count = 0

    class Farm(Actor[object]):
        async def on_start(self) -> None:
            self.context.start_timer("tick", Tick(label="tick"), delay=1.0, interval=1.0)
            self.context.start_timer("hour", Tick(label="hour"), delay=3600.0)
            self.context.start_timer("half", Tick(label="half"), delay=seconds / 2 + 0.5)

        async def receive(self, message: object) -> Any:
            nonlocal count
            assert isinstance(message, Tick)
            if message.label == "tick":
                count += 1
                if count == seconds:
                    self.context.cancel_timer("tick")
                    done.set()
            else:
                events.append((message.label, clock.monotonic()))
            return None

    async with open_system(clock=clock) as system:
        await system.spawn(Farm)
        with anyio.fail_after(60):
            await done.wait()
        now = clock.monotonic()
        fired = system.statistics().timers_fired
    return count, events, now, fired


async def test_auto_advance_runs_an_hour_of_timers_exactly() -> None:
    """A simulated hour of a 1 s timer gives exactly 3600 ticks and ends at 3600 s."""
    started = time.perf_counter()
    count, events, now, fired = await _simulate(3600)
    elapsed = time.perf_counter() - started
    assert count == 3600
    assert now == 3600.0
    assert events == [("half", 1800.5), ("hour", 3600.0)]
    assert fired == 3602
    assert elapsed < 5.0


@pytest.mark.slow
async def test_auto_advance_runs_a_day_of_timers_exactly() -> None:
    """A simulated 24 h of a 1 s timer gives exactly 86,400 ticks and ends at 86,400 s."""
    started = time.perf_counter()
    count, events, now, fired = await _simulate(86_400)
    elapsed = time.perf_counter() - started
    assert count == 86_400
    assert now == 86_400.0
    assert events == [("hour", 3600.0), ("half", 43_200.5)]
    assert fired == 86_402
    assert elapsed < 30.0
