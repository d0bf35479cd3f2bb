"""Argument checks and time handling shared by the journal implementations."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtime import Clock, ConfigurationError, get_logger

from ._codec import Event
from ._errors import JournalError

if TYPE_CHECKING:
    from ._journal import StreamAppend

__all__ = [
    "check_after",
    "check_append",
    "check_append_many",
    "check_batch_size",
    "check_until",
    "format_timestamp",
    "log",
    "next_timestamp",
    "utc",
]


def log() -> Any:
    """Return the journal's logger (looked up at each use, so it follows reconfiguration)."""
    return get_logger("persistence")


def check_append(stream_id: str, events: Sequence[Event], expected_version: int | None) -> None:
    """Validate an append's arguments.

    Raises:
        JournalError: the stream id is empty, there are no events, or the expected version is
            negative.
    """
    if not isinstance(stream_id, str) or not stream_id:
        raise JournalError(f"stream_id must be a non-empty string, got {stream_id!r}")
    if not events:
        raise JournalError(f"append to {stream_id!r} needs at least one event")
    if expected_version is not None and (
        isinstance(expected_version, bool)
        or not isinstance(expected_version, int)
        or expected_version < 0
    ):
        raise JournalError(
            f"expected_version must be None or an int >= 0, got {expected_version!r}"
        )


def check_append_many(appends: Sequence[StreamAppend]) -> None:
    """Validate an ``append_many``'s arguments.

    Raises:
        JournalError: there are no appends, a stream appears twice, or an entry is invalid
            (see :func:`check_append`).
    """
    if not appends:
        raise JournalError("append_many needs at least one stream")
    seen: set[str] = set()
    for part in appends:
        check_append(part.stream_id, part.events, part.expected_version)
        if part.stream_id in seen:
            raise JournalError(
                f"append_many names stream {part.stream_id!r} twice (give it one entry with "
                "all its events)"
            )
        seen.add(part.stream_id)


def check_after(name: str, value: int) -> None:
    """Validate an ``after_*`` bound (an int >= 0).

    Raises:
        JournalError: it is not.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JournalError(f"{name} must be an int >= 0, got {value!r}")


def check_until(value: int | None) -> None:
    """Validate an ``until_position`` bound (None or an int >= 0).

    Raises:
        JournalError: it is not.
    """
    if value is not None:
        check_after("until_position", value)


def check_batch_size(value: int) -> None:
    """Validate a ``batch_size`` (an int >= 1).

    Raises:
        JournalError: it is not.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JournalError(f"batch_size must be an int >= 1, got {value!r}")


def utc(timestamp: datetime, *, where: str) -> datetime:
    """Return ``timestamp`` in UTC.

    Raises:
        ConfigurationError: it is naive.
    """
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise ConfigurationError(
            f"timestamp {timestamp.isoformat()} has no timezone (use a tz-aware datetime)",
            where=where,
        )
    return timestamp.astimezone(UTC)


def next_timestamp(clock: Clock, previous: datetime | None) -> datetime:
    """Return the clock's time in UTC, never earlier than ``previous``.

    Timestamps never decrease with position, so "as of a time" is "as of a position".

    Raises:
        ConfigurationError: the clock returned a naive datetime.
    """
    now = utc(clock.now(), where="Clock.now()")
    if previous is not None and now < previous:
        return previous
    return now


def format_timestamp(timestamp: datetime) -> str:
    """Format a UTC timestamp with fixed width, so text order is time order."""
    return timestamp.isoformat(timespec="microseconds")
