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
    check_batch_size,
    check_until,
    log,
    next_timestamp,
    utc,
)
from ._errors import JournalClosedError, JournalError, VersionConflictError
from ._journal import DEFAULT_BATCH_SIZE, AppendResult, RecordedEvent, S, StreamInfo

__all__ = ["InMemoryJournal"]


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    schema_version: int
    position: int
    state: bytes


class InMemoryJournal:
    """A journal held in lists: every append is atomic and visible at once.

    Events are encoded on append (so an unregistered event fails here as it would in SQLite)
    but stored as the frozen objects given; snapshot states are stored encoded.
    """

    def __init__(self, *, clock: Clock, codec: EventCodec) -> None:
        self.clock = clock
        self.codec = codec
        self._records: list[RecordedEvent] = []
        self._timestamps: list[datetime] = []
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._snapshots: dict[str, dict[int, _Snapshot]] = {}
        self._closed = False

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
        encoded = [self.codec.encode(event) for event in events]
        stream = self._streams.get(stream_id)
        current = len(stream) if stream else 0
        if expected_version is not None and expected_version != current:
            raise VersionConflictError(
                stream_id=stream_id, expected=expected_version, actual=current
            )
        previous = self._timestamps[-1] if self._timestamps else None
        timestamp = next_timestamp(self.clock, previous)
        if stream is None:
            stream = self._streams[stream_id] = []
        first = len(self._records) + 1
        for offset, (event, (tag, schema_version, _payload)) in enumerate(
            zip(events, encoded, strict=True)
        ):
            record = RecordedEvent(
                first + offset,
                stream_id,
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
        return AppendResult(
            stream_id=stream_id,
            first_position=first,
            last_position=len(self._records),
            version=len(stream),
            timestamp=timestamp,
        )

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

    async def aclose(self) -> None:
        """Close the journal; later calls raise ``JournalClosedError``."""
        self._closed = True
        await anyio.lowlevel.checkpoint()
