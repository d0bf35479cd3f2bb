"""Measured usage, rolled up: bounded per-minute and per-hour series in their own SQLite file.

Agents sample what their attempts and hosts use every few seconds; a farm of 200 nodes would
add millions of samples a day.  They do not go into the event journal, for three reasons:

- **The journal is append-only and replayed.**  Every event is kept forever and read back at
  every cold start; samples would dominate both (a day of 200 agents every 10 s is 1.7 million
  samples) while no state the engine rebuilds depends on them.  Retention means deleting, and
  the journal never deletes.
- **They are lossy by design.**  Raw samples are folded into per-minute rows, minutes into
  per-hour rows, and old rows are dropped: a derived, bounded view, not a fact to replay.  What
  an attempt used in total *is* a fact and is journaled, on its end event (``cpu_s``,
  ``peak_rss``, ``runtime_s`` of ``TaskCompleted`` and ``TaskFailed``).
- **One writer per file.**  The journal's writer commits in groups on its own connection; a
  second writer in the same file would contend with it for SQLite's write lock, and a
  retention ``DELETE`` would churn the journal's pages.  A file of its own (next to the journal:
  ``taskfarm.db`` -> ``taskfarm.usage.db``) keeps the journal's tools, checks and backups as
  they were.

So the store is a plain SQLite file (WAL, ``synchronous=NORMAL``: a power loss may cost the last
minute or so of a derived view, never the journal's truth) with two tables of the same shape,
``usage_minute`` and ``usage_hour``, keyed by (bucket start, node, job): the job is ``""`` for a
node's host row (load, memory available, free scratch), and a row per job that ran there holds
that job's CPU seconds, resident memory and I/O on that node in the bucket.  Writing merges
into an existing row (a minute flushed at shutdown and again after a restart adds up).  Complete
hours are rolled up from their minutes once (the last hour rolled is recorded in the file), and
:meth:`UsageStore.prune` drops minutes and hours older than their retention, so the file stops
growing once it holds a retention's worth: deleted pages are reused.

All SQLite work runs in one worker thread at a time (``anyio.to_thread`` with a limiter of one).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal

import anyio

from ._errors import JournalFileError

__all__ = ["UsageRow", "UsageStore", "open_usage_store"]

Resolution = Literal["minute", "hour"]
_TABLES: dict[Resolution, str] = {"minute": "usage_minute", "hour": "usage_hour"}
_SECONDS: dict[Resolution, int] = {"minute": 60, "hour": 3600}
_COLUMNS = (
    "bucket, node, job, samples, cpu_s, rss_max, read_bytes, write_bytes, load_max, "
    "memory_available_min, scratch_free_min, attempts_max"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    bucket INTEGER NOT NULL,             -- the bucket's start, seconds since the epoch (UTC)
    node TEXT NOT NULL,
    job TEXT NOT NULL,                   -- '' for the node's host row
    samples INTEGER NOT NULL,
    cpu_s REAL NOT NULL,                 -- CPU seconds used in the bucket
    rss_max INTEGER NOT NULL,            -- the largest resident memory sampled (bytes)
    read_bytes INTEGER NOT NULL,         -- storage bytes read in the bucket
    write_bytes INTEGER NOT NULL,
    load_max REAL NOT NULL,              -- host rows: the highest 1-minute load average
    memory_available_min INTEGER NOT NULL,  -- host rows: the least memory available
    scratch_free_min INTEGER NOT NULL,   -- host rows: the least free scratch space
    attempts_max INTEGER NOT NULL,       -- the most attempts running at one sample
    PRIMARY KEY (bucket, node, job)
) WITHOUT ROWID
"""
# Merging a row into an existing one: sums add up, extremes stay extreme.  A host row's minima
# ignore zeros (a job row has none to give).
_MERGE = """
ON CONFLICT (bucket, node, job) DO UPDATE SET
    samples = samples + excluded.samples,
    cpu_s = cpu_s + excluded.cpu_s,
    rss_max = max(rss_max, excluded.rss_max),
    read_bytes = read_bytes + excluded.read_bytes,
    write_bytes = write_bytes + excluded.write_bytes,
    load_max = max(load_max, excluded.load_max),
    memory_available_min = CASE WHEN memory_available_min = 0 THEN excluded.memory_available_min
        WHEN excluded.memory_available_min = 0 THEN memory_available_min
        ELSE min(memory_available_min, excluded.memory_available_min) END,
    scratch_free_min = CASE WHEN scratch_free_min = 0 THEN excluded.scratch_free_min
        WHEN excluded.scratch_free_min = 0 THEN scratch_free_min
        ELSE min(scratch_free_min, excluded.scratch_free_min) END,
    attempts_max = max(attempts_max, excluded.attempts_max)
"""
_ROLL_UP = f"""
INSERT INTO usage_hour ({_COLUMNS})
SELECT (bucket / 3600) * 3600, node, job, sum(samples), sum(cpu_s), max(rss_max),
       sum(read_bytes), sum(write_bytes), max(load_max),
       coalesce(min(nullif(memory_available_min, 0)), 0),
       coalesce(min(nullif(scratch_free_min, 0)), 0), max(attempts_max)
FROM usage_minute WHERE bucket >= ? AND bucket < ?
GROUP BY bucket / 3600, node, job
{_MERGE}
"""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One bucket of one node (``job`` ``""``: the host) or of one job on one node."""

    bucket: int
    node: str
    job: str
    samples: int = 0
    cpu_s: float = 0.0
    rss_max: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    load_max: float = 0.0
    memory_available_min: int = 0
    scratch_free_min: int = 0
    attempts_max: int = 0


class UsageStore:
    """The per-minute and per-hour usage series of a coordinator (see the module docstring).

    Built by :func:`open_usage_store`; every method runs its SQL in the store's one thread.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        self._limiter = anyio.CapacityLimiter(1)

    async def _run(self, function: object, *args: object) -> object:
        def call() -> object:
            try:
                return function(*args)  # type: ignore[operator]
            except sqlite3.Error as error:
                raise JournalFileError(path=self.path, problem=str(error)) from error

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def add_minutes(self, rows: Iterable[UsageRow]) -> None:
        """Merge per-minute rows into the store.

        Raises:
            JournalFileError: SQLite failed (the file is named).
        """
        values = [astuple(row) for row in rows]
        if values:
            await self._run(self._add, values)

    def _add(self, values: list[tuple[object, ...]]) -> None:
        with self._db:
            self._db.executemany(
                f"INSERT INTO usage_minute ({_COLUMNS}) VALUES ({', '.join('?' * 12)}) {_MERGE}",
                values,
            )

    async def roll_up(self, before: int) -> int:
        """Roll every complete hour that starts before ``before`` (seconds since the epoch)
        and was not rolled up yet into per-hour rows; return how many hours were rolled.

        Raises:
            JournalFileError: SQLite failed.
        """
        result = await self._run(self._roll_up, before - before % 3600)
        assert isinstance(result, int)
        return result

    def _roll_up(self, end: int) -> int:
        with self._db:
            row = self._db.execute("SELECT value FROM usage_meta WHERE key = 'rolled'").fetchone()
            start: int | None = int(row[0]) if row is not None else None
            if start is None:
                first = self._db.execute("SELECT min(bucket) FROM usage_minute").fetchone()[0]
                if first is None:
                    return 0
                start = int(first) - int(first) % 3600
            if start >= end:
                return 0
            self._db.execute(_ROLL_UP, (start, end))
            self._db.execute(
                "INSERT INTO usage_meta (key, value) VALUES ('rolled', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (end,),
            )
            return (end - start) // 3600

    async def prune(self, *, minutes_before: int, hours_before: int) -> None:
        """Delete minutes that start before ``minutes_before`` and hours before
        ``hours_before`` (seconds since the epoch).

        Raises:
            JournalFileError: SQLite failed.
        """
        await self._run(self._prune, minutes_before, hours_before)

    def _prune(self, minutes_before: int, hours_before: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM usage_minute WHERE bucket < ?", (minutes_before,))
            self._db.execute("DELETE FROM usage_hour WHERE bucket < ?", (hours_before,))

    async def query(
        self,
        resolution: Resolution,
        *,
        since: int,
        node: str | None = None,
        job: str | None = None,
    ) -> list[UsageRow]:
        """Return the rows of ``resolution`` from ``since`` on, of ``node`` and of ``job``
        when given (a job's rows, or with no job the host rows and every job's), oldest first.

        Raises:
            JournalFileError: SQLite failed.
        """
        sql = f"SELECT {_COLUMNS} FROM {_TABLES[resolution]} WHERE bucket >= ?"
        args: list[object] = [since]
        if node is not None:
            sql += " AND node = ?"
            args.append(node)
        if job is not None:
            sql += " AND job = ?"
            args.append(job)
        rows = await self._run(lambda: self._db.execute(sql + " ORDER BY bucket", args).fetchall())
        assert isinstance(rows, list)
        return [UsageRow(*row) for row in rows]

    async def size(self) -> int:
        """Return the bytes the store's pages take (the file, without its WAL).

        Raises:
            JournalFileError: SQLite failed.
        """
        result = await self._run(
            lambda: (
                self._db.execute("PRAGMA page_count").fetchone()[0]
                * self._db.execute("PRAGMA page_size").fetchone()[0]
            )
        )
        assert isinstance(result, int)
        return result

    async def rows(self, resolution: Resolution) -> int:
        """Return how many rows the ``resolution`` table holds.

        Raises:
            JournalFileError: SQLite failed.
        """
        sql = f"SELECT count(*) FROM {_TABLES[resolution]}"
        result = await self._run(lambda: self._db.execute(sql).fetchone()[0])
        assert isinstance(result, int)
        return result


def _open(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    try:
        connection.execute("PRAGMA busy_timeout = 5000")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        with connection:
            for table in _TABLES.values():
                connection.execute(_SCHEMA.format(table=table))
            connection.execute(
                "CREATE TABLE IF NOT EXISTS usage_meta (key TEXT PRIMARY KEY, value INTEGER)"
            )
    except BaseException:
        connection.close()
        raise
    return connection


@asynccontextmanager
async def open_usage_store(path: str | Path) -> AsyncIterator[UsageStore]:
    """Open (creating if missing) the usage store at ``path``; close it on exit.

    Raises:
        JournalFileError: the file cannot be opened or is not a usage store.
    """
    where = Path(path)
    try:
        connection = await anyio.to_thread.run_sync(_open, where)
    except sqlite3.Error as error:
        raise JournalFileError(
            path=where, problem=f"cannot open the usage store: {error}"
        ) from None
    try:
        yield UsageStore(connection, where)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(connection.close)
