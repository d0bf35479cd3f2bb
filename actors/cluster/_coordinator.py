"""The coordinator: the engine behind an authenticated TCP endpoint for agents and clients.

``taskfarm serve`` runs :func:`run_coordinator`.  On start it recovers the engine from the
journal; attempts that were running are *in doubt* for ``restart_grace`` seconds (at least the
fence), during which their agents reconnect (by themselves, with backoff), re-report what they
still run and replay the reports they could not deliver.  An agent that sends nothing for
``heartbeat_timeout`` seconds is disconnected and its node shown ``unreachable`` (no new work);
its attempts are leased (see ``_lease.py``): the agent stops them itself once its lease runs
out, and only after the fence, counted from the last frame read from it, does its node go
offline and its attempts get requeued from their last checkpoint.  An agent back within the
fence re-claims whatever it still runs.

One connection, one role (from the handshake): an ``agent`` speaks the agent protocol, a
``client`` (the CLI) sends one request at a time and gets one reply.  Who may connect, as
what, is the :class:`CredentialStore`'s decision (the join token, node and client
credentials); what a client may ask is :mod:`._access`'s table.  An agent's frames are
accepted only for its own node: a report, a claim or a log answer naming an attempt that the
engine gave to another node is refused and logged as ``security_refused``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, assert_never, get_args

import anyio
import msgspec
from anyio.abc import TaskStatus

from actors._errors import AccessDeniedError, JobFinishedError, TaskNotFoundError
from actors.engine import (
    ENGINE_CODEC,
    Engine,
    EngineSettings,
    NodeSummary,
    Policy,
    TaskAssigned,
    TaskSummary,
    job_stream,
    open_engine,
)
from actors.executors import AttemptReport
from persistence import (
    EventCodec,
    JournalError,
    JournalFileError,
    open_sqlite_journal,
    open_usage_store,
)
from runtime import (
    Clock,
    ConfigurationError,
    Connection,
    ConnectionClosedError,
    Credential,
    FrameCodec,
    Message,
    Principal,
    ProtocolError,
    SystemClock,
    TaskfarmError,
    TLSConfig,
    WireError,
    get_logger,
    load_credential,
    open_server,
    write_private_file,
)

from ._access import decide, describe_request, rule_for
from ._credentials import (
    AUTH_CODEC,
    Change,
    CredentialsReply,
    CredentialStore,
    IssueCredentialRequest,
    IssuedCredentialReply,
    ListCredentialsRequest,
    RevokeCredentialRequest,
    Role,
)
from ._lease import LeaseTiming, lease_timing
from ._power import PowerControl
from ._protocol import (
    AgentHello,
    AmendJobRequest,
    CancelAttempt,
    CancelJobRequest,
    CheckpointTaskRequest,
    ClientRequest,
    CoordinatorInbound,
    ErrorReply,
    Heartbeat,
    JobsReply,
    ListNodesRequest,
    LogChunk,
    LogsRequest,
    NodesReply,
    PauseJobRequest,
    PlanDrain,
    PolicyCommandRequest,
    PolicyReply,
    PreemptTaskRequest,
    Reply,
    Report,
    Reports,
    ResumeJobRequest,
    RetriedReply,
    RetryTasksRequest,
    SetNodeHealthRequest,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
    TaskVerbReply,
    TextReply,
    Welcome,
    WhyRequest,
    WireMessage,
)
from ._remote import RemoteExecutor, open_remote_executor
from ._telemetry import Telemetry, TelemetrySettings, usage_store_path
from ._usage_wire import UsageRequest

__all__ = [
    "COORDINATOR_CODEC",
    "WIRE_CODEC",
    "Coordinator",
    "CoordinatorConfig",
    "lock_journal",
    "open_coordinator",
    "run_coordinator",
]

_log = get_logger("actors.coordinator")

WIRE_CODEC: FrameCodec[WireMessage] = FrameCodec(WireMessage)
# The coordinator's own end decodes only what a peer may send it: a reply type sent by a
# client is refused by its tag, before its body (maybe a million summaries) is built.
_INBOUND_CODEC: FrameCodec[WireMessage] = FrameCodec(CoordinatorInbound)

COORDINATOR_CODEC = EventCodec()
"""Every event a coordinator journals: the engine's and the credentials' (a policy's domain
events are added per coordinator: ``CoordinatorConfig.events``)."""
COORDINATOR_CODEC.update(ENGINE_CODEC)
COORDINATOR_CODEC.update(AUTH_CODEC)

_CLIENT_REQUESTS: tuple[type[Message], ...] = get_args(ClientRequest)
_HOLDERS_REMEMBERED = 4096  # (job, fencing token) -> node lookups kept (they never change)


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """Everything ``taskfarm serve`` takes.

    ``token`` is the join token (None: turned off, only credentials authenticate);
    ``join_client_role`` the role of a client that authenticates with it (None: clients must
    use a credential).  A client that sends nothing for ``client_idle_timeout`` seconds is
    disconnected (agents are held to their heartbeat instead).
    """

    journal: Path
    init_journal: bool = False  # initialise an existing empty journal file (`serve --init`)
    token: bytes | None
    join_client_role: Role | None = "admin"
    client_idle_timeout: float = 60.0
    host: str = "127.0.0.1"
    port: int = 7717
    tls: TLSConfig | None = None
    work_dir: Path = Path("taskfarm-work")
    local_agents: int = 0
    token_file: Path | None = None  # local agents read the join token from here
    # Run (argv, placeholders filled) to wake a node whose health leaves sleeping while its
    # agent is away (see _power.py); empty: nodes wake only when their agent comes back.
    wake_command: tuple[str, ...] = ()
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    lease: float | None = None  # default: 2 x heartbeat_timeout (see _lease.py)
    fence: float | None = None  # default: lease + lease / 2 + max(2 s, lease / 5)
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    settings: EngineSettings = field(default_factory=EngineSettings)
    # Domain event codecs (the ``taskfarm.events`` plugins) merged into the journal's codec,
    # so a policy's command events can be journaled and read back.
    events: tuple[EventCodec, ...] = ()
    # How long measured usage is kept, per minute and per hour (in ``<journal>.usage.db``).
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    def __post_init__(self) -> None:
        self.lease_timing()  # a bad lease or fence is named now, not when an agent connects

    def lease_timing(self) -> LeaseTiming:
        """Return the agents' lease, its grace and the fence.

        Raises:
            ConfigurationError: the lease or the fence is out of range (see ``lease_timing``).
        """
        return lease_timing(
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            lease=self.lease,
            fence=self.fence,
        )


class Coordinator:
    """A running coordinator (see :func:`open_coordinator`)."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        engine: Engine,
        clock: Clock,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        # Measured usage (kept in memory only when no store is given).
        self.telemetry = telemetry or Telemetry(store=None, clock=clock, settings=config.telemetry)
        self.engine = engine
        self.clock = clock
        self.port = config.port
        self._executors: dict[str, RemoteExecutor] = {}
        self._connections: dict[str, Connection[WireMessage]] = {}
        self._generation: dict[str, int] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self.local_agent_pids: list[int] = []
        # Nodes this coordinator marked unreachable because their agent went away.
        self._suspended: set[str] = set()
        self._clients: set[Connection[WireMessage]] = set()
        self._holders: dict[tuple[str, int], tuple[str, ...]] = {}
        self.credentials = CredentialStore(
            engine.journal,
            clock,
            join_token=config.token,
            join_client_role=config.join_client_role,
            on_change=self._credential_changed,
        )
        self.timing = config.lease_timing()
        # When the last frame of each agent was read (the fence counts from it).
        self._last_heard: dict[str, float] = {}
        self.power = PowerControl(
            engine=engine,
            clock=clock,
            executors=self._executors,
            wake_command=config.wake_command,
        )

    # -- agents ---------------------------------------------------------------------------------

    async def _executor_for(self, name: str) -> RemoteExecutor:
        executor = self._executors.get(name)
        if executor is None:

            async def orphan(report: AttemptReport) -> None:
                # A report of an attempt this node's executor does not know (sent across a
                # restart, or forged): only the node the engine gave the attempt to may end it.
                holder = await self._holder(report.job_id, report.fencing_token)
                if holder is None:
                    # No journaled assignment has this token (yet): no honest node can hold
                    # it, and the job must not judge it by the token alone.
                    _log.info(
                        "orphan_report_dropped",
                        node_id=name,
                        job_id=report.job_id,
                        task=report.task_id,
                        reason="no assignment with this fencing token is journaled",
                    )
                    return
                if name not in holder:
                    connection = self._connections.get(name)
                    self._refuse_frame(
                        peer=connection.peer if connection is not None else "",
                        node_id=name,
                        claimed_node=holder[0],
                        job_id=report.job_id,
                        task=report.task_id,
                        reason=f"report ({type(report).__name__}) for an attempt of another node",
                    )
                    return  # acknowledged and dropped: the agent must not re-send it forever
                await self.engine.deliver_orphan(report, name)

            async def host(*, task_status: TaskStatus[RemoteExecutor]) -> None:
                # The executor lives in its own task, as long as the coordinator.
                async with open_remote_executor(node=name, on_orphan_report=orphan) as remote:
                    task_status.started(remote)
                    await anyio.sleep_forever()

            assert self._task_group is not None
            executor = await self._task_group.start(host)
            self._executors[name] = executor
        return executor

    async def _serve_agent(self, connection: Connection[WireMessage]) -> None:
        config = self.config
        try:
            with anyio.fail_after(config.heartbeat_timeout):
                hello = await connection.receive()
        except TimeoutError:
            # A refusal of this peer, not a failure of the coordinator's.
            raise ProtocolError(
                connection.peer,
                reason=f"no agent.hello within {config.heartbeat_timeout:g} s",
            ) from None
        if not isinstance(hello, AgentHello):
            raise ProtocolError(
                connection.peer, reason=f"expected agent.hello, got {type(hello).__name__}"
            )
        name = hello.name
        self._check_agent_identity(connection, hello)
        if name in self._connections:
            raise ProtocolError(
                connection.peer, reason=f"an agent named {name!r} is already connected"
            )
        self._connections[name] = connection
        self._last_heard[name] = self.clock.monotonic()
        generation = self._generation[name] = self._generation.get(name, 0) + 1
        executor = await self._executor_for(name)
        # Attempts this node ran when the agent left that it no longer runs: unless the reports
        # it replays from its outbox (``unacknowledged``, sent first) end them, they died with
        # its previous process (a restart with a wiped work folder, a RunAttempt lost in flight)
        # and would otherwise stay "running" forever.
        listed = {(r.job_id, r.task_id, r.fencing_token) for r in hello.running}
        gone = executor.waiting_on() - listed
        replay = hello.unacknowledged
        try:
            timing = self.timing
            await connection.send(
                Welcome(
                    node=name,
                    heartbeat_interval=config.heartbeat_interval,
                    lease=timing.lease,
                    lease_grace=timing.grace,
                )
            )
            # Only now: attaching wakes the executor's sender (re-sent cancellations), and the
            # agent accepts nothing before its Welcome.
            executor.attach(connection)
            engine = self.engine
            if engine.node_ref(name) is None:
                self._suspended.discard(name)  # joining sets it online (unless quarantined)
                await engine.add_node(
                    name,
                    hello.capacity,
                    executor=executor,
                    labels=hello.labels,
                    remote=True,
                    address=_host_of_peer(connection.peer),
                )
            elif name in self._suspended:
                self._suspended.discard(name)
                await engine.set_node_reachable(name, "connected")
            claimed = 0
            for running in hello.running:
                try:
                    task = int(running.task_id)
                except ValueError:
                    task = -1
                if task >= 0 and await engine.claim_attempt(
                    running.job_id, task, running.fencing_token, name
                ):
                    claimed += 1
                    continue
                holder = await self._holder(running.job_id, running.fencing_token)
                if holder is not None and name not in holder:
                    self._refuse_frame(
                        peer=connection.peer,
                        node_id=name,
                        claimed_node=holder[0],
                        job_id=running.job_id,
                        task=running.task_id,
                        reason="claim of an attempt of another node",
                    )
                await connection.send(
                    CancelAttempt(
                        job_id=running.job_id,
                        task_id=running.task_id,
                        fencing_token=running.fencing_token,
                        grace=0.0,
                        reason="stale attempt (reassigned while the agent was away)",
                    )
                )
            _log.info(
                "agent_connected",
                node_id=name,
                peer=connection.peer,
                running=len(hello.running),
                reclaimed=claimed,
            )
            self.power.agent_connected(name, _host_of_peer(connection.peer))
            if replay <= 0:
                await self._abandon(name, executor, gone)
            while True:
                with anyio.move_on_after(config.heartbeat_timeout) as scope:
                    message = await connection.receive()
                if scope.cancelled_caught:
                    _log.warning("agent_heartbeat_missed", node_id=name)
                    return
                self._last_heard[name] = self.clock.monotonic()
                match message:
                    case Heartbeat(sequence=sequence):
                        if sequence:
                            executor.acknowledge_heartbeat(sequence)
                        if message.usage is not None:
                            self.telemetry.record(name, message.usage)
                    case Report() | Reports():
                        reports = message.reports if isinstance(message, Reports) else (message,)
                        for one in reports:
                            await executor.deliver(one)
                            if replay > 0:
                                replay -= 1
                                if replay == 0:
                                    await self._abandon(name, executor, gone)
                    case LogChunk():
                        if executor.asked_for_log(message.request):
                            await executor.deliver(message)
                        else:
                            self._refuse_frame(
                                peer=connection.peer,
                                node_id=name,
                                claimed_node=None,
                                job_id=None,
                                task=None,
                                reason=f"log answer to request {message.request}, which was "
                                "never sent to this node",
                            )
                    case PlanDrain():
                        await self._plan_drain(name, message)
                    case _:
                        raise ProtocolError(
                            connection.peer,
                            reason=f"an agent may not send {_tag(message)} after its hello",
                        )
        except ProtocolError as error:
            _log.info("agent_disconnected", node_id=name, reason=error.reason)
            raise  # a violation: logged once, with its reason, by the wire server
        except (ConnectionClosedError, WireError) as error:
            _log.info("agent_disconnected", node_id=name, reason=error.reason)
        finally:
            if self._connections.get(name) is connection:
                del self._connections[name]
                self.telemetry.forget(name)
                executor.detach()
                self.power.agent_disconnected(name)
                assert self._task_group is not None
                self._task_group.start_soon(self._suspend_agent, name, generation)
                self._task_group.start_soon(self._expire_agent, name, generation)

    async def _plan_drain(self, name: str, message: PlanDrain) -> None:
        """Plan the drain an agent asks for before its host goes away (its allocation ends).

        Only an online node's: a drain, sleep or quarantine an operator or policy decided
        stands, and so does an earlier planned drain.
        """
        # Asked of the scheduler, so after the NodeJoined this agent's hello caused.
        node = next((n for n in await self.engine.nodes() if n.name == name), None)
        if node is None or node.health != "online":
            _log.info(
                "node_drain_not_planned",
                node_id=name,
                health=node.health if node is not None else None,
                drain_at=message.at.isoformat(),
            )
            return
        if node.drain_at is not None and datetime.fromisoformat(node.drain_at) <= message.at:
            return
        try:
            # The host goes away by itself (its allocation ends): the engine's decision, not
            # an operator's, so `taskfarm nodes` and the journal say who drained it.
            await self.engine.set_node_health(
                name, "draining", reason=message.reason, at=message.at, by="engine"
            )
        except TaskfarmError as error:
            _log.warning("node_drain_refused", node_id=name, error=str(error))
            return
        _log.info(
            "node_drain_planned",
            node_id=name,
            drain_at=message.at.isoformat(),
            reason=message.reason,
        )

    async def _suspend_agent(self, name: str, generation: int) -> None:
        """Show a node whose agent is away as ``unreachable`` and place no new work there (it
        would fail to start there although the agent may well come back); its work is not
        requeued before the fence."""
        if name in self._connections or self._generation.get(name) != generation:
            return  # back already
        # Marked before the request is queued: a reconnect from now on restores "online", and
        # its request reaches the scheduler after this one.
        self._suspended.add(name)
        try:
            await self.engine.set_node_reachable(name, "unreachable")
        except TaskfarmError as error:
            # The engine is stopping (a shutdown closes every agent connection at once): there
            # is nothing left to hold back, and the next start recovers from the journal.
            _log.info("node_suspend_skipped", node_id=name, reason=str(error))

    async def _abandon(
        self, name: str, executor: RemoteExecutor, gone: frozenset[tuple[str, str, int]]
    ) -> None:
        for key in sorted(gone):
            if await executor.abandon(key, error="the agent came back without this attempt"):
                _log.warning("attempt_lost_by_agent", node_id=name, job_id=key[0], task=key[1])

    async def _expire_agent(self, name: str, generation: int) -> None:
        """Give a disconnected agent until the fence to come back, then requeue its work (its
        lease ran out before: it has stopped it)."""
        last_heard = self._last_heard.get(name, self.clock.monotonic())
        await self.clock.sleep_until(last_heard + self.timing.fence)
        if name in self._connections or self._generation.get(name) != generation:
            return
        # A sleeping node's agent is expected to go away with its host: the engine keeps its
        # work and says so (node_asleep_offline); only a node that was awake is lost.
        node = next((n for n in await self.engine.nodes() if n.name == name), None)
        if node is None or node.health != "sleeping":
            _log.warning(
                "node_lost",
                node_id=name,
                silent_for=round(self.clock.monotonic() - last_heard, 3),
                fence=self.timing.fence,
            )
        try:
            await self.engine.remove_node(name, reason="agent did not come back")
        except TaskfarmError as error:
            # Logged, not raised: one node's bookkeeping must not stop the coordinator.
            _log.error("node_removal_failed", node_id=name, error=str(error))

    # -- clients --------------------------------------------------------------------------------

    async def _serve_client(self, connection: Connection[WireMessage]) -> None:
        principal = _principal(connection)
        idle = self.config.client_idle_timeout
        self._clients.add(connection)
        try:
            while True:
                with anyio.move_on_after(idle) as waiting:
                    try:
                        request = await connection.receive()
                    except ConnectionClosedError:
                        return
                if waiting.cancelled_caught:
                    _log.info(
                        "client_idle_closed",
                        peer=connection.peer,
                        principal=principal.name,
                        idle_s=idle,
                    )
                    return
                if not isinstance(request, _CLIENT_REQUESTS):
                    raise ProtocolError(
                        connection.peer,
                        reason=f"a client may not send {_tag(request)} (an agent message)",
                    )
                try:
                    await self._authorize(connection, request)  # type: ignore[arg-type]
                    reply = await self._answer(request, principal)  # type: ignore[arg-type]
                except TaskfarmError as error:
                    reply = ErrorReply(error=str(error), kind=type(error).__name__)
                await connection.send(reply)
        finally:
            self._clients.discard(connection)

    async def _authorize(self, connection: Connection[WireMessage], request: ClientRequest) -> None:
        """Check ``request`` against the access table.

        Raises:
            AccessDeniedError: the principal's role does not allow it (logged as
                ``access_refused``).
            JobNotFoundError: a job-scoped request names no job (own-jobs roles only).
        """
        principal = _principal(connection)
        roles = self.engine.policy.command_roles
        decision = decide(principal, request, roles)
        if decision == "allow":
            return
        rule = rule_for(request, roles)
        verb = describe_request(request)
        role = principal.grant or "none"
        job_id: str | None = getattr(request, "job_id", None)
        match decision:
            case "deny":
                reason = (
                    f"{principal.name!r} (role {role}) may not {verb}: that needs the role "
                    f"{rule.role} or above"
                )
            case "own":
                assert job_id is not None
                (summary,) = await self.engine.status(job_id)
                owner = summary.owner
                if principal.method == "credential" and owner == principal.name:
                    return
                reason = (
                    f"{principal.name!r} (role {role}) may {verb} only jobs it submitted; "
                    f"{job_id} was submitted by {owner or 'the join token or before owners'}, "
                    f"and another's job needs the role {rule.any_job}"
                )
            case _:
                assert_never(decision)
        _log.warning(
            "access_refused",
            peer=connection.peer,
            principal=principal.name,
            method=principal.method,
            role=role,
            request=verb,
            job_id=job_id,
            reason=reason,
        )
        raise AccessDeniedError(
            f"access denied: {reason}", principal=principal.name, role=role, request=verb
        )

    async def _answer(self, request: ClientRequest, principal: Principal) -> Reply:
        engine = self.engine
        by = (
            principal.name if principal.method == "credential" else f"join token ({principal.name})"
        )
        # Whom a job or a policy command's record names: a credential's holder.  A join-token
        # client's name is its own claim (anyone with the file can say anything), so it names
        # no one, as an embedding application's own calls do.
        owner = principal.name if principal.method == "credential" else None
        match request:
            case SubmitRequest(text=text, format=fmt, source=source):
                ids = await engine.submit_text(text, fmt=fmt, source=source, owner=owner)
                return SubmittedReply(job_ids=tuple(ids))
            case StatusRequest(job_id=job_id, tasks=tasks):
                jobs = await engine.status(job_id, tasks=tasks or job_id is not None)
                usage = self.telemetry.jobs_now(job.job_id for job in jobs)
                return JobsReply(jobs=tuple(jobs), as_of=self.clock.now(), usage=usage)
            case CancelJobRequest(job_id=job_id, reason=reason):
                return JobsReply(jobs=(await engine.cancel(job_id, reason=reason, by=owner),))
            case ListNodesRequest():
                nodes = [
                    msgspec.structs.replace(node, remote=node.name in self._executors)
                    for node in await engine.nodes()
                ]
                return NodesReply(nodes=tuple(nodes))
            case WhyRequest(job_id=job_id):
                return TextReply(text=await engine.why(job_id))
            case LogsRequest(job_id=job_id, task=task, attempt=attempt):
                return TextReply(text=await self._logs(job_id, task, attempt))
            case (
                AmendJobRequest()
                | PauseJobRequest()
                | ResumeJobRequest()
                | RetryTasksRequest()
                | CheckpointTaskRequest()
                | PreemptTaskRequest()
                | SetNodeHealthRequest()
                | PolicyCommandRequest()
            ):
                return await self._verb(request, by=owner)
            case IssueCredentialRequest(kind=kind, name=name, role=role, replace=replace):
                record = await self.credentials.register(
                    kind=kind,
                    name=name,
                    role=role,
                    verifier=request.verifier(),
                    by=by,
                    replace=replace,
                )
                return IssuedCredentialReply(info=record.info())
            case RevokeCredentialRequest(name=name):
                revoked = await self.credentials.revoke(name, by=by)
                return TextReply(text=f"revoked the {revoked.kind} credential of {name}")
            case ListCredentialsRequest():
                return CredentialsReply(
                    credentials=tuple(record.info() for record in self.credentials.records())
                )
            case UsageRequest():
                return await self.telemetry.query(request)
            case _:
                assert_never(request)

    async def _verb(
        self,
        request: AmendJobRequest
        | PauseJobRequest
        | ResumeJobRequest
        | RetryTasksRequest
        | CheckpointTaskRequest
        | PreemptTaskRequest
        | SetNodeHealthRequest
        | PolicyCommandRequest,
        *,
        by: str | None,
    ) -> Reply:
        """Run an operator verb or a policy command (the engine journals each); ``by`` is the
        principal the journaled record names (None: a join-token client)."""
        engine = self.engine
        now = self.clock.now()
        match request:
            case AmendJobRequest(job_id=job_id, priority=priority, metadata=metadata):
                values = {
                    key: _json_value(text, where=f"--set {key}") for key, text in metadata.items()
                }
                if priority is None and not values:
                    raise ConfigurationError("nothing to change", where="--priority/--set")
                await self._live(job_id, "amend")
                summary = await engine.amend(job_id, priority=priority, set_metadata=values, by=by)
                return JobsReply(jobs=(summary,), as_of=now)
            case PauseJobRequest(job_id=job_id, mode=mode, reason=reason):
                await self._live(job_id, "pause")
                summary = await engine.pause(job_id, mode=mode, reason=reason, by=by)
                return JobsReply(jobs=(summary,), as_of=now)
            case ResumeJobRequest(job_id=job_id, reason=reason):
                await self._live(job_id, "resume")
                summary = await engine.resume(job_id, reason=reason, by=by)
                return JobsReply(jobs=(summary,), as_of=now)
            case RetryTasksRequest(job_id=job_id, tasks=tasks, reason=reason):
                chosen = await engine.retry(job_id, tasks, reason=reason, by=by)
                (summary,) = await engine.status(job_id, tasks=bool(chosen))
                return RetriedReply(
                    job_id=job_id,
                    tasks=tuple(chosen),
                    names=tuple(_task_label(summary.tasks[i]) for i in chosen),
                )
            case CheckpointTaskRequest(job_id=job_id, task=task):
                index = await engine.task_index(job_id, task)
                done = await engine.checkpoint(job_id, index, by=by)
                return TaskVerbReply(job_id=job_id, task=index, name=str(task), done=done)
            case PreemptTaskRequest(job_id=job_id, task=task, reason=reason):
                index = await engine.task_index(job_id, task)
                done = await engine.preempt(job_id, index, reason=reason, by=by)
                return TaskVerbReply(job_id=job_id, task=index, name=str(task), done=done)
            case SetNodeHealthRequest(node=node, health=health, reason=reason):
                nodes = {summary.name: summary for summary in await engine.nodes()}
                if node not in nodes:
                    known = ", ".join(sorted(nodes)[:20]) or "none yet"
                    raise ConfigurationError(
                        f"no node named {node!r} (nodes: {known})", where="NODE"
                    )
                at = request.at
                if request.after_s is not None:
                    at = now + timedelta(seconds=request.after_s)
                if at is not None:
                    if at.tzinfo is None:
                        raise ConfigurationError("a time needs a timezone", where="--at")
                    if at <= now:
                        raise ConfigurationError(
                            f"{at.isoformat()} is not in the future (the coordinator's time is "
                            f"{now.isoformat()}); drain now without --at",
                            where="--at",
                        )
                await engine.set_node_health(node, health, reason=reason, at=at, operator=by)
                changed = [summary for summary in await engine.nodes() if summary.name == node]
                return NodesReply(nodes=tuple(changed))
            case PolicyCommandRequest(name=name, arguments=text):
                arguments = _json_value(text, where="arguments")
                if not isinstance(arguments, dict):
                    raise ConfigurationError(
                        f"the arguments of a policy command are a JSON object, got {text[:80]!r}",
                        where="arguments",
                    )
                result = await engine.policy_command(name, arguments, by=by)
                try:
                    encoded = msgspec.json.encode(result).decode()
                except (TypeError, msgspec.EncodeError) as error:
                    raise TaskfarmError(
                        f"the policy command {name!r} returned what JSON cannot carry: {error}"
                    ) from None
                return PolicyReply(result=encoded)
            case _:
                assert_never(request)

    async def _live(self, job_id: str, verb: str) -> None:
        """Refuse a verb on a job that has finished (the farm's refusal, not bad input).

        Raises:
            JobNotFoundError: no such job.  JobFinishedError: it has finished.
        """
        (summary,) = await self.engine.status(job_id)
        if summary.status in ("completed", "failed", "cancelled"):
            raise JobFinishedError(job_id, summary.status, verb=verb)

    async def _logs(self, job_id: str, task: int | str | None, attempt: int | None) -> str:
        engine = self.engine
        if task is None:
            (summary,) = await engine.status(job_id, tasks=True)
            parts = []
            for info in summary.tasks:
                if not info.attempt:
                    parts.append(f"== task {_task_label(info)}: no attempt has run yet")
                    continue
                parts.append(await self._attempt_log(job_id, info, info.attempt))
            return "\n".join(parts)
        index = await engine.task_index(job_id, task)
        (summary,) = await engine.status(job_id, tasks=True)
        info = summary.tasks[index]
        label = _task_label(info)
        if not info.attempt:
            raise TaskNotFoundError(
                f"task {label} of job {job_id} has not run yet: it has no attempt, so no log",
                job_id=job_id,
                task=index,
                attempt=attempt,
            )
        number = attempt or info.attempt
        if not 1 <= number <= info.attempt:
            raise TaskNotFoundError(
                f"task {label} of job {job_id} has no attempt {number} "
                f"(attempt{'s 1-' if info.attempt > 1 else ' '}{info.attempt} ran)",
                job_id=job_id,
                task=index,
                attempt=number,
            )
        return await self._attempt_log(job_id, info, number)

    async def _attempt_log(self, job_id: str, info: TaskSummary, number: int) -> str:
        """Fetch one attempt's log from the node it ran on (kept for every attempt)."""
        node = info.nodes[number - 1] if number <= len(info.nodes) else None
        if not node:
            node = await self._attempt_node(job_id, info.index, number)
        label = _task_label(info)
        if not node:
            raise TaskNotFoundError(
                f"attempt {number} of task {label} of job {job_id} never ran on a node",
                job_id=job_id,
                task=info.index,
                attempt=number,
            )
        executor = self._executors.get(node)
        text: str | None
        if executor is None or not executor.attached:
            text = f"(log not available: the agent of node {node} is not connected)"
        else:
            try:
                text = await executor.read_log(job_id, str(info.index), number)
            except TaskfarmError as error:
                text = f"(could not read the log from {node}: {error})"
            if text is None:
                text = f"(no log for this attempt on {node}: it wrote none, or it was removed)"
        return f"== task {label}, attempt {number}, on {node}\n{text}"

    async def _attempt_node(self, job_id: str, task: int, attempt: int) -> str | None:
        """Return the node an attempt was assigned to, as journaled."""
        for record in await self.engine.journal.read_stream(job_stream(job_id)):
            event = record.event
            if isinstance(event, TaskAssigned) and (event.task, event.attempt) == (task, attempt):
                return event.node
        return None

    async def _handle(self, connection: Connection[WireMessage]) -> None:
        # A ProtocolError raised from here is the peer breaking the rules after login: the
        # wire server logs it once (``wire_connection_rejected``, with who and why) and closes.
        if connection.remote_role == "agent":
            await self._serve_agent(connection)
        elif connection.remote_role == "client":
            await self._serve_client(connection)
        else:
            raise ProtocolError(connection.peer, reason=f"unknown role {connection.remote_role!r}")

    # -- security ---------------------------------------------------------------------------------

    def _check_agent_identity(self, connection: Connection[WireMessage], hello: AgentHello) -> None:
        """Check that the agent may be node ``hello.name``: the name it authenticated with,
        and (with the join token) a name no credential is bound to.

        Raises:
            ProtocolError: it may not (after logging ``security_refused``).
        """
        principal = _principal(connection)
        reason = None
        if hello.name != principal.name:
            reason = (
                f"agent.hello names node {hello.name!r}, but the agent authenticated as "
                f"{principal.name!r}"
            )
        elif principal.method == "token" and self.credentials.bound(hello.name) is not None:
            reason = (
                f"node name {hello.name!r} is bound to a credential; the join token cannot take it"
            )
        if reason is None:
            return
        self._refuse_frame(
            peer=connection.peer,
            node_id=principal.name,
            claimed_node=hello.name,
            job_id=None,
            task=None,
            reason=reason,
        )
        raise ProtocolError(connection.peer, reason=reason)

    def _refuse_frame(
        self,
        *,
        peer: str,
        node_id: str,
        claimed_node: str | None,
        job_id: str | None,
        task: str | None,
        reason: str,
    ) -> None:
        """Log an agent frame refused because it speaks for another node (then dropped)."""
        _log.warning(
            "security_refused",
            peer=peer,
            node_id=node_id,
            claimed_node=claimed_node,
            job_id=job_id,
            task=task,
            reason=reason,
        )

    async def _holder(self, job_id: str, token: int) -> tuple[str, ...] | None:
        """Return the nodes the engine assigned the attempt with fencing token ``token`` of
        ``job_id`` to (the ``TaskAssigned`` at that stream version: one node, or every rank's
        of a multi-node attempt), or None if the journal has none.

        A found answer never changes, so it is remembered.
        """
        key = (job_id, token)
        if key in self._holders:
            return self._holders[key]
        nodes: tuple[str, ...] | None = None
        if token >= 1:
            records = await self.engine.journal.read_stream(
                job_stream(job_id), after_version=token - 1
            )
            if records and records[0].version == token:
                event = records[0].event
                if isinstance(event, TaskAssigned):
                    nodes = event.nodes or (event.node,)
        if nodes is not None:  # None may only mean "not committed yet": ask again next time
            if len(self._holders) >= _HOLDERS_REMEMBERED:
                self._holders.pop(next(iter(self._holders)))
            self._holders[key] = nodes
        return nodes

    def _credential_changed(self, change: Change) -> None:
        """Close the connections a credential change invalidates: those made with a revoked
        or replaced secret, and a join-token agent whose name a credential now binds."""
        doomed: list[Connection[WireMessage]] = []
        agent = self._connections.get(change.name)
        if agent is not None:
            method = _principal(agent).method
            if (change.what == "revoked") == (method == "credential"):
                doomed.append(agent)
        if change.what == "revoked":
            doomed += [
                client
                for client in self._clients
                if _principal(client).name == change.name
                and _principal(client).method == "credential"
            ]
        for connection in doomed:
            _log.warning(
                "connection_closed_by_credential_change",
                peer=connection.peer,
                principal=change.name,
                change=change.what,
            )
            assert self._task_group is not None
            self._task_group.start_soon(connection.aclose)

    # -- local agents ---------------------------------------------------------------------------

    async def _local_agent_secret(self, name: str, work: Path) -> list[str]:
        """Return the agent arguments that authenticate local agent ``name``: the join token
        file, or (the join token off) a node credential of its own in its folder, issued on
        first start and re-issued when the file no longer matches the journal."""
        config = self.config
        if config.token is not None:
            if config.token_file is None:
                raise TaskfarmError("local agents need the join token in a file (--token-file)")
            return ["--token-file", str(config.token_file)]
        path = work / "credential"
        record = self.credentials.bound(name)
        credential: Credential | None = None
        if path.is_file() and record is not None:
            try:
                credential = load_credential(path)
            except TaskfarmError:
                credential = None
            if (
                credential is None
                or credential.kind != "node"
                or credential.verifier(salt=record.salt).stored_key != record.stored_key
            ):
                credential = None
        if credential is None:
            credential = await self.credentials.issue(
                kind="node", name=name, by="coordinator (local agent)", replace=True
            )
            path.unlink(missing_ok=True)
            write_private_file(path, credential.text())
        return ["--credential-file", str(path)]

    async def _start_local_agents(self) -> None:
        config = self.config
        if not config.local_agents:
            return
        secrets: dict[str, list[str]] = {}
        for number in range(1, config.local_agents + 1):
            name = f"local-{number}"
            work = config.work_dir / "agents" / name
            work.mkdir(parents=True, exist_ok=True)
            secrets[name] = await self._local_agent_secret(name, work)
        self._spawn_local_agents(secrets)

    def _spawn_local_agents(self, secrets: dict[str, list[str]]) -> None:
        config = self.config
        registry = config.work_dir / "local-agents.json"
        alive = {name: pid for name, pid in _read_registry(registry).items() if _process_alive(pid)}
        for number in range(1, config.local_agents + 1):
            name = f"local-{number}"
            if name in alive:
                continue  # an agent from before a coordinator crash: it reconnects by itself
            work = config.work_dir / "agents" / name
            work.mkdir(parents=True, exist_ok=True)
            argv = [
                sys.executable,
                "-m",
                "runtime.cli",
                "agent",
                "--connect",
                f"{config.host}:{self.port}",
                *secrets[name],
                "--name",
                name,
                "--work-dir",
                str(work),
                "--label",
                "local",
            ]
            if config.tls is not None and config.tls.cafile:
                argv += ["--tls-ca", str(config.tls.cafile)]
            log = open(work / "agent.log", "ab")  # noqa: SIM115 - the child keeps it
            process = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
            log.close()
            alive[name] = process.pid
        registry.parent.mkdir(parents=True, exist_ok=True)
        registry.write_text(json.dumps(alive, indent=1, sort_keys=True))
        self.local_agent_pids = sorted(alive.values())

    def stop_local_agents(self) -> None:
        """Stop the local agents (on an orderly shutdown; a crash leaves them to reconnect)."""
        for pid in self.local_agent_pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        registry = self.config.work_dir / "local-agents.json"
        registry.unlink(missing_ok=True)


