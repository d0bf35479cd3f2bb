"""The SQLite journal beyond the contract: durability across reopen, group commit, the
safety net, bad files left untouched, read-only opens, upcasting and commit failures."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from persistence import (
    SCHEMA_VERSION,
    AppendResult,
    Event,
    EventCodec,
    EventDecodeError,
    JournalClosedError,
    JournalError,
    JournalFileError,
    RecordedEvent,
    SQLiteJournal,
    VersionConflictError,
    open_sqlite_journal,
)
from persistence._sqlite_file import event_checksum
from runtime import ConfigurationError, VirtualClock

START = datetime(2026, 3, 1, tzinfo=UTC)


class Ticked(Event, frozen=True, kw_only=True, tag="test.ticked"):
    n: int


class Renamed(Event, frozen=True, kw_only=True, tag="test.renamed"):
    name: str


class RenamedV2(Event, frozen=True, kw_only=True, tag="test.renamed"):
    title: str
    by: str = "unknown"


class Count(msgspec.Struct, frozen=True):
    n: int


def make_codec(*classes: type[Event]) -> EventCodec:
    codec = EventCodec()
    for cls in classes or (Ticked, Renamed):
        codec.register(cls)
    return codec


def ticks(*numbers: int) -> list[Event]:
    return [Ticked(n=n) for n in numbers]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def read_all(journal: SQLiteJournal) -> list[RecordedEvent]:
    return [record async for batch in journal.read_all() for record in batch]


async def test_reopen_keeps_events_snapshots_and_continues(tmp_path: Path) -> None:
    """Events and snapshots survive a reopen, and appends continue the positions and versions."""
    path = tmp_path / "j.db"
    clock = VirtualClock(START)
    async with open_sqlite_journal(path, clock=clock, codec=make_codec()) as journal:
        await journal.append("tick:a", ticks(1, 2), correlation_id="c-1")
        await journal.append("tick:b", ticks(3))
        await journal.save_snapshot("tick:a", version=2, state=Count(n=2))
    await clock.advance(5)
    async with open_sqlite_journal(path, clock=clock, codec=make_codec()) as journal:
        assert await journal.last_position() == 3
        with pytest.raises(VersionConflictError):
            await journal.append("tick:a", ticks(9), expected_version=0)
        result = await journal.append("tick:a", ticks(4), expected_version=2)
        snapshot = await journal.load_snapshot("tick:a", Count)
        records = await read_all(journal)
    assert (result.first_position, result.version) == (4, 3)
    assert snapshot == (2, Count(n=2))
    assert [(r.position, r.stream_id, r.version, r.event) for r in records] == [
        (1, "tick:a", 1, Ticked(n=1)),
        (2, "tick:a", 2, Ticked(n=2)),
        (3, "tick:b", 1, Ticked(n=3)),
        (4, "tick:a", 3, Ticked(n=4)),
    ]
    assert records[0].correlation_id == "c-1"
    assert records[3].timestamp == START + timedelta(seconds=5)


async def test_file_uses_wal_and_the_requested_synchronous_level(tmp_path: Path) -> None:
    """The journal runs in WAL mode with synchronous=FULL unless told otherwise."""
    clock = VirtualClock(START)
    for level, number in (("FULL", 2), ("NORMAL", 1)):
        path = tmp_path / f"{level}.db"
        async with open_sqlite_journal(
            path,
            clock=clock,
            codec=make_codec(),
            synchronous=level,  # type: ignore[arg-type]
        ) as journal:
            assert journal._writer is not None  # white box: the writer's own connection
            assert journal._writer.conn.execute("PRAGMA synchronous").fetchone() == (number,)
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    with pytest.raises(ConfigurationError, match="synchronous"):
        async with open_sqlite_journal(
            tmp_path / "x.db",
            clock=clock,
            codec=make_codec(),
            synchronous="SOMETIMES",  # type: ignore[arg-type]
        ):
            pass


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """Many concurrent appenders are committed in far fewer transactions, each getting its
    own contiguous positions."""
    results: list[AppendResult] = []
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=VirtualClock(START), codec=make_codec()
    ) as journal:

        async def appender(index: int) -> None:
            stream_id = f"tick:{index}"
            results.extend([await journal.append(stream_id, ticks(n, n)) for n in range(5)])

        with anyio.fail_after(20):
            async with anyio.create_task_group() as task_group:
                for index in range(50):
                    task_group.start_soon(appender, index)
        statistics = journal.statistics()
        records = await read_all(journal)
    assert statistics.events == 500
    assert statistics.commits <= 50, statistics
    assert statistics.mean_group >= 10
    taken = sorted(p for r in results for p in range(r.first_position, r.last_position + 1))
    assert taken == list(range(1, 501))
    assert [r.position for r in records] == list(range(1, 501))


async def test_groups_are_capped_by_max_group_events(tmp_path: Path) -> None:
    """With a small max_group_events, queued appends spill into later commits and all land."""
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=VirtualClock(START), codec=make_codec(), max_group_events=4
    ) as journal:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as task_group:
                for index in range(40):
                    task_group.start_soon(journal.append, f"tick:{index}", ticks(index))
        statistics = journal.statistics()
        records = await read_all(journal)
    assert statistics.events == 40
    assert statistics.largest_group <= 4
    assert statistics.commits >= 10
    assert sorted(r.event.n for r in records if isinstance(r.event, Ticked)) == list(range(40))


async def test_conflict_fails_alone_in_its_group(tmp_path: Path) -> None:
    """In one commit group, a conflicting request fails while the others commit."""
    outcomes: dict[str, Any] = {}
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=VirtualClock(START), codec=make_codec()
    ) as journal:
        await journal.append("tick:a", ticks(0))
        commits_before = journal.statistics().commits

        async def attempt(name: str, stream_id: str, expected: int) -> None:
            try:
                outcomes[name] = await journal.append(
                    stream_id, ticks(1), expected_version=expected
                )
            except VersionConflictError as error:
                outcomes[name] = error

        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(attempt, "first", "tick:a", 1)
                task_group.start_soon(attempt, "loser", "tick:a", 1)
                task_group.start_soon(attempt, "other", "tick:b", 0)
        assert journal.statistics().commits == commits_before + 1
        assert journal.statistics().conflicts == 1
        assert await journal.stream_version("tick:a") == 2
        assert await journal.stream_version("tick:b") == 1
    assert isinstance(outcomes["loser"], VersionConflictError)
    assert (outcomes["loser"].expected, outcomes["loser"].actual) == (1, 2)
    assert outcomes["first"].version == 2
    assert outcomes["other"].version == 1


async def test_safety_net_when_another_process_wrote(tmp_path: Path) -> None:
    """If rows appear behind the writer's back, the UNIQUE index stops the clash and the
    writer reloads and commits at the right place."""
    path = tmp_path / "j.db"
    codec = make_codec()
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=codec) as journal:
        await journal.append("tick:a", ticks(1))
        with sqlite3.connect(path) as intruder:
            payload = codec.encode(Ticked(n=2)).payload.decode()
            stamp = START.isoformat(timespec="microseconds")
            row = (2, "tick:a", 2, "test.ticked", 1, stamp, None, payload)
            intruder.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, event_checksum(*row)),
            )
        result = await journal.append("tick:a", ticks(3))
        with pytest.raises(VersionConflictError):
            await journal.append("tick:a", ticks(4), expected_version=2)
        records = await journal.read_stream("tick:a")
    assert (result.first_position, result.version) == (3, 3)
    assert [r.event for r in records] == ticks(1, 2, 3)


async def test_cancelled_after_hand_over_returns_the_commit(tmp_path: Path) -> None:
    """A caller cancelled while its append is being committed still gets the result."""
    returned_although_cancelled = 0
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=VirtualClock(START), codec=make_codec()
    ) as journal:
        for n in range(40):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as task_group:

                    async def cancel_soon(scope: anyio.CancelScope = scope) -> None:
                        scope.cancel()

                    task_group.start_soon(cancel_soon)
                    result = await journal.append("tick:a", ticks(n))
                    returned_although_cancelled += scope.cancel_called
                    assert result.version == n + 1
        assert await journal.stream_version("tick:a") == 40
    assert returned_although_cancelled == 40


async def test_read_stream_until_a_position_across_chunks(tmp_path: Path) -> None:
    """read_stream stops at until_position even deep inside a long stream."""
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=VirtualClock(START), codec=make_codec()
    ) as journal:
        for start in range(0, 6000, 500):
            await journal.append("tick:long", ticks(*range(start, start + 500)))
            await journal.append("tick:other", ticks(-1))
        # Position of version v in tick:long: v + (v - 1) // 500 (one other event per 500).
        records = await journal.read_stream("tick:long", after_version=100, until_position=5009)
    assert records[0].version == 101
    assert records[-1].version == 5000
    assert records[-1].position == 5009


async def test_a_failed_commit_fails_its_group_and_the_journal_goes_on(tmp_path: Path) -> None:
    """When SQLite rejects a transaction, its callers get JournalError and later appends work."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as journal:
        await journal.append("tick:a", ticks(1))
        with sqlite3.connect(path) as admin:
            admin.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON events"
                " WHEN NEW.payload LIKE '%666%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
        with pytest.raises(JournalError, match="poisoned"):
            await journal.append("tick:a", ticks(2, 666))
        result = await journal.append("tick:a", ticks(3), expected_version=1)
        records = await journal.read_stream("tick:a")
    assert result.version == 2
    assert [r.event for r in records] == ticks(1, 3)


