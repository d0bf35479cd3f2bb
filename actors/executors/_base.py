"""The machinery every executor shares.

An attempt runs as one task in its executor's task group.  It stops for the first of: its work
ending, a stop request (``cancel``/``terminate``/``kill``), ``max_runtime`` or
``stall_timeout`` on the injected clock.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import anyio

from actors._errors import ExecutorError
from runtime import Clock, ConfigurationError, get_logger

from ._interface import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptOutcome,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    ReportSink,
    attempt_identity,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

__all__ = ["BaseAttempt", "ExecutorBase", "check_grace", "owning"]

_log = get_logger("actors.executor")

# Beyond the grace period, how long closing an executor waits for attempts to report their end
# (reaping processes, draining pipes) before it cancels them outright.
_SHUTDOWN_MARGIN = 5.0


class BaseAttempt:
    """One attempt: its identity, stop bookkeeping, watchdog and final result."""

    def __init__(self, spec: AttemptSpec, sink: ReportSink, *, clock: Clock, grace: float) -> None:
        self._spec = spec
        self._sink = sink
        self._clock = clock
        self._grace = grace
        self._identity = attempt_identity(spec)
        self._started_at = clock.monotonic()
        self._last_report_at = self._started_at
        self._stop_reason: tuple[AttemptOutcome, str] | None = None
        self._kill_at = math.inf
        self._checkpoint: str | None = None
        self._exited = anyio.Event()
        self._finished = anyio.Event()
        self._result: AttemptFinished | None = None

    @property
    def spec(self) -> AttemptSpec:
        return self._spec

    @property
    def result(self) -> AttemptFinished | None:
        return self._result

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def request_checkpoint(self) -> bool:
        raise NotImplementedError

    def cancel(self, *, grace: float) -> None:
        self._stop("cancelled", "cancelled on request", grace)

    async def terminate(self, grace: float) -> None:
        self.cancel(grace=grace)
        await self._exited.wait()

    async def kill(self) -> None:
        self.cancel(grace=0.0)
        await self._exited.wait()

    async def wait(self) -> AttemptFinished:
        await self._finished.wait()
        assert self._result is not None
        return self._result

    # -- for subclasses ---------------------------------------------------------------------

    def _stop(self, outcome: AttemptOutcome, error: str, grace: float) -> None:
        """Record why the attempt stops (the first reason wins) and bring its kill time forward."""
        if self._exited.is_set():
            return
        if self._stop_reason is None:
            self._stop_reason = (outcome, error)
        kill_at = self._clock.monotonic() + max(0.0, grace)
        if kill_at < self._kill_at:
            self._kill_at = kill_at
            self._stop_changed()

    def _stop_changed(self) -> None:
        """React to a new or earlier kill time (subclasses deliver it to the work)."""
        raise NotImplementedError

    async def _emit(self, report: AttemptReport) -> None:
        self._last_report_at = self._clock.monotonic()
        if isinstance(report, AttemptCheckpointed):
            self._checkpoint = report.checkpoint
        await self._sink(report)

    def _started(self, *, pid: int | None, log_path: str | None) -> AttemptStarted:
        _log.info("attempt_started", pid=pid, **self._identity)
        return AttemptStarted(pid=pid, log_path=log_path, **self._identity)

    def _finish(
        self, outcome: AttemptOutcome, *, exit_code: int | None, error: str | None
    ) -> AttemptFinished:
        runtime = max(0.0, self._clock.monotonic() - self._started_at)
        _log.info(
            "attempt_finished",
            outcome=outcome,
            exit_code=exit_code,
            error=error,
            elapsed_ms=round(runtime * 1000),
            **self._identity,
        )
        return AttemptFinished(
            outcome=outcome,
            exit_code=exit_code,
            error=error,
            checkpoint=self._checkpoint,
            runtime_s=runtime,
            **self._identity,
        )

    async def _report_final(self, result: AttemptFinished) -> None:
        """Send the final report, then release the waiters (also when sending fails)."""
        self._result = result
        try:
            await self._sink(result)
        finally:
            self._finished.set()

    def _release_waiters(self, exit_code: int | None = None) -> None:
        """Make sure nobody waits forever, also when the attempt was torn down from outside."""
        self._exited.set()
        if not self._finished.is_set():
            if self._result is None:
                # Cancelled with its executor's owner: there is nobody left to report to.
                self._result = self._finish("cancelled", exit_code=exit_code, error="torn down")
            self._finished.set()

    async def _watch(self) -> None:
        """Stop the attempt when it runs past ``max_runtime`` or reports nothing for too long;
        ask it to checkpoint ``checkpoint_warning`` before ``max_runtime`` (once)."""
        max_runtime, stall_timeout = self._spec.max_runtime, self._spec.stall_timeout
        if max_runtime is None and stall_timeout is None:
            return
        warning = self._spec.checkpoint_warning
        warn_at = (
            self._started_at + max_runtime - warning
            if max_runtime is not None and warning is not None and self._spec.checkpointable
            else math.inf
        )
        while True:
            now = self._clock.monotonic()
            deadlines = [math.inf]
            if now >= warn_at:
                warn_at = math.inf
                asked = self.request_checkpoint()
                _log.info(
                    "checkpoint_warning_sent",
                    before="max_runtime",
                    warning_s=warning,
                    delivered=asked,
                    **self._identity,
                )
            deadlines.append(warn_at)
            if max_runtime is not None:
                if now >= self._started_at + max_runtime:
                    self._stop(
                        "timed_out", f"ran past max_runtime ({max_runtime:g} s)", self._grace
                    )
                    return
                deadlines.append(self._started_at + max_runtime)
            if stall_timeout is not None:
                if now >= self._last_report_at + stall_timeout:
                    reason = f"no report for {stall_timeout:g} s (stall_timeout)"
                    self._stop("stalled", reason, self._grace)
                    return
                deadlines.append(self._last_report_at + stall_timeout)
            # A report moves the stall deadline later while we sleep; we re-check on waking.
            await self._clock.sleep_until(min(deadlines))


A = TypeVar("A", bound=BaseAttempt)


class ExecutorBase:
    """Owns the attempts' task group, the running set and the orderly shutdown."""

    def __init__(self, *, task_group: TaskGroup, clock: Clock, terminate_grace: float) -> None:
        self._task_group = task_group
        self._clock = clock
        self._terminate_grace = terminate_grace
        self._attempts: dict[int, BaseAttempt] = {}
        self._closed = False

    def running(self) -> tuple[AttemptHandle, ...]:
        """Return the attempts that have not finished yet, oldest first."""
        return tuple(a for a in self._attempts.values() if not a.done)

    async def _launch(self, attempt: A, run: Callable[..., Awaitable[None]], *args: object) -> A:
        if self._closed:
            spec = attempt.spec
            raise ExecutorError(
                "the executor is closed",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        key = id(attempt)
        self._attempts[key] = attempt

        async def _owned(*, task_status: TaskStatus[None]) -> None:
            try:
                await run(*args, task_status=task_status)
            finally:
                self._attempts.pop(key, None)

        await self._task_group.start(_owned)
        return attempt

    def _launch_nowait(self, attempt: A, run: Callable[..., Awaitable[None]]) -> A:
        """Launch like :meth:`_launch` without waiting for the start: an ``ExecutorError``
        from the start ends the attempt ``start_failed`` through its sink instead of being
        raised.

        Raises:
            ExecutorError: the executor is closed.
        """
        if self._closed:
            spec = attempt.spec
            raise ExecutorError(
                "the executor is closed",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        key = id(attempt)
        self._attempts[key] = attempt

        async def _owned() -> None:
            try:
                await run(task_status=anyio.TASK_STATUS_IGNORED)
            except ExecutorError as error:
                result = attempt._finish("start_failed", exit_code=None, error=str(error))
                attempt._result = result  # before any await: a waiter sees this, not a tear-down
                await attempt._sink(result)
            finally:
                self._attempts.pop(key, None)

        self._task_group.start_soon(_owned)
        return attempt

    async def _shutdown(self) -> None:
        """Stop every running attempt (terminate, then kill after the grace) and wait for it."""
        self._closed = True
        attempts = list(self._attempts.values())
        for attempt in attempts:
            attempt._stop("cancelled", "the executor closed", self._terminate_grace)
        for attempt in attempts:
            await attempt.wait()


E = TypeVar("E", bound=ExecutorBase)


def check_grace(terminate_grace: float) -> None:
    if not terminate_grace >= 0:
        raise ConfigurationError(
            f"must be a number of seconds >= 0, not {terminate_grace!r}", where="terminate_grace"
        )


@asynccontextmanager
async def owning(make: Callable[[TaskGroup], E]) -> AsyncIterator[E]:
    """Run an executor's attempts in a task group that outlives none of them."""
    body_error: Exception | None = None
    async with anyio.create_task_group() as task_group:
        executor = make(task_group)
        try:
            yield executor
        except Exception as error:
            # Re-raised below, unwrapped, once every attempt has stopped.
            body_error = error
        finally:
            bound = executor._terminate_grace + _SHUTDOWN_MARGIN
            with anyio.move_on_after(bound, shield=True):
                await executor._shutdown()
            task_group.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
