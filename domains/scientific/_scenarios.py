"""Scenario scoring and successive halving over a sweep's members.

A simulation reports scientific metrics (``@taskfarm metric accuracy 0.93``).  Its score is the
weighted mean of the criteria it reported (accuracy, convergence, stability, novelty,
significance by default; higher is better; weights from ``cluster.toml``).

Successive halving (synchronous): rungs are progress fractions (default 1/9 and 1/3; the last
rung is the end).  A member reaches a rung when its finished stages make up that fraction of
its stages, with the score of the metrics its last finished stage reported.  Members that
reached a rung wait there until every live member has; then the top ``1/eta`` of them by
score (at least one; ties by name) go on and the rest are pruned: held at a stage boundary,
their outputs intact, so pinning one (``taskfarm science pin``) resumes it.  Pinned members
always go on.  Survivors gain rank (see ``_fairshare``) and the sweep's concurrency cap grows
by ``eta`` per rung passed, so compute moves to the promising members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Halving", "Member", "halving", "score"]


def score(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """Return the weighted mean of the criteria reported (None: none of them was)."""
    total = weight = 0.0
    for name, w in weights.items():
        value = metrics.get(name)
        if value is not None and w > 0 and math.isfinite(value):
            total += w * value
            weight += w
    return total / weight if weight else None


@dataclass(frozen=True)
class Member:
    """A sweep member as halving sees it: its scores by the fraction of stages finished when
    each was reported, whether it is pinned, and whether it failed."""

    job_id: str
    scores: Sequence[tuple[float, float]] = ()  # (fraction done, score), in order
    pinned: bool = False
    failed: bool = False

    def score_at(self, rung: float) -> float | None:
        """Return its score when it first reached ``rung`` (None: not there yet)."""
        for fraction, value in self.scores:
            if fraction + 1e-9 >= rung:
                return value
        return None

    @property
    def best_known(self) -> float | None:
        """Return its latest score."""
        return self.scores[-1][1] if self.scores else None


@dataclass
class Halving:
    """The decisions: pruned members (with why), members waiting at a rung, rungs survived."""

    pruned: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    survived: dict[str, int] = field(default_factory=dict)
    rungs_passed: int = 0


def halving(members: Sequence[Member], rungs: Sequence[float], eta: int) -> Halving:
    """Decide successive halving for one sweep (deterministic, from the members alone)."""
    result = Halving()
    alive = sorted((m for m in members if not m.failed), key=lambda m: m.job_id)
    for m in alive:
        result.survived[m.job_id] = 0
    for number, rung in enumerate(rungs, start=1):
        there = [m for m in alive if m.score_at(rung) is not None]
        if len(there) < len(alive):
            note = (
                f"waiting at rung {number} ({rung:.0%}) for the sweep: "
                f"{len(there)} of {len(alive)} there"
            )
            for m in there:
                if not m.pinned:
                    result.waiting[m.job_id] = note
            return result
        ranked = sorted(alive, key=lambda m: (-(m.score_at(rung) or 0.0), m.job_id))
        keep = max(1, len(alive) // eta)
        kept = ranked[:keep]
        cutoff = kept[-1].score_at(rung) or 0.0
        survivors = []
        for position, m in enumerate(ranked):
            if position < keep or m.pinned:
                survivors.append(m)
                result.survived[m.job_id] = number
            else:
                result.pruned[m.job_id] = (
                    f"pruned at rung {number} ({rung:.0%}): score {m.score_at(rung):.3f} is "
                    f"below the top {keep} of {len(alive)} (cutoff {cutoff:.3f}); pin it to resume"
                )
        alive = sorted(survivors, key=lambda m: m.job_id)
        result.rungs_passed = number
    return result
