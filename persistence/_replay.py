"""Replay: rebuild a stream's state, or every stream's, as of a position or a time.

An :class:`Aggregate` is the pure part of an event-sourced actor: an initial state and a
function folding one event into it.  Snapshots only shortcut the fold; replaying from position
0 without them gives the same state.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from runtime import ConfigurationError

from ._codec import Event
from ._journal import Journal

__all__ = ["Aggregate", "rebuild_all", "rebuild_stream", "rebuild_streams", "resolve_until"]

S = TypeVar("S")


class Aggregate(Protocol[S]):
    """How one kind of stream folds its events into a state (pure: no I/O, no clock)."""

    @property
    def state_type(self) -> type[S]:
        """The state's class (a msgspec Struct, so snapshots can store it)."""
        ...

    @property
    def schema_version(self) -> int:
        """The state's schema version: bump it when the state's shape or meaning changes, and
        older snapshots are ignored."""
        ...

    def initial_state(self, stream_id: str) -> S:
        """Return the state of a stream that has no events yet."""
        ...

    def apply(self, state: S, event: Event) -> S:
        """Return the state after ``event`` (a new state, or ``state`` changed in place)."""
        ...


async def resolve_until(journal: Journal, until: int | datetime | None) -> int | None:
    """Turn ``until`` (a global position, a tz-aware time, or None) into a position or None.

    Raises:
        ConfigurationError: ``until`` is a negative position, a naive datetime, or neither an
            int nor a datetime.
    """
    if until is None:
        return None
    if isinstance(until, datetime):
        return await journal.position_at(until)
    if isinstance(until, bool) or not isinstance(until, int):
        raise ConfigurationError(
            f"must be a position (int) or a tz-aware datetime, got {until!r}", where="until"
        )
    if until < 0:
        raise ConfigurationError(f"must be >= 0, got {until}", where="until")
    return until


async def rebuild_stream(
    journal: Journal,
    stream_id: str,
    aggregate: Aggregate[S],
    *,
    until: int | datetime | None = None,
    use_snapshots: bool = True,
) -> tuple[S, int]:
    """Rebuild one stream's state as of ``until``; return it with the version it reflects.

    ``until`` is a global position or a tz-aware timestamp (None: everything).  The latest
    snapshot at or before ``until`` saved at the aggregate's schema version is the starting
    point when ``use_snapshots`` is true; the events after it are folded in.

    Raises:
        ConfigurationError: ``until`` is invalid.
        EventDecodeError: a stored event cannot be decoded.
        JournalClosedError: the journal is closed.
    """
    position = await resolve_until(journal, until)
    snapshot = None
    if use_snapshots:
        snapshot = await journal.load_snapshot(
            stream_id,
            aggregate.state_type,
            schema_version=aggregate.schema_version,
            max_position=position,
        )
    if snapshot is None:
        version, state = 0, aggregate.initial_state(stream_id)
    else:
        version, state = snapshot
    records = await journal.read_stream(stream_id, after_version=version, until_position=position)
    apply = aggregate.apply
    for record in records:
        state = apply(state, record.event)
    if records:
        version = records[-1].version
    return state, version


async def rebuild_streams(
    journal: Journal, prefix: str, aggregate: Aggregate[S]
) -> dict[str, tuple[S, int]]:
    """Rebuild every stream whose id starts with ``prefix`` from its latest snapshot and the
    events after it; return ``{stream_id: (state, version)}`` in id order.

    The same states as ``rebuild_stream`` for each stream, read in a few queries
    (``Journal.load_streams``) instead of two per stream, each stream's events folded and let
    go before the next chunk is read.

    Raises:
        EventDecodeError: a stored event cannot be decoded.
        JournalClosedError: the journal is closed.
    """
    states: dict[str, tuple[S, int]] = {}
    apply = aggregate.apply
    async for stream in journal.load_streams(
        prefix, aggregate.state_type, schema_version=aggregate.schema_version
    ):
        state = stream.snapshot[1] if stream.snapshot else aggregate.initial_state(stream.stream_id)
        for record in stream.events:
            state = apply(state, record.event)
        states[stream.stream_id] = (state, stream.version)
    return states


async def rebuild_all(
    journal: Journal,
    aggregate_for: Callable[[str], Aggregate[Any] | None],
    *,
    until: int | datetime | None = None,
) -> dict[str, tuple[Any, int]]:
    """Rebuild every stream that has an aggregate, in one pass over the journal.

    ``aggregate_for(stream_id)`` returns the stream's aggregate, or None to skip the stream.
    Returns ``{stream_id: (state, version)}`` as of ``until`` (a position or a tz-aware time;
    None: the last position when the pass starts).

    Raises:
        ConfigurationError: ``until`` is invalid.
        EventDecodeError: a stored event cannot be decoded.
        JournalClosedError: the journal is closed.
    """
    position = await resolve_until(journal, until)
    if position is None:
        position = await journal.last_position()
    # stream_id -> [aggregate, state, version]; None marks a stream that is skipped.
    folds: dict[str, list[Any] | None] = {}
    async for batch in journal.read_all(until_position=position):
        for record in batch:
            stream_id = record.stream_id
            try:
                fold = folds[stream_id]
            except KeyError:
                aggregate = aggregate_for(stream_id)
                fold = None
                if aggregate is not None:
                    fold = [aggregate, aggregate.initial_state(stream_id), 0]
                folds[stream_id] = fold
            if fold is not None:
                fold[1] = fold[0].apply(fold[1], record.event)
                fold[2] = record.version
    return {stream_id: (fold[1], fold[2]) for stream_id, fold in folds.items() if fold is not None}
