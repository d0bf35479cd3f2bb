"""The executors: in-process functions and real subprocesses, reports, signals and timeouts."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pytest
import structlog

from actors import (
    AttemptCheckpointed,
    AttemptContext,
    AttemptFinished,
    AttemptMetric,
    AttemptPreview,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    AttemptSpecError,
    AttemptStarted,
    ExecutorError,
    ReportLineError,
    SubprocessExecutor,
    UnknownFunctionError,
    open_inprocess_executor,
    open_subprocess_executor,
)
from actors.executors import parse_report_line
from runtime import Clock, ConfigurationError, SystemClock, VirtualClock

CHILD = Path(__file__).parent / "workloads" / "child.py"
R = TypeVar("R", bound=AttemptReport)


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

    async def first(self, kind: type[R]) -> R:
        return (await self.wait_for(kind, 1))[0]

    async def wait_for(self, kind: type[R], count: int) -> list[R]:
        with anyio.fail_after(10):
            while len(self.of(kind)) < count:
                await self._changed.wait()
        return self.of(kind)


def _spec(**fields: Any) -> AttemptSpec:
    defaults: dict[str, Any] = {
        "job_id": "job-1",
        "task_id": "t0",
        "attempt": 1,
        "fencing_token": 7,
    }
    return AttemptSpec(**{**defaults, **fields})


def _child(mode: str, *args: str, **fields: Any) -> AttemptSpec:
    return _spec(argv=(sys.executable, str(CHILD), mode, *args), **fields)


@asynccontextmanager
async def _subprocess_executor(
    tmp_path: Path, clock: Clock | None = None, *, grace: float = 5.0
) -> AsyncIterator[SubprocessExecutor]:
    async with open_subprocess_executor(
        log_dir=tmp_path / "logs",
        checkpoint_dir=tmp_path / "checkpoints",
        clock=clock or SystemClock(),
        terminate_grace=grace,
    ) as executor:
        yield executor


def _alive(pid: int) -> bool:
    """Return whether ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the messages -----------------------------------------------------------------------------


def test_spec_needs_exactly_one_of_argv_and_function() -> None:
    """A spec with both argv and function, or neither, is rejected naming the field."""
    with pytest.raises(AttemptSpecError) as caught:
        _spec(argv=("true",), function="f")
    assert caught.value.field == "argv"
    with pytest.raises(AttemptSpecError):
        _spec()


@pytest.mark.parametrize("job_id", ["", ".", "..", "a/b", "a\\b"])
def test_decoding_a_spec_rejects_ids_that_are_not_path_components(job_id: str) -> None:
    """Ids become log and checkpoint paths: separators, '.' and '..' fail validation."""
    raw = msgspec.json.encode(_spec(function="f")).replace(b'"job-1"', msgspec.json.encode(job_id))
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=AttemptSpec)


def test_decoding_a_spec_rejects_unknown_fields() -> None:
    """A spec is a command: a field the agent does not know is an error, not ignored."""
    raw = msgspec.json.encode(_spec(function="f")).replace(b"{", b'{"gpus":2,', 1)
    with pytest.raises(msgspec.ValidationError, match="gpus"):
        msgspec.json.decode(raw, type=AttemptSpec)


def test_reports_round_trip_as_a_tagged_union() -> None:
    """Every report encodes with its engine.attempt_* tag and decodes back to itself."""
    ident: dict[str, Any] = {"job_id": "j", "task_id": "t", "attempt": 2, "fencing_token": 3}
    reports: list[AttemptReport] = [
        AttemptStarted(pid=12, log_path="/l", **ident),
        AttemptProgress(fraction=0.5, message="half", **ident),
        AttemptCheckpointed(checkpoint="c", **ident),
        AttemptPreview(path="/p.png", **ident),
        AttemptMetric(name="m", value=1.5, **ident),
        AttemptFinished(outcome="stalled", exit_code=-15, error="e", runtime_s=2.0, **ident),
    ]
    decoder = msgspec.json.Decoder(AttemptReport)
    for report in reports:
        raw = msgspec.json.encode(report)
        assert json.loads(raw)["type"].startswith("engine.attempt_")
        assert decoder.decode(raw) == report


