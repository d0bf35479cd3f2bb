"""The event journal: codec, in-memory and SQLite journals, snapshots and replay."""

from ._codec import EncodedEvent, Event, EventCodec, UndecodedEvent, Upcaster, default_codec
from ._errors import (
    EventDecodeError,
    EventEncodeError,
    JournalClosedError,
    JournalError,
    JournalFileError,
    VersionConflictError,
)
from ._event_sourced import EventSourcedActor
from ._journal import AppendResult, Journal, RecordedEvent, StreamInfo
from ._memory import InMemoryJournal
from ._replay import Aggregate, rebuild_all, rebuild_stream
from ._sqlite import (
    SCHEMA_VERSION,
    JournalDescription,
    JournalStatistics,
    SQLiteJournal,
    open_sqlite_journal,
)

__all__ = [
    "SCHEMA_VERSION",
    "Aggregate",
    "AppendResult",
    "EncodedEvent",
    "Event",
    "EventCodec",
    "EventDecodeError",
    "EventEncodeError",
    "EventSourcedActor",
    "InMemoryJournal",
    "Journal",
    "JournalClosedError",
    "JournalDescription",
    "JournalError",
    "JournalFileError",
    "JournalStatistics",
    "RecordedEvent",
    "SQLiteJournal",
    "StreamInfo",
    "UndecodedEvent",
    "Upcaster",
    "VersionConflictError",
    "default_codec",
    "open_sqlite_journal",
    "rebuild_all",
    "rebuild_stream",
]
