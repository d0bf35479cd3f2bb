"""The node agent as a real process: hello, attempts, the durable outbox, reconnects, restarts.

A small test coordinator (``runtime.open_server`` plus a ``RemoteExecutor``) stands in for the
real one.  Attempts run a child that a test drives over a loopback control socket: it prints a
report line only when told to and answers once the line is flushed, so a test knows exactly
what the agent has been given, and when, without sleeping.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from anyio.abc import Process, SocketListener, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from actors import (
    AgentConfig,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptMetric,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    RemoteExecutor,
    Resources,
    detect_resources,
    open_remote_executor,
)
from actors.cli._agent import config_from_args, configure
from actors.cluster import (
    AgentHello,
    Heartbeat,
    LogChunk,
    Report,
    Reports,
    Welcome,
    WireMessage,
)
from runtime import ConfigurationError, Connection, FrameCodec, WireServer, open_server

TOKEN = b"agent-test-token-0123456789abcdef"
WAIT = 15.0
CODEC: FrameCodec[WireMessage] = FrameCodec(WireMessage)
R = TypeVar("R", bound=AttemptReport)

# The attempt's program: connects to the test's control socket and obeys one line at a time.
CHILD = r"""
import os, signal, socket, subprocess, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def on_usr1(signum, frame):
    print("@taskfarm checkpoint ck-signal", flush=True)
signal.signal(signal.SIGUSR1, on_usr1)
sock.sendall(b"ready\n")
for line in sock.makefile("r"):
    command, _, argument = line.strip().partition(" ")
    answer = "ok"
    if command == "report":
        print("@taskfarm " + argument, flush=True)
    elif command == "log":
        print(argument, flush=True)
    elif command == "spawn":
        answer = str(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid)
    elif command == "exit":
        sys.exit(int(argument))
    sock.sendall((answer + "\n").encode())
"""


class Recorder:
    """A report sink that keeps every report and lets a test wait for one."""

    def __init__(self) -> None:
        self.reports: list[AttemptReport] = []
        self._changed = anyio.Event()

    async def __call__(self, report: AttemptReport) -> None:
        self.reports.append(report)
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, kind: type[R]) -> list[R]:
        return [report for report in self.reports if isinstance(report, kind)]

    async def wait_for(self, kind: type[R], count: int = 1) -> list[R]:
        with anyio.fail_after(WAIT):
            while len(self.of(kind)) < count:
                await self._changed.wait()
        return self.of(kind)


class Coordinator:
    """Just enough coordinator: welcomes agents, routes reports through a RemoteExecutor."""

    def __init__(self, remote: RemoteExecutor) -> None:
        self.remote = remote
        self.hellos: list[AgentHello] = []
        self.frames: list[tuple[int, Report]] = []  # (connection number, frame)
        self.heartbeats = 0
        self.acking = True
        self.lease = 0.0  # granted in Welcome (0: none)
        self.answering = True  # answer heartbeats (renewing the lease)
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self._changed.wait()

    def frames_of(self, connection: int) -> list[Report]:
        return [frame for number, frame in self.frames if number == connection]

    async def handler(self, connection: Connection[WireMessage]) -> None:
        hello = await connection.receive()
        assert isinstance(hello, AgentHello)
        self.hellos.append(hello)
        number = len(self.hellos)
        welcome = Welcome(
            node=hello.name, heartbeat_interval=0.2, lease=self.lease, lease_grace=self.lease / 2
        )
        await connection.send(welcome)
        self.remote.attach(connection)
        self._notify()
        try:
            async for message in connection:
                match message:
                    case Report() | Reports():
                        batch = message.reports if isinstance(message, Reports) else (message,)
                        for report in batch:
                            self.frames.append((number, report))
                            if self.acking:
                                await self.remote.deliver(report)
                    case LogChunk():
                        await self.remote.deliver(message)
                    case Heartbeat(sequence=sequence):
                        self.heartbeats += 1
                        if self.answering:
                            self.remote.acknowledge_heartbeat(sequence)
                    case _:
                        raise AssertionError(f"unexpected {message!r}")
                self._notify()
        finally:
            self.remote.detach()
            self._notify()


class ChildLink:
    """The control connection of one attempt's child."""

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    async def line(self) -> str:
        with anyio.fail_after(WAIT):
            return (await self._reader.receive_until(b"\n", 1024)).decode()

    async def command(self, text: str) -> str:
        await self._stream.send(text.encode() + b"\n")
        return await self.line()

    async def exit(self, code: int) -> None:
        await self._stream.send(f"exit {code}\n".encode())


