"""Preemption: which running attempts yield so a waiting task can run -- pure.

Only onto a node that accepts work, satisfies the task's requirements and whose capacity fits
it (a GPU task never preempts onto a CPU-only node); only preemptible victims the caller deems
eligible (critical beats non-critical; otherwise only a job at deadline risk, over attempts of
lower effective priority; or a lender reclaiming from borrowers).  On each node the victims are
taken lowest effective priority first, then the most recently started (the least work lost),
until the task fits; the node needing the fewest victims wins, then the lowest victims, then
the name.  Victims checkpoint and yield, and resume from their checkpoint or last finished frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from actors import NodeView, Resources, add, fits

__all__ = ["Victim", "choose_victims"]


@dataclass(frozen=True, slots=True)
class Victim:
    """A running attempt that could yield: its job's effective level (rank) and client."""

    job_id: str
    task: int
    node: str
    request: Resources
    level: int
    client: str
    started_at: datetime | None = None


def choose_victims(
    request: Resources,
    requires: tuple[str, ...],
    nodes: Mapping[str, NodeView],
    running: Callable[[str], Iterable[Victim]],
    eligible: Callable[[Victim], bool],
    *,
    budget: float | None = None,
    share_of: Callable[[Victim], float] | None = None,
) -> tuple[str, list[Victim]] | None:
    """Return the node and the victims to preempt there so ``request`` fits, or None.

    ``budget`` bounds the total share (``share_of``) the victims may hold (a reclaim takes
    back no more than was borrowed).
    """
    best: tuple[int, int, str, list[Victim]] | None = None
    for name in sorted(nodes):
        node = nodes[name]
        if not node.accepts_work or not fits(request, node.capacity):
            continue
        if node.satisfies(requires) is not None:
            continue
        if fits(request, node.free):
            return None  # it fits somewhere already: nobody needs to yield
        candidates = sorted(
            (v for v in running(name) if eligible(v)),
            key=lambda v: (
                v.level,
                -(v.started_at.timestamp() if v.started_at else 0.0),
                v.job_id,
                v.task,
            ),
        )
        free, victims, spent = node.free, [], 0.0
        for victim in candidates:
            if fits(request, free):
                break
            if budget is not None and share_of is not None:
                if spent + share_of(victim) > budget + 1e-9:
                    continue
                spent += share_of(victim)
            free = add(free, victim.request, capacity=node.capacity)
            victims.append(victim)
        if not victims or not fits(request, free):
            continue
        key = (len(victims), max(v.level for v in victims), name, victims)
        if best is None or key[:3] < best[:3]:
            best = key
    if best is None:
        return None
    return best[2], best[3]
