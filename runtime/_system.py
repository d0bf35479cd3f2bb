"""The actor system: owns the root task group, spawns actors, counts dead letters."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from ._actor import Actor, ActorRef, AskTimeouts, _Cell, _current_cell, _Failure
from ._clock import Clock, SystemClock, VirtualClock
from ._errors import ConfigurationError, EscalatedFailure
from ._logging import get_logger
from ._supervision import Supervision
from ._timers import TimerService

__all__ = ["ActorSystem", "DeadLetter", "SystemStatistics", "open_system"]

R = TypeVar("R")

_log = get_logger("runtime.system")

DEFAULT_MAILBOX_CAPACITY = 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be delivered or handled, and why."""

    recipient: str
    message_type: str
    reason: str
    message: object


@dataclass(frozen=True, slots=True)
class SystemStatistics:
    """A snapshot of the system's counters."""

    actors: int
    spawned: int
    dead_letters: int
    failures: int
    restarts: int
    timers: int
    timers_fired: int


class ActorSystem:
    """The home of a tree of actors; build it with :func:`open_system`."""

    def __init__(
        self,
        *,
        clock: Clock,
        task_group: TaskGroup,
        shutdown_timeout: float,
        default_supervision: Supervision,
    ) -> None:
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        self.timers = TimerService(clock)
        self.ask_timeouts = AskTimeouts()
        self.default_supervision = default_supervision
        self._task_group = task_group
        self._top: dict[str, _Cell] = {}
        self._auto_names = itertools.count(1)
        self._live = 0
        self._spawned = 0
        self._dead_letters = 0
        self._failures = 0
        self._restarts = 0
        self.recent_dead_letters: deque[DeadLetter] = deque(maxlen=256)
        self.root_failure: BaseException | None = None

    # -- spawning and stopping ------------------------------------------------------------------

    async def spawn(
        self,
        factory: Callable[[], Actor[R]],
        *,
        name: str | None = None,
        supervision: Supervision | None = None,
        mailbox_capacity: int | None = None,
        parent: _Cell | None = None,
    ) -> ActorRef[R]:
        """Start an actor and return its address once it has started.

        ``factory`` builds the actor; it is called again for every restart, so each restart
        begins from a fresh instance.

        Raises:
            ActorStartError: the actor's ``on_start`` raised (the cause is chained).
            ConfigurationError: the name is taken among its siblings, or has a ``/``.
        """
        if self.root_failure is not None:
            raise self.root_failure
        siblings = parent.children if parent is not None else self._top
        if name is None:
            name = f"{getattr(factory, '__name__', 'actor')}-{next(self._auto_names)}"
        elif "/" in name or not name:
            raise ConfigurationError(f"bad actor name {name!r}", where="spawn")
        if name in siblings:
            raise ConfigurationError(f"an actor named {name!r} already exists", where="spawn")
        capacity = DEFAULT_MAILBOX_CAPACITY if mailbox_capacity is None else mailbox_capacity
        if capacity < 1:
            raise ConfigurationError("mailbox_capacity must be >= 1", where="spawn")
        instance = factory()
        cell = _Cell(
            system=self,
            factory=factory,
            name=name,
            parent=parent,
            supervision=supervision or self.default_supervision,
            capacity=capacity,
        )
        siblings[name] = cell
        self._live += 1
        self._spawned += 1
        if type(instance).on_start is Actor.on_start:
            # Nothing can fail while starting: no need to wait for the task to run.
            self._task_group.start_soon(cell.run, instance, name=cell.path)
        else:
            try:
                await self._task_group.start(cell.run, instance, name=cell.path)
            except BaseException:
                self.unregister(cell)
                raise
        return cell.ref

    async def stop(self, ref: ActorRef[Any]) -> None:
        """Stop an actor (its children first) after it drains its mailbox, and wait for it."""
        cell = ref._cell
        cell.request_stop()
        await cell.wait_terminated()

    def unregister(self, cell: _Cell) -> None:
        """Forget a terminated cell (called by the cell itself)."""
        siblings = cell.parent.children if cell.parent is not None else self._top
        if siblings.get(cell.name) is cell:
            del siblings[cell.name]
            self._live -= 1

    def lookup(self, path: str) -> ActorRef[Any] | None:
        """Return the live actor at ``path`` (e.g. ``/scheduler/node-3``), or None."""
        parts = [part for part in path.split("/") if part]
        cells = self._top
        cell: _Cell | None = None
        for part in parts:
            cell = cells.get(part)
            if cell is None:
                return None
            cells = cell.children
        return cell.ref if cell is not None else None

    async def shutdown(self) -> None:
        """Stop the top-level actors, newest first, each within the shutdown timeout."""
        for cell in reversed(list(self._top.values())):
            cell.request_stop()
            with anyio.move_on_after(self.shutdown_timeout):
                await cell.wait_terminated()

    # -- failures, dead letters, helpers --------------------------------------------------------

    def dead_letter(self, message: object, *, recipient: str, reason: str) -> None:
        """Record a message that was not delivered or not handled (logged and counted)."""
        self._dead_letters += 1
        letter = DeadLetter(recipient, type(message).__name__, reason, message)
        self.recent_dead_letters.append(letter)
        _log.warning(
            "dead_letter", recipient=recipient, message_type=letter.message_type, reason=reason
        )

    def count_failure(self) -> None:
        """Count one actor failure."""
        self._failures += 1

    def count_restart(self) -> None:
        """Count one actor restart."""
        self._restarts += 1

    def escalate_to_root(self, path: str, error: BaseException) -> None:
        """A top-level actor escalated: the whole system fails with ``EscalatedFailure``."""
        if self.root_failure is None:
            failure = EscalatedFailure(
                f"top-level actor failed beyond its restart budget: {error!r}", actor=path
            )
            failure.__cause__ = error
            self.root_failure = failure
            _log.error("system_failed", actor=path, error=repr(error))
        self._task_group.cancel_scope.cancel()

    def start_work(
        self, cell: _Cell, function: Callable[[], Awaitable[object]], *, name: str
    ) -> None:
        """Run ``function`` for ``cell``; cancelled when the cell stops, failures reported."""
        # Registered now, not when the task first runs: a stop or restart that comes before
        # then must still cancel it.
        scope = anyio.CancelScope()
        cell.work_scopes.add(scope)

        async def run_work() -> None:
            # The task inherited the handler's context; it is not the handler, so it may ask
            # its own actor.
            _current_cell.set(None)
            tracker = self.clock.activity
            if tracker is not None:
                tracker.acquire()
                tracker.enter()
            try:
                with scope:
                    try:
                        await function()
                    except Exception as error:
                        cell.signal_failure(_Failure(f"{cell.path} work {name!r}", error))
                    finally:
                        cell.work_scopes.discard(scope)
            finally:
                if tracker is not None:
                    tracker.release()

        self._task_group.start_soon(run_work, name=f"{cell.path}:{name}")

    def spawn_helper(
        self, function: Callable[..., Coroutine[Any, Any, object]], *args: object
    ) -> None:
        """Run a small runtime-internal coroutine in the system's task group."""
        self._task_group.start_soon(function, *args)

    def statistics(self) -> SystemStatistics:
        """Return a snapshot of the system's counters."""
        return SystemStatistics(
            actors=self._live,
            spawned=self._spawned,
            dead_letters=self._dead_letters,
            failures=self._failures,
            restarts=self._restarts,
            timers=self.timers.pending(),
            timers_fired=self.timers.fired,
        )