# -- in-process -------------------------------------------------------------------------------


async def test_inprocess_work_completes_and_its_reports_arrive_in_order() -> None:
    """Started, the work's reports, then Finished(completed) carrying the last checkpoint."""

    async def work(ctx: AttemptContext) -> None:
        await ctx.progress(0.5, "half")
        await ctx.checkpoint("ck-1")
        await ctx.preview("/p.png")
        await ctx.metric("frames", 3.0)
        await ctx.checkpoint("ck-2")

    recorder = Recorder()
    async with open_inprocess_executor({"work": work}) as executor:
        handle = await executor.start(_spec(function="work"), recorder)
        finished = await handle.wait()
    kinds = [type(report).__name__ for report in recorder.reports]
    assert kinds == [
        "AttemptStarted",
        "AttemptProgress",
        "AttemptCheckpointed",
        "AttemptPreview",
        "AttemptMetric",
        "AttemptCheckpointed",
        "AttemptFinished",
    ]
    assert finished.outcome == "completed"
    assert finished.checkpoint == "ck-2"
    assert (finished.job_id, finished.task_id, finished.attempt, finished.fencing_token) == (
        "job-1",
        "t0",
        1,
        7,
    )
    assert recorder.reports[-1] == finished == handle.result


async def test_inprocess_exception_fails_the_attempt_with_the_error_text() -> None:
    """An exception from the work makes the attempt failed, with the exception as the error."""

    async def work(ctx: AttemptContext) -> None:
        raise ValueError("bad frame range")

    async with open_inprocess_executor({"work": work}) as executor:
        handle = await executor.start(_spec(function="work"), Recorder())
        finished = await handle.wait()
    assert finished.outcome == "failed"
    assert finished.error == "ValueError: bad frame range"


async def test_inprocess_work_gets_resume_from_and_arguments() -> None:
    """The work sees the checkpoint to resume from and the job's arguments."""
    seen: list[object] = []

    async def work(ctx: AttemptContext) -> None:
        seen.extend([ctx.resume_from, dict(ctx.arguments)])

    spec = _spec(function="work", resume_from="ck-9", arguments={"frames": [1, 2]}, attempt=2)
    async with open_inprocess_executor({"work": work}) as executor:
        await (await executor.start(spec, Recorder())).wait()
    assert seen == ["ck-9", {"frames": [1, 2]}]


async def test_inprocess_checkpoint_request_reaches_the_work() -> None:
    """A checkpoint request sets ctx.checkpoint_requested; the work answers with a checkpoint."""

    async def work(ctx: AttemptContext) -> None:
        await ctx.progress(0.0, "ready")
        await ctx.checkpoint_requested.wait()
        await ctx.checkpoint("on-request")
        assert not ctx.checkpoint_requested.is_set()

    recorder = Recorder()
    async with open_inprocess_executor({"work": work}) as executor:
        handle = await executor.start(_spec(function="work", checkpointable=True), recorder)
        await recorder.first(AttemptProgress)
        assert handle.request_checkpoint()
        assert (await recorder.first(AttemptCheckpointed)).checkpoint == "on-request"
        finished = await handle.wait()
    assert finished.outcome == "completed"
    assert not handle.request_checkpoint()


async def test_checkpoint_request_is_refused_when_the_spec_is_not_checkpointable() -> None:
    """Work that did not declare checkpoint support is never asked to checkpoint."""

    async def work(ctx: AttemptContext) -> None:
        await anyio.sleep_forever()

    async with open_inprocess_executor({"work": work}) as executor:
        handle = await executor.start(_spec(function="work"), Recorder())
        assert not handle.request_checkpoint()
        await handle.kill()


