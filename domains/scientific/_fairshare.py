"""Fair share and aging: the points that order waiting simulations.

A simulation's points are the sum of

- **priority**: ``per_priority`` x its priority rank (background 0 ... critical 4);
- **fair share**: ``fair_share`` x the mean of its owner's and its project's factor
  ``2 ** -(usage share / target share)``: 1 with no usage, 1/2 at exactly the target share,
  towards 0 above it.  Usage is core-seconds decayed with a half-life (default 7 days), running
  attempts included; a target share is a weight over the weights of everyone with work;
- **aging**: ``aging_per_day`` x the days it has waited since it last started a stage (or was
  submitted), while it has a stage ready to run;
- **survival**: ``survivor`` x the successive-halving rungs a sweep member survived.

Starvation bound.  Every term but aging is bounded: their largest difference between two
simulations is ``S = 4 per_priority + fair_share + survivor x rungs``.  Aging grows at the same
rate for everyone, so a simulation that has waited ``S / aging_per_day`` days longer than
another outranks it, whatever their priorities and usage.  Hence a waiting simulation outranks
every simulation that started waiting more than ``S / aging_per_day`` after it (with the
defaults, 5 points / 1 per day = 5 days, plus 0.5 per rung), and once it ranks first among
the stages that cannot start, the head-of-queue reservation (see ``_backfill``) starts it no
later than the longest walltime of the work on the node it waits for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from ._config import FairShareSettings

__all__ = ["Points", "UsageLedger", "fair_share_factor", "points", "starvation_bound"]


@dataclass
class _Decayed:
    value: float = 0.0
    at: datetime | None = None

    def at_time(self, now: datetime, half_life: float) -> float:
        if self.at is None or self.value == 0.0:
            return 0.0
        age = max(0.0, (now - self.at).total_seconds())
        return float(self.value * 0.5 ** (age / half_life))

    def add(self, amount: float, now: datetime, half_life: float) -> None:
        self.value = self.at_time(now, half_life) + amount
        self.at = now


@dataclass
class UsageLedger:
    """Decayed core-seconds per owner and per project, running attempts included."""

    half_life: float = 7 * 86400.0
    owners: dict[str, _Decayed] = field(default_factory=dict)
    projects: dict[str, _Decayed] = field(default_factory=dict)
    # (job, task) -> (owner, project, cores, started at)
    running: dict[tuple[str, int], tuple[str, str, float, datetime]] = field(default_factory=dict)

    def started(
        self, key: tuple[str, int], owner: str, project: str, cores: float, at: datetime
    ) -> None:
        """An attempt started: it counts as usage while it runs."""
        self.running[key] = (owner, project, cores, at)

    def ended(self, key: tuple[str, int], at: datetime) -> None:
        """An attempt ended: charge what it used."""
        found = self.running.pop(key, None)
        if found is None:
            return
        owner, project, cores, started = found
        used = cores * max(0.0, (at - started).total_seconds())
        self.charge(owner, project, used, at)

    def charge(self, owner: str, project: str, core_seconds: float, at: datetime) -> None:
        """Add usage at a time."""
        self.owners.setdefault(owner, _Decayed()).add(core_seconds, at, self.half_life)
        self.projects.setdefault(project, _Decayed()).add(core_seconds, at, self.half_life)

    def usage(self, now: datetime) -> tuple[dict[str, float], dict[str, float]]:
        """Return the decayed usage of every owner and project at ``now``."""
        owners = {k: v.at_time(now, self.half_life) for k, v in self.owners.items()}
        projects = {k: v.at_time(now, self.half_life) for k, v in self.projects.items()}
        for owner, project, cores, started in self.running.values():
            used = cores * max(0.0, (now - started).total_seconds())
            owners[owner] = owners.get(owner, 0.0) + used
            projects[project] = projects.get(project, 0.0) + used
        return owners, projects


def fair_share_factor(
    usage: float, total_usage: float, weight: float, total_weight: float
) -> float:
    """Return ``2 ** -(usage share / target share)`` (1 with no usage at all)."""
    if total_usage <= 0 or usage <= 0:
        return 1.0
    target = weight / total_weight if total_weight > 0 else 1.0
    return float(0.5 ** ((usage / total_usage) / target))


@dataclass(frozen=True)
class Points:
    """A simulation's points and where they come from (for ``taskfarm why``)."""

    priority: float
    fair_share: float
    aging: float
    survival: float
    reserved: bool = False

    @property
    def total(self) -> float:
        """Return the sum (a reserved simulation at its start outranks every other)."""
        return (
            math.inf
            if self.reserved
            else self.priority + self.fair_share + self.aging + self.survival
        )

    def explain(self) -> str:
        """Return one line that names each term."""
        if self.reserved:
            return "its reservation has started: it goes first"
        return (
            f"{self.total:.2f} points = priority {self.priority:.2f} + fair share "
            f"{self.fair_share:.2f} + aging {self.aging:.2f}"
            + (f" + survival {self.survival:.2f}" if self.survival else "")
        )


def points(
    *,
    rank: int,
    owner_factor: float,
    project_factor: float,
    waited: float,
    survived: int,
    settings: FairShareSettings,
    reserved: bool = False,
) -> Points:
    """Return the points of a simulation (``waited`` in seconds)."""
    return Points(
        priority=settings.per_priority * rank,
        fair_share=settings.fair_share * (owner_factor + project_factor) / 2,
        aging=settings.aging_per_day * max(0.0, waited) / 86400.0,
        survival=settings.survivor * survived,
        reserved=reserved,
    )


def starvation_bound(settings: FairShareSettings, rungs: int) -> float:
    """Return, in seconds, how much longer a simulation must have waited than another to
    outrank it whatever their priorities, usage and survival (see the module docstring)."""
    span = 4 * settings.per_priority + settings.fair_share + settings.survivor * rungs
    return span / settings.aging_per_day * 86400.0
