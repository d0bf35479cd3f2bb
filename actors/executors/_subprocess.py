"""The subprocess executor: runs a command per attempt, in its own process group.

The protocol the command sees (environment, report lines on stdout, signals, the log file) is
documented in ``actors/executors/_interface.py``.  Process I/O is real; the timeouts
(``max_runtime``, ``stall_timeout``, the grace before SIGKILL) run on the injected clock.

Processes start on a lean path (``posix_spawn``, pipes read when readable, a pidfd for the exit:
see ``_process.py``), and a warden process kills them all if the executor's owner dies without
closing it (see ``_warden.py``).
"""

from __future__ import annotations

import math
import os
import select
import shlex
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

from actors._errors import CheckpointManifestError, ExecutorError, ReportLineError
from runtime import Clock, ConfigurationError, SystemClock, get_logger

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
from ._manifest import (
    CheckpointManifest,
    CheckpointRecord,
    delete_checkpoint,
    read_manifest,
    retain,
    verify_manifest,
)
from ._process import Child, Warden, spawn_child, start_warden
from ._usage import (
    AttemptUsage,
    ProcessSample,
    UsageTracker,
    killed_by_oom,
    read_oom_kills,
    scan_groups,
)
from ._warden import EXECUTOR_ID_VARIABLE

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

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
_READ_SIZE = 64 * 1024
# An attempt's log file is created once it has run this long (real time: it bounds the host's
# I/O), or at its first output line, whichever comes first.
_LOG_AFTER = 1.0
# The log's states: lines held in memory, file wanted (created at the next flush), open, failed.
_LOG_PENDING, _LOG_WANTED, _LOG_OPEN, _LOG_CLOSED = range(4)
# After the main process exited and its group was killed, how long to wait for the pipes to
# reach end of file (a process that escaped the group may hold them open).  Real time: this
# bounds OS I/O, not farm time.
_DRAIN_TIMEOUT = 2.0

_MANIFEST_FLAG = "--manifest"


class ManifestReport(msgspec.Struct, frozen=True, kw_only=True):
    """``@taskfarm checkpoint --manifest FILE``: a checkpoint the executor verifies first."""

    path: str


