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
``client`` (the CLI) sends one request at a time and gets one reply.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

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
from persistence import open_sqlite_journal
from runtime import (
    Clock,
    Connection,
    ConnectionClosedError,
    FrameCodec,
    ProtocolError,
    SystemClock,
    TaskfarmError,
    TLSConfig,
    WireError,
    get_logger,
    open_server,
)

from ._lease import LeaseTiming, lease_timing
from ._protocol import (
    AgentHello,
    CancelAttempt,
    CancelJobRequest,
    ClientRequest,
    ErrorReply,
    Heartbeat,
    JobsReply,
    ListNodesRequest,
    LogChunk,
    LogsRequest,
    NodesReply,
    Reply,
    Report,
    Reports,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
    TextReply,
    Welcome,
    WhyRequest,
    WireMessage,
)
from ._remote import RemoteExecutor, open_remote_executor

__all__ = ["WIRE_CODEC", "Coordinator", "CoordinatorConfig", "open_coordinator", "run_coordinator"]

_log = get_logger("actors.coordinator")

WIRE_CODEC: FrameCodec[WireMessage] = FrameCodec(WireMessage)


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """Everything ``taskfarm serve`` takes."""

    journal: Path
    token: bytes
    host: str = "127.0.0.1"
    port: int = 7717
    tls: TLSConfig | None = None
    work_dir: Path = Path("taskfarm-work")
    local_agents: int = 0
    token_file: Path | None = None  # local agents read the token from here
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    lease: float | None = None  # default: 2 x heartbeat_timeout (see _lease.py)
    fence: float | None = None  # default: lease + lease / 2 + max(2 s, lease / 5)
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    settings: EngineSettings = field(default_factory=EngineSettings)

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
        # Nodes this coordinator set unreachable because their agent went away (undone on
        # return).
        self._suspended: set[str] = set()
        self.timing = config.lease_timing()
        # When the last frame of each agent was read (the fence counts from it).
        self._last_heard: dict[str, float] = {}

    # -- agents ---------------------------------------------------------------------------------

    async def _executor_for(self, name: str) -> RemoteExecutor:
        executor = self._executors.get(name)
        if executor is None:

            async def orphan(report: AttemptReport) -> None:
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
                    name, hello.capacity, executor=executor, labels=hello.labels, remote=True
                )
            elif name in self._suspended:
                self._suspended.discard(name)
                await engine.set_node_health(name, "online", reason="agent reconnected")
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
                else:
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
                    case Report() | Reports() | LogChunk():
                        reports = message.reports if isinstance(message, Reports) else (message,)
                        for one in reports:
                            await executor.deliver(one)
                            if isinstance(one, Report) and replay > 0:
                                replay -= 1
                                if replay == 0:
                                    await self._abandon(name, executor, gone)
                    case _:
                        raise ProtocolError(
                            connection.peer, reason=f"agent sent {type(message).__name__}"
                        )
        except (ConnectionClosedError, WireError):
            _log.info("agent_disconnected", node_id=name)
        finally:
            if self._connections.get(name) is connection:
                del self._connections[name]
                executor.detach()
                assert self._task_group is not None
                self._task_group.start_soon(self._suspend_agent, name, generation)
                self._task_group.start_soon(self._expire_agent, name, generation)

    async def _suspend_agent(self, name: str, generation: int) -> None:
        """Show a node whose agent is away as ``unreachable`` and place no new work there: it
        would fail to start (and count against the task and the node) although the agent may
        well come back."""
        nodes = {node.name: node for node in await self.engine.nodes()}
        node = nodes.get(name)
        if node is None or node.health != "online":
            return  # quarantined or drained on purpose: keep it so
        if name in self._connections or self._generation.get(name) != generation:
            return  # back already
        # Marked before the request is queued: a reconnect from now on restores "online", and
        # its request reaches the scheduler after this one.
        self._suspended.add(name)
        try:
            await self.engine.set_node_health(name, "unreachable", reason="agent disconnected")
        except TaskfarmError as error:  # it was removed meanwhile: nothing to hold back
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
        while True:
            try:
                request = await connection.receive()
            except ConnectionClosedError:
                return
            try:
                reply = await self._answer(request)  # type: ignore[arg-type]
            except TaskfarmError as error:
                reply = ErrorReply(error=str(error), kind=type(error).__name__)
            await connection.send(reply)

    async def _answer(self, request: ClientRequest) -> Reply:
        engine = self.engine
        match request:
            case SubmitRequest(text=text, format=fmt, source=source):
                ids = await engine.submit_text(text, fmt=fmt, source=source)
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
        raise TaskfarmError(f"a client may not send {type(request).__name__}")

    async def _logs(self, job_id: str, task: int | None, attempt: int | None) -> str:
        (summary,) = await self.engine.status(job_id, tasks=True)
        tasks = [t for t in summary.tasks if task is None or t.index == task]
        if not tasks:
            return f"job {job_id} has no task {task}"
        parts = []
        for info in tasks:
            if not info.attempt or info.node is None:
                parts.append(f"== task {info.index}: no attempt has run yet")
                continue
            number = attempt or info.attempt
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
        if connection.remote_role == "agent":
            await self._serve_agent(connection)
        elif connection.remote_role == "client":
            await self._serve_client(connection)
        else:
            raise ProtocolError(connection.peer, reason=f"unknown role {connection.remote_role!r}")

    # -- local agents ---------------------------------------------------------------------------

    def _start_local_agents(self) -> None:
        config = self.config
        if not config.local_agents:
            return
        if config.token_file is None:
            raise TaskfarmError("local agents need the token in a file (--token-file)")
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
                "--token-file",
                str(config.token_file),
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


