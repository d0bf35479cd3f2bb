"""Subscriptions: read a journal from a position, then follow its commits.

A subscription holds no events of its own.  It remembers the last position it delivered and,
when asked for more, reads the next batch from the journal; only when there is nothing after
that position does it wait, for the journal's next commit (or, optionally, a poll interval of
the journal's clock).  So a subscriber that falls behind costs nothing while it is behind and
catches up from the journal's storage, the appenders never wait for it, and memory is bounded
by one batch per subscriber.  The price is a read per wake-up, which is what any catch-up from
a database costs anyway.

The wake-up is a :class:`CommitSignal`: the journal notifies it after every commit it makes.
The waiter is taken *before* the read that finds nothing, so a commit that lands between the
read and the wait is never missed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from runtime import Clock

from ._errors import JournalClosedError

if TYPE_CHECKING:
    from ._journal import RecordedEvent

__all__ = ["CommitSignal", "Subscription"]

ReadBatch = Callable[[int, int], Awaitable[Sequence["RecordedEvent"]]]


class CommitSignal:
    """Wakes every subscriber waiting for a commit (a fresh ``anyio.Event`` per commit)."""

    __slots__ = ("_event", "_waited", "closed")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._waited = False
        self.closed = False

    def waiter(self) -> anyio.Event:
        """Return the event the next commit (or closing) sets."""
        self._waited = True
        return self._event

    def notify(self) -> None:
        """Wake the waiters of the commit that just became durable."""
        if self._waited:
            event, self._event, self._waited = self._event, anyio.Event(), False
            event.set()

    def close(self) -> None:
        """Wake every waiter for good: the journal is closing."""
        self.closed = True
        self._event.set()


class Subscription:
    """Every event after a position, in position order: what is stored, then new commits.

    Build it with ``journal.subscribe(after=...)``.  ``async for batch in subscription``
    yields non-empty batches (``Sequence[RecordedEvent]``); a multi-stream append's events all
    become visible together, though one may straddle two batches.  :attr:`position` is the last
    position delivered.  The iteration ends when the subscription or the journal is closed.
    """

    def __init__(
        self,
        *,
        read: ReadBatch,
        signal: CommitSignal,
        after: int,
        batch_size: int,
        clock: Clock,
        poll_interval: float | None = None,
    ) -> None:
        self._read = read
        self._signal = signal
        self._batch_size = batch_size
        self._clock = clock
        self._poll_interval = poll_interval
        self._closed = False
        self.position = after

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Sequence[RecordedEvent]:
        """Return the next batch, waiting for a commit when there is nothing after
        :attr:`position`.

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            EventChecksumError: a stored event is damaged.
            JournalError: the read failed.
        """
        while True:
            if self._closed or self._signal.closed:
                raise StopAsyncIteration
            waiter = self._signal.waiter()
            try:
                batch = await self._read(self.position, self._batch_size)
            except JournalClosedError:
                raise StopAsyncIteration from None
            if batch:
                self.position = batch[-1].position
                return batch
            await self._wait(waiter)

    async def _wait(self, waiter: anyio.Event) -> None:
        interval = self._poll_interval
        if interval is None:
            await waiter.wait()
            return
        async with anyio.create_task_group() as task_group:

            async def poll() -> None:
                await self._clock.sleep(interval)
                task_group.cancel_scope.cancel()

            task_group.start_soon(poll)
            await waiter.wait()
            task_group.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Stop: the iteration ends (the journal is not affected)."""
        self._closed = True
        # Wake a task of ours that waits for a commit (others just read once more, and wait).
        self._signal.notify()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