@asynccontextmanager
async def _coordinator(port: int = 0) -> AsyncIterator[tuple[Coordinator, WireServer]]:
    async def orphan(report: AttemptReport) -> None:
        raise AssertionError(f"orphan report {report!r}")

    async with open_remote_executor(node="node-a", on_orphan_report=orphan) as remote:
        coordinator = Coordinator(remote)
        async with open_server(
            handler=coordinator.handler, codec=CODEC, token=TOKEN, port=port
        ) as server:
            yield coordinator, server


def _token_file(path: Path, token: bytes = TOKEN) -> Path:
    path.write_bytes(token + b"\n")
    path.chmod(0o600)
    return path


@asynccontextmanager
async def _agent(
    tmp_path: Path, port: int, *extra: str, token: bytes = TOKEN, log: str = "agent.log"
) -> AsyncIterator[Process]:
    """Run ``taskfarm agent`` as a real process; stop it (SIGTERM) on exit if still running."""
    token_file = _token_file(tmp_path / f"token-{len(token)}", token)
    command = [
        sys.executable,
        "-m",
        "runtime.cli",
        "--log-level",
        "info",
        "--log-format",
        "json",
        "agent",
        "--connect",
        f"127.0.0.1:{port}",
        "--token-file",
        str(token_file),
        "--work-dir",
        str(tmp_path / "work"),
        "--name",
        "node-a",
        "--terminate-grace",
        "1",
        *extra,
    ]
    with (tmp_path / log).open("ab") as stderr:
        process = await anyio.open_process(command, stdin=None, stdout=stderr, stderr=stderr)
    try:
        yield process
    finally:
        with anyio.move_on_after(WAIT, shield=True):
            if process.returncode is None:
                process.terminate()
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


@asynccontextmanager
async def _control() -> AsyncIterator[tuple[SocketListener, int]]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        sub = listener.listeners[0]
        assert isinstance(sub, SocketListener)
        yield sub, sub.extra(anyio.abc.SocketAttribute.local_port)


async def _accept(listener: SocketListener, stack: AsyncExitStack) -> ChildLink:
    with anyio.fail_after(WAIT):
        stream = await listener.accept()
    await stack.enter_async_context(stream)
    link = ChildLink(stream)
    assert await link.line() == "ready"
    return link


def _spec(control_port: int, **fields: Any) -> AttemptSpec:
    defaults: dict[str, Any] = {"job_id": "job-1", "task_id": "t0", "attempt": 1}
    defaults["fencing_token"] = 11
    return AttemptSpec(
        argv=(sys.executable, "-c", CHILD, str(control_port)), **{**defaults, **fields}
    )


def _events(path: Path) -> list[dict[str, Any]]:
    """Return the agent's structured log events (JSON lines)."""
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _kinds(reports: list[AttemptReport]) -> list[str]:
    return [type(report).__name__ for report in reports]


def _watch_exit(pid: int, stack: AsyncExitStack) -> int:
    """Return a descriptor that becomes readable once process ``pid`` (not our child) exits."""
    descriptor = os.pidfd_open(pid)
    stack.callback(os.close, descriptor)
    return descriptor


# -- end to end -------------------------------------------------------------------------------


