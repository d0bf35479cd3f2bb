"""The journal contract: every test here runs against the in-memory and the SQLite journal."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.lowlevel
import msgspec
import pytest
import structlog
import structlog.testing

from persistence import (
    Event,
    EventCodec,
    EventEncodeError,
    InMemoryJournal,
    Journal,
    JournalClosedError,
    JournalError,
    LoadedStream,
    RecordedEvent,
    StreamAppend,
    StreamInfo,
    VersionConflictError,
    open_sqlite_journal,
    rebuild_all,
    rebuild_stream,
    rebuild_streams,
)
from runtime import ConfigurationError, VirtualClock

START = datetime(2026, 1, 1, tzinfo=UTC)
S = TypeVar("S")


class CounterAdded(Event, frozen=True, kw_only=True, tag="test.counter_added"):
    amount: int


class CounterReset(Event, frozen=True, kw_only=True, tag="test.counter_reset"):
    pass


class NotRegistered(Event, frozen=True, kw_only=True, tag="test.not_registered"):
    pass


class Counter(msgspec.Struct, frozen=True):
    total: int = 0
    changes: int = 0


class CounterAggregate:
    state_type = Counter
    schema_version = 1

    def initial_state(self, stream_id: str) -> Counter:
        return Counter()

    def apply(self, state: Counter, event: Event) -> Counter:
        match event:
            case CounterAdded(amount=amount):
                return Counter(total=state.total + amount, changes=state.changes + 1)
            case CounterReset():
                return Counter(total=0, changes=state.changes + 1)
        return state


OpenJournal = Callable[[], AbstractAsyncContextManager[Journal]]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(START)


@pytest.fixture
def codec() -> EventCodec:
    codec = EventCodec()
    codec.register(CounterAdded)
    codec.register(CounterReset)
    return codec


@pytest.fixture(params=["memory", "sqlite"])
def open_journal(
    request: pytest.FixtureRequest, tmp_path: Path, clock: VirtualClock, codec: EventCodec
) -> OpenJournal:
    @asynccontextmanager
    async def memory() -> AsyncIterator[Journal]:
        journal = InMemoryJournal(clock=clock, codec=codec)
        try:
            yield journal
        finally:
            await journal.aclose()

    @asynccontextmanager
    async def sqlite() -> AsyncIterator[Journal]:
        # A short queue: appenders also wait for space (a cancellable point) in these tests.
        async with open_sqlite_journal(
            tmp_path / "journal.db", clock=clock, codec=codec, max_pending=8
        ) as journal:
            yield journal

    return memory if request.param == "memory" else sqlite


def added(*amounts: int) -> list[Event]:
    return [CounterAdded(amount=amount) for amount in amounts]


async def read_everything(journal: Journal, **bounds: int) -> list[RecordedEvent]:
    records: list[RecordedEvent] = []
    async for batch in journal.read_all(**bounds):
        records.extend(batch)
    return records


# -- appends and reads ------------------------------------------------------------------------


async def test_append_returns_positions_and_version(open_journal: OpenJournal) -> None:
    """An append reports the global positions it took and the stream's new version."""
    async with open_journal() as journal:
        first = await journal.append("counter:a", added(1, 2))
        second = await journal.append("counter:b", added(3))
        third = await journal.append("counter:a", added(4), expected_version=2)
    assert (first.first_position, first.last_position, first.version) == (1, 2, 2)
    assert (second.first_position, second.last_position, second.version) == (3, 3, 1)
    assert (third.first_position, third.last_position, third.version) == (4, 4, 3)
    assert first.stream_id == "counter:a"
    assert first.timestamp == START