async def test_close_drains_handed_over_appends(tmp_path: Path) -> None:
    """aclose() commits what was handed over; later appends raise JournalClosedError."""
    committed: list[int] = []
    refused: list[int] = []
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as journal:

        async def attempt(n: int) -> None:
            try:
                await journal.append("tick:a", ticks(n))
            except JournalClosedError:
                refused.append(n)
            else:
                committed.append(n)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                for n in range(30):
                    task_group.start_soon(attempt, n)
                task_group.start_soon(journal.aclose)
                for n in range(30, 40):
                    task_group.start_soon(attempt, n)
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as journal:
        stored = [r.event for r in await journal.read_stream("tick:a")]
    assert sorted(committed) == list(range(30))
    assert sorted(refused) == list(range(30, 40))
    assert sorted(e.n for e in stored if isinstance(e, Ticked)) == list(range(30))


# -- schema evolution on disk -----------------------------------------------------------------


async def test_old_payloads_are_upcast_when_read(tmp_path: Path) -> None:
    """Events written at version 1 come back as the version-2 class through the upcaster."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(
        path, clock=VirtualClock(START), codec=make_codec(Renamed)
    ) as journal:
        await journal.append("doc:1", [Renamed(name="draft")])
    codec = EventCodec()
    codec.register(RenamedV2, version=2)

    @codec.upcaster("test.renamed", 1)
    def rename(payload: dict[str, Any]) -> dict[str, Any]:
        payload["title"] = payload.pop("name")
        return payload

    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=codec) as journal:
        await journal.append("doc:1", [RenamedV2(title="final", by="ann")])
        records = await journal.read_stream("doc:1")
    assert [(r.schema_version, r.event) for r in records] == [
        (1, RenamedV2(title="draft")),
        (2, RenamedV2(title="final", by="ann")),
    ]


async def test_unknown_tag_on_read_names_the_position(tmp_path: Path) -> None:
    """Reading an event whose tag the codec does not know raises EventDecodeError with its
    position and tag."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as journal:
        await journal.append("tick:a", ticks(1))
        await journal.append("doc:1", [Renamed(name="x")])
    async with open_sqlite_journal(
        path, clock=VirtualClock(START), codec=make_codec(Ticked)
    ) as journal:
        assert [r.event for r in await journal.read_stream("tick:a")] == ticks(1)
        with pytest.raises(EventDecodeError, match="position 2") as caught:
            await read_all(journal)
    assert (caught.value.position, caught.value.tag) == (2, "test.renamed")


