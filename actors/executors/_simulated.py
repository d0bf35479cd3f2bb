"""The simulated executor: attempts that run no code and take a given time of the clock.

For what-if runs and the domains' simulated weeks: the production engine and policy on a
:class:`VirtualClock`, with each attempt lasting ``duration(spec)`` seconds (a trace, a model of
the node's speed).  It reports like any executor (started, optionally progress, then finished),
so the engine cannot tell it from a real farm; what it saves is a task and its watchdogs per
attempt: on a virtual clock an attempt is one timer, and its unit of activity is parked while
it "runs" so that time can move.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from runtime import Clock, VirtualClock, get_logger

from ._interface import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptOutcome,
    AttemptSpec,
    AttemptStarted,
    ReportSink,
    attempt_identity,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["SimulatedExecutor", "open_simulated_executor"]

_log = get_logger("actors.executor")

Duration = Callable[[AttemptSpec], float]
Outcome = Callable[[AttemptSpec], AttemptOutcome]


class _SimulatedAttempt:
    """One simulated attempt: a timer on the clock, and its final report."""

    def __init__(self, executor: SimulatedExecutor, spec: AttemptSpec, sink: ReportSink) -> None:
        self._executor = executor
        self._spec = spec
        self._sink = sink
        self._identity = attempt_identity(spec)
        self._started_at = executor.clock.monotonic()
        self._timer: Any = None
        self._parked = False
        self._result: AttemptFinished | None = None
        self._finished = anyio.Event()
        self._checkpoint: str | None = spec.resume_from

    @property
    def spec(self) -> AttemptSpec:
        return self._spec

    @property
    def pid(self) -> int | None:
        return None

    @property
    def result(self) -> AttemptFinished | None:
        return self._result

    @property
    def done(self) -> bool:
        return self._result is not None

    def request_checkpoint(self) -> bool:
        if not self._spec.checkpointable or self._result is not None:
            return False
        elapsed = self._executor.clock.monotonic() - self._started_at
        self._checkpoint = f"sim:{elapsed:.0f}"
        report = AttemptCheckpointed(checkpoint=self._checkpoint, **self._identity)
        self._executor.deliver(self._sink, report, final=False)
        return True

    def cancel(self, *, grace: float) -> None:
        self._end("cancelled", "cancelled on request")

    async def terminate(self, grace: float) -> None:
        self.cancel(grace=grace)

    async def kill(self) -> None:
        self.cancel(grace=0.0)

    async def wait(self) -> AttemptFinished:
        await self._finished.wait()
        assert self._result is not None
        return self._result

    def _end(self, outcome: AttemptOutcome, error: str | None) -> None:
        if self._result is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._executor.unpark(self)
        runtime = max(0.0, self._executor.clock.monotonic() - self._started_at)
        self._result = AttemptFinished(
            outcome=outcome,
            error=error,
            checkpoint=self._checkpoint,
            runtime_s=runtime,
            **self._identity,
        )
        self._executor.attempts.discard(self)
        self._executor.deliver(self._sink, self._result, final=True, attempt=self)


class SimulatedExecutor:
    """Attempts that take ``duration(spec)`` clock seconds and end with ``outcome(spec)``."""

    def __init__(
        self, *, duration: Duration, outcome: Outcome, clock: Clock, task_group: TaskGroup
    ) -> None:
        self.clock = clock
        self._duration = duration
        self._outcome = outcome
        self._task_group = task_group
        self.attempts: set[_SimulatedAttempt] = set()

    def running(self) -> tuple[AttemptHandle, ...]:
        return tuple(self.attempts)

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        attempt = _SimulatedAttempt(self, spec, report)
        self.attempts.add(attempt)
        await report(AttemptStarted(pid=None, log_path=None, **attempt_identity(spec)))
        seconds = max(0.0, float(self._duration(spec)))
        clock = self.clock
        if isinstance(clock, VirtualClock):
            # The node holds a unit of activity for the attempt until its final report: park
            # it while the attempt "runs", or a virtual clock would never move.
            attempt._parked = clock.activity.park()

            def done() -> None:
                attempt._end(self._outcome(spec), None)

            attempt._timer = clock.call_at(clock.monotonic() + seconds, done)
        else:

            async def run() -> None:
                await clock.sleep(seconds)
                attempt._end(self._outcome(spec), None)

            self._task_group.start_soon(run)
        return attempt

    def unpark(self, attempt: _SimulatedAttempt) -> None:
        """Take the attempt's unit of activity back (it ends now)."""
        if attempt._parked:
            attempt._parked = False
            activity = self.clock.activity
            if activity is not None:
                activity.acquire()

    def deliver(
        self,
        sink: ReportSink,
        report: AttemptCheckpointed | AttemptFinished,
        *,
        final: bool,
        attempt: _SimulatedAttempt | None = None,
    ) -> None:
        """Send a report from a timer or a request (not a task): in a task of its own."""

        async def send() -> None:
            try:
                await sink(report)
            finally:
                if final and attempt is not None:
                    attempt._finished.set()

        self._task_group.start_soon(send)

    async def _shutdown(self) -> None:
        for attempt in list(self.attempts):
            attempt.cancel(grace=0.0)


@asynccontextmanager
async def open_simulated_executor(
    *,
    duration: Duration,
    outcome: Outcome | None = None,
    clock: Clock,
) -> AsyncIterator[SimulatedExecutor]:
    """Open a simulated executor whose attempts last ``duration(spec)`` clock seconds.

    ``outcome(spec)`` decides how each ends (default: ``completed``).
    """
    async with anyio.create_task_group() as task_group:
        executor = SimulatedExecutor(
            duration=duration,
            outcome=outcome or (lambda spec: "completed"),
            clock=clock,
            task_group=task_group,
        )
        try:
            yield executor
        finally:
            await executor._shutdown()
            task_group.cancel_scope.cancel()