async def test_read_stream_returns_recorded_events(open_journal: OpenJournal) -> None:
    """read_stream returns the stream's events in order with every recorded field."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1), correlation_id="req-1")
        await journal.append("counter:b", [CounterReset()])
        await journal.append("counter:a", added(2))
        records = await journal.read_stream("counter:a")
    assert records == [
        RecordedEvent(1, "counter:a", 1, "test.counter_added", 1, START, "req-1", added(1)[0]),
        RecordedEvent(3, "counter:a", 2, "test.counter_added", 1, START, None, added(2)[0]),
    ]
    assert records[0].timestamp.tzinfo is not None


async def test_read_stream_bounds(open_journal: OpenJournal) -> None:
    """read_stream honours after_version and until_position."""
    async with open_journal() as journal:
        for amount in range(1, 6):
            await journal.append("counter:a", added(amount))
            await journal.append("counter:b", added(amount))
        after = await journal.read_stream("counter:a", after_version=3)
        until = await journal.read_stream("counter:a", until_position=5)
        both = await journal.read_stream("counter:a", after_version=1, until_position=7)
        missing = await journal.read_stream("counter:zzz")
    assert [r.version for r in after] == [4, 5]
    assert [r.position for r in until] == [1, 3, 5]
    assert [r.version for r in both] == [2, 3, 4]
    assert missing == []


async def test_read_all_in_batches_and_bounds(open_journal: OpenJournal) -> None:
    """read_all yields every event in position order, in batches, within its bounds."""
    async with open_journal() as journal:
        for amount in range(25):
            await journal.append(f"counter:{amount % 3}", added(amount))
        batches = [list(batch) async for batch in journal.read_all(batch_size=10)]
        bounded = await read_everything(journal, after_position=5, until_position=12)
        beyond = await read_everything(journal, after_position=25)
    assert [len(batch) for batch in batches] == [10, 10, 5]
    flat = [record for batch in batches for record in batch]
    assert [r.position for r in flat] == list(range(1, 26))
    assert [r.event for r in flat] == added(*range(25))
    assert [r.position for r in bounded] == list(range(6, 13))
    assert beyond == []


async def test_versions_positions_and_streams(open_journal: OpenJournal) -> None:
    """last_position, stream_version and streams describe what was committed."""
    async with open_journal() as journal:
        assert await journal.last_position() == 0
        assert await journal.stream_version("counter:a") == 0
        assert await journal.streams() == []
        await journal.append("counter:b", added(1, 2))
        await journal.append("counter:a", added(3))
        await journal.append("counter:b", added(4))
        assert await journal.last_position() == 4
        assert await journal.stream_version("counter:b") == 3
        assert await journal.streams() == [
            StreamInfo(
                stream_id="counter:a", version=1, first_position=3, last_position=3, event_count=1
            ),
            StreamInfo(
                stream_id="counter:b", version=3, first_position=1, last_position=4, event_count=3
            ),
        ]


async def test_expected_version_checks(open_journal: OpenJournal) -> None:
    """expected_version 0 means a new stream; a mismatch raises VersionConflictError."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1), expected_version=0)
        with pytest.raises(VersionConflictError) as caught:
            await journal.append("counter:a", added(2), expected_version=0)
        await journal.append("counter:a", added(3), expected_version=1)
        with pytest.raises(VersionConflictError):
            await journal.append("counter:a", added(4), expected_version=5)
        assert await journal.stream_version("counter:a") == 2
        assert [r.event for r in await journal.read_stream("counter:a")] == added(1, 3)
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "counter:a",
        0,
        1,
    )


async def test_bad_appends_are_refused(open_journal: OpenJournal) -> None:
    """An empty append, an unregistered event or a bad argument raises and commits nothing."""
    async with open_journal() as journal:
        with pytest.raises(JournalError, match="at least one event"):
            await journal.append("counter:a", [])
        with pytest.raises(EventEncodeError, match="NotRegistered"):
            await journal.append("counter:a", [CounterAdded(amount=1), NotRegistered()])
        with pytest.raises(JournalError, match="stream_id"):
            await journal.append("", added(1))
        with pytest.raises(JournalError, match="expected_version"):
            await journal.append("counter:a", added(1), expected_version=-1)
        assert await journal.last_position() == 0


async def test_timestamps_come_from_the_clock_and_never_decrease(
    open_journal: OpenJournal, clock: VirtualClock
) -> None:
    """Each event's timestamp is the injected clock's time, never earlier than the previous."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1))
        await clock.advance(90)
        await journal.append("counter:a", added(2))
        records = await journal.read_stream("counter:a")
    assert [r.timestamp for r in records] == [START, START + timedelta(seconds=90)]


async def test_position_at_a_time(open_journal: OpenJournal, clock: VirtualClock) -> None:
    """position_at returns the last position recorded at or before a time."""
    async with open_journal() as journal:
        for _ in range(5):
            await journal.append("counter:a", added(1, 1))
            await clock.advance(10)
        assert await journal.position_at(START - timedelta(seconds=1)) == 0
        assert await journal.position_at(START) == 2
        assert await journal.position_at(START + timedelta(seconds=25)) == 6
        assert await journal.position_at(START + timedelta(days=1)) == 10
        with pytest.raises(ConfigurationError):
            await journal.position_at(datetime(2026, 1, 1))  # noqa: DTZ001 - naive on purpose


async def test_closed_journal_refuses_work(open_journal: OpenJournal) -> None:
    """After aclose() every operation raises JournalClosedError."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1))
        await journal.aclose()
        with pytest.raises(JournalClosedError):
            await journal.append("counter:a", added(2))
        with pytest.raises(JournalClosedError):
            await journal.read_stream("counter:a")
        with pytest.raises(JournalClosedError):
            await read_everything(journal)


