"""The node agent: runs a coordinator's attempts on this host and reports back, durably.

One agent process runs on each worker host (``taskfarm agent``).  It connects to the
coordinator, authenticates, introduces itself (:class:`AgentHello`: its name, capacity, labels,
the attempts it is still running and how many reports wait in its outbox), heartbeats, and runs
the attempts it is sent on a subprocess executor whose logs and checkpoints live under its
work directory.

## The durable outbox (reports are at-least-once)

Every report an attempt produces is first appended to a local SQLite journal
(``<work-dir>/outbox.db``) and only then sent, as ``Report(sequence, report)`` where
``sequence`` is the report's journal position.  The coordinator answers ``ReportAck(sequence)``
once it has journaled everything up to ``sequence``; the agent then records the acknowledgement
(coalesced: one ``agent.outbox_acked`` event covers many acks) and forgets those reports.
After a reconnect, and after the agent process itself restarts, every unacknowledged report
is sent again, in order.  So a report can arrive twice (its ack was lost, or not yet
journaled when the agent died) but is never lost: receivers de-duplicate by attempt identity
(job, task, fencing token) and sequence, which only grows.

## Processes die with their agent

Every process the agent starts carries ``TASKFARM_EXECUTOR_ID=agent:<work dir>`` in its
environment.  If the agent dies (SIGKILL, the OOM killer), its executor's warden process kills
every process that carries the id, with its process group, at once (see
``actors/executors/_warden.py`` for why a warden and not a parent-death signal).  An attempt that
was running when the agent process died cannot be re-attached (its pipes died with the agent):
on restart, before it connects, the agent kills whatever still carries its id (should the
warden have died too) and reports those attempts ``lost``, so the coordinator requeues them at
once, without spending a retry.  One agent at a time may use a work directory (it holds a lock
on ``<work dir>/agent.lock``), so the processes that carry its id are its own.

## Connections and the lease

The agent reconnects by itself when the coordinator goes away, with exponential backoff
(0.2 s doubling to 10 s, at most a quarter of the lease, reset after each ``Welcome``);
attempts keep running meanwhile and their reports wait in the outbox.  It logs every
successful (re)connect as ``agent_connected`` with the number of attempts it re-claims.  A
refused token is fatal: retrying a wrong secret forever helps nobody, so :func:`run_agent`
raises :class:`AuthenticationError`.

Attempts are leased (see ``_lease.py``): the ``Welcome`` gives the lease, each answered
heartbeat renews it from the moment the heartbeat was sent.  When it runs out (a partition, a
coordinator down for longer than the lease) the agent logs ``agent_lease_expired``, asks its
checkpointable attempts to checkpoint, waits up to half the lease grace for them, stops every
attempt (SIGTERM, SIGKILL at the end of the grace), reports them ``lost`` through the outbox,
drops the connection and starts nothing new until a coordinator welcomes it again.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, assert_never

import anyio
import msgspec
from anyio.abc import TaskGroup

from actors._errors import ExecutorError
from actors.engine import Resources
from actors.executors import (
    PATH_SAFE_PATTERN,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptOutcome,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    Executor,
    RunningAttempt,
    SubprocessExecutor,
    kill_marked,
    open_subprocess_executor,
)
from persistence import open_sqlite_journal
from runtime import (
    AuthenticationError,
    Clock,
    ConfigurationError,
    Connection,
    ConnectionClosedError,
    Credential,
    FrameCodec,
    ProtocolError,
    SystemClock,
    TLSConfig,
    TruncatedFrameError,
    WireError,
    get_logger,
    load_credential,
    load_token,
    open_connection,
)

from ._allocation import Allocation, as_lost, ended_by_allocation, plan_drain, watch_allocation
from ._outbox import (
    OUTBOX_CODEC,
    AttemptKey,
    Outbox,
    OutboxAttemptLost,
    OutboxReport,
    attempt_key,
)
from ._power import sleep_node
from ._probe import check_label
from ._protocol import (
    MAX_REPORTS_PER_FRAME,
    AgentHello,
    AgentToCoordinator,
    CancelAttempt,
    CheckpointAttempt,
    CoordinatorToAgent,
    Heartbeat,
    HeartbeatAck,
    LogChunk,
    PlanDrain,
    ReadLog,
    Report,
    ReportAck,
    Reports,
    RunAttempt,
    SleepNode,
    Welcome,
)
from ._telemetry import UsageReporter

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

__all__ = ["AgentConfig", "AgentHandle", "AgentStatistics", "load_agent_secret", "run_agent"]

_log = get_logger("actors.agent")

AgentWire = AgentToCoordinator | CoordinatorToAgent
_CODEC: FrameCodec[AgentWire] = FrameCodec(AgentWire)

_NAME_PATTERN = r"^[A-Za-z0-9_.@:-]+$"  # AgentHello.name
_SAFE_ID = re.compile(PATH_SAFE_PATTERN)
_MAX_LOG_CHUNK = 1024 * 1024
# Attempt identities this agent ran recently: a RunAttempt repeated after a reconnect (the
# coordinator's dispatch is at-least-once too) must not run the work twice.
_RECENT_ATTEMPTS = 10_000
# How long a stopping agent waits for its last reports to be acknowledged before it leaves.
_FINAL_FLUSH = 2.0
# Reports sent in one frame at most (what piled up while the last frame was being sent), and
# roughly how many bytes of text they may carry together.
_BATCH_REPORTS = MAX_REPORTS_PER_FRAME
_BATCH_BYTES = 256 * 1024
# Heartbeat send times remembered for the lease (answers to older ones no longer renew it).
_HEARTBEATS_REMEMBERED = 64


# -- configuration ----------------------------------------------------------------------------


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to run a node agent (``taskfarm agent`` builds one from its arguments).

    ``heartbeat`` caps the heartbeat interval (the coordinator's, from ``Welcome``, applies when
    it is shorter); ``lease`` caps the coordinator's lease likewise (a shorter one is always
    safe); ``terminate_grace`` is SIGTERM-to-SIGKILL on a timeout and on shutdown.

    Raises:
        ConfigurationError: a field is out of range; ``where`` names it.
    """

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    token_file: str = ""  # the join token; or:
    credential_file: str | None = None  # this node's credential (its name must be ``name``)
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_NAME_PATTERN)]
    work_dir: str
    checkpoint_dir: str | None = None  # default: ``<work_dir>/checkpoints``
    capacity: Resources
    labels: tuple[str, ...] = ()
    # Run (argv, no shell) when the coordinator puts this idle node to sleep (``SleepNode``);
    # empty: the node sleeps only logically.
    sleep_command: tuple[str, ...] = ()
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    heartbeat: float | None = None
    lease: float | None = None
    terminate_grace: float = 10.0
    reconnect_initial: float = 0.2
    reconnect_max: float = 10.0
    welcome_timeout: float = 30.0
    # Seconds between two usage samples sent with a heartbeat (0: none), and the memory limit:
    # an attempt resident beyond this many times its memory request is stopped as oom (0: off).
    sample_interval: float = 10.0
    memory_limit_factor: float = 0.0

    def __post_init__(self) -> None:
        # msgspec checks the Meta constraints when decoding only; direct construction is
        # checked here.
        if not self.host:
            raise ConfigurationError("must not be empty", where="AgentConfig.host")
        if not 1 <= self.port <= 65535:
            raise ConfigurationError(
                f"must be between 1 and 65535, got {self.port}", where="AgentConfig.port"
            )
        if not re.fullmatch(_NAME_PATTERN, self.name) or len(self.name) > 200:
            raise ConfigurationError(
                f"{self.name!r} is not a valid node name (letters, digits and _.@:- only)",
                where="AgentConfig.name",
            )
        for label in self.labels:
            check_label(label, where="AgentConfig.labels")
        if self.tls_key is not None and self.tls_cert is None:
            raise ConfigurationError("a key needs its certificate", where="AgentConfig.tls_cert")
        if bool(self.token_file) == (self.credential_file is not None):
            raise ConfigurationError(
                "give exactly one of token_file and credential_file",
                where="AgentConfig.credential_file",
            )
        for field in (
            "heartbeat",
            "lease",
            "reconnect_initial",
            "reconnect_max",
            "welcome_timeout",
        ):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ConfigurationError(f"must be > 0, got {value}", where=f"AgentConfig.{field}")
        for field in ("sample_interval", "memory_limit_factor"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(
                    f"must be a number >= 0, got {value}", where=f"AgentConfig.{field}"
                )
        if self.terminate_grace < 0:
            raise ConfigurationError(
                f"must be >= 0, got {self.terminate_grace}", where="AgentConfig.terminate_grace"
            )
        if self.reconnect_max < self.reconnect_initial:
            raise ConfigurationError(
                "must be >= reconnect_initial", where="AgentConfig.reconnect_max"
            )

    def tls_config(self) -> TLSConfig | None:
        """Return the TLS settings, or None when no TLS option is set."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        return TLSConfig(cafile=self.tls_ca, certfile=self.tls_cert, keyfile=self.tls_key)


def load_agent_secret(config: AgentConfig) -> tuple[bytes | None, Credential | None]:
    """Return the join token or the node credential ``config`` names (exactly one is set).

    Raises:
        ConfigurationError: the file is unusable, or the credential is not a node credential
            for ``config.name``; ``where`` names the file.
    """
    if config.credential_file is None:
        return load_token(config.token_file), None
    credential = load_credential(config.credential_file)
    if credential.kind != "node":
        raise ConfigurationError(
            f"a {credential.kind} credential cannot run an agent: issue one with "
            "taskfarm token issue --node NAME",
            where=config.credential_file,
        )
    if credential.name != config.name:
        raise ConfigurationError(
            f"the credential is for node {credential.name!r}, not {config.name!r}",
            where=config.credential_file,
        )
    return None, credential


# -- the running agent ------------------------------------------------------------------------


class AgentStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of an agent: whether it is connected, connections so far, outbox and work."""

    connected: bool
    connections: int
    reports_pending: int
    running: int


class AgentHandle:
    """A running agent, as :func:`run_agent` reports it; built by the agent, never directly."""

    def __init__(self, agent: _Agent) -> None:
        self._agent = agent

    @property
    def name(self) -> str:
        """Return the agent's node name."""
        return self._agent.config.name

    def stop(self) -> None:
        """Stop the agent gracefully: terminate running attempts (SIGTERM, SIGKILL after the
        grace period), send their final reports if connected, then return from ``run_agent``."""
        self._agent.stop_requested.set()

    def statistics(self) -> AgentStatistics:
        """Return a snapshot of the agent's state."""
        agent = self._agent
        return AgentStatistics(
            connected=agent.connected,
            connections=agent.connections,
            reports_pending=agent.outbox.pending,
            running=len(agent.executor.running()),
        )


class _Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        token: bytes | None,
        credential: Credential | None = None,
        clock: Clock,
        outbox: Outbox,
        executor: Executor,
        task_group: TaskGroup,
        allocation: Allocation | None = None,
    ) -> None:
        self.config = config
        self.usage = UsageReporter(
            executor=executor,
            clock=clock,
            interval=config.sample_interval,
            scratch=Path(config.work_dir),
        )
        self.allocation = allocation
        self.leaving = False  # the allocation is being ended: the node drains now
        self.connection: Connection[AgentWire] | None = None
        self.token = token
        self.credential = credential
        self.clock = clock
        self.outbox = outbox
        self.executor = executor
        self.task_group = task_group
        self.node_id = config.name
        self.connected = False
        self.connections = 0
        self.stop_requested = anyio.Event()
        self.recent: OrderedDict[AttemptKey, None] = OrderedDict()
        # The lease on our attempts: until when (clock.monotonic(); infinite: none given yet).
        self.lease = 0.0
        self.lease_grace = 0.0
        self.lease_until = math.inf
        self.lease_renewed = anyio.Event()
        self.heartbeats_sent: OrderedDict[int, float] = OrderedDict()  # sequence -> sent at
        self.heartbeat_sequence = 0
        # Attempts stopped because the lease ran out: their end is reported "lost".
        self.lost: set[AttemptKey] = set()
        self.checkpoints_seen: set[AttemptKey] = set()
        self.reported: anyio.Event | None = None  # made by a waiter, set by the next report
        self.connection_scope: anyio.CancelScope | None = None

    # -- attempts ----------------------------------------------------------------------------

    def _handle(self, key: AttemptKey) -> AttemptHandle | None:
        for handle in self.executor.running():
            if attempt_key(handle.spec) == key:
                return handle
        return None

    def _running(self) -> tuple[RunningAttempt, ...]:
        return tuple(
            RunningAttempt(
                job_id=h.spec.job_id,
                task_id=h.spec.task_id,
                attempt=h.spec.attempt,
                fencing_token=h.spec.fencing_token,
            )
            for h in self.executor.running()
        )

    async def report(self, report: AttemptReport) -> None:
        """The executor's report sink: journal the report; the connection sends it."""
        key = attempt_key(report)
        if isinstance(report, AttemptCheckpointed):
            self.checkpoints_seen.add(key)
        elif isinstance(report, AttemptFinished):
            self.checkpoints_seen.discard(key)
            if key in self.lost:
                self.lost.discard(key)
                if report.outcome == "cancelled":  # stopped by us, for the lease
                    report = msgspec.structs.replace(
                        report, outcome="lost", error=self._lost_reason()
                    )
        if self.allocation is not None and await ended_by_allocation(
            report, self.allocation, stopping=self.stop_requested.is_set()
        ):
            assert isinstance(report, AttemptFinished)
            await self.leave_allocation()
            report = as_lost(report)
        if self.reported is not None:
            self.reported.set()
            self.reported = None
        # A start is journaled with whatever comes next (for a short task, its end: one commit
        # and one frame for both) rather than making the attempt wait for its own commit; it is
        # still journaled before it is sent, and before anything after it.
        if not (
            isinstance(report, AttemptStarted)
            and self.outbox.put_nowait(OutboxReport(report=report))
        ):
            await self.outbox.put(OutboxReport(report=report))
        if isinstance(report, AttemptStarted):
            _log.info(
                "attempt_started",
                node_id=self.node_id,
                job_id=report.job_id,
                task_id=report.task_id,
                attempt=report.attempt,
                pid=report.pid,
            )
        elif isinstance(report, AttemptFinished):
            _log.info(
                "attempt_finished",
                node_id=self.node_id,
                job_id=report.job_id,
                task_id=report.task_id,
                attempt=report.attempt,
                outcome=report.outcome,
                elapsed_ms=round(report.runtime_s * 1000),
            )

    def _lost_reason(self) -> str:
        return (
            f"the node lost contact with the coordinator for longer than its lease "
            f"({self.lease:g} s)"
        )

    def lease_valid(self) -> bool:
        """Return whether the agent may run attempts (its lease has not run out)."""
        return self.clock.monotonic() < self.lease_until

    def start_soon(self, spec: AttemptSpec) -> None:
        """Start an attempt the coordinator sent, unless it is a repeat or the lease ran out."""
        key = attempt_key(spec)
        if key in self.recent:
            _log.warning(
                "attempt_duplicate_ignored",
                node_id=self.node_id,
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
            return
        self.recent[key] = None
        if len(self.recent) > _RECENT_ATTEMPTS:
            self.recent.popitem(last=False)
        if not self.lease_valid():
            # Sent before the coordinator lost us: it may run elsewhere by now.
            error = f"not started: {self._lost_reason()}"
            self.task_group.start_soon(self._not_started, spec, "lost", error)
            return
        executor = self.executor
        if not isinstance(executor, SubprocessExecutor):
            self.task_group.start_soon(self._start, spec)  # an executor with only start()
            return
        try:
            executor.start_nowait(spec, self.report)
        except ExecutorError as error:
            self._start_failed(spec, error)

    async def _start(self, spec: AttemptSpec) -> None:
        try:
            await self.executor.start(spec, self.report)
        except ExecutorError as error:
            self._start_failed(spec, error)

    def _start_failed(self, spec: AttemptSpec, error: ExecutorError) -> None:
        # Nothing ran and nothing was reported: the coordinator still needs an answer.
        _log.warning(
            "attempt_start_failed",
            node_id=self.node_id,
            job_id=spec.job_id,
            task_id=spec.task_id,
            attempt=spec.attempt,
            error=str(error),
        )
        message = f"the agent could not start it: {error}"
        self.task_group.start_soon(self._not_started, spec, "start_failed", message)

    async def _not_started(self, spec: AttemptSpec, outcome: AttemptOutcome, error: str) -> None:
        await self.report(
            AttemptFinished(
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
                fencing_token=spec.fencing_token,
                outcome=outcome,
                error=error,
            )
        )

    async def recover(self, lost: Iterable[AttemptStarted]) -> None:
        """Report the attempts the previous agent process ran as lost (their processes were
        killed before this is called)."""
        for started in lost:
            finished = AttemptFinished(
                job_id=started.job_id,
                task_id=started.task_id,
                attempt=started.attempt,
                fencing_token=started.fencing_token,
                outcome="lost",
                error="the agent restarted while the attempt ran",
            )
            marker = OutboxAttemptLost(
                job_id=started.job_id, task_id=started.task_id, fencing_token=started.fencing_token
            )
            await self.outbox.put(OutboxReport(report=finished), marker)
            _log.warning(
                "attempt_lost_in_restart",
                node_id=self.node_id,
                job_id=started.job_id,
                task_id=started.task_id,
                attempt=started.attempt,
            )

    # -- the lease ---------------------------------------------------------------------------

    def _renew(self, lease: float, grace: float, sent_at: float) -> None:
        """A Welcome to a hello sent at ``sent_at`` grants the lease (capped by our own)."""
        if self.config.lease is not None:
            lease = min(lease, self.config.lease) if lease > 0 else self.config.lease
            grace = min(grace, lease / 2) if grace > 0 else lease / 2
        self.lease, self.lease_grace = lease, grace
        self.lease_until = sent_at + lease if lease > 0 else math.inf
        self.heartbeats_sent.clear()
        self.lease_renewed.set()
        self.lease_renewed = anyio.Event()

    def _heartbeat_answered(self, sequence: int) -> None:
        sent_at = self.heartbeats_sent.get(sequence)
        if sent_at is None:
            return  # from before the last Welcome, or long forgotten: renews nothing
        while self.heartbeats_sent and next(iter(self.heartbeats_sent)) <= sequence:
            self.heartbeats_sent.popitem(last=False)
        if self.lease > 0:
            self.lease_until = max(self.lease_until, sent_at + self.lease)

    async def watch_lease(self) -> None:
        """Stop the attempts whenever the lease runs out (until cancelled)."""
        while True:
            deadline = self.lease_until
            if deadline == math.inf:
                await self.lease_renewed.wait()
            elif self.clock.monotonic() < deadline:
                await self.clock.sleep_until(deadline)
            else:
                renewed = self.lease_renewed
                await self._lease_expired()
                await renewed.wait()

    async def _lease_expired(self) -> None:
        clock = self.clock
        expired_at = clock.monotonic()
        running = [h for h in self.executor.running() if h.result is None]
        _log.warning(
            "agent_lease_expired",
            node_id=self.node_id,
            lease=self.lease,
            silent_for=round(expired_at - (self.lease_until - self.lease), 3),
            attempts=len(running),
        )
        if self.connection_scope is not None:
            self.connection_scope.cancel()  # it is dead or dying: start afresh
        keys = [attempt_key(h.spec) for h in running]
        self.lost.update(keys)
        for key in keys:
            self.checkpoints_seen.discard(key)
        asked = [key for h, key in zip(running, keys, strict=True) if h.request_checkpoint()]
        if asked:
            await self._wait_for_checkpoints(asked, expired_at + self.lease_grace / 2)
        kill_at = expired_at + self.lease_grace
        for handle in running:
            handle.cancel(grace=max(0.0, kill_at - clock.monotonic()))
        for key, handle in zip(keys, running, strict=True):
            _log.warning(
                "attempt_stopped_lease_expired",
                node_id=self.node_id,
                job_id=key[0],
                task_id=key[1],
                attempt=handle.spec.attempt,
                checkpointed=key in self.checkpoints_seen,
            )

    async def _wait_for_checkpoints(self, keys: list[AttemptKey], deadline: float) -> None:
        """Wait until each of ``keys`` reported a checkpoint or ended, or until ``deadline``."""
        async with anyio.create_task_group() as task_group:

            async def timer() -> None:
                await self.clock.sleep_until(deadline)
                task_group.cancel_scope.cancel()

            task_group.start_soon(timer)
            while True:
                running = {attempt_key(h.spec) for h in self.executor.running()}
                waiting = [k for k in keys if k in running and k not in self.checkpoints_seen]
                if not waiting:
                    break
                if self.reported is None:
                    self.reported = anyio.Event()
                await self.reported.wait()
            task_group.cancel_scope.cancel()

    # -- the connection ----------------------------------------------------------------------

    async def run_connections(self) -> None:
        """Connect, serve, and reconnect with backoff until cancelled.

        Raises:
            AuthenticationError: the coordinator refused the token (or TLS failed): fatal.
        """
        config = self.config
        tls = config.tls_config()
        delay = config.reconnect_initial
        while True:
            welcomed = False
            try:
                with anyio.CancelScope() as self.connection_scope:
                    async with open_connection(
                        config.host,
                        config.port,
                        codec=_CODEC,
                        token=self.token,
                        credential=self.credential,
                        name=config.name,
                        role="agent",
                        tls=tls,
                    ) as connection:
                        welcome = await self._greet(connection)
                        welcomed = True
                        delay = config.reconnect_initial
                        await self._serve(connection, welcome)
                if self.connection_scope.cancelled_caught:
                    reason = "the lease ran out"
                else:
                    reason = "the coordinator closed the connection"
            except Exception as error:
                leaf = _wire_leaf(error)
                if leaf is None:
                    raise
                if isinstance(leaf, AuthenticationError) and not _transient(leaf):
                    _log.error("agent_authentication_failed", node_id=self.node_id, **leaf.fields())
                    raise leaf from None
                reason = leaf.reason
            finally:
                if self.connected:
                    self.connected = False
            if welcomed:
                _log.warning("agent_disconnected", node_id=self.node_id, reason=reason)
            else:
                _log.info(
                    "agent_connect_failed", node_id=self.node_id, reason=reason, retry_in=delay
                )
            if self.lease > 0 and any(h.result is None for h in self.executor.running()):
                # Reconnect well within the lease, or a short outage would cost the attempts.
                delay = min(delay, max(config.reconnect_initial, self.lease / 4))
            await self.clock.sleep(delay)
            if not welcomed:
                delay = min(delay * 2, config.reconnect_max)

    async def _greet(self, connection: Connection[AgentWire]) -> Welcome:
        hello = AgentHello(
            name=self.config.name,
            capacity=self.config.capacity,
            labels=self.config.labels,
            running=self._running(),
            unacknowledged=self.outbox.pending,
        )
        sent_at = self.clock.monotonic()
        await connection.send(hello)
        try:
            with anyio.fail_after(self.config.welcome_timeout):
                first = await connection.receive()
        except TimeoutError:
            raise ProtocolError(
                connection.peer,
                reason=f"no Welcome within {self.config.welcome_timeout:g} s",
            ) from None
        if not isinstance(first, Welcome):
            raise ProtocolError(
                connection.peer, reason=f"expected Welcome, got {type(first).__name__}"
            )
        self.node_id = first.node
        self.connected = True
        self.connections += 1
        self._renew(first.lease, first.lease_grace, sent_at)
        _log.info(
            "agent_connected",
            node_id=self.node_id,
            peer=connection.peer,
            reconnect=self.connections > 1,
            reclaimed=len(hello.running),
            unacknowledged=hello.unacknowledged,
            lease=self.lease,
        )
        return first

    async def _serve(self, connection: Connection[AgentWire], welcome: Welcome) -> None:
        interval = welcome.heartbeat_interval
        if self.config.heartbeat is not None:
            interval = min(interval, self.config.heartbeat)
        if self.allocation is not None:
            now = self.clock.now() if self.leaving else None
            await connection.send(plan_drain(self.allocation, now=now))
        self.connection = connection
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._heartbeats, connection, max(interval, 0.01))
            task_group.start_soon(self._send_reports, connection)
            try:
                async for message in connection:
                    self._dispatch(message, connection, task_group)
            finally:
                self.connection = None
            task_group.cancel_scope.cancel()

    async def _heartbeats(self, connection: Connection[AgentWire], interval: float) -> None:
        while True:
            self.heartbeat_sequence += 1
            sequence = self.heartbeat_sequence
            self.heartbeats_sent[sequence] = self.clock.monotonic()
            if len(self.heartbeats_sent) > _HEARTBEATS_REMEMBERED:
                self.heartbeats_sent.popitem(last=False)
            running = len(self.executor.running())
            await connection.send(
                Heartbeat(running=running, sequence=sequence, usage=self.usage.take())
            )
            await self.clock.sleep(interval)

    async def _send_reports(self, connection: Connection[AgentWire]) -> None:
        """Send the outbox in order: what piled up since the last frame goes in one frame."""
        sent = 0
        while True:
            changed = self.outbox.changed()
            batch: list[Report] = []
            size = 0
            for sequence, report in self.outbox.after(sent):
                batch.append(Report(sequence=sequence, report=report))
                size += _text_size(report)
                sent = sequence
                if len(batch) >= _BATCH_REPORTS or size >= _BATCH_BYTES:
                    await _send_batch(connection, batch)
                    batch, size = [], 0
            if batch:
                await _send_batch(connection, batch)
            await changed.wait()

    def _dispatch(
        self, message: AgentWire, connection: Connection[AgentWire], task_group: TaskGroup
    ) -> None:
        match message:
            case RunAttempt(spec=spec):
                # The attempt runs in the executor's task group: whatever happens to this
                # connection, it runs on.
                self.start_soon(spec)
            case CancelAttempt():
                handle = self._handle(attempt_key(message))
                if handle is not None:
                    _log.info(
                        "attempt_cancel_requested",
                        node_id=self.node_id,
                        job_id=message.job_id,
                        attempt=handle.spec.attempt,
                        reason=message.reason,
                    )
                    handle.cancel(grace=max(0.0, message.grace))
            case CheckpointAttempt():
                handle = self._handle(attempt_key(message))
                if handle is not None:
                    handle.request_checkpoint()
            case ReportAck(sequence=sequence):
                self.outbox.acknowledge(sequence)
            case HeartbeatAck(sequence=sequence):
                self._heartbeat_answered(sequence)
            case ReadLog():
                task_group.start_soon(self._read_log, connection, message)
            case SleepNode(reason=reason):
                # In the agent's group, not the connection's: the host may drop it meanwhile.
                self.task_group.start_soon(
                    partial(
                        sleep_node,
                        self.config.sleep_command,
                        node_id=self.node_id,
                        reason=reason,
                        running=len(self.executor.running()),
                    )
                )
            case Welcome():
                pass  # a repeated welcome changes nothing
            case AgentHello() | Heartbeat() | Report() | Reports() | LogChunk() | PlanDrain():
                raise ProtocolError(
                    connection.peer,
                    reason=f"the coordinator sent an agent's message ({type(message).__name__})",
                )
            case _:
                assert_never(message)

    async def _read_log(self, connection: Connection[AgentWire], request: ReadLog) -> None:
        text, missing = "", True
        if _SAFE_ID.match(request.job_id) and _SAFE_ID.match(request.task_id):
            path = (
                Path(self.config.work_dir)
                / "logs"
                / request.job_id
                / f"{request.task_id}.{request.attempt}.log"
            )
            limit = min(max(request.max_bytes, 0), _MAX_LOG_CHUNK)
            text, missing = await anyio.to_thread.run_sync(_tail, path, limit)
        await connection.send(LogChunk(request=request.request, text=text, missing=missing))

    async def leave_allocation(self) -> None:
        """Have the coordinator drain this node now, before the attempts the ending
        allocation kills are reported: the slots they free must get no new work here."""
        if self.allocation is None or self.leaving:
            return
        self.leaving = True
        connection = self.connection
        if connection is None:
            return  # the next connection says it
        with anyio.move_on_after(_FINAL_FLUSH):
            try:
                await connection.send(plan_drain(self.allocation, now=self.clock.now()))
            except (WireError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # gone: the coordinator requeues the work when the node times out

    async def shutdown(self) -> None:
        """Terminate running attempts and give their final reports a chance to get out."""
        await self.leave_allocation()
        running = self.executor.running()
        grace = self.config.terminate_grace
        for handle in running:
            handle.cancel(grace=grace)
        with anyio.move_on_after(grace + 5.0):
            for handle in running:
                await handle.wait()
        with anyio.move_on_after(_FINAL_FLUSH):
            while self.connected and self.outbox.pending:
                await self.outbox.acknowledged().wait()


async def _send_batch(connection: Connection[AgentWire], batch: list[Report]) -> None:
    await connection.send(batch[0] if len(batch) == 1 else Reports(reports=tuple(batch)))


def _text_size(report: AttemptReport) -> int:
    """Roughly what a report weighs on the wire: its strings, plus the rest."""
    return 128 + sum(
        len(value) for value in msgspec.structs.astuple(report) if isinstance(value, str)
    )


def _tail(path: Path, limit: int) -> tuple[str, bool]:
    """Return the last ``limit`` bytes of ``path`` (from a line start) and whether it is missing."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = max(0, size - limit)
            file.seek(start)
            data = file.read(limit)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return "", True
    if start > 0:
        newline = data.find(b"\n")
        data = data[newline + 1 :] if newline >= 0 else data
    return data.decode("utf-8", errors="replace"), False


def executor_id_of(work_dir: Path) -> str:
    """Return the id the processes of the agent that uses ``work_dir`` carry."""
    return f"agent:{work_dir.absolute()}"


def _lock_work_dir(work: Path) -> int:
    """Take the work directory's lock (for the life of this process); return its descriptor.

    Raises:
        ConfigurationError: another live agent holds it.
    """
    path = work / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigurationError(
            f"another agent (pid {holder}) uses this work directory", where=str(work)
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _wire_leaf(error: BaseException) -> WireError | None:
    """Return the wire error behind ``error`` (also inside a group), or None if there is none
    or something else failed too."""
    if isinstance(error, BaseExceptionGroup):
        leaves = [_wire_leaf(inner) for inner in error.exceptions]
        if any(leaf is None for leaf in leaves):
            return None
        found = [leaf for leaf in leaves if leaf is not None]
        for leaf in found:
            if isinstance(leaf, AuthenticationError):
                return leaf
        return found[0] if found else None
    return error if isinstance(error, WireError) else None


def _transient(error: AuthenticationError) -> bool:
    """Tell a handshake that merely broke off, or was refused for now, (retry) from a refusal
    (fatal)."""
    if error.retryable or "timed out" in error.reason:
        return True
    cause: Any = error.__cause__
    if isinstance(cause, ConnectionClosedError | TruncatedFrameError):
        return True
    return isinstance(cause, anyio.EndOfStream | anyio.BrokenResourceError) or (
        isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError)
    )


async def run_agent(
    config: AgentConfig,
    *,
    clock: Clock | None = None,
    open_executor: Callable[..., AbstractAsyncContextManager[Executor]] | None = None,
    allocation: Allocation | None = None,
    task_status: TaskStatus[AgentHandle] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node agent until it is stopped (``AgentHandle.stop()``) or cancelled.

    ``open_executor`` replaces the subprocess executor (it gets the same keyword arguments:
    ``log_dir``, ``checkpoint_dir``, ``clock``, ``terminate_grace``, ``executor_id``); the
    engine benchmark uses it to measure the agent path without a process per task.
    ``allocation`` is the batch allocation the agent runs in, when it has a known end (see
    ``_allocation.py``): the agent then plans its node's drain, warns checkpointable attempts
    and stops before the end.

    Opens the outbox and the executor under ``config.work_dir``, re-queues the reports the
    last run left unacknowledged, reports an :class:`AgentHandle` through ``task_status``, and
    then connects (and reconnects) to the coordinator.  Cancelling kills running attempts at
    once; ``stop()`` terminates them with the grace period first.

    Raises:
        ConfigurationError: the token file, TLS files or work directory are unusable, or
            another agent uses the work directory.
        AuthenticationError: the coordinator refused the token, or TLS verification failed.
        JournalFileError: the outbox file is damaged.
    """
    chosen = clock if clock is not None else SystemClock()
    token, credential = load_agent_secret(config)
    tls = config.tls_config()
    if tls is not None:
        tls.client_context()  # a missing or invalid certificate is named now, not when connecting
    work = Path(config.work_dir)
    try:
        await anyio.to_thread.run_sync(lambda: work.mkdir(parents=True, exist_ok=True))
    except OSError as error:
        raise ConfigurationError(
            f"cannot create the work directory: {error.strerror}", where=str(work)
        ) from None
    try:
        lock = await anyio.to_thread.run_sync(_lock_work_dir, work)
    except OSError as error:
        raise ConfigurationError(
            f"cannot lock the work directory: {error.strerror}", where=str(work)
        ) from None
    executor_id = executor_id_of(work)
    async with AsyncExitStack() as stack:
        stack.callback(os.close, lock)
        # NORMAL, not FULL: in WAL mode a commit survives the agent's own crash (SIGKILL, OOM)
        # without an fsync; only a power loss of this host can drop the last reports, and then
        # the coordinator requeues the attempt after the heartbeat timeout.  The coordinator's
        # journal, which holds the truth, stays FULL.
        journal = await stack.enter_async_context(
            open_sqlite_journal(
                work / "outbox.db", clock=chosen, codec=OUTBOX_CODEC, synchronous="NORMAL"
            )
        )
        outbox = Outbox(journal)
        lost = await outbox.load()
        # Before anything new starts: what still carries our id is a previous incarnation's.
        leftovers = await anyio.to_thread.run_sync(kill_marked, executor_id)
        if leftovers:
            _log.warning("agent_leftovers_killed", node_id=config.name, processes=leftovers)
        options: dict[str, Any] = {}
        if open_executor is None:
            options["memory_limit_factor"] = config.memory_limit_factor
        executor = await stack.enter_async_context(
            (open_executor or open_subprocess_executor)(
                log_dir=work / "logs",
                checkpoint_dir=(
                    Path(config.checkpoint_dir)
                    if config.checkpoint_dir is not None
                    else work / "checkpoints"
                ),
                clock=chosen,
                terminate_grace=config.terminate_grace,
                executor_id=executor_id,
                **options,
            )
        )
        try:
            async with anyio.create_task_group() as task_group:
                agent = _Agent(
                    config,
                    token=token,
                    credential=credential,
                    clock=chosen,
                    outbox=outbox,
                    executor=executor,
                    task_group=task_group,
                    allocation=allocation,
                )
                await agent.recover(lost)
                task_group.start_soon(outbox.run)
                task_group.start_soon(agent.watch_lease)
                task_group.start_soon(agent.usage.run)
                connections = _Stoppable(agent.run_connections)
                task_group.start_soon(connections.run)
                if allocation is not None:
                    task_group.start_soon(
                        partial(
                            watch_allocation,
                            allocation,
                            node_id=config.name,
                            clock=chosen,
                            executor=executor,
                            terminate_grace=config.terminate_grace,
                            stop=agent.stop_requested,
                        )
                    )
                task_status.started(AgentHandle(agent))
                # Either the connection loop fails (a refused token) or we are asked to stop.
                await _first(agent.stop_requested.wait, connections.finished.wait)
                if connections.error is None:
                    await agent.shutdown()
                task_group.cancel_scope.cancel()
            if connections.error is not None:
                raise connections.error
        finally:
            with anyio.move_on_after(5, shield=True):
                await outbox.flush_acks()
            _log.info("agent_stopped", node_id=config.name, **outbox.statistics())


class _Stoppable:
    """Run a coroutine function, keeping its error instead of failing the task group."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self.finished = anyio.Event()
        self.error: Exception | None = None

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as error:
            self.error = error
        finally:
            self.finished.set()


async def _first(*waits: Any) -> None:
    """Return once the first of ``waits`` returns."""
    async with anyio.create_task_group() as task_group:

        async def one(wait: Any) -> None:
            await wait()
            task_group.cancel_scope.cancel()

        for wait in waits:
            task_group.start_soon(one, wait)
