"""Maintenance windows: drain before, return after, and what each severity moves.

- **critical** and **major** windows drain the nodes they cover at their start (the engine's
  drain-at-time): from the moment a window is known, work whose walltime would cross its start
  is not placed there, and what still runs at the start checkpoints and yields; the nodes come
  back online at the end.  A **critical** window overrides reservations (a reservation does
  not count on its nodes); a **major** one leaves alone the nodes a reservation holds during it.
- **minor** windows drain nothing: only background work moves off the nodes (it is not placed
  there if it would overlap the window, and yields at the start).

Each node follows the earliest window that covers it and has not ended.  The policy only ever
touches nodes that are online or that it drained itself (the operator's decisions win).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from actors import FarmView, NodeAction, NodeView, Preemption, Priority

from ._config import MaintenanceWindow

__all__ = ["maintenance_actions", "maintenance_refusal", "next_window", "window_yields"]


def next_window(
    windows: Sequence[MaintenanceWindow],
    node: NodeView,
    now: datetime,
    *,
    reserved: Collection[str] = (),
    severities: Collection[str] = ("critical", "major"),
) -> MaintenanceWindow | None:
    """Return the earliest unended window of ``severities`` that takes ``node`` out (a major
    window spares nodes in ``reserved``)."""
    best: MaintenanceWindow | None = None
    for window in windows:
        if window.end <= now or window.severity not in severities:
            continue
        if not window.covers(node.name, node.label_map):
            continue
        if window.severity == "major" and node.name in reserved:
            continue
        if best is None or (window.start, window.name) < (best.start, best.name):
            best = window
    return best


def maintenance_actions(
    windows: Sequence[MaintenanceWindow],
    farm: FarmView,
    now: datetime,
    *,
    reserved: Collection[str] = (),
) -> list[NodeAction]:
    """Return the drains to plan and the nodes to bring back (see the module docstring)."""
    actions: list[NodeAction] = []
    for name in sorted(farm.nodes):
        node = farm.nodes[name]
        mine = node.health_by == "policy"
        if node.health != "online" and not mine:
            continue
        window = next_window(windows, node, now, reserved=reserved)
        if window is not None:
            reason = f"maintenance {window.name} ({window.severity}) {window.start.isoformat()}"
            if now >= window.start:
                if node.health != "draining":
                    actions.append(NodeAction(node=name, health="draining", reason=reason))
            elif node.drain_at != window.start and node.health == "online":
                actions.append(
                    NodeAction(node=name, health="online", reason=reason, at=window.start)
                )
            continue
        if mine and (node.health == "draining" or node.drain_at is not None):
            actions.append(NodeAction(node=name, health="online", reason="maintenance over"))
    return actions


def maintenance_refusal(
    windows: Sequence[MaintenanceWindow],
    node: NodeView,
    priority: Priority,
    walltime: float | None,
    now: datetime,
) -> str | None:
    """Return why background work may not start on ``node`` (a minor window it would meet)."""
    if priority is not Priority.BACKGROUND:
        return None
    end = (
        now + timedelta(seconds=walltime)
        if walltime is not None
        else datetime.max.replace(tzinfo=now.tzinfo)
    )
    for window in windows:
        if window.severity != "minor" or not window.overlaps(now, end):
            continue
        if window.covers(node.name, node.label_map):
            return f"minor maintenance {window.name} on {node.name} moves background work off it"
    return None


def window_yields(
    windows: Sequence[MaintenanceWindow],
    farm: FarmView,
    now: datetime,
    *,
    reserved: Collection[str] = (),
) -> list[Preemption]:
    """Return the attempts to move off nodes in a window now: background ones in a minor
    window; every one in a critical or major window (the engine's planned drain does this at
    the start; this also covers a window scheduled once it had begun)."""
    chosen: list[Preemption] = []
    order = ("critical", "major", "minor")
    active = sorted(
        (w for w in windows if w.start <= now < w.end), key=lambda w: order.index(w.severity)
    )
    if not active:
        return chosen
    for name in sorted(farm.running):
        node = farm.nodes.get(name)
        if node is None or not farm.running[name]:
            continue
        for window in active:
            if not window.covers(name, node.label_map):
                continue
            if window.severity == "major" and name in reserved:
                continue
            for (job_id, task), attempt in sorted(farm.running[name].items()):
                if not attempt.preemptible:
                    continue
                if window.severity == "minor" and attempt.priority is not Priority.BACKGROUND:
                    continue
                chosen.append(
                    Preemption(
                        victim_job=job_id,
                        victim_task=task,
                        node=name,
                        reason=f"maintenance {window.name} ({window.severity}) on {name}",
                    )
                )
            break
    return chosen
