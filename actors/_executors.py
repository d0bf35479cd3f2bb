"""The machinery every executor shares, and the in-process executor.

An attempt runs as one task in its executor's task group.  It stops for the first of: its work
ending, a stop request (``cancel``/``terminate``/``kill``), ``max_runtime`` or
``stall_timeout`` on the injected clock.  The in-process executor runs registered async
callables, for embedding taskfarm in an async application and for fast tests.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from runtime import Clock, ConfigurationError, SystemClock, get_logger

from ._executor import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptMetric,
    AttemptOutcome,
    AttemptPreview,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    ExecutorError,
    ReportSink,
    UnknownFunctionError,
    attempt_identity,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

__all__ = [
    "AttemptContext",
    "InProcessExecutor",
    "Work",
    "open_inprocess_executor",
]

_log = get_logger("actors.executor")

# Beyond the grace period, how long closing an executor waits for attempts to report their end
# (reaping processes, draining pipes) before it cancels them outright.
_SHUTDOWN_MARGIN = 5.0


class _Attempt:
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
        """Stop the attempt when it runs past ``max_runtime`` or reports nothing for too long."""
        max_runtime, stall_timeout = self._spec.max_runtime, self._spec.stall_timeout
        if max_runtime is None and stall_timeout is None:
            return
        while True:
            now = self._clock.monotonic()
            deadlines = [math.inf]
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


A = TypeVar("A", bound=_Attempt)


class _ExecutorBase:
    """Owns the attempts' task group, the running set and the orderly shutdown."""

    def __init__(self, *, task_group: TaskGroup, clock: Clock, terminate_grace: float) -> None:
        self._task_group = task_group
        self._clock = clock
        self._terminate_grace = terminate_grace
        self._attempts: dict[int, _Attempt] = {}
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

    async def _shutdown(self) -> None:
        """Stop every running attempt (terminate, then kill after the grace) and wait for it."""
        self._closed = True
        attempts = list(self._attempts.values())
        for attempt in attempts:
            attempt._stop("cancelled", "the executor closed", self._terminate_grace)
        for attempt in attempts:
            await attempt.wait()


E = TypeVar("E", bound=_ExecutorBase)


def _check_grace(terminate_grace: float) -> None:
    if not terminate_grace >= 0:
        raise ConfigurationError(
            f"must be a number of seconds >= 0, not {terminate_grace!r}", where="terminate_grace"
        )


@asynccontextmanager
async def _owning(make: Callable[[TaskGroup], E]) -> AsyncIterator[E]:
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


# -- in-process -------------------------------------------------------------------------------


