"""The job actor: the only writer of its job's stream, the judge of its attempts' reports.

It journals every decision before acting on it: an assignment before the attempt is sent to its
node, an outcome before the scheduler frees the node.  A report whose fencing token is not the
task's current one is stale: it is refused (the node then kills that work) and changes nothing.

What follows a failed attempt is the scheduler's call (it owns the policy): the job asks
``DecideRetry`` and journals the failure together with the decision (retry when, avoiding
which node, with what resources; fail; or hold for an operator).  A *lost* attempt (its agent
restarted, its node went away, the coordinator restarted and nobody re-claimed it) is not the
task's fault: it is requeued without spending an attempt, up to the job's ``max_lost``.

A command the actor cannot process (a bug, an absurd value that slipped through) must not
wedge the farm: the task it concerns fails visibly with the error, and the job goes on.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, assert_never

import msgspec
from msgspec.structs import replace

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
from persistence import Event, EventSourcedActor, Journal, JournalError
from runtime import ActorRef, AskTimeoutError, ConfigurationError, TaskfarmError, get_logger

from ._events import (
    JobAggregate,
    JobAmended,
    JobCancelRequested,
    JobFinished,
    JobPaused,
    JobReopened,
    JobResumed,
    JobState,
    NodeBlocklisted,
    TaskAssigned,
    TaskCancelled,
    TaskCheckpointed,
    TaskCheckpointRequested,
    TaskCompleted,
    TaskFailed,
    TaskMetricRecorded,
    TaskPreempted,
    TaskPreviewed,
    TaskProgressed,
    TaskReleased,
    TaskRequeued,
    TaskSkipped,
    TaskStarted,
    TaskState,
    job_stream,
)
from ._graph import Outcome
from ._messages import (
    AmendJob,
    AttemptLost,
    CancelJob,
    CancelRun,
    CancelTasks,
    CheckpointRun,
    CheckpointTask,
    ClaimAttempt,
    DecideRetry,
    Dispatch,
    GetJobState,
    GetJobSummary,
    JobChanged,
    JobEnded,
    PauseJob,
    PreemptRun,
    PreemptTask,
    ReportAttempt,
    ResumeJob,
    RetryTasks,
    SkipTasks,
    StartAttempt,
    TaskEnded,
    TaskUpdate,
    Unplace,
)
from ._policy import Failure, FailureClass, RetryDecision, TaskView, default_retry
from ._settings import EngineSettings
from ._spec import Priority
from ._summaries import JobSummary, TaskSummary

__all__ = ["JobActor", "job_summary"]

_log = get_logger("actors.job")

JobMessage = (
    Dispatch
    | ReportAttempt
    | AttemptLost
    | ClaimAttempt
    | PreemptTask
    | CancelJob
    | CancelTasks
    | SkipTasks
    | GetJobSummary
    | PauseJob
    | ResumeJob
    | AmendJob
    | RetryTasks
    | CheckpointTask
    | GetJobState
)

_OUTCOME_OF_STATUS = {
    "completed": Outcome.SUCCEEDED,
    "failed": Outcome.FAILED,
    "cancelled": Outcome.CANCELLED,
    "skipped": Outcome.SKIPPED,  # a job whose every task was skipped (it ends completed)
}
# How an attempt's outcome is classified when it fails.
_KIND_OF_OUTCOME: dict[str, FailureClass] = {
    "timed_out": "timeout",
    "stalled": "stall",
    "oom": "oom",
    "start_failed": "start",
    "lost": "lost",
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
        node_address: Callable[[str], str] = str,
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
        self.node_address = node_address
        self.settings = settings

    async def handle(self, command: JobMessage) -> Any:
        try:
            return await self._handle(command)
        except (JournalError, AskTimeoutError):
            raise  # the journal (or the farm) is in trouble: let the supervisor restart us
        except Exception as error:
            await self._poisoned(command, error)
            if isinstance(command, ReportAttempt):
                return True
            return None

    async def _handle(self, command: JobMessage) -> Any:
        match command:
            case Dispatch(placements=placements, checkpoint_intervals=intervals):
                await self._dispatch(placements, intervals)
                return None
            case ReportAttempt(report=report, node=node):
                return await self._on_report(report, node)
            case AttemptLost(task=task, node=node, reason=reason):
                current = self.state.tasks[task]
                if current.holds(node):
                    await self._lost(task, current.token, reason)
                return None
            case ClaimAttempt(task=task, token=token, node=node):
                # The reply is the attempt's spec when the claim is current, else None.  A job
                # cancelled (or failed) while the agent was away refuses it too: the agent then
                # kills the attempt, whose final report ends the task.
                current = self.state.tasks[task]
                if (
                    current.token == token
                    and current.holds(node)
                    and current.status in ("assigned", "running")
                    and self.state.live
                ):
                    spec = self._attempt_spec(task, current.attempt, token)
                    if current.gang:
                        spec = msgspec.structs.replace(spec, rank=current.gang.index(node))
                    return spec
                return None
            case PreemptTask(task=task, node=node, reason=reason, force=force, by=by):
                await self._preempt(task, node, reason, force=force, by=by)
                return None
            case CancelJob(reason=reason, by=by):
                await self._cancel(reason, by=by)
                return job_summary(self.job_id, self.state, tasks=False)
            case CancelTasks(tasks=tasks, reason=reason):
                await self._cancel_tasks(tasks, reason)
                return None
            case SkipTasks(tasks=tasks, reason=reason):
                await self._skip_tasks(tasks, reason)
                return None
            case GetJobSummary(tasks=tasks):
                return job_summary(self.job_id, self.state, tasks=tasks)
            case GetJobState():
                return self.state
            case PauseJob(mode=mode, reason=reason, by=by):
                await self._pause(mode, reason, by=by)
                return job_summary(self.job_id, self.state, tasks=False)
            case ResumeJob(reason=reason, by=by):
                await self._resume(reason, by=by)
                return job_summary(self.job_id, self.state, tasks=False)
            case AmendJob(priority=priority, metadata=metadata, by=by):
                await self._amend(priority, metadata, by=by)
                return job_summary(self.job_id, self.state, tasks=False)
            case RetryTasks(tasks=tasks, reason=reason, by=by):
                return await self._retry(tasks, reason, by=by)
            case CheckpointTask(task=task, reason=reason, by=by):
                return await self._request_checkpoint(task, reason, by=by)
            case _:
                assert_never(command)

    async def _poisoned(self, command: JobMessage, error: Exception) -> None:
        """A command crashed the handler: fail the task it concerns, visibly, and go on."""
        _log.error(
            "job_command_failed",
            job_id=self.job_id,
            command=type(command).__name__,
            error=str(error),
            traceback="".join(traceback.format_exception(error)),
        )
        index: int | None = None
        if isinstance(command, ReportAttempt):
            index = _task_index(command.report.task_id, len(self.state.tasks))
        elif isinstance(command, AttemptLost | PreemptTask | CheckpointTask):
            index = command.task
        if index is None:
            return
        task = self.state.tasks[index]
        if task.status not in ("assigned", "running", "pending", "held"):
            return
        node = task.node
        reason = f"internal error while handling {type(command).__name__}: {error}"
        await self.persist(
            [TaskFailed(task=index, token=task.token, outcome="failed", error=reason)]
        )
        if node is not None:
            await self._stop_attempt(index, node, task.token)
        await self._after(
            self.scheduler,
            TaskEnded(
                job_id=self.job_id,
                task=index,
                outcome=Outcome.FAILED,
                attempt_outcome="failed",
                node=node,
                attempt=task.attempt,
            ),
        )
        await self._fail_job(f"task {self._name(index)} failed: {reason}")

    @property
    def clock(self) -> Any:
        return self.context.clock

    async def _after(self, ref: ActorRef[Any], message: Any) -> None:
        """Tell ``ref`` once what was persisted so far is durable."""
        await self.after_commit(lambda: ref.tell(message))

    def _name(self, index: int) -> str:
        spec = self.state.job
        return spec.tasks[index].name if spec is not None else str(index)

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch(
        self,
        placements: tuple[tuple[int, tuple[str, ...]], ...],
        intervals: tuple[float | None, ...] = (),
    ) -> None:
        state = self.state
        spec = state.job
        events: list[Event] = []
        accepted: list[tuple[int, tuple[str, ...], int, int, float | None]] = []
        version = self.version
        for position, (task_index, nodes) in enumerate(placements):
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
                    node=nodes[0],
                    resume_from=task.checkpoint,
                    nodes=nodes if len(nodes) > 1 else (),
                )
            )
            interval = intervals[position] if position < len(intervals) else None
            accepted.append((task_index, nodes, attempt, token, interval))
        if not events:
            return
        await self.persist(events)
        for task_index, nodes, attempt, token, interval in accepted:
            refs = [self.node_ref(node) for node in nodes]
            gone = [node for node, ref in zip(nodes, refs, strict=True) if ref is None]
            if gone:
                await self._lost(task_index, token, f"node {gone[0]} left before dispatch")
                continue
            spec_of = self._attempt_spec(task_index, attempt, token)
            if interval is not None:
                env = {**spec_of.env, "TASKFARM_CHECKPOINT_INTERVAL": f"{interval:.0f}"}
                spec_of = replace(spec_of, env=env)
            launch_all = spec is not None and spec.launch == "all"
            for rank, ref in enumerate(refs):
                if rank and not launch_all:
                    continue  # "leader": the other nodes are held for the leader's command
                # After the commit: inside a batch the assignment is only staged, and an
                # attempt must never run (or report) before its assignment is durable.
                ranked = spec_of if len(nodes) == 1 else msgspec.structs.replace(spec_of, rank=rank)
                assert ref is not None
                await self._after(ref, StartAttempt(spec=ranked, job=self.context.self_ref))

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
            max_runtime=spec.task_max_runtime(index),
            stall_timeout=spec.timeouts.stall,
            memory=(task.resources or spec.task_resources(index)).memory,
            nodes=tuple(task.gang),
            launch=spec.launch,
            hosts=tuple(self.node_address(node) for node in task.gang),
            port=self.settings.gang_port(self.job_id, index, token) if task.gang else 0,
            checkpoints=tuple(task.checkpoints),
            checkpoint_retention=spec.checkpoint_retention,
            checkpoint_warning=spec.task_checkpoint_warning(index),
        )

    # -- reports --------------------------------------------------------------------------------

    async def _on_report(self, report: Any, node: str | None = None) -> bool:
        """Journal a report of the task's current attempt; refuse a stale one (wrong token,
        ended, or sent through another node than the one it was assigned to) and tell the node
        it came through to stop that attempt."""
        state = self.state
        index = _task_index(report.task_id, len(state.tasks))
        if index is None:
            if node is not None and not isinstance(report, AttemptFinished):
                await self._stop_stale(node, report)
            return False
        task = state.tasks[index]
        token = report.fencing_token
        if (
            task.token != token
            or task.status not in ("assigned", "running")
            or (node is not None and task.node is not None and not task.holds(node))
        ):
            _log.info(
                "stale_report_rejected",
                job_id=self.job_id,
                task=index,
                token=token,
                current=task.token,
                status=task.status,
                node_id=node,
                report=type(report).__name__,
            )
            if node is not None and not isinstance(report, AttemptFinished):
                # A stale attempt still runs there (its task was reassigned, or has ended):
                # the node stops it, whether the report was told or asked.
                await self._stop_stale(node, report)
            return False
        if task.gang and node is not None and node != task.node:
            return await self._on_member_report(index, report, node)
        match report:
            case AttemptStarted(pid=pid):
                if task.status == "assigned":
                    if report.refused:
                        _log.warning(
                            "task_resume_fell_back",
                            job_id=self.job_id,
                            task=index,
                            refused=list(report.refused),
                            deleted=list(report.deleted),
                            resume_from=report.resumed_from,
                            reason=report.fallback,
                        )
                    # Journaled with the next commit (usually the attempt's end, for a short
                    # task): a start lost in a crash leaves the attempt "assigned", which
                    # recovery treats alike (in doubt), so it does not cost a commit of its own.
                    self.persist_later(
                        [
                            TaskStarted(
                                task=index,
                                token=token,
                                pid=pid,
                                at=self.clock.now(),
                                resumed_from=report.resumed_from,
                                refused=report.refused,
                                fallback=report.fallback,
                                deleted=report.deleted,
                            )
                        ]
                    )
                    await self._after(
                        self.scheduler,
                        TaskUpdate(
                            job_id=self.job_id,
                            task=index,
                            node=task.node,
                            attempt=task.attempt,
                            started=True,
                        ),
                    )
            case AttemptProgress(fraction=fraction):
                if int(fraction * 10) > int(task.progress * 10):
                    await self.persist([TaskProgressed(task=index, token=token, fraction=fraction)])
                    await self._after(
                        self.scheduler,
                        TaskUpdate(job_id=self.job_id, task=index, progress=fraction),
                    )
            case AttemptCheckpointed(checkpoint=checkpoint, manifest=manifest):
                now = self.clock.now()
                await self.persist(
                    [
                        TaskCheckpointed(
                            task=index,
                            token=token,
                            checkpoint=checkpoint,
                            at=now,
                            manifest=manifest,
                        )
                    ]
                )
                await self._after(
                    self.scheduler,
                    TaskUpdate(
                        job_id=self.job_id,
                        task=index,
                        checkpoint_at=now,
                        checkpoint_bytes=manifest.size if manifest is not None else 0,
                    ),
                )
            case AttemptPreview(path=path):
                await self.persist([TaskPreviewed(task=index, token=token, path=path)])
                await self._after(
                    self.scheduler, TaskUpdate(job_id=self.job_id, task=index, preview=path)
                )
            case AttemptMetric(name=name, value=value):
                await self.persist(
                    [TaskMetricRecorded(task=index, token=token, name=name, value=value)]
                )
            case AttemptFinished():
                await self._on_finished(index, report)
        return True

    async def _stop_stale(self, node: str, report: Any) -> None:
        """Tell ``node`` to kill the attempt a stale report came from, without grace."""
        ref = self.node_ref(node)
        if ref is not None:
            stop = CancelRun(
                job_id=self.job_id,
                task_id=report.task_id,
                token=report.fencing_token,
                grace=0.0,
            )
            await self._after(ref, stop)

    async def _on_member_report(self, index: int, report: Any, node: str) -> bool:
        """A report from a rank other than the leader's: progress and checkpoints come from
        rank 0, but a rank that fails (or is stopped) ends the whole attempt everywhere.

        While the attempt yields (a journaled preemption, or a pause that checkpoints or
        kills), a rank stopped by that request ends before the leader has written its
        checkpoint: ending the attempt then would throw the checkpoint away as lost work, so
        the leader's own end (with its checkpoint) decides.
        """
        if not isinstance(report, AttemptFinished) or report.outcome == "completed":
            return True
        task = self.state.tasks[index]
        rank = task.gang.index(node)
        if report.outcome == "cancelled" and self._yielding(task):
            _log.info(
                "gang_rank_yielded",
                job_id=self.job_id,
                task=index,
                rank=rank,
                node_id=node,
                token=task.token,
            )
            return True
        error = f"rank {rank} on {node}: {report.error or report.outcome}"
        if report.outcome in ("lost", "cancelled") and self.state.status != "cancelling":
            await self._lost(index, task.token, error)
        else:
            leader = msgspec.structs.replace(report, error=error)
            await self._on_finished(index, leader)
        return True

    def _yielding(self, task: TaskState) -> bool:
        """Return whether the task's current attempt was asked to yield its nodes."""
        paused = self.state.status == "paused" and self.state.pause_mode != "finish"
        return task.yielding == task.token or paused

    async def _on_finished(self, index: int, report: AttemptFinished) -> None:
        state = self.state
        spec = state.job
        assert spec is not None
        task = state.tasks[index]
        token = report.fencing_token
        node = task.node
        attempt = task.attempt
        await self._stop_members(index)
        events: list[Event] = []
        checkpoint_at = None
        if report.checkpoint and report.checkpoint != task.checkpoint:
            checkpoint_at = self.clock.now()
            events.append(
                TaskCheckpointed(
                    task=index, token=token, checkpoint=report.checkpoint, at=checkpoint_at
                )
            )
        ended = TaskEnded(
            job_id=self.job_id,
            task=index,
            outcome=None,
            node=node,
            attempt=attempt,
            runtime_s=report.runtime_s,
            metrics=tuple(sorted(task.metrics.items())),
            checkpoint_at=checkpoint_at,
        )
        if report.outcome == "completed":
            events.append(
                TaskCompleted(
                    task=index,
                    token=token,
                    runtime_s=report.runtime_s,
                    cpu_s=report.cpu_s,
                    peak_rss=report.peak_rss,
                )
            )
            await self.persist(events)
            await self._after(
                self.scheduler,
                replace(ended, outcome=Outcome.SUCCEEDED, attempt_outcome="completed"),
            )
            await self._finish_if_done()
            return
        if report.outcome == "cancelled":
            if state.status == "cancelling":
                events.append(TaskCancelled(task=index, reason=state.reason or "cancelled"))
                await self.persist(events)
                await self._after(
                    self.scheduler,
                    replace(ended, outcome=Outcome.CANCELLED, attempt_outcome="cancelled"),
                )
                await self._finish_if_done()
            else:  # preempted, paused or stopped by the farm: not the task's fault
                events.append(TaskRequeued(task=index, token=token, reason="preempted"))
                await self.persist(events)
                await self._after(
                    self.scheduler,
                    replace(ended, outcome=None, attempt_outcome="preempted"),
                )
            return
        if report.outcome == "lost":
            if events:
                await self.persist(events)
            await self._lost(index, token, report.error or "the agent lost the attempt")
            return
        failure = Failure(
            kind=_classify(report),
            node=node,
            attempt=attempt,
            error=report.error,
            exit_code=report.exit_code,
        )
        decision, failure = await self._decide(index, failure)
        if state.status != "active" and decision.action == "retry":
            decision = RetryDecision(action="fail", reason=decision.reason or "the job is over")
        now = self.clock.now()
        retry_at = None
        held = None
        if decision.action == "retry":
            retry_at = now + _delay(decision.delay)
        elif decision.action == "hold":
            held = decision.reason or f"held after {report.outcome}"
        events.append(
            TaskFailed(
                task=index,
                token=token,
                outcome=report.outcome,
                error=report.error,
                exit_code=report.exit_code,
                retry_at=retry_at,
                kind=failure.kind,
                job_fault=failure.job_fault,
                held=held,
                avoid_node=decision.avoid_node,
                resources=decision.resources,
                runtime_s=report.runtime_s,
                cpu_s=report.cpu_s,
                peak_rss=report.peak_rss,
            )
        )
        blocklist_until = None
        if node is not None and not failure.job_fault:
            failures_here = state.node_failures.get(node, 0) + 1
            if failures_here >= self.settings.blocklist_after:
                blocklist_until = now + _delay(self.settings.blocklist_for)
                events.append(
                    NodeBlocklisted(
                        node=node,
                        until=blocklist_until,
                        reason=f"{failures_here} failed attempts of this job there",
                    )
                )
        await self.persist(events)
        final = decision.action == "fail"
        await self._after(
            self.scheduler,
            replace(
                ended,
                outcome=Outcome.FAILED if final else None,
                retry_at=retry_at,
                failure=failure,
                blocklist_node=node if blocklist_until else None,
                blocklist_until=blocklist_until,
                attempt_outcome=report.outcome,
                held=held,
                avoid_node=decision.avoid_node,
                resources=decision.resources,
            ),
        )
        if final:
            why = decision.reason or f"failed: {failure.error or failure.kind}"
            await self._fail_job(f"task {self._name(index)} {why}")

    async def _decide(self, index: int, failure: Failure) -> tuple[RetryDecision, Failure]:
        """Ask the scheduler (which owns the policy) what follows; fall back to the engine's
        own rule if it does not answer in time."""
        try:
            decision, classified = await self.scheduler.ask(
                DecideRetry(job_id=self.job_id, task=index, failure=failure),
                timeout=self.settings.ask_timeout,
            )
        except TaskfarmError as error:
            _log.warning("retry_decision_defaulted", job_id=self.job_id, error=str(error))
            spec = self.state.job
            assert spec is not None
            task = self.state.tasks[index]
            view = TaskView(job_id=self.job_id, index=index, request=spec.task_resources(index))
            view.failures = task.failures
            return default_retry(spec, view, failure), failure
        assert isinstance(decision, RetryDecision)
        assert isinstance(classified, Failure)
        return decision, classified

    async def _stop_members(self, index: int) -> None:
        """The attempt is over: stop every rank still running (no orphan ranks)."""
        task = self.state.tasks[index]
        for member in task.gang:
            await self._stop_attempt(index, member, task.token)

    async def _lost(self, index: int, token: int, reason: str) -> None:
        """The attempt's host is gone: requeue it without spending an attempt (or give up)."""
        task = self.state.tasks[index]
        spec = self.state.job
        if spec is None or task.token != token or task.status not in ("assigned", "running"):
            return
        await self._stop_members(index)
        node, attempt = task.node, task.attempt
        ended = TaskEnded(job_id=self.job_id, task=index, outcome=None, node=node, attempt=attempt)
        if self.state.status == "cancelling":
            await self.persist([TaskCancelled(task=index, reason=reason)])
            await self._after(
                self.scheduler,
                replace(ended, outcome=Outcome.CANCELLED, attempt_outcome="lost"),
            )
            await self._finish_if_done()
            return
        if task.lost + 1 >= spec.retries.max_lost:
            why = f"lost its host {task.lost + 1} times (max_lost {spec.retries.max_lost})"
            await self.persist(
                [
                    TaskFailed(
                        task=index,
                        token=token,
                        outcome="lost",
                        error=f"{why}; last: {reason}",
                        kind="lost",
                    )
                ]
            )
            await self._after(
                self.scheduler,
                replace(ended, outcome=Outcome.FAILED, attempt_outcome="lost", lost=True),
            )
            await self._fail_job(f"task {self._name(index)} {why}")
            return
        await self.persist([TaskRequeued(task=index, token=token, reason=reason, lost=True)])
        await self._after(
            self.scheduler, replace(ended, outcome=None, attempt_outcome="lost", lost=True)
        )

    async def _preempt(
        self, index: int, node: str, reason: str, *, force: bool, by: str | None = None
    ) -> None:
        """Journal the preemption, then ask the node to checkpoint and yield the attempt."""
        task = self.state.tasks[index]
        spec = self.state.job
        if (
            spec is None
            or (not spec.preemptible and not force)
            or not task.holds(node)
            or task.status not in ("assigned", "running")
        ):
            return
        token = task.token
        await self.persist(
            [TaskPreempted(task=index, token=token, node=node, reason=reason, by=by)]
        )
        await self._after(
            self.scheduler, TaskUpdate(job_id=self.job_id, task=index, preempted=True)
        )
        for member in task.gang or [node]:
            await self._yield_attempt(index, member, token, checkpoint=True)

    async def _yield_attempt(self, index: int, node: str, token: int, *, checkpoint: bool) -> None:
        ref = self.node_ref(node)
        spec = self.state.job
        if ref is None or spec is None:
            return
        grace = self.settings.preempt_grace if (checkpoint and spec.checkpointable) else 0.0
        run = PreemptRun(job_id=self.job_id, task_id=str(index), token=token, grace=grace)
        await self._after(ref, run)

    async def _stop_attempt(self, index: int, node: str, token: int) -> None:
        ref = self.node_ref(node)
        if ref is not None:
            cancel = CancelRun(
                job_id=self.job_id,
                task_id=str(index),
                token=token,
                grace=self.settings.cancel_grace,
            )
            await self._after(ref, cancel)

    # -- operator verbs -------------------------------------------------------------------------

    async def _pause(self, mode: str, reason: str, *, by: str | None) -> None:
        if mode not in ("checkpoint", "finish", "kill"):
            raise ConfigurationError(
                f"unknown pause mode {mode!r}; choose checkpoint, finish or kill", where="--mode"
            )
        if self.state.status != "active":
            return
        await self.persist([JobPaused(mode=mode, reason=reason, by=by)])  # type: ignore[arg-type]
        await self._after(self.scheduler, JobChanged(job_id=self.job_id, status="paused"))
        if mode == "finish":
            return
        for index in self.state.active_attempts():
            task = self.state.tasks[index]
            assert task.node is not None
            for member in task.gang or [task.node]:
                await self._yield_attempt(
                    index, member, task.token, checkpoint=mode == "checkpoint"
                )

    async def _resume(self, reason: str, *, by: str | None) -> None:
        state = self.state
        events: list[Event] = []
        if state.status == "paused":
            events.append(JobResumed(reason=reason, by=by))
        held = [i for i, t in enumerate(state.tasks) if t.status == "held"]
        events.extend(TaskReleased(task=i, reason=reason, by=by) for i in held)
        if not events:
            return
        await self.persist(events)
        await self._after(
            self.scheduler,
            JobChanged(job_id=self.job_id, status=state.status, released=tuple(held)),
        )

    async def _amend(
        self, priority: Priority | None, metadata: tuple[tuple[str, bytes], ...], *, by: str | None
    ) -> None:
        spec = self.state.job
        if spec is None or not self.state.live:
            raise ConfigurationError(
                f"job {self.job_id} is {self.state.status}: only a live job can be amended",
                where="amend",
            )
        changes: list[str] = []
        new_metadata: bytes | None = None
        if metadata:
            current = msgspec.json.decode(spec.metadata)
            if not isinstance(current, dict):
                current = {}
            for key, raw in metadata:
                value = msgspec.json.decode(raw)
                changes.append(f"{key}: {json.dumps(current.get(key))} -> {json.dumps(value)}")
                current[key] = value
            new_metadata = msgspec.json.encode(current, order="sorted")
        if priority is not None and priority is not spec.priority:
            changes.insert(0, f"priority: {spec.priority.value} -> {priority.value}")
        else:
            priority = None
        if not changes:
            return
        await self.persist(
            [JobAmended(priority=priority, metadata=new_metadata, changes=tuple(changes), by=by)]
        )
        await self._after(self.scheduler, JobChanged(job_id=self.job_id, spec=self.state.job))

    async def _retry(self, tasks: tuple[int, ...], reason: str, *, by: str | None) -> list[int]:
        """Run failed, cancelled or held tasks again; return the ones that will."""
        state = self.state
        for index in tasks:
            if not 0 <= index < len(state.tasks):
                raise ConfigurationError(f"job {self.job_id} has no task {index}", where="retry")
        chosen = tasks or tuple(range(len(state.tasks)))
        if state.status in ("failed", "cancelled"):
            reopen = tuple(
                i for i in chosen if state.tasks[i].status in ("failed", "cancelled", "held")
            )
            if not reopen:
                return []
            await self.persist([JobReopened(tasks=reopen, reason=reason, by=by)])
            return list(reopen)
        if state.status == "completed":
            return []
        if state.status == "cancelling":
            raise ConfigurationError(
                f"job {self.job_id} is still stopping its attempts; retry once it has ended",
                where="retry",
            )
        held = tuple(i for i in chosen if state.tasks[i].status == "held")
        if not held:
            return []
        await self.persist([TaskReleased(task=i, reason=reason, by=by) for i in held])
        await self._after(self.scheduler, JobChanged(job_id=self.job_id, released=held))
        return list(held)

    async def _request_checkpoint(self, index: int, reason: str, *, by: str | None) -> bool:
        state = self.state
        if not 0 <= index < len(state.tasks):
            raise ConfigurationError(f"job {self.job_id} has no task {index}", where="checkpoint")
        task = state.tasks[index]
        if task.status not in ("assigned", "running") or task.node is None:
            return False
        await self.persist(
            [TaskCheckpointRequested(task=index, token=task.token, reason=reason, by=by)]
        )
        ref = self.node_ref(task.node)
        if ref is None:
            return False
        run = CheckpointRun(job_id=self.job_id, task_id=str(index), token=task.token)
        await self._after(ref, run)
        return True

    # -- ends -----------------------------------------------------------------------------------

    async def _cancel(self, reason: str, *, by: str | None) -> None:
        state = self.state
        if not state.live:
            return
        events: list[Event] = [JobCancelRequested(reason=reason, by=by)]
        pending = [i for i, t in enumerate(state.tasks) if t.status in ("pending", "held")]
        events.extend(TaskCancelled(task=i, reason=reason) for i in pending)
        await self.persist(events)
        await self._tell_cancelled(pending)
        await self._stop_active_attempts(reason)
        await self._finish_if_done()

    async def _cancel_tasks(self, tasks: tuple[int, ...], reason: str) -> None:
        """Cancel pending tasks whose dependency failed (``on_parent_failure = "cancel"``)."""
        state = self.state
        pending = [i for i in tasks if state.tasks[i].status in ("pending", "held")]
        if not pending or not state.live:
            return
        await self.persist([TaskCancelled(task=i, reason=reason) for i in pending])
        await self._tell_cancelled(pending)
        if not any(t.status in _OPEN for t in state.tasks):
            await self.persist([JobCancelRequested(reason=reason)])
            await self._finish_if_done()

    async def _skip_tasks(self, tasks: tuple[int, ...], reason: str) -> None:
        """Skip pending tasks whose conditional branch was not taken (``when`` was false)."""
        state = self.state
        pending = [i for i in tasks if state.tasks[i].status in ("pending", "held")]
        if not pending or not state.live:
            return
        await self.persist([TaskSkipped(task=i, reason=reason) for i in pending])
        for index in pending:
            await self._after(
                self.scheduler,
                TaskEnded(
                    job_id=self.job_id,
                    task=index,
                    outcome=Outcome.SKIPPED,
                    attempt_outcome="skipped",
                ),
            )
        await self._finish_if_done()

    async def _tell_cancelled(self, indices: list[int]) -> None:
        for index in indices:
            await self._after(
                self.scheduler,
                TaskEnded(
                    job_id=self.job_id,
                    task=index,
                    outcome=Outcome.CANCELLED,
                    attempt_outcome="cancelled",
                ),
            )

    async def _fail_job(self, reason: str) -> None:
        state = self.state
        pending = [i for i, t in enumerate(state.tasks) if t.status in ("pending", "held")]
        events: list[Event] = [JobCancelRequested(reason=reason)]
        events.extend(TaskCancelled(task=i, reason=reason) for i in pending)
        await self.persist(events)
        await self._tell_cancelled(pending)
        await self._stop_active_attempts(reason)
        await self._finish_if_done(failed=reason)

    async def _stop_active_attempts(self, reason: str) -> None:
        for index in self.state.active_attempts():
            task = self.state.tasks[index]
            for member in task.gang or ([task.node] if task.node else []):
                await self._stop_attempt(index, member, task.token)

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
        ended = _OUTCOME_OF_STATUS[outcome]
        if outcome == "completed" and statuses == {"skipped"}:
            # Not a failure: the job completes, and its dependants see it skipped.
            reason, ended = "every task was skipped", Outcome.SKIPPED
        await self.persist(
            [JobFinished(outcome=outcome, reason=reason, finished_at=self.clock.now())]  # type: ignore[arg-type]
        )
        await self._after(self.scheduler, JobEnded(job_id=self.job_id, outcome=ended))
        _log.info("job_finished", job_id=self.job_id, outcome=outcome, reason=reason)
        # The final state as a snapshot: a restart reads one row for a finished job, not its
        # history (finished jobs are most of a journal).
        await self.after_commit(self.save_snapshot)
        await self.after_commit(self.context.stop)  # passivate: the journal keeps the state

    def _scale_snapshots(self) -> None:
        self.snapshot_every = self.settings.snapshot_interval(len(self.state.tasks))

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
        progress += 1.0 if task.status in ("completed", "skipped") else task.progress
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
        metrics=dict(state.metrics),
        tasks=tuple(
            TaskSummary(
                index=i,
                status=t.status,
                attempt=t.attempt,
                node=t.node or t.last_node,
                progress=1.0 if t.status == "completed" else t.progress,
                checkpoint=t.checkpoint,
                checkpoints=tuple(c.checkpoint for c in t.checkpoints),
                resume_note=t.resume_note,
                last_error=t.last_error,
                name=spec.tasks[i].name if spec else str(i),
                frames=_frames(spec, i),
                preview=t.preview,
                metrics=dict(t.metrics),
                runtime_s=t.runtime_s,
                cpu_s=t.cpu_s,
                peak_rss=t.peak_rss,
                nodes=tuple(t.nodes),
                held_reason=t.held_reason,
                started_at=(
                    t.started_at.isoformat()
                    if t.started_at is not None and t.status == "running"
                    else None
                ),
            )
            for i, t in enumerate(state.tasks)
        )
        if tasks
        else (),
        owner=spec.owner if spec else None,
        metric_series=(
            {name: tuple(values) for name, values in state.metric_series.items()} if tasks else {}
        ),
    )


