"""The SQLite journal: WAL, one writer task committing appends in groups, a separate reader.

Design (this is the only module that imports aiosqlite):

- **One writer.**  A task in the journal's task group owns the write connection.  Appenders
  hand it requests through a deque; it takes everything queued (up to ``max_group_events``)
  and commits it as one transaction, run as one synchronous function in a worker thread
  (``BEGIN IMMEDIATE``, one ``executemany``, ``COMMIT``): one thread hop per group, none per
  event.  While a group is being fsync'd the next one accumulates, so throughput grows with
  concurrency while each caller still resumes only once its own group is durable.  (The
  write connection is a plain ``sqlite3`` connection for that reason: aiosqlite runs one
  statement per hop, and each hop also waits its turn behind the event loop.)
- **Optimistic concurrency in the writer.**  The writer is the only writer, so it keeps every
  touched stream's version in memory and checks ``expected_version`` there; a request that
  conflicts fails alone and the rest of its group commits.  ``UNIQUE(stream_id, version)`` is
  the safety net: if it ever fires (another process wrote the file), the writer reloads its
  caches and runs the group again once.
- **Cancellation.**  Once a request is in the queue the caller always learns its outcome: if
  cancelled while waiting it waits on, shielded (bounded by one commit), then returns the
  result if it was committed or lets the cancellation propagate if it was not.  So
  ``append`` returning means committed and ``Cancelled`` means not committed.
- **Reads** go through their own aiosqlite connection (WAL readers never block the writer),
  in big keyset-paginated chunks decoded straight into event classes.
- **Recovery reads in bulk.**  ``load_streams`` reads every stream under a prefix with its
  latest snapshot and the events after it in a few queries (a skip scan of the stream ids over
  the ``(stream_id, version)`` index, the latest snapshot of each, then the tails through
  ``json_each``, a chunk of streams at a time so that memory stays bounded), not two
  single-row queries per stream, each a hop to the reader's thread.  Snapshot and event
  checksums are verified as everywhere else.
- **Atomic multi-stream appends.**  ``append_many`` is one request to the same writer: its
  expected versions are all checked first, then all its rows join the group's transaction, so
  it commits whole or not at all (a conflict fails it alone, naming the stream) and callers
  get the same cancellation guarantee as ``append``.
- **Checksums.**  Each row carries a CRC-32 of its fields (see ``_sqlite_file``), computed by
  the writer and verified by every read that decodes events (``read_stream``, ``read_all``,
  subscriptions, so every replay and rebuild); a damaged row raises ``EventChecksumError``
  naming its position and stream.  A read-write open verifies the last ``_TAIL_CHECKED``
  events first and refuses a journal whose tail is damaged, pointing to
  ``taskfarm journal salvage``.
- **Subscriptions** re-read from the reader connection after each commit of this journal's
  writer (nothing is buffered per subscriber).  Appends by *another process* are seen when this
  journal next commits or, with ``poll_interval``, within that interval of the journal's clock;
  a read-only journal has no writer, so it follows a live file only by polling.
- **Bad files are refused untouched.**  Before SQLite writes anything the header is checked
  (magic, page size, page count x page size against the file size), then a read-only
  connection checks the application id and ``PRAGMA user_version``; a file that is not
  SQLite, is truncated, is another application's database, has a newer schema, or is empty
  (unless the caller asks to initialise it) raises ``JournalFileError`` naming the file and the
  problem.  Schema migrations are steps keyed on ``PRAGMA user_version``, applied in one
  transaction.  Read-only opens never create or change a file (``_sqlite_file`` says how).
"""

from __future__ import annotations

import bisect
import json
import os
import sqlite3
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import msgspec

from runtime import Clock, ConfigurationError

from ._codec import Event, EventCodec
from ._common import (
    check_after,
    check_append,
    check_append_many,
    check_batch_size,
    check_until,
    format_timestamp,
    log,
    next_timestamp,
    utc,
)
from ._errors import (
    JournalClosedError,
    JournalError,
    JournalFileError,
    VersionConflictError,
)
from ._journal import (
    DEFAULT_BATCH_SIZE,
    AppendResult,
    LoadedStream,
    RecordedEvent,
    S,
    StreamAppend,
    StreamInfo,
)
from ._sqlite_file import (
    EVENT_COLUMNS,
    FILE_ERRORS,
    SCHEMA_VERSION,
    Create,
    checksum_error,
    create_journal_file,
    empty_file_error,
    first_bad_row,
    inspect_file,
    migrate,
    probe,
    read_only_uri,
    register_functions,
    snapshot_checksum,
    wal_path,
    warn_discarded_wal,
)
from ._subscription import CommitSignal, Subscription

__all__ = [
    "SCHEMA_VERSION",
    "JournalDescription",
    "JournalStatistics",
    "SQLiteJournal",
    "open_sqlite_journal",
]

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_COLUMNS = EVENT_COLUMNS
_INSERT_EVENT = f"INSERT INTO events ({_COLUMNS}, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_SNAPSHOT = """
    INSERT OR REPLACE INTO snapshots
        (stream_id, version, schema_version, position, timestamp, state, checksum)
    SELECT stream_id, version, ?1, position, ?2, ?3,
        taskfarm_snapshot_checksum(stream_id, version, ?1, position, ?2, ?3)
    FROM events WHERE stream_id = ?4 AND version = ?5
