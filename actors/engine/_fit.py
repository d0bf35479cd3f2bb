"""Whether the farm could ever run a request: the rule for work that no node can fit.

A spec larger than the absolute maxima (``_limits``) is refused at submission.  Below them, a
request that no node of the farm could fit even when idle is decided here, in one place, for
the three moments it matters:

- **before any node has joined** the request is accepted and *held*: the farm cannot judge fit
  yet (agents join after the coordinator starts, and a farm is often built after its queue).
  ``why`` says it is held, what it needs and that the farm has no nodes yet;
- **once nodes have joined**, a submission that the largest of them cannot fit is refused
  (``SchedulerCore.check_submission``) naming the shortfall;
- **work already queued** (held before nodes joined, or whose big nodes have left) stays held
  and ``why`` names the shortfall against the largest node, which tells the operator whether a
  bigger node or a smaller request is the answer.

"Could ever fit" compares against capacity, never free resources, and counts every node the
farm knows, whatever its health: a draining, quarantined or offline node may come back.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._resources import Resources, shortfall

__all__ = ["never_fits"]


def _size(capacity: Resources) -> tuple[int, int, int, int]:
    return (capacity.gpus, capacity.millicores, capacity.memory, capacity.scratch)


def never_fits(request: Resources, capacities: Mapping[str, Resources]) -> str | None:
    """Return why no node of the farm could ever fit ``request``, or None when one could.

    ``capacities`` maps every node the farm knows to its capacity.  With no node at all the
    answer is a hold reason (the request waits for nodes); otherwise it names the largest node
    (most GPUs, then cores, memory and scratch; ties by name) and every dimension it lacks.
    """
    if not capacities:
        return f"held until a node that fits joins: needs {request}; the farm has no nodes yet"
    for capacity in capacities.values():
        if not shortfall(request, capacity):
            return None
    name = max(sorted(capacities), key=lambda n: _size(capacities[n]))
    missing = "; ".join(str(s) for s in shortfall(request, capacities[name]))
    return f"no node could ever fit it: needs {request}; the largest node, {name}, lacks {missing}"
