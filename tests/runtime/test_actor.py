"""Actors and their refs: spawn, tell, ask, watch, background work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from runtime import (
    Actor,
    ActorRef,
    ActorStartError,
    ActorStoppedError,
    AskTimeoutError,
    ConfigurationError,
    MailboxFullError,
    Message,
    MessageFailedError,
    SelfAskError,
    Supervision,
    Terminated,
    VirtualClock,
    open_system,
)

# Restart at once: these tests are about delivery, not backoff timing.
QUICK = Supervision(backoff_min=0.0, backoff_max=0.0)


class Ping(Message, frozen=True, kw_only=True, tag="test.actor.ping"):
    n: int = 0


class Boom(Message, frozen=True, kw_only=True, tag="test.actor.boom"):
    pass


class Get(Message, frozen=True, kw_only=True, tag="test.actor.get"):
    pass


class Watch(Message, frozen=True, kw_only=True, tag="test.actor.watch"):
    target: Any


class Recorder(Actor[object]):
    """Records every message; sets ``done`` once it holds ``expected`` of them."""

    def __init__(self, log: list[object], *, expected: int = 0) -> None:
        self.log = log
        self.expected = expected
        self.done = anyio.Event()

    async def receive(self, message: object) -> Any:
        self.log.append(message)
        if len(self.log) >= self.expected:
            self.done.set()
        return None


class Gated(Actor[Ping]):
    """Blocks on ``gate`` while handling ``Ping(n=0)`` and records every ``n``."""

    def __init__(self, gate: anyio.Event, entered: anyio.Event, log: list[int]) -> None:
        self.gate = gate
        self.entered = entered
        self.log = log

    async def receive(self, message: Ping) -> Any:
        if message.n == 0:
            self.entered.set()
            await self.gate.wait()
        self.log.append(message.n)
        return message.n


class Echo(Actor[object]):
    """Replies with the message it got; crashes on ``Boom``."""

    async def receive(self, message: object) -> Any:
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        return message


class Counter(Actor[object]):
    """Counts the messages its current instance handled; ``Get`` returns the count."""

    def __init__(self) -> None:
        self.count = 0

    async def receive(self, message: object) -> Any:
        if isinstance(message, Get):
            return self.count
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        self.count += 1
        return self.count


class Watcher(Actor[object]):
    """Watches the ref in a ``Watch`` message; records the ``Terminated`` it receives."""

    def __init__(self, seen: list[Terminated], got: anyio.Event) -> None:
        self.seen = seen
        self.got = got

    async def receive(self, message: object) -> Any:
        if isinstance(message, Watch):
            self.context.watch(message.target)
        elif isinstance(message, Terminated):
            self.seen.append(message)
            self.got.set()
        return None


def gated(gate: anyio.Event, entered: anyio.Event, log: list[int]) -> Callable[[], Gated]:
    return lambda: Gated(gate, entered, log)


# -- spawn -----------------------------------------------------------------------------------


async def test_spawn_returns_a_started_ref() -> None:
    """spawn() returns only after on_start ran, with a live, registered ref."""
    started: list[str] = []

    class Starting(Echo):
        async def on_start(self) -> None:
            await anyio.lowlevel.checkpoint()
            started.append(self.context.path)

    async with open_system() as system:
        with anyio.fail_after(5):
            ref = await system.spawn(Starting, name="starting")
            assert started == ["/starting"]
            assert ref.is_alive
            assert ref.path == "/starting"
            assert ref.name == "starting"
            assert system.lookup("/starting") == ref
            assert system.statistics().actors == 1
            assert await ref.ask(Ping(n=3), timeout=5) == Ping(n=3)


async def test_on_start_failure_raises_actor_start_error_and_leaves_nothing() -> None:
    """A failing on_start makes spawn raise ActorStartError (cause chained), nothing stays."""
    cause = ValueError("no config")

    class Broken(Echo):
        async def on_start(self) -> None:
            raise cause

    async with open_system() as system:
        with anyio.fail_after(5):
            with pytest.raises(ActorStartError) as info:
                await system.spawn(Broken, name="broken")
            assert info.value.__cause__ is cause
            assert info.value.actor == "/broken"
            assert system.lookup("/broken") is None
            assert system.statistics().actors == 0
            # The name is free again.
            ref = await system.spawn(Echo, name="broken")
            assert await ref.ask(Ping(n=1), timeout=5) == Ping(n=1)


async def test_child_start_failure_raises_in_the_parent_handler() -> None:
    """ctx.spawn of a child whose on_start fails raises ActorStartError in the parent."""

    class Broken(Echo):
        async def on_start(self) -> None:
            raise KeyError("missing")

    class Parent(Actor[object]):
        async def receive(self, message: object) -> Any:
            try:
                await self.context.spawn(Broken, name="kid")
            except ActorStartError as error:
                return (error.actor, type(error.__cause__).__name__)
            return None

    async with open_system() as system:
        with anyio.fail_after(5):
            parent = await system.spawn(Parent, name="parent")
            assert await parent.ask(Ping(), timeout=5) == ("/parent/kid", "KeyError")
            assert system.lookup("/parent/kid") is None
            assert system.statistics().actors == 1


async def test_duplicate_sibling_names_are_rejected() -> None:
    """A name already used by a sibling is refused; the same name under another parent is not."""

    class Parent(Actor[object]):
        async def receive(self, message: object) -> Any:
            await self.context.spawn(Echo, name="worker")
            try:
                await self.context.spawn(Echo, name="worker")
            except ConfigurationError as error:
                return error.where
            return None

    async with open_system() as system:
        with anyio.fail_after(5):
            await system.spawn(Echo, name="worker")
            with pytest.raises(ConfigurationError):
                await system.spawn(Echo, name="worker")
            parent = await system.spawn(Parent, name="parent")
            assert await parent.ask(Ping(), timeout=5) == "spawn"
            assert system.lookup("/parent/worker") is not None
            assert system.lookup("/worker") is not None
            assert system.statistics().actors == 3


@pytest.mark.parametrize("name", ["", "a/b", "/"])
async def test_bad_names_are_rejected(name: str) -> None:
    """Empty names and names containing '/' are refused."""
    async with open_system() as system:
        with pytest.raises(ConfigurationError):
            await system.spawn(Echo, name=name)
        assert system.statistics().actors == 0


@pytest.mark.parametrize("capacity", [0, -1])
async def test_mailbox_capacity_below_one_is_rejected(capacity: int) -> None:
    """A mailbox capacity below 1 is a configuration error, not a silent default."""
    async with open_system() as system:
        with pytest.raises(ConfigurationError):
            await system.spawn(Echo, mailbox_capacity=capacity)
        assert system.statistics().actors == 0


async def test_auto_names_are_unique_and_deterministic() -> None:
    """Unnamed actors get ``<factory>-<n>`` names, unique and the same in every run."""

    async def run() -> list[str]:
        async with open_system() as system:
            first = await system.spawn(Echo)
            second = await system.spawn(Echo)
            third = await system.spawn(Counter)
            return [first.path, second.path, third.path]

    with anyio.fail_after(5):
        paths = await run()
        assert paths == ["/Echo-1", "/Echo-2", "/Counter-3"]
        assert await run() == paths


# -- tell ------------------------------------------------------------------------------------


async def test_tell_preserves_order_per_sender() -> None:
    """Messages from one sender arrive in the order sent, across tell and tell_nowait."""
    log: list[object] = []
    async with open_system() as system:
        recorder = Recorder(log, expected=500)
        ref = await system.spawn(lambda: recorder, mailbox_capacity=8)
        with anyio.fail_after(5):
            for n in range(500):
                if n % 3:
                    await ref.tell(Ping(n=n))
                else:
                    try:
                        ref.tell_nowait(Ping(n=n))
                    except MailboxFullError:
                        await ref.tell(Ping(n=n))
            await recorder.done.wait()
    assert log == [Ping(n=n) for n in range(500)]


async def test_two_senders_each_keep_their_order() -> None:
    """Interleaved senders: each sender's messages stay in that sender's order."""
    log: list[object] = []

    class Sender(Actor[object]):
        def __init__(self, target: ActorRef[object], offset: int) -> None:
            self.target = target
            self.offset = offset

        async def receive(self, message: object) -> Any:
            for n in range(200):
                await self.target.tell(Ping(n=self.offset + n))

    async with open_system() as system:
        recorder = Recorder(log, expected=400)
        target = await system.spawn(lambda: recorder, mailbox_capacity=4)
        a = await system.spawn(lambda: Sender(target, 0))
        b = await system.spawn(lambda: Sender(target, 1000))
        with anyio.fail_after(5):
            a.tell_nowait(Get())
            b.tell_nowait(Get())
            await recorder.done.wait()
    numbers = [m.n for m in log if isinstance(m, Ping)]
    assert [n for n in numbers if n < 1000] == list(range(200))
    assert [n for n in numbers if n >= 1000] == list(range(1000, 1200))


async def test_tell_nowait_raises_mailbox_full_and_tell_waits_for_room() -> None:
    """A full mailbox: tell_nowait raises MailboxFullError, tell waits until the actor drains."""
    gate, entered, log = anyio.Event(), anyio.Event(), list[int]()
    async with open_system() as system:
        ref = await system.spawn(gated(gate, entered, log), name="slow", mailbox_capacity=2)
        with anyio.fail_after(5):
            ref.tell_nowait(Ping(n=0))
            await entered.wait()
            ref.tell_nowait(Ping(n=1))
            ref.tell_nowait(Ping(n=2))
            with pytest.raises(MailboxFullError) as info:
                ref.tell_nowait(Ping(n=99))
            assert (info.value.actor, info.value.capacity) == ("/slow", 2)

            sent = anyio.Event()

            async def blocked_sender() -> None:
                await ref.tell(Ping(n=3))
                sent.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked_sender)
                await anyio.wait_all_tasks_blocked()
                assert not sent.is_set()
                gate.set()
                await sent.wait()
            assert await ref.ask(Ping(n=4), timeout=5) == 4
    assert log == [0, 1, 2, 3, 4]
    assert system.statistics().dead_letters == 0


async def test_backpressured_tell_keeps_virtual_clock_activity_balanced() -> None:
    """A tell that waited for room marks the actor busy again: activity returns to exactly 0."""
    clock = VirtualClock()
    gate, entered, log = anyio.Event(), anyio.Event(), list[int]()
    async with open_system(clock=clock) as system:
        ref = await system.spawn(gated(gate, entered, log), mailbox_capacity=1)
        with anyio.fail_after(5):
            ref.tell_nowait(Ping(n=0))
            await entered.wait()
            ref.tell_nowait(Ping(n=1))
            async with anyio.create_task_group() as tg:
                tg.start_soon(ref.tell, Ping(n=2))
                await anyio.wait_all_tasks_blocked()
                gate.set()
            assert await ref.ask(Ping(n=3), timeout=5) == 3
            await anyio.wait_all_tasks_blocked()
            assert log == [0, 1, 2, 3]
            assert clock.activity.count == 0


async def test_tell_to_a_stopped_actor_goes_to_dead_letters() -> None:
    """tell and tell_nowait to a stopped actor are dead letters: counted and recorded."""
    async with open_system() as system:
        ref = await system.spawn(Echo, name="gone")
        with anyio.fail_after(5):
            await system.stop(ref)
            assert not ref.is_alive
            ref.tell_nowait(Ping(n=1))
            await ref.tell(Ping(n=2))
        stats = system.statistics()
        assert stats.dead_letters == 2
        assert stats.actors == 0
        letters = list(system.recent_dead_letters)
        assert [(d.recipient, d.message_type, d.reason, d.message) for d in letters] == [
            ("/gone", "Ping", "actor stopped", Ping(n=1)),
            ("/gone", "Ping", "actor stopped", Ping(n=2)),
        ]


async def test_tell_waiting_for_room_is_dead_lettered_when_the_actor_stops() -> None:
    """A tell blocked on a full mailbox becomes a dead letter when the actor stops."""
    gate, entered, log = anyio.Event(), anyio.Event(), list[int]()
    async with open_system() as system:
        ref = await system.spawn(gated(gate, entered, log), name="slow", mailbox_capacity=1)
        with anyio.fail_after(5):
            ref.tell_nowait(Ping(n=0))
            await entered.wait()
            ref.tell_nowait(Ping(n=1))
            async with anyio.create_task_group() as tg:
                tg.start_soon(ref.tell, Ping(n=2))
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(system.stop, ref)
                await anyio.wait_all_tasks_blocked()
                gate.set()
    assert log == [0, 1]
    assert [d.message for d in system.recent_dead_letters] == [Ping(n=2)]


# -- ask -------------------------------------------------------------------------------------


async def test_ask_returns_the_handler_reply() -> None:
    """ask() returns what the handler returned."""
    async with open_system() as system:
        ref = await system.spawn(Counter)
        with anyio.fail_after(5):
            assert await ref.ask(Ping(), timeout=5) == 1
            assert await ref.ask(Ping(), timeout=5) == 2
            assert await ref.ask(Get(), timeout=5) == 2


async def test_first_crash_restarts_and_redelivers_to_a_fresh_instance() -> None:
    """A handler crash restarts the actor and redelivers the message to a fresh instance."""
    instances: list[Flaky] = []

    class Flaky(Actor[object]):
        def __init__(self) -> None:
            self.handled = 0
            instances.append(self)

        async def receive(self, message: object) -> Any:
            self.handled += 1
            if len(instances) == 1:
                raise RuntimeError("first instance is broken")
            return (len(instances), self.handled)

    async with open_system(default_supervision=QUICK) as system:
        ref = await system.spawn(Flaky)
        with anyio.fail_after(5):
            assert await ref.ask(Ping(), timeout=5) == (2, 1)
        stats = system.statistics()
        assert (stats.failures, stats.restarts, stats.dead_letters) == (1, 1, 0)


async def test_message_crashing_twice_is_dead_lettered_and_asker_gets_error() -> None:
    """A message crashing the actor twice is dead-lettered; its asker gets MessageFailedError."""
    async with open_system(default_supervision=QUICK) as system:
        ref = await system.spawn(Echo, name="echo")
        with anyio.fail_after(5):
            with pytest.raises(MessageFailedError) as info:
                await ref.ask(Boom(), timeout=5)
            assert info.value.actor == "/echo"
            assert info.value.message_type == "Boom"
            assert isinstance(info.value.__cause__, RuntimeError)
            # The actor lives on (restarted) and answers the next message.
            assert await ref.ask(Ping(n=7), timeout=5) == Ping(n=7)
        stats = system.statistics()
        assert (stats.failures, stats.restarts, stats.dead_letters) == (2, 2, 1)
        letter = system.recent_dead_letters[-1]
        assert (letter.recipient, letter.message_type, letter.message) == ("/echo", "Boom", Boom())
        assert letter.reason.startswith("crashed the actor: RuntimeError")


async def test_same_message_object_crashing_once_each_time_is_redelivered() -> None:
    """A reused message object that crashes once per delivery is redelivered each time."""
    tick = Ping(n=1)
    handled: list[int] = []
    attempts = [0]

    class OddCrasher(Actor[object]):
        async def receive(self, message: object) -> Any:
            attempts[0] += 1
            if attempts[0] in (1, 3):
                raise RuntimeError(f"attempt {attempts[0]}")
            handled.append(attempts[0])
            return attempts[0]

    async with open_system(
        default_supervision=Supervision(max_restarts=10, backoff_min=0.0, backoff_max=0.0)
    ) as system:
        ref = await system.spawn(OddCrasher)
        with anyio.fail_after(5):
            ref.tell_nowait(tick)
            ref.tell_nowait(tick)
            assert await ref.ask(Get(), timeout=5) == 5
    assert handled == [2, 4, 5]
    assert system.statistics().dead_letters == 0


async def test_ask_timeout_raises_ask_timeout_error() -> None:
    """An ask with no reply within its timeout raises AskTimeoutError naming the actor."""
    gate, entered, log = anyio.Event(), anyio.Event(), list[int]()
    async with open_system() as system:
        ref = await system.spawn(gated(gate, entered, log), name="stuck")
        with anyio.fail_after(5):
            with pytest.raises(AskTimeoutError) as info:
                await ref.ask(Ping(n=0), timeout=0.05)
            assert isinstance(info.value, TimeoutError)
            assert (info.value.actor, info.value.timeout) == ("/stuck", 0.05)
            gate.set()
            # The late reply is dropped; the actor keeps working.
            assert await ref.ask(Ping(n=5), timeout=5) == 5
    assert log == [0, 5]


async def test_a_short_ask_times_out_before_a_longer_one_asked_earlier() -> None:
    """Each ask keeps its own deadline, even when a later ask has a shorter timeout."""
    gate, entered, log = anyio.Event(), anyio.Event(), list[int]()
    async with open_system() as system:
        ref = await system.spawn(gated(gate, entered, log), name="stuck")
        outcomes: list[str] = []
        first_timed_out = anyio.Event()

        async def ask(seconds: float, label: str) -> None:
            try:
                await ref.ask(Ping(n=0), timeout=seconds)
            except AskTimeoutError:
                outcomes.append(label)
                first_timed_out.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, 3.0, "long")
                await entered.wait()
                tg.start_soon(ask, 0.05, "short")
                await first_timed_out.wait()
                assert outcomes == ["short"]  # the long one is still waiting
                gate.set()
    assert outcomes == ["short"]


async def test_asking_yourself_from_the_handler_raises_self_ask_error() -> None:
    """An actor asking itself from its handler gets SelfAskError at once, not a deadlock."""

    class Narcissus(Actor[object]):
        async def receive(self, message: object) -> Any:
            if isinstance(message, Get):
                return "inner"
            try:
                await self.context.self_ref.ask(Get(), timeout=5)
            except SelfAskError as error:
                return f"refused {error.actor}"
            return "asked"

    async with open_system() as system:
        ref = await system.spawn(Narcissus, name="me")
        with anyio.fail_after(5):
            assert await ref.ask(Ping(), timeout=5) == "refused /me"


async def test_background_work_may_ask_its_own_actor() -> None:
    """Work started with start_work runs beside the handler, so it may ask its own actor."""
    result: list[object] = []
    finished = anyio.Event()

    class Worker(Actor[object]):
        async def receive(self, message: object) -> Any:
            if isinstance(message, Get):
                return "from handler"
            ref = self.context.self_ref

            async def work() -> None:
                try:
                    result.append(await ref.ask(Get(), timeout=5))
                except Exception as error:
                    result.append(error)
                finished.set()

            self.context.start_work(work)
            return None

    async with open_system() as system:
        ref = await system.spawn(Worker)
        with anyio.fail_after(5):
            ref.tell_nowait(Ping())
            await finished.wait()
    assert result == ["from handler"]


async def test_ask_to_a_stopped_actor_raises_actor_stopped_error() -> None:
    """ask() to a stopped actor raises ActorStoppedError."""
    async with open_system() as system:
        ref = await system.spawn(Echo, name="gone")
        with anyio.fail_after(5):
            await system.stop(ref)
            with pytest.raises(ActorStoppedError) as info:
                await ref.ask(Ping(), timeout=5)
        assert info.value.actor == "/gone"


async def test_queued_ask_fails_with_actor_stopped_when_the_actor_gives_up() -> None:
    """Asks queued behind a message that stops the actor get ActorStoppedError."""
    gate, entered, log = anyio.Event(), anyio.Event(), list[int]()

    class GatedBoom(Gated):
        async def receive(self, message: Ping) -> Any:
            await super().receive(message)
            raise RuntimeError("boom")

    async with open_system() as system:
        ref = await system.spawn(
            lambda: GatedBoom(gate, entered, log), supervision=Supervision(strategy="stop")
        )
        outcome: list[type[BaseException]] = []

        async def asker() -> None:
            try:
                await ref.ask(Ping(n=1), timeout=5)
            except Exception as error:
                outcome.append(type(error))

        with anyio.fail_after(5):
            ref.tell_nowait(Ping(n=0))
            await entered.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(asker)
                await anyio.wait_all_tasks_blocked()
                gate.set()
    assert outcome == [ActorStoppedError]


# -- watch -----------------------------------------------------------------------------------


async def test_watcher_gets_terminated_without_reason_on_orderly_stop() -> None:
    """A watcher receives Terminated(actor=path, reason=None) when the actor stops normally."""
    seen: list[Terminated] = []
    got = anyio.Event()
    async with open_system() as system:
        target = await system.spawn(Echo, name="target")
        watcher = await system.spawn(lambda: Watcher(seen, got))
        with anyio.fail_after(5):
            await watcher.ask(Watch(target=target), timeout=5)
            await system.stop(target)
            await got.wait()
    assert seen == [Terminated(actor="/target", reason=None)]


async def test_watcher_gets_terminated_with_reason_on_failure() -> None:
    """A watcher receives Terminated with the failure as reason when the actor fails."""
    seen: list[Terminated] = []
    got = anyio.Event()
    async with open_system() as system:
        target = await system.spawn(Echo, name="target", supervision=Supervision(strategy="stop"))
        watcher = await system.spawn(lambda: Watcher(seen, got))
        with anyio.fail_after(5):
            await watcher.ask(Watch(target=target), timeout=5)
            target.tell_nowait(Boom())
            await got.wait()
    assert len(seen) == 1
    assert seen[0].actor == "/target"
    assert seen[0].reason == "failed: RuntimeError('boom')"


async def test_watching_a_stopped_actor_delivers_terminated_at_once() -> None:
    """Watching an actor that already stopped delivers Terminated immediately."""
    seen: list[Terminated] = []
    got = anyio.Event()
    async with open_system() as system:
        target = await system.spawn(Echo, name="target")
        watcher = await system.spawn(lambda: Watcher(seen, got))
        with anyio.fail_after(5):
            await system.stop(target)
            await watcher.ask(Watch(target=target), timeout=5)
            await got.wait()
    assert seen == [Terminated(actor="/target", reason=None)]


async def test_unwatch_stops_notifications() -> None:
    """After unwatch, the former watcher gets no Terminated."""
    seen: list[Terminated] = []

    class Fickle(Actor[object]):
        async def receive(self, message: object) -> Any:
            if isinstance(message, Watch):
                self.context.watch(message.target)
                self.context.unwatch(message.target)
            elif isinstance(message, Terminated):
                seen.append(message)
            return None

    async with open_system() as system:
        target = await system.spawn(Echo)
        fickle = await system.spawn(Fickle)
        with anyio.fail_after(5):
            await fickle.ask(Watch(target=target), timeout=5)
            await system.stop(target)
            await fickle.ask(Get(), timeout=5)
    assert seen == []
    assert system.statistics().dead_letters == 0


async def test_terminated_reaches_a_watcher_whose_mailbox_is_full() -> None:
    """A watcher with a full mailbox still gets Terminated once it has room; the stop completes."""
    gate, entered = anyio.Event(), anyio.Event()
    seen: list[object] = []

    class BusyWatcher(Actor[object]):
        async def receive(self, message: object) -> Any:
            if isinstance(message, Watch):
                self.context.watch(message.target)
            elif message == Ping(n=0):
                entered.set()
                await gate.wait()
            else:
                seen.append(message)
            return None

    async with open_system() as system:
        target = await system.spawn(Echo, name="target")
        watcher = await system.spawn(BusyWatcher, mailbox_capacity=1)
        with anyio.fail_after(5):
            await watcher.ask(Watch(target=target), timeout=5)
            watcher.tell_nowait(Ping(n=0))
            await entered.wait()
            watcher.tell_nowait(Ping(n=1))  # mailbox now full
            await system.stop(target)
            gate.set()
            while len(seen) < 2:
                await watcher.ask(Get(), timeout=5)
    assert seen[:2] == [Ping(n=1), Terminated(actor="/target", reason=None)]


# -- background work ---------------------------------------------------------------------------


async def test_failing_background_work_fails_the_actor() -> None:
    """An exception in start_work's function restarts the actor like a handler crash."""
    starts: list[int] = []

    class Working(Actor[object]):
        async def on_start(self) -> None:
            starts.append(len(starts) + 1)

        async def receive(self, message: object) -> Any:
            if isinstance(message, Get):
                return len(starts)

            async def work() -> None:
                raise OSError("disk gone")

            self.context.start_work(work, name="flush")
            return None

    async with open_system(default_supervision=QUICK) as system:
        ref = await system.spawn(Working)
        with anyio.fail_after(5):
            ref.tell_nowait(Ping())
            while await ref.ask(Get(), timeout=5) < 2:
                await anyio.wait_all_tasks_blocked()
        stats = system.statistics()
        assert (stats.failures, stats.restarts, stats.dead_letters) == (1, 1, 0)
    assert starts == [1, 2]


async def test_background_work_is_cancelled_when_the_actor_stops() -> None:
    """Work started just before the actor stops is cancelled with it, not left running."""
    started, finished = anyio.Event(), anyio.Event()

    class Stopping(Actor[object]):
        async def receive(self, message: object) -> Any:
            async def work() -> None:
                try:
                    started.set()
                    await anyio.sleep_forever()
                finally:
                    finished.set()

            self.context.start_work(work)
            self.context.stop()
            return None

    async with open_system() as system:
        ref = await system.spawn(Stopping)
        with anyio.fail_after(5):
            ref.tell_nowait(Ping())
            await system.stop(ref)
            await finished.wait()