async def test_agent_process_runs_an_attempt_and_streams_its_reports(tmp_path: Path) -> None:
    """A real agent greets with its resources, streams reports in order and serves logs."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
    ):
        flags = ("--cores", "3", "--memory", "5GiB", "--gpus", "1", "--label", "gpu")
        async with _agent(tmp_path, server.port, *flags, "--label", "fast"):
            await coordinator.wait_until(lambda: bool(coordinator.hellos))
            hello = coordinator.hellos[0]
            assert hello.name == "node-a"
            assert (hello.capacity.millicores, hello.capacity.memory) == (3000, 5 * 2**30)
            assert hello.capacity.gpus == 1
            assert hello.labels == ("gpu", "fast")
            assert (hello.running, hello.unacknowledged) == ((), 0)

            recorder = Recorder()
            handle = await coordinator.remote.start(_spec(control_port), recorder)
            link = await _accept(listener, stack)
            assert await link.command("log a plain log line") == "ok"
            assert await link.command("report progress 0.25 a quarter") == "ok"
            assert await link.command("report progress 0.75") == "ok"
            await link.exit(0)
            with anyio.fail_after(WAIT):
                result = await handle.wait()

            assert result.outcome == "completed"
            assert _kinds(recorder.reports) == [
                "AttemptStarted",
                "AttemptProgress",
                "AttemptProgress",
                "AttemptFinished",
            ]
            assert [p.fraction for p in recorder.of(AttemptProgress)] == [0.25, 0.75]
            assert recorder.of(AttemptStarted)[0].pid == handle.pid
            sequences = [frame.sequence for frame in coordinator.frames_of(1)]
            assert sequences == sorted(set(sequences))
            assert coordinator.heartbeats >= 1

            log = await coordinator.remote.read_log("job-1", "t0", 1)
            assert log is not None
            assert "out a plain log line" in log
            assert await coordinator.remote.read_log("job-1", "t0", 2) is None
            assert await coordinator.remote.read_log("..", "t0", 1) is None


async def test_sigterm_stops_the_agent_after_cancelling_its_attempts(tmp_path: Path) -> None:
    """SIGTERM cancels running attempts, reports them cancelled, and exits with status 0."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
        _agent(tmp_path, server.port) as process,
    ):
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        handle = await coordinator.remote.start(_spec(control_port), Recorder())
        await _accept(listener, stack)
        process.terminate()
        with anyio.fail_after(WAIT):
            result = await handle.wait()
            status = await process.wait()
        assert result.outcome == "cancelled"
        assert status == 0


async def test_agent_with_a_wrong_token_exits_with_status_2(tmp_path: Path) -> None:
    """A refused token is fatal: the agent exits with status 2 and says what to check."""
    async with (
        _coordinator() as (coordinator, server),
        _agent(tmp_path, server.port, token=b"not-the-right-token-at-all-000000") as process,
    ):
        with anyio.fail_after(WAIT):
            status = await process.wait()
    assert status == 2
    message = (tmp_path / "agent.log").read_text()
    assert "refused this agent" in message
    assert "wrong token" in message
    assert "--token-file" in message
    assert coordinator.hellos == []


