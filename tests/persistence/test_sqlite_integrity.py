"""Damage on disk: per-event checksums verified on read, a damaged tail refused for writing,
the schema migration that adds checksums, ``check_sqlite_journal`` and
``salvage_sqlite_journal``, and a WAL file that SQLite ignores."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest
import structlog

from persistence import (
    SCHEMA_VERSION,
    Event,
    EventChecksumError,
    EventCodec,
    JournalFileError,
    RecordedEvent,
    SQLiteJournal,
    check_sqlite_journal,
    open_sqlite_journal,
    rebuild_all,
    salvage_sqlite_journal,
)
from runtime import VirtualClock

START = datetime(2026, 4, 1, tzinfo=UTC)


class Noted(Event, frozen=True, kw_only=True, tag="integrity.noted"):
    text: str


class Seen(msgspec.Struct, frozen=True):
    count: int


class SeenAggregate:
    state_type = Seen
    schema_version = 1

    def initial_state(self, stream_id: str) -> Seen:
        return Seen(count=0)

    def apply(self, state: Seen, event: Event) -> Seen:
        return Seen(count=state.count + 1)


def make_codec() -> EventCodec:
    codec = EventCodec()
    codec.register(Noted)
    return codec


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def write_journal(path: Path, *, events: int = 40, marked: int = 20) -> None:
    """Events on three streams; the one at position ``marked`` carries unique text and lives on
    stream ``note:victim``; a snapshot of note:0 at version 3."""
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as j:
        for position in range(1, events + 1):
            if position == marked:
                await j.append("note:victim", [Noted(text="MARKER-payload-0123")])
            else:
                await j.append(f"note:{position % 2}", [Noted(text=f"text {position}")])
        await j.save_snapshot("note:0", version=3, state=Seen(count=3))


def flip(path: Path, needle: bytes, *, near: bytes | None = None, index: int = 0) -> None:
    """Change byte ``index`` of the one occurrence of ``needle`` (followed within 16 bytes by
    ``near``, if given) in the file, as a bit rot or a bad sector would."""
    data = bytearray(path.read_bytes())
    found = [
        at
        for at in range(len(data))
        if data.startswith(needle, at)
        and (near is None or near in data[at + len(needle) : at + len(needle) + 16])
    ]
    assert len(found) == 1, f"{needle!r} found {len(found)} times"
    data[found[0] + index] ^= 0x01
    path.write_bytes(bytes(data))


def cut(path: Path, size: int) -> None:
    """Drop the last ``size`` bytes of the file (a lost tail)."""
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size - size)


async def read_all(journal: SQLiteJournal) -> list[RecordedEvent]:
    return [record async for batch in journal.read_all() for record in batch]


def integrity(path: Path) -> list[str]:
    with sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) as raw:
        return [row[0] for row in raw.execute("PRAGMA integrity_check")]


@pytest.fixture
def journal_file(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    anyio.run(write_journal, path)
    return path


# -- verified on read --------------------------------------------------------------------------


async def test_a_flipped_byte_in_a_payload_is_caught_on_every_read(journal_file: Path) -> None:
    """A byte changed inside a payload passes SQLite's own integrity check but fails the
    event's checksum on read_all, read_stream, rebuild_all and load_streams, naming position
    and stream."""
    await anyio.to_thread.run_sync(lambda: flip(journal_file, b"MARKER-payload", index=7))
    assert integrity(journal_file) == ["ok"], "SQLite alone does not notice"
    async with open_sqlite_journal(
        journal_file, clock=VirtualClock(START), codec=make_codec(), read_only=True
    ) as journal:
        with pytest.raises(EventChecksumError) as caught:
            await read_all(journal)
        with pytest.raises(EventChecksumError):
            await journal.read_stream("note:victim")
        with pytest.raises(EventChecksumError):
            await rebuild_all(journal, lambda _stream_id: SeenAggregate())
        with pytest.raises(EventChecksumError) as bulk:
            _ = [stream async for stream in journal.load_streams("note:", Seen)]
        before = [r async for batch in journal.read_all(until_position=19) for r in batch]
        other = await journal.read_stream("note:1")
    assert (caught.value.position, caught.value.stream_id) == (20, "note:victim")
    assert (bulk.value.position, bulk.value.stream_id) == (20, "note:victim")
    message = str(caught.value)
    assert "position 20" in message
    assert "'note:victim'" in message
    assert f"taskfarm journal salvage {journal_file} --out NEW" in message
    assert len(before) == 19
    assert len(other) == 20


async def test_a_flipped_byte_in_a_stream_id_is_not_replayed_as_another_stream(
    journal_file: Path,
) -> None:
    """A stream id damaged in its row raises instead of being replayed as a different stream;
    the error names the stream as stored."""
    await anyio.to_thread.run_sync(
        lambda: flip(journal_file, b"note:victim", near=b"integrity.noted", index=10)
    )
    async with open_sqlite_journal(
        journal_file, clock=VirtualClock(START), codec=make_codec(), read_only=True
    ) as journal:
        with pytest.raises(EventChecksumError) as caught:
            await read_all(journal)
    assert caught.value.position == 20
    assert caught.value.stream_id == "note:victil"


async def test_a_damaged_snapshot_is_ignored(journal_file: Path) -> None:
    """A snapshot that fails its checksum is treated as missing (it is a cache), with a
    warning, by load_snapshot and load_streams alike; the stream is rebuilt from the snapshot
    before it and its events instead."""
    async with open_sqlite_journal(
        journal_file, clock=VirtualClock(START), codec=make_codec()
    ) as journal:
        await journal.save_snapshot("note:0", version=5, state=Seen(count=123456789))
    await anyio.to_thread.run_sync(lambda: flip(journal_file, b"123456789", index=4))
    with structlog.testing.capture_logs() as logs:
        async with open_sqlite_journal(
            journal_file, clock=VirtualClock(START), codec=make_codec(), read_only=True
        ) as journal:
            loaded = await journal.load_snapshot("note:0", Seen)
            [bulk] = [stream async for stream in journal.load_streams("note:0", Seen)]
    assert loaded == (3, Seen(count=3))
    assert bulk.snapshot == (3, Seen(count=3))
    assert [r.version for r in bulk.events] == list(range(4, 20))
    warnings = [entry for entry in logs if entry["event"] == "snapshot_ignored"]
    assert len(warnings) == 2
    for warning in warnings:
        assert (warning["stream_id"], warning["version"]) == ("note:0", 5)
        assert "checksum" in warning["reason"]


async def test_opening_for_writing_refuses_a_damaged_tail(journal_file: Path) -> None:
    """A journal whose recent events are damaged is refused for writing, untouched, with the
    salvage command in the message; it still opens read-only for inspection."""
    await anyio.to_thread.run_sync(lambda: flip(journal_file, b"MARKER-payload", index=3))
    before = digest(journal_file)
    with pytest.raises(EventChecksumError, match="journal salvage") as caught:
        async with open_sqlite_journal(journal_file, clock=VirtualClock(START), codec=make_codec()):
            pytest.fail("a damaged journal was opened for writing")
    assert caught.value.position == 20
    assert digest(journal_file) == before
    assert sorted(p.name for p in journal_file.parent.iterdir()) == [journal_file.name]
    async with open_sqlite_journal(
        journal_file, clock=VirtualClock(START), codec=make_codec(), read_only=True
    ) as journal:
        assert (await journal.describe()).event_count == 40


async def test_a_missing_checksum_is_damage(journal_file: Path) -> None:
    """A row without a checksum (written behind the journal's back) is refused on read."""
    with sqlite3.connect(journal_file) as raw:
        raw.execute("UPDATE events SET checksum = NULL WHERE position = 40")
    with pytest.raises(EventChecksumError, match="no checksum"):
        async with open_sqlite_journal(journal_file, clock=VirtualClock(START), codec=make_codec()):
            pass


# -- migration ---------------------------------------------------------------------------------

_SCHEMA_1 = (
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY, stream_id TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version >= 1), tag TEXT NOT NULL,
        schema_version INTEGER NOT NULL, timestamp TEXT NOT NULL, correlation_id TEXT,
        payload TEXT NOT NULL)""",
    "CREATE UNIQUE INDEX events_stream_version ON events (stream_id, version)",
    """CREATE TABLE snapshots (
        stream_id TEXT NOT NULL, version INTEGER NOT NULL, schema_version INTEGER NOT NULL,
        position INTEGER NOT NULL, timestamp TEXT NOT NULL, state TEXT NOT NULL,
        PRIMARY KEY (stream_id, version)) WITHOUT ROWID""",
)


def schema_one_journal(path: Path) -> None:
    """Write a journal as taskfarm wrote them before checksums (schema version 1)."""
    stamp = START.isoformat(timespec="microseconds")
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        raw.execute("PRAGMA journal_mode = WAL")
        for statement in _SCHEMA_1:
            raw.execute(statement)
        raw.executemany(
            "INSERT INTO events VALUES (?, ?, ?, 'integrity.noted', 1, ?, ?, ?)",
            [
                (n, f"note:{n % 2}", (n + 1) // 2, stamp, "c" if n == 1 else None, payload)
                for n, payload in (
                    (1, '{"type":"integrity.noted","text":"one"}'),
                    (2, '{"type":"integrity.noted","text":"two"}'),
                    (3, '{"type":"integrity.noted","text":"three"}'),
                )
            ],
        )
        raw.execute(
            "INSERT INTO snapshots VALUES ('note:1', 2, 1, 3, ?, '{\"count\":2}')", (stamp,)
        )
        raw.execute("PRAGMA application_id = 1952868913")  # "tfj1"
        raw.execute("PRAGMA user_version = 1")


async def test_a_schema_1_journal_is_migrated_and_its_rows_get_checksums(tmp_path: Path) -> None:
    """An old journal is refused read-only (it needs migrating), then migrated on its first
    read-write open: every old row and snapshot gets a checksum that later reads verify."""
    path = tmp_path / "old.db"
    await anyio.to_thread.run_sync(schema_one_journal, path)
    clock, codec = VirtualClock(START), make_codec()
    with pytest.raises(JournalFileError, match="needs migrating"):
        async with open_sqlite_journal(path, clock=clock, codec=codec, read_only=True):
            pass
    with structlog.testing.capture_logs() as logs:
        async with open_sqlite_journal(path, clock=clock, codec=codec) as journal:
            await journal.append("note:1", [Noted(text="four")], expected_version=2)
    [migrated] = [entry for entry in logs if entry["event"] == "journal_migrated"]
    assert (migrated["from_version"], migrated["schema_version"]) == (1, SCHEMA_VERSION)
    check = await check_sqlite_journal(path)
    assert check.ok, check
    assert (check.good_events, check.snapshots, check.schema_version) == (4, 1, SCHEMA_VERSION)
    async with open_sqlite_journal(path, clock=clock, codec=codec, read_only=True) as journal:
        records = await read_all(journal)
        snapshot = await journal.load_snapshot("note:1", Seen)
    assert [r.event for r in records] == [
        Noted(text="one"),
        Noted(text="two"),
        Noted(text="three"),
        Noted(text="four"),
    ]
    assert records[0].correlation_id == "c"
    assert snapshot == (2, Seen(count=2))
    await anyio.to_thread.run_sync(lambda: flip(path, b'"three"', index=2))
    async with open_sqlite_journal(path, clock=clock, codec=codec, read_only=True) as journal:
        with pytest.raises(EventChecksumError, match="position 3"):
            await read_all(journal)


# -- check and salvage --------------------------------------------------------------------------


async def test_check_passes_a_sound_journal(journal_file: Path) -> None:
    """A sound journal checks ok: every event verified, SQLite's integrity check ok."""
    check = await check_sqlite_journal(journal_file)
    assert check.ok
    assert (check.good_events, check.last_good_position, check.stored_events) == (40, 40, 40)
    assert check.first_bad is None
    assert check.integrity == ["ok"]
    assert (check.snapshots, check.bad_snapshots) == (1, [])


