"""The in-process executor: runs registered async callables.

For embedding taskfarm in an async application and for fast tests: an attempt is one task in
the executor's task group, with the same stop rules as a process (see ``_base.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from actors._errors import ExecutorError, UnknownFunctionError
from runtime import Clock, ConfigurationError, SystemClock, get_logger

from ._base import BaseAttempt, ExecutorBase, check_grace, owning
from ._interface import (
    AttemptCheckpointed,
    AttemptHandle,
    AttemptMetric,
    AttemptPreview,
    AttemptProgress,
    AttemptSpec,
    ReportSink,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

__all__ = ["AttemptContext", "InProcessExecutor", "Work", "open_inprocess_executor"]

_log = get_logger("actors.executor")


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


class _InProcessAttempt(BaseAttempt):
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
                # MemoryError is the in-process kernel OOM killer's counterpart.
                outcome = "oom" if isinstance(failure, MemoryError) else "failed"
                result = self._finish(outcome, exit_code=None, error=error)
            await self._report_final(result)
        finally:
            self._release_waiters()


class InProcessExecutor(ExecutorBase):
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
    check_grace(terminate_grace)
    chosen = clock if clock is not None else SystemClock()
    async with owning(
        lambda task_group: InProcessExecutor(
            registry, task_group=task_group, clock=chosen, terminate_grace=terminate_grace
        )
    ) as executor:
        yield executor
