"""The coordinator's side of a node agent: an :class:`Executor` over the agent's connection.

A :class:`RemoteExecutor` lives as long as the node (not the connection): the coordinator
``attach()``-es each authenticated connection of the agent and ``detach()``-es it when it is
lost.  Handles of attempts stay pending while the agent is away (it may come back, still
running them); the coordinator decides when they are lost.

Reports arrive as ``Report(sequence, report)`` frames, which the coordinator's connection
reader passes to :meth:`RemoteExecutor.deliver`: the report goes to its attempt's sink (which
journals it), and only then is ``ReportAck(sequence)`` sent, so the agent forgets a report only
once it is durable here.  Reports are at-least-once: the agent re-sends what was not
acknowledged after a reconnect or a restart, and a report already delivered (same attempt, a
sequence not above the last one delivered for it) is acknowledged again without reaching the
sink twice.  A report for an attempt this executor does not know (the coordinator restarted,
or the attempt finished long ago) goes to ``on_orphan_report``; the coordinator's journal
decides whether to adopt it (``adopt()``) or reject it as stale.

Differences from the local executors, by nature of the network:

- ``start()`` returns once ``RunAttempt`` is sent, without waiting for the agent's
  :class:`AttemptStarted` (which follows through the sink); an attempt the agent cannot start
  ends with an :class:`AttemptFinished` ``failed`` report instead of an ``ExecutorError``.
- ``terminate()`` and ``kill()`` wait for the final report, which the agent sends after the
  process exited.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeAlias, assert_never

import anyio

from actors._errors import AgentUnavailableError, ExecutorError
from actors.executors import (
    AttemptFinished,
    AttemptHandle,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    ReportSink,
    RunningAttempt,
)
from runtime import Connection, WireError, get_logger

from ._protocol import (
    CancelAttempt,
    CheckpointAttempt,
    HeartbeatAck,
    LogChunk,
    ReadLog,
    Report,
    ReportAck,
    RunAttempt,
    SleepNode,
    WireMessage,
)

__all__ = [
    "OrphanReportSink",
    "RemoteAttempt",
    "RemoteExecutor",
    "open_remote_executor",
]

_log = get_logger("actors.remote")

AttemptKey: TypeAlias = tuple[str, str, int]  # job_id, task_id, fencing_token

OrphanReportSink: TypeAlias = Callable[[AttemptReport], Awaitable[None]]
"""Receives a report for an attempt the executor does not know (it may call ``adopt()``)."""

# Finished attempts remembered so a late duplicate of their reports is recognised as one.
_FINISHED_MEMORY = 4096
# Reports received but not yet journaled, across attempts (then reading waits: backpressure).
_MAX_QUEUED = 10_000


def _key(item: AttemptReport | AttemptSpec | RunningAttempt) -> AttemptKey:
    return (item.job_id, item.task_id, item.fencing_token)


class RemoteAttempt:
    """One attempt running on the agent, as :meth:`RemoteExecutor.start` returns it."""

    def __init__(self, executor: RemoteExecutor, spec: AttemptSpec, sink: ReportSink) -> None:
        self._executor = executor
        self._spec = spec
        self._sink = sink
        self._pid: int | None = None
        self._result: AttemptFinished | None = None
        self._finished = anyio.Event()
        self._last_sequence = 0  # the highest sequence accepted for delivery
        self._sunk = 0  # the highest sequence its sink has journaled
        self._queue: deque[tuple[int, AttemptReport]] = deque()
        self._draining = False
        self._idle = anyio.Event()
        self._idle.set()
        self._cancel_grace: float | None = None

    def __repr__(self) -> str:
        spec = self._spec
        return f"<RemoteAttempt {spec.job_id}/{spec.task_id} attempt {spec.attempt}>"

    @property
    def spec(self) -> AttemptSpec:
        """Return the spec the attempt runs."""
        return self._spec

    @property
    def pid(self) -> int | None:
        """Return the main process id on the agent's host, once reported."""
        return self._pid

    @property
    def result(self) -> AttemptFinished | None:
        """Return the final report once it was delivered, else None."""
        return self._result

    def request_checkpoint(self) -> bool:
        """Send ``CheckpointAttempt``; return False when the spec is not checkpointable, the
        attempt is over or the agent is not connected."""
        if not self._spec.checkpointable or self._result is not None:
            return False
        spec = self._spec
        return self._executor._send_nowait(
            CheckpointAttempt(
                job_id=spec.job_id, task_id=spec.task_id, fencing_token=spec.fencing_token
            )
        )

    def cancel(self, *, grace: float) -> None:
        """Send ``CancelAttempt`` (again on the next ``attach()`` if the agent is away)."""
        if self._result is not None:
            return
        grace = max(0.0, grace)
        if self._cancel_grace is None or grace < self._cancel_grace:
            self._cancel_grace = grace
        self._executor._send_nowait(self._cancel_message())

    def _cancel_message(self) -> CancelAttempt:
        spec = self._spec
        return CancelAttempt(
            job_id=spec.job_id,
            task_id=spec.task_id,
            fencing_token=spec.fencing_token,
            grace=self._cancel_grace or 0.0,
            reason="cancelled by the coordinator",
        )

    async def terminate(self, grace: float) -> None:
        """Stop the attempt (terminate, kill after ``grace``) and wait for its final report."""
        self.cancel(grace=grace)
        await self._finished.wait()

    async def kill(self) -> None:
        """Kill the attempt without a grace period and wait for its final report."""
        self.cancel(grace=0.0)
        await self._finished.wait()

    async def wait(self) -> AttemptFinished:
        """Wait for the final report and return it."""
        await self._finished.wait()
        assert self._result is not None
        return self._result


