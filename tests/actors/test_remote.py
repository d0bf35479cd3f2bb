"""The RemoteExecutor: routing, acknowledgement, de-duplication, orphans, adoption, logs.

A scripted fake agent talks to it over a real authenticated loopback connection, so each test
states exactly which frames the agent sends and checks which ones come back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from actors import (
    AgentUnavailableError,
    AttemptFinished,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    ExecutorError,
    RemoteExecutor,
    Resources,
    open_remote_executor,
)
from actors.cluster import (
    AgentHello,
    CancelAttempt,
    CheckpointAttempt,
    HeartbeatAck,
    LogChunk,
    ReadLog,
    Report,
    ReportAck,
    RunAttempt,
    Welcome,
    WireMessage,
)
from actors.executors import RunningAttempt
from runtime import Connection, FrameCodec, open_connection, open_server

TOKEN = b"remote-test-token-0123456789abcdef"
WAIT = 10.0
CODEC: FrameCodec[WireMessage] = FrameCodec(WireMessage)


def _spec(**fields: Any) -> AttemptSpec:
    values: dict[str, Any] = {"job_id": "job-1", "task_id": "t0", "attempt": 1}
    values["fencing_token"] = 3
    return AttemptSpec(argv=("true",), **{**values, **fields})


def _ident(spec: AttemptSpec) -> dict[str, Any]:
    return {
        "job_id": spec.job_id,
        "task_id": spec.task_id,
        "attempt": spec.attempt,
        "fencing_token": spec.fencing_token,
    }


class Sink:
    """A report sink that keeps the reports."""

    def __init__(self) -> None:
        self.reports: list[AttemptReport] = []

    async def __call__(self, report: AttemptReport) -> None:
        self.reports.append(report)


class Harness:
    """A coordinator-side RemoteExecutor and the fake agent's end of the connection."""

    def __init__(self, remote: RemoteExecutor, agent: Connection[WireMessage]) -> None:
        self.remote = remote
        self.agent = agent
        self.orphans: list[AttemptReport] = []
        self.adopted_sink = Sink()
        self.server_side: Connection[WireMessage] | None = None

    async def receive(self) -> WireMessage:
        with anyio.fail_after(WAIT):
            return await self.agent.receive()

    async def report(self, sequence: int, report: AttemptReport) -> ReportAck:
        """Send one report as the agent; return the acknowledgement that comes back."""
        await self.agent.send(Report(sequence=sequence, report=report))
        ack = await self.receive()
        assert isinstance(ack, ReportAck)
        return ack


@asynccontextmanager
async def _harness(adopt: bool = False, read_log_timeout: float = 10.0) -> AsyncIterator[Harness]:
    ready = anyio.Event()
    box: list[Harness] = []
    server_side: list[Connection[WireMessage]] = []

    async def orphan(report: AttemptReport) -> None:
        harness = box[0]
        harness.orphans.append(report)
        if adopt:
            running = RunningAttempt(**_ident(_spec()))
            harness.remote.adopt(running, _spec(), harness.adopted_sink)

    async with open_remote_executor(
        node="node-a", on_orphan_report=orphan, read_log_timeout=read_log_timeout
    ) as remote:

        async def handler(connection: Connection[WireMessage]) -> None:
            hello = await connection.receive()
            assert isinstance(hello, AgentHello)
            await connection.send(Welcome(node=hello.name, heartbeat_interval=1.0))
            remote.attach(connection)
            server_side.append(connection)
            ready.set()
            try:
                async for message in connection:
                    assert isinstance(message, Report | LogChunk)
                    await remote.deliver(message)
            finally:
                remote.detach()

        async with (
            open_server(handler=handler, codec=CODEC, token=TOKEN) as server,
            open_connection(
                "127.0.0.1", server.port, codec=CODEC, token=TOKEN, name="node-a"
            ) as agent,
        ):
            await agent.send(AgentHello(name="node-a", capacity=Resources(millicores=1000)))
            assert isinstance(await agent.receive(), Welcome)
            with anyio.fail_after(WAIT):
                await ready.wait()
            harness = Harness(remote, agent)
            harness.server_side = server_side[0]
            box.append(harness)
            yield harness


