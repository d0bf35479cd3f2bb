"""Long-running protection: who may be preempted, and the ledger of preemptions suffered.

A running stage may be checkpointed and asked to yield to a waiting stage only if all hold:

1. its job is preemptible and checkpointable (always checkpoint-then-yield), and it is not
   already yielding;
2. the waiting stage's priority is at least ``priority_gap`` ranks above it;
3. it has run for at least ``minimum_runtime`` (default 1 h) in this attempt;
4. its simulation was not preempted within the last ``protection_window`` (default 6 h);
5. its simulation was preempted fewer than ``budgets[priority]`` times in the last 24 hours
   (default critical 0, high 1, medium 2, low 4, background 8).

Only these preemptions (a waiting stage's) spend budgets.  Planned yields -- a maintenance
window, a reservation starting, a pruned sweep member -- are announced in advance and do not.
The ledger is a projection: the policy records what it decided, and rebuilds it from the
journal's history of preempted attempts on a restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from actors import Priority, RunningView

from ._config import ProtectionSettings

__all__ = ["PreemptionLedger", "protection_reason"]

_DAY = timedelta(days=1)


@dataclass
class PreemptionLedger:
    """When each simulation was preempted for a waiting stage (budget-spending preemptions)."""

    times: dict[str, list[datetime]] = field(default_factory=dict)

    def record(self, job_id: str, at: datetime) -> None:
        """Count one preemption of ``job_id`` at ``at``."""
        times = self.times.setdefault(job_id, [])
        times.append(at)
        # Only the last day matters (and the last one, for the protection window).
        while len(times) > 1 and times[0] <= at - _DAY:
            times.pop(0)

    def in_last_day(self, job_id: str, now: datetime) -> int:
        """Return how many times ``job_id`` was preempted in the 24 hours before ``now``."""
        return sum(1 for at in self.times.get(job_id, ()) if now - _DAY < at <= now)

    def last(self, job_id: str) -> datetime | None:
        """Return when ``job_id`` was last preempted (None: never, or forgotten)."""
        times = self.times.get(job_id)
        return times[-1] if times else None

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drop finished simulations."""
        for job_id in job_ids:
            self.times.pop(job_id, None)


def protection_reason(
    victim: RunningView,
    waiting: Priority,
    ledger: PreemptionLedger,
    settings: ProtectionSettings,
    now: datetime,
) -> str | None:
    """Return why ``victim`` may not yield to a stage of priority ``waiting`` (None: it may)."""
    job = victim.job
    if job is None or not job.spec.preemptible or victim.yielding:
        return "not preemptible"
    if not job.spec.checkpointable:
        return "cannot checkpoint (preemption is always checkpoint-then-yield)"
    if waiting.rank - victim.priority.rank < settings.priority_gap:
        return (
            f"priority {victim.priority.value} is not below {waiting.value} "
            f"by {settings.priority_gap}"
        )
    if victim.started_at is None:
        return "its start is not known yet"
    ran = (now - victim.started_at).total_seconds()
    if ran < settings.minimum_runtime:
        return (
            f"ran {ran / 60:.0f} min, less than the minimum runtime of "
            f"{settings.minimum_runtime / 60:.0f} min"
        )
    last = ledger.last(victim.job_id)
    if last is not None and (now - last).total_seconds() < settings.protection_window:
        rest = settings.protection_window - (now - last).total_seconds()
        return f"protected for {rest / 60:.0f} more min after its preemption at {last.isoformat()}"
    used = ledger.in_last_day(victim.job_id, now)
    budget = settings.budget(victim.priority)
    if used >= budget:
        return f"its daily budget of {budget} preemption(s) for {victim.priority.value} is spent"
    return None