async def test_cancel_kills_the_process_group_and_checkpoint_reaches_the_child(
    tmp_path: Path,
) -> None:
    """CheckpointAttempt reaches the child as SIGUSR1; CancelAttempt kills its process group."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
        _agent(tmp_path, server.port),
    ):
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        recorder = Recorder()
        spec = _spec(control_port, checkpointable=True)
        handle = await coordinator.remote.start(spec, recorder)
        link = await _accept(listener, stack)
        descriptor = _watch_exit(int(await link.command("spawn")), stack)
        await recorder.wait_for(AttemptStarted)

        assert handle.request_checkpoint()
        (checkpoint,) = await recorder.wait_for(AttemptCheckpointed)
        assert checkpoint.checkpoint == "ck-signal"

        handle.cancel(grace=5.0)
        with anyio.fail_after(WAIT):
            result = await handle.wait()
            await anyio.wait_readable(descriptor)  # the grandchild is gone too
        assert result.outcome == "cancelled"
        assert result.checkpoint == "ck-signal"


# -- connection loss and restarts -------------------------------------------------------------


async def test_agent_reconnects_and_sends_reports_made_while_disconnected(tmp_path: Path) -> None:
    """After a coordinator outage the agent reconnects and delivers the outbox, none lost."""
    async with (
        open_remote_executor(node="node-a", on_orphan_report=_no_orphans) as remote,
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
    ):
        coordinator = Coordinator(remote)
        recorder = Recorder()
        async with open_server(handler=coordinator.handler, codec=CODEC, token=TOKEN) as first:
            port = first.port
            agent = await stack.enter_async_context(_agent(tmp_path, port))
            await coordinator.wait_until(lambda: remote.attached)
            handle = await remote.start(_spec(control_port), recorder)
            link = await _accept(listener, stack)
            await link.command("report progress 0.1")
            await recorder.wait_for(AttemptProgress)
        await coordinator.wait_until(lambda: not remote.attached)

        # Produced while nobody listens: the child has printed and flushed the line.
        assert await link.command("report progress 0.5 while away") == "ok"
        assert await link.command("report metric residual 0.001") == "ok"

        async with open_server(handler=coordinator.handler, codec=CODEC, token=TOKEN, port=port):
            await coordinator.wait_until(lambda: len(coordinator.hellos) == 2)
            again = coordinator.hellos[1]
            assert [(r.job_id, r.task_id, r.attempt, r.fencing_token) for r in again.running] == [
                ("job-1", "t0", 1, 11)
            ]
            await recorder.wait_for(AttemptMetric)
            await link.exit(0)
            with anyio.fail_after(WAIT):
                result = await handle.wait()
            assert agent.returncode is None

    assert result.outcome == "completed"
    assert _kinds(recorder.reports) == [
        "AttemptStarted",
        "AttemptProgress",
        "AttemptProgress",
        "AttemptMetric",
        "AttemptFinished",
    ]
    assert [p.fraction for p in recorder.of(AttemptProgress)] == [0.1, 0.5]
    resent = [f.sequence for f in coordinator.frames_of(2)]
    assert resent == sorted(set(resent))
    # Only reports whose ack may not have reached the agent come twice, and never reach the
    # sink twice.
    first_seen = {f.sequence for f in coordinator.frames_of(1)}
    assert remote.statistics()["duplicates"] == len(first_seen & set(resent))
    events = [e for e in _events(tmp_path / "agent.log") if e.get("component") == "actors.agent"]
    names = [e["event"] for e in events]
    for expected in ("agent_connected", "attempt_started", "agent_disconnected"):
        assert expected in names
    assert names.count("agent_connected") == 2
    assert names.index("agent_disconnected") < names.index("attempt_finished")
    finished = next(e for e in events if e["event"] == "attempt_finished")
    assert (finished["node_id"], finished["job_id"], finished["attempt"]) == ("node-a", "job-1", 1)


async def test_restarted_agent_resends_unacknowledged_reports(tmp_path: Path) -> None:
    """Unacknowledged reports survive SIGKILL and are re-sent; acknowledged ones are not."""
    async with _coordinator() as (coordinator, server):
        coordinator.acking = False
        recorder = Recorder()
        command = "print('@taskfarm progress 0.5 half', flush=True)"
        spec = AttemptSpec(
            job_id="job-2",
            task_id="t1",
            attempt=1,
            fencing_token=5,
            argv=(sys.executable, "-c", command),
        )
        async with _agent(tmp_path, server.port) as first:
            await coordinator.wait_until(lambda: coordinator.remote.attached)
            handle = await coordinator.remote.start(spec, recorder)
            await coordinator.wait_until(
                lambda: any(isinstance(f.report, AttemptFinished) for f in coordinator.frames_of(1))
            )
            first.kill()
            with anyio.fail_after(WAIT):
                await first.wait()
        await coordinator.wait_until(lambda: not coordinator.remote.attached)
        assert recorder.reports == []

        coordinator.acking = True
        async with _agent(tmp_path, server.port, log="agent2.log"):
            await coordinator.wait_until(lambda: len(coordinator.hellos) == 2)
            assert coordinator.hellos[1].unacknowledged == 3
            with anyio.fail_after(WAIT):
                result = await handle.wait()
        assert result.outcome == "completed"
        assert _kinds(recorder.reports) == ["AttemptStarted", "AttemptProgress", "AttemptFinished"]
        original = [f.sequence for f in coordinator.frames_of(1)]
        assert [f.sequence for f in coordinator.frames_of(2)] == original

        # Stopped cleanly, the second agent journaled the acks: a third one has nothing to send.
        async with _agent(tmp_path, server.port, log="agent3.log"):
            await coordinator.wait_until(lambda: len(coordinator.hellos) == 3)
            assert coordinator.hellos[2].unacknowledged == 0
        assert coordinator.frames_of(3) == []


async def test_sigkilled_agent_takes_its_attempts_and_their_children_with_it(
    tmp_path: Path,
) -> None:
    """SIGKILL an agent: its attempt's process and the grandchild it started die at once."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
        _agent(tmp_path, server.port) as agent,
    ):
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        recorder = Recorder()
        await coordinator.remote.start(_spec(control_port), recorder)
        link = await _accept(listener, stack)
        (started,) = await recorder.wait_for(AttemptStarted)
        assert started.pid is not None
        exits = [
            _watch_exit(started.pid, stack),
            _watch_exit(int(await link.command("spawn")), stack),
        ]
        agent.kill()
        with anyio.fail_after(WAIT):
            for descriptor in exits:
                await anyio.wait_readable(descriptor)


