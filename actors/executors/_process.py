"""One child process on the spawn path: started with ``posix_spawn``, watched through a pidfd.

Why not ``anyio.open_process``: an agent starts a process per task, and asyncio's subprocess
machinery (a transport, a protocol and two pipe transports per child, plus a child watcher)
costs about as much parent CPU as the spawn itself.  Here a child is three file descriptors:

- ``posix_spawn`` (glibc's is ``clone(CLONE_VM | CLONE_VFORK)``, cheap whatever the parent's
  size) with ``setsid`` in the spawn attributes, so no ``preexec_fn`` and no Python code runs
  between fork and exec.  It cannot change directory, so a spec with a ``cwd`` (and the rare
  parent whose standard streams are closed) takes ``subprocess.Popen``, which also uses vfork.
- Two non-blocking pipes (stdout, stderr) that the caller reads when they are readable.
- A pidfd (Linux 5.3+) that is readable once the child exited; the exit status is then
  collected with ``waitpid(WNOHANG)``.  Without pidfds the wait runs in a worker thread.

File descriptors: every descriptor Python creates is close-on-exec (PEP 446), so the child
inherits only its three standard streams, without a close-every-descriptor pass.  Descriptors
the owning process inherited as inheritable are made close-on-exec once, on first use
(:func:`seal_inherited_descriptors`).
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

__all__ = ["Child", "Warden", "seal_inherited_descriptors", "spawn_child", "start_warden"]

# Signals Python ignores at start-up that a child must get with their default action (as
# ``subprocess``'s ``restore_signals`` does).
_RESTORED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)
# Waiting for an exit without pidfds parks a worker thread per running child.
_WAIT_THREADS = anyio.CapacityLimiter(100_000)
_sealed = False


def seal_inherited_descriptors() -> None:
    """Make every descriptor above 2 that this process inherited close-on-exec (once).

    ``posix_spawn`` does not close descriptors; Python's own are close-on-exec already, so this
    catches only what the process was started with (a shell's ``3>file``, a supervisor's
    socket), which a task must not see.
    """
    global _sealed
    if _sealed:
        return
    _sealed = True
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


def _resolve(program: str, env: Mapping[str, str]) -> str:
    """Find ``program`` on the PATH of ``env`` (as ``subprocess`` does), or raise ENOENT."""
    if os.sep in program:
        return program
    denied: OSError | None = None
    for directory in os.get_exec_path(dict(env)):
        candidate = os.path.join(directory, program)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), candidate)
    if denied is not None:
        raise denied
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


class Child:
    """A started child process: its pid (also its process group), pipes and exit status.

    Built by :func:`spawn_child`; ``close()`` releases the descriptors.
    """

    def __init__(
        self, pid: int, stdout: int, stderr: int, popen: subprocess.Popen[bytes] | None
    ) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.rusage: resource.struct_rusage | None = None  # its (and its reaped children's) usage
        self._popen = popen
        self._exit_pipe: tuple[int, int] | None = None
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None  # an old kernel: wait in a thread

    def exit_descriptor(self, task_group: TaskGroup) -> int:
        """Return a descriptor that becomes readable once the child exited (its pidfd; without
        one, a pipe that a task in ``task_group`` writes to once a thread saw the exit)."""
        if self._pidfd is not None:
            return self._pidfd
        if self._exit_pipe is None:
            read, write = os.pipe()
            self._exit_pipe = (read, write)

            async def watch() -> None:
                await self.wait()
                os.write(write, b"x")

            task_group.start_soon(watch)
        return self._exit_pipe[0]

    def reap(self) -> None:
        """Collect the exit status now, if the child exited."""
        if self.returncode is None:
            self._reap(os.WNOHANG)

    def _reap(self, options: int) -> bool:
        """Collect the exit status if the child exited; return whether it did."""
        try:
            pid, status, rusage = os.wait4(self.pid, options)
        except ChildProcessError:
            # Reaped elsewhere (a SIGCHLD handler set to SIG_IGN): the status is lost.
            self.returncode = -1 if self.returncode is None else self.returncode
            return True
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self.rusage = rusage
        if self._popen is not None:
            self._popen.returncode = self.returncode  # it must not think the child still runs
        return True

    async def wait(self) -> int:
        """Wait until the child exited; return its exit code (negative: the signal)."""
        while self.returncode is None:
            if self._pidfd is not None:
                if self._reap(os.WNOHANG):
                    break
                await anyio.wait_readable(self._pidfd)
            else:
                await anyio.to_thread.run_sync(
                    self._reap, 0, abandon_on_cancel=True, limiter=_WAIT_THREADS
                )
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        """Close the pipes and the pidfd (the caller has stopped reading them)."""
        pipe = self._exit_pipe or (None, None)
        for fd in (self.stdout, self.stderr, self._pidfd, *pipe):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.stdout = self.stderr = -1
        self._pidfd = self._exit_pipe = None


def spawn_child(argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None) -> Child:
    """Start ``argv`` in a new session (its own process group), stdin from ``/dev/null``,
    stdout and stderr to non-blocking pipes; return at once.

    Raises:
        OSError: the program was not found or could not be executed, or ``cwd`` is unusable.
    """
    seal_inherited_descriptors()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        popen = None
        if cwd is None and out_write > 2 and err_write > 2:
            pid = os.posix_spawn(
                _resolve(argv[0], env),
                list(argv),
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_write, 1),
                    (os.POSIX_SPAWN_DUP2, err_write, 2),
                ],
                setsid=True,
                setsigdef=_RESTORED_SIGNALS,
            )
        else:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
            pid = popen.pid
    except BaseException:
        for fd in (out_read, out_write, err_read, err_write):
            os.close(fd)
        raise
    os.close(out_write)
    os.close(err_write)
    os.set_blocking(out_read, False)
    os.set_blocking(err_read, False)
    return Child(pid, out_read, err_read, popen)


_WARDEN_SCRIPT = str(Path(__file__).with_name("_warden.py"))


class Warden:
    """The warden process of an executor (see ``_warden.py``); built by :func:`start_warden`."""

    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self._pipe: int | None = pipe
        self._child = Child(pid, -1, -1, None)

    async def aclose(self) -> None:
        """Close the pipe (the warden then kills what is left of the executor's processes and
        exits) and reap it; SIGKILL it if it does not exit (the caller bounds the wait)."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        try:
            await self._child.wait()
        finally:
            if self._child.returncode is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._child.close()


def start_warden(executor_id: str) -> Warden:
    """Start the warden of the executor whose processes carry ``executor_id``.

    Raises:
        OSError: the interpreter could not be started.
    """
    if not sys.executable:
        raise FileNotFoundError(errno.ENOENT, "no Python interpreter to run the warden")
    read, write = os.pipe()
    try:
        pid = os.posix_spawn(
            sys.executable,
            # Isolated and without site: it imports only the standard library, and fast.
            [sys.executable, "-I", "-S", _WARDEN_SCRIPT, executor_id],
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
            setsigdef=_RESTORED_SIGNALS,
        )
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    return Warden(pid, write)