class AttemptContext:
    """What an in-process work function gets: its spec and a way to report back.

    Built by the executor; the work never builds one.
    """

    def __init__(self, attempt: _InProcessAttempt) -> None:
        self._attempt = attempt
        self._checkpoint_requested = anyio.Event()

    @property
    def spec(self) -> AttemptSpec:
        """Return the attempt's spec."""
        return self._attempt.spec

    @property
    def arguments(self) -> Mapping[str, Any]:
        """Return the arguments the job gave the function."""
        return self._attempt.spec.arguments

    @property
    def resume_from(self) -> str | None:
        """Return the checkpoint an earlier attempt reported, to resume from (None: start over)."""
        return self._attempt.spec.resume_from

    @property
    def clock(self) -> Clock:
        """Return the executor's clock (sleep on it so virtual-time runs stay virtual)."""
        return self._attempt._clock

    @property
    def checkpoint_requested(self) -> anyio.Event:
        """Return the event set when a checkpoint is requested.

        Reporting a checkpoint serves the request and arms a fresh event, so read this property
        again rather than keeping the event.
        """
        return self._checkpoint_requested

    async def progress(self, fraction: float, message: str = "") -> None:
        """Report the fraction (0 to 1) of the work done.

        Raises:
            ConfigurationError: ``fraction`` is not between 0 and 1.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ConfigurationError(f"must be between 0 and 1, not {fraction!r}", where="fraction")
        await self._attempt._emit(
            AttemptProgress(fraction=fraction, message=message, **self._attempt._identity)
        )

    async def checkpoint(self, checkpoint: str) -> None:
        """Report a checkpoint (a token or a path) that a later attempt can resume from."""
        if self._checkpoint_requested.is_set():
            self._checkpoint_requested = anyio.Event()
        await self._attempt._emit(
            AttemptCheckpointed(checkpoint=checkpoint, **self._attempt._identity)
        )

    async def preview(self, path: str) -> None:
        """Report a preview (or other partial output) written at ``path``."""
        await self._attempt._emit(AttemptPreview(path=path, **self._attempt._identity))

    async def metric(self, name: str, value: float) -> None:
        """Report a named measurement."""
        await self._attempt._emit(AttemptMetric(name=name, value=value, **self._attempt._identity))


Work = Callable[[AttemptContext], Awaitable[None]]
"""An in-process work function: ``async def render(ctx: AttemptContext) -> None``."""


class _InProcessAttempt(_Attempt):
    def __init__(self, spec: AttemptSpec, sink: ReportSink, *, clock: Clock, grace: float) -> None:
        super().__init__(spec, sink, clock=clock, grace=grace)
        self._context = AttemptContext(self)
        self._scope: anyio.CancelScope | None = None

    @property
    def pid(self) -> int | None:
        return None

    def request_checkpoint(self) -> bool:
        if not self._spec.checkpointable or self._exited.is_set():
            return False
        self._context._checkpoint_requested.set()
        return True

    def _stop_changed(self) -> None:
        # A coroutine cannot be stopped more gently than by cancellation: the grace is moot.
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, work: Work, *, task_status: TaskStatus[None]) -> None:
        try:
            await self._emit(self._started(pid=None, log_path=None))
            task_status.started()
            returned = False
            failure: Exception | None = None

            async def call(done: anyio.CancelScope) -> None:
                nonlocal returned, failure
                try:
                    await work(self._context)
                    returned = True
                except Exception as error:
                    failure = error
                finally:
                    done.cancel()

            with anyio.CancelScope() as self._scope:
                if self._stop_reason is not None:
                    self._scope.cancel()
                if self._spec.max_runtime is None and self._spec.stall_timeout is None:
                    # Nothing to watch: run the work in this task (two task spawns fewer).
                    await call(self._scope)
                else:
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(self._watch)
                        task_group.start_soon(call, task_group.cancel_scope)
            self._scope = None
            self._exited.set()
            # Work that returned completed, even if a stop request came too late to reach it.
            if returned:
                result = self._finish("completed", exit_code=None, error=None)
            elif self._stop_reason is not None:
                outcome, reason = self._stop_reason
                result = self._finish(outcome, exit_code=None, error=reason)
            else:
                assert failure is not None
                _log.warning(
                    "attempt_work_failed",
                    exc_info=failure,
                    function=self._spec.function,
                    **self._identity,
                )
                error = f"{type(failure).__name__}: {failure}"
                result = self._finish("failed", exit_code=None, error=error)
            await self._report_final(result)
        finally:
            self._release_waiters()


class InProcessExecutor(_ExecutorBase):
    """Runs registered async callables as attempts, in the caller's event loop.

    Built by :func:`open_inprocess_executor`.  ``terminate``, ``kill`` and timeouts cancel the
    work (so its ``finally`` blocks and ``async with`` exits run); an exception from it makes the
    attempt ``failed`` with the exception as the error.  A checkpoint request sets
    ``ctx.checkpoint_requested``.
    """

    def __init__(
        self,
        registry: Mapping[str, Work],
        *,
        task_group: TaskGroup,
        clock: Clock,
        terminate_grace: float,
    ) -> None:
        super().__init__(task_group=task_group, clock=clock, terminate_grace=terminate_grace)
        self._registry = dict(registry)

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        """Start the function ``spec.function`` names; return once it was reported started.

        Raises:
            UnknownFunctionError: no function of that name is registered.
            ExecutorError: the spec has an ``argv`` (a command), or the executor is closed.
        """
        if spec.function is None:
            raise ExecutorError(
                "the in-process executor runs functions; this spec has a command (argv)",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        work = self._registry.get(spec.function)
        if work is None:
            raise UnknownFunctionError(
                function=spec.function,
                known=tuple(sorted(self._registry)),
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        attempt = _InProcessAttempt(spec, report, clock=self._clock, grace=self._terminate_grace)
        return await self._launch(attempt, attempt._run, work)


@asynccontextmanager
async def open_inprocess_executor(
    registry: Mapping[str, Work],
    *,
    clock: Clock | None = None,
    terminate_grace: float = 10.0,
) -> AsyncIterator[InProcessExecutor]:
    """Open an executor for the async functions in ``registry`` (name -> function).

    On exit, running attempts are cancelled (outcome ``cancelled``) and awaited.

    Raises:
        ConfigurationError: ``terminate_grace`` is negative.
    """
    _check_grace(terminate_grace)
    chosen = clock if clock is not None else SystemClock()
    async with _owning(
        lambda task_group: InProcessExecutor(
            registry, task_group=task_group, clock=chosen, terminate_grace=terminate_grace
        )
    ) as executor:
        yield executor
