"""The job actor: the only writer of its job's stream, the judge of its attempts' reports.

It journals every decision before acting on it: an assignment before the attempt is sent to its
node, an outcome before the scheduler frees the node.  A report whose fencing token is not the
task's current one is stale: it is refused (the node then kills that work) and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, assert_never

from actors.executors import (
    FRAME_SEQUENCE,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptMetric,
    AttemptPreview,
    AttemptProgress,
    AttemptSpec,
    AttemptStarted,
)
from persistence import Event, EventSourcedActor, Journal
from runtime import ActorRef, get_logger

from ._events import (
    JobAggregate,
    JobCancelRequested,
    JobFinished,
    JobState,
    JobSubmitted,
    NodeBlocklisted,
    TaskAssigned,
    TaskCancelled,
    TaskCheckpointed,
    TaskCompleted,
    TaskFailed,
    TaskMetricRecorded,
    TaskPreempted,
    TaskPreviewed,
    TaskProgressed,
    TaskRequeued,
    TaskStarted,
    job_stream,
)
from ._graph import Outcome
from ._messages import (
    AttemptLost,
    CancelJob,
    CancelRun,
    ClaimAttempt,
    CreateJob,
    Dispatch,
    GetJobSummary,
    JobEnded,
    PreemptRun,
    PreemptTask,
    ReportAttempt,
    StartAttempt,
    TaskEnded,
    Unplace,
)
from ._settings import EngineSettings
from ._summaries import JobSummary, TaskSummary

__all__ = ["JobActor", "job_summary"]

_log = get_logger("actors.job")

JobMessage = (
    CreateJob
    | Dispatch
    | ReportAttempt
    | AttemptLost
    | ClaimAttempt
    | PreemptTask
    | CancelJob
    | GetJobSummary
)

_OUTCOME_OF_STATUS = {
    "completed": Outcome.SUCCEEDED,
    "failed": Outcome.FAILED,
    "cancelled": Outcome.CANCELLED,
}


class JobActor(EventSourcedActor[JobMessage, JobState]):
    """One job: its tasks' attempts, retries, checkpoints and outcome."""

    # Reports from many attempts of one job arrive together: one commit for all of them.
    max_batch = 128

    def __init__(
        self,
        *,
        job_id: str,
        journal: Journal,
        scheduler: ActorRef[Any],
        node_ref: Callable[[str], ActorRef[Any] | None],
        settings: EngineSettings,
        recovered: tuple[JobState, int] | None = None,
    ) -> None:
        super().__init__(
            journal=journal,
            stream_id=job_stream(job_id),
            aggregate=JobAggregate(),
            snapshot_every=settings.snapshot_every,
            recovered=recovered,
        )
        self.job_id = job_id
        self.scheduler = scheduler
        self.node_ref = node_ref
        self.settings = settings

    async def handle(self, command: JobMessage) -> Any:
        match command:
            case CreateJob(spec=spec):
                if self.version == 0:
                    await self.persist([JobSubmitted(job=spec, submitted_at=self.clock.now())])
                self._scale_snapshots()
                return None
            case Dispatch(placements=placements):
                await self._dispatch(placements)
                return None
            case ReportAttempt(report=report):
                return await self._on_report(report)
            case AttemptLost(task=task, node=node, reason=reason):
                current = self.state.tasks[task]
                if current.node == node:
                    await self._requeue(task, current.token, reason)
                return None
            case ClaimAttempt(task=task, token=token, node=node):
                # The reply is the attempt's spec when the claim is current, else None.  A job
                # cancelled (or failed) while the agent was away refuses it too: the agent then
                # kills the attempt, whose final report ends the task.
                current = self.state.tasks[task]
                if (
                    current.token == token
                    and current.node == node
                    and current.status in ("assigned", "running")
                    and self.state.status == "active"
                ):
                    return self._attempt_spec(task, current.attempt, token)
                return None
            case PreemptTask(task=task, node=node, reason=reason):
                await self._preempt(task, node, reason)
                return None
            case CancelJob(reason=reason):
                await self._cancel(reason)
                return job_summary(self.job_id, self.state, tasks=False)
            case GetJobSummary(tasks=tasks):
                return job_summary(self.job_id, self.state, tasks=tasks)
            case _:
                assert_never(command)

    @property
    def clock(self) -> Any:
        return self.context.clock

    async def _after(self, ref: ActorRef[Any], message: Any) -> None:
        """Tell ``ref`` once what was persisted so far is durable."""
        await self.after_commit(lambda: ref.tell(message))

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch(self, placements: tuple[tuple[int, str], ...]) -> None:
        state = self.state
        spec = state.job
        events: list[Event] = []
        accepted: list[tuple[int, str, int, int]] = []
        version = self.version
        for task_index, node in placements:
            task = state.tasks[task_index]
            if spec is None or state.status != "active" or task.status != "pending":
                await self._after(self.scheduler, Unplace(job_id=self.job_id, task=task_index))
                continue
            attempt = task.attempt + 1
            token = version + len(events) + 1  # the version this TaskAssigned will get
            events.append(
                TaskAssigned(
                    task=task_index,
                    attempt=attempt,
                    token=token,
                    node=node,
                    resume_from=task.checkpoint,
                )
            )
            accepted.append((task_index, node, attempt, token))
        if not events:
            return
        await self.persist(events)
        for task_index, node, attempt, token in accepted:
            ref = self.node_ref(node)
            if ref is None:
                await self._requeue(task_index, token, f"node {node} left before dispatch")
                continue
            await ref.tell(
                StartAttempt(
                    spec=self._attempt_spec(task_index, attempt, token), job=self.context.self_ref
                )
            )

    def _attempt_spec(self, index: int, attempt: int, token: int) -> AttemptSpec:
        spec = self.state.job
        assert spec is not None
        task = self.state.tasks[index]
        invocations = spec.invocations(index, attempt=attempt)
        # A task that runs one process per frame runs them in sequence in one shell-free
        # runner: the engine's frame runner executes each argv and stops at the first failure.
        if len(invocations) == 1:
            argv = invocations[0].argv
        else:
            argv = _sequence_argv([inv.argv for inv in invocations])
        first = invocations[0]
        function = None
        arguments: dict[str, Any] = {}
        if argv and argv[0].startswith("inprocess:"):
            function, argv = argv[0].removeprefix("inprocess:"), ()
            arguments = {"args": list(invocations[0].argv[1:])}
        return AttemptSpec(
            job_id=self.job_id,
            task_id=str(index),
            attempt=attempt,
            fencing_token=token,
            argv=argv,
            function=function,
            arguments=arguments,
            env=dict(first.env),
            cwd=first.cwd,
            output_dir=first.output,
            resume_from=task.checkpoint,
            checkpointable=spec.checkpointable,
            max_runtime=spec.timeouts.max_runtime,
            stall_timeout=spec.timeouts.stall,
        )

    # -- reports --------------------------------------------------------------------------------

    async def _on_report(self, report: Any) -> bool:
        state = self.state
        index = _task_index(report.task_id, len(state.tasks))
        if index is None:
            return False
        task = state.tasks[index]
        token = report.fencing_token
        if task.token != token or task.status not in ("assigned", "running"):
            _log.info(
                "stale_report_rejected",
                job_id=self.job_id,
                task=index,
                token=token,
                current=task.token,
                report=type(report).__name__,
            )
            return False
        match report:
            case AttemptStarted(pid=pid):
                if task.status == "assigned":
                    await self.persist([TaskStarted(task=index, token=token, pid=pid)])
            case AttemptProgress(fraction=fraction):
                if int(fraction * 10) > int(task.progress * 10):
                    await self.persist([TaskProgressed(task=index, token=token, fraction=fraction)])
            case AttemptCheckpointed(checkpoint=checkpoint):
                await self.persist(
                    [TaskCheckpointed(task=index, token=token, checkpoint=checkpoint)]
                )
            case AttemptPreview(path=path):
                await self.persist([TaskPreviewed(task=index, token=token, path=path)])
            case AttemptMetric(name=name, value=value):
                await self.persist(
                    [TaskMetricRecorded(task=index, token=token, name=name, value=value)]
                )
            case AttemptFinished():
                await self._on_finished(index, report)
        return True

    async def _on_finished(self, index: int, report: AttemptFinished) -> None:
        state = self.state
        spec = state.job
        assert spec is not None
        task = state.tasks[index]
        token = report.fencing_token
        node = task.node
        events: list[Event] = []
        if report.checkpoint and report.checkpoint != task.checkpoint:
            events.append(TaskCheckpointed(task=index, token=token, checkpoint=report.checkpoint))
        if report.outcome == "completed":
            events.append(TaskCompleted(task=index, token=token, runtime_s=report.runtime_s))
            await self.persist(events)
            await self._after(
                self.scheduler, TaskEnded(job_id=self.job_id, task=index, outcome=Outcome.SUCCEEDED)
            )
            await self._finish_if_done()
            return
        if report.outcome in ("cancelled", "lost"):
            if state.status == "cancelling":
                events.append(TaskCancelled(task=index, reason=state.reason or "cancelled"))
                await self.persist(events)
                await self._after(
                    self.scheduler,
                    TaskEnded(job_id=self.job_id, task=index, outcome=Outcome.CANCELLED),
                )
                await self._finish_if_done()
            else:  # preempted, or lost with its node's contact: not the task's fault
                reason = "preempted" if report.outcome == "cancelled" else report.error or "lost"
                events.append(TaskRequeued(task=index, token=token, reason=reason))
                await self.persist(events)
                await self._after(
                    self.scheduler, TaskEnded(job_id=self.job_id, task=index, outcome=None)
                )
            return
        # failed, timed out or stalled: the task's fault, counted against its attempts
        now = self.clock.now()
        retry = task.failures + 1 < spec.retries.max_attempts and state.status == "active"
        retry_at = now + timedelta(seconds=spec.retries.delay(task.attempt + 1)) if retry else None
        events.append(
            TaskFailed(
                task=index,
                token=token,
                outcome=report.outcome,
                error=report.error,
                exit_code=report.exit_code,
                retry_at=retry_at,
            )
        )
        blocklist_until = None
        failures_here = sum(1 for t in state.tasks if t.last_node == node and t.failures) + 1
        if node is not None and failures_here >= self.settings.blocklist_after:
            blocklist_until = now + timedelta(seconds=self.settings.blocklist_for)
            events.append(
                NodeBlocklisted(
                    node=node, until=blocklist_until, reason=f"{failures_here} failed attempts"
                )
            )
        await self.persist(events)
        await self._after(
            self.scheduler,
            TaskEnded(
                job_id=self.job_id,
                task=index,
                outcome=None if retry else Outcome.FAILED,
                retry_at=retry_at,
                failed_on_node=True,
                blocklist_node=node if blocklist_until else None,
                blocklist_until=blocklist_until,
            ),
        )
        if not retry:
            await self._fail_job(
                f"task {index} failed after {task.failures} attempt(s): {task.last_error}"
            )

    async def _preempt(self, index: int, node: str, reason: str) -> None:
        """Journal the preemption, then ask the node to checkpoint and yield the attempt."""
        task = self.state.tasks[index]
        spec = self.state.job
        if (
            spec is None
            or not spec.preemptible
            or task.node != node
            or task.status not in ("assigned", "running")
        ):
            return
        token = task.token
        await self.persist([TaskPreempted(task=index, token=token, node=node, reason=reason)])
        ref = self.node_ref(node)
        if ref is not None:
            grace = self.settings.preempt_grace if spec.checkpointable else 0.0
            run = PreemptRun(job_id=self.job_id, task_id=str(index), token=token, grace=grace)
            await self._after(ref, run)

    async def _requeue(self, index: int, token: int, reason: str) -> None:
        task = self.state.tasks[index]
        if task.token != token or task.status not in ("assigned", "running"):
            return
        if self.state.status == "cancelling":
            await self.persist([TaskCancelled(task=index, reason=reason)])
            await self._after(
                self.scheduler, TaskEnded(job_id=self.job_id, task=index, outcome=Outcome.CANCELLED)
            )
            await self._finish_if_done()
            return
        await self.persist([TaskRequeued(task=index, token=token, reason=reason)])
        await self._after(self.scheduler, TaskEnded(job_id=self.job_id, task=index, outcome=None))

    # -- ends -----------------------------------------------------------------------------------

    async def _cancel(self, reason: str) -> None:
        state = self.state
        if state.status != "active":
            return
        events: list[Event] = [JobCancelRequested(reason=reason)]
        pending = [i for i, t in enumerate(state.tasks) if t.status == "pending"]
        events.extend(TaskCancelled(task=i, reason=reason) for i in pending)
        await self.persist(events)
        for index in pending:
            await self._after(
                self.scheduler, TaskEnded(job_id=self.job_id, task=index, outcome=Outcome.CANCELLED)
            )
        await self._stop_active_attempts(reason)
        await self._finish_if_done()

    async def _fail_job(self, reason: str) -> None:
        state = self.state
        pending = [i for i, t in enumerate(state.tasks) if t.status == "pending"]
        events: list[Event] = [JobCancelRequested(reason=reason)]
        events.extend(TaskCancelled(task=i, reason=reason) for i in pending)
        await self.persist(events)
        for index in pending:
            await self._after(
                self.scheduler, TaskEnded(job_id=self.job_id, task=index, outcome=Outcome.CANCELLED)
            )
        await self._stop_active_attempts(reason)
        await self._finish_if_done(failed=reason)

    async def _stop_active_attempts(self, reason: str) -> None:
        for index in self.state.active_attempts():
            task = self.state.tasks[index]
            ref = self.node_ref(task.node) if task.node else None
            if ref is not None:
                cancel = CancelRun(
                    job_id=self.job_id,
                    task_id=str(index),
                    token=task.token,
                    grace=self.settings.cancel_grace,
                )
                await self._after(ref, cancel)

    async def _finish_if_done(self, *, failed: str | None = None) -> None:
        state = self.state
        if state.status in ("completed", "failed", "cancelled") or _any_unfinished(state):
            return
        statuses = {t.status for t in state.tasks}
        if failed is not None or "failed" in statuses:
            outcome = "failed"
            reason = failed or state.reason
        elif state.status == "cancelling" or "cancelled" in statuses:
            outcome, reason = "cancelled", state.reason
        else:
            outcome, reason = "completed", None
        await self.persist(
            [JobFinished(outcome=outcome, reason=reason, finished_at=self.clock.now())]  # type: ignore[arg-type]
        )
        await self._after(
            self.scheduler, JobEnded(job_id=self.job_id, outcome=_OUTCOME_OF_STATUS[outcome])
        )
        _log.info("job_finished", job_id=self.job_id, outcome=outcome)
        await self.after_commit(self.context.stop)  # passivate: the journal keeps the state

    def _scale_snapshots(self) -> None:
        # A snapshot holds every task: with one every N events, a job of T tasks would write
        # O(T^2 / N) bytes of snapshots.  Snapshotting every 4*T events keeps it O(events).
        every = self.settings.snapshot_every
        self.snapshot_every = max(every, 4 * len(self.state.tasks)) if every else 0

    async def on_start(self) -> None:
        await super().on_start()
        self._scale_snapshots()
        # A job that finished while its actor was stopping (or before a crash) stays finished.
        if self.state.status == "cancelling" and not self.state.active_attempts():
            await self._finish_if_done()