# -- bad files --------------------------------------------------------------------------------


async def make_journal(path: Path, events: int = 300) -> None:
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as j:
        for n in range(events):
            await j.append("tick:a", [Renamed(name="x" * 200 + str(n))])


def not_sqlite(path: Path) -> None:
    path.write_bytes(b"this is a text file, not a database\n" * 40)


def tiny(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00\x10\x00")


def truncated(path: Path) -> None:
    anyio.run(make_journal, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_mid_page(path: Path) -> None:
    anyio.run(make_journal, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def newer_schema(path: Path) -> None:
    anyio.run(make_journal, path, 3)
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


def foreign_database(path: Path) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        raw.execute("INSERT INTO invoices VALUES (1, 9.5)")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (not_sqlite, "not an SQLite database"),
        (tiny, "truncated"),
        (truncated, "truncated"),
        (truncated_mid_page, "truncated"),
        (newer_schema, "newer"),
        (foreign_database, "not a taskfarm journal"),
    ],
)
async def test_bad_files_are_refused_untouched(
    tmp_path: Path, damage: Callable[[Path], None], problem: str
) -> None:
    """A file that is not SQLite, is truncated, has a newer schema or belongs to another
    application raises JournalFileError naming it and the problem, and is not modified."""
    path = tmp_path / "bad.db"
    await anyio.to_thread.run_sync(damage, path)
    before = digest(path)
    for read_only in (False, True):
        with pytest.raises(JournalFileError, match=problem) as caught:
            async with open_sqlite_journal(
                path, clock=VirtualClock(START), codec=make_codec(), read_only=read_only
            ):
                pytest.fail("a bad file was opened")
        assert caught.value.path == str(path)
        assert str(path) in str(caught.value)
        assert problem in caught.value.problem
    assert digest(path) == before


async def test_paths_that_cannot_hold_a_journal(tmp_path: Path) -> None:
    """A directory, a missing folder or (read-only) a missing file raise JournalFileError."""
    clock, codec = VirtualClock(START), make_codec()
    for path, problem in (
        (tmp_path, "not a regular file"),
        (tmp_path / "missing" / "j.db", "does not exist"),
    ):
        with pytest.raises(JournalFileError, match=problem):
            async with open_sqlite_journal(path, clock=clock, codec=codec):
                pass
    with pytest.raises(JournalFileError, match="no such journal file"):
        async with open_sqlite_journal(tmp_path / "n.db", clock=clock, codec=codec, read_only=True):
            pass
    assert not (tmp_path / "n.db").exists()


async def test_empty_file_is_initialised_only_when_asked(tmp_path: Path) -> None:
    """A zero-byte file is refused by every opener, untouched, unless the caller asks to
    initialise it (create="if_missing_or_empty")."""
    path = tmp_path / "j.db"
    path.touch()
    clock, codec = VirtualClock(START), make_codec()
    openers: list[dict[str, Any]] = [
        {},
        {"create": "never"},
        {"create": "if_missing"},
        {"read_only": True},
    ]
    for options in openers:
        with pytest.raises(JournalFileError, match="an empty file, not a journal") as caught:
            async with open_sqlite_journal(path, clock=clock, codec=codec, **options):
                pytest.fail("an empty file was opened")
        assert ("serve --init" in str(caught.value)) is not options.get("read_only", False)
    assert path.stat().st_size == 0
    assert names(tmp_path) == ["j.db"]
    async with open_sqlite_journal(
        path, clock=clock, codec=codec, create="if_missing_or_empty"
    ) as journal:
        await journal.append("tick:a", ticks(1))
        assert await journal.last_position() == 1


async def test_empty_database_is_treated_as_an_empty_file(tmp_path: Path) -> None:
    """An SQLite database with nothing in it is refused like an empty file unless asked."""
    path = tmp_path / "j.db"
    with sqlite3.connect(path) as raw:
        raw.execute("VACUUM")  # writes the header: a database without a single table
    with pytest.raises(JournalFileError, match="an empty database, not a journal"):
        async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()):
            pass
    async with open_sqlite_journal(
        path, clock=VirtualClock(START), codec=make_codec(), create="if_missing_or_empty"
    ) as journal:
        await journal.append("tick:a", ticks(1))


