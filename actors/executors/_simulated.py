"""The simulated executor: attempts that run no code and take a given time of the clock.

For what-if runs and the domains' simulated weeks: the production engine and policy on a
:class:`VirtualClock`, with each attempt lasting ``duration(spec)`` seconds (a trace, a model of
the node's speed).  It reports like any executor (started, optionally progress, then finished),
so that the engine cannot tell it from a real farm; what it saves is a task and its watchdogs per
attempt: on a virtual clock an attempt is one timer, and its unit of activity is parked while
it "runs" so that time can move.  Reports raised by timers (an end, a checkpoint, metrics) and
by :meth:`SimulatedExecutor.start_nowait` wait in one queue per executor, which one task
hands to the sinks in order: no task per report, and an attempt's reports keep their order.

An attempt models a program that checkpoints when asked (SIGUSR1 and preemption alike): a
checkpoint takes ``checkpoint_cost(spec)`` seconds, during which the attempt makes no progress
(its end moves later by as much), and records the work done so far counting earlier attempts',
as ``sim:<seconds>``: ``simulated_work(spec.resume_from)`` is what a resumed attempt need not
redo, so ``duration(spec)`` can subtract it.  ``metrics(spec)`` are reported before a
successful end (as ``@taskfarm metric`` lines would be).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from runtime import Clock, VirtualClock, get_logger

from ._interface import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptMetric,
    AttemptOutcome,
    AttemptSpec,
    AttemptStarted,
    ReportSink,
    attempt_identity,
)

_Queued = AttemptStarted | AttemptCheckpointed | AttemptMetric | AttemptFinished

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["SimulatedExecutor", "open_simulated_executor", "simulated_work"]

_log = get_logger("actors.executor")

Duration = Callable[[AttemptSpec], float]
Outcome = Callable[[AttemptSpec], AttemptOutcome]
Metrics = Callable[[AttemptSpec], Mapping[str, float]]


def simulated_work(checkpoint: str | None) -> float:
    """Return the seconds of work a simulated checkpoint (``sim:<seconds>``) records (0 for
    None or any other checkpoint)."""
    if checkpoint is None or not checkpoint.startswith("sim:"):
        return 0.0
    try:
        return max(0.0, float(checkpoint[4:]))
    except ValueError:
        return 0.0


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
        self._seconds = 0.0
        self._base = simulated_work(spec.resume_from)
        self._overhead = 0.0  # seconds spent writing checkpoints (no progress meanwhile)
        self._writing: Any = None  # the timer of a checkpoint being written

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
        if self._writing is not None:
            return True  # one is being written: it answers this request too
        executor = self._executor
        cost = max(0.0, float(executor.checkpoint_cost(self._spec)))
        clock = executor.clock
        if cost <= 0 or not isinstance(clock, VirtualClock):
            self._write_checkpoint()
            return True
        # Writing takes ``cost`` seconds of the attempt: its end moves later by as much.
        self._overhead += cost
        if self._timer is not None:
            self._timer.cancel()
            self._timer = clock.call_at(self._ends_at(), self._done)
        self._writing = clock.call_at(clock.monotonic() + cost, self._write_checkpoint)
        return True

    def _write_checkpoint(self) -> None:
        self._writing = None
        if self._result is not None:
            return
        elapsed = self._executor.clock.monotonic() - self._started_at
        work = self._base + max(0.0, elapsed - self._overhead)
        self._checkpoint = f"sim:{work:.0f}"
        report = AttemptCheckpointed(checkpoint=self._checkpoint, **self._identity)
        self._executor.deliver(self._sink, report, final=False)

    def _ends_at(self) -> float:
        return self._started_at + self._seconds + self._overhead

    def _done(self) -> None:
        outcome = self._executor.outcome(self._spec)
        if outcome == "completed":
            for name, value in self._executor.metrics(self._spec).items():
                report = AttemptMetric(name=name, value=float(value), **self._identity)
                self._executor.deliver(self._sink, report, final=False)
        self._end(outcome, None)

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
        if self._writing is not None:
            self._writing.cancel()
            self._writing = None
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
        self,
        *,
        duration: Duration,
        outcome: Outcome,
        clock: Clock,
        task_group: TaskGroup,
        checkpoint_cost: Duration | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.clock = clock
        self._duration = duration
        self.outcome = outcome
        self.checkpoint_cost: Duration = checkpoint_cost or (lambda spec: 0.0)
        self.metrics: Metrics = metrics or (lambda spec: {})
        self._task_group = task_group
        self.attempts: set[_SimulatedAttempt] = set()
        # Reports waiting for their sink, oldest first, with the attempt a final one ends.
        self._queue: deque[tuple[ReportSink, _Queued, _SimulatedAttempt | None]] = deque()
        self._sending = False  # whether the sender task is (or is about to be) at work
        self._sender_started = False
        self._wakeup = anyio.Event()

    def running(self) -> tuple[AttemptHandle, ...]:
        return tuple(self.attempts)

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        attempt = _SimulatedAttempt(self, spec, report)
        self.attempts.add(attempt)
        await report(AttemptStarted(pid=None, log_path=None, **attempt_identity(spec)))
        self._run(attempt)
        return attempt

    def start_nowait(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        """Start an attempt and return its handle at once: its :class:`AttemptStarted` waits
        in the executor's queue, ahead of the attempt's later reports (no task of its own)."""
        attempt = _SimulatedAttempt(self, spec, report)
        self.attempts.add(attempt)
        started = AttemptStarted(pid=None, log_path=None, **attempt_identity(spec))
        self.deliver(report, started, final=False)
        self._run(attempt)
        return attempt

    def _run(self, attempt: _SimulatedAttempt) -> None:
        spec = attempt.spec
        seconds = max(0.0, float(self._duration(spec)))
        attempt._seconds = seconds
        clock = self.clock
        if isinstance(clock, VirtualClock):
            # The node holds a unit of activity for the attempt until its final report: park
            # it while the attempt "runs", or a virtual clock would never move.
            attempt._parked = clock.activity.park()
            attempt._timer = clock.call_at(attempt._ends_at(), attempt._done)
        else:

            async def run() -> None:
                await clock.sleep(seconds)
                attempt._done()

            self._task_group.start_soon(run)

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
        report: _Queued,
        *,
        final: bool,
        attempt: _SimulatedAttempt | None = None,
    ) -> None:
        """Queue a report raised outside a task (a timer, a request) for the sender task."""
        self._queue.append((sink, report, attempt if final else None))
        if self._sending:
            return
        self._sending = True
        # The sender holds a unit of activity while reports wait, taken here before it is
        # woken (as every waker does), so a virtual clock cannot move past a report in flight.
        activity = self.clock.activity
        if activity is not None:
            activity.acquire()
        if self._sender_started:
            self._wakeup.set()
        else:
            self._sender_started = True
            self._task_group.start_soon(self._send)

    async def _send(self) -> None:
        """Hand queued reports to their sinks in order, for as long as the executor is open."""
        queue = self._queue
        activity = self.clock.activity
        try:
            while True:
                while queue:
                    sink, report, ended = queue.popleft()
                    try:
                        await sink(report)
                    finally:
                        if ended is not None:
                            ended._finished.set()
                self._sending = False
                if activity is not None:
                    activity.release()
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
        finally:
            if self._sending and activity is not None:
                self._sending = False
                activity.release()

    async def _shutdown(self) -> None:
        for attempt in list(self.attempts):
            attempt.cancel(grace=0.0)


@asynccontextmanager
async def open_simulated_executor(
    *,
    duration: Duration,
    outcome: Outcome | None = None,
    clock: Clock,
    checkpoint_cost: Duration | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[SimulatedExecutor]:
    """Open a simulated executor whose attempts last ``duration(spec)`` clock seconds.

    ``outcome(spec)`` decides how each ends (default: ``completed``); a checkpoint takes
    ``checkpoint_cost(spec)`` seconds of the attempt (default 0); ``metrics(spec)`` are
    reported before a successful end (see the module docstring).
    """
    async with anyio.create_task_group() as task_group:
        executor = SimulatedExecutor(
            duration=duration,
            outcome=outcome or (lambda spec: "completed"),
            clock=clock,
            task_group=task_group,
            checkpoint_cost=checkpoint_cost,
            metrics=metrics,
        )
        try:
            yield executor
        finally:
            await executor._shutdown()
            task_group.cancel_scope.cancel()
