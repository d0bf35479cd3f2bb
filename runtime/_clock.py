"""Injected time: the ``Clock`` protocol, the system clock and a virtual clock for tests and
what-if simulations.

Everything in taskfarm reads time from a ``Clock``; nothing calls ``datetime.now()`` or
``time.monotonic()`` directly.  The virtual clock runs a farm day in milliseconds: it jumps to the
next sleeper's deadline as soon as the actors it watches are all idle.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from ._errors import ConfigurationError

__all__ = ["ActivityTracker", "Clock", "SystemClock", "VirtualClock"]

# True in a task while it holds one unit of activity (an actor processing messages).
_holding: ContextVar[bool] = ContextVar("taskfarm_holding_activity", default=False)


@runtime_checkable
class Clock(Protocol):
    """The source of time: wall time for records, monotonic seconds for deadlines."""

    @property
    def activity(self) -> ActivityTracker | None:
        """The tracker the actor system reports busy/idle to, or None when time is real."""
        ...

    def now(self) -> datetime:
        """Return the current wall time, timezone-aware (UTC)."""
        ...

    def monotonic(self) -> float:
        """Return monotonic seconds, for durations and deadlines."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` of this clock's time."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``monotonic()`` reaches ``deadline``."""
        ...


class SystemClock:
    """Real time: wall clock from the OS, sleeps on the event loop."""

    @property
    def activity(self) -> ActivityTracker | None:
        return None

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - time.monotonic()))


class ActivityTracker:
    """Counts units of work in flight so a virtual clock knows when everything is idle.

    A unit is held by an actor from the moment a message lands in its empty mailbox until it has
    drained it.  A holder that parks (sleeps on the clock, awaits a reply) releases its unit, and
    whoever wakes it acquires the unit back *before* waking it, so the count never dips to zero
    between a wake-up and the woken task running.
    """

    __slots__ = ("_count", "_idle")

    def __init__(self) -> None:
        self._count = 0
        # Created only while someone waits: units come and go thousands of times per simulated
        # hour, and an event per busy period would cost more than the work it tracks.
        self._idle: anyio.Event | None = None

    @property
    def count(self) -> int:
        """Return how many units are held."""
        return self._count

    def acquire(self) -> None:
        """Take one unit (called by the waker, or by an actor becoming busy)."""
        self._count += 1

    def release(self) -> None:
        """Give one unit back; the last release signals idleness."""
        self._count -= 1
        if self._count == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    def enter(self) -> None:
        """Mark the current task as holding a unit it has already acquired."""
        _holding.set(True)

    def exit(self) -> None:
        """Mark the current task as no longer holding a unit (it was released)."""
        _holding.set(False)

    def park(self) -> bool:
        """Release the current task's unit before it blocks; return whether it held one."""
        if _holding.get():
            self.release()
            return True
        return False

    async def wait_idle(self) -> None:
        """Wait until no unit is held."""
        if self._count == 0:
            return
        if self._idle is None:
            self._idle = anyio.Event()
        await self._idle.wait()


class _Sleeper:
    __slots__ = ("cancelled", "event", "parked")

    def __init__(self, parked: bool) -> None:
        self.event = anyio.Event()
        self.parked = parked
        self.cancelled = False


class _Callback:
    """A function the virtual clock calls itself at a deadline (no task to wake)."""

    __slots__ = ("cancelled", "function")

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function
        self.cancelled = False

    def cancel(self) -> None:
        """Do not call the function."""
        self.cancelled = True


class VirtualClock:
    """Time that moves only when told to, or by itself when every watched actor is idle.

    ``advance()`` moves time forward by hand, waking sleepers in deadline order.  With
    ``auto_advance=True`` the actor system runs :meth:`run_auto_advance`, which jumps to the next
    sleeper's deadline whenever no actor has work, so simulated hours of timers pass in
    milliseconds while every message is still processed in order.
    """

    # How many scheduler passes the auto-advancer waits, seeing no activity, before it moves
    # time: lets tasks that were just woken outside any actor (a test body) take their step.
    settle_passes = 4

    def __init__(
        self,
        start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
        *,
        auto_advance: bool = False,
    ) -> None:
        if start.tzinfo is None:
            raise ConfigurationError("start must be timezone-aware", where="VirtualClock")
        self._start = start
        self._elapsed = 0.0
        self._sleepers: list[tuple[float, int, _Sleeper | _Callback]] = []
        self._sequence = itertools.count()
        self._activity = ActivityTracker()
        self._new_sleeper = anyio.Event()
        self.auto_advance = auto_advance

    @property
    def activity(self) -> ActivityTracker:
        return self._activity

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    def next_deadline(self) -> float | None:
        """Return the earliest pending sleeper's deadline, or None."""
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    def call_at(self, deadline: float, function: Callable[[], object]) -> _Callback:
        """Call ``function`` when time reaches ``deadline`` (return a handle to cancel it).

        The clock calls it itself while moving time, so a timer costs no task switch; the
        function must not block (telling an actor is what it is for).
        """
        entry = _Callback(function)
        heapq.heappush(self._sleepers, (deadline, next(self._sequence), entry))
        self._new_sleeper.set()
        return entry

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._elapsed + seconds)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._elapsed:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(self._activity.park())
        heapq.heappush(self._sleepers, (deadline, next(self._sequence), sleeper))
        self._new_sleeper.set()
        try:
            await sleeper.event.wait()
        except BaseException:
            # Cancelled before the clock woke us: take our unit back ourselves.
            if not sleeper.event.is_set():
                sleeper.cancelled = True
                if sleeper.parked:
                    self._activity.acquire()
            raise

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking each sleeper at its own deadline."""
        if seconds < 0:
            raise ConfigurationError("cannot move time backwards", where="VirtualClock.advance")
        await self.advance_to(self._elapsed + seconds)

    async def advance_to(self, target: float) -> None:
        """Move time forward to ``target`` monotonic seconds, waking sleepers in order.

        Before each step it waits, as auto-advance does, until every watched actor is idle:
        work a wake-up starts (asks, new sleeps) happens at that wake-up's time.
        """
        while True:
            await self._quiesce()
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self._fire_due(deadline)
        self._elapsed = max(self._elapsed, target)
        await anyio.lowlevel.checkpoint()

    async def run_auto_advance(self) -> None:
        """Jump to the next deadline whenever every watched actor is idle (runs until cancelled)."""
        while True:
            await self._activity.wait_idle()
            await self._settle()
            if self._activity.count:
                continue
            deadline = self.next_deadline()
            if deadline is None:
                self._new_sleeper = anyio.Event()
                await self._new_sleeper.wait()
                continue
            self._fire_due(deadline)

    async def _quiesce(self) -> None:
        while True:
            await self._activity.wait_idle()
            await self._settle()
            if not self._activity.count:
                return

    async def _settle(self) -> None:
        for _ in range(self.settle_passes):
            await anyio.lowlevel.checkpoint()

    def _fire_due(self, deadline: float) -> None:
        self._elapsed = max(self._elapsed, deadline)
        while self._sleepers and self._sleepers[0][0] <= deadline:
            _, _, sleeper = heapq.heappop(self._sleepers)
            if sleeper.cancelled:
                continue
            if type(sleeper) is _Callback:
                sleeper.function()
                continue
            assert type(sleeper) is _Sleeper
            if sleeper.parked:
                self._activity.acquire()
            sleeper.event.set()

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].cancelled:
            heapq.heappop(self._sleepers)
