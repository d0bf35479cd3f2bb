"""Actors, their addresses and their cells.

Three objects, as in pykka: the ``Actor`` (user code: state and a ``receive`` handler), the
``ActorRef`` (the address users hold: ``tell``/``ask``) and the private ``_Cell`` (the mailbox,
the receive loop, supervision and lifecycle).  Users never build a cell or a ref: ``spawn()``
returns a started ref.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio import (
    BrokenResourceError,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)

from ._errors import (
    ActorStartError,
    ActorStoppedError,
    AskTimeoutError,
    EscalatedFailure,
    MailboxFullError,
    MessageFailedError,
    SelfAskError,
)
from ._logging import bind_context, get_logger
from ._mailbox import Mailbox
from ._message import Message
from ._supervision import RestartBudget, Supervision

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from ._clock import ActivityTracker, Clock
    from ._system import ActorSystem

__all__ = ["Actor", "ActorContext", "ActorRef", "Terminated"]

M = TypeVar("M")
R = TypeVar("R")

_log = get_logger("runtime.actor")

# The cell whose handler is running in the current task (to refuse self-asks).
_current_cell: ContextVar[_Cell | None] = ContextVar("taskfarm_current_cell", default=None)


class Terminated(Message, frozen=True, kw_only=True, tag="runtime.terminated"):
    """Sent to each watcher when a watched actor has stopped; ``reason`` is None when orderly."""

    actor: str
    reason: str | None = None


class Actor(Generic[M]):
    """Base class for actors: one message at a time, state private to the actor.

    Override :meth:`receive`; its return value is the reply to :meth:`ActorRef.ask`.  The
    optional hooks :meth:`on_start` and :meth:`on_stop` run inside the actor's own task.
    """

    context: ActorContext

    #: Above 1, the actor handles up to this many queued messages per call of
    #: :meth:`receive_batch` (e.g. to journal them in one commit).
    max_batch: int = 1

    async def on_start(self) -> None:
        """Prepare the actor (recover state, start timers) before its first message."""

    async def receive(self, message: M) -> Any:
        """Handle one message and return the reply for an asker (ignored for tells)."""
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Release what the actor holds; runs once the mailbox is drained."""

    async def receive_batch(self, messages: list[M]) -> list[Any]:
        """Handle several queued messages at once (only called when ``max_batch`` > 1).

        Return one reply per message, in order.  If it raises, the actor is supervised as for
        any failure and, once restarted, handles the same messages one at a time with
        :meth:`receive`, so a poison message is still found and dead-lettered alone.
        """
        return [await self.receive(message) for message in messages]


class _Ask:
    """An ask envelope: the message plus the slot its reply lands in."""

    __slots__ = ("abandoned", "error", "event", "message", "parked", "reply", "tracker")

    def __init__(
        self, message: object, parked: bool, tracker: ActivityTracker | None = None
    ) -> None:
        self.message = message
        self.tracker = tracker
        self.event = anyio.Event()
        self.reply: object = None
        self.error: BaseException | None = None
        self.parked = parked
        self.abandoned = False


class AskTimeouts:
    """Fails asks whose deadline passed: one heap and one task for a whole system."""

    __slots__ = ("_heap", "_scope", "_sequence", "_sleeping_until", "_wakeup")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Ask, str, float]] = []
        self._sequence = itertools.count()
        self._wakeup = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._sleeping_until = math.inf

    def watch(self, envelope: _Ask, deadline: float, actor: str, timeout: float) -> None:
        """Fail ``envelope`` with AskTimeoutError at ``deadline`` unless it has a reply."""
        heapq.heappush(self._heap, (deadline, next(self._sequence), envelope, actor, timeout))
        if deadline < self._sleeping_until:
            self._sleeping_until = deadline
            if self._scope is not None:
                self._scope.cancel()
            else:
                self._wakeup.set()

    async def run(self) -> None:
        """Expire asks until cancelled (the system runs it in its task group)."""
        heap = self._heap
        while True:
            now = anyio.current_time()
            while heap and (heap[0][0] <= now or heap[0][2].event.is_set()):
                _, _, envelope, actor, timeout = heapq.heappop(heap)
                if not envelope.event.is_set():
                    _expire(envelope, actor, timeout)
            if not heap:
                self._sleeping_until = math.inf
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            self._sleeping_until = heap[0][0]
            with anyio.CancelScope(deadline=heap[0][0]) as scope:
                self._scope = scope
                await anyio.sleep_forever()
            self._scope = None


