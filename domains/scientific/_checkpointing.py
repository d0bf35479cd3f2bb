"""The checkpoint policy: how often a stage checkpoints.

Without measurements a stage checkpoints at the interval of its resilience level (default
low 120, medium 60, high 30, critical 15 minutes).  Once the checkpoint cost ``C`` (see
:func:`checkpoint_cost`) and the mean time between interruptions of a running
stage ``M`` (measured on this cluster, starting from ``expected_mtbf``) are known, it adapts to
Daly's optimum (Young's ``sqrt(2 C M)`` with Daly's higher-order terms), which minimises the
expected checkpoint overhead plus rework, within two bounds:

- never more often than ``C / max_overhead`` (so the overhead stays under its share, default
  2 %), and
- never less often than 4 x the level's interval (the level bounds the work a failure may
  cost: a critical stage loses at most an hour, a low one eight).

Expected waste per second of running (overhead plus lost work) for an interval ``T`` is
``C / T + (T / 2 + C) / M``: :func:`expected_waste` gives it, for figures and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._config import CheckpointSettings

__all__ = [
    "Cost",
    "Interval",
    "checkpoint_cost",
    "checkpoint_interval",
    "daly_interval",
    "expected_waste",
]

STRETCH = 4.0  # how far adaptation may stretch the level's interval


@dataclass(frozen=True)
class Interval:
    """A checkpoint interval in seconds and why."""

    seconds: float
    why: str


@dataclass(frozen=True)
class Cost:
    """A checkpoint's cost in seconds (None: unknown) and where it comes from."""

    seconds: float | None
    source: str


def _size(size: float) -> str:
    for unit, scale in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def checkpoint_cost(
    *, manifest_bytes: int, measured: float | None, configured_size: int, bandwidth: float
) -> Cost:
    """Return a stage's checkpoint cost: the first known of

    - the size of its latest verified checkpoint (by its manifest) over ``bandwidth``: what it
      writes now, which grows as a model does;
    - a ``checkpoint_seconds`` metric its simulation reported (``measured``);
    - the simulation's configured ``checkpoint_size`` over ``bandwidth``;

    else unknown (the resilience level's interval applies).
    """
    if manifest_bytes > 0:
        return Cost(
            manifest_bytes / bandwidth,
            f"{_size(manifest_bytes)} by its last checkpoint's manifest at {_size(bandwidth)}/s",
        )
    if measured is not None:
        return Cost(measured, "a reported checkpoint_seconds")
    if configured_size > 0:
        return Cost(
            configured_size / bandwidth,
            f"checkpoint_size {_size(configured_size)} at {_size(bandwidth)}/s",
        )
    return Cost(None, "unknown")


def daly_interval(cost: float, mtbf: float) -> float:
    """Return Daly's optimal checkpoint interval (seconds) for cost ``cost`` and mean time
    between interruptions ``mtbf`` (both seconds)."""
    if cost <= 0:
        return 0.0
    if cost >= 2 * mtbf:
        return mtbf
    ratio = cost / (2 * mtbf)
    return math.sqrt(2 * cost * mtbf) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - cost


def expected_waste(interval: float, cost: float, mtbf: float) -> float:
    """Return the expected share of running time lost to checkpoints and rework."""
    return cost / interval + (interval / 2 + cost) / mtbf


def checkpoint_interval(
    level: str, cost: float | None, mtbf: float, settings: CheckpointSettings
) -> Interval:
    """Return a stage's checkpoint interval (see the module docstring)."""
    base = settings.intervals.get(level, settings.intervals["medium"])
    if cost is None or cost <= 0 or not settings.adapt:
        return Interval(base, f"resilience {level}: every {base / 60:.0f} min")
    floor = cost / settings.max_overhead
    optimum = daly_interval(cost, mtbf)
    ceiling = max(STRETCH * base, floor)
    seconds = min(max(optimum, floor), ceiling)
    if seconds == floor and optimum < floor:
        why = (
            f"every {seconds / 60:.0f} min: a {cost:.0f} s checkpoint more often would cost more "
            f"than {settings.max_overhead:.0%}"
        )
    elif seconds == ceiling and optimum > ceiling:
        why = f"every {seconds / 60:.0f} min: at most {STRETCH:g}x the {level} level's interval"
    else:
        why = (
            f"every {seconds / 60:.0f} min: optimum for a {cost:.0f} s checkpoint and an "
            f"interruption every {mtbf / 86400:.1f} days"
        )
    return Interval(seconds, why)
