"""The journal file itself: schema and migrations, per-row checksums, and the checks that run
before SQLite is allowed to touch a file.

Everything here is synchronous ``sqlite3`` and file I/O, run in a worker thread by the callers.

- **Checksums.**  Every event row carries a CRC-32 of all its stored fields (position, stream
  id, version, tag, schema version, timestamp, correlation id, payload); every snapshot row one
  of its own.  SQLite's page checksums do not exist (its integrity check validates the b-trees,
  not the values in them), so a flipped byte inside a row would otherwise be read back as a
  different fact.  CRC-32 (zlib, in C) detects every single-byte and every burst error of up to
  32 bits and costs well under a microsecond per row; it guards against damage, not against a
  forger who can also rewrite the checksum.
- **Migrations** are steps keyed on ``PRAGMA user_version``, applied in one transaction.  A step
  may call the SQL functions :func:`register_functions` installs (step 2 fills in the checksums
  of rows written before checksums existed).
- **New files appear whole.**  A missing journal is created under a temporary name beside it,
  initialised (WAL, schema), closed and only then linked into place, so a crash while creating
  never leaves an empty or half-initialised file at the journal's path.  An empty file found
  there was made by something else and is refused unless the caller asks to initialise it.
- **Read-only opens write nothing.**  SQLite opens a WAL-mode file read-only by creating
  ``-wal`` and ``-shm`` beside it (and fails in a read-only folder).  When no process has the
  journal open (neither file exists) and there is no WAL content to recover, the file is opened
  ``immutable``: no locks, no side files.  Otherwise SQLite's own read-only mode is used: its
  side files already exist, or (a ``-wal`` with commits but no ``-shm``, as when a journal is
  copied from a crashed host) the ``-shm`` SQLite needs to read that WAL is created.  An
  immutable open sees the file as it was: a writer that opens the journal meanwhile is not
  followed (and if it checkpointed while a long read runs, a torn row would fail its checksum
  rather than be read wrong).
- **A WAL that holds nothing SQLite can use** (bad header, or a first frame that fails its
  checksum) is ignored by SQLite and overwritten by the next write; that is kept, but said
  (``journal_wal_discarded``) instead of happening silently.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import struct
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ._common import log
from ._errors import EventChecksumError, JournalFileError

__all__ = [
    "APPLICATION_ID",
    "EVENT_COLUMNS",
    "FILE_ERRORS",
    "SCHEMA_VERSION",
    "SNAPSHOT_COLUMNS",
    "Create",
    "FileState",
    "WalState",
    "build_journal_file",
    "checksum_error",
    "connect_read_only",
    "create_journal_file",
    "empty_file_error",
    "event_checksum",
    "first_bad_row",
    "inspect_file",
    "inspect_wal",
    "migrate",
    "probe",
    "read_only_uri",
    "register_functions",
    "shm_path",
    "snapshot_checksum",
    "wal_path",
    "warn_discarded_wal",
]

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
    (
        # A row without a checksum (NULL) is treated as damaged when read.
        "ALTER TABLE events ADD COLUMN checksum INTEGER",
        "UPDATE events SET checksum = taskfarm_event_checksum(position, stream_id, version, tag,"
        " schema_version, timestamp, correlation_id, payload)",
        "ALTER TABLE snapshots ADD COLUMN checksum INTEGER",
        "UPDATE snapshots SET checksum = taskfarm_snapshot_checksum(stream_id, version,"
        " schema_version, position, timestamp, state)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_WAL_FORMAT = 3007000
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
# Frames read when looking for the WAL's first commit (a longer first transaction is taken as
# valid without reading all of it: this only decides whether to warn).
_WAL_FRAMES_CHECKED = 64

# SQLite result codes that mean the file itself is the problem.
FILE_ERRORS = frozenset(
    {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_FULL"}
)

Create = Literal["never", "if_missing", "if_missing_or_empty"]

EVENT_COLUMNS = (
    "position, stream_id, version, tag, schema_version, timestamp, correlation_id, payload"
)
SNAPSHOT_COLUMNS = "stream_id, version, schema_version, position, timestamp, state"


# -- checksums ---------------------------------------------------------------------------------


def event_checksum(
    position: int,
    stream_id: str,
    version: int,
    tag: str,
    schema_version: int,
    timestamp: str,
    correlation_id: str | None,
    payload: str,
) -> int:
    """Return the CRC-32 of an event row's stored fields (as SQLite holds them)."""
    # "\x1e" marks a present correlation id, so None and "" differ.
    correlation = "" if correlation_id is None else "\x1e" + correlation_id
    return zlib.crc32(
        f"{position}\x1f{stream_id}\x1f{version}\x1f{tag}\x1f{schema_version}\x1f"
        f"{timestamp}\x1f{correlation}\x1f{payload}".encode()
    )