class RemoteExecutor:
    """Runs attempts on one node agent; built by :func:`open_remote_executor`."""

    #: The agent forgets a report once it is acknowledged, and it is acknowledged once the
    #: sink returns: so the sink must return only once the report is journaled.
    awaits_journaled_reports = True

    def __init__(
        self,
        *,
        node: str,
        on_orphan_report: OrphanReportSink,
        read_log_timeout: float,
    ) -> None:
        self._node = node
        self._on_orphan_report = on_orphan_report
        self._read_log_timeout = read_log_timeout
        self._connection: Connection[WireMessage] | None = None
        self._attempts: dict[AttemptKey, RemoteAttempt] = {}
        self._finished: OrderedDict[AttemptKey, int] = OrderedDict()
        self._outgoing: deque[WireMessage] = deque()
        self._wakeup = anyio.Event()
        self._requests = itertools.count(1)
        self._last_request = 0
        self._log_requests: dict[int, tuple[anyio.Event, list[LogChunk]]] = {}
        self._delivered = 0
        self._duplicates = 0
        self._orphans = 0
        # Reports are journaled attempt by attempt in parallel (each attempt's in order), so a
        # job journals many in one commit; acks stay cumulative and in sequence order: entry
        # (sequence, attempt) is done once that attempt's sink has journaled the sequence.
        self._acks: deque[tuple[int, RemoteAttempt | None]] = deque()
        self._queued = 0
        self._ack_to_send = 0  # the latest acknowledgement, not sent yet
        self._heartbeat_to_ack = 0  # the latest heartbeat read, not answered yet
        self._space = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        state = "attached" if self._connection is not None else "detached"
        return f"<RemoteExecutor node={self._node!r} {state} attempts={len(self._attempts)}>"

    @property
    def node(self) -> str:
        """Return the node (agent) name."""
        return self._node

    @property
    def attached(self) -> bool:
        """Return whether the agent is connected."""
        return self._connection is not None

    def statistics(self) -> dict[str, int]:
        """Return counters: reports delivered, duplicates dropped, orphans passed on, reports
        received but not journaled yet, and attempts not finished."""
        return {
            "delivered": self._delivered,
            "duplicates": self._duplicates,
            "orphans": self._orphans,
            "queued": self._queued,
            "running": len(self._attempts),
        }

    # -- connection lifecycle ----------------------------------------------------------------

    def attach(self, connection: Connection[WireMessage]) -> None:
        """Use ``connection`` (the agent's, after its ``Welcome``) from now on.

        Cancellations requested while the agent was away are sent again; other queued
        commands were dropped on ``detach()``.
        """
        self._connection = connection
        self._outgoing.clear()
        self._acks.clear()  # acks of the old connection are lost: the agent re-sends
        self._ack_to_send = self._heartbeat_to_ack = 0
        for attempt in self._attempts.values():
            if attempt._cancel_grace is not None:
                self._outgoing.append(attempt._cancel_message())
        self._wakeup.set()

    def detach(self) -> None:
        """Forget the lost connection; attempts stay pending (the agent may come back).

        Pending ``read_log()`` calls fail with :class:`AgentUnavailableError`.
        """
        self._connection = None
        self._outgoing.clear()
        self._acks.clear()
        self._ack_to_send = self._heartbeat_to_ack = 0
        for done, answer in self._log_requests.values():
            answer.clear()
            done.set()

    # -- Executor ----------------------------------------------------------------------------

    async def start(self, spec: AttemptSpec, report: ReportSink) -> RemoteAttempt:
        """Send ``RunAttempt`` to the agent and return the attempt's handle.

        Its reports (first :class:`AttemptStarted`) follow through ``report`` as the agent
        sends them.

        Raises:
            AgentUnavailableError: the agent is not connected, or the connection failed while
                sending (the agent never got the whole request: nothing runs).
            ExecutorError: an attempt with the same job, task and fencing token is running.
        """
        key = _key(spec)
        if key in self._attempts:
            raise ExecutorError(
                "an attempt with this fencing token is already running",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        connection = self._connection
        if connection is None:
            raise AgentUnavailableError(
                f"agent {self._node!r} is not connected",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        attempt = RemoteAttempt(self, spec, report)
        # Registered before sending: the agent's first report may beat our return.
        self._attempts[key] = attempt
        try:
            await connection.send(RunAttempt(spec=spec))
        except WireError as error:
            del self._attempts[key]
            raise AgentUnavailableError(
                f"sending to agent {self._node!r} failed: {error.reason}",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            ) from error
        return attempt

    def running(self) -> tuple[AttemptHandle, ...]:
        """Return the attempts whose final report has not arrived, oldest first."""
        return tuple(self._attempts.values())

    def adopt(
        self, running: RunningAttempt, spec: AttemptSpec, report: ReportSink
    ) -> RemoteAttempt:
        """Re-attach an attempt the agent runs but this executor does not know (after a
        coordinator restart): its reports go to ``report`` from now on.

        Returns the existing handle when the attempt is already known.

        Raises:
            ExecutorError: ``spec`` does not describe ``running`` (job, task, attempt, token).
        """
        if _key(running) != _key(spec) or running.attempt != spec.attempt:
            raise ExecutorError(
                f"spec does not match the running attempt {running.job_id}/{running.task_id} "
                f"attempt {running.attempt} (fencing token {running.fencing_token})",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        key = _key(spec)
        existing = self._attempts.get(key)
        if existing is not None:
            return existing
        attempt = RemoteAttempt(self, spec, report)
        attempt._last_sequence = self._finished.pop(key, 0)
        self._attempts[key] = attempt
        return attempt

    def waiting_on(self) -> frozenset[AttemptKey]:
        """Return the attempts whose final report has not arrived (job, task, fencing token)."""
        return frozenset(self._attempts)

    async def abandon(self, key: AttemptKey, *, error: str) -> bool:
        """End an attempt the agent no longer has (it came back without it) with a ``failed``
        final report, as the agent itself reports an attempt its restart lost; return False
        when the attempt had already finished.

        Raises:
            Exception: whatever the sink raised (the attempt stays pending).
        """
        attempt = self._attempts.get(key)
        if attempt is not None and not attempt._idle.is_set():
            await attempt._idle.wait()  # its queued reports (maybe its end) come first
            attempt = self._attempts.get(key)
        if attempt is None:
            return False
        spec = attempt.spec
        report = AttemptFinished(
            job_id=spec.job_id,
            task_id=spec.task_id,
            attempt=spec.attempt,
            fencing_token=spec.fencing_token,
            outcome="failed",
            error=error,
        )
        await attempt._sink(report)
        attempt._result = report
        del self._attempts[key]
        # A late report of the attempt (should the agent have it after all) is an orphan: the
        # job, which has moved on, refuses it.
        self._finished[key] = attempt._last_sequence
        if len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)
        attempt._finished.set()
        return True

    # -- inbound -----------------------------------------------------------------------------

    async def deliver(self, message: Report | LogChunk) -> None:
        """Handle one ``Report`` or ``LogChunk`` frame from the agent's connection.

        A report is queued for its attempt's sink and acknowledged (cumulatively, in sequence
        order) once journaled; attempts are journaled in parallel, each in its own order, so
        one commit can carry the reports of many.  A duplicate is acknowledged once its first
        copy is journaled, without being delivered twice.  An orphan (an attempt this
        executor does not know) goes to ``on_orphan_report`` before this returns.  Call it
        from the one task that reads the connection, in frame order; it waits only when too
        many reports are queued (backpressure).

        Raises:
            Exception: whatever ``on_orphan_report`` raised (nothing after it is acknowledged).
        """
        match message:
            case Report():
                await self._deliver_report(message)
            case LogChunk():
                waiting = self._log_requests.get(message.request)
                if waiting is not None:
                    done, answer = waiting
                    answer.append(message)
                    done.set()
            case _:
                assert_never(message)

    async def _deliver_report(self, message: Report) -> None:
        report, sequence = message.report, message.sequence
        key = _key(report)
        attempt = self._attempts.get(key)
        if attempt is None:
            if sequence <= self._finished.get(key, 0):
                self._duplicates += 1
            else:
                self._orphans += 1
                await self._on_orphan_report(report)
                # The callback may have adopted the attempt: its later reports go there.
                adopted = self._attempts.get(key)
                if adopted is not None:
                    adopted._last_sequence = max(adopted._last_sequence, sequence)
                    adopted._sunk = max(adopted._sunk, sequence)
            self._acks.append((sequence, None))
        elif sequence <= attempt._last_sequence:
            self._duplicates += 1  # acknowledged once its first copy is journaled
            self._acks.append((sequence, attempt))
        else:
            while self._queued >= _MAX_QUEUED:
                self._space = anyio.Event()
                await self._space.wait()
            attempt._last_sequence = sequence
            attempt._queue.append((sequence, report))
            self._queued += 1
            self._acks.append((sequence, attempt))
            if not attempt._draining:
                attempt._draining = True
                attempt._idle = anyio.Event()
                if self._task_group is None:
                    await self._drain(attempt)
                else:
                    self._task_group.start_soon(self._drain, attempt)
        self._advance_acks()

    async def _drain(self, attempt: RemoteAttempt) -> None:
        """Journal an attempt's queued reports in order, each through its sink."""
        key = _key(attempt.spec)
        try:
            while attempt._queue:
                sequence, report = attempt._queue[0]
                if isinstance(report, AttemptStarted):
                    attempt._pid = report.pid
                await attempt._sink(report)
                attempt._queue.popleft()
                self._queued -= 1
                self._space.set()
                attempt._sunk = sequence
                self._delivered += 1
                if isinstance(report, AttemptFinished):
                    attempt._result = report
                    self._attempts.pop(key, None)
                    self._finished[key] = sequence
                    if len(self._finished) > _FINISHED_MEMORY:
                        self._finished.popitem(last=False)
                    attempt._finished.set()
                self._advance_acks()
        except Exception:
            # Nothing after this report is acknowledged: the agent re-sends it after a
            # reconnect.  A sink is not supposed to raise; say so loudly.
            _log.exception("remote_report_failed", node_id=self._node, job_id=key[0])
            self._queued -= len(attempt._queue)
            attempt._queue.clear()
            self._space.set()
        finally:
            attempt._draining = False
            attempt._idle.set()

    def _advance_acks(self) -> None:
        acks = self._acks
        acknowledged = 0
        while acks:
            sequence, attempt = acks[0]
            if attempt is not None and attempt._sunk < sequence:
                break
            acks.popleft()
            acknowledged = sequence
        if acknowledged and self._connection is not None:
            # Cumulative: the sender sends only the latest, however many piled up meanwhile.
            self._ack_to_send = acknowledged
            self._wakeup.set()

    def acknowledge_heartbeat(self, sequence: int) -> None:
        """Answer the agent's heartbeat ``sequence`` (read just now), renewing its lease.

        Queued for the sender task, never sent from the reader: a reader blocked on a stalled
        connection would stop noticing that the agent went silent.  Only the latest counts.
        """
        if self._connection is not None:
            self._heartbeat_to_ack = max(self._heartbeat_to_ack, sequence)
            self._wakeup.set()

    # -- requests ----------------------------------------------------------------------------

    async def read_log(
        self,
        job_id: str,
        task_id: str,
        attempt: int,
        *,
        max_bytes: int = 64 * 1024,
    ) -> str | None:
        """Return the tail of an attempt's log on the agent (None when it has no such log).

        Raises:
            AgentUnavailableError: the agent is not connected, the connection is lost, or no
                answer came within the executor's ``read_log_timeout``.
        """
        connection = self._connection
        if connection is None:
            raise AgentUnavailableError(
                f"agent {self._node!r} is not connected",
                job_id=job_id,
                task_id=task_id,
                attempt=attempt,
            )
        request = self._last_request = next(self._requests)
        done, answer = anyio.Event(), list[LogChunk]()
        self._log_requests[request] = (done, answer)
        limit = self._read_log_timeout
        try:
            with anyio.move_on_after(limit):
                await connection.send(
                    ReadLog(
                        request=request,
                        job_id=job_id,
                        task_id=task_id,
                        attempt=attempt,
                        max_bytes=max_bytes,
                    )
                )
                await done.wait()
        except WireError as error:
            raise AgentUnavailableError(
                f"agent {self._node!r}: {error.reason}",
                job_id=job_id,
                task_id=task_id,
                attempt=attempt,
            ) from error
        finally:
            del self._log_requests[request]
        if not answer:
            why = "went away" if done.is_set() else f"did not answer within {limit:g} s"
            raise AgentUnavailableError(
                f"agent {self._node!r} {why} (reading the log)",
                job_id=job_id,
                task_id=task_id,
                attempt=attempt,
            )
        chunk = answer[0]
        return None if chunk.missing else chunk.text

    def asked_for_log(self, request: int) -> bool:
        """Return whether a ``ReadLog`` numbered ``request`` was ever sent to this node (a
        ``LogChunk`` answering anything else did not come from an honest agent)."""
        return 1 <= request <= self._last_request

    # -- outbound commands -------------------------------------------------------------------

    def send_nowait(self, message: SleepNode) -> bool:
        """Queue a node command for the agent; return False when the agent is away."""
        return self._send_nowait(message)

    def _send_nowait(self, message: WireMessage) -> bool:
        """Queue a command for the sender task; return False when the agent is away."""
        if self._connection is None:
            return False
        # Bounded by the attempts: each queues at most a few commands over its life.
        self._outgoing.append(message)
        self._wakeup.set()
        return True

    async def _run_sender(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._outgoing or self._ack_to_send or self._heartbeat_to_ack:
                connection = self._connection
                if connection is None:
                    break
                message: WireMessage
                if self._heartbeat_to_ack:
                    message = HeartbeatAck(sequence=self._heartbeat_to_ack)
                    self._heartbeat_to_ack = 0
                elif self._outgoing:
                    message = self._outgoing.popleft()
                else:
                    message = ReportAck(sequence=self._ack_to_send)
                    self._ack_to_send = 0
                try:
                    await connection.send(message)
                except WireError as error:
                    # The reader will see the loss too and detach; cancels are re-sent then.
                    _log.info("remote_send_failed", node_id=self._node, reason=error.reason)
                    break


@asynccontextmanager
async def open_remote_executor(
    *,
    node: str,
    on_orphan_report: OrphanReportSink,
    connection: Connection[WireMessage] | None = None,
    read_log_timeout: float = 10.0,
) -> AsyncIterator[RemoteExecutor]:
    """Open the executor of node agent ``node``, attached to ``connection`` if given.

    ``on_orphan_report`` receives reports of attempts this executor does not know; like a
    report sink it must not raise (the agent would re-send the report).  On exit the sender
    task stops; the attempts' handles stay pending.
    """
    executor = RemoteExecutor(
        node=node, on_orphan_report=on_orphan_report, read_log_timeout=read_log_timeout
    )
    if connection is not None:
        executor.attach(connection)
    # The block's own exception is re-raised as itself, not wrapped in an ExceptionGroup.
    failure: Exception | None = None
    async with anyio.create_task_group() as task_group:
        executor._task_group = task_group
        task_group.start_soon(executor._run_sender)
        try:
            yield executor
        except Exception as error:
            failure = error
        finally:
            task_group.cancel_scope.cancel()
    if failure is not None:
        raise failure
