"""Checking a journal file and salvaging what is good in a damaged one.

Both read the file read-only (nothing is created beside it) with plain ``sqlite3`` in a worker
thread, and need no codec: they verify rows, not events, so a journal full of event types this
installation does not know checks and salvages the same.

- :func:`check_sqlite_journal` runs SQLite's ``PRAGMA integrity_check`` (the b-trees) and then
  reads every event in position order, verifying that positions have no gaps, that each stream's
  versions follow one another, and every row's checksum; it stops at the first bad event.  It
  also verifies each snapshot's checksum.
- :func:`salvage_sqlite_journal` copies the events before the first bad one (and the snapshots
  that are sound and within them) into a new journal, built under a temporary name and linked
  into place only when it is complete.  Everything at or after the first bad position is left
  out: an event after a damaged one may depend on it, and a stream's versions must not have
  holes.

A file that is not a journal at all (missing, empty, not SQLite, another application's
database, a schema this code does not know) raises ``JournalFileError``; damage in a file whose
header says it is a taskfarm journal is *reported* (``JournalCheck.ok`` is False).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec

from ._errors import JournalFileError
from ._sqlite_file import (
    APPLICATION_ID,
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    SNAPSHOT_COLUMNS,
    FileState,
    build_journal_file,
    connect_read_only,
    empty_file_error,
    event_checksum,
    inspect_file,
    probe,
    snapshot_checksum,
    wal_path,
)

__all__ = [
    "BadEvent",
    "JournalCheck",
    "SalvageReport",
    "check_sqlite_journal",
    "salvage_sqlite_journal",
]

_CHUNK = 10_000
_INTEGRITY_MESSAGES = 20  # PRAGMA integrity_check(N): enough to see what is wrong
_LISTED_SNAPSHOTS = 20


class BadEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The first event that cannot be trusted: its position, its stream as stored (None when
    the row could not be read), and why."""

    position: int
    stream_id: str | None
    reason: str


class JournalCheck(msgspec.Struct, frozen=True, kw_only=True):
    """What ``taskfarm journal check`` found.

    ``good_events`` events (positions 1 to ``last_good_position``) were read and verified
    before ``first_bad`` (None: all of them); ``integrity`` holds SQLite's integrity-check
    messages (``["ok"]`` when the b-trees are sound); ``bad_snapshots`` names snapshots that
    fail their checksums as ``stream@version``; ``problem`` is set when the file could not be
    read as a database at all.
    """

    path: str
    schema_version: int
    good_events: int
    last_good_position: int
    stored_events: int | None
    first_bad: BadEvent | None
    integrity: list[str]
    snapshots: int
    bad_snapshots: list[str]
    problem: str | None

    @property
    def ok(self) -> bool:
        """Return whether nothing is wrong."""
        return (
            self.problem is None
            and self.first_bad is None
            and self.integrity == ["ok"]
            and not self.bad_snapshots
        )


class SalvageReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``taskfarm journal salvage`` copied: events 1 to ``last_good_position`` and the
    sound snapshots within them; ``first_bad`` is where it stopped (None: it copied all)."""

    source: str
    out: str
    events: int
    last_good_position: int
    snapshots: int
    first_bad: BadEvent | None
    stored_events: int | None


def _header_application_id(path: Path) -> int | None:
    try:
        with path.open("rb") as file:
            header = file.read(72)
    except OSError:
        return None
    return int.from_bytes(header[68:72], "big") if len(header) == 72 else None


def _open_source(path: Path) -> tuple[FileState, str | None]:
    """Find the file and whether it is a taskfarm journal; return its state and, for a damaged
    one, what the strict checks say is wrong with it.

    Raises:
        JournalFileError: it is missing, empty, or not a taskfarm journal.
    """
    ours = _header_application_id(path) == APPLICATION_ID
    try:
        return inspect_file(path), None
    except JournalFileError as error:
        if not ours:
            raise
        problem = error.problem
    return inspect_file(path, strict=False), problem


def _schema_version(conn: sqlite3.Connection, path: Path, state: FileState) -> int:
    """Return the schema version of a journal this code can verify.

    Raises:
        JournalFileError: it is another application's database, or its schema is not this
            code's (newer: upgrade; older: it has no checksums until migrated).
        sqlite3.Error: SQLite cannot read it.
    """
    user_version, application_id = conn.execute(
        "SELECT (SELECT user_version FROM pragma_user_version),"
        " (SELECT application_id FROM pragma_application_id)"
    ).fetchone()
    if application_id != APPLICATION_ID or user_version != SCHEMA_VERSION:
        # The same words as when the journal is opened read-only.
        probe(path, state, read_only=True, create="never")
    return int(user_version)


class _Scan:
    """Reads events in position order and stops at the first that cannot be trusted."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.good = 0
        self.first_bad: BadEvent | None = None
        self._versions: dict[str, int] = {}

    def chunks(self) -> Iterator[list[tuple[Any, ...]]]:
        """Yield the verified rows (``EVENT_COLUMNS`` + checksum) in chunks."""
        versions = self._versions
        after = 0
        good: list[tuple[Any, ...]] = []
        # One cursor, row by row: when SQLite hits a damaged page, every row read before it
        # is kept (a failing fetchmany would lose its whole chunk).
        try:
            cursor = self.conn.execute(
                f"SELECT {EVENT_COLUMNS}, checksum FROM events ORDER BY position"
            )
            for row in cursor:
                position, stream_id, version = row[0], row[1], row[2]
                reason: str | None = None
                if position != after + 1:
                    self.first_bad = BadEvent(
                        position=after + 1,
                        stream_id=None,
                        reason=f"missing (the next stored event is at position {position})",
                    )
                    break
                if row[8] is None:
                    reason = "it has no checksum"
                elif event_checksum(*row[:8]) != row[8]:
                    reason = "its checksum does not match"
                elif version != versions.get(stream_id, 0) + 1:
                    reason = (
                        f"version {version} follows version {versions.get(stream_id, 0)} "
                        "of its stream"
                    )
                if reason is not None:
                    self.first_bad = BadEvent(position=position, stream_id=stream_id, reason=reason)
                    break
                versions[stream_id] = version
                good.append(row)
                after = position
                if len(good) == _CHUNK:
                    self.good += len(good)
                    yield good
                    good = []
        except sqlite3.Error as error:
            self.first_bad = BadEvent(
                position=after + 1, stream_id=None, reason=f"unreadable ({error})"
            )
        self.good += len(good)
        if good:
            yield good

    def stored_events(self) -> int | None:
        """Return how many event rows the file holds (None if SQLite cannot count them)."""
        try:
            return int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])
        except sqlite3.Error:
            return None

    def snapshots(self, *, max_position: int) -> tuple[list[tuple[Any, ...]], list[str]]:
        """Return the sound snapshot rows within ``max_position`` and every damaged one's
        name."""
        sound: list[tuple[Any, ...]] = []
        damaged: list[str] = []
        try:
            rows = self.conn.execute(
                f"SELECT {SNAPSHOT_COLUMNS}, checksum FROM snapshots ORDER BY stream_id, version"
            ).fetchall()
        except sqlite3.Error as error:
            return [], [f"unreadable ({error})"]
        for row in rows:
            if row[6] is None or snapshot_checksum(*row[:6]) != row[6]:
                damaged.append(f"{row[0]}@{row[1]}")
            elif row[3] <= max_position and row[1] <= self._versions.get(row[0], 0):
                sound.append(row)
        return sound, damaged


def _check(path: Path) -> JournalCheck:
    state, problem = _open_source(path)
    if not state.exists:
        raise JournalFileError(path=path, problem="no such journal file")
    if state.empty:
        raise empty_file_error(path, read_only=True)

    def damaged(reason: str, schema_version: int = 0) -> JournalCheck:
        if problem is not None:
            reason = f"{problem} ({reason})"
        return JournalCheck(
            path=str(path),
            schema_version=schema_version,
            good_events=0,
            last_good_position=0,
            stored_events=None,
            first_bad=None,
            integrity=[],
            snapshots=0,
            bad_snapshots=[],
            problem=reason,
        )

    try:
        conn = connect_read_only(path, state, busy_timeout=5.0)
    except sqlite3.Error as error:
        return damaged(f"SQLite cannot open it: {error}")
    with contextlib.closing(conn):
        try:
            schema_version = _schema_version(conn, path, state)
        except sqlite3.Error as error:
            return damaged(f"SQLite cannot read it: {error}")
        try:
            integrity = [
                str(row[0])
                for row in conn.execute(f"PRAGMA integrity_check({_INTEGRITY_MESSAGES})")
            ]
        except sqlite3.Error as error:
            integrity = [f"integrity_check failed: {error}"]
        scan = _Scan(conn)
        for _chunk in scan.chunks():
            pass
        sound, bad_snapshots = scan.snapshots(max_position=scan.good)
        snapshot_count = len(sound) + len(bad_snapshots)
        return JournalCheck(
            path=str(path),
            schema_version=schema_version,
            good_events=scan.good,
            last_good_position=scan.good,
            stored_events=scan.stored_events(),
            first_bad=scan.first_bad,
            integrity=integrity,
            snapshots=snapshot_count,
            bad_snapshots=bad_snapshots[:_LISTED_SNAPSHOTS],
            problem=problem,
        )