async def test_check_finds_the_first_bad_position(journal_file: Path) -> None:
    """A damaged payload is reported at its position and stream, with the events before it
    counted as good, while SQLite's own check finds nothing."""
    await anyio.to_thread.run_sync(lambda: flip(journal_file, b"MARKER-payload", index=9))
    check = await check_sqlite_journal(journal_file)
    assert not check.ok
    assert check.first_bad is not None
    assert (check.first_bad.position, check.first_bad.stream_id) == (20, "note:victim")
    assert "checksum" in check.first_bad.reason
    assert (check.good_events, check.last_good_position, check.stored_events) == (19, 19, 40)
    assert check.integrity == ["ok"]


async def test_check_finds_a_missing_event_and_a_broken_index(journal_file: Path) -> None:
    """A deleted row is a gap in the positions; a damaged stream id also breaks SQLite's
    index, and both checks say so."""
    with sqlite3.connect(journal_file) as raw:
        raw.execute("DELETE FROM events WHERE position = 7")
    gap = await check_sqlite_journal(journal_file)
    assert gap.first_bad is not None
    assert (gap.first_bad.position, gap.first_bad.stream_id) == (7, None)
    assert "missing" in gap.first_bad.reason
    assert gap.good_events == 6
    other = journal_file.with_name("other.db")
    await write_journal(other)
    await anyio.to_thread.run_sync(
        lambda: flip(other, b"note:victim", near=b"integrity.noted", index=10)
    )
    broken = await check_sqlite_journal(other)
    assert broken.first_bad is not None
    assert broken.first_bad.position == 20
    assert broken.integrity != ["ok"]
    assert not broken.ok