def snapshot_checksum(
    stream_id: str, version: int, schema_version: int, position: int, timestamp: str, state: str
) -> int:
    """Return the CRC-32 of a snapshot row's stored fields."""
    return zlib.crc32(
        f"{stream_id}\x1f{version}\x1f{schema_version}\x1f{position}\x1f{timestamp}\x1f{state}".encode()
    )


def register_functions(conn: sqlite3.Connection) -> None:
    """Install the checksum functions that migrations and the writer's SQL call."""
    conn.create_function("taskfarm_event_checksum", 8, event_checksum, deterministic=True)
    conn.create_function("taskfarm_snapshot_checksum", 6, snapshot_checksum, deterministic=True)


def first_bad_row(path: Path, rows: Sequence[Sequence[Any]]) -> EventChecksumError | None:
    """Return the error for the first row (``_COLUMNS`` + checksum) whose checksum fails."""
    for row in rows:
        if row[8] is None or event_checksum(*row[:8]) != row[8]:
            return checksum_error(path, row)
    return None


def checksum_error(path: Path, row: Sequence[Any]) -> EventChecksumError:
    """Return the error that names a damaged event row (``_COLUMNS`` + checksum)."""
    return EventChecksumError(
        path=path,
        position=row[0],
        stream_id=row[1],
        reason="it has no checksum" if row[8] is None else "its checksum does not match",
    )


# -- the file before SQLite opens it -----------------------------------------------------------


class WalState(NamedTuple):
    """What the ``-wal`` beside a journal holds, as SQLite would see it."""

    exists: bool
    size: int
    usable: bool  # SQLite would recover committed transactions from it
    problem: str | None  # why a non-empty WAL holds nothing usable


class FileState(NamedTuple):
    """A journal path as found: whether it holds a database, and its side files."""

    exists: bool
    empty: bool  # exists with zero bytes
    application_id: int | None  # from the header, before SQLite reads the file
    wal: WalState
    shm_exists: bool


def wal_path(path: Path) -> Path:
    """Return the path of ``path``'s write-ahead log."""
    return path.with_name(path.name + "-wal")


def shm_path(path: Path) -> Path:
    """Return the path of ``path``'s WAL index."""
    return path.with_name(path.name + "-shm")


