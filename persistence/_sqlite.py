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
- **Bad files are refused untouched.**  Before SQLite writes anything the header is checked
  (magic, page size, page count x page size against the file size), then a read-only
  connection checks the application id and ``PRAGMA user_version``; a file that is not
  SQLite, is truncated, is another application's database or has a newer schema raises
  ``JournalFileError`` naming the file and the problem.  Schema migrations are steps keyed on
  ``PRAGMA user_version``, applied in one transaction.
"""

from __future__ import annotations

import bisect
import os
import sqlite3
import time
import urllib.request
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
from ._journal import DEFAULT_BATCH_SIZE, AppendResult, RecordedEvent, S, StreamInfo

__all__ = [
    "SCHEMA_VERSION",
    "JournalDescription",
    "JournalStatistics",
    "SQLiteJournal",
    "open_sqlite_journal",
]

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

# "tfj1" - marks a file as a taskfarm journal (PRAGMA application_id).
APPLICATION_ID = 0x74666A31

# Each step moves the schema from version i to i + 1; PRAGMA user_version records where a file
# is.  Never edit a released step: append a new one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE events (
            position INTEGER PRIMARY KEY,
            stream_id TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            tag TEXT NOT NULL,
            schema_version INTEGER NOT NULL,
            timestamp TEXT NOT NULL,
            correlation_id TEXT,
            payload TEXT NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX events_stream_version ON events (stream_id, version)",
        """
        CREATE TABLE snapshots (
            stream_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            schema_version INTEGER NOT NULL,
            position INTEGER NOT NULL,
            timestamp TEXT NOT NULL,
            state TEXT NOT NULL,
            PRIMARY KEY (stream_id, version)
        ) WITHOUT ROWID
        """,
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_SQLITE_MAGIC = b"SQLite format 3\x00"
_COLUMNS = "position, stream_id, version, tag, schema_version, timestamp, correlation_id, payload"
_INSERT_EVENT = f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_SNAPSHOT = """
    INSERT OR REPLACE INTO snapshots
        (stream_id, version, schema_version, position, timestamp, state)
    SELECT stream_id, version, ?, position, ?, ? FROM events WHERE stream_id = ? AND version = ?
"""
_READ_ALL = (
    f"SELECT {_COLUMNS} FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT ?"
)
_READ_STREAM = f"SELECT {_COLUMNS} FROM events WHERE stream_id = ? AND version > ? ORDER BY version"
_READ_STREAM_CHUNK = _READ_STREAM + " LIMIT ?"
_MAX_POSITION = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VERSION_LOOKUP_CHUNK = 500

# SQLite result codes that mean the file itself is the problem.
_FILE_ERRORS = frozenset(
    {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_FULL"}
)


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


class _Request:
    __slots__ = ("batch", "error", "settled", "stream_id")

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.batch: _Batch  # assigned when handed over
        self.error: JournalError | None = None
        self.settled = False


class _AppendRequest(_Request):
    __slots__ = ("correlation_id", "encoded", "expected_version", "result")

    def __init__(
        self,
        stream_id: str,
        encoded: list[tuple[str, int, str]],
        expected_version: int | None,
        correlation_id: str | None,
    ) -> None:
        super().__init__(stream_id)
        self.encoded = encoded
        self.expected_version = expected_version
        self.correlation_id = correlation_id
        self.result: AppendResult | None = None


class _SnapshotRequest(_Request):
    __slots__ = ("schema_version", "state", "version")

    def __init__(self, stream_id: str, version: int, schema_version: int, state: str) -> None:
        super().__init__(stream_id)
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
    if name in _FILE_ERRORS or type(error) is sqlite3.DatabaseError:
        return JournalFileError(path=path, problem=f"{action} failed: {error}")
    return JournalError(f"{path}: {action} failed: {error}")


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
            unknown = {r.stream_id for r in group if r.stream_id not in versions}
            if unknown:
                self._load_versions(unknown)
            pending: dict[str, int] = {}
            rows: list[tuple[Any, ...]] = []
            snapshot_rows: list[tuple[Any, ...]] = []
            position = self.last_position
            conflicts = 0
            for request in group:
                stream_id = request.stream_id
                current = pending.get(stream_id)
                if current is None:
                    current = versions[stream_id]
                if isinstance(request, _AppendRequest):
                    expected = request.expected_version
                    if expected is not None and expected != current:
                        request.error = VersionConflictError(
                            stream_id=stream_id, expected=expected, actual=current
                        )
                        conflicts += 1
                        continue
                    first = position + 1
                    correlation_id = request.correlation_id
                    for tag, schema_version, payload in request.encoded:
                        position += 1
                        current += 1
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
                            )
                        )
                    pending[stream_id] = current
                    request.result = AppendResult(
                        stream_id=stream_id,
                        first_position=first,
                        last_position=position,
                        version=current,
                        timestamp=timestamp,
                    )
                elif isinstance(request, _SnapshotRequest):
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
        wal = self.path.with_name(self.path.name + "-wal")
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
            size += len(request.encoded) if isinstance(request, _AppendRequest) else 1
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
        fast = self.codec.fast_decoders()
        decode = self.codec.decode
        fromisoformat = datetime.fromisoformat
        records: list[RecordedEvent] = []
        append = records.append
        last_stamp = ""
        timestamp = _EPOCH
        for (
            position,
            stream_id,
            version,
            tag,
            schema_version,
            stamp,
            correlation_id,
            payload,
        ) in rows:
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
            "SELECT version, state FROM snapshots"
            " WHERE stream_id = ? AND schema_version = ? AND version <= ? AND position <= ?"
            " ORDER BY version DESC",
            (
                stream_id,
                schema_version,
                _MAX_POSITION if max_version is None else max_version,
                _MAX_POSITION if max_position is None else max_position,
            ),
        )
        for version, data in rows:
            try:
                return version, self.codec.decode_state(data, state_type)
            except JournalError as error:
                log().warning(
                    "snapshot_ignored", stream_id=stream_id, version=version, reason=str(error)
                )
        return None

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit what was handed over, stop the writer and close the connections."""
        self._closed = True
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