def _expire(envelope: _Ask, actor: str, timeout: float) -> None:
    if envelope.abandoned:
        return  # the asker left already (cancelled) and took its activity unit back
    envelope.abandoned = True  # a late reply is dropped
    envelope.error = AskTimeoutError(
        f"no reply to {type(envelope.message).__name__} within {timeout:g} s",
        actor=actor,
        timeout=timeout,
    )
    if envelope.parked and envelope.tracker is not None:
        envelope.tracker.acquire()  # hand the asker's unit back before waking it
    envelope.event.set()


class _Failure:
    """A system signal: this actor fails because of ``error`` raised outside its handler.

    Sent when a child escalates (it exhausted its restart budget) and when the actor's own
    background work raises.
    """

    __slots__ = ("error", "source")

    def __init__(self, source: str, error: BaseException) -> None:
        self.source = source
        self.error = error


class ActorRef(Generic[M]):
    """The address of an actor: send it messages with ``tell`` or ``ask``."""

    __slots__ = ("_cell",)

    def __init__(self, cell: _Cell) -> None:
        self._cell = cell

    @property
    def path(self) -> str:
        """Return the actor's unique path, e.g. ``/scheduler/node-7``."""
        return self._cell.path

    @property
    def name(self) -> str:
        """Return the actor's name (the last part of its path)."""
        return self._cell.name

    @property
    def is_alive(self) -> bool:
        """Return whether the actor still accepts messages."""
        return not self._cell.closed

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.path}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and other._cell is self._cell

    def __hash__(self) -> int:
        return id(self._cell)

    def tell_nowait(self, message: M) -> None:
        """Send ``message`` without waiting.

        A message to a stopped actor goes to dead letters (logged and counted).

        Raises:
            MailboxFullError: the mailbox is full (use ``tell`` to wait for room).
        """
        cell = self._cell
        try:
            cell.mailbox.put_nowait(message)
        except WouldBlock:
            raise MailboxFullError(
                "mailbox is full", actor=cell.path, capacity=cell.capacity
            ) from None
        except (ClosedResourceError, BrokenResourceError):
            cell.system.dead_letter(message, recipient=cell.path, reason="actor stopped")
            return
        if cell.idle:
            cell.wake()

    async def tell(self, message: M) -> None:
        """Send ``message``, waiting for mailbox room (backpressure).

        It yields only when the mailbox is full, so a burst of tells to an actor with room
        costs no context switch.  A message to a stopped actor goes to dead letters.
        """
        cell = self._cell
        try:
            cell.mailbox.put_nowait(message)
        except WouldBlock:
            try:
                await cell.mailbox.put(message)
            except (ClosedResourceError, BrokenResourceError):
                cell.system.dead_letter(message, recipient=cell.path, reason="actor stopped")
                return
            # The actor may have drained everything and gone idle while we waited for room.
        except (ClosedResourceError, BrokenResourceError):
            cell.system.dead_letter(message, recipient=cell.path, reason="actor stopped")
            return
        if cell.idle:
            cell.wake()

    # The timeout is part of ask's contract (a reply can be lost), hence ASYNC109.
    async def ask(self, message: M, *, timeout: float) -> Any:  # noqa: ASYNC109
        """Send ``message`` and wait for the handler's reply, for at most ``timeout`` seconds.

        The timeout is real time: it guards against a lost reply, it is not a scheduling rule.

        Raises:
            AskTimeoutError: no reply within ``timeout``.
            SelfAskError: called from inside this actor's own handler (it would deadlock).
            ActorStoppedError: the actor has stopped or stops before replying.
            MessageFailedError: the message crashed the actor and went to dead letters.
        """
        cell = self._cell
        if _current_cell.get() is cell:
            raise SelfAskError("an actor cannot ask itself from its own handler", actor=cell.path)
        tracker = cell.tracker
        envelope = _Ask(message, tracker.park() if tracker is not None else False, tracker)
        deadline = anyio.current_time() + timeout
        try:
            try:
                cell.mailbox.put_nowait(envelope)
            except WouldBlock:
                with anyio.fail_after(timeout):  # a full mailbox: rare, so a scope of its own
                    await cell.mailbox.put(envelope)
            if cell.idle:
                cell.wake()
            # One sweeper per system bounds every ask (a cancel scope per ask would cost half
            # of its round trip): at the deadline it fails the ask with AskTimeoutError.
            cell.system.ask_timeouts.watch(envelope, deadline, cell.path, timeout)
            await envelope.event.wait()
        except (ClosedResourceError, BrokenResourceError):
            self._unpark(envelope)
            raise ActorStoppedError("actor has stopped", actor=cell.path) from None
        except TimeoutError:
            self._unpark(envelope)
            raise AskTimeoutError(
                f"no reply to {type(message).__name__} within {timeout:g} s",
                actor=cell.path,
                timeout=timeout,
            ) from None
        except BaseException:
            self._unpark(envelope)
            raise
        if envelope.error is not None:
            raise envelope.error
        return envelope.reply

    def _unpark(self, envelope: _Ask) -> None:
        # The asker resumes without a reply: it takes its activity unit back itself, and the
        # actor must not hand one over when it replies later.
        if not envelope.event.is_set():
            envelope.abandoned = True
            if envelope.parked and self._cell.tracker is not None:
                self._cell.tracker.acquire()