async def test_inprocess_terminate_cancels_the_work() -> None:
    """terminate() cancels the work (its finally runs) and the outcome is cancelled."""
    cleaned_up = anyio.Event()

    async def work(ctx: AttemptContext) -> None:
        try:
            await ctx.progress(0.1)
            await anyio.sleep_forever()
        finally:
            cleaned_up.set()

    recorder = Recorder()
    async with open_inprocess_executor({"work": work}) as executor:
        handle = await executor.start(_spec(function="work"), recorder)
        await recorder.first(AttemptProgress)
        with anyio.fail_after(5):
            await handle.terminate(1.0)
        finished = await handle.wait()
    assert cleaned_up.is_set()
    assert finished.outcome == "cancelled"
    assert executor.running() == ()


@pytest.mark.parametrize("grace", [-1.0, float("nan")])
async def test_a_negative_grace_is_a_configuration_error(tmp_path: Path, grace: float) -> None:
    """Both executors refuse a terminate_grace that is not a number of seconds >= 0."""
    with pytest.raises(ConfigurationError, match="terminate_grace"):
        async with open_inprocess_executor({}, terminate_grace=grace):
            pass
    with pytest.raises(ConfigurationError, match="terminate_grace"):
        async with _subprocess_executor(tmp_path, grace=grace):
            pass


async def test_inprocess_unknown_function_and_command_specs_are_rejected() -> None:
    """Starting an unregistered function, or a command, raises and reports nothing."""
    recorder = Recorder()
    async with open_inprocess_executor({"render": _noop}) as executor:
        with pytest.raises(UnknownFunctionError) as caught:
            await executor.start(_spec(function="rendr"), recorder)
        assert caught.value.known == ("render",)
        assert "registered: render" in str(caught.value)
        with pytest.raises(ExecutorError):
            await executor.start(_spec(argv=("true",)), recorder)
    assert recorder.reports == []


async def _noop(ctx: AttemptContext) -> None:
    """Do nothing."""


async def test_inprocess_progress_outside_zero_to_one_is_an_error() -> None:
    """ctx.progress(1.5) raises, so the attempt fails naming the fraction."""

    async def work(ctx: AttemptContext) -> None:
        await ctx.progress(1.5)

    async with open_inprocess_executor({"work": work}) as executor:
        finished = await (await executor.start(_spec(function="work"), Recorder())).wait()
    assert finished.outcome == "failed"
    assert finished.error is not None
    assert ConfigurationError.__name__ in finished.error
    assert "fraction" in finished.error


@pytest.mark.parametrize(
    ("fields", "outcome"),
    [({"max_runtime": 60.0}, "timed_out"), ({"stall_timeout": 30.0}, "stalled")],
)
async def test_inprocess_timeouts_on_a_virtual_clock(fields: dict[str, Any], outcome: str) -> None:
    """max_runtime and stall_timeout cancel the work when the clock passes them."""
    clock = VirtualClock()

    async def work(ctx: AttemptContext) -> None:
        await ctx.progress(0.1)
        await anyio.sleep_forever()

    recorder = Recorder()
    async with open_inprocess_executor({"work": work}, clock=clock) as executor:
        handle = await executor.start(_spec(function="work", **fields), recorder)
        await recorder.first(AttemptProgress)
        await clock.advance(29.0)
        assert handle.result is None
        await clock.advance(31.0)
        with anyio.fail_after(5):
            finished = await handle.wait()
    assert finished.outcome == outcome
    assert finished.runtime_s == next(iter(fields.values()))  # stopped at its deadline


async def test_a_report_postpones_the_stall_timeout() -> None:
    """Each report restarts the stall timer: steady progress is never stalled."""
    clock = VirtualClock()
    step = anyio.Event()

    async def work(ctx: AttemptContext) -> None:
        await ctx.progress(0.1)
        await step.wait()
        await ctx.progress(0.2)
        await anyio.sleep_forever()

    recorder = Recorder()
    async with open_inprocess_executor({"work": work}, clock=clock) as executor:
        handle = await executor.start(_spec(function="work", stall_timeout=10.0), recorder)
        await recorder.first(AttemptProgress)
        await clock.advance(8.0)
        step.set()
        await recorder.wait_for(AttemptProgress, 2)
        await clock.advance(8.0)
        assert handle.result is None
        await clock.advance(2.0)
        finished = await handle.wait()
    assert finished.outcome == "stalled"
    assert finished.runtime_s == 18.0


