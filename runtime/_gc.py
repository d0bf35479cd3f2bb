"""Garbage-collector settings for long-running processes that hold many small objects.

A coordinator holds an actor (a few small objects) per job and node.  CPython's default
generation-0 threshold (700 allocations) then triggers collections that rescan the long-lived
objects over and over: spawning 100,000 actors spends more time in the collector than in
taskfarm.  Processes we own (``taskfarm serve``, ``taskfarm agent``, the benchmarks) call
:func:`tune_gc_for_many_objects`; a library user embedding taskfarm keeps control of their own
process and decides for themselves.
"""

from __future__ import annotations

import gc

__all__ = ["tune_gc_for_many_objects"]

# Collect generation 0 every 50,000 net allocations instead of 700; the older generations keep
# their default ratios.  Memory stays bounded: cycles are still collected, just in larger batches.
_THRESHOLDS = (50_000, 20, 100)


def tune_gc_for_many_objects() -> tuple[int, int, int]:
    """Raise the collector's thresholds for this process; return the previous ones."""
    previous = gc.get_threshold()
    gc.set_threshold(*_THRESHOLDS)
    return previous
