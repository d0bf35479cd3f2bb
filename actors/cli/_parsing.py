"""What operators type on the command line, parsed: times (``--at``), metadata assignments
(``--set KEY=VALUE``) and counters (``--counter NAME=N``); and durations as a clock shows them.

Each parser is pure and raises ``ConfigurationError`` naming the flag, so a table test covers
it and a mistake is one line before anything connects.
"""

from __future__ import annotations

import json
import re
import tomllib
from datetime import date, datetime, time, tzinfo
from typing import Any

from actors.engine import MAX_COUNTER, MAX_COUNTERS, MAX_LABEL_LENGTH
from runtime import ConfigurationError

__all__ = [
    "RelativeTime",
    "format_elapsed",
    "parse_assignment",
    "parse_counters",
    "parse_time",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_RELATIVE = re.compile(r"\+((?:\d+(?:\.\d+)?[smhdw])+)")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_MAX_AHEAD = 366 * 86_400.0  # a drain planned more than a year ahead is a typo
_COUNTER = re.compile(r"([A-Za-z0-9_.:-]+)=(\d+)")


class RelativeTime(float):
    """Seconds from now (``+2h``): the coordinator adds them to its own clock."""


def parse_time(text: str, *, where: str, local: tzinfo | None = None) -> datetime | RelativeTime:
    """Parse a point in time: ISO-8601 (``2025-03-14T18:00:00Z``, ``2025-03-14 18:00+01:00``;
    without an offset, in ``local`` time, the host's by default) or relative to now (``+2h``,
    ``+90m``, ``+1h30m``, ``+1d``).

    Raises:
        ConfigurationError: neither form, or a relative time of zero or more than a year.
    """
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative is not None:
        seconds = sum(
            float(number) * _UNITS[unit] for number, unit in _PART.findall(relative.group(1))
        )
        if not 0 < seconds <= _MAX_AHEAD:
            raise ConfigurationError(
                f"{text!r} must be later than now and at most 366 days ahead", where=where
            )
        return RelativeTime(seconds)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigurationError(
            f"expected an ISO-8601 time (2025-03-14T18:00:00Z) or a time from now (+2h, "
            f"+30m, +1h30m, +1d), got {text!r}",
            where=where,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=local) if local is not None else moment.astimezone()
    return moment


def parse_assignment(text: str, *, where: str = "--set") -> tuple[str, Any]:
    """Parse ``KEY=VALUE``: the value as JSON when it is JSON (``3``, ``true``, ``"x"``,
    ``[1, 2]``), else as a TOML date or time when it is one (``2025-03-14T18:00:00Z``: an ISO
    string, as a spec's metadata holds it), else as the plain string.

    Raises:
        ConfigurationError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigurationError(f"expected KEY=VALUE, got {text!r}", where=where)
    if len(key) > MAX_LABEL_LENGTH:
        raise ConfigurationError(
            f"a key has at most {MAX_LABEL_LENGTH} characters, got {len(key)}", where=where
        )
    try:
        return key, json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        pass
    moment = _toml_datetime(raw.strip())
    if moment is not None:
        return key, moment
    return key, raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: not portable JSON


def _toml_datetime(text: str) -> str | None:
    """Return a TOML date, time or date-time as the ISO text a spec's metadata stores."""
    if not text or not text[0].isdigit():
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return None
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date | time):
        return value.isoformat()
    return None


def parse_counters(items: list[str], *, where: str = "--counter") -> dict[str, int]:
    """Parse repeated ``NAME=N`` counters (licences: ``nuke=10``).

    Raises:
        ConfigurationError: not NAME=N, a name given twice, a count above the maximum, or
            too many counters.
    """
    counters: dict[str, int] = {}
    for item in items:
        match = _COUNTER.fullmatch(item.strip())
        if match is None:
            raise ConfigurationError(
                f"expected NAME=N (a name of letters, digits and _.:- and a whole number), "
                f"got {item!r}",
                where=where,
            )
        name, count = match.group(1), int(match.group(2))
        if len(name) > MAX_LABEL_LENGTH:
            raise ConfigurationError(
                f"a counter name has at most {MAX_LABEL_LENGTH} characters", where=where
            )
        if name in counters:
            raise ConfigurationError(f"counter {name!r} is given twice", where=where)
        if count > MAX_COUNTER:
            raise ConfigurationError(
                f"{name}={count} is more than the maximum of {MAX_COUNTER:,}", where=where
            )
        counters[name] = count
    if len(counters) > MAX_COUNTERS:
        raise ConfigurationError(
            f"at most {MAX_COUNTERS} counters, got {len(counters)}", where=where
        )
    return counters


def format_elapsed(seconds: float) -> str:
    """Format a duration as a clock does: ``0:41``, ``12:05``, ``1:02:03``, ``3d 4:05:06``."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes}:{secs:02d}"
    return f"{days}d {clock}" if days else clock