async def test_a_missing_file_is_created_whole_or_not_at_all(tmp_path: Path) -> None:
    """A new journal appears at its path already initialised (no temporary files are left),
    and create="never" refuses a missing file without creating it."""
    path = tmp_path / "j.db"
    clock, codec = VirtualClock(START), make_codec()
    with pytest.raises(JournalFileError, match="no such journal file"):
        async with open_sqlite_journal(path, clock=clock, codec=codec, create="never"):
            pass
    assert names(tmp_path) == []
    async with open_sqlite_journal(path, clock=clock, codec=codec) as journal:
        # Before the first append the file is already a complete journal on its own.
        with sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) as raw:
            assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert raw.execute("SELECT count(*) FROM events").fetchone() == (0,)
        await journal.append("tick:a", ticks(1))
    assert names(tmp_path) == ["j.db"]
    with pytest.raises(ConfigurationError, match="create"):
        async with open_sqlite_journal(path, clock=clock, codec=codec, create="always"):  # type: ignore[arg-type]
            pass


async def test_read_only_journal_reads_but_refuses_writes(tmp_path: Path) -> None:
    """A read-only journal serves reads and describe(), and refuses appends and snapshots."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as j:
        await j.append("tick:a", ticks(1, 2))
    async with open_sqlite_journal(
        path, clock=VirtualClock(START), codec=make_codec(), read_only=True
    ) as journal:
        assert [r.version for r in await journal.read_stream("tick:a")] == [1, 2]
        description = await journal.describe()
        with pytest.raises(JournalError, match="read-only"):
            await journal.append("tick:a", ticks(3))
        with pytest.raises(JournalError, match="read-only"):
            await journal.save_snapshot("tick:a", version=1, state=Count(n=1))
    assert (description.event_count, description.schema_version) == (2, SCHEMA_VERSION)
    assert description.first_timestamp == START


def listing(folder: Path) -> dict[str, str]:
    return {path.name: digest(path) for path in sorted(folder.iterdir())}


async def test_read_only_open_creates_and_changes_nothing(tmp_path: Path) -> None:
    """Reading a journal nobody has open leaves no -wal or -shm behind and changes no byte."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as j:
        await j.append("tick:a", ticks(1, 2, 3))
    before = listing(tmp_path)
    assert list(before) == ["j.db"]
    for _ in range(2):
        async with open_sqlite_journal(
            path, clock=VirtualClock(START), codec=make_codec(), read_only=True
        ) as journal:
            assert len(await read_all(journal)) == 3
            await journal.describe()
            assert listing(tmp_path) == before
    assert listing(tmp_path) == before