def job_summary(job_id: str, state: JobState, *, tasks: bool) -> JobSummary:
    """Summarise a job state for ``status``."""
    spec = state.job
    counts: dict[str, int] = {}
    progress = 0.0
    for task in state.tasks:
        counts[task.status] = counts.get(task.status, 0) + 1
        progress += 1.0 if task.status == "completed" else task.progress
    return JobSummary(
        job_id=job_id,
        name=spec.name if spec else job_id,
        status=state.status,
        priority=spec.priority.value if spec else "",
        submitted_at=state.submitted_at.isoformat() if state.submitted_at else "",
        finished_at=state.finished_at.isoformat() if state.finished_at else None,
        tasks_total=len(state.tasks),
        task_counts=counts,
        progress=progress / len(state.tasks) if state.tasks else 0.0,
        reason=state.reason,
        tasks=tuple(
            TaskSummary(
                index=i,
                status=t.status,
                attempt=t.attempt,
                node=t.node or t.last_node,
                progress=1.0 if t.status == "completed" else t.progress,
                checkpoint=t.checkpoint,
                last_error=t.last_error,
            )
            for i, t in enumerate(state.tasks)
        )
        if tasks
        else (),
    )


def _any_unfinished(state: JobState) -> bool:
    # Called after every task end: scan from the back, where tasks still open usually are
    # (placement goes in index order), so a big job does not cost O(tasks) per task.
    return any(task.status in _OPEN for task in reversed(state.tasks))


_OPEN = frozenset(("pending", "assigned", "running"))


def _task_index(task_id: str, count: int) -> int | None:
    try:
        index = int(task_id)
    except ValueError:
        return None
    return index if 0 <= index < count else None


def _sequence_argv(argvs: list[tuple[str, ...]]) -> tuple[str, ...]:
    # Resolved by the executor on the host that runs it (see ``_subprocess.resolve_argv``).
    return (FRAME_SEQUENCE, json.dumps([list(a) for a in argvs]))