@asynccontextmanager
async def open_system(
    *,
    clock: Clock | None = None,
    shutdown_timeout: float = 5.0,
    default_supervision: Supervision | None = None,
) -> AsyncIterator[ActorSystem]:
    """Open an actor system; on exit, stop its actors newest first, then cancel the rest.

    With a :class:`VirtualClock` created with ``auto_advance=True``, the system also runs the
    clock's auto-advancer, until the system starts to shut down (time stops there).

    Raises:
        EscalatedFailure: a top-level actor failed beyond its restart budget.
    """
    clock = clock if clock is not None else SystemClock()
    body_error: Exception | None = None
    async with anyio.create_task_group() as task_group:
        system = ActorSystem(
            clock=clock,
            task_group=task_group,
            shutdown_timeout=shutdown_timeout,
            default_supervision=default_supervision or Supervision(),
        )
        task_group.start_soon(system.timers.run, name="timers")
        task_group.start_soon(system.ask_timeouts.run, name="ask-timeouts")
        advancing = anyio.CancelScope()
        if isinstance(clock, VirtualClock) and clock.auto_advance:

            async def advance() -> None:
                with advancing:
                    await clock.run_auto_advance()

            task_group.start_soon(advance, name="virtual-clock")
        try:
            yield system
        except Exception as error:
            # Re-raised below, unwrapped, once every actor has stopped.
            body_error = error
        finally:
            # Simulated time stops where the work stopped: a simulation ends at its horizon,
            # not hours later because shutting down let timers run on.
            advancing.cancel()
            with anyio.CancelScope(shield=True):
                await system.shutdown()
            task_group.cancel_scope.cancel()
    if system.root_failure is not None:
        if body_error is not None:
            raise system.root_failure from body_error
        # Not ``from None``: that would erase the cause chain to the original error.
        raise system.root_failure
    if body_error is not None:
        raise body_error