async def test_closing_the_executor_cancels_running_attempts() -> None:
    """Leaving the executor's block cancels what still runs; every waiter gets a result."""

    async def work(ctx: AttemptContext) -> None:
        await anyio.sleep_forever()

    recorder = Recorder()
    async with open_inprocess_executor({"work": work}) as executor:
        handle = await executor.start(_spec(function="work"), recorder)
        assert executor.running() == (handle,)
    assert handle.result is not None
    assert handle.result.outcome == "cancelled"
    assert handle.result.error == "the executor closed"
    assert recorder.reports[-1] == handle.result
    with pytest.raises(ExecutorError):
        await executor.start(_spec(function="work"), recorder)


# -- the report line parser -------------------------------------------------------------------

_IDENT: dict[str, Any] = {"job_id": "job-1", "task_id": "t0", "attempt": 1, "fencing_token": 7}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("rendering frame 3", None),
        ("@taskfarmer says hi", None),
        ("@taskfarm progress 0.42", AttemptProgress(fraction=0.42, **_IDENT)),
        (
            "@taskfarm progress 1 all  done ",
            AttemptProgress(fraction=1.0, message="all  done", **_IDENT),
        ),
        (
            "@taskfarm  progress\t0\tstarting",
            AttemptProgress(fraction=0.0, message="starting", **_IDENT),
        ),
        (
            "@taskfarm checkpoint /ck/step 10.h5",
            AttemptCheckpointed(checkpoint="/ck/step 10.h5", **_IDENT),
        ),
        ("@taskfarm preview out/f12.png", AttemptPreview(path="out/f12.png", **_IDENT)),
        ("@taskfarm metric residual 1e-6", AttemptMetric(name="residual", value=1e-6, **_IDENT)),
    ],
)
def test_report_lines_parse(line: str, expected: AttemptReport | None) -> None:
    """Report lines become reports; anything else is an ordinary log line (None)."""
    assert parse_report_line(line, _spec(argv=("x",))) == expected


@pytest.mark.parametrize(
    "line",
    [
        "@taskfarm",
        "@taskfarm ",
        "@taskfarm progress",
        "@taskfarm progress lots",
        "@taskfarm progress 1.5",
        "@taskfarm progress -0.1",
        "@taskfarm progress nan",
        "@taskfarm checkpoint",
        "@taskfarm preview ",
        "@taskfarm metric frame_time",
        "@taskfarm metric frame_time fast",
        "@taskfarm metric a b c",
        "@taskfarm metric t inf",
        "@taskfarm explode now",
    ],
)
def test_malformed_report_lines_raise(line: str) -> None:
    """A line that starts like a report but is not a valid one raises ReportLineError."""
    with pytest.raises(ReportLineError):
        parse_report_line(line, _spec(argv=("x",)))


# -- subprocess -------------------------------------------------------------------------------


async def test_subprocess_exit_zero_completes_and_output_goes_to_the_log(tmp_path: Path) -> None:
    """Exit 0 is completed; stdout and stderr lines land in the attempt log, stream-tagged."""
    recorder = Recorder()
    async with _subprocess_executor(tmp_path) as executor:
        handle = await executor.start(_child("exit", "0"), recorder)
        finished = await handle.wait()
    started = recorder.of(AttemptStarted)[0]
    assert started.pid == handle.pid is not None
    assert started.log_path == str(tmp_path / "logs" / "job-1" / "t0.1.log")
    assert finished.outcome == "completed"
    assert finished.exit_code == 0
    assert finished.error is None
    log = await anyio.Path(started.log_path).read_text()
    lines = [line.split(None, 1)[1] for line in log.splitlines()]
    assert lines[0].startswith(f"sys started pid {started.pid}: ")
    assert "out hello from stdout" in lines
    assert "err first stderr line" in lines
    assert "out a partial line" in lines
    assert lines[-1] == "sys exited with code 0: completed"


