"""Failure recovery: classify a failed attempt, try the class's strategies in order with
backoff, and learn which nodes fail.

Classes: ``lost`` (the node or its agent went away), ``crash`` (a non-zero exit or a signal),
``oom`` (over its memory), ``timeout`` (past its walltime), ``stall`` (silent too long),
``disk_full`` (no space left on a device).  For the n-th failure of a class, a task gets the
n-th strategy of that class (the last one repeats): ``restart_elsewhere`` (from its last
checkpoint, avoiding the node it failed on), ``restart`` (from its checkpoint, anywhere),
``more_memory`` (its memory times ``memory_factor``, up to the largest node's), ``hold`` (for
an operator: ``taskfarm retry`` releases it).  The k-th retry of a task waits the k-th backoff
(default 5, 10, 20, 40, 60 minutes; a lost attempt is requeued by the engine at once).

Node reliability is ``exp(-f / 3)`` where ``f`` counts the failures that were the node's fault
(lost attempts, and failures that did not follow the job elsewhere), each decaying with a
half-life (default 7 days): 1 for a clean node, 0.72 after one recent failure, 0.51 after two.
Nodes below ``avoid_below`` (default 0.6: two recent failures) get no stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from actors import Failure, Resources, RetryDecision

from ._config import RecoverySettings

__all__ = ["NodeReliability", "classify", "recovery_decision"]

FailureClass = Literal["lost", "crash", "oom", "timeout", "stall", "disk_full"]
_DISK_FULL = re.compile(r"no space left|disk (is )?full|quota exceeded|ENOSPC", re.IGNORECASE)


def classify(failure: Failure) -> FailureClass:
    """Return the recovery class of a failed attempt."""
    match failure.kind:
        case "lost":
            return "lost"
        case "oom":
            return "oom"
        case "timeout":
            return "timeout"
        case "stall":
            return "stall"
        case _:
            if failure.exit_code == 28 or _DISK_FULL.search(failure.error or ""):
                return "disk_full"
            return "crash"


def recovery_decision(
    *,
    kind: FailureClass,
    earlier: int,
    failures: int,
    failure: Failure,
    request: Resources,
    largest_memory: int,
    settings: RecoverySettings,
) -> RetryDecision:
    """Decide the retry after a failure of class ``kind`` (``earlier`` failures of that
    class before it; ``failures`` of any class)."""
    steps = settings.strategies.get(kind, ("hold",))
    strategy = steps[min(earlier, len(steps) - 1)]
    backoff = settings.backoff[min(failures, len(settings.backoff) - 1)]
    what = f"{kind} #{earlier + 1}"
    match strategy:
        case "hold":
            return RetryDecision(
                action="hold",
                reason=f"{what}: held for an operator after {failures + 1} failure(s) "
                f"({failure.error or failure.kind})",
            )
        case "restart_elsewhere":
            return RetryDecision(
                action="retry",
                delay=backoff,
                avoid_node=failure.node,
                reason=f"{what}: restart from the last checkpoint away from {failure.node}",
            )
        case "more_memory":
            grown = min(int(request.memory * settings.memory_factor), largest_memory or 2**62)
            if grown <= request.memory:
                return RetryDecision(
                    action="retry",
                    delay=backoff,
                    avoid_node=failure.node,
                    reason=f"{what}: no node has more memory; restart elsewhere",
                )
            return RetryDecision(
                action="retry",
                delay=backoff,
                resources=Resources(
                    millicores=request.millicores,
                    memory=grown,
                    gpus=request.gpus,
                    gpu_memory=request.gpu_memory,
                    scratch=request.scratch,
                    counters=request.counters,
                ),
                reason=f"{what}: retry with {grown / 2**30:.1f} GiB of memory",
            )
        case _:
            return RetryDecision(
                action="retry", delay=backoff, reason=f"{what}: restart from the last checkpoint"
            )


@dataclass
class NodeReliability:
    """Decayed failures per node, and the reliability score they give."""

    half_life: float = 7 * 86400.0
    failures: dict[str, tuple[float, datetime]] = field(default_factory=dict)

    def failed(self, node: str, at: datetime) -> None:
        """Count a failure that was the node's fault."""
        self.failures[node] = (self.count(node, at) + 1.0, at)

    def count(self, node: str, now: datetime) -> float:
        """Return the node's decayed failure count at ``now``."""
        found = self.failures.get(node)
        if found is None:
            return 0.0
        value, at = found
        return float(value * 0.5 ** (max(0.0, (now - at).total_seconds()) / self.half_life))

    def score(self, node: str, now: datetime) -> float:
        """Return the node's reliability, 1 (clean) down towards 0."""
        return math.exp(-self.count(node, now) / 3.0)