def _task_label(task: TaskSummary) -> str:
    """Name a task as an operator knows it: its name (``stage-2``, a chunk ``11-20``)."""
    return task.name or str(task.index)


def _json_value(text: str, *, where: str) -> Any:
    """Decode a JSON document a client sent.

    Raises:
        ConfigurationError: it is not JSON (``where`` names the flag or field).
    """
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as error:
        raise ConfigurationError(f"not JSON: {error}", where=where) from None


def _principal(connection: Connection[WireMessage]) -> Principal:
    principal = connection.principal
    if principal is None:  # a connection the server did not authenticate: a bug, not a peer
        raise TaskfarmError("a coordinator connection has no principal")
    return principal


def _tag(message: object) -> str:
    config = getattr(type(message), "__struct_config__", None)
    return str(config.tag) if config is not None else type(message).__name__


def _read_registry(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@contextmanager
def lock_journal(journal: Path, *, hint: str = "") -> Iterator[None]:
    """Hold the journal's writer lock (``JOURNAL.lock``, an advisory ``flock``) for the block.

    A coordinator holds it while it runs, and so does ``taskfarm token --journal``: a second
    writer process would leave the first one's in-memory stream versions stale.  The lock dies
    with its process, so a crash never leaves it held.

    Raises:
        ConfigurationError: another process holds it (``where`` names the journal).
    """
    path = journal.with_name(journal.name + ".lock")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create the lock file {path}: {error.strerror}", where=str(journal)
        ) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                "the journal is in use by another process (a running coordinator, or a "
                "token command on it)" + (f"; {hint}" if hint else ""),
                where=str(journal),
            ) from None
        yield
    finally:
        os.close(descriptor)  # releases the lock