async def test_check_reports_a_truncated_journal_as_damaged(journal_file: Path) -> None:
    """A truncated taskfarm journal is reported as damaged (not refused as a stranger)."""
    cut(journal_file, 4096)
    check = await check_sqlite_journal(journal_file)
    assert not check.ok
    assert check.problem is not None
    assert "truncated" in check.problem


async def test_check_refuses_what_is_not_a_journal(tmp_path: Path) -> None:
    """A missing file, an empty file, and another application's database raise
    JournalFileError naming the problem."""
    empty = tmp_path / "empty.db"
    empty.touch()
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    for path, problem in (
        (tmp_path / "missing.db", "no such journal file"),
        (empty, "an empty file, not a journal"),
        (foreign, "not a taskfarm journal"),
    ):
        with pytest.raises(JournalFileError, match=problem):
            await check_sqlite_journal(path)


async def test_salvage_keeps_the_events_before_the_damage(journal_file: Path) -> None:
    """Salvage copies events 1 .. last good (and the snapshots within) into a new journal that
    checks sound and accepts appends where the salvaged history ends; the source is unchanged."""
    async with open_sqlite_journal(
        journal_file, clock=VirtualClock(START), codec=make_codec()
    ) as journal:
        await journal.save_snapshot("note:1", version=15, state=Seen(count=15))  # position 31
    await anyio.to_thread.run_sync(lambda: flip(journal_file, b"MARKER-payload", index=9))
    before = digest(journal_file)
    out = journal_file.with_name("salvaged.db")
    report = await salvage_sqlite_journal(journal_file, out=out)
    assert digest(journal_file) == before
    assert (report.events, report.last_good_position, report.snapshots) == (19, 19, 1)
    assert report.first_bad is not None
    assert report.first_bad.position == 20
    assert report.stored_events == 40
    assert (await check_sqlite_journal(out)).ok
    assert sorted(p.name for p in out.parent.iterdir()) == ["journal.db", "salvaged.db"]
    async with open_sqlite_journal(out, clock=VirtualClock(START), codec=make_codec()) as journal:
        original = await read_all(journal)
        result = await journal.append("note:0", [Noted(text="again")], expected_version=9)
        assert await journal.load_snapshot("note:0", Seen) == (3, Seen(count=3))
        assert await journal.load_snapshot("note:1", Seen) is None
    assert [r.position for r in original] == list(range(1, 20))
    assert (result.first_position, result.version) == (20, 10)
    with pytest.raises(JournalFileError, match="already exists"):
        await salvage_sqlite_journal(journal_file, out=out)


