"""Deadline-driven priority: pure functions of a job's state and the clock.

The effective priority is computed from scratch every cycle from the base priority the user set
(never overwritten), the time T left to the deadline, the remaining work R and the margin M:

- one level up when R + M >= T (the job is at risk);
- otherwise medium and low jobs one level up when T < 24 h, and low jobs when T < 48 h.

R is the larger of the remaining frames' work spread over the width the job can get (nodes that
fit it, its client's share, its remaining chunks) and its longest remaining chunk.  A boost
never goes above ``high``: ``critical`` is an operator's word, and it is what lets a job preempt
anything.  Because nothing is carried from one cycle to the next, a job whose deadline moves out
drops back, and five cycles give the same answer as one.

Jobs are ordered by effective priority, then earliest deadline (none last), then submission
time, then id.  Priority inheritance runs both ways without contagion between siblings: a job
inherits its ancestors' levels (``down``), and a job that dependants are blocked on takes their
level (``up``), so a high job never waits behind the low job it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from actors import Priority

from ._events import Verdict

__all__ = [
    "FAR_FUTURE",
    "Level",
    "deadline_level",
    "format_seconds",
    "inherited_levels",
    "order_key",
    "remaining_seconds",
    "verdict",
]

FAR_FUTURE: Final = datetime.max.replace(tzinfo=UTC)
_DAY: Final = 86400.0
_CEILING: Final = Priority.HIGH  # the highest level a deadline can lift a job to
_BY_RANK: Final = {p.rank: p for p in Priority}


@dataclass(frozen=True, slots=True)
class Level:
    """A job's effective priority this cycle and why."""

    priority: Priority
    reason: str
    at_risk: bool = False


def remaining_seconds(work_s: float, width: int, longest_s: float) -> float:
    """Return R: the remaining work spread over ``width`` nodes, but at least the longest
    remaining chunk (a chunk cannot be split)."""
    return max(work_s / max(1, width), longest_s) if work_s > 0 else 0.0


def _up(priority: Priority) -> Priority:
    if priority.rank >= _CEILING.rank:
        return priority
    return _BY_RANK[priority.rank + 1]


def deadline_level(
    base: Priority,
    deadline: datetime | None,
    now: datetime,
    remaining_s: float,
    margin_s: float,
) -> Level:
    """Return the deadline rule's level for a job with base priority ``base``."""
    if deadline is None:
        return Level(base, f"{base.value} (no deadline)")
    left = (deadline - now).total_seconds()
    if remaining_s + margin_s >= left:
        raised = _up(base)
        return Level(
            raised,
            f"{raised.value}: at risk, remaining {format_seconds(remaining_s)} + margin "
            f"{format_seconds(margin_s)} >= {format_seconds(left)} to the deadline",
            at_risk=True,
        )
    if left < _DAY and base in (Priority.LOW, Priority.MEDIUM):
        raised = _up(base)
        return Level(raised, f"{raised.value}: deadline in {format_seconds(left)} (< 24 h)")
    if left < 2 * _DAY and base is Priority.LOW:
        raised = _up(base)
        return Level(raised, f"{raised.value}: deadline in {format_seconds(left)} (< 48 h)")
    return Level(base, f"{base.value}: deadline in {format_seconds(left)}, on track")


def verdict(
    deadline: datetime | None, now: datetime, remaining_s: float, margin_s: float
) -> Verdict:
    """Return the rule's verdict: will miss when R alone reaches the deadline, at risk when
    R + M does, else on track."""
    if deadline is None:
        return "on track"
    left = (deadline - now).total_seconds()
    if remaining_s >= left:
        return "will miss"
    if remaining_s + margin_s >= left:
        return "at risk"
    return "on track"


def order_key(
    priority: Priority, deadline: datetime | None, submitted_at: datetime, job_id: str
) -> tuple[int, datetime, datetime, str]:
    """Return the sort key: effective priority (by rank), earliest deadline first (none last),
    earliest submission, then id."""
    return (-priority.rank, deadline or FAR_FUTURE, submitted_at, job_id)


def inherited_levels(
    own: Mapping[str, Level],
    parents: Callable[[str], Iterable[str]],
    blocked_children: Callable[[str], Iterable[str]],
) -> dict[str, Level]:
    """Return every job's effective level with inheritance both ways.

    ``down(j)`` is the highest of its own level and its live ancestors' ``down``; ``up(j)`` the
    highest of its own level and the ``up`` of the live dependants blocked on it.  The result is
    the higher of the two, with the reason naming the job it came from.
    """

    def walk(
        neighbours: Callable[[str], Iterable[str]], because: Callable[[str, Level], str]
    ) -> Callable[[str], Level]:
        """The highest of a job's own level and its neighbours' (transitively, no cycles)."""
        cache: dict[str, Level] = {}

        def level_of(job: str, trail: frozenset[str] = frozenset()) -> Level:
            cached = cache.get(job)
            if cached is not None:
                return cached
            best = own[job]
            for other in neighbours(job):
                if other not in own or other in trail:
                    continue
                theirs = level_of(other, trail | {job})
                if theirs.priority.rank > best.priority.rank:
                    best = Level(theirs.priority, because(other, theirs), at_risk=own[job].at_risk)
            cache[job] = best
            return best

        return level_of

    down_of = walk(
        parents,
        lambda parent, theirs: (
            f"{theirs.priority.value}: inherited from {parent} ({theirs.reason})"
        ),
    )
    up_of = walk(
        blocked_children,
        lambda child, theirs: f"{theirs.priority.value}: {child} waits on it ({theirs.reason})",
    )

    result: dict[str, Level] = {}
    for job in own:
        a, b = down_of(job), up_of(job)
        result[job] = b if b.priority.rank > a.priority.rank else a
    return result


def format_seconds(seconds: float) -> str:
    """Return a short duration: ``45s``, ``12m``, ``3h05m``, ``2d04h`` (negative: ``-1h10m``)."""
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 60:
        return f"{sign}{s:.0f}s"
    if s < 3600:
        return f"{sign}{s / 60:.0f}m"
    if s < _DAY:
        hours, rest = divmod(int(s), 3600)
        return f"{sign}{hours}h{rest // 60:02d}m"
    days, rest = divmod(int(s), 86400)
    return f"{sign}{days}d{rest // 3600:02d}h"