class ActorContext:
    """What an actor can do besides handling messages: spawn, watch, timers, stop."""

    __slots__ = ("_cell",)

    def __init__(self, cell: _Cell) -> None:
        self._cell = cell

    @property
    def self_ref(self) -> ActorRef[Any]:
        """Return this actor's own address."""
        return self._cell.ref

    @property
    def path(self) -> str:
        """Return this actor's path."""
        return self._cell.path

    @property
    def clock(self) -> Clock:
        """Return the system's clock."""
        return self._cell.system.clock

    @property
    def system(self) -> ActorSystem:
        """Return the system this actor lives in."""
        return self._cell.system

    async def spawn(
        self,
        factory: Callable[[], Actor[R]],
        *,
        name: str | None = None,
        supervision: Supervision | None = None,
        mailbox_capacity: int | None = None,
    ) -> ActorRef[R]:
        """Start a child actor supervised by this one; see :meth:`ActorSystem.spawn`."""
        return await self._cell.system.spawn(
            factory,
            name=name,
            supervision=supervision,
            mailbox_capacity=mailbox_capacity,
            parent=self._cell,
        )

    def watch(self, ref: ActorRef[Any]) -> None:
        """Receive a :class:`Terminated` message when ``ref``'s actor stops."""
        target = ref._cell
        if target.is_terminated:
            self._cell.deliver(Terminated(actor=target.path, reason=target.stop_reason))
            return
        target.watchers.append(self._cell)

    def unwatch(self, ref: ActorRef[Any]) -> None:
        """Stop watching ``ref``."""
        watchers = ref._cell.watchers
        if self._cell in watchers:
            watchers.remove(self._cell)

    def start_timer(
        self, key: str, message: M, *, delay: float, interval: float | None = None
    ) -> None:
        """Send ``message`` to self after ``delay`` clock seconds (then every ``interval``).

        Starting a timer with a key that is already running replaces it.
        """
        self._cell.system.timers.start(self._cell, key, message, delay=delay, interval=interval)

    def cancel_timer(self, key: str) -> None:
        """Cancel the timer ``key`` if it is running."""
        self._cell.system.timers.cancel(self._cell, key)

    def start_work(self, function: Callable[[], Awaitable[object]], *, name: str = "work") -> None:
        """Run long work beside the handler; it is cancelled when the actor stops.

        The work reports back by telling the actor a message.  If it raises, the actor fails
        as if its handler had raised (and is supervised accordingly).
        """
        self._cell.system.start_work(self._cell, function, name=name)

    def stop(self) -> None:
        """Stop this actor once the messages already in its mailbox are handled."""
        self._cell.request_stop()


