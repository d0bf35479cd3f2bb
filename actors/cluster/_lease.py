"""The timing of leased attempts: how long an agent runs work without its coordinator, and how
long the coordinator waits before it runs that work elsewhere.

Three numbers, all in seconds:

- ``lease``: an agent that has not heard from its coordinator for this long (its heartbeats
  unanswered) stops its attempts.  Default: twice the heartbeat timeout (10 s with the
  defaults), so a coordinator restart or a network blip shorter than that loses nothing.
- ``grace`` (``lease / 2``): then it has this long to stop them: checkpointable attempts are
  asked to checkpoint (SIGUSR1) and get the first half, then every attempt gets SIGTERM and,
  at the end, SIGKILL.  It reports them ``lost``.
- ``fence``: the coordinator requeues a silent node's attempts this long after the last frame it
  read from the agent.  It must exceed ``lease + grace``; by default it does by a margin of
  ``max(2 s, lease / 5)`` (17.5 s with the defaults), which covers the agent's own reaction
  time (its event loop noticing the expiry, the signals reaching the processes) and the drift
  between two hosts' clocks over a lease (parts per million).

Why this is safe: the agent measures its lease from the moment it *sent* the heartbeat that was
answered, and the coordinator answers a heartbeat only after reading it, so the agent's lease
always ends before ``last frame read + lease`` on the coordinator's side; a reply delayed in the
network cannot stretch it.  Every process of the agent is therefore dead before
``last frame read + lease + grace < last frame read + fence``: no task runs twice at once.
A restarted coordinator does not know when it last heard from anyone, so it waits at least the
fence (the restart grace is raised to it) before it requeues work that was out on a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime import ConfigurationError

__all__ = ["LeaseTiming", "lease_timing"]

# The least margin a configured fence must keep above lease + grace.
MIN_MARGIN = 1.0


@dataclass(frozen=True, kw_only=True)
class LeaseTiming:
    """A coordinator's lease, the grace to stop leased attempts, and its fence."""

    lease: float
    grace: float
    fence: float


def _positive(value: float, *, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"expected a number of seconds, got {value!r}", where=where)
    if value <= 0:
        raise ConfigurationError(f"must be > 0, got {value:g}", where=where)
    return float(value)


def lease_timing(
    *,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    lease: float | None = None,
    fence: float | None = None,
) -> LeaseTiming:
    """Return the lease timing, with the defaults for what is None.

    Raises:
        ConfigurationError: the lease is not more than twice the heartbeat interval (it would
            run out between two heartbeats), or the fence is not more than ``lease + grace``
            plus a second; ``where`` names the flag.
    """
    chosen = 2 * heartbeat_timeout if lease is None else _positive(lease, where="--lease")
    if chosen < 2 * heartbeat_interval:
        raise ConfigurationError(
            f"must be at least twice the heartbeat interval ({2 * heartbeat_interval:g} s), "
            f"got {chosen:g}",
            where="--lease",
        )
    grace = chosen / 2
    least = chosen + grace + MIN_MARGIN
    if fence is None:
        chosen_fence = chosen + grace + max(2.0, chosen / 5)
    else:
        chosen_fence = _positive(fence, where="--fence")
        if chosen_fence < least:
            raise ConfigurationError(
                f"must be at least lease + lease/2 + {MIN_MARGIN:g} s = {least:g} s (the lease "
                f"is {chosen:g} s), got {chosen_fence:g}",
                where="--fence",
            )
    return LeaseTiming(lease=chosen, grace=grace, fence=chosen_fence)
