"""Supervision policy: what a supervisor does when its child's handler raises."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from ._errors import ConfigurationError

__all__ = ["RestartBudget", "Supervision"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Supervision:
    """How an actor's failures are handled (one-for-one: siblings are never touched).

    ``restart`` recreates the actor from its factory after an exponential backoff, as long as
    it has failed at most ``max_restarts`` times within ``within`` seconds; past that budget the
    failure is escalated to the parent.  A restart first stops the actor's children (its new
    ``on_start`` recreates those it needs).  ``stop`` stops the actor; ``escalate`` hands every
    failure straight to the parent.
    """

    strategy: Literal["restart", "stop", "escalate"] = "restart"
    max_restarts: int = 3
    within: float = 60.0
    backoff_min: float = 0.1
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigurationError("must be >= 0", where="Supervision.max_restarts")
        if self.within <= 0:
            raise ConfigurationError("must be > 0", where="Supervision.within")
        if not 0 <= self.backoff_min <= self.backoff_max:
            raise ConfigurationError(
                "need 0 <= backoff_min <= backoff_max", where="Supervision.backoff"
            )

    def backoff(self, restart_number: int) -> float:
        """Return the delay before restart number ``restart_number`` (1-based)."""
        return min(self.backoff_max, self.backoff_min * 2.0 ** (restart_number - 1))


class RestartBudget:
    """Failure timestamps inside the sliding window, to decide restart versus escalate."""

    __slots__ = ("_failures", "_policy")

    def __init__(self, policy: Supervision) -> None:
        self._policy = policy
        self._failures: deque[float] | None = None  # allocated at the first failure

    def record_failure(self, now: float) -> int:
        """Record a failure at ``now``; return how many failures the window now holds."""
        failures = self._failures
        if failures is None:
            failures = self._failures = deque()
        window_start = now - self._policy.within
        while failures and failures[0] < window_start:
            failures.popleft()
        failures.append(now)
        return len(failures)

    def allows_restart(self, failures_in_window: int) -> bool:
        """Return whether a restart is within budget for that many failures."""
        return (
            self._policy.strategy == "restart" and failures_in_window <= self._policy.max_restarts
        )
