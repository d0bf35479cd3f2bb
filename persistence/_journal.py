"""The ``Journal`` protocol and the records it deals in.

A journal is an append-only sequence of events.  Each event belongs to one *stream* (the
history of one actor: ``"job:42"``), has a 1-based ``version`` within it and a 1-based global
``position`` across all streams.  Appends use optimistic concurrency (``expected_version``);
timestamps come from the journal's injected clock and never decrease with position, so "as of
a time" and "as of a position" mean the same thing.

An append is atomic, and so is ``append_many`` across several streams (one transaction: all
of it or none of it, never half visible to a reader, a subscriber or a recovery).  A
subscription reads what is stored after a position and then follows new commits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Generic, Protocol, TypeVar

import msgspec

from ._codec import Event
from ._subscription import Subscription

__all__ = [
    "AppendResult",
    "Journal",
    "LoadedStream",
    "RecordedEvent",
    "StreamAppend",
    "StreamInfo",
]

S = TypeVar("S")

DEFAULT_BATCH_SIZE = 10_000


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """One event as stored: where it sits in the journal, when, and the event itself.

    ``position`` is global and 1-based; ``version`` is 1-based within ``stream_id``;
    ``timestamp`` is timezone-aware UTC from the journal's clock; ``schema_version`` is the
    version the event was written at (it may have been upcast since).
    """

    position: int
    stream_id: str
    version: int
    tag: str
    schema_version: int
    timestamp: datetime
    correlation_id: str | None
    event: Event


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    """What an append committed: its positions and the stream's version afterwards."""

    stream_id: str
    first_position: int
    last_position: int
    version: int
    timestamp: datetime


class StreamAppend(msgspec.Struct, frozen=True, kw_only=True):
    """One stream's part of an ``append_many``: its events and the version it must be at.

    ``expected_version`` means what it means for ``append`` (``0``: the stream must not exist
    yet; ``None``: no check).
    """

    stream_id: str
    events: Sequence[Event]
    expected_version: int | None = None


class StreamInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's extent: its version, first and last positions, and event count."""

    stream_id: str
    version: int
    first_position: int
    last_position: int
    event_count: int


class LoadedStream(msgspec.Struct, Generic[S], frozen=True, kw_only=True):
    """One stream as ``load_streams`` reads it: its latest usable snapshot, and its events after
    that snapshot (all of them without one), in order."""

    stream_id: str
    snapshot: tuple[int, S] | None
    events: list[RecordedEvent]

    @property
    def version(self) -> int:
        """The stream's version as read: its last event's, else its snapshot's."""
        if self.events:
            return self.events[-1].version
        return self.snapshot[0] if self.snapshot is not None else 0


