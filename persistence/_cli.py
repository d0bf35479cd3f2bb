"""``taskfarm journal inspect|check|salvage`` and ``taskfarm replay``: journal files from the
shell.

Every command here opens its journal read-only and writes nothing beside it (``salvage``
writes only its ``--out`` file).  Output that goes into a closed pipe (``taskfarm replay DB |
head``) ends the command quietly with status 141, as ``SIGPIPE`` ends ``cat`` or ``grep``.

The CLI knows no domain.  Event classes come from the ``taskfarm.events`` entry-point group:
each entry names a module whose import registers its events into
:data:`persistence.default_codec` (or names an :class:`EventCodec` object, which is merged).
Aggregates come from the ``taskfarm.aggregates`` group: the entry's name is a stream category
(the stream id's prefix before the first ``:``) and its value an ``Aggregate`` (or a class
building one).  Streams without an aggregate get a generic summary, and events that cannot be
decoded (unknown tag, missing upcaster) are shown raw instead of stopping the replay.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import msgspec

from runtime import ConfigurationError, SystemClock

from ._codec import EventCodec, UndecodedEvent, default_codec
from ._journal import RecordedEvent
from ._sqlite import JournalDescription, SQLiteJournal, open_sqlite_journal
from ._sqlite_tools import (
    JournalCheck,
    SalvageReport,
    check_sqlite_journal,
    salvage_sqlite_journal,
)

__all__ = [
    "check_journal",
    "configure_journal",
    "configure_replay",
    "inspect_journal",
    "replay_journal",
    "salvage_journal",
]

EVENTS_GROUP = "taskfarm.events"
AGGREGATES_GROUP = "taskfarm.aggregates"
# Undecodable events printed in text mode (--json lists every one).
_RAW_SHOWN = 20
# The exit status of a command whose output pipe was closed (128 + SIGPIPE, as a shell
# reports a process that SIGPIPE ended).
CLOSED_PIPE = 141


def configure_journal(parser: argparse.ArgumentParser) -> None:
    """Add ``journal``'s actions (``inspect``, ``check``, ``salvage``) and their arguments."""
    actions = parser.add_subparsers(dest="journal_action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect",
        help="show a journal's size, schema, positions, streams and snapshots",
        description="Show a journal's size, schema, positions, streams and snapshots.",
    )
    inspect.add_argument("db", metavar="DB", help="the journal file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(handler=inspect_journal)
    check = actions.add_parser(
        "check",
        help="verify a journal: SQLite's integrity check and every event's checksum",
        description="Verify a journal read-only: SQLite's integrity check, then every event's "
        "position, version and checksum, and every snapshot's checksum.  Exit status: 0 sound, "
        "1 damaged (the first bad position is reported), 2 not a journal or bad arguments.",
    )
    check.add_argument("db", metavar="DB", help="the journal file")
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(handler=check_journal)
    salvage = actions.add_parser(
        "salvage",
        help="copy a damaged journal's events up to its last good position into a new journal",
        description="Copy the events of DB up to its last good position (and its sound "
        "snapshots within them) into a new journal NEW; DB is only read.",
    )
    salvage.add_argument("db", metavar="DB", help="the damaged journal file")
    salvage.add_argument("--out", metavar="NEW", required=True, help="the new journal (created)")
    salvage.add_argument("--json", action="store_true", help="print JSON instead of text")
    salvage.set_defaults(handler=salvage_journal)


def configure_replay(parser: argparse.ArgumentParser) -> None:
    """Add ``replay``'s arguments."""
    parser.add_argument("db", metavar="DB", help="the journal file")
    parser.add_argument("--stream", metavar="ID", help="replay only this stream")
    parser.add_argument(
        "--until",
        metavar="POSITION|ISO-TIME",
        help="replay up to this global position, or this time (with a UTC offset or Z)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(handler=replay_journal)


# -- plugins ------------------------------------------------------------------------------------


def _entry_points(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda ep: ep.name)


def load_codec(notes: list[str]) -> EventCodec:
    """Build a lenient codec from the ``taskfarm.events`` plugins (problems go to ``notes``)."""
    codec = EventCodec(keep_undecodable=True)
    for entry in _entry_points(EVENTS_GROUP):
        try:
            loaded = entry.load()
            if isinstance(loaded, EventCodec):
                codec.update(loaded)
        except Exception as error:
            notes.append(f"events plugin {entry.name!r} ({entry.value}) failed to load: {error}")
    codec.update(default_codec)
    return codec


def load_aggregates(notes: list[str]) -> dict[str, Any]:
    """Return ``category -> aggregate`` from the ``taskfarm.aggregates`` plugins."""
    aggregates: dict[str, Any] = {}
    for entry in _entry_points(AGGREGATES_GROUP):
        try:
            loaded = entry.load()
            aggregate = loaded() if isinstance(loaded, type) else loaded
            for member in ("state_type", "schema_version", "initial_state", "apply"):
                if not hasattr(aggregate, member):
                    raise TypeError(f"it has no {member!r}, so it is not an Aggregate")
        except Exception as error:
            notes.append(f"aggregate plugin {entry.name!r} ({entry.value}) failed to load: {error}")
            continue
        aggregates[entry.name] = aggregate
    return aggregates


def category(stream_id: str) -> str:
    """Return a stream's category: its id's prefix before the first ``:``."""
    return stream_id.split(":", 1)[0]


# -- arguments ----------------------------------------------------------------------------------


def parse_until(text: str | None) -> int | datetime | None:
    """Parse ``--until``: a global position (digits) or an ISO time with a UTC offset.

    Raises:
        ConfigurationError: it is neither, or the time is naive.
    """
    if text is None:
        return None
    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    try:
        when = datetime.fromisoformat(stripped)
    except ValueError:
        raise ConfigurationError(
            f"{text!r} is neither a position (a whole number >= 0) nor an ISO time "
            "such as 2026-01-01T12:00:00Z",
            where="--until",
        ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ConfigurationError(
            f"{text!r} has no timezone; add Z or an offset such as +00:00", where="--until"
        )
    return when


def _journal_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise ConfigurationError(f"no such journal file: {path}", where="DB")
    if not path.is_file():
        raise ConfigurationError(f"not a file: {path}", where="DB")
    return path


def _time(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


def _emit(lines: list[str]) -> int:
    """Print ``lines`` to stdout; return 0, or ``CLOSED_PIPE`` if the reader went away."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Nothing more can be said on stdout, and the interpreter's last flush at exit would
        # fail again and print a complaint: point stdout at /dev/null for that flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return CLOSED_PIPE
    return 0


# -- journal inspect ----------------------------------------------------------------------------


async def inspect_journal(args: argparse.Namespace) -> int:
    """Print what a journal file holds.

    Raises:
        ConfigurationError: ``DB`` does not exist.
        JournalFileError: the file is not a usable journal.
    """
    path = _journal_path(args.db)
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=EventCodec(), read_only=True
    ) as journal:
        description = await journal.describe()
    if args.json:
        return _emit([msgspec.json.encode(description).decode()])
    return _emit([_format_description(description)])


def _format_description(d: JournalDescription) -> str:
    lines = [
        f"file            {d.path}",
        f"size            {d.size_bytes:,} bytes (+ {d.wal_bytes:,} bytes of WAL)",
        f"schema version  {d.schema_version}",
        f"events          {d.event_count:,} (last position {d.last_position:,})",
        f"snapshots       {d.snapshot_count:,}",
        f"time range      {_time(d.first_timestamp)} .. {_time(d.last_timestamp)}",
        f"streams         {len(d.streams):,}",
    ]
    if d.streams:
        header = ("STREAM", "VERSION", "EVENTS", "FIRST", "LAST")
        rows = [
            (
                s.stream_id,
                str(s.version),
                str(s.event_count),
                str(s.first_position),
                str(s.last_position),
            )
            for s in d.streams
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  " + "  ".join(cells))
    return "\n".join(lines)


# -- replay -------------------------------------------------------------------------------------


class _Summary:
    """The generic view of a stream that has no aggregate."""

    __slots__ = ("first", "last", "tags", "version")

    def __init__(self) -> None:
        self.version = 0
        self.tags: Counter[str] = Counter()
        self.first: datetime | None = None
        self.last: datetime | None = None

    def add(self, record: RecordedEvent) -> None:
        self.version = record.version
        self.tags[record.tag] += 1
        if self.first is None:
            self.first = record.timestamp
        self.last = record.timestamp


class _Fold:
    """An aggregate's state for one stream, and whether applying an event failed."""

    __slots__ = ("aggregate", "error", "name", "skipped", "state", "version")

    def __init__(self, name: str, aggregate: Any, stream_id: str) -> None:
        self.name = name
        self.aggregate = aggregate
        self.state = aggregate.initial_state(stream_id)
        self.version = 0
        self.skipped = 0
        self.error: str | None = None

    def add(self, record: RecordedEvent) -> None:
        self.version = record.version
        if isinstance(record.event, UndecodedEvent):
            self.skipped += 1
        elif self.error is None:
            try:
                self.state = self.aggregate.apply(self.state, record.event)
            except Exception as error:
                self.error = f"apply failed at position {record.position}: {error!r}"


class _Replay:
    def __init__(self, aggregates: dict[str, Any]) -> None:
        self.aggregates = aggregates
        self.streams: dict[str, _Fold | _Summary] = {}
        self.undecoded: list[RecordedEvent] = []
        self.count = 0

    def add(self, record: RecordedEvent) -> None:
        self.count += 1
        stream = self.streams.get(record.stream_id)
        if stream is None:
            name = category(record.stream_id)
            aggregate = self.aggregates.get(name)
            stream = self.streams[record.stream_id] = (
                _Summary() if aggregate is None else _Fold(name, aggregate, record.stream_id)
            )
        stream.add(record)
        if isinstance(record.event, UndecodedEvent):
            self.undecoded.append(record)


async def replay_journal(args: argparse.Namespace) -> int:
    """Rebuild state from a journal as of ``--until`` and print it.

    Raises:
        ConfigurationError: ``DB`` does not exist, ``--until`` is invalid, or ``--stream``
            names no stream.
        JournalFileError: the file is not a usable journal.
    """
    until = parse_until(args.until)
    path = _journal_path(args.db)
    notes: list[str] = []
    codec = load_codec(notes)
    aggregates = load_aggregates(notes)
    replay = _Replay(aggregates)
    async with open_sqlite_journal(path, clock=SystemClock(), codec=codec, read_only=True) as j:
        position = await _until_position(j, until)
        if args.stream is not None:
            if await j.stream_version(args.stream) == 0:
                raise ConfigurationError(f"no stream {args.stream!r} in {path}", where="--stream")
            for record in await j.read_stream(args.stream, until_position=position):
                replay.add(record)
        else:
            async for batch in j.read_all(until_position=position):
                for record in batch:
                    replay.add(record)
    report = _report(path, until, position, replay, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        return _emit([msgspec.json.encode(report).decode()])
    lines: list[str] = []
    _print_report(report, lines.append)
    return _emit(lines)


async def _until_position(journal: SQLiteJournal, until: int | datetime | None) -> int:
    if until is None:
        return await journal.last_position()
    if isinstance(until, datetime):
        return await journal.position_at(until)
    return until


def _report(
    path: Path,
    until: int | datetime | None,
    position: int,
    replay: _Replay,
    notes: list[str],
) -> dict[str, Any]:
    streams: dict[str, Any] = {}
    for stream_id, stream in sorted(replay.streams.items()):
        if isinstance(stream, _Fold):
            streams[stream_id] = {
                "version": stream.version,
                "aggregate": stream.name,
                "state": msgspec.to_builtins(stream.state),
                "skipped_undecodable": stream.skipped,
                "error": stream.error,
            }
        else:
            streams[stream_id] = {
                "version": stream.version,
                "aggregate": None,
                "events_by_tag": dict(sorted(stream.tags.items())),
                "first_timestamp": _time(stream.first),
                "last_timestamp": _time(stream.last),
            }
    undecoded = []
    for record in replay.undecoded:
        assert isinstance(record.event, UndecodedEvent)
        try:
            payload: Any = msgspec.json.decode(record.event.payload)
        except msgspec.DecodeError:
            payload = record.event.payload
        undecoded.append(
            {
                "position": record.position,
                "stream_id": record.stream_id,
                "version": record.version,
                "tag": record.tag,
                "schema_version": record.schema_version,
                "reason": record.event.reason,
                "payload": payload,
            }
        )
    return {
        "journal": str(path),
        "until": None
        if until is None
        else (until if isinstance(until, int) else until.isoformat()),
        "position": position,
        "events_replayed": replay.count,
        "streams": streams,
        "undecoded": undecoded,
        "notes": notes,
    }


def _print_report(report: dict[str, Any], out: Callable[[str], None]) -> None:
    scope = "" if report["until"] is None else f" (until {report['until']})"
    out(
        f"journal {report['journal']}: replayed {report['events_replayed']:,} events "
        f"up to position {report['position']:,}{scope}"
    )
    for stream_id, stream in report["streams"].items():
        if stream["aggregate"] is not None:
            out(f"{stream_id}  version {stream['version']}  [aggregate {stream['aggregate']}]")
            out(f"  state: {msgspec.json.encode(stream['state']).decode()}")
            if stream["skipped_undecodable"]:
                out(f"  note: {stream['skipped_undecodable']} undecodable events not applied")
            if stream["error"]:
                out(f"  error: {stream['error']}")
        else:
            out(f"{stream_id}  version {stream['version']}  [no aggregate: summary]")
            tags = ", ".join(f"{tag} x{count}" for tag, count in stream["events_by_tag"].items())
            out(f"  events: {tags}")
            out(f"  first {stream['first_timestamp']}, last {stream['last_timestamp']}")
    if report["undecoded"]:
        out(f"{len(report['undecoded'])} events could not be decoded; shown raw:")
        for item in report["undecoded"][:_RAW_SHOWN]:
            out(
                f"  position {item['position']}  {item['stream_id']} v{item['version']}  "
                f"tag {item['tag']} (schema {item['schema_version']}): {item['reason']}"
            )
            out(f"    {msgspec.json.encode(item['payload']).decode()}")
        if len(report["undecoded"]) > _RAW_SHOWN:
            out(f"  ... and {len(report['undecoded']) - _RAW_SHOWN} more (--json lists them all)")


# -- journal check and salvage ------------------------------------------------------------------


def _bad(first_bad: Any) -> str:
    stream = "" if first_bad.stream_id is None else f" (stream {first_bad.stream_id!r})"
    return f"position {first_bad.position:,}{stream}: {first_bad.reason}"


def _format_check(check: JournalCheck) -> list[str]:
    lines = [f"journal {check.path}: {'ok' if check.ok else 'DAMAGED'}"]
    if check.problem is not None:
        lines.append(f"file        {check.problem}")
    if check.first_bad is None:
        events = f"{check.good_events:,} checked, every position, version and checksum is sound"
    else:
        events = (
            f"{check.good_events:,} sound (positions 1-{check.last_good_position:,}); "
            f"first bad {_bad(check.first_bad)}"
        )
        if check.stored_events is not None:
            events += f" ({check.stored_events:,} stored in all)"
    lines.append(f"events      {events}")
    if check.bad_snapshots:
        lines.append(
            f"snapshots   {check.snapshots:,}, damaged: {', '.join(check.bad_snapshots)} "
            "(caches: replay does without them)"
        )
    else:
        lines.append(f"snapshots   {check.snapshots:,}, all sound")
    lines.append(f"sqlite      integrity_check: {'; '.join(check.integrity) or '-'}")
    if not check.ok:
        lines.append(
            f"recover     taskfarm journal salvage {check.path} --out NEW "
            f"(keeps positions 1-{check.last_good_position:,})"
        )
    return lines


def _verdict(check: JournalCheck) -> str:
    if check.problem is not None:
        where = check.problem
    elif check.first_bad is not None:
        where = f"first bad {_bad(check.first_bad)}"
    elif check.integrity != ["ok"]:
        where = f"SQLite's integrity check fails: {check.integrity[0]}"
    else:
        where = f"damaged snapshots: {', '.join(check.bad_snapshots)}"
    return (
        f"taskfarm: journal {check.path} is damaged ({where}); recover with "
        f"`taskfarm journal salvage {check.path} --out NEW`"
    )


async def check_journal(args: argparse.Namespace) -> int:
    """Verify a journal file; exit 0 when sound, 1 when damaged.

    Raises:
        ConfigurationError: ``DB`` does not exist.
        JournalFileError: the file is not a taskfarm journal.
    """
    path = _journal_path(args.db)
    check = await check_sqlite_journal(path)
    if not check.ok:
        print(_verdict(check), file=sys.stderr)
    if args.json:
        status = _emit(
            [msgspec.json.encode({**msgspec.to_builtins(check), "ok": check.ok}).decode()]
        )
    else:
        status = _emit(_format_check(check))
    return status or (0 if check.ok else 1)


async def salvage_journal(args: argparse.Namespace) -> int:
    """Copy a journal's events up to its last good position into a new journal.

    Raises:
        ConfigurationError: ``DB`` does not exist.
        JournalFileError: ``DB`` is not a readable taskfarm journal, or ``--out`` exists.
    """
    path = _journal_path(args.db)
    report = await salvage_sqlite_journal(path, out=args.out)
    if args.json:
        return _emit([msgspec.json.encode(report).decode()])
    return _emit(_format_salvage(report))


def _format_salvage(report: SalvageReport) -> list[str]:
    lines = [
        f"salvaged {report.events:,} events (positions 1-{report.last_good_position:,}) and "
        f"{report.snapshots:,} snapshots from {report.source} into {report.out}"
    ]
    if report.first_bad is None:
        lines.append("nothing was left out: the source is sound")
    else:
        dropped = ""
        if report.stored_events is not None:
            dropped = f" ({report.stored_events - report.events:,} stored events left out)"
        lines.append(f"stopped at {_bad(report.first_bad)}{dropped}")
    return lines