# -- concurrency and cancellation -------------------------------------------------------------


async def test_concurrent_appends_with_same_expected_version_one_wins(
    open_journal: OpenJournal,
) -> None:
    """Of N concurrent appends expecting the same version, exactly one commits."""
    async with open_journal() as journal:
        for expected in (0, 1):
            won: list[int] = []
            lost: list[VersionConflictError] = []

            async def contend(
                amount: int,
                expected: int = expected,
                won: list[int] = won,
                lost: list[VersionConflictError] = lost,
            ) -> None:
                try:
                    await journal.append("race:1", added(amount), expected_version=expected)
                except VersionConflictError as error:
                    lost.append(error)
                else:
                    won.append(amount)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as task_group:
                    for amount in range(20):
                        task_group.start_soon(contend, amount)
            assert len(won) == 1
            assert len(lost) == 19
            assert {(e.expected, e.actual) for e in lost} == {(expected, expected + 1)}
        records = await journal.read_stream("race:1")
    assert [r.version for r in records] == [1, 2]


async def test_cancelled_append_never_lies(open_journal: OpenJournal) -> None:
    """An append that returns is committed and one cancelled (anywhere) is not."""
    rng = random.Random(20260101)
    committed: set[int] = set()
    cancelled: set[int] = set()
    async with open_journal() as journal:

        async def attempt(amount: int, delay: int, task_group: anyio.abc.TaskGroup) -> None:
            with anyio.CancelScope() as scope:

                async def cancel_later() -> None:
                    for _ in range(delay):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                task_group.start_soon(cancel_later)
                await journal.append("cancel:1", added(amount))
                committed.add(amount)
                return
            cancelled.add(amount)

        with anyio.fail_after(30):
            for wave in range(10):
                async with anyio.create_task_group() as task_group:
                    for index in range(30):
                        amount = wave * 100 + index
                        task_group.start_soon(attempt, amount, rng.randrange(40), task_group)
        stored = [r.event for r in await journal.read_stream("cancel:1")]
    assert committed, "some appends must commit for the test to mean anything"
    assert cancelled, "some appends must be cancelled for the test to mean anything"
    assert committed | cancelled == {w * 100 + i for w in range(10) for i in range(30)}
    amounts = [event.amount for event in stored if isinstance(event, CounterAdded)]
    assert sorted(amounts) == sorted(committed)


# -- atomic multi-stream appends --------------------------------------------------------------


def part(stream_id: str, *amounts: int, expected: int | None = None) -> StreamAppend:
    return StreamAppend(stream_id=stream_id, events=added(*amounts), expected_version=expected)


async def test_append_many_commits_every_stream_together(
    open_journal: OpenJournal, clock: VirtualClock
) -> None:
    """append_many gives each stream its versions, consecutive positions in the order given,
    one timestamp and the correlation id, and returns one result per stream in order."""
    async with open_journal() as journal:
        await journal.append("counter:b", added(1))
        await clock.advance(5)
        results = await journal.append_many(
            [part("counter:a", 2, 3, expected=0), part("counter:b", 4, expected=1)],
            correlation_id="submit-1",
        )
        records = await read_everything(journal)
    assert [(r.stream_id, r.first_position, r.last_position, r.version) for r in results] == [
        ("counter:a", 2, 3, 2),
        ("counter:b", 4, 4, 2),
    ]
    assert {r.timestamp for r in results} == {START + timedelta(seconds=5)}
    assert [(r.position, r.stream_id, r.version, r.event) for r in records[1:]] == [
        (2, "counter:a", 1, CounterAdded(amount=2)),
        (3, "counter:a", 2, CounterAdded(amount=3)),
        (4, "counter:b", 2, CounterAdded(amount=4)),
    ]
    assert {r.correlation_id for r in records[1:]} == {"submit-1"}
    assert {r.timestamp for r in records[1:]} == {START + timedelta(seconds=5)}