@asynccontextmanager
async def _locked(journal: Path) -> AsyncIterator[None]:
    with lock_journal(journal):
        yield


@asynccontextmanager
async def open_coordinator(
    config: CoordinatorConfig, *, clock: Clock | None = None, policy: Policy | None = None
) -> AsyncIterator[Coordinator]:
    """Recover from the journal, listen, start local agents; stop them all on exit.

    Raises:
        ConfigurationError: another process holds the journal (see :func:`lock_journal`),
            or a setting is unusable.
    """
    clock = clock or SystemClock()
    config.work_dir.mkdir(parents=True, exist_ok=True)
    async with _open_coordinator(config, clock=clock, policy=policy) as coordinator:
        yield coordinator


@asynccontextmanager
async def _open_coordinator(
    config: CoordinatorConfig, *, clock: Clock, policy: Policy | None
) -> AsyncIterator[Coordinator]:
    settings = config.settings
    codec = COORDINATOR_CODEC
    # The policy's own events are journaled too: its codec joins the plugins' (the same
    # codec registered twice, by the policy and by a plugin, is merged once).
    extras = [*config.events]
    if policy is not None and policy.events is not None and policy.events not in extras:
        extras.append(policy.events)
    if extras:
        codec = EventCodec()
        codec.update(COORDINATOR_CODEC)
        for extra in extras:
            codec.update(extra)  # a conflicting tag is a ConfigurationError naming it
    fence = config.lease_timing().fence
    if settings.restart_grace < fence:
        # Agents cut off since before the restart may run their attempts until their lease
        # runs out: work out on a node is not requeued before the fence.
        _log.info("restart_grace_raised", restart_grace=settings.restart_grace, fence=fence)
        settings = replace(settings, restart_grace=fence)
    async with (
        open_sqlite_journal(
            config.journal,
            clock=clock,
            codec=codec,
            synchronous=config.synchronous,
            create="if_missing_or_empty" if config.init_journal else "if_missing",
        ) as journal,
        # Locked once the journal is known to be usable (so its own errors come first), and
        # before anything reads it to recover.
        _locked(config.journal),
        open_engine(journal=journal, clock=clock, policy=policy, settings=settings) as engine,
        open_usage_store(usage_store_path(config.journal)) as usage_store,
    ):
        telemetry = Telemetry(store=usage_store, clock=clock, settings=config.telemetry)
        coordinator = Coordinator(config=config, engine=engine, clock=clock, telemetry=telemetry)
        await coordinator.credentials.load()
        recovery = engine.recovery
        if recovery.jobs or recovery.nodes:
            _log.info(
                "coordinator_recovered",
                jobs=recovery.jobs,
                unfinished=recovery.unfinished,
                in_doubt=recovery.in_doubt,
                nodes=recovery.nodes,
                orphans=recovery.orphans,
                journal=str(config.journal),
            )
        # The block's own exception is re-raised as itself.  (Cancelling the task group while
        # the server was still closing used to turn it into a cancellation that the task group
        # then swallowed: a failing block looked like a clean exit.)
        failure: Exception | None = None
        async with anyio.create_task_group() as task_group:
            coordinator._task_group = task_group
            task_group.start_soon(telemetry.run)
            try:
                await task_group.start(coordinator.power.run)
                async with open_server(
                    handler=coordinator._handle,
                    codec=_INBOUND_CODEC,
                    authority=coordinator.credentials,
                    host=config.host,
                    port=config.port,
                    tls=config.tls,
                    name="coordinator",
                ) as server:
                    coordinator.port = server.port
                    _log.info(
                        "coordinator_listening",
                        address=server.address,
                        journal=str(config.journal),
                    )
                    await coordinator._start_local_agents()
                    try:
                        yield coordinator
                    except Exception as error:
                        failure = error
                    finally:
                        coordinator.stop_local_agents()
            finally:
                task_group.cancel_scope.cancel()
        if failure is not None:
            raise failure