def _wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        s0 = (s0 + words[index] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[index + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def inspect_wal(path: Path) -> WalState:
    """Read the ``-wal`` beside ``path`` the way SQLite's recovery does, up to its first commit.

    SQLite ignores a WAL whose header is invalid, and frames whose salt or cumulative checksum
    do not match; recovery keeps whole transactions only.
    """
    wal = wal_path(path)
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return WalState(exists=False, size=0, usable=False, problem=None)
    except OSError as error:
        return WalState(exists=True, size=0, usable=False, problem=f"cannot stat it: {error}")
    if size == 0:
        return WalState(exists=True, size=0, usable=False, problem=None)

    def garbage(problem: str) -> WalState:
        return WalState(exists=True, size=size, usable=False, problem=problem)

    try:
        with wal.open("rb") as file:
            header = file.read(_WAL_HEADER)
            if len(header) < _WAL_HEADER:
                return garbage(f"{size} bytes, shorter than a WAL header")
            magic, fmt, page_size, _sequence, salt1, salt2, c0, c1 = struct.unpack(">8I", header)
            if magic not in _WAL_MAGICS or fmt != _WAL_FORMAT:
                return garbage("not a WAL (bad magic number)")
            if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
                return garbage(f"bad page size {page_size}")
            big = bool(magic & 1)
            if _wal_checksum(header[:24], 0, 0, big) != (c0, c1):
                return garbage("its header fails its checksum")
            s0, s1 = c0, c1
            for _ in range(_WAL_FRAMES_CHECKED):
                frame = file.read(_WAL_FRAME_HEADER + page_size)
                if len(frame) < _WAL_FRAME_HEADER + page_size:
                    if not frame:
                        # A header and no frames: nothing to recover, nothing lost.
                        return WalState(exists=True, size=size, usable=False, problem=None)
                    return garbage("no complete committed transaction")
                _page, commit, f_salt1, f_salt2, f0, f1 = struct.unpack(
                    ">6I", frame[:_WAL_FRAME_HEADER]
                )
                if (f_salt1, f_salt2) != (salt1, salt2):
                    return garbage("its first frame does not belong to its header (salt)")
                s0, s1 = _wal_checksum(frame[:8], s0, s1, big)
                s0, s1 = _wal_checksum(frame[_WAL_FRAME_HEADER:], s0, s1, big)
                if (s0, s1) != (f0, f1):
                    return garbage("its frames fail their checksums before the first commit")
                if commit:
                    break
    except OSError as error:
        return garbage(f"cannot read it: {error}")
    return WalState(exists=True, size=size, usable=True, problem=None)


def warn_discarded_wal(path: Path, wal: WalState) -> None:
    """Log that SQLite will ignore (and later overwrite) a non-empty WAL that holds nothing."""
    if wal.problem is not None:
        log().warning(
            "journal_wal_discarded",
            path=str(path),
            wal=str(wal_path(path)),
            wal_bytes=wal.size,
            reason=wal.problem,
            message="SQLite ignores this WAL file (nothing in it was committed to the journal) "
            "and overwrites it at the next write",
        )


def inspect_file(path: Path, *, strict: bool = True) -> FileState:
    """Check the file before SQLite touches it (``strict=False``: do not measure its size
    against its header, for tools that read what they can of a damaged file).

    Raises:
        JournalFileError: it is not a regular file, not SQLite, or truncated.
    """
    wal = inspect_wal(path)
    shm_exists = shm_path(path).exists()
    try:
        status = path.stat()
    except FileNotFoundError:
        return FileState(False, False, None, wal, shm_exists)
    except OSError as error:
        raise JournalFileError(path=path, problem=f"cannot stat it: {error}") from error
    if not path.is_file():
        raise JournalFileError(path=path, problem="not a regular file")
    size = status.st_size
    if size == 0:
        return FileState(True, True, None, wal, shm_exists)
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
    application_id = int.from_bytes(header[68:72], "big")
    page_size = int.from_bytes(header[16:18], "big")
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        raise JournalFileError(path=path, problem=f"not an SQLite database (page size {page_size})")
    # With WAL content to recover the main file may legitimately lag (a checkpoint was
    # interrupted); SQLite recovers it, so only a file standing on its own is measured.
    if strict and not wal.usable:
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
    return FileState(True, False, application_id, wal, shm_exists)


_INIT_HINT = (
    "; to initialise it as a new journal say so explicitly "
    "(`taskfarm serve --init`, or create='if_missing_or_empty')"
)


def empty_file_error(
    path: Path, *, read_only: bool, what: str = "an empty file"
) -> JournalFileError:
    """Return the refusal of an existing empty file (zero bytes, or a database with nothing
    in it)."""
    return JournalFileError(
        path=path, problem=f"{what}, not a journal" + ("" if read_only else _INIT_HINT)
    )


def _uri(path: Path, query: str) -> str:
    return f"file:{urllib.request.pathname2url(str(path.absolute()))}?{query}"


def read_only_uri(path: Path, state: FileState) -> str:
    """Return the URI that opens ``path`` read-only without leaving files beside it."""
    if state.wal.usable or (state.wal.exists and state.shm_exists):
        return _uri(path, "mode=ro")
    return _uri(path, "mode=ro&immutable=1")


def connect_read_only(path: Path, state: FileState, *, busy_timeout: float) -> sqlite3.Connection:
    """Open a read-only ``sqlite3`` connection (see :func:`read_only_uri`)."""
    conn = sqlite3.connect(
        read_only_uri(path, state), uri=True, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def probe(path: Path, state: FileState, *, read_only: bool, create: Create) -> int:
    """Check an existing file read-only; return its schema version (0: an empty database).

    Raises:
        JournalFileError: SQLite cannot read it, it belongs to another application, its schema
            is newer than this code (or, read-only, older), or it is an empty database and
            ``create`` does not allow initialising it.
    """
    try:
        with contextlib.closing(connect_read_only(path, state, busy_timeout=5.0)) as conn:
            user_version, application_id, objects = conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version),"
                " (SELECT application_id FROM pragma_application_id),"
                " (SELECT count(*) FROM sqlite_master)"
            ).fetchone()
    except sqlite3.Error as error:
        raise JournalFileError(path=path, problem=f"SQLite cannot read it: {error}") from error
    if application_id != APPLICATION_ID:
        if application_id == 0 and user_version == 0 and objects == 0:
            if read_only or create != "if_missing_or_empty":
                raise empty_file_error(path, read_only=read_only, what="an empty database")
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
            "open it read-write once (e.g. `taskfarm serve`)",
        )
    return int(user_version)


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction; return the version the file
    was at (the connection has :func:`register_functions` installed).

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
        if application_id != APPLICATION_ID:
            # Only when it changes: opening a current journal writes nothing.
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(version)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """Yield a fresh path in ``path``'s folder; remove it and its side files afterwards."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.creating")
    try:
        yield temporary
    finally:
        for leftover in (temporary, wal_path(temporary), shm_path(temporary)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def create_journal_file(path: Path) -> bool:
    """Create an initialised, empty journal at ``path`` atomically; return False if another
    process created ``path`` first (it is then left as it is).

    Raises:
        JournalFileError: the folder cannot hold it.
    """
    return build_journal_file(path, None)


def build_journal_file(path: Path, fill: Callable[[sqlite3.Connection], None] | None) -> bool:
    """Build a journal under a temporary name beside ``path`` (initialise it, let ``fill``
    write into it inside one transaction), then link it into place; return False, leaving
    ``path`` alone, if it exists by then.

    Raises:
        JournalFileError: the folder cannot hold it, or SQLite fails.
    """
    try:
        with _temporary_beside(path) as temporary:
            # O_EXCL: a name nobody else uses; 0o666 & ~umask, as SQLite would create it.
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            conn = sqlite3.connect(temporary, isolation_level=None)
            try:
                register_functions(conn)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                migrate(conn, temporary)
                if fill is not None:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        fill(conn)
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                # Move everything into the main file so that it stands on its own.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            except OSError:
                # A file system without hard links: rename (which would replace a file that
                # appeared since the caller looked; the window is one system call).
                if path.exists():
                    return False
                os.rename(temporary, path)
            _fsync_folder(path.parent)
            return True
    except sqlite3.Error as error:
        raise JournalFileError(path=path, problem=f"cannot create it: {error}") from error
    except OSError as error:
        raise JournalFileError(
            path=path, problem=f"cannot create it: {error.strerror or error}"
        ) from error


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # not supported for folders everywhere; the link itself is what matters
    finally:
        os.close(descriptor)