async def test_subprocess_nonzero_exit_fails_with_the_last_stderr_line(tmp_path: Path) -> None:
    """A non-zero exit is failed, with its exit code and the last stderr line as the error."""
    async with _subprocess_executor(tmp_path) as executor:
        finished = await (await executor.start(_child("exit", "3"), Recorder())).wait()
    assert finished.outcome == "failed"
    assert finished.exit_code == 3
    assert finished.error == "last stderr line"


async def test_subprocess_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child gets the job's env, cwd and TASKFARM_* vars; no resume var unless resuming."""
    monkeypatch.setenv("TASKFARM_RESUME_FROM", "stale, from the agent's own environment")
    workdir = tmp_path / "work"
    workdir.mkdir()
    spec = _child("env", env={"CUSTOM": "yes"}, cwd=str(workdir), output_dir="out", attempt=3)
    async with _subprocess_executor(tmp_path) as executor:
        finished = await (await executor.start(spec, Recorder())).wait()
    assert finished.outcome == "completed"
    env = json.loads(await anyio.Path(workdir / "out" / "env.json").read_text())
    assert env == {
        "TASKFARM_JOB_ID": "job-1",
        "TASKFARM_TASK_ID": "t0",
        "TASKFARM_ATTEMPT": "3",
        "TASKFARM_CHECKPOINT_DIR": str(tmp_path / "checkpoints" / "job-1" / "t0"),
        "TASKFARM_OUTPUT_DIR": str(workdir / "out"),
        "CUSTOM": "yes",
        "cwd": str(workdir),
    }
    assert await anyio.Path(env["TASKFARM_CHECKPOINT_DIR"]).is_dir()


async def test_subprocess_resume_from_is_passed_as_taskfarm_resume_from(tmp_path: Path) -> None:
    """A resumed attempt sees its checkpoint in TASKFARM_RESUME_FROM."""
    spec = _child("env", output_dir=str(tmp_path / "out"), attempt=2, resume_from="/ck/step 10")
    async with _subprocess_executor(tmp_path) as executor:
        await (await executor.start(spec, Recorder())).wait()
    env = json.loads(await anyio.Path(tmp_path / "out" / "env.json").read_text())
    assert env["TASKFARM_RESUME_FROM"] == "/ck/step 10"


async def test_subprocess_report_lines_become_reports_not_log_lines(tmp_path: Path) -> None:
    """@taskfarm lines on stdout are parsed into reports, in order, and kept out of the log."""
    recorder = Recorder()
    async with _subprocess_executor(tmp_path) as executor:
        finished = await (await executor.start(_child("report"), recorder)).wait()
    assert [type(report) for report in recorder.reports] == [
        AttemptStarted,
        AttemptProgress,
        AttemptCheckpointed,
        AttemptPreview,
        AttemptMetric,
        AttemptCheckpointed,
        AttemptFinished,
    ]
    assert recorder.of(AttemptProgress)[0].message == "half way there"
    assert recorder.of(AttemptPreview)[0].path == "/previews/frame 12.png"
    assert recorder.of(AttemptMetric)[0] == AttemptMetric(name="frame_time", value=1.5, **_IDENT)
    assert finished.checkpoint == "ck-2"
    log = await anyio.Path(executor.log_path(_child("report"))).read_text()
    assert "out plain log line" in log
    assert "@taskfarm" not in log


async def test_subprocess_malformed_report_lines_are_logged_and_ignored(tmp_path: Path) -> None:
    """Malformed report lines become warnings in the log; the attempt still completes."""
    recorder = Recorder()
    with structlog.testing.capture_logs() as events:
        async with _subprocess_executor(tmp_path) as executor:
            finished = await (await executor.start(_child("malformed"), recorder)).wait()
    log = await anyio.Path(executor.log_path(_child("malformed"))).read_text()
    assert finished.outcome == "completed"
    malformed = [event for event in events if event["event"] == "report_line_malformed"]
    assert [event["log_level"] for event in malformed] == ["warning"] * 6
    assert malformed[2]["reason"] == "unknown report verb 'bogus'"
    assert malformed[2]["job_id"] == "job-1"
    assert [report.fraction for report in recorder.of(AttemptProgress)] == [1.0]
    warnings = [line for line in log.splitlines() if " sys malformed report line ignored" in line]
    assert len(warnings) == 6
    assert "(unknown report verb 'bogus'): @taskfarm bogus x" in log
    assert "out @taskfarmer is a log line" in log