async def test_append_many_conflict_writes_nothing(open_journal: OpenJournal) -> None:
    """If any stream is not at its expected version nothing is written, and the error names
    the first such stream."""
    async with open_journal() as journal:
        await journal.append("counter:b", added(1))
        await journal.append("counter:c", added(1))
        with pytest.raises(VersionConflictError) as caught:
            await journal.append_many(
                [
                    part("counter:a", 1, expected=0),
                    part("counter:b", 2, expected=0),
                    part("counter:c", 3, expected=7),
                ]
            )
        assert await journal.last_position() == 2
        assert await journal.stream_version("counter:a") == 0
        assert await journal.stream_version("counter:b") == 1
        after = await journal.append_many([part("counter:a", 1), part("counter:b", 2)])
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "counter:b",
        0,
        1,
    )
    assert "counter:b" in str(caught.value)
    assert [r.first_position for r in after] == [3, 4]


async def test_append_many_refuses_bad_arguments(open_journal: OpenJournal) -> None:
    """No streams, a stream named twice, a stream without events or an unregistered event
    raise and write nothing."""
    async with open_journal() as journal:
        with pytest.raises(JournalError, match="at least one stream"):
            await journal.append_many([])
        with pytest.raises(JournalError, match="twice"):
            await journal.append_many([part("counter:a", 1), part("counter:a", 2)])
        with pytest.raises(JournalError, match="at least one event"):
            await journal.append_many([part("counter:a", 1), part("counter:b")])
        with pytest.raises(JournalError, match="expected_version"):
            await journal.append_many([part("counter:a", 1, expected=-1)])
        with pytest.raises(EventEncodeError, match="NotRegistered"):
            await journal.append_many(
                [
                    part("counter:a", 1),
                    StreamAppend(stream_id="counter:b", events=[NotRegistered()]),
                ]
            )
        assert await journal.last_position() == 0


@pytest.mark.parametrize("many_first", [True, False])
async def test_append_many_races_single_appends(
    open_journal: OpenJournal, many_first: bool
) -> None:
    """Concurrent append_many and append calls expecting the same versions: each stream gets
    exactly one winner, and a multi-stream append wins everywhere or nowhere."""
    async with open_journal() as journal:
        outcomes: dict[str, bool] = {}

        async def many(name: str) -> None:
            try:
                await journal.append_many(
                    [part("race:a", 1, expected=0), part("race:b", 2, expected=0)]
                )
            except VersionConflictError:
                outcomes[name] = False
            else:
                outcomes[name] = True

        async def single(name: str, stream_id: str) -> None:
            try:
                await journal.append(stream_id, added(3), expected_version=0)
            except VersionConflictError:
                outcomes[name] = False
            else:
                outcomes[name] = True

        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                if many_first:
                    task_group.start_soon(many, "many-1")
                task_group.start_soon(single, "single-b", "race:b")
                task_group.start_soon(many, "many-2")
                task_group.start_soon(single, "single-a", "race:a")
                if not many_first:
                    task_group.start_soon(many, "many-1")
        records = await read_everything(journal)
    assert sorted(r.stream_id for r in records) == ["race:a", "race:b"], "one winner each"
    assert not outcomes["many-2"], "it raced the earlier single append of race:b"
    if many_first:
        assert outcomes == {"many-1": True, "single-b": False, "many-2": False, "single-a": False}
        assert [r.position for r in records] == [1, 2]
    else:
        assert outcomes == {"single-b": True, "many-2": False, "single-a": True, "many-1": False}


async def test_cancelled_append_many_never_lies(open_journal: OpenJournal) -> None:
    """An append_many that returns is committed in every stream; one cancelled (anywhere) is
    committed in none."""
    rng = random.Random(20260704)
    committed: set[int] = set()
    cancelled: set[int] = set()
    async with open_journal() as journal:

        async def attempt(amount: int, delay: int, task_group: anyio.abc.TaskGroup) -> None:
            with anyio.CancelScope() as scope:

                async def cancel_later() -> None:
                    for _ in range(delay):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                task_group.start_soon(cancel_later)
                await journal.append_many(
                    [part(f"many:{amount}", amount), part(f"other:{amount}", amount, amount)]
                )
                committed.add(amount)
                return
            cancelled.add(amount)

        with anyio.fail_after(30):
            for wave in range(6):
                async with anyio.create_task_group() as task_group:
                    for index in range(30):
                        amount = wave * 100 + index
                        task_group.start_soon(attempt, amount, rng.randrange(40), task_group)
        records = await read_everything(journal)
    assert committed, "some appends must commit for the test to mean anything"
    assert cancelled, "some appends must be cancelled for the test to mean anything"
    stored = {r.stream_id for r in records}
    assert stored == {f"many:{a}" for a in committed} | {f"other:{a}" for a in committed}
    assert len(records) == 3 * len(committed)


