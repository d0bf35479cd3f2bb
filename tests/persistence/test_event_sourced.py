"""Event-sourced actors: events persisted "later" ride along with the next commit, keep their
order, are journaled within ``defer_commit`` when no commit follows, and at a clean stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import msgspec

from persistence import (
    AppendResult,
    Event,
    EventCodec,
    EventSourcedActor,
    InMemoryJournal,
    Journal,
)
from runtime import VirtualClock, open_system

WAIT = 10


class Noted(Event, frozen=True, kw_only=True, tag="test.es.noted"):
    text: str


class Tally(msgspec.Struct, kw_only=True):
    notes: list[str] = msgspec.field(default_factory=list)


class TallyAggregate:
    state_type = Tally
    schema_version = 1

    def initial_state(self, stream_id: str) -> Tally:
        return Tally()

    def apply(self, state: Tally, event: Event) -> Tally:
        assert isinstance(event, Noted)
        state.notes.append(event.text)
        return state


class CountingJournal(InMemoryJournal):
    """An in-memory journal that remembers every append (one append is one commit)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.commits: list[list[str]] = []

    async def append(self, stream_id: str, events: Sequence[Event], **options: Any) -> AppendResult:
        self.commits.append([e.text for e in events if isinstance(e, Noted)])
        return await super().append(stream_id, events, **options)


class Later(msgspec.Struct):
    text: str


class Now(msgspec.Struct):
    text: str


class Ask(msgspec.Struct):
    pass


class Notebook(EventSourcedActor[Any, Tally]):
    """Persists ``Now`` at once and ``Later`` later; ``Ask`` replies with the state."""

    max_batch = 16

    def __init__(self, journal: Journal) -> None:
        super().__init__(
            journal=journal, stream_id="notes", aggregate=TallyAggregate(), defer_commit=5.0
        )

    async def handle(self, command: Any) -> Any:
        match command:
            case Later(text=text):
                self.persist_later([Noted(text=text)])
            case Now(text=text):
                await self.persist([Noted(text=text)])
            case Ask():
                return list(self.state.notes)
        return None


def _setup() -> tuple[VirtualClock, CountingJournal]:
    clock = VirtualClock()
    codec = EventCodec()
    codec.register(Noted)
    return clock, CountingJournal(clock=clock, codec=codec)


async def _journaled(journal: Journal) -> list[str]:
    return [r.event.text for r in await journal.read_stream("notes")]  # type: ignore[attr-defined]


async def test_a_later_event_rides_with_the_next_commit_in_order() -> None:
    """``Later`` then ``Now`` in separate messages: one commit holding both, in applied order;
    the state saw the later event at once."""
    clock, journal = _setup()
    async with open_system(clock=clock) as system:
        notebook = await system.spawn(lambda: Notebook(journal), name="notebook")
        await notebook.tell(Later(text="started"))
        assert await notebook.ask(Ask(), timeout=WAIT) == ["started"]
        assert await _journaled(journal) == []
        await notebook.ask(Now(text="finished"), timeout=WAIT)
        assert journal.commits == [["started", "finished"]]
        assert await _journaled(journal) == ["started", "finished"]


async def test_order_is_kept_when_later_events_sit_between_urgent_ones() -> None:
    """Within one batch, now / later / now journal in the order they were applied."""
    clock, journal = _setup()
    async with open_system(clock=clock) as system:
        notebook = await system.spawn(lambda: Notebook(journal), name="notebook")
        for message in (Now(text="a"), Later(text="b"), Now(text="c")):
            notebook.tell_nowait(message)
        await notebook.ask(Ask(), timeout=WAIT)
        assert await _journaled(journal) == ["a", "b", "c"]


async def test_a_later_event_alone_is_journaled_within_defer_commit() -> None:
    """Nothing else to commit: the event is journaled when ``defer_commit`` clock seconds have
    passed, not before."""
    clock, journal = _setup()
    async with open_system(clock=clock) as system:
        notebook = await system.spawn(lambda: Notebook(journal), name="notebook")
        await notebook.tell(Later(text="started"))
        await notebook.ask(Ask(), timeout=WAIT)
        await clock.advance(4.9)
        await notebook.ask(Ask(), timeout=WAIT)
        assert await _journaled(journal) == []
        await clock.advance(0.2)
        with anyio.fail_after(WAIT):
            while not await _journaled(journal):
                await notebook.ask(Ask(), timeout=WAIT)
        assert journal.commits == [["started"]]


async def test_a_clean_stop_journals_what_waits() -> None:
    """An actor stopped before its timer fires still journals its later events."""
    clock, journal = _setup()
    async with open_system(clock=clock) as system:
        notebook = await system.spawn(lambda: Notebook(journal), name="notebook")
        await notebook.tell(Later(text="started"))
        await notebook.ask(Ask(), timeout=WAIT)
        await system.stop(notebook)
    assert await _journaled(journal) == ["started"]


async def test_a_snapshot_never_runs_ahead_of_the_journal() -> None:
    """``save_snapshot`` with later events waiting journals them first: the snapshot's version
    is one the journal has."""
    clock, journal = _setup()

    class Snapshotting(Notebook):
        async def handle(self, command: Any) -> Any:
            if isinstance(command, Ask):
                await self.save_snapshot()
            return await super().handle(command)

    async with open_system(clock=clock) as system:
        notebook = await system.spawn(lambda: Snapshotting(journal), name="notebook")
        await notebook.tell(Later(text="started"))
        await notebook.ask(Ask(), timeout=WAIT)
    snapshot = await journal.load_snapshot("notes", Tally, schema_version=1)
    assert snapshot is not None
    assert snapshot[0] == len(await _journaled(journal)) == 1
