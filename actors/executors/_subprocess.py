"""The subprocess executor: runs a command per attempt, in its own process group.

The protocol the command sees (environment, report lines on stdout, signals, the log file) is
documented in ``actors/_executor.py``.  Process I/O is real; the timeouts (``max_runtime``,
``stall_timeout``, the grace before SIGKILL) run on the injected clock.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import anyio

from actors._errors import ExecutorError, ReportLineError
from runtime import Clock, SystemClock, get_logger

from ._base import BaseAttempt, ExecutorBase, check_grace, owning
from ._interface import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptMetric,
    AttemptPreview,
    AttemptProgress,
    AttemptSpec,
    ReportSink,
    attempt_identity,
    gang_environment,
)

if TYPE_CHECKING:
    from anyio.abc import ByteReceiveStream, Process, TaskGroup, TaskStatus

__all__ = [
    "FRAME_SEQUENCE",
    "REPORT_PREFIX",
    "SubprocessExecutor",
    "open_subprocess_executor",
    "parse_report_line",
]

_log = get_logger("actors.executor")

REPORT_PREFIX = "@taskfarm"

# A task that runs one process per frame is sent as ("taskfarm-frames", JSON list of argvs):
# each host runs the sequence with its own Python (the coordinator's path means nothing there).
FRAME_SEQUENCE = "taskfarm-frames"


def resolve_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """Return the command to start: a frame sequence runs under this host's frame runner."""
    if argv and argv[0] == FRAME_SEQUENCE:
        return (sys.executable, "-m", "actors.executors._frame_runner", *argv[1:])
    return argv


# A longer line is logged (or parsed) in pieces: a child cannot make us buffer without bound.
_MAX_LINE = 64 * 1024
# After the main process exited and its group was killed, how long to wait for the pipes to
# reach end of file (a process that escaped the group may hold them open).  Real time: this
# bounds OS I/O, not farm time.
_DRAIN_TIMEOUT = 2.0

ParsedReport = AttemptProgress | AttemptCheckpointed | AttemptPreview | AttemptMetric