async def test_subprocess_sigusr1_checkpoint_request(tmp_path: Path) -> None:
    """request_checkpoint() sends SIGUSR1; the child writes a checkpoint and reports it."""
    recorder = Recorder()
    spec = _child("checkpoint-on-signal", checkpointable=True)
    async with _subprocess_executor(tmp_path) as executor:
        handle = await executor.start(spec, recorder)
        await recorder.first(AttemptProgress)
        assert handle.request_checkpoint()
        reported = await recorder.first(AttemptCheckpointed)
        finished = await handle.wait()
    assert reported.checkpoint == str(executor.checkpoint_dir(spec) / "state.json")
    assert await anyio.Path(reported.checkpoint).read_text() == "{}"
    assert finished.outcome == "completed"
    assert finished.checkpoint == reported.checkpoint


async def test_subprocess_terminate_kills_the_whole_process_group(tmp_path: Path) -> None:
    """terminate() takes down the child and the grandchild it spawned; outcome cancelled."""
    recorder = Recorder()
    async with _subprocess_executor(tmp_path) as executor:
        handle = await executor.start(_child("spawn"), recorder)
        grandchild = int((await recorder.first(AttemptMetric)).value)
        pidfd = os.pidfd_open(grandchild)
        try:
            with anyio.fail_after(10):
                await handle.terminate(5.0)
                await anyio.wait_readable(pidfd)  # readable once the grandchild has exited
            finished = await handle.wait()
        finally:
            os.close(pidfd)
            if _alive(grandchild):
                os.kill(grandchild, signal.SIGKILL)
    assert handle.pid is not None
    assert not _alive(handle.pid)
    assert not _alive(grandchild)
    assert finished.outcome == "cancelled"
    assert finished.exit_code == -signal.SIGTERM


async def test_subprocess_sigterm_then_sigkill_after_the_grace(tmp_path: Path) -> None:
    """A child that survives SIGTERM is SIGKILLed when the grace period ends on the clock."""
    clock = VirtualClock()
    recorder = Recorder()
    async with _subprocess_executor(tmp_path, clock) as executor:
        handle = await executor.start(_child("report-sigterm"), recorder)
        await recorder.first(AttemptProgress)
        handle.cancel(grace=30.0)
        await recorder.first(AttemptMetric)  # it saw SIGTERM, and carries on
        await clock.advance(29.0)
        assert handle.result is None
        await clock.advance(1.0)
        with anyio.fail_after(10):
            finished = await handle.wait()
    assert finished.outcome == "cancelled"
    assert finished.exit_code == -signal.SIGKILL


@pytest.mark.parametrize(
    ("fields", "outcome"),
    [({"max_runtime": 60.0}, "timed_out"), ({"stall_timeout": 30.0}, "stalled")],
)
async def test_subprocess_timeouts_on_a_virtual_clock(
    tmp_path: Path, fields: dict[str, Any], outcome: str
) -> None:
    """Past max_runtime the attempt is timed_out; with no report for stall_timeout, stalled."""
    clock = VirtualClock()
    recorder = Recorder()
    async with _subprocess_executor(tmp_path, clock) as executor:
        handle = await executor.start(_child("hang", **fields), recorder)
        await recorder.first(AttemptProgress)
        await clock.advance(29.0)
        assert handle.result is None
        await clock.advance(31.0)
        with anyio.fail_after(10):
            finished = await handle.wait()
    assert finished.outcome == outcome
    assert finished.exit_code == -signal.SIGTERM
    assert finished.error is not None
    assert fields.popitem()[0] in finished.error


async def test_subprocess_stall_with_real_time(tmp_path: Path) -> None:
    """On the system clock, a child that stops reporting is stalled after stall_timeout."""
    recorder = Recorder()
    async with _subprocess_executor(tmp_path) as executor:
        handle = await executor.start(_child("hang", stall_timeout=0.3), recorder)
        with anyio.fail_after(10):
            finished = await handle.wait()
    assert finished.outcome == "stalled"
    assert 0.3 <= finished.runtime_s < 5.0