class _Cell:
    """The runtime side of one actor: mailbox, receive loop, supervision, lifecycle."""

    __slots__ = (
        "_terminated_event",
        "actor",
        "budget",
        "capacity",
        "children",
        "closed",
        "context",
        "factory",
        "idle",
        "is_terminated",
        "mailbox",
        "name",
        "parent",
        "path",
        "ref",
        "running",
        "stop_reason",
        "supervision",
        "system",
        "tracker",
        "watchers",
        "work_scopes",
    )

    def __init__(
        self,
        *,
        system: ActorSystem,
        factory: Callable[[], Actor[Any]],
        name: str,
        parent: _Cell | None,
        supervision: Supervision,
        capacity: int,
    ) -> None:
        self.system = system
        self.factory = factory
        self.name = name
        self.parent = parent
        self.path: str = f"{parent.path if parent is not None else ''}/{name}"
        self.supervision = supervision
        self.budget = RestartBudget(supervision)
        self.capacity = capacity
        self.mailbox = Mailbox(capacity)
        self.ref: ActorRef[Any] = ActorRef(self)
        self.context = ActorContext(self)
        self.actor: Actor[Any] | None = None
        self.running = False  # the current instance's on_start ran and on_stop has not
        self.children: dict[str, _Cell] = {}
        self.watchers: list[_Cell] = []
        self.work_scopes: set[anyio.CancelScope] = set()
        self.is_terminated = False
        self._terminated_event: anyio.Event | None = None  # made only if someone waits
        self.stop_reason: str | None = None
        self.closed = False
        self.tracker: ActivityTracker | None = system.clock.activity
        # A new actor is busy (starting) until its loop first finds the mailbox empty.
        self.idle = False
        if self.tracker is not None:
            self.tracker.acquire()

    # -- activity (virtual clock) -------------------------------------------------------------

    def wake(self) -> None:
        """Mark the actor busy: a message landed in its empty mailbox."""
        self.idle = False
        tracker = self.tracker
        if tracker is not None:
            tracker.acquire()

    def _go_idle(self) -> None:
        self.idle = True
        tracker = self.tracker
        if tracker is not None:
            tracker.release()

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self, reason: str | None = None) -> None:
        """Close the mailbox: what is queued is still handled, new messages are dead letters."""
        if not self.closed:
            self.closed = True
            self.stop_reason = reason
            self.mailbox.close()

    async def wait_terminated(self) -> None:
        """Wait until the actor has fully stopped."""
        if self.is_terminated:
            return
        if self._terminated_event is None:
            self._terminated_event = anyio.Event()
        await self._terminated_event.wait()

    def signal_failure(self, failure: _Failure) -> None:
        """Make this actor fail with ``failure`` as its next message (ahead of backpressure)."""
        if self.closed:
            return
        try:
            self.mailbox.put_nowait(failure)
        except WouldBlock:
            # Full mailbox: deliver from a helper task rather than lose the failure.
            self.system.spawn_helper(self._put_late, failure)
            return
        except (ClosedResourceError, BrokenResourceError):
            return
        if self.idle:
            self.wake()

    def deliver(self, message: object) -> None:
        """Tell this actor a system message (``Terminated``) that must not be lost.

        A full mailbox does not drop it: a helper task waits for room.
        """
        try:
            self.ref.tell_nowait(message)
        except MailboxFullError:
            self.system.spawn_helper(self.ref.tell, message)

    async def _put_late(self, item: object) -> None:
        try:
            await self.mailbox.put(item)
        except (ClosedResourceError, BrokenResourceError):
            return  # stopped meanwhile: the signal is moot
        if self.idle:
            self.wake()

    async def run(
        self,
        first_instance: Actor[Any],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the actor, then handle messages until stopped (the actor's whole task)."""
        _current_cell.set(self)
        bind_context(actor=self.path)
        if self.tracker is not None:
            self.tracker.enter()
        try:
            try:
                await self._start_instance(first_instance)
            except Exception as error:
                self.closed = True
                self.stop_reason = f"start failed: {error!r}"
                raise ActorStartError(f"on_start failed: {error!r}", actor=self.path) from error
            task_status.started()
            if self.actor is not None and self.actor.max_batch > 1:
                await self._batch_loop()
            else:
                await self._loop()
        finally:
            await self._terminate()

    async def _start_instance(self, actor: Actor[Any] | None = None) -> None:
        if actor is None:
            actor = self.factory()
        actor.context = self.context
        self.actor = actor
        await actor.on_start()
        self.running = True

    async def _loop(self) -> None:
        receive_nowait = self.mailbox.get_nowait
        receive = self.mailbox.get
        retry: object = None
        while True:
            if retry is not None:
                item, retry = retry, None
                redelivered = True
            else:
                redelivered = False
                try:
                    item = receive_nowait()
                except WouldBlock:
                    self._go_idle()
                    try:
                        item = await receive()
                    except EndOfStream:
                        return
                except EndOfStream:
                    self._go_idle()
                    return
            actor = self.actor
            assert actor is not None
            if type(item) is _Ask:
                try:
                    reply = await actor.receive(item.message)
                except Exception as error:
                    retry = await self._on_failure(item, error, redelivered)
                    continue
                self._resolve(item, reply, None)
            elif type(item) is _Failure:
                cause = item.error
                failure = (
                    cause
                    if isinstance(cause, Exception)
                    else EscalatedFailure(f"{item.source}: {cause!r}", actor=self.path)
                )
                await self._on_failure(item, failure)
            else:
                try:
                    await actor.receive(item)
                except Exception as error:
                    retry = await self._on_failure(item, error, redelivered)

    async def _batch_loop(self) -> None:
        """The receive loop of an actor that handles messages in batches (``max_batch``)."""
        receive_nowait = self.mailbox.get_nowait
        singles: deque[object] = deque()  # handled one by one: after a failed batch, signals
        while True:
            if singles:
                retry: object = await self._handle_one(singles.popleft(), redelivered=False)
                while retry is not None:
                    retry = await self._handle_one(retry, redelivered=True)
                continue
            try:
                item = receive_nowait()
            except WouldBlock:
                self._go_idle()
                try:
                    item = await self.mailbox.get()
                except EndOfStream:
                    return
            except EndOfStream:
                self._go_idle()
                return
            actor = self.actor
            assert actor is not None
            batch = [item]
            while len(batch) < actor.max_batch:
                try:
                    batch.append(receive_nowait())
                except (WouldBlock, EndOfStream):
                    break
            if any(type(entry) is _Failure for entry in batch):
                singles.extend(batch)  # rare: keep strict order around a failure signal
                continue
            messages = [entry.message if type(entry) is _Ask else entry for entry in batch]
            try:
                replies = await actor.receive_batch(messages)
            except Exception as error:
                await self._on_failure(_Failure(f"{self.path} batch", error), error)
                if self.closed and self.actor is actor:
                    for entry in batch:  # gave up: nothing of the batch was handled
                        self._dead_letter(entry, reason=f"actor failed: {error!r}", error=error)
                else:
                    singles.extend(batch)
                continue
            for entry, reply in zip(batch, replies, strict=True):
                if type(entry) is _Ask:
                    self._resolve(entry, reply, None)

    async def _handle_one(self, item: object, *, redelivered: bool) -> object:
        """Handle one item as ``_loop`` does; return a message to redeliver, or None."""
        actor = self.actor
        assert actor is not None
        if type(item) is _Failure:
            cause = item.error
            failure = (
                cause
                if isinstance(cause, Exception)
                else EscalatedFailure(f"{item.source}: {cause!r}", actor=self.path)
            )
            await self._on_failure(item, failure)
            return None
        message = item.message if type(item) is _Ask else item
        try:
            reply = await actor.receive(message)
        except Exception as error:
            return await self._on_failure(item, error, redelivered)
        if type(item) is _Ask:
            self._resolve(item, reply, None)
        return None

    def _resolve(self, envelope: _Ask, reply: object, error: BaseException | None) -> None:
        if envelope.abandoned:
            return
        envelope.reply = reply
        envelope.error = error
        if envelope.parked and self.tracker is not None:
            self.tracker.acquire()
        envelope.event.set()

    # -- supervision ---------------------------------------------------------------------------

    async def _on_failure(
        self, item: object, error: Exception, redelivered: bool = False
    ) -> object:
        """Apply the supervision policy to a failed message; return a message to redeliver."""
        system = self.system
        system.count_failure()
        failures = self.budget.record_failure(system.clock.monotonic())
        signal = type(item) is _Failure  # not a message: nothing to redeliver or dead-letter
        poison = redelivered  # it crashed the actor a second time
        _log.warning(
            "actor_failed",
            message_type=_type_name(item),
            error=repr(error),
            failures_in_window=failures,
            poison=poison,
        )
        if not signal and (poison or not self.budget.allows_restart(failures)):
            self._dead_letter(item, reason=f"crashed the actor: {error!r}", error=error)
        if not self.budget.allows_restart(failures):
            await self._give_up(error)
            return None
        if not await self._restart(failures):
            # No instance came up (the budget ran out while restarting): nothing to redeliver to.
            if not (poison or signal):
                self._dead_letter(item, reason=f"crashed the actor: {error!r}", error=error)
            return None
        return None if poison or signal else item

    async def _restart(self, restart_number: int) -> bool:
        """Replace the instance after the backoff; return False if it gave up instead."""
        system = self.system
        delay = self.supervision.backoff(restart_number)
        old = self.actor
        with anyio.CancelScope(shield=True):
            # The new instance's on_start recreates the children it needs (same names), so the
            # old ones go first, as they would if the actor stopped.
            await self._stop_children()
            if old is not None and self.running:
                self.running = False
                await _quietly(old.on_stop(), path=self.path, hook="on_stop")
        self._cancel_work()
        system.timers.cancel_all(self)
        if delay > 0:
            await system.clock.sleep(delay)
        system.count_restart()
        _log.info("actor_restarted", restart=restart_number, backoff_s=delay)
        try:
            await self._start_instance()
        except Exception as error:
            # A restart that cannot start counts as one more failure of this actor.
            failures = self.budget.record_failure(system.clock.monotonic())
            system.count_failure()
            if self.budget.allows_restart(failures):
                return await self._restart(failures)
            await self._give_up(error)
            return False
        return True

    async def _give_up(self, error: BaseException) -> None:
        """Stop this actor and escalate (or just stop, when that is the policy)."""
        reason = f"failed: {error!r}"
        self.request_stop(reason)
        self._drain_to_dead_letters(reason)
        if self.supervision.strategy == "stop":
            return
        parent = self.parent
        if parent is None:
            self.system.escalate_to_root(self.path, error)
        elif not parent.closed:
            escalated = EscalatedFailure(
                f"child {self.path} failed beyond its restart budget: {error!r}",
                actor=parent.path,
            )
            escalated.__cause__ = error
            parent.signal_failure(_Failure(self.path, escalated))

    def _dead_letter(self, item: object, *, reason: str, error: BaseException | None) -> None:
        message = item.message if type(item) is _Ask else item
        self.system.dead_letter(message, recipient=self.path, reason=reason)
        if type(item) is _Ask:
            failure = MessageFailedError(
                f"{_type_name(message)} went to dead letters: {reason}",
                actor=self.path,
                message_type=_type_name(message),
            )
            failure.__cause__ = error
            self._resolve(item, None, failure)

    def _drain_to_dead_letters(self, reason: str) -> None:
        while True:
            try:
                item = self.mailbox.get_nowait()
            except (WouldBlock, EndOfStream):
                return
            if type(item) is _Ask:
                self._resolve(item, None, ActorStoppedError(reason, actor=self.path))
            self.system.dead_letter(
                item.message if type(item) is _Ask else item, recipient=self.path, reason=reason
            )

    def _cancel_work(self) -> None:
        for scope in self.work_scopes:
            scope.cancel()
        self.work_scopes.clear()

    async def _stop_children(self) -> None:
        """Stop the children, newest first, each within the shutdown timeout."""
        for child in reversed(list(self.children.values())):
            child.request_stop()
            with anyio.move_on_after(self.system.shutdown_timeout):
                await child.wait_terminated()

    async def _terminate(self) -> None:
        """Stop children (newest first), run on_stop, notify watchers and the parent."""
        self.request_stop(self.stop_reason)
        system = self.system
        system.timers.cancel_all(self)
        self._cancel_work()
        with anyio.CancelScope(shield=True):
            await self._stop_children()
            if self.running and self.actor is not None:
                self.running = False
                await _quietly(self.actor.on_stop(), path=self.path, hook="on_stop")
        self._cancel_work()  # anything on_stop started
        self._drain_to_dead_letters("actor stopped")
        for watcher in self.watchers:
            watcher.deliver(Terminated(actor=self.path, reason=self.stop_reason))
        self.watchers.clear()
        system.unregister(self)
        if not self.idle and self.tracker is not None:
            self.idle = True
            self.tracker.release()
        self.is_terminated = True
        if self._terminated_event is not None:
            self._terminated_event.set()


async def _quietly(awaitable: Awaitable[object], *, path: str, hook: str) -> None:
    # A failing cleanup hook is logged once and must not stop the rest of the shutdown.
    try:
        await awaitable
    except Exception as error:
        _log.error("actor_hook_failed", actor=path, hook=hook, error=repr(error))


def _type_name(message: object) -> str:
    if type(message) is _Ask:
        message = message.message
    return type(message).__name__