# -- subscriptions ----------------------------------------------------------------------------


async def test_subscription_reads_what_is_stored_then_follows(open_journal: OpenJournal) -> None:
    """A subscription yields the events after its position in order, then each new commit,
    appends and multi-stream appends alike."""
    async with open_journal() as journal:
        for amount in range(5):
            await journal.append(f"counter:{amount % 2}", added(amount))
        seen: list[RecordedEvent] = []
        with anyio.fail_after(10):
            async with (
                journal.subscribe(after=2) as subscription,
                anyio.create_task_group() as task_group,
            ):

                async def follow() -> None:
                    async for batch in subscription:
                        seen.extend(batch)
                        if len(seen) == 3:
                            # Caught up: now write more, while the subscriber waits.
                            task_group.start_soon(write_more)
                        if len(seen) == 7:
                            return

                async def write_more() -> None:
                    await journal.append("counter:a", added(10))
                    await journal.append_many([part("counter:b", 11), part("counter:c", 12)])
                    await journal.append("counter:d", added(13))

                task_group.start_soon(follow)
        assert subscription.position == 9
    assert [r.position for r in seen] == list(range(3, 10))
    assert [r.event for r in seen] == added(2, 3, 4, 10, 11, 12, 13)


async def test_subscription_batches_are_bounded(open_journal: OpenJournal) -> None:
    """A subscriber that asks late gets what it missed from the journal, in batches of at most
    batch_size, while the appenders never waited for it."""
    async with open_journal() as journal:
        subscription = journal.subscribe(after=0, batch_size=16)
        with anyio.fail_after(20):
            for amount in range(100):
                await journal.append("counter:a", added(amount))
            sizes: list[int] = []
            seen: list[int] = []
            async for batch in subscription:
                sizes.append(len(batch))
                seen.extend(r.position for r in batch)
                if len(seen) == 100:
                    break
        await subscription.aclose()
    assert max(sizes) == 16
    assert seen == list(range(1, 101))


async def test_subscription_never_sees_half_a_multi_stream_append(
    open_journal: OpenJournal,
) -> None:
    """When a subscriber sees the first event of a multi-stream append, all of it is stored,
    even when it receives the events one at a time."""
    async with open_journal() as journal:
        checked = 0
        with anyio.fail_after(20):
            async with (
                journal.subscribe(after=0, batch_size=1) as subscription,
                anyio.create_task_group() as task_group,
            ):

                async def follow() -> None:
                    nonlocal checked
                    async for (record,) in subscription:
                        if record.stream_id.startswith("first:"):
                            # Read straight from the journal: the rest must be there.
                            rest = await journal.read_stream(f"last:{record.version}")
                            assert len(rest) == 1, f"half of append {record.version}"
                            checked += 1
                        if record.position == 30:
                            return

                async def write() -> None:
                    for index in range(1, 11):
                        await journal.append_many(
                            [
                                part("first:x", index),
                                part(f"middle:{index}", index),
                                part(f"last:{index}", index),
                            ]
                        )

                task_group.start_soon(follow)
                task_group.start_soon(write)
    assert checked == 10


