"""The journal's errors: one root under ``TaskfarmError`` and a few precise leaves."""

from __future__ import annotations

from pathlib import Path

from runtime import TaskfarmError

__all__ = [
    "EventChecksumError",
    "EventDecodeError",
    "EventEncodeError",
    "JournalClosedError",
    "JournalError",
    "JournalFileError",
    "VersionConflictError",
]


class JournalError(TaskfarmError):
    """Raised when the journal cannot do what was asked (the root of the journal's errors)."""


class JournalFileError(JournalError):
    """Raised when a journal file cannot be used; ``path`` names it, ``problem`` says why.

    The file is never modified when this is raised at open.
    """

    def __init__(self, *, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"journal file {self.path}: {problem}")


class EventChecksumError(JournalFileError):
    """Raised when a stored event fails its checksum (the row was damaged after it was
    written); ``position`` and ``stream_id`` name it as stored.

    Nothing at or after ``position`` can be trusted to be what was written;
    ``taskfarm journal salvage`` copies the events before it into a new journal.
    """

    def __init__(self, *, path: str | Path, position: int, stream_id: str, reason: str) -> None:
        self.position = position
        self.stream_id = stream_id
        self.reason = reason
        super().__init__(
            path=path,
            problem=f"the event at position {position} (stream {stream_id!r}) is damaged: "
            f"{reason}; `taskfarm journal check {path}` shows the damage, and "
            f"`taskfarm journal salvage {path} --out NEW` keeps the events before it",
        )


class VersionConflictError(JournalError):
    """Raised when an append's ``expected_version`` is not the stream's current version."""

    def __init__(self, *, stream_id: str, expected: int, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, but the stream is at {actual}"
        )


class EventDecodeError(JournalError):
    """Raised when a stored event cannot be decoded; names its ``position`` and ``tag``."""

    def __init__(self, *, position: int, tag: str, reason: str) -> None:
        self.position = position
        self.tag = tag
        self.reason = reason
        super().__init__(f"cannot decode event at position {position} (tag {tag!r}): {reason}")


class EventEncodeError(JournalError):
    """Raised when an event cannot be encoded: its class is not registered, or a value is not
    serializable; ``event_type`` names the class."""

    def __init__(self, *, event_type: str, reason: str) -> None:
        self.event_type = event_type
        self.reason = reason
        super().__init__(f"cannot encode {event_type}: {reason}")


class JournalClosedError(JournalError):
    """Raised when a journal is used after ``aclose()`` (or its writer has stopped)."""