@asynccontextmanager
async def open_coordinator(
    config: CoordinatorConfig, *, clock: Clock | None = None, policy: Policy | None = None
) -> AsyncIterator[Coordinator]:
    """Recover from the journal, listen, start local agents; stop them all on exit."""
    clock = clock or SystemClock()
    config.work_dir.mkdir(parents=True, exist_ok=True)
    settings = config.settings
    fence = config.lease_timing().fence
    if settings.restart_grace < fence:
        # Agents cut off since before the restart may run their attempts until their lease
        # runs out: work out on a node is not requeued before the fence.
        _log.info("restart_grace_raised", restart_grace=settings.restart_grace, fence=fence)
        settings = replace(settings, restart_grace=fence)
    async with (
        open_sqlite_journal(
            config.journal, clock=clock, codec=ENGINE_CODEC, synchronous=config.synchronous
        ) as journal,
        open_engine(journal=journal, clock=clock, policy=policy, settings=settings) as engine,
    ):
        coordinator = Coordinator(config=config, engine=engine, clock=clock)
        body_error: Exception | None = None
        async with anyio.create_task_group() as task_group:
            coordinator._task_group = task_group
            try:
                async with open_server(
                    handler=coordinator._handle,
                    codec=WIRE_CODEC,
                    token=config.token,
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
                    coordinator._start_local_agents()
                    try:
                        yield coordinator
                    finally:
                        coordinator.stop_local_agents()
            except Exception as error:
                # Kept and re-raised below, unwrapped: cancelling the task group before the
                # server had closed would let that cancellation replace the block's error.
                body_error = error
            finally:
                task_group.cancel_scope.cancel()
        if body_error is not None:
            raise body_error


async def run_coordinator(
    config: CoordinatorConfig,
    *,
    clock: Clock | None = None,
    policy: Policy | None = None,
    task_status: TaskStatus[Coordinator] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a coordinator until cancelled."""
    async with open_coordinator(config, clock=clock, policy=policy) as coordinator:
        task_status.started(coordinator)
        await anyio.sleep_forever()


def summaries_json(nodes: list[NodeSummary]) -> Any:
    """Return node summaries as plain JSON-able data."""
    return msgspec.to_builtins(nodes)