ParsedReport = (
    AttemptProgress | AttemptCheckpointed | AttemptPreview | AttemptMetric | ManifestReport
)


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
            flag, path = _first_word(rest)
            if flag == _MANIFEST_FLAG:
                if not path:
                    raise ReportLineError(line, "--manifest needs the manifest file")
                return ManifestReport(path=path)
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
    """The directories and files one attempt uses (strings: this runs once per task)."""

    __slots__ = ("checkpoints", "log", "output")

    def __init__(self, executor: SubprocessExecutor, spec: AttemptSpec) -> None:
        self.log = f"{executor._log_root}/{spec.job_id}/{spec.task_id}.{spec.attempt}.log"
        self.checkpoints = f"{executor._checkpoint_root}/{spec.job_id}/{spec.task_id}"
        # Relative to the command's working directory, like every path the command sees.
        self.output = (
            os.path.abspath(os.path.join(spec.cwd or ".", spec.output_dir))
            if spec.output_dir is not None
            else None
        )

    def prepare(self) -> None:
        """Create the directories the command is promised (blocking: a couple of system calls
        on the agent's disk, cheaper than the thread hop that would hide them, which a process
        per task pays thousands of times a second)."""
        _make_dir(self.checkpoints)
        if self.output is not None:
            _make_dir(self.output)

    def open_log(self) -> int:
        """Open (create) the log for appending; return its descriptor."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.log, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.log), exist_ok=True)
            return os.open(self.log, flags, 0o644)


def _make_dir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


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
        oom_kills: int | None = None,
    ) -> None:
        super().__init__(spec, sink, clock=clock, grace=grace)
        self._paths = paths
        # Its process group's usage (once it runs), and the host's OOM kill count before it.
        self.tracker: UsageTracker | None = None
        self._oom_kills = oom_kills
        self._env = env
        self._child: Child | None = None
        self._log_fd: int | None = None
        self._log_state = _LOG_PENDING
        self._log_lines: list[str] = []
        self._last_stderr = ""
        self._stop_sleep: anyio.CancelScope | None = None
        self._task_group: TaskGroup | None = None
        self._enforcing = False
        # The task's kept checkpoints as this attempt folds them (the job's rule: ``retain``),
        # the one it resumed from (deleted only once it ended) and those waiting for that.
        self._kept: list[CheckpointRecord] = list(spec.checkpoints)
        self._resumed: CheckpointRecord | None = None
        self._deferred: list[CheckpointRecord] = []
        self._discarded: tuple[str, ...] = ()  # refused at resume, and deleted before the start
        self._refused = 0

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def exited(self) -> bool:
        """Return whether the main process has exited."""
        return self._exited.is_set()

    def request_checkpoint(self) -> bool:
        if not self._spec.checkpointable or self._child is None or self._exited.is_set():
            return False
        try:
            os.kill(self._child.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        self._write("sys", "checkpoint requested (SIGUSR1)")
        return True

    def _stop_changed(self) -> None:
        if self._stop_sleep is not None:
            self._stop_sleep.cancel()
        self._enforce_soon()

    def _enforce_soon(self) -> None:
        """Start the task that signals the process group, once a stop was requested (most
        attempts are never stopped: they do not pay for a task that waits for it)."""
        if self._enforcing or self._stop_reason is None or self._task_group is None:
            return
        assert self._child is not None
        self._enforcing = True
        self._task_group.start_soon(self._enforce_stop, self._child.pid)

    # -- the log ---------------------------------------------------------------------------

    def _write(self, stream: str, text: str, *, flush: bool = True, notable: bool = True) -> None:
        """Add a line to the log; with ``flush``, write what is pending now.

        Lines reach the file as they arrive (each pipe read is written before the next one is
        read, each note of the executor at once), so the log survives the agent's own crash up
        to its last line.  The file itself is created lazily, at the first byte of output (report
        lines too), the first ``notable`` note (a signal, a failure) or once the attempt has
        run for ``_LOG_AFTER``: an attempt that completes quickly without a word leaves no file
        (its start and end are in the journal), which spares the disk a new file per task.
        """
        if self._log_state == _LOG_CLOSED:
            return
        elapsed = self._clock.monotonic() - self._started_at
        self._log_lines.append(f"{elapsed:9.3f} {stream} {text}\n")
        if notable:
            self._log_state = max(self._log_state, _LOG_WANTED)
        if flush:
            self._flush_log()

    def _keep_log(self) -> None:
        """From now on the attempt has a log file (written at once, and as lines come)."""
        if self._log_state == _LOG_PENDING:
            self._log_state = _LOG_WANTED
            self._flush_log()

    def _flush_log(self) -> None:
        if self._log_state < _LOG_WANTED or not self._log_lines:
            return
        data = "".join(self._log_lines).encode("utf-8", errors="backslashreplace")
        self._log_lines.clear()
        try:
            if self._log_fd is None:
                self._log_fd = self._paths.open_log()
                self._log_state = _LOG_OPEN
            while data:
                data = data[os.write(self._log_fd, data) :]
        except OSError as error:
            # A full or failing disk costs the log, not the attempt.
            _log.warning(
                "attempt_log_failed", path=str(self._paths.log), error=str(error), **self._identity
            )
            self._close_log()
            self._log_state = _LOG_CLOSED

    def _close_log(self) -> None:
        self._flush_log()
        if self._log_fd is not None:
            fd, self._log_fd = self._log_fd, None
            os.close(fd)

    # -- running ---------------------------------------------------------------------------

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        spec = self._spec
        try:
            self._paths.prepare()
        except OSError as error:
            raise ExecutorError(
                f"could not prepare its directories: {error}",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            ) from error
        try:
            # Verified again before it is resumed from: it may have been damaged since.
            resume = await self._choose_resume() if spec.resume_from is not None else None
            try:
                child = self._child = spawn_child(
                    resolve_argv(spec.argv), env=self._env, cwd=spec.cwd
                )
                self.tracker = UsageTracker(pgid=child.pid)
            except OSError as error:
                self._write("sys", f"could not start {shlex.join(spec.argv)}: {error}")
                raise ExecutorError(
                    f"could not start {spec.argv[0]!r}: {error}",
                    job_id=spec.job_id,
                    task_id=spec.task_id,
                    attempt=spec.attempt,
                ) from error
            try:
                self._write(
                    "sys", f"started pid {child.pid}: {shlex.join(spec.argv)}", notable=False
                )
                started = self._started(pid=child.pid, log_path=self._paths.log)
                if resume is not None:
                    started = msgspec.structs.replace(
                        started,
                        resumed_from=resume[0],
                        refused=resume[1],
                        fallback=resume[2],
                        deleted=self._discarded,
                    )
                await self._emit(started)
                task_status.started()
                code = await self._supervise(child)
                result = self._outcome(code)
                assert self.tracker is not None
                self.tracker.finish(child.rusage)
                result = self._result_with_usage(result)
                completed = result.outcome == "completed"
                self._write(
                    "sys", f"exited with code {code}: {result.outcome}", notable=not completed
                )
            finally:
                with anyio.move_on_after(_DRAIN_TIMEOUT, shield=True):
                    if child.returncode is None:
                        _signal_group(child.pid, signal.SIGKILL)
                        await child.wait()
                child.close()
                self._exited.set()
            if self._deferred:
                # The attempt is over: nothing reads what it resumed from any more.
                await self._delete(self._deferred)
            self._close_log()
            await self._report_final(result)
        finally:
            self._close_log()
            self._release_waiters(self._child.returncode if self._child else None)

    async def _supervise(self, child: Child) -> int:
        """Pump the pipes, enforce the timeouts and stop requests, and return the exit code."""
        spec = self._spec
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            if spec.max_runtime is not None or spec.stall_timeout is not None:
                task_group.start_soon(self._watch)
            self._enforce_soon()  # a stop requested while the start was being reported
            code = await self._pump(child, task_group)
            task_group.cancel_scope.cancel()
        self._task_group = None
        return code

    async def _pump(self, child: Child, task_group: TaskGroup) -> int:
        """Copy both pipes to the log line by line (stdout report lines become reports) and
        wait for the exit, all through one epoll: one task per attempt, not one per pipe.

        Once the main process exited its group is killed (nothing outlives the attempt) and
        the pipes get ``_DRAIN_TIMEOUT`` to reach end of file (a process that escaped the group
        may hold them open).  The log file is wanted once the attempt has run ``_LOG_AFTER``.
        Both bounds are real time: they bound this host's I/O, not farm time.
        """
        streams: dict[int, tuple[str, bytearray]] = {
            child.stdout: ("out", bytearray()),
            child.stderr: ("err", bytearray()),
        }
        poller = select.epoll()
        try:
            for fd in streams:
                poller.register(fd, select.EPOLLIN)
            exit_fd = child.exit_descriptor(task_group)
            poller.register(exit_fd, select.EPOLLIN)
            now = anyio.current_time()
            log_at = now + _LOG_AFTER
            give_up_at = math.inf
            while streams or child.returncode is None:
                ready = poller.poll(0)
                if not ready:
                    now = anyio.current_time()
                    if now >= give_up_at:
                        break
                    if now >= log_at:
                        self._keep_log()
                        log_at = math.inf
                        continue
                    with anyio.CancelScope(deadline=min(log_at, give_up_at)):
                        await anyio.wait_readable(poller.fileno())
                    continue
                for fd, _ in ready:
                    if fd == exit_fd:
                        poller.unregister(exit_fd)
                        child.reap()
                        self._exited.set()
                        # Nothing the attempt started may outlive it (nor hold its pipes open).
                        _signal_group(child.pid, signal.SIGKILL)
                        give_up_at = anyio.current_time() + _DRAIN_TIMEOUT
                    elif fd in streams and not await self._read(fd, *streams[fd]):
                        poller.unregister(fd)
                        del streams[fd]
        finally:
            poller.close()
        return await child.wait()

    async def _read(self, fd: int, name: str, pending: bytearray) -> bool:
        """Read what the pipe has and handle its complete lines; return False at end of file."""
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            if pending:
                await self._line(name, bytes(pending))
                pending.clear()
            self._flush_log()
            return False
        self._keep_log()  # any output, report lines too: the attempt gets its log
        pending += chunk
        if b"\n" in chunk:
            *lines, rest = pending.split(b"\n")
            pending[:] = rest
            for line in lines:
                await self._line(name, line)
        while len(pending) > _MAX_LINE:
            await self._line(name, bytes(pending[:_MAX_LINE]))
            del pending[:_MAX_LINE]
        self._flush_log()
        return True

    def _outcome(self, code: int) -> AttemptFinished:
        if self._stop_reason is not None:
            outcome, reason = self._stop_reason
            return self._finish(outcome, exit_code=code, error=reason)
        if code == -signal.SIGKILL and self._oom_killed():
            return self._finish("oom", exit_code=code, error=_KERNEL_OOM)
        if code == 0:
            return self._finish("completed", exit_code=code, error=None)
        error = self._last_stderr or _describe_exit(code)
        return self._finish("failed", exit_code=code, error=error)

    def _oom_killed(self) -> bool:
        """Tell whether the kernel's OOM killer sent the SIGKILL nobody here sent: the host's
        count of OOM kills rose while the attempt ran."""
        return killed_by_oom(self._oom_kills, read_oom_kills())

    def _result_with_usage(self, result: AttemptFinished) -> AttemptFinished:
        tracker = self.tracker
        if tracker is None:
            return result
        return msgspec.structs.replace(
            result, cpu_s=round(tracker.cpu_s, 3), peak_rss=tracker.peak_rss
        )

    def usage(self) -> AttemptUsage | None:
        """Return the usage of the attempt's process group as last sampled (None before it
        started)."""
        tracker = self.tracker
        if tracker is None:
            return None
        return AttemptUsage(
            **attempt_identity(self._spec),
            cpu_s=round(tracker.cpu_s, 3),
            rss=tracker.rss,
            peak_rss=tracker.peak_rss,
            read_bytes=tracker.read_bytes,
            write_bytes=tracker.write_bytes,
            processes=tracker.processes,
            memory=self._spec.memory,
        )

    def check_memory(self, factor: float) -> None:
        """Stop the attempt as ``oom`` when its resident memory exceeds ``factor`` times its
        request (never when ``factor`` is 0 or it requested no memory)."""
        tracker, memory = self.tracker, self._spec.memory
        if tracker is None or factor <= 0 or memory <= 0 or self._stop_reason is not None:
            return
        limit = factor * memory
        if tracker.rss <= limit:
            return
        reason = (
            f"resident memory {_mib(tracker.rss)} exceeded {factor:g} x its request of "
            f"{_mib(memory)} (the agent's memory limit factor)"
        )
        self._write("sys", f"out of memory: {reason}")
        _log.warning(
            "attempt_memory_exceeded",
            rss=tracker.rss,
            memory=memory,
            factor=factor,
            **self._identity,
        )
        self._stop("oom", reason, self._grace)

    async def _enforce_stop(self, pgid: int) -> None:
        """SIGTERM the group now (unless the kill time has come), then SIGKILL it then."""
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

    # -- checkpoints -------------------------------------------------------------------------

    async def _choose_resume(self) -> tuple[str | None, tuple[str, ...], str | None]:
        """Verify the checkpoint to resume from again; fall back to the one before while that
        fails.  Return (what to resume from, the refused ones, why), and set the environment."""
        spec = self._spec
        records = list(spec.checkpoints)
        indices = [i for i, r in enumerate(records) if r.checkpoint == spec.resume_from]
        if not indices:
            return spec.resume_from, (), None  # nothing to verify it against
        refused: list[str] = []
        refused_records: list[CheckpointRecord] = []
        reasons: list[str] = []
        chosen: CheckpointRecord | None = None
        for record in reversed(records[: indices[-1] + 1]):
            if record.manifest is not None:
                try:
                    await anyio.to_thread.run_sync(verify_manifest, record.manifest)
                except CheckpointManifestError as error:
                    refused.append(record.checkpoint)
                    refused_records.append(record)
                    reasons.append(str(error))
                    continue
            chosen = record
            break
        self._resumed = chosen
        if not refused:
            return spec.resume_from, (), None
        self._kept = [r for r in self._kept if r.checkpoint not in refused]
        # A refused checkpoint is out of the task's kept ones for good (the job drops it when
        # it journals the start): nothing resumes from it again, so it goes as the retention
        # rule's others do.  A single-node attempt deletes it before it starts (its program
        # may write the same paths again); in a gang, other ranks may still be verifying
        # it, so rank 0 deletes it once the attempt has ended.
        if len(spec.nodes) <= 1:
            self._discarded = await self._delete(refused_records, why="refused")
        elif spec.rank == 0:
            self._deferred.extend(refused_records)
        target = chosen.checkpoint if chosen is not None else None
        fallback = f"checkpoint {refused[0]} failed verification ({reasons[0]}); " + (
            f"resuming from the one before, {target}" if target else "starting over"
        )
        if len(refused) > 1:
            fallback += f" ({len(refused)} refused in all)"
        _log.warning(
            "checkpoint_fallback",
            refused=refused,
            reasons=reasons,
            resume_from=target,
            **self._identity,
        )
        self._write("sys", fallback)
        if target is None:
            self._env.pop("TASKFARM_RESUME_FROM", None)
        else:
            self._env["TASKFARM_RESUME_FROM"] = target
        self._env["TASKFARM_RESUME_FALLBACK"] = fallback
        return target, tuple(refused), fallback

    async def _verified(self, report: ManifestReport) -> None:
        """Verify a reported manifest (in a worker thread); report the checkpoint only if its
        files match, and delete the checkpoints that fall out of the kept window."""
        started = self._clock.monotonic()
        try:
            checkpoint, manifest = await anyio.to_thread.run_sync(
                _read_and_verify, report.path, self._spec.cwd
            )
        except CheckpointManifestError as error:
            self._write("sys", f"checkpoint refused: {error}")
            _log.warning(
                "checkpoint_refused",
                manifest=report.path,
                path=error.path,
                problem=error.problem,
                **self._identity,
            )
            # Visible where the job is looked at too: a metric the job journals and shows.
            self._refused += 1
            await self._emit(
                AttemptMetric(
                    name="checkpoints_refused",
                    value=float(self._refused),
                    **attempt_identity(self._spec),
                )
            )
            return
        _log.info(
            "checkpoint_verified",
            checkpoint=checkpoint,
            files=len(manifest.files),
            bytes=manifest.size,
            elapsed_ms=round((self._clock.monotonic() - started) * 1000),
            **self._identity,
        )
        await self._emit(
            AttemptCheckpointed(
                checkpoint=checkpoint, manifest=manifest, **attempt_identity(self._spec)
            )
        )
        record = CheckpointRecord(checkpoint=checkpoint, manifest=manifest)
        self._kept, dropped = retain([*self._kept, record], self._spec.checkpoint_retention)
        if dropped and self._spec.rank == 0:  # one rank owns a gang's checkpoints
            now = [r for r in dropped if r != self._resumed]
            self._deferred.extend(r for r in dropped if r == self._resumed)
            if now:
                await self._delete(now)

    async def _delete(
        self, records: list[CheckpointRecord], *, why: str = "retention"
    ) -> tuple[str, ...]:
        """Delete the checkpoints' files that no kept checkpoint lists; return the checkpoints
        that had files deleted."""
        kept = list(self._kept)

        def delete() -> list[tuple[str, list[str]]]:
            return [(record.checkpoint, delete_checkpoint(record, kept)) for record in records]

        results = await anyio.to_thread.run_sync(delete)
        deleted = [path for _, paths in results for path in paths]
        gone = tuple(checkpoint for checkpoint, paths in results if paths)
        if deleted:
            _log.info(
                "checkpoints_deleted",
                checkpoints=[r.checkpoint for r in records],
                files=len(deleted),
                reason=why,
                **self._identity,
            )
            if why == "refused":
                self._write("sys", f"deleted refused checkpoint(s) {', '.join(gone)}")
        return gone

    async def _line(self, name: str, raw: bytes | bytearray) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if name == "out":
            try:
                report = parse_report_line(text.rstrip(), self._spec)
            except ReportLineError as error:
                self._write(
                    "sys", f"malformed report line ignored ({error.reason}): {text}", flush=False
                )
                _log.warning(
                    "report_line_malformed",
                    reason=error.reason,
                    line=text,
                    job_id=self._spec.job_id,
                    task_id=self._spec.task_id,
                    attempt=self._spec.attempt,
                )
                return
            if isinstance(report, ManifestReport):
                self._flush_log()
                await self._verified(report)
                return
            if report is not None:
                self._flush_log()  # what came before a report is on disk before it is sent
                await self._emit(report)
                return
        elif text.strip():
            self._last_stderr = text.strip()
        self._write(name, text, flush=False)


def _read_and_verify(path: str, cwd: str | None) -> tuple[str, CheckpointManifest]:
    checkpoint, manifest = read_manifest(path, cwd=cwd)
    verify_manifest(manifest)
    return checkpoint, manifest


class SubprocessExecutor(ExecutorBase):
    """Runs each attempt's ``argv`` as a process in its own session and process group.

    Built by :func:`open_subprocess_executor`; see ``actors/executors/_interface.py`` for the
    protocol the process sees.
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
        executor_id: str,
        memory_limit_factor: float = 0.0,
    ) -> None:
        super().__init__(task_group=task_group, clock=clock, terminate_grace=terminate_grace)
        self._log_root = str(log_dir)
        self._checkpoint_root = str(checkpoint_dir)
        self._base_env = dict(base_env)
        self._executor_id = executor_id
        self._memory_limit_factor = memory_limit_factor
        # The host's OOM kill count as last read (an attempt notes it when it starts).
        self._oom_kills = read_oom_kills()

    async def sample_usage(self) -> tuple[AttemptUsage, ...]:
        """Sample every running attempt's process group (``/proc``, read in a worker thread),
        stop those over the memory limit as ``oom``, and return their usage so far."""
        attempts = [
            a
            for a in self._attempts.values()
            if isinstance(a, _SubprocessAttempt) and a.tracker is not None and not a.done
        ]
        pgids = {a.tracker.pgid for a in attempts if a.tracker is not None}
        scanned, oom_kills = await anyio.to_thread.run_sync(_scan, pgids)
        if oom_kills is not None:
            self._oom_kills = oom_kills
        usages: list[AttemptUsage] = []
        for attempt in attempts:
            tracker = attempt.tracker
            if tracker is None or attempt.done or attempt.exited:
                continue  # ended while we read: its final report has its totals
            tracker.update(scanned.get(tracker.pgid, ()))
            attempt.check_memory(self._memory_limit_factor)
            usage = attempt.usage()
            if usage is not None:
                usages.append(usage)
        return tuple(usages)

    @property
    def executor_id(self) -> str:
        """Return the id every process of this executor carries in ``TASKFARM_EXECUTOR_ID``."""
        return self._executor_id

    def log_path(self, spec: AttemptSpec) -> Path:
        """Return the log file of the attempt ``spec`` describes."""
        return Path(_Paths(self, spec).log)

    def checkpoint_dir(self, spec: AttemptSpec) -> Path:
        """Return the checkpoint directory of the task ``spec`` runs (shared by its attempts)."""
        return Path(_Paths(self, spec).checkpoints)

    async def start(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        """Start ``spec.argv``; return once it runs and was reported started.

        Raises:
            ExecutorError: the spec names a function, the command could not be started (no
                such file, not executable, bad cwd) or the executor is closed.
        """
        attempt = self._attempt(spec, report)
        return await self._launch(attempt, attempt._run)

    def start_nowait(self, spec: AttemptSpec, report: ReportSink) -> AttemptHandle:
        """Start ``spec.argv`` and return its handle at once, without waiting for it to run.

        What :meth:`start` raises once the attempt was accepted (the program is missing, the
        cwd is unusable) ends the attempt instead, with a ``start_failed`` :class:`AttemptFinished`
        through ``report``, as a remote agent's attempt does.  A node agent starts its attempts
        this way: a task less per attempt.

        Raises:
            ExecutorError: the spec names a function, or the executor is closed.
        """
        attempt = self._attempt(spec, report)
        self._launch_nowait(attempt, attempt._run)
        return attempt

    def _attempt(self, spec: AttemptSpec, report: ReportSink) -> _SubprocessAttempt:
        if not spec.argv:
            raise ExecutorError(
                "the subprocess executor runs commands; this spec names a function",
                job_id=spec.job_id,
                task_id=spec.task_id,
                attempt=spec.attempt,
            )
        paths = _Paths(self, spec)
        return _SubprocessAttempt(
            spec,
            report,
            clock=self._clock,
            grace=self._terminate_grace,
            paths=paths,
            env=self._environment(spec, paths),
            oom_kills=self._oom_kills,
        )

    def _environment(self, spec: AttemptSpec, paths: _Paths) -> dict[str, str]:
        env = {**self._base_env, **spec.env}
        env.update(
            TASKFARM_JOB_ID=spec.job_id,
            TASKFARM_TASK_ID=spec.task_id,
            TASKFARM_ATTEMPT=str(spec.attempt),
            TASKFARM_CHECKPOINT_DIR=paths.checkpoints,
        )
        env[EXECUTOR_ID_VARIABLE] = self._executor_id
        if len(spec.nodes) > 1:
            # One host per line, leader first: ``mpirun -hostfile $TASKFARM_HOSTFILE``.
            hosts = spec.hosts or spec.nodes
            hostfile = os.path.join(paths.checkpoints, f"hostfile.{spec.attempt}")
            os.makedirs(paths.checkpoints, exist_ok=True)
            # Written aside and renamed: with a shared checkpoint folder every rank writes it.
            aside = f"{hostfile}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            Path(aside).write_text("".join(f"{host}\n" for host in hosts), encoding="utf-8")
            os.replace(aside, hostfile)
            env.update(gang_environment(spec, hostfile))
        # Never let a value inherited from the agent's own environment pose as this job's.
        for name, value in (
            ("TASKFARM_RESUME_FROM", spec.resume_from),
            ("TASKFARM_OUTPUT_DIR", paths.output),
        ):
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


_KERNEL_OOM = (
    "killed by the kernel's OOM killer (SIGKILL from outside the agent while the host's "
    "oom_kill count rose)"
)


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _scan(pgids: set[int]) -> tuple[dict[int, list[ProcessSample]], int | None]:
    return scan_groups(pgids), read_oom_kills()


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
    executor_id: str | None = None,
    memory_limit_factor: float = 0.0,
) -> AsyncIterator[SubprocessExecutor]:
    """Open an executor that runs commands, logging to ``log_dir`` and keeping per-task
    checkpoint directories under ``checkpoint_dir``.

    ``terminate_grace`` is the time between SIGTERM and SIGKILL on a timeout, a stall and
    closing; ``inherit_env`` passes this process's environment on to the commands.  On exit,
    running attempts are terminated (outcome ``cancelled``) and awaited.

    Every process the executor starts carries ``executor_id`` (default: a new random id) in
    ``TASKFARM_EXECUTOR_ID``, and a warden process kills them all should this process die
    without closing the executor.  Give a stable id (a node agent derives it from its work
    directory) to find a dead predecessor's processes with ``kill_marked``.

    ``memory_limit_factor`` (0: off): :meth:`SubprocessExecutor.sample_usage` stops an attempt
    whose resident memory exceeds that many times its ``memory`` request, as ``oom``.

    Raises:
        ConfigurationError: ``terminate_grace`` is negative, or ``memory_limit_factor`` is
            negative or not finite.
    """
    check_grace(terminate_grace)
    if not (math.isfinite(memory_limit_factor) and memory_limit_factor >= 0):
        raise ConfigurationError(
            f"must be a number >= 0, got {memory_limit_factor}", where="memory_limit_factor"
        )
    chosen = clock if clock is not None else SystemClock()
    logs, checkpoints = await anyio.to_thread.run_sync(_make_roots, log_dir, checkpoint_dir)
    base_env = dict(os.environ) if inherit_env else {}
    base_env.pop(EXECUTOR_ID_VARIABLE, None)
    chosen_id = executor_id if executor_id is not None else f"{os.getpid()}-{uuid.uuid4().hex}"
    warden: Warden | None = None
    try:
        warden = start_warden(chosen_id)
    except OSError as error:
        _log.warning("executor_warden_failed", executor_id=chosen_id, error=str(error))
    try:
        async with owning(
            lambda task_group: SubprocessExecutor(
                task_group=task_group,
                clock=chosen,
                terminate_grace=terminate_grace,
                log_dir=logs,
                checkpoint_dir=checkpoints,
                base_env=base_env,
                executor_id=chosen_id,
                memory_limit_factor=memory_limit_factor,
            )
        ) as executor:
            yield executor
    finally:
        if warden is not None:
            with anyio.move_on_after(5, shield=True):
                await warden.aclose()