async def test_reports_reach_the_sink_in_order_and_are_acknowledged_after_it() -> None:
    """start() sends RunAttempt; each report reaches the attempt's sink, then is acked."""
    async with _harness() as h:
        sink = Sink()
        spec = _spec()
        handle = await h.remote.start(spec, sink)
        run = await h.receive()
        assert run == RunAttempt(spec=spec)

        assert (await h.report(1, AttemptStarted(pid=42, **_ident(spec)))).sequence == 1
        assert handle.pid == 42
        await h.report(2, AttemptProgress(fraction=0.5, **_ident(spec)))
        await h.report(4, AttemptFinished(outcome="completed", **_ident(spec)))
        with anyio.fail_after(WAIT):
            result = await handle.wait()
        assert result.outcome == "completed"
        assert [type(r).__name__ for r in sink.reports] == [
            "AttemptStarted",
            "AttemptProgress",
            "AttemptFinished",
        ]
        assert h.remote.running() == ()


async def test_a_duplicate_report_is_acknowledged_again_but_delivered_once() -> None:
    """A re-sent report is acknowledged again but reaches the sink only once."""
    async with _harness() as h:
        sink = Sink()
        spec = _spec()
        await h.remote.start(spec, sink)
        await h.receive()
        started = AttemptStarted(pid=1, **_ident(spec))
        finished = AttemptFinished(outcome="failed", error="boom", **_ident(spec))
        await h.report(1, started)
        assert (await h.report(1, started)).sequence == 1
        await h.report(2, finished)
        assert (await h.report(2, finished)).sequence == 2
        assert (await h.report(1, started)).sequence == 1
        assert sink.reports == [started, finished]
        assert h.orphans == []
        assert h.remote.statistics()["duplicates"] == 3


async def test_a_report_of_an_unknown_attempt_goes_to_the_orphan_callback() -> None:
    """A report no attempt claims (a coordinator restart) goes to on_orphan_report, is acked."""
    async with _harness() as h:
        stray = AttemptProgress(fraction=0.2, **_ident(_spec(fencing_token=99)))
        assert (await h.report(7, stray)).sequence == 7
        assert h.orphans == [stray]


async def test_orphan_callback_may_adopt_the_attempt() -> None:
    """After the orphan callback adopts an attempt, its later reports go to the new handle."""
    async with _harness(adopt=True) as h:
        spec = _spec()
        progress = AttemptProgress(fraction=0.3, **_ident(spec))
        await h.report(5, progress)
        await h.report(5, progress)
        await h.report(6, AttemptFinished(outcome="completed", **_ident(spec)))
        assert h.orphans == [progress]
        assert [type(r).__name__ for r in h.adopted_sink.reports] == ["AttemptFinished"]


async def test_adopt_reattaches_a_running_attempt() -> None:
    """adopt() routes a re-reported running attempt to a handle; a mismatched spec is refused."""
    async with _harness() as h:
        spec = _spec(attempt=2, fencing_token=8)
        sink = Sink()
        running = RunningAttempt(**_ident(spec))
        handle = h.remote.adopt(running, spec, sink)
        assert h.remote.adopt(running, spec, Sink()) is handle
        await h.report(3, AttemptFinished(outcome="completed", **_ident(spec)))
        assert handle.result is not None
        assert sink.reports == [handle.result]
        with pytest.raises(ExecutorError, match="does not match"):
            h.remote.adopt(running, _spec(), sink)


async def test_handle_commands_go_to_the_agent() -> None:
    """request_checkpoint, cancel and kill send CheckpointAttempt and CancelAttempt."""
    async with _harness() as h:
        spec = _spec(checkpointable=True)
        handle = await h.remote.start(spec, Sink())
        await h.receive()
        assert handle.request_checkpoint()
        assert await h.receive() == CheckpointAttempt(job_id="job-1", task_id="t0", fencing_token=3)
        handle.cancel(grace=2.5)
        cancel = await h.receive()
        assert isinstance(cancel, CancelAttempt)
        assert cancel.grace == 2.5
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(handle.kill)
            kill = await h.receive()
            assert isinstance(kill, CancelAttempt)
            assert kill.grace == 0.0
            await h.report(1, AttemptFinished(outcome="cancelled", **_ident(spec)))
        assert not handle.request_checkpoint()


