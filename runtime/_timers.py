"""Timers on the injected clock: one task per system serves every actor's timers."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import ConfigurationError, MailboxFullError
from ._logging import get_logger

if TYPE_CHECKING:
    from ._actor import _Cell
    from ._clock import Clock

__all__ = ["TimerService"]

_log = get_logger("runtime.timers")


class _Timer:
    __slots__ = ("cancelled", "cell", "deadline", "handle", "interval", "key", "message")

    def __init__(
        self, cell: _Cell, key: str, message: object, deadline: float, interval: float | None
    ) -> None:
        self.cell = cell
        self.key = key
        self.message = message
        self.deadline = deadline
        self.interval = interval
        self.cancelled = False
        self.handle: Any = None  # the virtual clock's callback, in direct mode


class TimerService:
    """A heap of one-shot and periodic timers, fired in deadline order on the clock.

    One task sleeps until the earliest deadline, so 100,000 actors with timers cost one task,
    not 100,000.  Periodic timers run at a fixed rate; ticks missed while the clock jumped are
    skipped, not replayed in a burst.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, _Timer]] = []
        self._by_key: dict[tuple[int, str], _Timer] = {}
        self._sequence = itertools.count()
        self._changed = anyio.Event()
        self._parked = False
        self._sleep_scope: anyio.CancelScope | None = None
        self._sleep_deadline = 0.0
        self.fired = 0
        # A virtual clock calls timers itself (no task hop per tick): "direct mode".
        self._call_at: Callable[[float, Callable[[], object]], Any] | None = getattr(
            clock, "call_at", None
        )

    def start(
        self, cell: _Cell, key: str, message: object, *, delay: float, interval: float | None
    ) -> None:
        """Start (or replace) the timer ``key`` of ``cell``."""
        if delay < 0 or (interval is not None and interval <= 0):
            raise ConfigurationError("delay must be >= 0 and interval > 0", where=f"timer {key!r}")
        self.cancel(cell, key)
        timer = _Timer(cell, key, message, self._clock.monotonic() + delay, interval)
        self._by_key[(id(cell), key)] = timer
        if self._call_at is not None:
            timer.handle = self._call_at(timer.deadline, partial(self._fire_direct, timer))
        else:
            self._push(timer)

    def cancel(self, cell: _Cell, key: str) -> None:
        """Cancel the timer ``key`` of ``cell`` (no error if there is none)."""
        timer = self._by_key.pop((id(cell), key), None)
        if timer is not None:
            self._discard(timer)

    def cancel_all(self, cell: _Cell) -> None:
        """Cancel every timer of ``cell`` (it stopped or restarts)."""
        for map_key in [k for k in self._by_key if k[0] == id(cell)]:
            self._discard(self._by_key.pop(map_key))

    def _discard(self, timer: _Timer) -> None:
        timer.cancelled = True
        if timer.handle is not None:
            timer.handle.cancel()
        if self._sleep_scope is not None and timer.deadline <= self._sleep_deadline:
            # We may be sleeping towards this very timer: wake up and sleep towards the next
            # live one, so a virtual clock never jumps to a deadline that no longer exists.
            self._sleep_scope.cancel()

    def pending(self) -> int:
        """Return how many timers are running."""
        return len(self._by_key)

    def _push(self, timer: _Timer) -> None:
        heapq.heappush(self._heap, (timer.deadline, next(self._sequence), timer))
        if self._parked:
            # Hand our activity unit back before waking us, so a virtual clock cannot jump
            # in between.
            self._parked = False
            tracker = self._clock.activity
            if tracker is not None:
                tracker.acquire()
            self._changed.set()
        elif self._sleep_scope is not None and timer.deadline < self._sleep_deadline:
            self._sleep_scope.cancel()

    async def run(self) -> None:
        """Fire timers until cancelled (the system runs this in its task group)."""
        if self._call_at is not None:
            return  # direct mode: the clock fires them
        clock = self._clock
        tracker = clock.activity
        if tracker is not None:
            tracker.acquire()
            tracker.enter()
        heap = self._heap
        while True:
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
            if not heap:
                self._changed = anyio.Event()
                self._parked = True
                if tracker is not None:
                    tracker.release()
                await self._changed.wait()
                continue
            deadline = heap[0][0]
            if deadline <= clock.monotonic():
                self._fire(heapq.heappop(heap)[2])
                continue
            with anyio.CancelScope() as scope:
                self._sleep_scope = scope
                self._sleep_deadline = deadline
                await clock.sleep_until(deadline)
            self._sleep_scope = None

    def _fire_direct(self, timer: _Timer) -> None:
        if not timer.cancelled:
            self._fire(timer)

    def _fire(self, timer: _Timer) -> None:
        self.fired += 1
        if timer.interval is None:
            self._by_key.pop((id(timer.cell), timer.key), None)
        else:
            now = self._clock.monotonic()
            next_deadline = timer.deadline + timer.interval
            if next_deadline <= now:
                missed = (now - timer.deadline) // timer.interval
                next_deadline = timer.deadline + (missed + 1) * timer.interval
            timer.deadline = next_deadline
            if self._call_at is not None:
                timer.handle = self._call_at(next_deadline, partial(self._fire_direct, timer))
            else:
                heapq.heappush(self._heap, (next_deadline, next(self._sequence), timer))
        ref: Any = timer.cell.ref
        try:
            ref.tell_nowait(timer.message)
        except MailboxFullError:
            timer.cell.system.dead_letter(
                timer.message,
                recipient=timer.cell.path,
                reason=f"timer {timer.key!r}: mailbox full",
            )