async def check_sqlite_journal(path: str | Path) -> JournalCheck:
    """Verify a journal file read-only: SQLite's integrity check, then every event's position,
    version and checksum up to the first bad one, and every snapshot's checksum.

    Raises:
        JournalFileError: the file is missing, empty, or not a taskfarm journal of this
            schema version (damage in a journal is reported, not raised).
    """
    return await anyio.to_thread.run_sync(_check, Path(path))


@contextlib.contextmanager
def _readable(
    source: Path, state: FileState, problem: str | None, scratch: Path
) -> Iterator[tuple[Path, FileState]]:
    """Yield a path SQLite can read ``source`` through: itself, or for a truncated file a copy
    in ``scratch`` whose header claims only the pages the file still has (SQLite refuses a
    file shorter than its header says; with the header mended it reads every intact page)."""
    if problem is None:
        yield source, state
        return
    copy = scratch / f".{source.name}.{secrets.token_hex(6)}.salvaging"
    try:
        shutil.copyfile(source, copy)
        with copy.open("r+b") as file:
            header = bytearray(file.read(100))
            page_size = int.from_bytes(header[16:18], "big")
            page_size = 65536 if page_size == 1 else page_size
            pages = copy.stat().st_size // page_size
            file.truncate(pages * page_size)
            header[28:32] = pages.to_bytes(4, "big")
            header[92:96] = header[24:28]  # the page count above is valid for this version
            file.seek(0)
            file.write(header)
        yield copy, inspect_file(copy, strict=False)
    finally:
        for leftover in (copy, wal_path(copy), copy.with_name(copy.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _salvage(source: Path, out: Path) -> SalvageReport:
    if out.exists() or wal_path(out).exists():
        raise JournalFileError(
            path=out, problem="already exists (salvage writes a new journal: choose a new name)"
        )
    if not out.parent.is_dir():
        raise JournalFileError(path=out, problem=f"folder {out.parent} does not exist")
    if out.absolute() == source.absolute():
        raise JournalFileError(path=out, problem="is the journal being salvaged")
    found, problem = _open_source(source)
    if not found.exists:
        raise JournalFileError(path=source, problem="no such journal file")
    if found.empty:
        raise empty_file_error(source, read_only=True)
    try:
        with (
            _readable(source, found, problem, out.parent) as (readable, state),
            contextlib.closing(connect_read_only(readable, state, busy_timeout=5.0)) as conn,
        ):
            _schema_version(conn, source, state)
            scan = _Scan(conn)
            copied: dict[str, int] = {"snapshots": 0}

            def fill(target: sqlite3.Connection) -> None:
                for chunk in scan.chunks():
                    target.executemany(
                        f"INSERT INTO events ({EVENT_COLUMNS}, checksum)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        chunk,
                    )
                sound, _damaged = scan.snapshots(max_position=scan.good)
                target.executemany(
                    f"INSERT INTO snapshots ({SNAPSHOT_COLUMNS}, checksum)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    sound,
                )
                copied["snapshots"] = len(sound)

            if not build_journal_file(out, fill):
                raise JournalFileError(path=out, problem="appeared while salvaging (not replaced)")
            return SalvageReport(
                source=str(source),
                out=str(out),
                events=scan.good,
                last_good_position=scan.good,
                snapshots=copied["snapshots"],
                first_bad=scan.first_bad,
                stored_events=scan.stored_events(),
            )
    except sqlite3.Error as error:
        raise JournalFileError(
            path=source, problem=f"SQLite cannot read it at all, nothing to salvage: {error}"
        ) from error
    except OSError as error:
        raise JournalFileError(
            path=out, problem=f"cannot salvage into it: {error.strerror or error}"
        ) from error


async def salvage_sqlite_journal(path: str | Path, *, out: str | Path) -> SalvageReport:
    """Copy the events of the journal at ``path`` up to its last good position (and its sound
    snapshots within them) into a new journal at ``out``.

    Raises:
        JournalFileError: ``out`` exists or its folder does not; ``path`` is missing, empty,
            not a taskfarm journal of this schema version, or unreadable from the start.
    """
    return await anyio.to_thread.run_sync(_salvage, Path(path), Path(out))
