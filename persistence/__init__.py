"""The event journal: codec, in-memory and SQLite journals, snapshots and replay."""

from ._codec import EncodedEvent, Event, EventCodec, UndecodedEvent, Upcaster, default_codec
from ._errors import (
    EventChecksumError,
    EventDecodeError,
    EventEncodeError,
    JournalClosedError,
    JournalError,
    JournalFileError,
    VersionConflictError,
)
from ._event_sourced import EventSourcedActor
from ._journal import (
    AppendResult,
    Journal,
    LoadedStream,
    RecordedEvent,
    StreamAppend,
    StreamInfo,
)
from ._memory import InMemoryJournal
from ._replay import Aggregate, rebuild_all, rebuild_stream, rebuild_streams
from ._sqlite import (
    SCHEMA_VERSION,
    JournalDescription,
    JournalStatistics,
    SQLiteJournal,
    open_sqlite_journal,
)
from ._sqlite_tools import (
    BadEvent,
    JournalCheck,
    SalvageReport,
    check_sqlite_journal,
    salvage_sqlite_journal,
)
from ._subscription import Subscription
from ._usage_store import UsageRow, UsageStore, open_usage_store

__all__ = [
    "SCHEMA_VERSION",
    "Aggregate",
    "AppendResult",
    "BadEvent",
    "EncodedEvent",
    "Event",
    "EventChecksumError",
    "EventCodec",
    "EventDecodeError",
    "EventEncodeError",
    "EventSourcedActor",
    "InMemoryJournal",
    "Journal",
    "JournalCheck",
    "JournalClosedError",
    "JournalDescription",
    "JournalError",
    "JournalFileError",
    "JournalStatistics",
    "LoadedStream",
    "RecordedEvent",
    "SQLiteJournal",
    "SalvageReport",
    "StreamAppend",
    "StreamInfo",
    "Subscription",
    "UndecodedEvent",
    "Upcaster",
    "UsageRow",
    "UsageStore",
    "VersionConflictError",
    "check_sqlite_journal",
    "default_codec",
    "open_sqlite_journal",
    "open_usage_store",
    "rebuild_all",
    "rebuild_stream",
    "rebuild_streams",
    "salvage_sqlite_journal",
]