async def test_salvage_reads_what_it_can_of_a_truncated_journal(tmp_path: Path) -> None:
    """From a journal cut short, salvage keeps the events SQLite can still read, in order."""
    path = tmp_path / "cut.db"
    await write_journal(path, events=3000, marked=1)
    cut(path, path.stat().st_size // 2)
    report = await salvage_sqlite_journal(path, out=tmp_path / "kept.db")
    assert 0 < report.events < 3000
    assert report.first_bad is not None
    check = await check_sqlite_journal(tmp_path / "kept.db")
    assert check.ok
    assert check.good_events == report.events


# -- the WAL -----------------------------------------------------------------------------------


def random_wal(wal: Path, live_wal: bytes) -> str:
    wal.write_bytes(b"\x37\x7f\x06\x82" + b"garbage, not a write-ahead log" * 100)
    return "not a WAL"


def damaged_first_frame(wal: Path, live_wal: bytes) -> str:
    data = bytearray(live_wal)
    data[32 + 24 + 100] ^= 0xFF  # inside the first frame's page
    wal.write_bytes(bytes(data))
    return "checksum"


@pytest.mark.parametrize("damage", [random_wal, damaged_first_frame])
@pytest.mark.parametrize("read_only", [True, False])
async def test_a_garbage_wal_is_ignored_but_reported(
    journal_file: Path, read_only: bool, damage: Callable[[Path, bytes], str]
) -> None:
    """A WAL that holds nothing SQLite can use (not a WAL at all, or its first commit fails
    its checksum) is ignored, as SQLite does, with a warning that names it and why; the
    journal's events are all there."""
    live = journal_file.with_name("live.db")
    async with open_sqlite_journal(live, clock=VirtualClock(START), codec=make_codec()) as j:
        await j.append("note:0", [Noted(text="in the wal")])
        live_wal = live.with_name("live.db-wal").read_bytes()
    wal = journal_file.with_name(journal_file.name + "-wal")
    reason = damage(wal, live_wal)
    size = wal.stat().st_size
    with structlog.testing.capture_logs() as logs:
        async with open_sqlite_journal(
            journal_file, clock=VirtualClock(START), codec=make_codec(), read_only=read_only
        ) as journal:
            records = await read_all(journal)
            if not read_only:
                await journal.append("note:9", [Noted(text="after")])
    [warning] = [entry for entry in logs if entry["event"] == "journal_wal_discarded"]
    assert warning["log_level"] == "warning"
    assert warning["wal"] == str(wal)
    assert warning["wal_bytes"] == size
    assert reason in warning["reason"]
    assert len(records) == 40


async def test_a_wal_with_commits_is_read_and_not_reported(tmp_path: Path) -> None:
    """The WAL of a journal whose writer died (main file and WAL copied while it ran) holds
    commits: read-only opens see them and nothing is reported."""
    live = tmp_path / "live.db"
    crashed = tmp_path / "crashed.db"
    async with open_sqlite_journal(live, clock=VirtualClock(START), codec=make_codec()) as j:
        for n in range(30):
            await j.append("note:0", [Noted(text=f"n{n}")])
        for suffix in ("", "-wal", "-shm"):
            shutil.copyfile(f"{live}{suffix}", f"{crashed}{suffix}")
    assert crashed.with_name("crashed.db-wal").stat().st_size > 0
    with structlog.testing.capture_logs() as logs:
        async with open_sqlite_journal(
            crashed, clock=VirtualClock(START), codec=make_codec(), read_only=True
        ) as journal:
            records = await read_all(journal)
    assert len(records) == 30
    assert not [entry for entry in logs if entry["event"] == "journal_wal_discarded"]