"""
_SELECT = f"SELECT {_COLUMNS}, checksum FROM events"
_READ_ALL = f"{_SELECT} WHERE position > ? AND position <= ? ORDER BY position LIMIT ?"
_READ_STREAM = f"{_SELECT} WHERE stream_id = ? AND version > ? ORDER BY version"
_READ_STREAM_CHUNK = _READ_STREAM + " LIMIT ?"
_READ_TAIL = f"{_SELECT} ORDER BY position DESC LIMIT ?"
_MAX_POSITION = 2**63 - 1
# ``load_streams``: the ids and versions of the streams in a range, a few index seeks each (a
# skip scan, not a pass over every event); the latest snapshot of each at a schema; the events
# after given versions, one index seek per stream (``CROSS JOIN`` keeps the streams the outer
# loop).
_STREAM_HEADS = """
    WITH RECURSIVE ids(id) AS (
        SELECT (SELECT min(stream_id) FROM events WHERE stream_id >= ?1 AND stream_id < ?2)
        UNION ALL
        SELECT (SELECT min(stream_id) FROM events WHERE stream_id > ids.id AND stream_id < ?2)
        FROM ids WHERE ids.id IS NOT NULL
    )
    SELECT id, (SELECT max(version) FROM events WHERE stream_id = ids.id)
    FROM ids WHERE id IS NOT NULL
"""
_LATEST_SNAPSHOTS = """
    SELECT stream_id, version, position, timestamp, state, checksum FROM snapshots AS s
    WHERE stream_id >= ?1 AND stream_id < ?2 AND schema_version = ?3 AND version = (
        SELECT max(version) FROM snapshots
        WHERE stream_id = s.stream_id AND schema_version = ?3
    )
"""
_READ_TAILS = (
    f"SELECT {', '.join('e.' + c.strip() for c in _COLUMNS.split(','))}, e.checksum"
    " FROM json_each(?1) AS j CROSS JOIN events AS e"
    " ON e.stream_id = j.key AND e.version > j.value"
)
_TAILS_CHUNK = 500  # streams per tail query, at most
_TAIL_EVENTS = 50_000  # events per tail query, about (a longer stream is read whole)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VERSION_LOOKUP_CHUNK = 500
# Events verified when a journal is opened for writing (its most recent writes, where a torn
# or damaged page is most likely); every read verifies what it reads.
_TAIL_CHECKED = 1000


class JournalStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The writer's counters since open: commits, events, and the group sizes they formed."""

    commits: int
    events: int
    snapshots: int
    largest_group: int
    conflicts: int

    @property
    def mean_group(self) -> float:
        """Return the mean number of events per commit."""
        return self.events / self.commits if self.commits else 0.0


class JournalDescription(msgspec.Struct, frozen=True, kw_only=True):
    """What ``taskfarm journal inspect`` shows about a journal file."""

    path: str
    size_bytes: int
    wal_bytes: int
    schema_version: int
    event_count: int
    last_position: int
    snapshot_count: int
    first_timestamp: datetime | None
    last_timestamp: datetime | None
    streams: list[StreamInfo]


class _Batch:
    """What callers wait on: one event per commit group, not one per request."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = anyio.Event()


Encoded = list[tuple[str, int, str]]  # (tag, schema_version, payload) per event


class _Request:
    __slots__ = ("batch", "error", "settled", "size", "stream_id")

    def __init__(self, stream_id: str, size: int) -> None:
        self.stream_id = stream_id
        self.size = size  # rows it adds to a commit group
        self.batch: _Batch  # assigned when handed over
        self.error: JournalError | None = None
        self.settled = False


class _AppendRequest(_Request):
    __slots__ = ("correlation_id", "encoded", "expected_version", "result")

    def __init__(
        self,
        stream_id: str,
        encoded: Encoded,
        expected_version: int | None,
        correlation_id: str | None,
    ) -> None:
        super().__init__(stream_id, len(encoded))
        self.encoded = encoded
        self.expected_version = expected_version
        self.correlation_id = correlation_id
        self.result: AppendResult | None = None


class _MultiAppendRequest(_Request):
    """An ``append_many``: several streams' parts, committed together or not at all."""

    __slots__ = ("correlation_id", "parts", "results")

    def __init__(
        self, parts: list[tuple[str, Encoded, int | None]], correlation_id: str | None
    ) -> None:
        super().__init__(parts[0][0], sum(len(encoded) for _, encoded, _ in parts))
        self.parts = parts
        self.correlation_id = correlation_id
        self.results: list[AppendResult] = []


class _SnapshotRequest(_Request):
    __slots__ = ("schema_version", "state", "version")

    def __init__(self, stream_id: str, version: int, schema_version: int, state: str) -> None:
        super().__init__(stream_id, 1)
        self.version = version
        self.schema_version = schema_version
        self.state = state


