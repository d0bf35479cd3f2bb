"""The in-memory journal: the SQLite journal's contract without a file (tests, simulations)."""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import anyio.lowlevel
import msgspec

from runtime import Clock

from ._codec import Event, EventCodec
from ._common import (
    check_after,
    check_append,
    check_append_many,
    check_batch_size,
    check_until,
    log,
    next_timestamp,
    utc,
)
from ._errors import JournalClosedError, JournalError, VersionConflictError
from ._journal import (
    DEFAULT_BATCH_SIZE,
    AppendResult,
    LoadedStream,
    RecordedEvent,
    S,
    StreamAppend,
    StreamInfo,
)
from ._subscription import CommitSignal, Subscription

__all__ = ["InMemoryJournal"]


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    schema_version: int
    position: int
    state: bytes


class InMemoryJournal:
    """A journal held in lists: every append is atomic and visible at once.

    Events are encoded on append (so an unregistered event fails here as it would in SQLite)
    but stored as the frozen objects given; snapshot states are stored encoded.  An append
    runs without a checkpoint between its checks and its last write, so it is atomic against
    every other task.
    """

    def __init__(self, *, clock: Clock, codec: EventCodec) -> None:
        self.clock = clock
        self.codec = codec
        self._records: list[RecordedEvent] = []
        self._timestamps: list[datetime] = []
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._snapshots: dict[str, dict[int, _Snapshot]] = {}
        self._closed = False
        self._commits = CommitSignal()

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosedError("the journal is closed")

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` (see ``Journal.append``).

        Raises:
            VersionConflictError: the stream is not at ``expected_version``.
            EventEncodeError: an event's class is not registered in the codec.
            JournalError: the arguments are invalid.
            JournalClosedError: the journal is closed.
        """
        # The one cancellation point comes before anything is committed.
        await anyio.lowlevel.checkpoint()
        self._check_open()
        check_append(stream_id, events, expected_version)
        part = StreamAppend(stream_id=stream_id, events=events, expected_version=expected_version)
        return self._commit([part], correlation_id)[0]

    async def append_many(
        self, appends: Sequence[StreamAppend], *, correlation_id: str | None = None
    ) -> list[AppendResult]:
        """Append to several streams at once, all or nothing (see ``Journal.append_many``).

        Raises:
            VersionConflictError: a stream is not at its ``expected_version``.
            EventEncodeError: an event's class is not registered in the codec.
            JournalError: the arguments are invalid.
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        check_append_many(appends)
        return self._commit(appends, correlation_id)

    def _commit(
        self, appends: Sequence[StreamAppend], correlation_id: str | None
    ) -> list[AppendResult]:
        # Everything that can fail (encoding, versions) runs before the first write.
        encoded = [[self.codec.encode(event) for event in part.events] for part in appends]
        for part in appends:
            current = len(self._streams.get(part.stream_id, ()))
            expected = part.expected_version
            if expected is not None and expected != current:
                raise VersionConflictError(
                    stream_id=part.stream_id, expected=expected, actual=current
                )
        previous = self._timestamps[-1] if self._timestamps else None
        timestamp = next_timestamp(self.clock, previous)
        results: list[AppendResult] = []
        for part, part_encoded in zip(appends, encoded, strict=True):
            stream = self._streams.setdefault(part.stream_id, [])
            current = len(stream)
            first = len(self._records) + 1
            for offset, (event, (tag, schema_version, _payload)) in enumerate(
                zip(part.events, part_encoded, strict=True)
            ):
                record = RecordedEvent(
                    first + offset,
                    part.stream_id,
                    current + offset + 1,
                    tag,
                    schema_version,
                    timestamp,
                    correlation_id,
                    event,
                )
                self._records.append(record)
                self._timestamps.append(timestamp)
                stream.append(record)
            results.append(
                AppendResult(
                    stream_id=part.stream_id,
                    first_position=first,
                    last_position=len(self._records),
                    version=len(stream),
                    timestamp=timestamp,
                )
            )
        self._commits.notify()
        return results

    def subscribe(self, *, after: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> Subscription:
        """Return a subscription to the events after ``after`` (see ``Journal.subscribe``).

        Raises:
            JournalError: ``after`` or ``batch_size`` is invalid.
            JournalClosedError: the journal is closed.
        """
        self._check_open()
        check_after("after", after)
        check_batch_size(batch_size)
        return Subscription(
            read=self._read_batch,
            signal=self._commits,
            after=after,
            batch_size=batch_size,
            clock=self.clock,
        )

    async def _read_batch(self, after: int, batch_size: int) -> list[RecordedEvent]:
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return self._records[after : after + batch_size]

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, until_position: int | None = None
    ) -> list[RecordedEvent]:
        """Return the stream's events after ``after_version`` (see ``Journal.read_stream``).

        Raises:
            JournalError: the bounds are invalid.
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        check_after("after_version", after_version)
        check_until(until_position)
        records = self._streams.get(stream_id, [])[after_version:]
        if until_position is not None:
            cut = bisect.bisect_right(records, until_position, key=lambda r: r.position)
            records = records[:cut]
        return records

    async def read_all(
        self,
        *,
        after_position: int = 0,
        until_position: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> AsyncIterator[Sequence[RecordedEvent]]:
        """Yield events after ``after_position`` in batches (see ``Journal.read_all``).

        Raises:
            JournalError: the bounds are invalid.
            JournalClosedError: the journal is closed.
        """
        check_after("after_position", after_position)
        check_until(until_position)
        check_batch_size(batch_size)
        start = after_position
        while True:
            await anyio.lowlevel.checkpoint()
            self._check_open()
            end = len(self._records)
            if until_position is not None:
                end = min(end, until_position)
            if start >= end:
                return
            stop = min(start + batch_size, end)
            yield self._records[start:stop]
            start = stop

    async def last_position(self) -> int:
        """Return the last position (0 when empty).

        Raises:
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return len(self._records)

    async def stream_version(self, stream_id: str) -> int:
        """Return the stream's version (0 when it does not exist).

        Raises:
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return len(self._streams.get(stream_id, ()))

    async def streams(self) -> list[StreamInfo]:
        """Return every stream's extent, ordered by stream id.

        Raises:
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return [
            StreamInfo(
                stream_id=stream_id,
                version=len(records),
                first_position=records[0].position,
                last_position=records[-1].position,
                event_count=len(records),
            )
            for stream_id, records in sorted(self._streams.items())
        ]

    async def position_at(self, timestamp: datetime) -> int:
        """Return the last position whose timestamp is <= ``timestamp`` (0 if none).

        Raises:
            ConfigurationError: ``timestamp`` is naive.
            JournalClosedError: the journal is closed.
        """
        when = utc(timestamp, where="position_at")
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return bisect.bisect_right(self._timestamps, when)

    async def save_snapshot(
        self, stream_id: str, *, version: int, state: msgspec.Struct, schema_version: int = 1
    ) -> None:
        """Store ``state`` as the stream's state at ``version``.

        Raises:
            JournalError: the stream has no event at ``version``, or the state cannot be
                encoded.
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        data = self.codec.encode_state(state)
        records = self._streams.get(stream_id, [])
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not (1 <= version <= len(records))
        ):
            raise JournalError(
                f"cannot snapshot {stream_id!r} at version {version!r}: "
                f"the stream is at version {len(records)}"
            )
        self._snapshots.setdefault(stream_id, {})[version] = _Snapshot(
            version, schema_version, records[version - 1].position, data
        )

    async def load_snapshot(
        self,
        stream_id: str,
        state_type: type[S],
        *,
        schema_version: int = 1,
        max_version: int | None = None,
        max_position: int | None = None,
    ) -> tuple[int, S] | None:
        """Return the latest usable snapshot (see ``Journal.load_snapshot``), or None.

        Raises:
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return self._latest_snapshot(
            stream_id, state_type, schema_version, max_version, max_position
        )

    def _latest_snapshot(
        self,
        stream_id: str,
        state_type: type[S],
        schema_version: int,
        max_version: int | None = None,
        max_position: int | None = None,
    ) -> tuple[int, S] | None:
        snapshots = self._snapshots.get(stream_id, {})
        for version in sorted(snapshots, reverse=True):
            snapshot = snapshots[version]
            if snapshot.schema_version != schema_version:
                continue
            if max_version is not None and version > max_version:
                continue
            if max_position is not None and snapshot.position > max_position:
                continue
            try:
                return version, self.codec.decode_state(snapshot.state, state_type)
            except JournalError as error:
                log().warning(
                    "snapshot_ignored", stream_id=stream_id, version=version, reason=str(error)
                )
        return None

    async def load_streams(
        self, prefix: str, state_type: type[S], *, schema_version: int = 1
    ) -> AsyncIterator[LoadedStream[S]]:
        """Yield the streams under ``prefix`` with their latest usable snapshots and the events
        after them (see ``Journal.load_streams``).

        Raises:
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        for stream_id in sorted(s for s in self._streams if s.startswith(prefix)):
            snapshot = self._latest_snapshot(stream_id, state_type, schema_version)
            after = snapshot[0] if snapshot is not None else 0
            yield LoadedStream(
                stream_id=stream_id, snapshot=snapshot, events=self._streams[stream_id][after:]
            )

    async def aclose(self) -> None:
        """Close the journal (its subscriptions end); later calls raise
        ``JournalClosedError``."""
        self._closed = True
        self._commits.close()
        await anyio.lowlevel.checkpoint()
