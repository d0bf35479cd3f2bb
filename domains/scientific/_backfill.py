"""Reservations and EASY backfill: which nodes each reservation holds, and what may use them.

Each cycle, every reservation that has not ended picks the nodes it will use (its *shadow*):
the nodes already running its simulation count first, then, among the healthy nodes with the
required label that no other reservation holds during it (a node serves reservations one
after another, as Slurm's do) and no critical maintenance window takes during it, those free
by its start (by the walltime, ``max_runtime``, of what runs there) that stay busy longest --
so a node idle now is held only when it must be, and the busy ones need no backfill -- then
those that will be free soonest after it, then by name.  So a reserved node that fails is
replaced from the free pool at the next cycle, without anything to journal: the shadow is a
function of the farm.

Backfill (EASY): before a reservation starts, work of other simulations may run on its shadow
nodes only if its walltime ends before the start; work without a walltime never does.  A
checkpointable, preemptible stage may also run there if it has the minimum runtime before a
lead time ahead of the start: at that lead it checkpoints and yields (the policy's ``yields``),
so it cannot delay the reservation either.  So
backfill never delays a reservation: at the start its nodes are free, unless work that ran
there before the reservation was made is still running, which then checkpoints and yields.
Once started (and while its simulation is live) the shadow is for that simulation only.

The same rule protects the head of the queue (EASY's own reservation): the highest-ranked
waiting single-node stage that fits no node now gets the node that fits it soonest, and
lower-ranked work may use that node only if its walltime ends before then.  (A waiting
multi-node stage gets the engine's gang holds: the nodes that fit it are kept for it.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from actors import FarmView, NodeView, RunningView, fits

from ._config import MaintenanceWindow, Reservation

__all__ = [
    "Hold",
    "ShadowPlan",
    "backfill_refusal",
    "free_at",
    "head_hold",
    "plan_reservations",
]


_NEVER_YEAR = 9999  # datetime.max: a node whose work has no walltime
HEAD = "the head of the queue"  # the name of the queue head's hold


@dataclass(frozen=True)
class Hold:
    """A node held from ``start`` for ``job_id`` (a reservation's, or the queue head's)."""

    name: str
    job_id: str
    start: datetime
    end: datetime | None


@dataclass
class ShadowPlan:
    """This cycle's holds: node -> its next hold; per reservation, its nodes and shortfall."""

    holds: dict[str, Hold] = field(default_factory=dict)
    nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    short: dict[str, int] = field(default_factory=dict)
    active: dict[str, Reservation] = field(default_factory=dict)


def free_at(
    node: str,
    running: Mapping[tuple[str, int], RunningView],
    walltime: Mapping[tuple[str, int], float | None],
    now: datetime,
    *,
    ignore: str | None = None,
) -> datetime | None:
    """Return when ``node`` is free of its work (by walltime; None: never known), ignoring
    the attempts of job ``ignore``."""
    latest = now
    for key, attempt in running.items():
        if key[0] == ignore:
            continue
        limit = walltime.get(key)
        if limit is None or attempt.started_at is None:
            return None
        end = attempt.started_at + timedelta(seconds=limit)
        latest = max(latest, end)
    return latest


def _eligible(
    node: NodeView, reservation: Reservation, windows: Sequence[MaintenanceWindow]
) -> bool:
    if node.health != "online" and node.health_by != "policy":
        return False  # the operator took it out
    if node.reachable == "offline":
        return False
    if node.health == "quarantined":
        return False
    if reservation.requires is not None and node.satisfies((reservation.requires,)) is not None:
        return False
    return not any(
        w.severity == "critical"
        and w.overlaps(reservation.start, reservation.end)
        and w.covers(node.name, node.label_map)
        for w in windows
    )