def _clone(error: JournalError) -> JournalError:
    """Copy ``error`` so that each caller of a failed group raises its own exception object."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    copy.__cause__ = error.__cause__
    return copy


def _translate(error: BaseException, path: Path, action: str) -> JournalError:
    """Turn a driver error into a journal error (file problems name the file)."""
    closed_types = (ValueError, sqlite3.ProgrammingError)
    if isinstance(error, closed_types) and "closed" in str(error).lower():
        return JournalClosedError("the journal is closed")
    name = getattr(error, "sqlite_errorname", "")
    if name in FILE_ERRORS or type(error) is sqlite3.DatabaseError:
        problem = f"{action} failed: {error}"
        if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or type(error) is sqlite3.DatabaseError:
            problem += (
                f"; `taskfarm journal check {path}` shows the damage, and "
                f"`taskfarm journal salvage {path} --out NEW` keeps what is readable"
            )
        return JournalFileError(path=path, problem=problem)
    return JournalError(f"{path}: {action} failed: {error}")


def _add_rows(
    rows: list[tuple[Any, ...]],
    position: int,
    stream_id: str,
    current: int,
    stamp: str,
    correlation_id: str | None,
    encoded: Encoded,
) -> tuple[int, int]:
    """Append one stream's rows (with their checksums) to ``rows``; return the last position
    and version."""
    crc32 = zlib.crc32
    # The checksum's text, as ``_sqlite_file.event_checksum`` builds it (inlined: hot path).
    correlation = "" if correlation_id is None else "\x1e" + correlation_id
    for tag, schema_version, payload in encoded:
        position += 1
        current += 1
        checksum = crc32(
            f"{position}\x1f{stream_id}\x1f{current}\x1f{tag}\x1f{schema_version}\x1f"
            f"{stamp}\x1f{correlation}\x1f{payload}".encode()
        )
        rows.append(
            (
                position,
                stream_id,
                current,
                tag,
                schema_version,
                stamp,
                correlation_id,
                payload,
                checksum,
            )
        )
    return position, current


class _Writer:
    """The write connection and what only the writer knows; every method runs in a thread.

    The writer task calls :meth:`commit` once per group through ``anyio.to_thread``, so a group
    costs one thread hop however many statements its transaction runs (aiosqlite would cost
    one hop per statement, and each hop also waits its turn behind the event loop's work).
    The caches hold committed values only, and only this object touches them.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.versions: dict[str, int] = {}
        self.last_position = 0
        self.last_timestamp: datetime | None = None
        self.broken: JournalError | None = None
        # Counted here, logged by the writer task: nothing that can fail runs in a commit.
        self.reloads = 0
        self.migrated_from: int | None = None

    def reload(self) -> None:
        """Forget the stream versions and read the last position and timestamp again."""
        self.versions.clear()
        row = self.conn.execute(
            "SELECT position, timestamp FROM events ORDER BY position DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            self.last_position = row[0]
            self.last_timestamp = datetime.fromisoformat(row[1])

    def commit(self, group: list[_Request], timestamp: datetime) -> tuple[int, int, int]:
        """Commit ``group`` in one transaction and settle every request in it.

        Returns (events, snapshots, conflicts).  The UNIQUE index is the safety net behind the
        version cache: if it fires, another process wrote the file, so reload and retry once.

        Raises:
            JournalError: the transaction failed (nothing in the group was committed).
        """
        if self.broken is not None:
            raise self.broken
        try:
            return self._commit(group, timestamp)
        except sqlite3.IntegrityError:
            self.reloads += 1
            self.reload()
            try:
                return self._commit(group, timestamp)
            except sqlite3.IntegrityError as error:
                raise JournalError(
                    f"{self.path}: another process is writing this journal ({error})"
                ) from error
        except sqlite3.Error as error:
            raise _translate(error, self.path, "commit") from error

    def _commit(self, group: list[_Request], timestamp: datetime) -> tuple[int, int, int]:
        conn = self.conn
        stamp = format_timestamp(timestamp)
        for request in group:
            request.error = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            versions = self.versions
            unknown: set[str] = set()
            for request in group:
                if type(request) is _MultiAppendRequest:
                    unknown.update(sid for sid, _, _ in request.parts if sid not in versions)
                elif request.stream_id not in versions:
                    unknown.add(request.stream_id)
            if unknown:
                self._load_versions(unknown)
            pending: dict[str, int] = {}
            rows: list[tuple[Any, ...]] = []
            snapshot_rows: list[tuple[Any, ...]] = []
            position = self.last_position
            conflicts = 0
            for request in group:
                if type(request) is _AppendRequest:
                    stream_id = request.stream_id
                    current = pending.get(stream_id)
                    if current is None:
                        current = versions[stream_id]
                    expected = request.expected_version
                    if expected is not None and expected != current:
                        request.error = VersionConflictError(
                            stream_id=stream_id, expected=expected, actual=current
                        )
                        conflicts += 1
                        continue
                    first = position + 1
                    position, current = _add_rows(
                        rows,
                        position,
                        stream_id,
                        current,
                        stamp,
                        request.correlation_id,
                        request.encoded,
                    )
                    pending[stream_id] = current
                    request.result = AppendResult(
                        stream_id=stream_id,
                        first_position=first,
                        last_position=position,
                        version=current,
                        timestamp=timestamp,
                    )
                elif type(request) is _MultiAppendRequest:
                    # Every expected version first: a conflict anywhere writes nothing.
                    conflict: VersionConflictError | None = None
                    for stream_id, _, expected in request.parts:
                        current = pending.get(stream_id)
                        if current is None:
                            current = versions[stream_id]
                        if expected is not None and expected != current:
                            conflict = VersionConflictError(
                                stream_id=stream_id, expected=expected, actual=current
                            )
                            break
                    if conflict is not None:
                        request.error = conflict
                        conflicts += 1
                        continue
                    results: list[AppendResult] = []
                    for stream_id, encoded, _ in request.parts:
                        current = pending.get(stream_id)
                        if current is None:
                            current = versions[stream_id]
                        first = position + 1
                        position, current = _add_rows(
                            rows,
                            position,
                            stream_id,
                            current,
                            stamp,
                            request.correlation_id,
                            encoded,
                        )
                        pending[stream_id] = current
                        results.append(
                            AppendResult(
                                stream_id=stream_id,
                                first_position=first,
                                last_position=position,
                                version=current,
                                timestamp=timestamp,
                            )
                        )
                    request.results = results
                elif type(request) is _SnapshotRequest:
                    stream_id = request.stream_id
                    current = pending.get(stream_id)
                    if current is None:
                        current = versions[stream_id]
                    if request.version > current:
                        request.error = JournalError(
                            f"cannot snapshot {stream_id!r} at version {request.version}: "
                            f"the stream is at version {current}"
                        )
                        continue
                    snapshot_rows.append(
                        (request.schema_version, stamp, request.state, stream_id, request.version)
                    )
            if rows:
                conn.executemany(_INSERT_EVENT, rows)
            if snapshot_rows:
                conn.executemany(_INSERT_SNAPSHOT, snapshot_rows)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        # Durable: only now do the caches and the callers learn about it.
        self.last_position = position
        self.last_timestamp = timestamp
        versions.update(pending)
        # Outcomes were written into the requests above, but nobody reads them before
        # `settled` (a failed commit overwrites them all).
        for request in group:
            request.settled = True
        return len(rows), len(snapshot_rows), conflicts

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error as error:
            # The connection's state is unknown now: refuse further writes rather than guess.
            self.broken = _translate(error, self.path, "rollback")

    def _load_versions(self, stream_ids: set[str]) -> None:
        ids = list(stream_ids)
        for start in range(0, len(ids), _VERSION_LOOKUP_CHUNK):
            chunk = ids[start : start + _VERSION_LOOKUP_CHUNK]
            values = ", ".join("(?)" for _ in chunk)
            rows = self.conn.execute(
                f"WITH ids(s) AS (VALUES {values}) "
                "SELECT s, (SELECT max(version) FROM events WHERE stream_id = s) FROM ids",
                chunk,
            )
            for stream_id, version in rows:
                self.versions[stream_id] = version or 0

    def close(self) -> None:
        self.conn.close()


class SQLiteJournal:
    """The durable journal over one SQLite file; build it with :func:`open_sqlite_journal`."""

    def __init__(
        self,
        *,
        path: Path,
        clock: Clock,
        codec: EventCodec,
        reader: aiosqlite.Connection,
        writer: _Writer | None,
        max_group_events: int,
        max_pending: int,
    ) -> None:
        self.path = path
        self.clock = clock
        self.codec = codec
        self.read_only = writer is None
        self._reader = reader
        self._writer = writer
        self._writer_limiter = anyio.CapacityLimiter(1)
        self._max_group_events = max_group_events
        self._max_pending = max_pending
        self._queue: deque[_Request] = deque()
        self._batch = _Batch()
        self._wakeup = anyio.Event()
        self._space = anyio.Event()
        self._writer_running = False
        self._writer_stopped = anyio.Event()
        self._closed = False
        self._connections_closed = False
        self._commit_signal = CommitSignal()
        self._commits = 0
        self._events = 0
        self._snapshots = 0
        self._largest_group = 0
        self._conflicts = 0

    # -- introspection -----------------------------------------------------------------------

    def statistics(self) -> JournalStatistics:
        """Return the writer's counters since open."""
        return JournalStatistics(
            commits=self._commits,
            events=self._events,
            snapshots=self._snapshots,
            largest_group=self._largest_group,
            conflicts=self._conflicts,
        )

    async def describe(self) -> JournalDescription:
        """Return the file's size, schema version, extent, snapshots and streams.

        Raises:
            JournalFileError: the file cannot be read.
            JournalClosedError: the journal is closed.
        """
        streams = await self.streams()
        (count, last, first_ts, last_ts, snapshots, schema) = (
            await self._fetch(
                "SELECT (SELECT count(*) FROM events), (SELECT max(position) FROM events),"
                " (SELECT timestamp FROM events ORDER BY position LIMIT 1),"
                " (SELECT timestamp FROM events ORDER BY position DESC LIMIT 1),"
                " (SELECT count(*) FROM snapshots), (SELECT user_version FROM pragma_user_version)",
                (),
            )
        )[0]
        wal = wal_path(self.path)
        return JournalDescription(
            path=str(self.path),
            size_bytes=self.path.stat().st_size,
            wal_bytes=wal.stat().st_size if wal.exists() else 0,
            schema_version=schema,
            event_count=count,
            last_position=last or 0,
            snapshot_count=snapshots,
            first_timestamp=datetime.fromisoformat(first_ts) if first_ts else None,
            last_timestamp=datetime.fromisoformat(last_ts) if last_ts else None,
            streams=streams,
        )

    # -- appends -----------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id``; return once the commit is durable.

        Raises:
            VersionConflictError: the stream is not at ``expected_version``.
            EventEncodeError: an event's class is not registered in the codec.
            JournalError: the arguments are invalid, the journal is read-only, or the commit
                failed.
            JournalClosedError: the journal is closed.
        """
        self._check_writable()
        check_append(stream_id, events, expected_version)
        encode = self.codec.encode
        encoded: list[tuple[str, int, str]] = []
        for event in events:
            tag, schema_version, payload = encode(event)
            encoded.append((tag, schema_version, payload.decode()))
        request = _AppendRequest(stream_id, encoded, expected_version, correlation_id)
        await self._submit(request)
        assert request.result is not None
        return request.result

    async def append_many(
        self, appends: Sequence[StreamAppend], *, correlation_id: str | None = None
    ) -> list[AppendResult]:
        """Append to several streams in one transaction; return once it is durable (see
        ``Journal.append_many``).

        Raises:
            VersionConflictError: a stream is not at its ``expected_version`` (nothing is
                written).
            EventEncodeError: an event's class is not registered in the codec.
            JournalError: the arguments are invalid, the journal is read-only, or the commit
                failed.
            JournalClosedError: the journal is closed.
        """
        self._check_writable()
        check_append_many(appends)
        encode = self.codec.encode
        parts: list[tuple[str, Encoded, int | None]] = []
        for part in appends:
            encoded: Encoded = []
            for event in part.events:
                tag, schema_version, payload = encode(event)
                encoded.append((tag, schema_version, payload.decode()))
            parts.append((part.stream_id, encoded, part.expected_version))
        request = _MultiAppendRequest(parts, correlation_id)
        await self._submit(request)
        return request.results

    def subscribe(
        self,
        *,
        after: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float | None = None,
    ) -> Subscription:
        """Return a subscription to the events after ``after`` (see ``Journal.subscribe``).

        It wakes after each commit of this journal's writer.  ``poll_interval`` (seconds of
        the journal's clock) also makes it look for rows written by another process, or,
        in a read-only journal, by the process that writes the file (a read-only journal
        opened while no process had the file open reads it as immutable and sees no later
        writes).

        Raises:
            JournalError: ``after``, ``batch_size`` or ``poll_interval`` is invalid.
            JournalClosedError: the journal is closed.
        """
        if self._closed:
            raise JournalClosedError("the journal is closed")
        check_after("after", after)
        check_batch_size(batch_size)
        if poll_interval is not None and not poll_interval > 0:
            raise JournalError(f"poll_interval must be None or > 0 seconds, got {poll_interval!r}")
        return Subscription(
            read=self._read_batch,
            signal=self._commit_signal,
            after=after,
            batch_size=batch_size,
            clock=self.clock,
            poll_interval=poll_interval,
        )

    async def _read_batch(self, after: int, batch_size: int) -> list[RecordedEvent]:
        return self._records(await self._fetch(_READ_ALL, (after, _MAX_POSITION, batch_size)))

    async def save_snapshot(
        self, stream_id: str, *, version: int, state: msgspec.Struct, schema_version: int = 1
    ) -> None:
        """Store ``state`` as the stream's state at ``version`` (committed with the next group).

        Raises:
            JournalError: the stream has no event at ``version``, the state cannot be encoded,
                the journal is read-only, or the commit failed.
            JournalClosedError: the journal is closed.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_writable()
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise JournalError(f"snapshot version must be an int >= 1, got {version!r}")
        data = self.codec.encode_state(state).decode()
        await self._submit(_SnapshotRequest(stream_id, version, schema_version, data))

    def _check_writable(self) -> None:
        if self._closed:
            raise JournalClosedError("the journal is closed")
        if self.read_only:
            raise JournalError(f"{self.path}: the journal was opened read-only")

    async def _submit(self, request: _Request) -> None:
        # Not handed over yet: waiting for queue space may be cancelled (nothing committed).
        while len(self._queue) >= self._max_pending:
            await self._space.wait()
            self._check_writable()
        if not self._writer_running:
            raise JournalClosedError("the journal's writer has stopped")
        request.batch = self._batch
        self._queue.append(request)
        self._wakeup.set()
        # Handed over: from here the caller learns the outcome whatever happens to it.
        try:
            while not request.settled:
                await request.batch.done.wait()
        except anyio.get_cancelled_exc_class():
            # Cancelled while the writer works on it: wait for the outcome (bounded by one
            # commit), then either report "not committed" by letting the cancellation
            # propagate, or return the committed result.  AnyIO's cancellation is level-
            # triggered, so the caller's scope cancels it again at its next checkpoint.
            with anyio.CancelScope(shield=True):
                while not request.settled:
                    await request.batch.done.wait()
            if request.error is not None:
                raise
            return
        if request.error is not None:
            raise request.error

    # -- the writer task ---------------------------------------------------------------------

    async def _run_writer(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._writer_running = True
        task_status.started()
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        break
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                batch, group = self._take_group()
                # A commit is never abandoned halfway: its callers are waiting for its outcome.
                with anyio.CancelScope(shield=True):
                    await self._commit_group(group)
                batch.done.set()
                self._commit_signal.notify()
        finally:
            self._writer_running = False
            failure = JournalClosedError("the journal closed before this was committed")
            for request in self._queue:
                request.error = _clone(failure)
                request.settled = True
            self._queue.clear()
            self._batch.done.set()
            self._space.set()
            self._writer_stopped.set()

    def _take_group(self) -> tuple[_Batch, list[_Request]]:
        """Take everything queued (up to ``max_group_events``), with the batch it waits on.

        Splitting the callers into two cohorts that alternate (one committing while the event
        loop runs the other) looks like free overlap, but measured slower: the worker thread
        needs the GIL to start and to finish each commit, and a busy event loop holds it.  So
        one group takes all that is queued, and the loop and the disk take turns.
        """
        queue = self._queue
        group: list[_Request] = []
        size = 0
        while queue and (not group or size < self._max_group_events):
            request = queue.popleft()
            group.append(request)
            size += request.size
        batch = self._batch
        self._batch = _Batch()
        # Requests left behind (the group was full) move to the next batch; their callers,
        # woken by this one's commit, see they are not settled and wait again.
        for request in queue:
            request.batch = self._batch
        self._space.set()
        self._space = anyio.Event()
        return batch, group

    async def _commit_group(self, group: list[_Request]) -> None:
        writer = self._writer
        assert writer is not None
        reloads = writer.reloads
        try:
            timestamp = next_timestamp(self.clock, writer.last_timestamp)
            events, snapshots, conflicts = await anyio.to_thread.run_sync(
                writer.commit, group, timestamp, limiter=self._writer_limiter
            )
        except JournalError as error:
            log().error("journal_commit_failed", path=str(self.path), error=str(error))
            if writer.broken is not None:
                log().error("journal_writer_broken", path=str(self.path))
            self._fail(group, error)
        except Exception as error:
            log().exception("journal_commit_failed", path=str(self.path))
            self._fail(group, _translate(error, self.path, "commit"))
        else:
            self._commits += 1
            self._events += events
            self._snapshots += snapshots
            self._conflicts += conflicts
            self._largest_group = max(self._largest_group, events)
        finally:
            if writer.reloads != reloads:
                log().warning("journal_cache_reloaded", path=str(self.path))
            for request in group:
                if not request.settled:
                    # Never wake a caller without an outcome (e.g. on a BaseException).
                    request.error = JournalError(f"{self.path}: not committed")
                    request.settled = True

    def _fail(self, group: list[_Request], error: JournalError) -> None:
        for request in group:
            if isinstance(request, _AppendRequest):
                request.result = None
            elif isinstance(request, _MultiAppendRequest):
                request.results = []
            request.error = _clone(error)
            request.settled = True

    # -- reads -------------------------------------------------------------------------------

    async def _fetch(self, sql: str, parameters: Iterable[Any]) -> list[Any]:
        if self._closed:
            raise JournalClosedError("the journal is closed")
        try:
            rows = await self._reader.execute_fetchall(sql, parameters)
        except (sqlite3.Error, ValueError) as error:
            raise _translate(error, self.path, "read") from error
        return list(rows)

    def _records(self, rows: list[Any]) -> list[RecordedEvent]:
        """Verify and decode rows (``_COLUMNS`` + checksum).

        Raises:
            EventChecksumError: a row fails its checksum.
            EventDecodeError: a row cannot be decoded.
        """
        fast = self.codec.fast_decoders()
        decode = self.codec.decode
        fromisoformat = datetime.fromisoformat
        crc32 = zlib.crc32
        records: list[RecordedEvent] = []
        append = records.append
        last_stamp = ""
        timestamp = _EPOCH
        for row in rows:
            (
                position,
                stream_id,
                version,
                tag,
                schema_version,
                stamp,
                correlation_id,
                payload,
                checksum,
            ) = row
            # As ``_sqlite_file.event_checksum`` computes it (inlined: replay's hot path).
            correlation = "" if correlation_id is None else "\x1e" + correlation_id
            if checksum != crc32(
                f"{position}\x1f{stream_id}\x1f{version}\x1f{tag}\x1f{schema_version}\x1f"
                f"{stamp}\x1f{correlation}\x1f{payload}".encode()
            ):
                raise checksum_error(self.path, row)
            if stamp != last_stamp:
                timestamp = fromisoformat(stamp)
                last_stamp = stamp
            entry = fast.get(tag)
            if entry is not None and entry[0] == schema_version:
                try:
                    event = entry[1](payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    event = decode(tag, schema_version, payload, position=position)
            else:
                event = decode(tag, schema_version, payload, position=position)
            append(
                RecordedEvent(
                    position,
                    stream_id,
                    version,
                    tag,
                    schema_version,
                    timestamp,
                    correlation_id,
                    event,
                )
            )
        return records

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, until_position: int | None = None
    ) -> list[RecordedEvent]:
        """Return the stream's events after ``after_version`` (see ``Journal.read_stream``).

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            EventChecksumError: a stored event is damaged.
            JournalError: the bounds are invalid, or the read failed.
            JournalClosedError: the journal is closed.
        """
        check_after("after_version", after_version)
        check_until(until_position)
        if until_position is None:
            return self._records(await self._fetch(_READ_STREAM, (stream_id, after_version)))
        # Positions grow with versions: read in growing chunks and stop past the bound, rather
        # than letting SQLite filter the whole rest of the stream.
        records: list[RecordedEvent] = []
        chunk = 1024
        while True:
            rows = await self._fetch(_READ_STREAM_CHUNK, (stream_id, after_version, chunk))
            cut = bisect.bisect_right(rows, until_position, key=lambda row: row[0])
            records.extend(self._records(rows[:cut] if cut < len(rows) else rows))
            if cut < len(rows) or len(rows) < chunk:
                return records
            after_version = rows[-1][2]
            chunk = min(chunk * 4, 65536)

    async def read_all(
        self,
        *,
        after_position: int = 0,
        until_position: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> AsyncIterator[Sequence[RecordedEvent]]:
        """Yield events after ``after_position`` in batches (see ``Journal.read_all``).

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            EventChecksumError: a stored event is damaged.
            JournalError: the bounds are invalid, or the read failed.
            JournalClosedError: the journal is closed.
        """
        check_after("after_position", after_position)
        check_until(until_position)
        check_batch_size(batch_size)
        upper = _MAX_POSITION if until_position is None else until_position
        after = after_position
        while after < upper:
            rows = await self._fetch(_READ_ALL, (after, upper, batch_size))
            if not rows:
                return
            yield self._records(rows)
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    async def last_position(self) -> int:
        """Return the last committed position (0 when empty).

        Raises:
            JournalClosedError: the journal is closed.
        """
        rows = await self._fetch("SELECT max(position) FROM events", ())
        return int(rows[0][0] or 0)

    async def stream_version(self, stream_id: str) -> int:
        """Return the stream's version (0 when it does not exist).

        Raises:
            JournalClosedError: the journal is closed.
        """
        rows = await self._fetch(
            "SELECT max(version) FROM events WHERE stream_id = ?", (stream_id,)
        )
        return int(rows[0][0] or 0)

    async def streams(self) -> list[StreamInfo]:
        """Return every stream's extent, ordered by stream id.

        Raises:
            JournalClosedError: the journal is closed.
        """
        rows = await self._fetch(
            "SELECT stream_id, max(version), min(position), max(position), count(*)"
            " FROM events GROUP BY stream_id ORDER BY stream_id",
            (),
        )
        return [
            StreamInfo(
                stream_id=stream_id,
                version=version,
                first_position=first,
                last_position=last,
                event_count=count,
            )
            for stream_id, version, first, last, count in rows
        ]

    async def position_at(self, timestamp: datetime) -> int:
        """Return the last position whose timestamp is <= ``timestamp`` (0 if none).

        Timestamps never decrease with position, so this is a binary search over positions.

        Raises:
            ConfigurationError: ``timestamp`` is naive.
            JournalClosedError: the journal is closed.
        """
        stamp = format_timestamp(utc(timestamp, where="position_at"))
        low, high = 0, await self.last_position()
        # Invariant: events up to `low` are <= stamp; events after `high` are > stamp.
        while low < high:
            middle = (low + high + 1) // 2
            rows = await self._fetch(
                "SELECT position, timestamp FROM events WHERE position >= ?"
                " ORDER BY position LIMIT 1",
                (middle,),
            )
            if rows and rows[0][1] <= stamp:
                low = max(middle, rows[0][0])
            else:
                high = middle - 1
        return low

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
        rows = await self._fetch(
            "SELECT version, position, timestamp, state, checksum FROM snapshots"
            " WHERE stream_id = ? AND schema_version = ? AND version <= ? AND position <= ?"
            " ORDER BY version DESC",
            (
                stream_id,
                schema_version,
                _MAX_POSITION if max_version is None else max_version,
                _MAX_POSITION if max_position is None else max_position,
            ),
        )
        for version, position, stamp, data, checksum in rows:
            state = self._usable_snapshot(
                stream_id, state_type, schema_version, (version, position, stamp, data, checksum)
            )
            if state is not None:
                return version, state
        return None

    def _usable_snapshot(
        self, stream_id: str, state_type: type[S], schema_version: int, row: Sequence[Any]
    ) -> S | None:
        """Verify and decode one snapshot row (version, position, timestamp, state, checksum);
        None, with a warning, if it is damaged or does not decode as ``state_type``."""
        version, position, stamp, data, checksum = row
        if checksum != snapshot_checksum(stream_id, version, schema_version, position, stamp, data):
            # A cache that is damaged is a cache that is missing: replay instead.
            log().warning(
                "snapshot_ignored",
                stream_id=stream_id,
                version=version,
                path=str(self.path),
                reason="the snapshot fails its checksum (damaged)",
            )
            return None
        try:
            return self.codec.decode_state(data, state_type)
        except JournalError as error:
            log().warning(
                "snapshot_ignored", stream_id=stream_id, version=version, reason=str(error)
            )
        return None

    async def load_streams(
        self, prefix: str, state_type: type[S], *, schema_version: int = 1
    ) -> AsyncIterator[LoadedStream[S]]:
        """Yield the streams under ``prefix`` with their latest usable snapshots and the events
        after them (see ``Journal.load_streams``), in a few queries whatever their number.

        Each stream is consistent (its events are all those committed after its snapshot when
        they are read); streams created after the first query are left out.  Tails are read a
        chunk of streams at a time, about ``_TAIL_EVENTS`` events each.

        Raises:
            EventDecodeError: a stored event cannot be decoded.
            EventChecksumError: a stored event is damaged.
            JournalError: the read failed.
            JournalClosedError: the journal is closed.
        """
        low, high = _prefix_range(prefix)
        heads = await self._fetch(_STREAM_HEADS, (low, high))
        snapshots: dict[str, tuple[int, S]] = {}
        damaged: list[tuple[str, int]] = []
        for row in await self._fetch(_LATEST_SNAPSHOTS, (low, high, schema_version)):
            stream_id, version = row[0], row[1]
            state = self._usable_snapshot(stream_id, state_type, schema_version, row[1:])
            if state is None:
                damaged.append((stream_id, version))
            else:
                snapshots[stream_id] = (version, state)
        for stream_id, version in damaged:
            # Rare: the latest is unusable, so look for the one before it as load_snapshot does.
            older = await self.load_snapshot(
                stream_id, state_type, schema_version=schema_version, max_version=version - 1
            )
            if older is not None:
                snapshots[stream_id] = older
        chunk: dict[str, int] = {}  # stream id -> the version its tail starts after
        size = 0  # the chunk's tails as listed: about what its query reads
        for index, (stream_id, version) in enumerate(heads):
            after = snapshots[stream_id][0] if stream_id in snapshots else 0
            chunk[stream_id] = after
            size += version - after
            if size < _TAIL_EVENTS and len(chunk) < _TAILS_CHUNK and index < len(heads) - 1:
                continue
            # A stream whose snapshot was at its version when listed is read too: it may have
            # grown since, and a stream's tail is all of what follows its snapshot.
            tails: dict[str, list[RecordedEvent]] = {stream_id: [] for stream_id in chunk}
            for record in self._records(await self._fetch(_READ_TAILS, (json.dumps(chunk),))):
                tails[record.stream_id].append(record)
            for stream_id, tail in tails.items():
                tail.sort(key=_version_of)  # already in order: the index gives it
                yield LoadedStream(
                    stream_id=stream_id, snapshot=snapshots.get(stream_id), events=tail
                )
            chunk, size = {}, 0

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit what was handed over, stop the writer, end the subscriptions and close the
        connections."""
        self._closed = True
        self._commit_signal.close()
        self._wakeup.set()
        self._space.set()
        with anyio.move_on_after(30, shield=True):
            if self._writer_running:
                await self._writer_stopped.wait()
            await self._close_connections()

    async def _close_connections(self) -> None:
        if self._connections_closed:
            return
        self._connections_closed = True
        try:
            if self._writer is not None:
                await anyio.to_thread.run_sync(self._writer.close, limiter=self._writer_limiter)
            await self._reader.close()
        except Exception as error:
            log().warning("journal_close_failed", path=str(self.path), error=str(error))


# -- opening -----------------------------------------------------------------------------------


def _version_of(record: RecordedEvent) -> int:
    return record.version


def _prefix_range(prefix: str) -> tuple[str, str | bytes]:
    """Return ``(low, high)``: a stream id starts with ``prefix`` iff ``low <= id < high``
    (SQLite compares text as UTF-8 bytes, which orders like code points)."""
    end = prefix.rstrip(chr(0x10FFFF))
    if not end:
        return prefix, b""  # no upper bound: SQLite orders every text before every blob
    return prefix, end[:-1] + chr(ord(end[-1]) + 1)


def _open_writer(path: Path, synchronous: Synchronous, busy_timeout: float) -> _Writer:
    """Open the write connection, switch to WAL, migrate, load the caches and verify the tail
    (in a thread).

    Raises:
        EventChecksumError: one of the last ``_TAIL_CHECKED`` events is damaged.
        JournalFileError: WAL mode is unavailable, or SQLite cannot use the file.
    """
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    # check_same_thread=False: anyio.to_thread may run each commit on a different worker; the
    # writer task runs one at a time.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    try:
        register_functions(conn)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalFileError(path=path, problem=f"cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Before anything is written (a migration would bless damage with fresh checksums).
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            tail = conn.execute(_READ_TAIL, (_TAIL_CHECKED,)).fetchall()
            damaged = first_bad_row(path, tail[::-1])
            if damaged is not None:
                raise damaged
        migrated_from = migrate(conn, path)
        writer = _Writer(conn, path)
        writer.migrated_from = migrated_from if migrated_from != SCHEMA_VERSION else None
        writer.reload()
    except BaseException as error:
        conn.close()
        if isinstance(error, sqlite3.Error):
            raise _translate(error, path, "open") from error
        raise
    return writer


async def _open(
    path: Path,
    *,
    clock: Clock,
    codec: EventCodec,
    synchronous: Synchronous,
    busy_timeout: float,
    read_only: bool,
    create: Create,
    max_group_events: int,
    max_pending: int,
) -> SQLiteJournal:
    started = time.perf_counter()
    if not path.parent.is_dir():
        raise JournalFileError(path=path, problem=f"folder {path.parent} does not exist")
    state = await anyio.to_thread.run_sync(inspect_file, path)
    if not state.exists:
        if read_only or create == "never":
            raise JournalFileError(path=path, problem="no such journal file")
        await anyio.to_thread.run_sync(create_journal_file, path)
        state = await anyio.to_thread.run_sync(inspect_file, path)
    if state.empty:
        if read_only or create != "if_missing_or_empty":
            raise empty_file_error(path, read_only=read_only)
    else:
        await anyio.to_thread.run_sync(
            lambda: probe(path, state, read_only=read_only, create=create)
        )
    warn_discarded_wal(path, state.wal)
    writer: _Writer | None = None
    reader: aiosqlite.Connection | None = None
    try:
        if read_only:
            reader = await aiosqlite.connect(
                read_only_uri(path, state), uri=True, isolation_level=None
            )
        else:
            writer = await anyio.to_thread.run_sync(_open_writer, path, synchronous, busy_timeout)
            reader = await aiosqlite.connect(str(path), isolation_level=None)
        await reader.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        await reader.execute("PRAGMA query_only = ON")
    except BaseException as error:
        with anyio.CancelScope(shield=True):
            if reader is not None:
                await reader.close()
            if writer is not None:
                await anyio.to_thread.run_sync(writer.close)
        if isinstance(error, sqlite3.Error):
            raise _translate(error, path, "open") from error
        raise
    journal = SQLiteJournal(
        path=path,
        clock=clock,
        codec=codec,
        reader=reader,
        writer=writer,
        max_group_events=max_group_events,
        max_pending=max_pending,
    )
    if writer is not None and writer.migrated_from is not None:
        log().info(
            "journal_migrated",
            path=str(path),
            from_version=writer.migrated_from,
            schema_version=SCHEMA_VERSION,
        )
    log().info(
        "journal_opened",
        path=str(path),
        position=writer.last_position if writer else None,
        read_only=read_only,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return journal


@asynccontextmanager
async def open_sqlite_journal(
    path: str | os.PathLike[str],
    *,
    clock: Clock,
    codec: EventCodec,
    synchronous: Synchronous = "FULL",
    busy_timeout: float = 5.0,
    read_only: bool = False,
    create: Create = "if_missing",
    max_group_events: int = 10_000,
    max_pending: int = 100_000,
) -> AsyncIterator[SQLiteJournal]:
    """Open (creating or migrating) the journal at ``path`` and run its writer until exit.

    ``synchronous`` is SQLite's durability level (``FULL``: every commit is fsync'd);
    ``busy_timeout`` (seconds) is how long to wait for another process's lock;
    ``read_only`` opens an existing journal for reading only (no writer, no migration, and no
    file created or changed, not even SQLite's ``-wal``/``-shm`` when they are not there);
    ``create`` says what a read-write open may initialise: ``"never"`` (the journal must
    exist), ``"if_missing"`` (create a missing file; refuse an existing empty one), or
    ``"if_missing_or_empty"`` (also initialise an existing empty file, as ``taskfarm serve
    --init`` does); ``max_group_events`` caps one commit; ``max_pending`` caps queued appends
    (backpressure).

    A read-write open verifies the checksums of the last events and refuses a journal whose
    tail is damaged; a WAL file SQLite will ignore is reported (``journal_wal_discarded``).

    Raises:
        JournalFileError: the file is missing (read-only, or ``create="never"``), empty, not
            SQLite, truncated, not a taskfarm journal, has a newer schema, or cannot be
            opened; the file is left untouched.
        EventChecksumError: (read-write) an event near the end of the journal is damaged.
        ConfigurationError: an option is invalid.
    """
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigurationError(
            f"must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}", where="synchronous"
        )
    if create not in ("never", "if_missing", "if_missing_or_empty"):
        raise ConfigurationError(
            f"must be never, if_missing or if_missing_or_empty, got {create!r}", where="create"
        )
    if busy_timeout < 0:
        raise ConfigurationError("must be >= 0", where="busy_timeout")
    if max_group_events < 1 or max_pending < 1:
        raise ConfigurationError("must be >= 1", where="max_group_events/max_pending")
    journal = await _open(
        Path(path),
        clock=clock,
        codec=codec,
        synchronous=synchronous,
        busy_timeout=busy_timeout,
        read_only=read_only,
        create=create,
        max_group_events=max_group_events,
        max_pending=max_pending,
    )
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as task_group:
            if not read_only:
                await task_group.start(journal._run_writer)
            try:
                yield journal
            except BaseException as error:
                # Re-raised below, outside the task group, so it is not wrapped in a group.
                body_error = error
            finally:
                await journal.aclose()
        if body_error is not None:
            raise body_error
    finally:
        with anyio.move_on_after(30, shield=True):
            await journal._close_connections()