async def test_subscription_ends_when_closed(open_journal: OpenJournal) -> None:
    """A subscriber waiting for commits stops when its subscription is closed, and every
    subscriber stops when the journal closes."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1))
        first = journal.subscribe()
        second = journal.subscribe()
        ended: list[str] = []

        async def drain(name: str, subscription: object) -> None:
            assert isinstance(subscription, type(first))
            async for _batch in subscription:
                pass
            ended.append(name)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(drain, "first", first)
                task_group.start_soon(drain, "second", second)
                while first.position < 1 or second.position < 1:
                    await anyio.lowlevel.checkpoint()
                await first.aclose()
                while ended != ["first"]:
                    await anyio.lowlevel.checkpoint()
                await journal.aclose()
    assert ended == ["first", "second"]


async def test_subscribe_refuses_bad_arguments(open_journal: OpenJournal) -> None:
    """A negative position or a batch size below one is refused."""
    async with open_journal() as journal:
        with pytest.raises(JournalError, match="after"):
            journal.subscribe(after=-1)
        with pytest.raises(JournalError, match="batch_size"):
            journal.subscribe(batch_size=0)
        await journal.aclose()
        with pytest.raises(JournalClosedError):
            journal.subscribe()


# -- snapshots --------------------------------------------------------------------------------


async def test_snapshots_save_and_load(open_journal: OpenJournal) -> None:
    """load_snapshot returns the latest snapshot within the bounds, at the asked schema."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1, 2, 3))
        await journal.append("counter:b", added(9))
        await journal.append("counter:a", added(4))
        assert await journal.load_snapshot("counter:a", Counter) is None
        await journal.save_snapshot("counter:a", version=2, state=Counter(total=3, changes=2))
        await journal.save_snapshot("counter:a", version=4, state=Counter(total=10, changes=4))
        await journal.save_snapshot(
            "counter:a", version=3, state=Counter(total=6, changes=3), schema_version=2
        )
        latest = await journal.load_snapshot("counter:a", Counter)
        by_version = await journal.load_snapshot("counter:a", Counter, max_version=3)
        by_position = await journal.load_snapshot("counter:a", Counter, max_position=4)
        too_early = await journal.load_snapshot("counter:a", Counter, max_position=1)
        schema_two = await journal.load_snapshot("counter:a", Counter, schema_version=2)
        other_schema = await journal.load_snapshot("counter:b", Counter)
    assert latest == (4, Counter(total=10, changes=4))
    assert by_version == (2, Counter(total=3, changes=2))
    assert by_position == (2, Counter(total=3, changes=2))
    assert too_early is None
    assert schema_two == (3, Counter(total=6, changes=3))
    assert other_schema is None