async def test_read_only_open_of_a_live_journal_sees_its_commits(tmp_path: Path) -> None:
    """A read-only open of a journal that a writer has open reads through the writer's WAL,
    sees new commits in later reads, and adds no file of its own."""
    path = tmp_path / "j.db"
    clock, codec = VirtualClock(START), make_codec()
    async with open_sqlite_journal(path, clock=clock, codec=codec) as writer:
        await writer.append("tick:a", ticks(1))
        writer_files = names(tmp_path)
        assert writer_files == ["j.db", "j.db-shm", "j.db-wal"]
        async with open_sqlite_journal(path, clock=clock, codec=codec, read_only=True) as reader:
            assert [r.event for r in await reader.read_stream("tick:a")] == ticks(1)
            await writer.append("tick:a", ticks(2))
            assert [r.event for r in await reader.read_stream("tick:a")] == ticks(1, 2)
        assert names(tmp_path) == writer_files


async def test_read_only_open_in_a_read_only_folder(tmp_path: Path) -> None:
    """A valid journal in a folder nobody may write to opens read-only, and no file appears
    (the permission alone proves nothing when the tests run as root, who may write anyway)."""
    folder = tmp_path / "archive"
    folder.mkdir()
    path = folder / "j.db"
    async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()) as j:
        await j.append("tick:a", ticks(1, 2))
    before = listing(folder)
    folder.chmod(0o555)
    path.chmod(0o444)
    try:
        async with open_sqlite_journal(
            path, clock=VirtualClock(START), codec=make_codec(), read_only=True
        ) as journal:
            assert len(await read_all(journal)) == 2
    finally:
        folder.chmod(0o755)
    assert listing(folder) == before


async def test_body_errors_propagate_unwrapped(tmp_path: Path) -> None:
    """An exception raised inside the journal's context propagates as itself, and a cancelled
    body closes the journal and stays cancelled."""
    path = tmp_path / "j.db"
    with pytest.raises(KeyError, match="boom"):
        async with open_sqlite_journal(path, clock=VirtualClock(START), codec=make_codec()):
            raise KeyError("boom")
    with anyio.fail_after(10):
        with anyio.CancelScope() as scope:
            async with open_sqlite_journal(
                path, clock=VirtualClock(START), codec=make_codec()
            ) as journal:
                await journal.append("tick:a", ticks(1))
                scope.cancel()
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    with pytest.raises(JournalClosedError):
        await journal.append("tick:a", ticks(2))