def _number(text: str, line: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ReportLineError(line, f"{what} is not a number") from None
    if not math.isfinite(value):
        raise ReportLineError(line, f"{what} is not finite")
    return value


def _first_word(text: str) -> tuple[str, str]:
    """Split off the first whitespace-separated word; both parts are stripped."""
    parts = text.split(None, 1)
    return (parts[0], parts[1].strip()) if len(parts) == 2 else (text.strip(), "")


def parse_report_line(line: str, spec: AttemptSpec) -> ParsedReport | None:
    """Parse one stdout line: a report, or None for an ordinary log line.

    Raises:
        ReportLineError: the line starts with ``@taskfarm`` but is not a valid report.
    """
    head, _, body = line.partition(" ")
    if head != REPORT_PREFIX:
        return None
    verb, rest = _first_word(body)
    ident = attempt_identity(spec)
    match verb:
        case "progress":
            value, message = _first_word(rest)
            if not value:
                raise ReportLineError(line, "progress needs a fraction")
            fraction = _number(value, line, "the fraction")
            if not 0.0 <= fraction <= 1.0:
                raise ReportLineError(line, "the fraction is not between 0 and 1")
            return AttemptProgress(fraction=fraction, message=message, **ident)
        case "checkpoint":
            if not rest:
                raise ReportLineError(line, "checkpoint needs a token or path")
            return AttemptCheckpointed(checkpoint=rest, **ident)
        case "preview":
            if not rest:
                raise ReportLineError(line, "preview needs a path")
            return AttemptPreview(path=rest, **ident)
        case "metric":
            fields = rest.split()
            if len(fields) != 2:
                raise ReportLineError(line, "metric needs a name and a number")
            return AttemptMetric(
                name=fields[0], value=_number(fields[1], line, "the value"), **ident
            )
        case "":
            raise ReportLineError(line, "no report verb")
        case _:
            raise ReportLineError(line, f"unknown report verb {verb!r}")


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to a process group; an empty (gone) group is not an error."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Paths:
    """The directories and files one attempt uses, made before it starts."""

    def __init__(self, executor: SubprocessExecutor, spec: AttemptSpec) -> None:
        self.log = executor._log_dir / spec.job_id / f"{spec.task_id}.{spec.attempt}.log"
        self.checkpoints = executor._checkpoint_dir / spec.job_id / spec.task_id
        # Relative to the command's working directory, like every path the command sees.
        self.output = (
            Path(os.path.abspath(Path(spec.cwd or ".") / spec.output_dir))
            if spec.output_dir is not None
            else None
        )

    def prepare(self) -> TextIO:
        """Create the directories and open the log for appending (blocking: run in a thread)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if self.output is not None:
            self.output.mkdir(parents=True, exist_ok=True)
        return self.log.open("a", encoding="utf-8", errors="backslashreplace")


class _SubprocessAttempt(BaseAttempt):
    def __init__(
        self,
        spec: AttemptSpec,
        sink: ReportSink,
        *,
        clock: Clock,
        grace: float,
        paths: _Paths,
        env: dict[str, str],
    ) -> None:
        super().__init__(spec, sink, clock=clock, grace=grace)
        self._paths = paths
        self._env = env
        self._process: Process | None = None
        self._log_file: TextIO | None = None
        self._last_stderr = ""
        self._stop_requested = anyio.Event()
        self._stop_sleep: anyio.CancelScope | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def request_checkpoint(self) -> bool:
        if not self._spec.checkpointable or self._process is None or self._exited.is_set():
            return False
        try:
            os.kill(self._process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        self._write("sys", "checkpoint requested (SIGUSR1)")
        return True

    def _stop_changed(self) -> None:
        self._stop_requested.set()
        if self._stop_sleep is not None:
            self._stop_sleep.cancel()

    def _write(self, stream: str, text: str) -> None:
        # A buffered write to a local file, flushed once per pipe read rather than per line:
        # cheaper than a thread hop per line, and the log still follows the output closely.
        if self._log_file is not None:
            elapsed = self._clock.monotonic() - self._started_at
            self._log_file.write(f"{elapsed:9.3f} {stream} {text}\n")

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        spec = self._spec
        try:
            self._log_file = await anyio.to_thread.run_sync(self._paths.prepare)
        except OSError as error:
            raise ExecutorError(
                f"could not prepare its directories: {error}",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            ) from error
        try:
            try:
                self._process = await anyio.open_process(
                    resolve_argv(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=spec.cwd,
                    env=self._env,
                    start_new_session=True,
                )
            except OSError as error:
                self._write("sys", f"could not start {shlex.join(spec.argv)}: {error}")
                raise ExecutorError(
                    f"could not start {spec.argv[0]!r}: {error}",
                    job_id=spec.job_id,
                    task_id=spec.task_id,
                    attempt=spec.attempt,
                ) from error
            process = self._process
            try:
                self._write("sys", f"started pid {process.pid}: {shlex.join(spec.argv)}")
                await self._emit(self._started(pid=process.pid, log_path=str(self._paths.log)))
                task_status.started()
                code = await self._supervise(process)
                result = self._outcome(code)
                self._write("sys", f"exited with code {code}: {result.outcome}")
            finally:
                with anyio.move_on_after(_DRAIN_TIMEOUT, shield=True):
                    if process.returncode is None:
                        _signal_group(process.pid, signal.SIGKILL)
                    await process.aclose()
                self._exited.set()
            self._close_log()
            await self._report_final(result)
        finally:
            self._close_log()
            self._release_waiters(self._process.returncode if self._process else None)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def _supervise(self, process: Process) -> int:
        """Pump the pipes, enforce the timeouts and stop requests, and return the exit code."""
        assert process.stdout is not None
        assert process.stderr is not None
        out_done, err_done = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._pump, process.stdout, "out", out_done)
            task_group.start_soon(self._pump, process.stderr, "err", err_done)
            task_group.start_soon(self._watch)
            task_group.start_soon(self._enforce_stop, process.pid)
            code = await process.wait()
            self._exited.set()
            # Nothing the attempt started may outlive it (nor hold its pipes open).
            _signal_group(process.pid, signal.SIGKILL)
            with anyio.move_on_after(_DRAIN_TIMEOUT):
                await out_done.wait()
                await err_done.wait()
            task_group.cancel_scope.cancel()
        return code

    def _outcome(self, code: int) -> AttemptFinished:
        if self._stop_reason is not None:
            outcome, reason = self._stop_reason
            return self._finish(outcome, exit_code=code, error=reason)
        if code == 0:
            return self._finish("completed", exit_code=code, error=None)
        error = self._last_stderr or _describe_exit(code)
        return self._finish("failed", exit_code=code, error=error)

    async def _enforce_stop(self, pgid: int) -> None:
        """Once a stop is requested: SIGTERM the group, then SIGKILL it at the kill time."""
        await self._stop_requested.wait()
        if self._clock.monotonic() < self._kill_at:
            self._write("sys", "terminating (SIGTERM to the process group)")
            _signal_group(pgid, signal.SIGTERM)
        while self._clock.monotonic() < self._kill_at:
            # cancel()/kill() may bring the kill time forward: they cancel this sleep.
            with anyio.CancelScope() as self._stop_sleep:
                await self._clock.sleep_until(self._kill_at)
            self._stop_sleep = None
        self._write("sys", "killing (SIGKILL to the process group)")
        _signal_group(pgid, signal.SIGKILL)

    async def _pump(self, stream: ByteReceiveStream, name: str, done: anyio.Event) -> None:
        """Copy one pipe to the log line by line, turning stdout report lines into reports."""
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                await self._line(name, line)
            while len(pending) > _MAX_LINE:
                await self._line(name, pending[:_MAX_LINE])
                pending = pending[_MAX_LINE:]
            if self._log_file is not None:
                self._log_file.flush()
        if pending:
            await self._line(name, pending)
        done.set()

    async def _line(self, name: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if name == "out":
            try:
                report = parse_report_line(text.rstrip(), self._spec)
            except ReportLineError as error:
                self._write("sys", f"malformed report line ignored ({error.reason}): {text}")
                _log.warning(
                    "report_line_malformed",
                    reason=error.reason,
                    line=text,
                    job_id=self._spec.job_id,
                    task_id=self._spec.task_id,
                    attempt=self._spec.attempt,
                )
                return
            if report is not None:
                await self._emit(report)
                return
        elif text.strip():
            self._last_stderr = text.strip()
        self._write(name, text)


class SubprocessExecutor(ExecutorBase):
    """Runs each attempt's ``argv`` as a process in its own session and process group.

    Built by :func:`open_subprocess_executor`; see ``actors/_executor.py`` for the protocol the
    process sees.
    """

    def __init__(
        self,
        *,
        task_group: TaskGroup,
        clock: Clock,
        terminate_grace: float,
        log_dir: Path,
        checkpoint_dir: Path,
        base_env: Mapping[str, str],
    ) -> None:
        super().__init__(task_group=task_group, clock=clock, terminate_grace=terminate_grace)
        self._log_dir = log_dir
        self._checkpoint_dir = checkpoint_dir
        self._base_env = dict(base_env)

    def log_path(self, spec: AttemptSpec) -> Path:
        """Return the log file of the attempt ``spec`` describes."""
        return _Paths(self, spec).log

    def checkpoint_dir(self, spec: AttemptSpec) -> Path:
        """Return the checkpoint directory of the task ``spec`` runs (shared by its attempts)."""
        return _Paths(self, spec).checkpoints

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        """Start ``spec.argv``; return once it runs and was reported started.

        Raises:
            ExecutorError: the spec names a function, the command could not be started (no
                such file, not executable, bad cwd) or the executor is closed.
        """
        if not spec.argv:
            raise ExecutorError(
                "the subprocess executor runs commands; this spec names a function",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        paths = _Paths(self, spec)
        attempt = _SubprocessAttempt(
            spec,
            report,
            clock=self._clock,
            grace=self._terminate_grace,
            paths=paths,
            env=self._environment(spec, paths),
        )
        return await self._launch(attempt, attempt._run)

    def _environment(self, spec: AttemptSpec, paths: _Paths) -> dict[str, str]:
        env = {**self._base_env, **spec.env}
        env.update(
            TASKFARM_JOB_ID=spec.job_id,
            TASKFARM_TASK_ID=spec.task_id,
            TASKFARM_ATTEMPT=str(spec.attempt),
            TASKFARM_CHECKPOINT_DIR=str(paths.checkpoints),
        )
        if len(spec.nodes) > 1:
            # One host per line, leader first: ``mpirun -hostfile $TASKFARM_HOSTFILE``.
            hosts = spec.hosts or spec.nodes
            hostfile = paths.checkpoints / f"hostfile.{spec.attempt}"
            hostfile.parent.mkdir(parents=True, exist_ok=True)
            hostfile.write_text("".join(f"{host}\n" for host in hosts), encoding="utf-8")
            env.update(gang_environment(spec, str(hostfile)))
        # Never let a value inherited from the agent's own environment pose as this job's.
        for name, value in (
            ("TASKFARM_RESUME_FROM", spec.resume_from),
            ("TASKFARM_OUTPUT_DIR", str(paths.output) if paths.output is not None else None),
        ):
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


def _make_roots(*roots: str | os.PathLike[str]) -> list[Path]:
    """Create the root directories; return them absolute, so a command that changes directory
    still finds what the environment points it to."""
    made = [Path(root).absolute() for root in roots]
    for root in made:
        root.mkdir(parents=True, exist_ok=True)
    return made


@asynccontextmanager
async def open_subprocess_executor(
    *,
    log_dir: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    clock: Clock | None = None,
    terminate_grace: float = 10.0,
    inherit_env: bool = True,
) -> AsyncIterator[SubprocessExecutor]:
    """Open an executor that runs commands, logging to ``log_dir`` and keeping per-task
    checkpoint directories under ``checkpoint_dir``.

    ``terminate_grace`` is the time between SIGTERM and SIGKILL on a timeout, a stall and
    closing; ``inherit_env`` passes this process's environment on to the commands.  On exit,
    running attempts are terminated (outcome ``cancelled``) and awaited.

    Raises:
        ConfigurationError: ``terminate_grace`` is negative.
    """
    check_grace(terminate_grace)
    chosen = clock if clock is not None else SystemClock()
    logs, checkpoints = await anyio.to_thread.run_sync(_make_roots, log_dir, checkpoint_dir)
    base_env = dict(os.environ) if inherit_env else {}
    async with owning(
        lambda task_group: SubprocessExecutor(
            task_group=task_group,
            clock=chosen,
            terminate_grace=terminate_grace,
            log_dir=logs,
            checkpoint_dir=checkpoints,
            base_env=base_env,
        )
    ) as executor:
        yield executor
