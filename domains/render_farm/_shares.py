"""Client shares: guarantees, maxima, borrowing and loans -- pure functions of usage.

A client's usage is its dominant share: the largest of its running work's fraction of the farm's
cores, memory and GPUs (the farm being its nodes that are online or asleep by policy, since a
sleeping node wakes for work).  Guarantees adding up to more than 100 % are scaled down in
proportion; what they leave unguaranteed is a pool anyone may borrow from.

Admission of one more task (share s) for client c, at every assignment:

- never above c's maximum;
- within c's guarantee: yes;
- beyond it, c borrows: at most its borrowing limit, and only capacity that is idle -- the
  unguaranteed pool plus the unused guarantee of clients with no work waiting that could run
  now -- less what others already borrow.  Clients whose work waits are not lent to: that is
  "reclaim by not refilling".  When their work has waited longer than ``reclaim_after``,
  borrowers are preempted (see the policy); loans are reported against the actual lenders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from actors import Resources

__all__ = ["EPSILON", "ShareState", "Totals", "admit_share", "dominant_share", "lendable", "loans"]

EPSILON: Final = 1e-9
POOL: Final = "(unguaranteed)"


@dataclass(frozen=True, slots=True)
class Totals:
    """The farm's capacity that shares are fractions of."""

    millicores: int = 0
    memory: int = 0
    gpus: int = 0

    @classmethod
    def of(cls, capacities: list[Resources]) -> Totals:
        """Sum capacities."""
        return cls(
            millicores=sum(c.millicores for c in capacities),
            memory=sum(c.memory for c in capacities),
            gpus=sum(c.gpus for c in capacities),
        )


def dominant_share(request: Resources, totals: Totals) -> float:
    """Return the request's largest fraction of the farm over cores, memory and GPUs (infinite
    for a dimension the farm does not have at all)."""
    share = 0.0
    for asked, total in (
        (request.millicores, totals.millicores),
        (request.memory, totals.memory),
        (request.gpus, totals.gpus),
    ):
        if asked:
            share = max(share, asked / total if total else float("inf"))
    return share


@dataclass(frozen=True, slots=True)
class ShareState:
    """One client's shares (fractions of the farm, 0-1) and whether its work waits."""

    guaranteed: float
    maximum: float
    borrowing_limit: float
    used: float
    waiting: bool = False

    @property
    def borrowed(self) -> float:
        """Return how much it uses beyond its guarantee."""
        return max(0.0, self.used - self.guaranteed)

    @property
    def idle(self) -> float:
        """Return how much of its guarantee it leaves unused."""
        return max(0.0, self.guaranteed - self.used)


def lendable(states: Mapping[str, ShareState], *, borrower: str) -> float:
    """Return what ``borrower`` may still borrow: the unguaranteed pool and the unused
    guarantees of clients whose work does not wait, less what the others borrow already."""
    pool = max(0.0, 1.0 - sum(s.guaranteed for s in states.values()))
    idle = sum(s.idle for c, s in states.items() if c != borrower and not s.waiting)
    borrowed = sum(s.borrowed for c, s in states.items() if c != borrower)
    return pool + idle - borrowed


def admit_share(client: str, task_share: float, states: Mapping[str, ShareState]) -> str | None:
    """Return why one more task of ``client`` (``task_share`` of the farm) may not run now, or
    None when it may."""
    state = states[client]
    after = state.used + task_share
    if after > state.maximum + EPSILON:
        return (
            f"client {client} at its maximum: {_pct(state.used)} used + {_pct(task_share)} "
            f"> {_pct(state.maximum)}"
        )
    if after <= state.guaranteed + EPSILON:
        return None
    borrowed = after - state.guaranteed
    if borrowed > state.borrowing_limit + EPSILON:
        return (
            f"client {client} at its borrowing limit: it would borrow {_pct(borrowed)} "
            f"> {_pct(state.borrowing_limit)}"
        )
    available = lendable(states, borrower=client)
    if borrowed > available + EPSILON:
        waiting = sorted(c for c, s in states.items() if c != client and s.waiting and s.idle)
        why = f"; {', '.join(waiting)} reclaim their share" if waiting else ""
        return (
            f"client {client} beyond its guarantee ({_pct(state.guaranteed)}) and nothing idle "
            f"to borrow ({_pct(max(0.0, available))} lendable){why}"
        )
    return None


def loans(states: Mapping[str, ShareState]) -> dict[str, dict[str, float]]:
    """Return ``borrower -> {lender: amount}``: each borrower's excess is charged to the
    unguaranteed pool first, then to the clients leaving guarantee unused, in proportion to what
    they leave (the same proportions for every borrower)."""
    pool = max(0.0, 1.0 - sum(s.guaranteed for s in states.values()))
    idle = {c: s.idle for c, s in states.items() if s.idle > EPSILON}
    total_idle = sum(idle.values())
    result: dict[str, dict[str, float]] = {}
    pool_left = pool
    for borrower, state in sorted(states.items()):
        owed = state.borrowed
        if owed <= EPSILON:
            continue
        ledger: dict[str, float] = {}
        from_pool = min(owed, pool_left)
        if from_pool > EPSILON:
            ledger[POOL] = from_pool
            pool_left -= from_pool
            owed -= from_pool
        if owed > EPSILON and total_idle > EPSILON:
            for lender, amount in sorted(idle.items()):
                if lender != borrower:
                    ledger[lender] = owed * amount / total_idle
        result[borrower] = ledger
    return result


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f} %"