async def test_attempt_log_keeps_its_last_lines_when_the_agent_is_killed(tmp_path: Path) -> None:
    """After an agent SIGKILL the attempt log holds the started line and the last output."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
        _agent(tmp_path, server.port) as agent,
    ):
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        recorder = Recorder()
        await coordinator.remote.start(_spec(control_port), recorder)
        link = await _accept(listener, stack)
        assert await link.command("log the last words before the crash") == "ok"
        assert await link.command("report progress 0.5") == "ok"
        await recorder.wait_for(AttemptProgress)  # read (and logged) by the agent
        agent.kill()
        with anyio.fail_after(WAIT):
            await agent.wait()
    lines = (tmp_path / "work" / "logs" / "job-1" / "t0.1.log").read_text().splitlines()
    assert lines[0].split(None, 1)[1].startswith("sys started pid ")
    assert lines[-1].split(None, 1)[1] == "out the last words before the crash"


def _warden_of(agent: int) -> int:
    """Return the pid of the warden process the agent ``agent`` started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent and b"_warden.py" in command:
            return int(entry.name)
    raise AssertionError(f"agent {agent} has no warden")


async def test_restarted_agent_kills_what_its_predecessor_left_and_reports_it_lost(
    tmp_path: Path,
) -> None:
    """With its warden dead too, a restarted agent kills the leftovers and reports them lost."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
    ):
        recorder = Recorder()
        async with _agent(tmp_path, server.port) as first:
            await coordinator.wait_until(lambda: coordinator.remote.attached)
            handle = await coordinator.remote.start(_spec(control_port), recorder)
            link = await _accept(listener, stack)
            (started,) = await recorder.wait_for(AttemptStarted)
            assert started.pid is not None
            warden = _warden_of(first.pid)
            os.kill(warden, signal.SIGKILL)  # the host lost both at once
            with anyio.fail_after(WAIT):
                await anyio.wait_readable(_watch_exit(warden, stack))
            first.kill()
            with anyio.fail_after(WAIT):
                await first.wait()
        # Still alive, orphaned, and still answering.
        exits = [
            _watch_exit(started.pid, stack),
            _watch_exit(int(await link.command("spawn")), stack),
        ]

        async with _agent(tmp_path, server.port, log="agent2.log"):
            with anyio.fail_after(WAIT):
                result = await handle.wait()
                for descriptor in exits:
                    await anyio.wait_readable(descriptor)
        assert result.outcome == "lost"
        assert result.error == "the agent restarted while the attempt ran"
    events = _events(tmp_path / "agent2.log")
    killed = [e for e in events if e["event"] == "agent_leftovers_killed"]
    assert [e["processes"] for e in killed] == [2]


async def test_a_second_agent_on_the_same_work_directory_is_refused(tmp_path: Path) -> None:
    """Two agents cannot share a work directory: the second exits with status 2, saying so."""
    async with (
        _coordinator() as (coordinator, server),
        _agent(tmp_path, server.port) as first,
    ):
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        async with _agent(tmp_path, server.port, log="second.log") as second:
            with anyio.fail_after(WAIT):
                status = await second.wait()
        assert status == 2
        message = (tmp_path / "second.log").read_text()
        assert f"another agent (pid {first.pid}) uses this work directory" in message
        assert first.returncode is None


async def test_answered_heartbeats_keep_the_lease(tmp_path: Path) -> None:
    """While the coordinator answers its heartbeats, an agent runs its attempt for many leases."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
        _agent(tmp_path, server.port),
    ):
        coordinator.lease = 0.6
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        recorder = Recorder()
        handle = await coordinator.remote.start(_spec(control_port), recorder)
        link = await _accept(listener, stack)
        beats = coordinator.heartbeats
        await coordinator.wait_until(lambda: coordinator.heartbeats >= beats + 12)  # 4 leases
        assert await link.command("log still running") == "ok"
        await link.exit(0)
        with anyio.fail_after(WAIT):
            result = await handle.wait()
    assert result.outcome == "completed"
    assert "agent_lease_expired" not in {e["event"] for e in _events(tmp_path / "agent.log")}