def _check_header(path: Path) -> bool:
    """Check the file before SQLite touches it; return whether it holds a database already.

    Raises:
        JournalFileError: it is not a regular file, not SQLite, or truncated.
    """
    try:
        status = path.stat()
    except FileNotFoundError:
        return False
    except OSError as error:
        raise JournalFileError(path=path, problem=f"cannot stat it: {error}") from error
    if not path.is_file():
        raise JournalFileError(path=path, problem="not a regular file")
    size = status.st_size
    if size == 0:
        return False
    try:
        with path.open("rb") as file:
            header = file.read(100)
    except OSError as error:
        raise JournalFileError(path=path, problem=f"cannot read it: {error}") from error
    if not header.startswith(_SQLITE_MAGIC[: len(header)]) or len(header) < len(_SQLITE_MAGIC):
        raise JournalFileError(path=path, problem="not an SQLite database (bad header)")
    if len(header) < 100:
        raise JournalFileError(
            path=path, problem=f"truncated: {size} bytes, shorter than SQLite's 100-byte header"
        )
    page_size = int.from_bytes(header[16:18], "big")
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        raise JournalFileError(path=path, problem=f"not an SQLite database (page size {page_size})")
    wal = path.with_name(path.name + "-wal")
    try:
        wal_size = wal.stat().st_size
    except FileNotFoundError:
        wal_size = 0
    # With a non-empty WAL the main file may legitimately lag (a checkpoint was interrupted);
    # SQLite recovers it, so only a file standing on its own is measured against its header.
    if wal_size == 0:
        page_count = int.from_bytes(header[28:32], "big")
        header_valid = page_count > 0 and header[24:28] == header[92:96]
        if header_valid and page_count * page_size > size:
            raise JournalFileError(
                path=path,
                problem=f"truncated: the header records {page_count} pages of {page_size} "
                f"bytes ({page_count * page_size} bytes) but the file has {size} bytes",
            )
        if size % page_size:
            raise JournalFileError(
                path=path,
                problem=f"truncated: {size} bytes is not a whole number of {page_size}-byte pages",
            )
    return True


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.request.pathname2url(str(path))}?mode={mode}"


