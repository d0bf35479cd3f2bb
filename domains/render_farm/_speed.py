"""Learned speed: a projection of the journal's finished frames, per node and job type.

Each finished full-quality task gives one sample: its measured seconds per frame divided by the
job's prior estimate per frame (so jobs of different complexity compare).  An exponential moving
average of that ratio is kept per (node, job type) and per job type; a class's figure is the
sample-weighted mean of its nodes'.
The factor placement uses is around 1.0: the farm's ratio for the type over the node's (a node
measured faster than its class scores higher, slower lower), and nothing known is exactly 1.0.

The table is rebuilt on restart from the journal's history (``Policy.recover``) and fed in
journal order (``Policy.observe``), so it is never a second truth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["ALPHA", "SpeedTable"]

ALPHA: Final = 0.3  # weight of the newest sample
_CLAMP: Final = (0.25, 4.0)


@dataclass(slots=True)
class _Average:
    value: float = 0.0
    samples: int = 0

    def add(self, sample: float) -> None:
        self.value = sample if not self.samples else (1 - ALPHA) * self.value + ALPHA * sample
        self.samples += 1


@dataclass(slots=True)
class SpeedTable:
    """Moving averages of measured/estimated frame time, per node and job type and per job
    type; a class's figure is the sample-weighted mean of its nodes' (so a node's class may be
    learned after its samples, as on a restart, where the history comes before the nodes)."""

    nodes: dict[tuple[str, str], _Average] = field(default_factory=dict)
    types: dict[str, _Average] = field(default_factory=dict)
    version: int = 0  # bumped by every sample (placement caches its factors by it)
    # (id of the members, job type) -> (version, the members, ratio): placement asks for the
    # same class many times between two samples.
    _class_cache: dict[tuple[int, str], tuple[int, object, float | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def add(self, node: str, job_type: str, ratio: float) -> None:
        """Record one sample: seconds per frame measured on ``node`` over the prior estimate."""
        if not ratio > 0 or ratio != ratio or ratio == float("inf"):
            return
        ratio = min(max(ratio, 1e-3), 1e3)
        self.nodes.setdefault((node, job_type), _Average()).add(ratio)
        self.types.setdefault(job_type, _Average()).add(ratio)
        self.version += 1

    def class_ratio(self, members: Iterable[str], job_type: str) -> float | None:
        """Return the class's measured/estimated ratio for the type: its nodes' averages
        weighted by their samples (None: none of them measured it)."""
        key = (id(members), job_type)
        cached = self._class_cache.get(key)
        if cached is not None and cached[0] == self.version and cached[1] is members:
            return cached[2]
        total = weight = 0.0
        for node in members:
            average = self.nodes.get((node, job_type))
            if average is not None:
                total += average.value * average.samples
                weight += average.samples
        ratio = total / weight if weight else None
        if isinstance(members, tuple):  # an immutable sequence: safe to remember by identity
            if len(self._class_cache) > 4096:
                self._class_cache.clear()
            self._class_cache[key] = (self.version, members, ratio)
        return ratio

    def class_factor(self, members: Iterable[str], job_type: str) -> float | None:
        """Return how much faster than the farm the class is for the type (None: unknown)."""
        farm = self.types.get(job_type)
        known = self.class_ratio(members, job_type)
        if farm is None or known is None:
            return None
        return _clamp(farm.value / known)

    def node_factor(self, node: str, members: Iterable[str], job_type: str) -> float | None:
        """Return how much faster than its class the node is for the type (None: unknown)."""
        mine = self.nodes.get((node, job_type))
        if mine is None:
            return None
        known = self.class_ratio(members, job_type)
        if known is None:
            return None
        return _clamp(known / mine.value)

    def ratio(self, node: str, members: Iterable[str], job_type: str) -> float | None:
        """Return the best estimate of measured/estimated time on ``node`` (None: unknown)."""
        mine = self.nodes.get((node, job_type))
        if mine is not None:
            return mine.value
        known = self.class_ratio(members, job_type)
        if known is not None:
            return known
        farm = self.types.get(job_type)
        return farm.value if farm is not None else None


def _clamp(value: float) -> float:
    low, high = _CLAMP
    return min(max(value, low), high)