async def run_coordinator(
    config: CoordinatorConfig,
    *,
    clock: Clock | None = None,
    policy: Policy | None = None,
    task_status: TaskStatus[Coordinator] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a coordinator until cancelled.

    A failure to start is raised as the one error that caused it, out of the task groups it
    crossed; a journal error names the journal file.

    Raises:
        JournalFileError: the journal cannot be opened or recovered.
        TaskfarmError: the coordinator cannot start (its address is taken, ...).
    """
    started = False
    try:
        async with open_coordinator(config, clock=clock, policy=policy) as coordinator:
            started = True
            task_status.started(coordinator)
            await anyio.sleep_forever()
    except Exception as error:
        cause = None if started else _startup_failure(error, config.journal)
        if cause is None:
            raise
        raise cause from error


def _startup_failure(error: Exception, journal: Path) -> TaskfarmError | None:
    """Return the taskfarm error that stopped a coordinator from starting, None if another
    failure (a bug) is involved: that one keeps its traceback."""
    leaves: list[BaseException] = [error]
    while any(isinstance(leaf, BaseExceptionGroup) for leaf in leaves):
        leaves = [
            inner
            for leaf in leaves
            for inner in (leaf.exceptions if isinstance(leaf, BaseExceptionGroup) else (leaf,))
        ]
    failures = [leaf for leaf in leaves if isinstance(leaf, Exception)]
    if not failures or not all(isinstance(leaf, TaskfarmError) for leaf in failures):
        return None
    first = failures[0]
    assert isinstance(first, TaskfarmError)
    if isinstance(first, JournalError) and not isinstance(first, JournalFileError):
        # An event that cannot be decoded, a stream that cannot be rebuilt: say which file.
        return JournalFileError(path=journal, problem=str(first))
    return first


def summaries_json(nodes: list[NodeSummary]) -> Any:
    """Return node summaries as plain JSON-able data."""
    return msgspec.to_builtins(nodes)


def _host_of_peer(peer: str) -> str:
    """Return the host of a ``host:port`` (or ``[v6]:port``) peer: where the ranks of a
    multi-node task on that agent's node can be reached."""
    host = peer.rpartition(":")[0] or peer
    return host.strip("[]")