async def test_snapshot_of_a_missing_version_is_refused(open_journal: OpenJournal) -> None:
    """A snapshot at a version the stream has not reached raises JournalError."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1))
        with pytest.raises(JournalError, match="version"):
            await journal.save_snapshot("counter:a", version=2, state=Counter())
        with pytest.raises(JournalError, match="version"):
            await journal.save_snapshot("counter:zzz", version=1, state=Counter())
        assert await journal.load_snapshot("counter:a", Counter) is None


async def test_undecodable_snapshot_is_ignored(open_journal: OpenJournal) -> None:
    """A snapshot that no longer decodes as the state type is treated as missing."""

    class Other(msgspec.Struct, frozen=True):
        total: str

    async with open_journal() as journal:
        await journal.append("counter:a", added(1, 2))
        await journal.save_snapshot("counter:a", version=1, state=Counter(total=1, changes=1))
        await journal.save_snapshot("counter:a", version=2, state=Other(total="lots"))
        loaded = await journal.load_snapshot("counter:a", Counter)
    assert loaded == (1, Counter(total=1, changes=1))


async def load_streams(
    journal: Journal, prefix: str, state_type: type[S], **options: int
) -> dict[str, LoadedStream[S]]:
    """Every stream load_streams yields, by id (in the order yielded)."""
    return {s.stream_id: s async for s in journal.load_streams(prefix, state_type, **options)}


class Total(msgspec.Struct, frozen=True):
    """A lighter view of Counter: only the field a reader needs."""

    total: int = 0


async def test_load_streams_reads_every_stream_under_a_prefix(open_journal: OpenJournal) -> None:
    """load_streams returns each stream under the prefix, in id order, with its latest usable
    snapshot at the schema and exactly the events after it (all of them without one)."""
    async with open_journal() as journal:
        await journal.append("counter:b", added(1, 2, 3))
        await journal.append("counter:a", added(10))
        await journal.append("counter:b", added(4))
        await journal.append("counter:c", added(5, 6))
        await journal.append("other:x", added(7))
        await journal.append("counterz", added(8))  # shares the letters, not the prefix
        await journal.append('counter:"é\\', added(9))  # read back through JSON keys
        await journal.save_snapshot("counter:b", version=2, state=Counter(total=3, changes=2))
        await journal.save_snapshot(
            "counter:b", version=3, state=Counter(total=99, changes=99), schema_version=2
        )
        await journal.save_snapshot("counter:c", version=2, state=Counter(total=11, changes=2))
        loaded = await load_streams(journal, "counter:", Counter)
        odd = loaded.pop('counter:"é\\')
        assert (odd.snapshot, [r.event for r in odd.events]) == (None, added(9))
        assert list(loaded) == ["counter:a", "counter:b", "counter:c"]
        a, b, c = loaded.values()
        assert (a.snapshot, [r.event for r in a.events], a.version) == (None, added(10), 1)
        assert b.snapshot == (2, Counter(total=3, changes=2))
        assert [(r.version, r.event) for r in b.events] == [(3, added(3)[0]), (4, added(4)[0])]
        assert b.events == (await journal.read_stream("counter:b"))[2:]
        assert (b.version, c.events, c.version) == (4, [], 2)
        schema_two = await load_streams(journal, "counter:b", Counter, schema_version=2)
        assert schema_two["counter:b"].snapshot == (3, Counter(total=99, changes=99))
        assert [r.version for r in schema_two["counter:b"].events] == [4]
        light = await load_streams(journal, "counter:c", Total)
        assert light["counter:c"].snapshot == (2, Total(total=11))
        everything = await load_streams(journal, "", Counter)
        assert list(everything) == sorted(
            ["counter:a", "counter:b", "counter:c", 'counter:"é\\', "other:x", "counterz"]
        )
        assert await load_streams(journal, "nothing:", Counter) == {}
        await journal.aclose()
        with pytest.raises(JournalClosedError):
            await load_streams(journal, "counter:", Counter)


async def test_load_streams_skips_an_undecodable_snapshot_for_the_one_before(
    open_journal: OpenJournal,
) -> None:
    """As load_snapshot does: a latest snapshot that does not decode is skipped, with a
    warning, and the stream is read from the snapshot before it."""

    class Other(msgspec.Struct, frozen=True):
        total: str

    async with open_journal() as journal:
        await journal.append("counter:a", added(1, 2, 3))
        await journal.append("counter:b", added(5))
        await journal.save_snapshot("counter:a", version=1, state=Counter(total=1, changes=1))
        await journal.save_snapshot("counter:a", version=2, state=Other(total="lots"))
        await journal.save_snapshot("counter:b", version=1, state=Other(total="lots"))
        with structlog.testing.capture_logs() as logs:
            loaded = await load_streams(journal, "counter:", Counter)
    assert loaded["counter:a"].snapshot == (1, Counter(total=1, changes=1))
    assert [r.version for r in loaded["counter:a"].events] == [2, 3]
    assert loaded["counter:b"].snapshot is None
    assert [r.version for r in loaded["counter:b"].events] == [1]
    ignored = [(e["stream_id"], e["version"]) for e in logs if e["event"] == "snapshot_ignored"]
    assert sorted(ignored) == [("counter:a", 2), ("counter:b", 1)]


async def test_load_streams_yields_many_streams_in_order_with_their_own_tails(
    open_journal: OpenJournal,
) -> None:
    """Past the number of streams one query reads (the SQLite journal reads in chunks), every
    stream still comes once, in id order, with exactly its own events after its snapshot."""
    async with open_journal() as journal:
        await journal.append_many(
            [
                StreamAppend(stream_id=f"counter:{n:04d}", events=added(n, n + 1, n + 2))
                for n in range(1200)
            ]
        )
        for n in range(0, 1200, 7):
            await journal.save_snapshot(
                f"counter:{n:04d}", version=n % 3 + 1, state=Counter(total=n, changes=n % 3 + 1)
            )
        loaded = await load_streams(journal, "counter:", Counter)
    assert list(loaded) == [f"counter:{n:04d}" for n in range(1200)]
    for n, stream in enumerate(loaded.values()):
        after = n % 3 + 1 if n % 7 == 0 else 0
        assert stream.snapshot == (None if not after else (after, Counter(total=n, changes=after)))
        assert [r.event for r in stream.events] == added(n, n + 1, n + 2)[after:]
        assert stream.version == 3


async def test_rebuild_streams_equals_rebuild_stream_of_each(
    open_journal: OpenJournal, clock: VirtualClock
) -> None:
    """rebuild_streams gives every stream the state rebuild_stream (and replay from position
    0) gives it."""
    async with open_journal() as journal:
        await fill_with_snapshots(journal, clock)
        aggregate = CounterAggregate()
        together = await rebuild_streams(journal, "counter:", aggregate)
        one_by_one = {
            stream_id: await rebuild_stream(journal, stream_id, aggregate)
            for stream_id in ("counter:a", "counter:b")
        }
        from_zero = await rebuild_all(journal, lambda _stream: aggregate)
    assert together == one_by_one == from_zero
    assert together["counter:a"][1] == 60


# -- replay -----------------------------------------------------------------------------------


async def fill_with_snapshots(journal: Journal, clock: VirtualClock) -> list[int]:
    """Append 60 changes to counter:a (snapshot every 7) interleaved with counter:b."""
    rng = random.Random(5)
    aggregate = CounterAggregate()
    state = aggregate.initial_state("counter:a")
    for version in range(1, 61):
        event: Event = CounterReset() if rng.random() < 0.1 else CounterAdded(amount=version)
        await journal.append("counter:a", [event], expected_version=version - 1)
        state = aggregate.apply(state, event)
        if version % 7 == 0:
            await journal.save_snapshot("counter:a", version=version, state=state)
        if version % 3 == 0:
            await journal.append("counter:b", added(version))
        await clock.advance(1)
    return [record.position async for batch in journal.read_all() for record in batch]


async def test_rebuild_with_snapshots_equals_replay_from_zero(
    open_journal: OpenJournal, clock: VirtualClock
) -> None:
    """Rebuilding from snapshots gives the same state as replaying from position 0."""
    async with open_journal() as journal:
        await fill_with_snapshots(journal, clock)
        aggregate = CounterAggregate()
        with_snapshots = await rebuild_stream(journal, "counter:a", aggregate)
        from_zero = await rebuild_stream(journal, "counter:a", aggregate, use_snapshots=False)
        last = await journal.last_position()
        for until in range(last + 1):
            fast = await rebuild_stream(journal, "counter:a", aggregate, until=until)
            slow = await rebuild_stream(
                journal, "counter:a", aggregate, until=until, use_snapshots=False
            )
            assert fast == slow, f"until={until}"
    assert with_snapshots == from_zero
    assert from_zero[1] == 60


async def test_rebuild_until_position_and_time(
    open_journal: OpenJournal, clock: VirtualClock
) -> None:
    """rebuild_stream as of a position or a time sees only the events up to it."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1))  # position 1 at START
        await clock.advance(60)
        await journal.append("counter:b", added(100))  # position 2 at START+60s
        await journal.append("counter:a", added(2))  # position 3 at START+60s
        await clock.advance(60)
        await journal.append("counter:a", added(4))  # position 4 at START+120s
        await journal.save_snapshot("counter:a", version=3, state=Counter(total=7, changes=3))
        aggregate = CounterAggregate()
        at_two = await rebuild_stream(journal, "counter:a", aggregate, until=2)
        at_three = await rebuild_stream(journal, "counter:a", aggregate, until=3)
        at_start = await rebuild_stream(journal, "counter:a", aggregate, until=START)
        at_90s = await rebuild_stream(
            journal, "counter:a", aggregate, until=START + timedelta(seconds=90)
        )
        before = await rebuild_stream(
            journal, "counter:a", aggregate, until=START - timedelta(seconds=1)
        )
        now = await rebuild_stream(journal, "counter:a", aggregate, until=clock.now())
        with pytest.raises(ConfigurationError, match="until"):
            await rebuild_stream(journal, "counter:a", aggregate, until=-1)
        with pytest.raises(ConfigurationError):
            await rebuild_stream(
                journal,
                "counter:a",
                aggregate,
                until=datetime(2026, 1, 1),  # noqa: DTZ001 - naive on purpose
            )
    assert at_two == (Counter(total=1, changes=1), 1)
    assert at_three == (Counter(total=3, changes=2), 2)
    assert at_start == (Counter(total=1, changes=1), 1)
    assert at_90s == (Counter(total=3, changes=2), 2)
    assert before == (Counter(), 0)
    assert now == (Counter(total=7, changes=3), 3)


async def test_rebuild_all_in_one_pass(open_journal: OpenJournal, clock: VirtualClock) -> None:
    """rebuild_all folds every stream that has an aggregate and skips the others."""
    async with open_journal() as journal:
        await journal.append("counter:a", added(1, 2))
        await journal.append("other:x", added(50))
        await journal.append("counter:b", added(10))
        await journal.append("counter:a", [CounterReset()], correlation_id="c")
        await journal.append("counter:a", added(5))
        aggregate = CounterAggregate()

        def aggregate_for(stream_id: str) -> CounterAggregate | None:
            return aggregate if stream_id.startswith("counter:") else None

        everything = await rebuild_all(journal, aggregate_for)
        until_four = await rebuild_all(journal, aggregate_for, until=4)
    assert everything == {
        "counter:a": (Counter(total=5, changes=4), 4),
        "counter:b": (Counter(total=10, changes=1), 1),
    }
    assert until_four == {
        "counter:a": (Counter(total=3, changes=2), 2),
        "counter:b": (Counter(total=10, changes=1), 1),
    }
