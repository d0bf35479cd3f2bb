"""The node actor: hands attempts to its executor and routes their reports to their jobs.

The executor may be in-process, a local subprocess runner or a remote agent (``RemoteExecutor``);
the node actor does not care about that, only about what the executor's report sink promises:

- An executor that keeps its reports durably until they are journaled (a remote agent's outbox:
  ``awaits_journaled_reports = True``) gets a sink that *asks* the job and returns once the job
  has journaled the report, which is what lets the agent drop it from its outbox.
- Any other executor (in-process, local subprocess, simulated) gets a sink that *tells* the job
  and returns at once: nothing outside this process holds the report, so there is nothing to
  acknowledge, and an ask per report (an event and a reply path each) is most of a short
  task's message cost.  Order is kept: an executor sends an attempt's reports one after the
  other, and one mailbox receives them in that order.

Either way the job judges staleness and tells this node to stop a stale attempt
(``CancelRun``); the node stops one itself only when its job is gone (passivated).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, assert_never

import anyio

from actors._errors import ExecutorError
from actors.executors import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptReport,
    AttemptSpec,
    Executor,
    ReportSink,
    RunningAttempt,
)
from runtime import (
    Actor,
    ActorRef,
    ActorStoppedError,
    AskTimeoutError,
    MessageFailedError,
    get_logger,
)

from ._messages import (
    AdoptAttempt,
    CancelRun,
    CancelRuns,
    CheckpointRun,
    PreemptRun,
    ReportAttempt,
    StartAttempt,
)
from ._settings import EngineSettings

__all__ = ["NodeActor"]

_log = get_logger("actors.node")

NodeMessage = StartAttempt | AdoptAttempt | CancelRun | CancelRuns | PreemptRun | CheckpointRun


class NodeActor(Actor[NodeMessage]):
    """One node of the farm and its executor."""

    def __init__(self, *, name: str, executor: Executor, settings: EngineSettings) -> None:
        self.name = name
        self.executor = executor
        self.settings = settings
        # Whether the executor's sink must return only once a report is journaled (see above).
        self._ask_reports = bool(getattr(executor, "awaits_journaled_reports", False))
        # Preempted attempts waiting for their checkpoint: (job, task, token, rank) -> event.
        self._checkpoints: dict[tuple[str, str, int, int], anyio.Event] = {}
        # The attempts (ranks) this node started or adopted and that have not ended: one
        # executor may serve several nodes, so its ``running()`` is not this node's alone.
        self._attempts: set[tuple[str, str, int, int]] = set()
        # Activity units held for attempts in flight (virtual clock only), by their releasers.
        self._held: set[Callable[[], None]] = set()

    async def on_stop(self) -> None:
        # Attempts that never report their end (an agent that is gone) must not hold a virtual
        # clock still forever.
        for release in list(self._held):
            release()

    async def receive(self, message: NodeMessage) -> Any:
        match message:
            case StartAttempt(spec=spec, job=job):
                start_nowait = getattr(self.executor, "start_nowait", None)
                if start_nowait is not None and not self._ask_reports:
                    # Nothing to wait for (reports are told, the work starts in the
                    # executor's own task): start it here, without a task of its own.
                    self._start_nowait(start_nowait, spec, job)
                else:
                    # Beside the handler: an executor's start returns once it was reported
                    # (journaled, for some), so awaiting it here would let a node start one
                    # attempt per journal commit.
                    self.context.start_work(lambda: self._run(spec, job), name="start")
            case AdoptAttempt(spec=spec, job=job):
                adopt = getattr(self.executor, "adopt", None)
                if adopt is not None:
                    running = RunningAttempt(
                        job_id=spec.job_id,
                        task_id=spec.task_id,
                        attempt=spec.attempt,
                        fencing_token=spec.fencing_token,
                    )
                    self._attempts.add(_key(spec))
                    adopt(running, spec, self._sink(spec, job))
            case CancelRun(job_id=job_id, task_id=task_id, token=token, grace=grace):
                self._cancel(job_id, task_id, token, grace)
            case PreemptRun(job_id=job_id, task_id=task_id, token=token, grace=grace):
                self._preempt(job_id, task_id, token, grace)
            case CheckpointRun(job_id=job_id, task_id=task_id, token=token):
                handle = self._find(job_id, task_id, token)
                if handle is not None:
                    handle.request_checkpoint()
            case CancelRuns(grace=grace):
                for handle in self._running():
                    handle.cancel(grace=grace)
            case _:
                assert_never(message)

    def _sink(
        self, spec: AttemptSpec, job: ActorRef[Any], on_final: Callable[[], None] | None = None
    ) -> ReportSink:
        async def sink(report: AttemptReport) -> None:
            if isinstance(report, AttemptFinished):
                self._attempts.discard(_key(spec))
            try:
                delivered = await self._deliver(job, report)
            finally:
                if on_final is not None and isinstance(report, AttemptFinished):
                    on_final()
            if isinstance(report, AttemptCheckpointed):
                # Told or journaled: either way the job handles it before the attempt's end,
                # which the preemption waiting on this event is about to cause.
                waiting = self._checkpoints.pop(_key(spec), None)
                if waiting is not None:
                    waiting.set()
            if not delivered and not isinstance(report, AttemptFinished):
                # The job is over (passivated), so this attempt is stale and nobody else will
                # stop it: kill the work, keep nothing.
                self._cancel(spec.job_id, spec.task_id, spec.fencing_token, 0.0)

        return sink

    def _hold(self) -> Callable[[], None]:
        """Take a unit of activity for an attempt; return what gives it back (once).

        An attempt runs in its executor's task group, in a context copied from this handler
        (one that holds a unit).  It needs a unit of its own until its final report is handed
        to its job: otherwise a virtual clock sees the farm idle while the attempt is in
        flight and jumps ahead (retries, runtimes and timeouts go wrong).
        """
        tracker = self.context.clock.activity
        held = tracker is not None

        def release() -> None:
            nonlocal held
            if held and tracker is not None:
                held = False
                self._held.discard(release)
                tracker.release()

        if tracker is not None:
            tracker.acquire()
            self._held.add(release)
        return release

    async def _run(self, spec: AttemptSpec, job: ActorRef[Any]) -> None:
        release = self._hold()
        self._attempts.add(_key(spec))
        try:
            await self.executor.start(spec, self._sink(spec, job, release))
        except ExecutorError as error:
            self._attempts.discard(_key(spec))
            release()
            self._start_failed(spec, job, error)

    def _start_nowait(
        self, start_nowait: Callable[..., object], spec: AttemptSpec, job: ActorRef[Any]
    ) -> None:
        release = self._hold()
        self._attempts.add(_key(spec))
        try:
            start_nowait(spec, self._sink(spec, job, release))
        except ExecutorError as error:
            self._attempts.discard(_key(spec))
            release()
            self._start_failed(spec, job, error)

    def _start_failed(self, spec: AttemptSpec, job: ActorRef[Any], error: ExecutorError) -> None:
        _log.warning(
            "attempt_start_failed", node_id=self.name, job_id=spec.job_id, error=str(error)
        )
        failed = AttemptFinished(
            job_id=spec.job_id,
            task_id=spec.task_id,
            attempt=spec.attempt,
            fencing_token=spec.fencing_token,
            outcome="start_failed",
            error=f"could not start on {self.name}: {error}",
        )
        # From a task: the job's mailbox may be full, and the job may be waiting for room in
        # this node's.
        self.context.start_work(lambda: self._deliver(job, failed), name="start-failed")

    async def _deliver(self, job: ActorRef[Any], report: AttemptReport) -> bool:
        """Hand a report to its job (and wait until it is journaled, if the executor needs
        that); False if the job is gone.  A stale report is the job's to refuse: it tells this
        node to stop the attempt."""
        message = ReportAttempt(report=report, node=self.name)
        if not self._ask_reports:
            if not job.is_alive:
                return False
            # No await between the check and the mailbox (unless it is full): a job that stops
            # later still handles what its mailbox holds.
            await job.tell(message)
            return True
        delay = 0.05
        while True:
            try:
                await job.ask(message, timeout=self.settings.report_timeout)
                return True
            except (ActorStoppedError, MessageFailedError):
                return False  # the job is over (passivated): this attempt is stale
            except AskTimeoutError:
                # The job is slow (its journal is busy): keep the report, try again.
                _log.warning("report_delayed", node_id=self.name, job_id=report.job_id)
                await self.context.clock.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _preempt(self, job_id: str, task_id: str, token: int, grace: float) -> None:
        """Checkpoint-then-yield: ask for a checkpoint, wait up to ``grace``, then stop."""
        handle = self._find(job_id, task_id, token)
        if handle is None:
            return
        clock = self.context.clock
        checkpointed = anyio.Event()

        async def yield_node() -> None:
            if grace > 0 and handle.request_checkpoint():
                self._checkpoints[_key(handle.spec)] = checkpointed
                async with anyio.create_task_group() as tg:

                    async def deadline() -> None:
                        await clock.sleep(grace)
                        tg.cancel_scope.cancel()

                    tg.start_soon(deadline)
                    await checkpointed.wait()
                    tg.cancel_scope.cancel()
                self._checkpoints.pop(_key(handle.spec), None)
            handle.cancel(grace=self.settings.cancel_grace)

        self.context.start_work(yield_node, name=f"preempt-{job_id}-{task_id}")

    def _running(self) -> list[AttemptHandle]:
        """The executor's attempts that run on this node.

        One executor may serve several nodes (an embedded farm or a simulation often shares
        one): a node must stop only what it runs, and only its own rank of a multi-node
        attempt (the ranks share job, task and token), or a yield meant for the leader, or a
        node taken away, stops work elsewhere.
        """
        return [h for h in self.executor.running() if _key(h.spec) in self._attempts]

    def _find(self, job_id: str, task_id: str, token: int) -> AttemptHandle | None:
        for handle in self._running():
            if _key(handle.spec)[:3] == (job_id, task_id, token):
                return handle
        return None

    def _cancel(self, job_id: str, task_id: str, token: int, grace: float) -> None:
        for handle in self._running():
            if _key(handle.spec)[:3] == (job_id, task_id, token):
                handle.cancel(grace=grace)


def _key(spec: AttemptSpec) -> tuple[str, str, int, int]:
    return (spec.job_id, spec.task_id, spec.fencing_token, spec.rank)