async def _probe(path: Path, *, read_only: bool) -> int:
    """Check an existing file read-only; return its schema version (0: an empty database).

    Raises:
        JournalFileError: SQLite cannot read it, it belongs to another application, or its
            schema is newer than this code (or, read-only, older).
    """
    try:
        async with aiosqlite.connect(_uri(path, "ro"), uri=True) as conn:
            rows = await conn.execute_fetchall(
                "SELECT (SELECT user_version FROM pragma_user_version),"
                " (SELECT application_id FROM pragma_application_id),"
                " (SELECT count(*) FROM sqlite_master)"
            )
    except sqlite3.Error as error:
        raise JournalFileError(path=path, problem=f"SQLite cannot read it: {error}") from error
    user_version, application_id, objects = next(iter(rows))
    if application_id != APPLICATION_ID:
        if application_id == 0 and user_version == 0 and objects == 0:
            if read_only:
                raise JournalFileError(path=path, problem="an empty database, not a journal")
            return 0
        raise JournalFileError(
            path=path,
            problem=f"not a taskfarm journal (application_id {application_id:#x}, "
            f"{objects} schema objects)",
        )
    if user_version > SCHEMA_VERSION:
        raise JournalFileError(
            path=path,
            problem=f"schema version {user_version} is newer than this taskfarm supports "
            f"({SCHEMA_VERSION}); upgrade taskfarm to open it",
        )
    if read_only and user_version != SCHEMA_VERSION:
        raise JournalFileError(
            path=path,
            problem=f"schema version {user_version} needs migrating to {SCHEMA_VERSION}; "
            "open it read-write once",
        )
    return int(user_version)


def _migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction (runs in a thread); return
    the version the file was at.

    Raises:
        JournalFileError: another process changed the file into something else meanwhile.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version, application_id = conn.execute(
            "SELECT (SELECT user_version FROM pragma_user_version),"
            " (SELECT application_id FROM pragma_application_id)"
        ).fetchone()
        if application_id not in (0, APPLICATION_ID) or version > SCHEMA_VERSION:
            raise JournalFileError(path=path, problem="changed by another process while opening")
        for number in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[number]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(version)


def _open_writer(path: Path, synchronous: Synchronous, busy_timeout: float) -> _Writer:
    """Open the write connection, switch to WAL, migrate and load the caches (in a thread).

    Raises:
        JournalFileError: WAL mode is unavailable, or SQLite cannot use the file.
    """
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    # check_same_thread=False: anyio.to_thread may run each commit on a different worker; the
    # writer task runs one at a time.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalFileError(path=path, problem=f"cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        migrated_from = _migrate(conn, path)
        writer = _Writer(conn, path)
        writer.migrated_from = migrated_from if migrated_from != SCHEMA_VERSION else None
        writer.reload()
    except BaseException as error:
        conn.close()
        if isinstance(error, sqlite3.Error):
            raise _translate(error, path, "open") from error
        raise
    return writer


async def _open_reader(path: Path, *, read_only: bool, busy_timeout: float) -> aiosqlite.Connection:
    # A read-only open of a read-only journal must not create or change anything.
    if read_only:
        conn = await aiosqlite.connect(_uri(path, "ro"), uri=True, isolation_level=None)
    else:
        conn = await aiosqlite.connect(str(path), isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        await conn.execute("PRAGMA query_only = ON")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await conn.close()
        raise
    return conn


async def _open(
    path: Path,
    *,
    clock: Clock,
    codec: EventCodec,
    synchronous: Synchronous,
    busy_timeout: float,
    read_only: bool,
    max_group_events: int,
    max_pending: int,
) -> SQLiteJournal:
    started = time.perf_counter()
    if not path.parent.is_dir():
        raise JournalFileError(path=path, problem=f"folder {path.parent} does not exist")
    exists = await anyio.to_thread.run_sync(_check_header, path)
    if exists:
        await _probe(path, read_only=read_only)
    elif read_only:
        raise JournalFileError(path=path, problem="no such journal file")
    writer: _Writer | None = None
    reader: aiosqlite.Connection | None = None
    try:
        if not read_only:
            writer = await anyio.to_thread.run_sync(_open_writer, path, synchronous, busy_timeout)
        reader = await _open_reader(path, read_only=read_only, busy_timeout=busy_timeout)
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
    max_group_events: int = 10_000,
    max_pending: int = 100_000,
) -> AsyncIterator[SQLiteJournal]:
    """Open (creating or migrating) the journal at ``path`` and run its writer until exit.

    ``synchronous`` is SQLite's durability level (``FULL``: every commit is fsync'd);
    ``busy_timeout`` (seconds) is how long to wait for another process's lock;
    ``read_only`` opens an existing journal for reading only (no writer, no migration);
    ``max_group_events`` caps one commit; ``max_pending`` caps queued appends (backpressure).

    Raises:
        JournalFileError: the file is not SQLite, is truncated, is not a taskfarm journal, has
            a newer schema, or cannot be opened; the file is left untouched.
        ConfigurationError: an option is invalid.
    """
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigurationError(
            f"must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}", where="synchronous"
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