async def test_subprocess_start_failures_raise_and_report_nothing(tmp_path: Path) -> None:
    """A missing program, or a function spec, raises ExecutorError and reports nothing."""
    recorder = Recorder()
    async with _subprocess_executor(tmp_path) as executor:
        with pytest.raises(ExecutorError, match="could not start"):
            await executor.start(_spec(argv=(str(tmp_path / "no-such-program"),)), recorder)
        with pytest.raises(ExecutorError, match="names a function"):
            await executor.start(_spec(function="render"), recorder)
        assert executor.running() == ()
    assert recorder.reports == []


async def test_closing_the_subprocess_executor_terminates_its_processes(tmp_path: Path) -> None:
    """Leaving the executor's block terminates running children; their outcome is cancelled."""
    recorder = Recorder()
    async with _subprocess_executor(tmp_path) as executor:
        handle = await executor.start(_child("hang"), recorder)
        await recorder.first(AttemptProgress)
    assert handle.result is not None
    assert handle.result.outcome == "cancelled"
    assert handle.pid is not None
    assert not _alive(handle.pid)


async def test_a_failing_report_sink_fails_the_executor_and_leaks_no_process(
    tmp_path: Path,
) -> None:
    """An exception from the report sink is raised from the executor's block; the child dies."""
    raised = anyio.Event()
    pids: list[int] = []

    async def sink(report: AttemptReport) -> None:
        if isinstance(report, AttemptStarted):
            assert report.pid is not None
            pids.append(report.pid)
            return
        raised.set()
        raise RuntimeError("the node actor is gone")

    with pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with _subprocess_executor(tmp_path) as executor:
            handle = await executor.start(_child("hang"), sink)
            with anyio.fail_after(10):
                await handle.wait()
    assert caught.group_contains(RuntimeError, match="the node actor is gone")
    assert raised.is_set()
    assert not _alive(pids[0])


async def test_a_rank_of_a_multi_node_attempt_gets_its_rank_hosts_and_hostfile(
    tmp_path: Path,
) -> None:
    """Rank 1 of a 2-node attempt sees its rank, the host list, the leader and the port, and a
    hostfile with one host per line, leader first."""
    spec = _child(
        "env",
        output_dir=str(tmp_path / "out"),
        nodes=("n1", "n2"),
        hosts=("10.0.0.1", "10.0.0.2"),
        rank=1,
        port=29_501,
    )
    async with _subprocess_executor(tmp_path) as executor:
        await (await executor.start(spec, Recorder())).wait()
    env = json.loads(await anyio.Path(tmp_path / "out" / "env.json").read_text())
    assert {
        k: v
        for k, v in env.items()
        if k.startswith("TASKFARM_N") or k in ("TASKFARM_LEADER", "TASKFARM_PORT")
    } == {
        "TASKFARM_NODE_RANK": "1",
        "TASKFARM_NUM_NODES": "2",
        "TASKFARM_NODES": "10.0.0.1,10.0.0.2",
        "TASKFARM_NODE_NAMES": "n1,n2",
        "TASKFARM_LEADER": "10.0.0.1",
        "TASKFARM_PORT": "29501",
    }
    hostfile = await anyio.Path(env["TASKFARM_HOSTFILE"]).read_text()
    assert hostfile == "10.0.0.1\n10.0.0.2\n"


async def test_a_single_node_attempt_has_no_rank_variables(tmp_path: Path) -> None:
    """Nothing about ranks leaks into an ordinary attempt's environment."""
    spec = _child("env", output_dir=str(tmp_path / "out"))
    async with _subprocess_executor(tmp_path) as executor:
        await (await executor.start(spec, Recorder())).wait()
    env = json.loads(await anyio.Path(tmp_path / "out" / "env.json").read_text())
    assert not [k for k in env if k.startswith("TASKFARM_NODE")]
    assert "TASKFARM_HOSTFILE" not in env