@pytest.mark.parametrize(("granted", "flags"), [(1.0, ()), (0.0, ("--lease", "1"))])
async def test_unanswered_heartbeats_stop_the_attempts_when_the_lease_runs_out(
    tmp_path: Path, granted: float, flags: tuple[str, ...]
) -> None:
    """No answer for a lease (the coordinator's, or the agent's own shorter one): the agent
    asks for a checkpoint, stops the attempt, reports it lost with that checkpoint, and
    reconnects."""
    async with (
        _coordinator() as (coordinator, server),
        _control() as (listener, control_port),
        AsyncExitStack() as stack,
        _agent(tmp_path, server.port, *flags),
    ):
        coordinator.lease = granted
        coordinator.answering = False
        await coordinator.wait_until(lambda: coordinator.remote.attached)
        recorder = Recorder()
        handle = await coordinator.remote.start(_spec(control_port, checkpointable=True), recorder)
        await _accept(listener, stack)
        (started,) = await recorder.wait_for(AttemptStarted)
        assert started.pid is not None
        exited = _watch_exit(started.pid, stack)
        with anyio.fail_after(WAIT):
            result = await handle.wait()
            await anyio.wait_readable(exited)
        assert len(coordinator.hellos) == 2  # it dropped the silent connection and came back
    assert result.outcome == "lost"
    assert result.checkpoint == "ck-signal"
    assert result.error is not None
    assert "lease" in result.error
    events = _events(tmp_path / "agent.log")
    (expired,) = [e for e in events if e["event"] == "agent_lease_expired"]
    assert (expired["lease"], expired["attempts"]) == (1.0, 1)
    stopped = [e for e in events if e["event"] == "attempt_stopped_lease_expired"]
    assert [e["checkpointed"] for e in stopped] == [True]


async def _no_orphans(report: AttemptReport) -> None:
    raise AssertionError(f"orphan report {report!r}")


# -- arguments --------------------------------------------------------------------------------


def _parse(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    token = _token_file(tmp_path / "token")
    base = ["--connect", "127.0.0.1:7717", "--token-file", str(token)]
    return parser.parse_args([*base, "--work-dir", str(tmp_path / "w"), *extra])


@pytest.mark.parametrize(
    ("flags", "where"),
    [
        (("--connect", "no-port"), "--connect"),
        (("--connect", "host:70000"), "--connect"),
        (("--memory", "lots"), "--memory"),
        (("--cores", "-2"), "--cores"),
        (("--cores", "0"), "--cores"),
        (("--gpus", "two"), "--gpus"),
        (("--scratch", "1XB"), "--scratch"),
        (("--label", "has space"), "--label"),
        (("--name", "bad/name"), "--name"),
        (("--heartbeat", "0"), "--heartbeat"),
        (("--heartbeat", "soon"), "--heartbeat"),
        (("--lease", "0"), "--lease"),
        (("--lease", "inf"), "--lease"),
        (("--terminate-grace", "-1"), "--terminate-grace"),
        (("--tls-key", "key.pem"), "--tls-key"),
        (("--tls-ca", "/no/such/ca.pem"), "--tls-ca"),
    ],
)
def test_invalid_arguments_are_rejected_naming_the_flag(
    tmp_path: Path, flags: tuple[str, str], where: str
) -> None:
    """Every invalid argument raises a ConfigurationError that names its flag."""
    with pytest.raises(ConfigurationError) as caught:
        config_from_args(_parse(tmp_path, *flags))
    assert caught.value.where == where


def test_an_unsafe_token_file_is_rejected_naming_the_file(tmp_path: Path) -> None:
    """A token file readable by others is refused before anything connects."""
    args = _parse(tmp_path)
    Path(args.token_file).chmod(0o644)
    with pytest.raises(ConfigurationError) as caught:
        config_from_args(args)
    assert caught.value.where == args.token_file


def test_arguments_build_the_config_with_overrides_and_detection(tmp_path: Path) -> None:
    """Given quantities override detection; the rest is detected from the host."""
    config = config_from_args(
        _parse(tmp_path, "--cores", "1500m", "--gpus", "2", "--label", "a", "--label", "a")
    )
    assert isinstance(config, AgentConfig)
    assert (config.host, config.port) == ("127.0.0.1", 7717)
    assert config.capacity.millicores == 1500
    assert config.capacity.gpus == 2
    assert config.capacity.memory > 0
    assert config.capacity.scratch > 0
    assert config.labels == ("a",)
    assert Path(config.work_dir).is_dir()


def test_detect_resources_reads_the_host(tmp_path: Path) -> None:
    """Detection finds the CPUs this process may use, the memory and the free scratch space."""
    detected = detect_resources(tmp_path)
    assert detected.millicores == len(os.sched_getaffinity(0)) * 1000
    assert detected.memory > 0
    assert detected.scratch > 0
    assert detected.gpus == 0
    assert detect_resources(tmp_path, memory="1GiB", scratch=0).memory == 2**30


def test_config_checks_its_fields() -> None:
    """A directly built AgentConfig rejects out-of-range fields, naming them."""
    with pytest.raises(ConfigurationError) as caught:
        AgentConfig(
            host="h",
            port=0,
            token_file="t",
            name="n",
            work_dir="w",
            capacity=Resources(),
        )
    assert caught.value.where == "AgentConfig.port"