class Journal(Protocol):
    """An append-only event store with streams, global positions and snapshots.

    ``InMemoryJournal`` and ``SQLiteJournal`` implement it and pass one contract suite.
    """

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` atomically and durably.

        ``expected_version`` is the version the stream must be at (``0``: it must not exist
        yet; ``None``: no check).  Returning means committed; raising (``Cancelled`` included)
        means not committed.

        Raises:
            VersionConflictError: the stream is not at ``expected_version``.
            EventEncodeError: an event's class is not registered in the codec.
            JournalError: ``events`` is empty, or the journal cannot commit.
            JournalClosedError: the journal is closed.
        """
        ...

    async def append_many(
        self, appends: Sequence[StreamAppend], *, correlation_id: str | None = None
    ) -> list[AppendResult]:
        """Append to several streams in one transaction: all of it is committed, or none.

        Each stream's ``expected_version`` is checked; if any fails, nothing is written and
        the error names that stream (the first in ``appends`` order).  The events take
        consecutive positions in ``appends`` order, all with one timestamp.  Returns one result
        per entry, in order.  Returning means committed; raising (``Cancelled`` included)
        means nothing was committed.

        Raises:
            VersionConflictError: a stream is not at its ``expected_version``.
            EventEncodeError: an event's class is not registered in the codec.
            JournalError: ``appends`` is empty, names a stream twice, has an entry without
                events, or the journal cannot commit.
            JournalClosedError: the journal is closed.
        """
        ...

    def subscribe(self, *, after: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> Subscription:
        """Return a subscription to every event after position ``after``, in position order:
        first what is stored, then each new commit as it becomes durable.

        Iterate it (``async for batch in subscription``) for batches of at most
        ``batch_size`` events; close it with ``aclose()`` or ``async with``.  It buffers
        nothing: a subscriber that falls behind reads the events it missed from the journal
        when it asks for them, so a slow subscriber costs no memory and never slows an
        appender.  The iteration ends when the journal closes.

        Raises:
            JournalError: ``after`` or ``batch_size`` is invalid.
            JournalClosedError: the journal is closed.
        """
        ...

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, until_position: int | None = None
    ) -> list[RecordedEvent]:
        """Return the stream's events with version > ``after_version`` (and position <=
        ``until_position``), in order.

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            JournalClosedError: the journal is closed.
        """
        ...

    def read_all(
        self,
        *,
        after_position: int = 0,
        until_position: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> AsyncIterator[Sequence[RecordedEvent]]:
        """Yield every event with ``after_position`` < position <= ``until_position``, in
        batches, in position order (``until_position=None``: to the end, as it grows).

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            JournalClosedError: the journal is closed.
        """
        ...

    async def last_position(self) -> int:
        """Return the position of the last committed event (0 when empty)."""
        ...

    async def stream_version(self, stream_id: str) -> int:
        """Return the stream's current version (0 when it does not exist)."""
        ...

    async def streams(self) -> list[StreamInfo]:
        """Return every stream's extent, ordered by stream id."""
        ...

    async def position_at(self, timestamp: datetime) -> int:
        """Return the last position whose timestamp is <= ``timestamp`` (0 if none).

        Raises:
            ConfigurationError: ``timestamp`` is naive.
        """
        ...

    async def save_snapshot(
        self, stream_id: str, *, version: int, state: msgspec.Struct, schema_version: int = 1
    ) -> None:
        """Store ``state`` as the stream's state at ``version`` (a cache: replay from 0 must
        give the same state).

        Raises:
            JournalError: the stream has no event at ``version``, or the state cannot be
                encoded or committed.
            JournalClosedError: the journal is closed.
        """
        ...

    async def load_snapshot(
        self,
        stream_id: str,
        state_type: type[S],
        *,
        schema_version: int = 1,
        max_version: int | None = None,
        max_position: int | None = None,
    ) -> tuple[int, S] | None:
        """Return ``(version, state)`` of the latest usable snapshot, or None.

        A snapshot is usable when it was saved at ``schema_version``, its version is <=
        ``max_version`` and its event's position is <= ``max_position``, and it decodes as
        ``state_type`` (a snapshot that does not is ignored: snapshots are caches).
        """
        ...

    def load_streams(
        self, prefix: str, state_type: type[S], *, schema_version: int = 1
    ) -> AsyncIterator[LoadedStream[S]]:
        """Yield every stream whose id starts with ``prefix``, in id order, each with its
        latest usable snapshot and the events after it: what a recovery needs, read in a few
        queries rather than two per stream, and a bounded number of events at a time.

        A snapshot is usable as for ``load_snapshot`` (saved at ``schema_version``, intact,
        decodes as ``state_type``; one that is not is skipped for the one before it, with the
        same warning).  ``state_type`` may be a lighter Struct than the one saved, naming only
        the fields the caller needs: the others are not decoded.  Events are verified as every
        read verifies them.

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            JournalClosedError: the journal is closed.
        """
        ...

    async def aclose(self) -> None:
        """Finish pending appends and close; later calls raise ``JournalClosedError``."""
        ...
