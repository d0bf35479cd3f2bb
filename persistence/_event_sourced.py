"""Event-sourced actors: handle a command, persist its events, apply them, then reply.

The order is enforced by construction: the only way to change an event-sourced actor's state is
:meth:`EventSourcedActor.persist`, which appends to the journal first (and waits for the commit)
and only then folds the events into the state through the aggregate's pure ``apply``.  A reply
is the handler's return value, so it can only leave after the commit that justifies it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from runtime import Actor, ConfigurationError, get_logger

from ._codec import Event
from ._journal import AppendResult, Journal
from ._replay import Aggregate, rebuild_stream

__all__ = ["EventSourcedActor"]

M = TypeVar("M")
S = TypeVar("S")

_log = get_logger("persistence.event_sourced")


class EventSourcedActor(Actor[M], Generic[M, S]):
    """An actor whose state is the fold of its journal stream.

    Subclasses implement :meth:`handle`: validate the command against :attr:`state`, call
    :meth:`persist` with the resulting events, and return the reply.  On start (and on every
    supervised restart) the state is recovered from the latest snapshot plus the events after
    it; a snapshot is saved every ``snapshot_every`` events.
    """

    def __init__(
        self,
        *,
        journal: Journal,
        stream_id: str,
        aggregate: Aggregate[S],
        snapshot_every: int = 1000,
        defer_commit: float = 0.05,
        recovered: tuple[S, int] | None = None,
    ) -> None:
        """``recovered``: a state and version already rebuilt (e.g. by one pass over the whole
        journal at start-up), used instead of reading the stream again on the first start."""
        if snapshot_every < 0:
            raise ConfigurationError("must be >= 0 (0 disables snapshots)", where="snapshot_every")
        self.journal = journal
        self.stream_id = stream_id
        self.aggregate = aggregate
        self.snapshot_every = snapshot_every
        self.defer_commit = defer_commit
        self._state: S = aggregate.initial_state(stream_id)
        self._version = 0
        self._recovered = recovered
        # Events applied to the state but not journaled yet, oldest first: those a batch staged
        # and those persisted "later" (see persist_later), in the order they were applied.
        self._uncommitted: list[Event] = []
        self._must_commit = False  # whether the current batch staged events that cannot wait
        self._in_batch = False
        self._flush_armed = False
        # While a batch is handled: the effects that wait for its commit.
        self._after_commit: list[Callable[[], Awaitable[object] | None]] = []

    @property
    def state(self) -> S:
        """Return the current state (read-only by convention: change it through ``persist``)."""
        return self._state

    @property
    def version(self) -> int:
        """Return the stream version the state reflects."""
        return self._version

    async def on_start(self) -> None:
        """Recover the state from the journal (snapshot plus the events after it)."""
        if self._recovered is not None:
            (self._state, self._version), self._recovered = self._recovered, None
        else:
            self._state, self._version = await rebuild_stream(
                self.journal, self.stream_id, self.aggregate
            )
        _log.debug("actor_recovered", stream_id=self.stream_id, version=self._version)

    async def receive(self, message: M) -> Any:
        """Hand the command to :meth:`handle` (override ``handle``, not this)."""
        if isinstance(message, _FlushLater):
            await self._commit_uncommitted()
            return None
        return await self.handle(message)

    async def receive_batch(self, messages: list[M]) -> list[Any]:
        """Handle queued commands together and journal all their events in one commit.

        Each command sees the state its predecessors left (their events are applied as they
        are staged), but nothing leaves the actor before the commit: the replies are returned,
        and the effects registered with :meth:`after_commit` run, only once it is durable.
        If the commit fails, the actor fails and is restarted from the journal, so the staged
        state is thrown away with the instance.  A batch that staged only events persisted
        "later" commits nothing: they wait for the next commit (see :meth:`persist_later`).
        """
        self._in_batch = True
        flush = False
        try:
            replies: list[Any] = []
            for message in messages:
                if isinstance(message, _FlushLater):
                    flush = True
                    replies.append(None)
                else:
                    replies.append(await self.handle(message))
            if self._must_commit or flush:
                await self._commit_uncommitted()
        except BaseException:
            # The instance is thrown away: what it applied but did not journal goes with it.
            self._uncommitted = []
            raise
        finally:
            self._in_batch = False
            self._must_commit = False
        effects, self._after_commit = self._after_commit, []
        for effect in effects:
            pending = effect()
            if pending is not None:
                await pending
        return replies

    async def on_stop(self) -> None:
        """Journal the events persisted "later" that are still waiting (a clean stop)."""
        await self._commit_uncommitted()

    async def after_commit(self, effect: Callable[[], Awaitable[object] | None]) -> None:
        """Run ``effect`` once the events persisted so far are durable (at once if they are).

        Use it for every effect a command has outside the actor (telling other actors,
        stopping): inside a batch the commit comes after all the batch's commands.  Events
        persisted with :meth:`persist_later` do not hold an effect back.
        """
        if self._in_batch:
            self._after_commit.append(effect)
            return
        pending = effect()
        if pending is not None:
            await pending

    async def handle(self, command: M) -> Any:
        """Decide on ``command``: persist events with :meth:`persist`, return the reply."""
        raise NotImplementedError

    async def persist(
        self, events: Sequence[Event], *, correlation_id: str | None = None
    ) -> AppendResult | None:
        """Append ``events`` (at the expected version), then apply them to the state.

        Events persisted "later" and still waiting are journaled first, in the same commit.
        Inside a batch (see :meth:`receive_batch`) the events are staged: applied now and
        journaled with the rest of the batch, and None is returned.

        Raises:
            VersionConflictError: another writer appended to this stream; the actor fails and
                its supervisor restarts it from the journal.
        """
        if self._in_batch:
            self._apply(events)
            self._must_commit = True
            return None
        waiting = self._uncommitted
        result = await self.journal.append(
            self.stream_id,
            [*waiting, *events],
            expected_version=self._version - len(waiting),
            correlation_id=correlation_id,
        )
        self._uncommitted = []
        previous = self._version - len(waiting)
        self._uncommitted_apply(events)
        self._version = result.version
        await self._maybe_snapshot(previous, result.version)
        return result

    def persist_later(self, events: Sequence[Event]) -> None:
        """Apply ``events`` now and journal them with this actor's next commit, at the latest
        ``self.defer_commit`` clock seconds from now.

        Only for events whose loss in a crash is harmless (recovery reaches the same decision
        without them, e.g. "the attempt started", which recovery treats like "assigned"): it
        saves a commit (an fsync) when a commit follows soon anyway, e.g. a short task's end.
        Nothing waits for them: replies and effects leave without their commit.
        """
        self._apply(events)
        if not self._flush_armed:
            self._flush_armed = True
            self.context.start_timer("commit-later", _FlushLater(), delay=self.defer_commit)

    def _apply(self, events: Sequence[Event]) -> None:
        """Fold ``events`` into the state and keep them to journal with the next commit."""
        self._uncommitted_apply(events)
        self._version += len(events)
        self._uncommitted.extend(events)

    def _uncommitted_apply(self, events: Sequence[Event]) -> None:
        state = self._state
        apply = self.aggregate.apply
        for event in events:
            state = apply(state, event)
        self._state = state

    async def _commit_uncommitted(self) -> None:
        """Journal the events applied but not journaled yet (one commit), if any."""
        self._flush_armed = False
        waiting = self._uncommitted
        if not waiting:
            return
        previous = self._version - len(waiting)
        result = await self.journal.append(self.stream_id, waiting, expected_version=previous)
        self._uncommitted = []
        await self._maybe_snapshot(previous, result.version)

    async def save_snapshot(self) -> None:
        """Save a snapshot of the current (committed) state now, whatever the cadence: for a
        final state, so that recovering the stream reads one row instead of its history."""
        await self._commit_uncommitted()  # a snapshot never runs ahead of the journal
        await self.journal.save_snapshot(
            self.stream_id,
            version=self._version,
            state=self._state,  # type: ignore[arg-type]
            schema_version=self.aggregate.schema_version,
        )

    async def _maybe_snapshot(self, previous: int, version: int) -> None:
        every = self.snapshot_every
        if every and version // every > previous // every:
            await self.journal.save_snapshot(
                self.stream_id,
                version=version,
                state=self._state,  # type: ignore[arg-type]
                schema_version=self.aggregate.schema_version,
            )


class _FlushLater:
    """The timer message that journals the events persisted "later" (see persist_later)."""

    __slots__ = ()