def plan_reservations(
    reservations: Sequence[Reservation],
    farm: FarmView,
    now: datetime,
    *,
    walltime: Mapping[tuple[str, int], float | None],
    windows: Sequence[MaintenanceWindow] = (),
) -> ShadowPlan:
    """Pick every unended reservation's nodes for this cycle (see the module docstring)."""
    plan = ShadowPlan()
    never = datetime.max.replace(tzinfo=now.tzinfo)
    free: dict[str, datetime] = {}  # computed once per node, on demand
    booked: dict[str, list[Hold]] = {}  # node -> the reservations holding it, by start

    def taken(node: str, start: datetime, end: datetime) -> bool:
        return any(h.start < end and start < (h.end or never) for h in booked.get(node, ()))

    for reservation in sorted(reservations, key=lambda r: (r.start, r.name)):
        if now >= reservation.end:
            continue
        started = now >= reservation.start
        if started and reservation.job_id not in farm.jobs:
            continue  # its simulation is not live: the nodes are not held
        if started:
            plan.active[reservation.name] = reservation
        # Every node running the simulation (a multi-node stage's placement names only its
        # leader; the others run it too).
        job_id = reservation.job_id
        own = (
            sorted(
                node
                for node, attempts in farm.running.items()
                if not taken(node, reservation.start, reservation.end)
                and any(key[0] == job_id for key in attempts)
            )
            if job_id in farm.placements
            else []
        )
        candidates: list[tuple[tuple[int, float], str]] = []
        start = reservation.start
        for name, node in farm.nodes.items():
            if (
                name in own
                or taken(name, start, reservation.end)
                or not _eligible(node, reservation, windows)
            ):
                continue
            if name not in free:
                found = free_at(name, farm.running.get(name, {}), walltime, now)
                free[name] = found if found is not None else never
            # Free once its work ends and any earlier reservation holding it has ended.
            at = max([free[name], *(h.end or never for h in booked.get(name, ()))])
            # Free by the start: the node busy longest first (holding a node that is idle now
            # would leave it idle unless short work fits before the start); else soonest free.
            key = (0, -at.timestamp()) if at <= start else (1, _stamp(at))
            candidates.append((key, name))
        candidates.sort()
        if reservation.count:
            wanted = max(0, reservation.count - len(own))
            chosen = own + [name for _, name in candidates[:wanted]]
            plan.short[reservation.name] = max(0, wanted - len(candidates))
        else:
            chosen = own + [name for _, name in candidates]
        plan.nodes[reservation.name] = tuple(chosen)
        hold = Hold(reservation.name, reservation.job_id, reservation.start, reservation.end)
        for name in chosen:
            plan.holds.setdefault(name, hold)  # reservations come by start: the next one
            booked.setdefault(name, []).append(hold)
    return plan


def _stamp(at: datetime) -> float:
    return math.inf if at.year == _NEVER_YEAR else at.timestamp()


def backfill_refusal(
    job_id: str,
    walltime: float | None,
    node: str,
    holds: Mapping[str, Hold],
    now: datetime,
    *,
    yields: tuple[float, float] | None = None,
) -> str | None:
    """Return why a stage of ``job_id`` may not start on ``node`` now (None: it may).

    ``yields`` = (lead, minimum runtime) for a checkpointable, preemptible stage: it may use a
    reservation's node whatever its walltime if it can run the minimum runtime before it must
    checkpoint and yield, ``lead`` seconds before the reservation starts.
    """
    hold = holds.get(node)
    if hold is None or hold.job_id == job_id:
        return None
    if now >= hold.start:
        return f"node {node} is reserved for {hold.job_id} ({hold.name})"
    if yields is not None and hold.name != HEAD:
        lead, minimum = yields
        if now + timedelta(seconds=lead + minimum) <= hold.start:
            return None  # it checkpoints and yields ``lead`` before the start
    if walltime is None:
        return (
            f"node {node} is held for {hold.job_id} from {hold.start.isoformat()} ({hold.name}) "
            "and this stage has no walltime to backfill with"
        )
    if now + timedelta(seconds=walltime) > hold.start:
        return (
            f"its walltime ({walltime / 3600:.1f} h) would run into {hold.name} on node {node} "
            f"(held for {hold.job_id} from {hold.start.isoformat()})"
        )
    return None


def head_hold(
    job_id: str,
    request: object,
    requires: Sequence[str],
    farm: FarmView,
    walltime: Mapping[tuple[str, int], float | None],
    now: datetime,
    taken: Mapping[str, Hold],
) -> tuple[str, Hold] | None:
    """Return the queue head's hold: the node that fits ``request`` soonest, and when."""
    best: tuple[datetime, str] | None = None
    for name, node in farm.nodes.items():
        if name in taken or not node.accepts_work or node.satisfies(requires) is not None:
            continue
        if not fits(request, node.capacity):  # type: ignore[arg-type]
            continue
        free = free_at(name, farm.running.get(name, {}), walltime, now)
        if free is None:
            continue
        if best is None or (free, name) < best:
            best = (free, name)
    if best is None:
        return None
    return best[1], Hold(HEAD, job_id, best[0], None)