async def test_detached_executor_keeps_handles_and_resends_cancels_on_attach() -> None:
    """Detached, requests fail and handles stay pending; cancels are re-sent on attach."""
    async with _harness() as h:
        spec = _spec()
        handle = await h.remote.start(spec, Sink())
        await h.receive()
        h.remote.detach()
        with pytest.raises(AgentUnavailableError):
            await h.remote.start(_spec(fencing_token=4), Sink())
        with pytest.raises(AgentUnavailableError):
            await h.remote.read_log("job-1", "t0", 1)
        handle.cancel(grace=1.0)
        assert h.remote.running() == (handle,)
        assert not handle.request_checkpoint()
        # The agent is back (the same connection stands in for its new one).
        assert h.server_side is not None
        h.remote.attach(h.server_side)
        cancel = await h.receive()
        assert isinstance(cancel, CancelAttempt)
        assert (cancel.fencing_token, cancel.grace) == (3, 1.0)


async def test_read_log_returns_text_none_when_missing_and_times_out() -> None:
    """read_log pairs a LogChunk by request id; a missing log is None."""
    async with _harness() as h:
        async with anyio.create_task_group() as task_group:
            answers: list[str | None] = []

            async def ask() -> None:
                answers.append(await h.remote.read_log("job-1", "t0", 1))
                answers.append(await h.remote.read_log("job-1", "t0", 2))

            task_group.start_soon(ask)
            first = await h.receive()
            assert isinstance(first, ReadLog)
            await h.agent.send(LogChunk(request=first.request, text="0.0 out hi\n"))
            second = await h.receive()
            assert isinstance(second, ReadLog)
            assert second.request != first.request
            await h.agent.send(LogChunk(request=second.request, text="", missing=True))
        assert answers == ["0.0 out hi\n", None]


async def test_read_log_times_out_when_the_agent_is_silent() -> None:
    """A read_log the agent never answers fails with AgentUnavailableError after the timeout."""
    async with _harness(read_log_timeout=0.05) as h:
        with pytest.raises(AgentUnavailableError, match="did not answer"):
            await h.remote.read_log("job-1", "t0", 3)
        assert isinstance(await h.receive(), ReadLog)


async def test_acknowledgements_that_pile_up_go_out_as_one() -> None:
    """Reports journaled while the sender is busy are acknowledged by one cumulative ack."""
    async with _harness() as h:
        release = anyio.Event()
        sink = Sink()

        async def slow_first(report: AttemptReport) -> None:
            if not sink.reports:
                await release.wait()
            await sink(report)

        spec = _spec()
        await h.remote.start(spec, slow_first)
        await h.receive()
        await h.agent.send(Report(sequence=1, report=AttemptStarted(pid=1, **_ident(spec))))
        await h.agent.send(Report(sequence=2, report=AttemptProgress(fraction=0.5, **_ident(spec))))
        finished = AttemptFinished(outcome="completed", **_ident(spec))
        await h.agent.send(Report(sequence=3, report=finished))
        with anyio.fail_after(WAIT):
            while h.remote.statistics()["queued"] < 3:  # the first is held in the sink
                await anyio.lowlevel.checkpoint()
        release.set()
        assert await h.receive() == ReportAck(sequence=3)
        assert len(sink.reports) == 3


async def test_a_heartbeat_is_answered_through_the_sender() -> None:
    """acknowledge_heartbeat() sends HeartbeatAck with the heartbeat's number (the latest)."""
    async with _harness() as h:
        h.remote.acknowledge_heartbeat(6)
        h.remote.acknowledge_heartbeat(7)
        assert await h.receive() == HeartbeatAck(sequence=7)
