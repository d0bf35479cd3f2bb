"""The coordinator: the engine behind an authenticated TCP endpoint for agents and clients.

``taskfarm serve`` runs :func:`run_coordinator`.  On start it recovers the engine from the
journal; attempts that were running are *in doubt* for ``restart_grace`` seconds, during which
their agents reconnect (by themselves, with backoff), re-report what they still run and replay
the reports they could not deliver.  An agent whose connection drops keeps its node, and its
attempts, for ``heartbeat_timeout`` seconds; after that the node goes offline and its attempts
are requeued from their last checkpoint.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, assert_never, get_args

import anyio
import msgspec
from anyio.abc import TaskStatus

from actors._errors import AccessDeniedError, TaskNotFoundError
from actors.engine import (
    ENGINE_CODEC,
    Engine,
    EngineSettings,
    NodeSummary,
    Policy,
    TaskAssigned,
    job_stream,
    open_engine,
)
from actors.executors import AttemptReport
from persistence import EventCodec, JournalError, JournalFileError, open_sqlite_journal
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
from ._protocol import (
    AgentHello,
    CancelAttempt,
    CancelJobRequest,
    ClientRequest,
    CoordinatorInbound,
    ErrorReply,
    Heartbeat,
    JobsReply,
    ListNodesRequest,
    LogChunk,
    LogsRequest,
    NodesReply,
    Reply,
    Report,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
    TextReply,
    Welcome,
    WhyRequest,
    WireMessage,
)
from ._remote import RemoteExecutor, open_remote_executor

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
"""Every event a coordinator journals: the engine's and the credentials'."""
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
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    settings: EngineSettings = field(default_factory=EngineSettings)


class Coordinator:
    """A running coordinator (see :func:`open_coordinator`)."""

    def __init__(self, *, config: CoordinatorConfig, engine: Engine, clock: Clock) -> None:
        self.config = config
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
            await connection.send(Welcome(node=name, heartbeat_interval=config.heartbeat_interval))
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
            _log.info(
                "agent_connected", node_id=name, peer=connection.peer, running=len(hello.running)
            )
            for running in hello.running:
                try:
                    task = int(running.task_id)
                except ValueError:
                    task = -1
                if task < 0 or not await engine.claim_attempt(
                    running.job_id, task, running.fencing_token, name
                ):
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
            if replay <= 0:
                await self._abandon(name, executor, gone)
            while True:
                with anyio.move_on_after(config.heartbeat_timeout) as scope:
                    message = await connection.receive()
                if scope.cancelled_caught:
                    _log.warning("agent_heartbeat_missed", node_id=name)
                    return
                match message:
                    case Heartbeat():
                        pass
                    case Report():
                        await executor.deliver(message)
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
                executor.detach()
                assert self._task_group is not None
                self._task_group.start_soon(self._suspend_agent, name, generation)
                self._task_group.start_soon(self._expire_agent, name, generation)

    async def _suspend_agent(self, name: str, generation: int) -> None:
        """Place no new work on a node whose agent is away (``unreachable``): it would fail to
        start there although the agent may well come back; its work is not requeued yet."""
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
        """Give a disconnected agent ``heartbeat_timeout`` to come back, then requeue its work."""
        await self.clock.sleep(self.config.heartbeat_timeout)
        if name in self._connections or self._generation.get(name) != generation:
            return
        _log.warning("node_lost", node_id=name)
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
        decision = decide(principal, request)
        if decision == "allow":
            return
        rule = rule_for(request)
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
        match request:
            case SubmitRequest(text=text, format=fmt, source=source):
                owner = principal.name if principal.method == "credential" else None
                ids = await engine.submit_text(text, fmt=fmt, source=source, owner=owner)
                return SubmittedReply(job_ids=tuple(ids))
            case StatusRequest(job_id=job_id):
                jobs = await engine.status(job_id, tasks=job_id is not None)
                return JobsReply(jobs=tuple(jobs))
            case CancelJobRequest(job_id=job_id, reason=reason):
                return JobsReply(jobs=(await engine.cancel(job_id, reason=reason),))
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
            case _:
                assert_never(request)

    async def _logs(self, job_id: str, task: int | None, attempt: int | None) -> str:
        (summary,) = await self.engine.status(job_id, tasks=True)
        tasks = [t for t in summary.tasks if task is None or t.index == task]
        if task is not None and not tasks:
            raise TaskNotFoundError(
                f"job {job_id} has no task {task} (it has {len(summary.tasks)}, numbered from 0)",
                job_id=job_id,
                task=task,
            )
        parts = []
        for info in tasks:
            number = attempt or info.attempt
            if task is not None and attempt is not None and not 1 <= attempt <= info.attempt:
                # The one attempt asked for does not exist: an error, not an empty answer.
                ran = f"attempts 1-{info.attempt}" if info.attempt else "no attempt has run yet"
                raise TaskNotFoundError(
                    f"task {task} of job {job_id} has no attempt {attempt} ({ran})",
                    job_id=job_id,
                    task=task,
                    attempt=attempt,
                )
            if not info.attempt or info.node is None:
                parts.append(f"== task {info.index}: no attempt has run yet")
                continue
            if not 1 <= number <= info.attempt:
                parts.append(f"== task {info.index}: no attempt {number} (latest {info.attempt})")
                continue
            # An earlier attempt may have run on another node: its log lives there.
            node = info.node if number == info.attempt else None
            if node is None:
                node = await self._attempt_node(job_id, info.index, number)
            executor = self._executors.get(node) if node is not None else None
            text = None
            if executor is not None and executor.attached:
                try:
                    text = await executor.read_log(job_id, str(info.index), number)
                except TaskfarmError as error:
                    text = f"(could not read the log from {node}: {error})"
            header = f"== task {info.index}, attempt {number}, on {node or 'an unknown node'}"
            parts.append(f"{header}\n{text if text is not None else '(log not available)'}")
        return "\n".join(parts)

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
    async with (
        open_sqlite_journal(
            config.journal,
            clock=clock,
            codec=COORDINATOR_CODEC,
            synchronous=config.synchronous,
            create="if_missing_or_empty" if config.init_journal else "if_missing",
        ) as journal,
        # Locked once the journal is known to be usable (so its own errors come first), and
        # before anything reads it to recover.
        _locked(config.journal),
        open_engine(journal=journal, clock=clock, policy=policy, settings=settings) as engine,
    ):
        coordinator = Coordinator(config=config, engine=engine, clock=clock)
        await coordinator.credentials.load()
        # The block's own exception is re-raised as itself.  (Cancelling the task group while
        # the server was still closing used to turn it into a cancellation that the task group
        # then swallowed: a failing block looked like a clean exit.)
        failure: Exception | None = None
        async with anyio.create_task_group() as task_group:
            coordinator._task_group = task_group
            try:
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