def _frames(spec: Any, index: int) -> tuple[int, int] | None:
    if spec is None:
        return None
    task = spec.tasks[index]
    if task.start is None or task.end is None:
        return None
    return (task.start, task.end)


def _classify(report: AttemptFinished) -> FailureClass:
    kind = _KIND_OF_OUTCOME.get(report.outcome)
    if kind is not None:
        return kind
    if report.exit_code is not None and report.exit_code < 0:
        return "signal"
    if report.exit_code in (126, 127):
        return "start"  # the shell's "cannot execute" / "command not found"
    return "exit_code"


def _delay(seconds: float) -> timedelta:
    # Bounded: an absurd backoff must not crash the actor (specs bound it too).
    return timedelta(seconds=min(max(seconds, 0.0), 365 * 86400.0))


def _any_unfinished(state: JobState) -> bool:
    # Called after every task end: scan from the back, where tasks still open usually are
    # (placement goes in index order), so a big job does not cost O(tasks) per task.
    return any(task.status in _OPEN for task in reversed(state.tasks))


_OPEN = frozenset(("pending", "held", "assigned", "running"))


def _task_index(task_id: str, count: int) -> int | None:
    try:
        index = int(task_id)
    except ValueError:
        return None
    return index if 0 <= index < count else None


def _sequence_argv(argvs: list[tuple[str, ...]]) -> tuple[str, ...]:
    # Resolved by the executor on the host that runs it (see ``_subprocess.resolve_argv``).
    return (FRAME_SEQUENCE, json.dumps([list(a) for a in argvs]))
