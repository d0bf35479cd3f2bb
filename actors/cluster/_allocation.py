"""An agent whose host goes away at a known time: a batch allocation's end (a Slurm pilot).

On a cluster run by a batch system the agent lives inside an allocation with a time limit;
at the limit the batch system kills everything in it.  An agent that knows the end
(:class:`Allocation`, found by the batch system's wing, e.g. ``actors.slurm``) prepares for it
so that the kill never loses more than the work since the checkpoint warning:

``end - drain_margin``
    The node drains.  The agent asks for it on every connection (:class:`PlanDrain`), so the
    coordinator, which owns placement, knows ahead: work whose ``max_runtime`` cannot end
    before this time is no longer placed here, and at this time what still runs here is
    preempted (asked to checkpoint, given the coordinator's preempt grace, stopped) and
    requeued elsewhere.
``end - checkpoint_warning``
    Every running checkpointable attempt gets SIGUSR1 (checkpoint now), from the agent
    itself: the warning does not depend on the coordinator being reachable.
idle
    With an ``idle_timeout``, an agent that has run nothing for that long stops (it is not
    needed: the pilot gives its allocation back).
after the drain
    Once nothing runs, the agent stops (the pilot job ends early and frees the allocation);
    at ``end - (terminate_grace + 5 s)`` at the latest it stops anyway, terminating what is
    left, so its final reports can still get out before the batch system's kill.

And when the batch system ends the allocation early (``scancel``, a node failure), it signals
every process in it at once, the attempts included, which then die "failed" by no fault of
their own.  Such a failure (:func:`ended_by_allocation`: the agent is stopping, or the batch
system says the allocation is ending) is reported ``lost`` instead (:func:`as_lost`: requeued
without spending an attempt, as for any vanished host), and the agent first asks for its node
to be drained *now*: the slots the lost attempts free must not receive new work on a host
that is going away.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
import msgspec

from actors.executors import AttemptFinished, AttemptReport, Executor
from runtime import Clock, ConfigurationError, TaskfarmError, get_logger

from ._protocol import PlanDrain

__all__ = ["Allocation", "as_lost", "ended_by_allocation", "plan_drain", "watch_allocation"]

_log = get_logger("actors.agent")

# Seconds an agent keeps, beyond its terminate grace, between stopping and the allocation's end:
# for the final reports to get out (and the process to exit) before the batch system's kill.
_EXIT_SLACK = 5.0
# What an attempt killed with its allocation reports: the agent's own stop says "cancelled".
_LOSABLE = frozenset({"failed", "start_failed"})
# How often an agent with an idle timeout looks whether it runs anything.
_IDLE_POLL = 1.0
# A wall-clock deadline is slept towards in steps: a clock step (NTP) shifts it by one step at
# most, not by the whole wait.
_STEP = 60.0


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """The batch allocation an agent runs in: when it ends and how the agent prepares.

    ``source`` says where the end came from (logged); ``ending``, when given, asks the batch
    system whether the allocation is being ended right now (cancelled, timed out).  With
    ``idle_timeout`` the agent also leaves once it has run nothing for that long, giving the
    allocation back early.

    Raises:
        ConfigurationError: ``end`` has no time zone, or a duration is negative.
    """

    end: datetime
    source: str
    checkpoint_warning: float = 600.0
    drain_margin: float = 120.0
    idle_timeout: float | None = None
    ending: Callable[[], Awaitable[bool]] | None = None

    def __post_init__(self) -> None:
        if self.end.tzinfo is None:
            raise ConfigurationError("must have a time zone", where="Allocation.end")
        for field in ("checkpoint_warning", "drain_margin", "idle_timeout"):
            value = getattr(self, field)
            if value is not None and not value >= 0:
                raise ConfigurationError(f"must be >= 0, got {value}", where=f"Allocation.{field}")

    @property
    def warn_at(self) -> datetime:
        """Return when checkpointable attempts are asked to checkpoint."""
        return self.end - timedelta(seconds=self.checkpoint_warning)

    @property
    def drain_at(self) -> datetime:
        """Return when the node drains."""
        return self.end - timedelta(seconds=self.drain_margin)

    def stop_at(self, terminate_grace: float) -> datetime:
        """Return when the agent stops at the latest (its attempts get ``terminate_grace``)."""
        return self.end - timedelta(seconds=terminate_grace + _EXIT_SLACK)


def plan_drain(allocation: Allocation, *, now: datetime | None = None) -> PlanDrain:
    """Return the message that plans the node's drain for ``allocation``'s end (or drains it
    at ``now``: the allocation is being ended early)."""
    if now is not None:
        return PlanDrain(at=now, reason=f"its allocation is being ended ({allocation.source})")
    return PlanDrain(
        at=allocation.drain_at,
        reason=f"its allocation ends at {allocation.end.isoformat(timespec='seconds')} "
        f"({allocation.source})",
    )


async def _sleep_until(clock: Clock, when: datetime) -> None:
    while (delay := (when - clock.now()).total_seconds()) > 0:
        await clock.sleep(min(delay, _STEP))


async def watch_allocation(
    allocation: Allocation,
    *,
    node_id: str,
    clock: Clock,
    executor: Executor,
    terminate_grace: float,
    stop: anyio.Event,
) -> None:
    """Warn checkpointable attempts before ``allocation`` ends, and set ``stop`` once the
    node is drained and idle (or its last moment has come, or it has been idle for the
    allocation's ``idle_timeout``)."""
    stop_at = allocation.stop_at(terminate_grace)
    _log.info(
        "allocation_end_known",
        node_id=node_id,
        end=allocation.end.isoformat(),
        source=allocation.source,
        checkpoint_warning_at=allocation.warn_at.isoformat(),
        drain_at=allocation.drain_at.isoformat(),
        stop_at=stop_at.isoformat(),
    )
    async with anyio.create_task_group() as task_group:

        async def warn() -> None:
            await _sleep_until(clock, allocation.warn_at)
            warned = [h.spec for h in executor.running() if h.request_checkpoint()]
            _log.info(
                "allocation_checkpoint_warning",
                node_id=node_id,
                end=allocation.end.isoformat(),
                attempts=len(warned),
                tasks=[f"{spec.job_id}/{spec.task_id}" for spec in warned],
            )

        async def drained() -> None:
            await _sleep_until(clock, allocation.drain_at)
            # No new work comes once the coordinator drained the node; what runs is yielding.
            while running := executor.running():
                await running[0].wait()
            _log.info("allocation_drained", node_id=node_id, end=allocation.end.isoformat())
            task_group.cancel_scope.cancel()

        async def last_moment() -> None:
            await _sleep_until(clock, stop_at)
            _log.warning(
                "allocation_ending",
                node_id=node_id,
                end=allocation.end.isoformat(),
                running=len(executor.running()),
            )
            task_group.cancel_scope.cancel()

        async def idle(limit: float) -> None:
            idle_since = clock.monotonic()
            while True:
                if executor.running():
                    idle_since = clock.monotonic()
                elif clock.monotonic() - idle_since >= limit:
                    break
                await clock.sleep(min(_IDLE_POLL, limit) or _IDLE_POLL)
            _log.info("allocation_idle", node_id=node_id, idle_s=limit)
            task_group.cancel_scope.cancel()

        task_group.start_soon(warn)
        task_group.start_soon(drained)
        task_group.start_soon(last_moment)
        if allocation.idle_timeout is not None:
            task_group.start_soon(idle, allocation.idle_timeout)
    stop.set()


async def ended_by_allocation(
    report: AttemptReport, allocation: Allocation, *, stopping: bool
) -> bool:
    """Return whether ``report`` is an attempt that failed (or could not start) because the
    allocation was being ended around it: the agent is stopping, or the batch system says so."""
    if not isinstance(report, AttemptFinished) or report.outcome not in _LOSABLE:
        return False
    if stopping:
        return True
    if allocation.ending is None:
        return False
    try:
        return await allocation.ending()
    except TaskfarmError as error:
        # Unknown: the failure stands as reported (a retry, not a loss).
        _log.warning("allocation_state_unknown", error=str(error))
        return False


def as_lost(report: AttemptFinished) -> AttemptFinished:
    """Return ``report`` as an attempt its host lost (requeued without spending an attempt)."""
    _log.info(
        "attempt_lost_with_allocation",
        job_id=report.job_id,
        task_id=report.task_id,
        attempt=report.attempt,
        error=report.error,
    )
    return msgspec.structs.replace(
        report,
        outcome="lost",
        error=f"its allocation was ended while it ran ({report.error or 'no error given'})",
    )
